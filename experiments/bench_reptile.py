"""Benchmark section "reptile": throughput of metagrad's Reptile family.

Sinusoid setup of SPEC section 3 (MLP 1-40-40-1 ReLU, meta-batch 25 tasks, K = 10 points
per task, inner SGD with learning rate 0.01, outer Adam 1e-3):

- `mg.reptile` with 5 inner steps per task on its K support points (tasks vmapped) and the
  query loss after adaptation on K query points, against a hand-written fused JAX loop
  (`jax.vmap` over tasks of a `lax.scan` of SGD steps and the query loss, `jax.jit`) of the
  same computation and metrics, in meta-iterations per second and as a ratio;
- `mg.seq_reptile` with one trajectory of 125 batches (5 per task of the meta-batch, the
  same 125 gradient evaluations as Reptile's 25 x 5, in random task order), against the
  same computation written by hand;
- `mg.reptile_outer` wrapped around SGD and Adam (outer step size 0.1, and an Adam outer
  optimizer on SGD; the inner state reset at every outer step, the default), against the
  plain optimizer: time of one jitted training step
  (gradient on a 100-point batch, update, apply), and the ratio.

Timing: every method runs the same Python loop with one jitted call for the input and one
for the step per iteration; methods are timed in interleaved rounds and the best round is
kept, so machine load affects them alike.
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
INNER_STEPS = 5
SEQ_STEPS = META_BATCH * INNER_STEPS
TRAIN_BATCH = 100


def add_arguments(parser):
    group = parser.add_argument_group("reptile")
    group.add_argument(
        "--reptile-iters",
        type=int,
        default=100,
        help="meta-iterations per round (training-step timings use 10x as many)",
    )
    group.add_argument("--reptile-rounds", type=int, default=5, help="interleaved timing rounds")


# --------------------------------------------------------------------------------------
# Hand-written references.


def _fused_reptile():
    """Hand-written `mg.reptile` step: the same work, metrics included.

    Per task (vmapped) K SGD steps on the support batch from φ and the query loss at θ_K;
    then the mean displacement through Adam, and the metrics `mg.reptile` reports (mean
    query loss after adaptation, mean support loss at φ, norm of the meta-gradient).
    """
    adam = optax.adam(OUTER_LR)

    def task(params, support, query):
        def body(p, _):
            loss, g = jax.value_and_grad(mse_loss)(p, support)
            return jax.tree.map(lambda a, b: a - INNER_LR * b, p, g), loss

        theta, losses = jax.lax.scan(body, params, None, length=INNER_STEPS)
        return theta, losses[0], mse_loss(theta, query)

    @jax.jit
    def step(state, tasks):
        params, opt_state = state
        support, query = tasks
        thetas, first, after = jax.vmap(task, in_axes=(None, 0, 0))(params, support, query)
        meta_grad = jax.tree.map(lambda p, t: p - jnp.mean(t, axis=0), params, thetas)
        updates, opt_state = adam.update(meta_grad, opt_state, params)
        metrics = {
            "loss": jnp.mean(after),
            "loss_pre": jnp.mean(first),
            "meta_grad_norm": optax.tree.norm(meta_grad),
        }
        return (optax.apply_updates(params, updates), opt_state), metrics

    return (lambda params: (params, adam.init(params))), step


def _fused_seq_reptile():
    """Hand-written `mg.seq_reptile` step, with the metrics it reports."""
    adam = optax.adam(OUTER_LR)

    @jax.jit
    def step(state, tasks):
        params, opt_state = state
        _, batches = tasks

        def body(p, batch):
            loss, g = jax.value_and_grad(mse_loss)(p, batch)
            return jax.tree.map(lambda a, b: a - INNER_LR * b, p, g), loss

        theta, losses = jax.lax.scan(body, params, batches)
        meta_grad = jax.tree.map(lambda p, t: p - t, params, theta)
        updates, opt_state = adam.update(meta_grad, opt_state, params)
        metrics = {
            "loss": jnp.mean(losses),
            "loss_pre": losses[0],
            "meta_grad_norm": optax.tree.norm(meta_grad),
        }
        return (optax.apply_updates(params, updates), opt_state), metrics

    return (lambda params: (params, adam.init(params))), step


@jax.jit
def _sample_reptile(key):
    # (support, query): the inner steps train on the K support points, the K query points
    # are evaluated after adaptation.
    key, sub = jax.random.split(key)
    support, query, _ = sinusoid_tasks(sub, META_BATCH, SHOTS, SHOTS)
    return key, (support, query)


@jax.jit
def _sample_seq(key):
    # 125 batches: each task of the meta-batch 5 times, in a random order; the task ids
    # come with the batches (Sequential Reptile's input format).
    key, k_tasks, k_order = jax.random.split(key, 3)
    (x, y), _, _ = sinusoid_tasks(k_tasks, META_BATCH, SHOTS, 1)
    ids = jax.random.permutation(k_order, jnp.repeat(jnp.arange(META_BATCH), INNER_STEPS))
    return key, (ids.astype(jnp.int32), (x[ids], y[ids]))


@jax.jit
def _sample_train(key):
    key, sub = jax.random.split(key)
    (x, y), _, _ = sinusoid_tasks(sub, 1, TRAIN_BATCH, 1)
    return key, (x[0], y[0])


def _train_step(tx):
    @jax.jit
    def step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(mse_loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

    return (lambda params: (params, tx.init(params))), step


def _methods():
    inner, outer = optax.sgd(INNER_LR), optax.adam(OUTER_LR)
    reptile = mg.reptile(mse_loss, inner, INNER_STEPS, outer)
    seq = mg.seq_reptile(mse_loss, inner, SEQ_STEPS, outer)
    methods = {
        "reptile (fused jax)": ("reptile", _sample_reptile, _fused_reptile()),
        "reptile (mg.reptile)": ("reptile", _sample_reptile, (reptile.init, reptile.step)),
        "seq_reptile (fused jax)": ("seq_reptile", _sample_seq, _fused_seq_reptile()),
        "seq_reptile (mg.seq_reptile)": ("seq_reptile", _sample_seq, (seq.init, seq.step)),
    }
    for name, opt in [("sgd", optax.sgd(INNER_LR)), ("adam", optax.adam(OUTER_LR))]:
        methods[f"{name} (plain optax step)"] = (name, _sample_train, _train_step(opt))
        wrapped = mg.reptile_outer(opt, INNER_STEPS, 0.1)
        methods[f"{name} (mg.reptile_outer step)"] = (name, _sample_train, _train_step(wrapped))
    # An optax outer optimizer: the outer update sits under lax.cond.
    wrapped = mg.reptile_outer(optax.sgd(INNER_LR), INNER_STEPS, optax.adam(0.1))
    methods["sgd (mg.reptile_outer step, adam outer)"] = (
        "sgd",
        _sample_train,
        _train_step(wrapped),
    )
    return methods


def run(args) -> list[dict]:
    iters = getattr(args, "reptile_iters", 100)
    rounds = getattr(args, "reptile_rounds", 5)
    params = mlp_init(jax.random.PRNGKey(0))
    runnable, errors = {}, {}
    for name, (group, sample, (init, step)) in _methods().items():
        try:
            state = init(params)
            _, batch = sample(jax.random.PRNGKey(1))
            state, _ = step(state, batch)  # compile
            jax.block_until_ready(state)
        except Exception as e:  # noqa: BLE001 - report, don't crash the benchmark
            errors[name] = repr(e)
            continue
        # Training steps are ~10x cheaper than meta-steps: time 10x as many.
        n = iters if group in ("reptile", "seq_reptile") else 10 * iters
        runnable[name] = [group, sample, step, state, n]

    best = {name: float("inf") for name in runnable}
    for _ in range(rounds):
        for name, entry in runnable.items():
            _, sample, step, state, n = entry
            key = jax.random.PRNGKey(2)
            start = time.perf_counter()
            for _ in range(n):
                key, batch = sample(key)
                state, _ = step(state, batch)
            jax.block_until_ready(state)
            best[name] = min(best[name], (time.perf_counter() - start) / n)
            entry[3] = state

    rows = []
    reference = {}
    for name, entry in runnable.items():
        group = entry[0]
        if "fused" in name or "plain" in name:
            reference[group] = best[name]
    for name, entry in runnable.items():
        group = entry[0]
        per_s = 1.0 / best[name]
        row = {"method": name}
        if group in ("reptile", "seq_reptile"):
            row["meta_it_per_s"] = round(per_s, 1)
            row["grad_evals_per_s"] = round(per_s * SEQ_STEPS, 0)
        else:
            row["step_us"] = round(1e6 * best[name], 1)
        if group in reference and name not in ("reptile (fused jax)", "seq_reptile (fused jax)"):
            if "plain" not in name:
                # Speed ratio (>1 = faster than the reference); for reptile_outer the time
                # ratio (overhead of the wrapper) is the telling number.
                if group in ("reptile", "seq_reptile"):
                    row["speed_vs_fused"] = round(reference[group] / best[name], 3)
                else:
                    row["time_vs_plain"] = round(best[name] / reference[group], 3)
        rows.append(row)
    rows.extend({"method": name, "error": msg} for name, msg in errors.items())
    return rows
