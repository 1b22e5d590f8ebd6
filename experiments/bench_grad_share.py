"""Benchmark section "grad_share": cost of gradient sharing in a MAML outer step.

Outer-step time of `mg.maml` with ``inner=mg.grad_share(α)`` over the same learner with plain
``optax.sgd(α)`` inner steps (target: ratio <= 1.15), on the sinusoid setup (MLP 1-40-40-1
ReLU, K = 10 support and query points, Adam 1e-3) with the paper's K = 5 inner steps and
task batches of 5 and 25, second and first order. Both learners get the same pre-sampled
task batch and are timed in interleaved rounds (best round kept). The comparison is like for
like: same model, data, outer optimizer and compile path; grad_share's learned m_k, λ_k are part
of the method, so their outer-optimizer update and (first order too) their backward pass through
the rule's arithmetic are counted.

Where the extra time goes (compiled HLO of one outer step, task batch 5, CPU): at this model
size an outer step is a few hundred sub-microsecond XLA kernels, so the ratio is the ratio of
kernel counts, not of FLOPs. Per inner step grad_share adds the ravel of the task gradients, the
norms and mean, the average and the interpolation, plus the residuals kept for the backward pass
(the task gradients, G, σ(m_k), σ(λ_k)); first order it adds a backward scan over the inner steps
for m_k and λ_k (only through the rule's arithmetic: the task gradients are constants there);
after the loop, the finiteness guard of the carried G and Adam on two more leaves. Keeping G flat
through the whole inner loop (`InnerRule.loop_carry`) and taking the sigmoids of all K logits
before indexing (so the backward pass does not stack them per step) took the kernel count,
weighted by scan trips, from 430 to 352 first order (plain FOMAML: 159) and from 764 to 686
second order (plain MAML: 400). The 1.15 target is not met at this size.
"""

from __future__ import annotations

import time

import jax
import optax

import metagrad as mg
from experiments.data import sinusoid_tasks
from experiments.models import mlp_init, mse_loss

INNER_STEPS, INNER_LR, OUTER_LR, SHOTS = 5, 0.01, 1e-3, 10


def add_arguments(parser):
    group = parser.add_argument_group("grad_share")
    group.add_argument("--grad-share-iters", type=int, default=100, help="steps per round")
    group.add_argument("--grad-share-rounds", type=int, default=5, help="timing rounds")


def _time(entries, tasks, iters, rounds):
    states = {}
    for name, learner in entries.items():
        state, _ = learner.step(learner.init(mlp_init(jax.random.PRNGKey(0))), tasks)  # compile
        states[name] = jax.block_until_ready(state)
    best = dict.fromkeys(entries, float("inf"))
    for _ in range(rounds):
        for name, learner in entries.items():
            state = states[name]
            start = time.perf_counter()
            for _ in range(iters):
                state, _ = learner.step(state, tasks)
            jax.block_until_ready(state)
            best[name] = min(best[name], time.perf_counter() - start)
            states[name] = state
    return {name: t / iters for name, t in best.items()}


def run(args) -> list[dict]:
    iters = getattr(args, "grad_share_iters", 100)
    rounds = getattr(args, "grad_share_rounds", 5)
    rows = []
    for num_tasks in (5, 25):
        tasks = sinusoid_tasks(jax.random.PRNGKey(1), num_tasks, SHOTS, SHOTS)[:2]
        for first_order in (False, True):
            entries = {
                name: mg.maml(
                    mse_loss, inner, INNER_STEPS, optax.adam(OUTER_LR), first_order=first_order
                )
                for name, inner in (
                    ("maml", optax.sgd(INNER_LR)),
                    ("maml+grad_share", mg.grad_share(INNER_LR)),
                )
            }
            times = _time(entries, tasks, iters, rounds)
            rows.append(
                {
                    "method": ("fomaml" if first_order else "maml") + " vs +grad_share",
                    "task_batch": num_tasks,
                    "inner_steps": INNER_STEPS,
                    "ms_plain": round(1e3 * times["maml"], 3),
                    "ms_grad_share": round(1e3 * times["maml+grad_share"], 3),
                    "ratio": round(times["maml+grad_share"] / times["maml"], 3),
                    "target": "<= 1.15",
                }
            )
    return rows
