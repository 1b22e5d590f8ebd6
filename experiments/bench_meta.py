"""Benchmark section "meta": meta-iterations per second of metagrad's meta-steps.

The MAML sinusoid setup of SPEC section 3 (meta-batch 25, K = 10 support and 10 query
points, one inner SGD step with learning rate 0.01, MLP 1-40-40-1 ReLU, outer Adam 1e-3):
`mg.maml` and `mg.fomaml` against a hand-written fused JAX loop (`jax.vmap` + `jax.jit`)
of the same computation, in one run; and the throughputs of `mg.reptile` (its inner step on
a task's 20 points pooled, the query loss on its 10 query points) and `mg.seq_reptile`.

Fairness: every method runs the same Python loop, one jitted task-sampling call
(`experiments.data.sinusoid_tasks`, shared) and one jitted step call per meta-iteration, and
the methods are timed in interleaved rounds (best round kept) so machine load affects them
alike.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax

import metagrad as mg
from experiments.data import sinusoid_tasks
from experiments.models import mlp_init, mse_loss

META_BATCH, SHOTS, INNER_LR, OUTER_LR = 25, 10, 0.01, 1e-3


def add_arguments(parser):
    group = parser.add_argument_group("meta")
    group.add_argument("--meta-iters", type=int, default=200, help="meta-iterations per round")
    group.add_argument("--meta-rounds", type=int, default=5, help="interleaved timing rounds")


def _fused_maml(first_order: bool):
    """Hand-written MAML step: vmap over tasks of (one SGD step, query loss), jit."""
    adam = optax.adam(OUTER_LR)

    def task_loss(params, support, query):
        before, grads = jax.value_and_grad(mse_loss)(params, support)
        if first_order:
            grads = jax.lax.stop_gradient(grads)
        adapted = jax.tree.map(lambda p, g: p - INNER_LR * g, params, grads)
        return mse_loss(adapted, query), before

    def meta_loss(params, tasks):
        support, query = tasks
        after, before = jax.vmap(task_loss, in_axes=(None, 0, 0))(params, support, query)
        return jnp.mean(after), jnp.mean(before)

    @jax.jit
    def step(state, tasks):
        # The metrics of `mg.maml` too: query loss after adaptation, support loss before,
        # the meta-gradient's norm.
        params, opt_state = state
        (loss, loss_pre), grads = jax.value_and_grad(meta_loss, has_aux=True)(params, tasks)
        updates, opt_state = adam.update(grads, opt_state, params)
        metrics = {
            "loss": loss,
            "loss_pre": loss_pre,
            "loss_post": loss,
            "meta_grad_norm": optax.tree.norm(grads),
        }
        return (optax.apply_updates(params, updates), opt_state), metrics

    return (lambda params: (params, adam.init(params))), step


def _learner(learner):
    return learner.init, learner.step


def _reptile_methods():
    """Reptile (1 inner step on the pooled points) and Sequential Reptile (K = 25 batches)."""
    inner, outer = optax.sgd(INNER_LR), optax.adam(OUTER_LR)
    reptile = mg.reptile(mse_loss, inner, 1, outer)
    seq = mg.seq_reptile(mse_loss, inner, META_BATCH, outer)
    return {
        "reptile (mg, 1 inner step)": ("reptile", _learner(reptile)),
        f"seq_reptile (mg, K={META_BATCH})": ("seq_reptile", _learner(seq)),
    }


def run(args) -> list[dict]:
    iters = getattr(args, "meta_iters", 200)
    rounds = getattr(args, "meta_rounds", 5)
    params = mlp_init(jax.random.PRNGKey(0))

    inner, outer = optax.sgd(INNER_LR), optax.adam(OUTER_LR)
    methods = {
        "maml (fused jax)": ("maml", _fused_maml(False)),
        "maml (mg.maml)": ("maml", _learner(mg.maml(mse_loss, inner, 1, outer))),
        "fomaml (fused jax)": ("maml", _fused_maml(True)),
        "fomaml (mg.fomaml)": ("maml", _learner(mg.fomaml(mse_loss, inner, 1, outer))),
    }
    methods.update(_reptile_methods())
    rows, errors = [], {}
    runnable = {}
    for name, (kind, impl) in methods.items():
        init, step = impl

        @jax.jit
        def sample_step_input(key, kind=kind):
            # One jitted call per iteration: the next key and the step's input.
            key, sub = jax.random.split(key)
            support, query = sinusoid_tasks(sub, META_BATCH, SHOTS, SHOTS)[:2]
            if kind == "maml":
                return key, (support, query)
            pooled = jax.tree.map(lambda s, q: jnp.concatenate([s, q], axis=1), support, query)
            if kind == "reptile":
                # Inner steps on all 20 points of a task, the query loss on its 10 query points.
                return key, (pooled, query)
            # seq_reptile: K = META_BATCH batches, one per task, with their task ids.
            return key, (jnp.arange(META_BATCH, dtype=jnp.int32), pooled)

        state = init(params)
        try:
            _, tasks = sample_step_input(jax.random.PRNGKey(1))
            state, metrics = step(state, tasks)  # compile
            jax.block_until_ready(state)
        except Exception as e:  # noqa: BLE001
            errors[name] = repr(e)
            continue
        runnable[name] = [state, step, sample_step_input]

    best = {name: float("inf") for name in runnable}
    key = jax.random.PRNGKey(2)
    for _ in range(rounds):
        for name, entry in runnable.items():
            state, step, sample_step_input = entry
            k = key
            start = time.perf_counter()
            for _ in range(iters):
                k, tasks = sample_step_input(k)
                state, metrics = step(state, tasks)
            jax.block_until_ready(state)
            best[name] = min(best[name], time.perf_counter() - start)
            entry[0] = state
    speed = {name: iters / t for name, t in best.items()}
    for name, its in speed.items():
        row = {"method": name, "meta_it_per_s": round(its, 1)}
        base = name.split(" ")[0]
        fused = f"{base} (fused jax)"
        if fused in speed and name != fused:
            row["ratio_vs_fused"] = round(its / speed[fused], 3)
            row["target"] = ">= 0.9"
        rows.append(row)
    rows.extend({"method": name, "error": msg} for name, msg in errors.items())
    return rows
