"""Benchmark section "dotprod": cost of Meta DotProd against a plain optax step.

Model: an MLP 784-1024-1024-10 (ReLU, about 1.9M parameters) with softmax cross-entropy
on random data, so that gradient evaluations dominate the step time. Every variant is a
jitted training step (params and optimizer state donated) that consumes the same two
batches b1, b2:

- ``plain``: ``optax.adam`` on ∇L(b1) + ∇L(b2) (two gradient evaluations);
- ``dotprod every=n``: ``optax.chain(mg.dotprod(every=n), optax.adam(...))`` with g1 = ∇L(b1)
  and ``grad_fn`` = ∇L(·; b2): three gradient evaluations on regularized steps, two on the
  others, so the limit of the time ratio to ``plain`` is 1 + 1/(2n);
- ``dotprod exact``: the HVP by forward-over-reverse instead of the finite difference;
- ``dotprod central``: the central difference (four gradient evaluations, limit 2).

Timing: each variant runs blocks of ``--dotprod-steps`` steps (a multiple of 10, so every
block holds the same share of regularized steps: with the warm-up of 10 steps, a block of 10
holds exactly one regularized every=10 step), timed with ``block_until_ready``, after a
warm-up. Each round times every dotprod variant once, in a rotating order, and times
``plain`` before the first variant and after each one (P V1 P V2 P ...); a variant's ratio in
that round is its time over the mean of the two ``plain`` blocks around it, so that the load
of other processes, which drifts on the scale of seconds, affects numerator and denominator
alike. The median over rounds is reported, with the spread (min-max) of the per-round
ratios. The same ratios are also reported in process CPU time (all threads), which other
processes on a busy machine disturb much less than wall-clock time. Memory: the temporary
buffers and the estimated peak (arguments + outputs + temporaries - donated aliases) of
each compiled step, from XLA's ``memory_analysis()``.

Run: ``python -m experiments.benchmark --only dotprod``.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import optax

import metagrad as mg
from experiments.models import mlp_apply, mlp_init

SIZES = (784, 1024, 1024, 10)
LR, WEIGHT = 1e-3, 0.1


def add_arguments(parser):
    group = parser.add_argument_group("dotprod")
    group.add_argument("--dotprod-batch", type=int, default=256, help="examples per batch")
    group.add_argument(
        "--dotprod-steps", type=int, default=10, help="steps per timed block (multiple of 10)"
    )
    group.add_argument("--dotprod-rounds", type=int, default=11, help="interleaved rounds")


def _loss(params, batch):
    x, y = batch
    logits = mlp_apply(params, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _variants():
    """name -> (optimizer, uses dotprod, limit of the time ratio or None)."""
    adam = optax.adam(LR)
    return {
        "plain": (adam, False, 1.0),
        "dotprod every=1": (optax.chain(mg.dotprod(weight=WEIGHT), adam), True, 1.5),
        "dotprod every=10": (
            optax.chain(mg.dotprod(weight=WEIGHT, every=10), adam),
            True,
            1 + 1 / 20,
        ),
        "dotprod exact": (optax.chain(mg.dotprod(weight=WEIGHT, scheme="exact"), adam), True, None),
        "dotprod central": (
            optax.chain(mg.dotprod(weight=WEIGHT, scheme="central"), adam),
            True,
            2.0,
        ),
    }


def _make_step(tx, uses_dotprod):
    grad = jax.grad(_loss)

    def step(params, opt_state, b1, b2):
        g1 = grad(params, b1)
        if uses_dotprod:
            updates, opt_state = tx.update(g1, opt_state, params, grad_fn=lambda p: grad(p, b2))
        else:
            g = jax.tree.map(jnp.add, g1, grad(params, b2))
            updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1))


def _memory(step, params, opt_state, b1, b2):
    analysis = step.lower(params, opt_state, b1, b2).compile().memory_analysis()
    if analysis is None:  # not every backend reports it
        return float("nan"), float("nan")
    mb = 2.0**-20
    temp = analysis.temp_size_in_bytes
    peak = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + temp
        - analysis.alias_size_in_bytes
    )
    return temp * mb, peak * mb


def run(args) -> list[dict]:
    batch = getattr(args, "dotprod_batch", 256)
    steps = getattr(args, "dotprod_steps", 10)
    rounds = getattr(args, "dotprod_rounds", 11)
    if steps % 10:
        raise ValueError(f"--dotprod-steps must be a multiple of 10, got {steps}")

    key = jax.random.key(0)
    kp, kx1, ky1, kx2, ky2 = jax.random.split(key, 5)
    params0 = mlp_init(kp, SIZES)
    n_params = sum(x.size for x in jax.tree.leaves(params0))
    b1 = (jax.random.normal(kx1, (batch, SIZES[0])), jax.random.randint(ky1, (batch,), 0, 10))
    b2 = (jax.random.normal(kx2, (batch, SIZES[0])), jax.random.randint(ky2, (batch,), 0, 10))

    states, steps_fn, memory, limits = {}, {}, {}, {}
    for name, (tx, uses_dotprod, limit) in _variants().items():
        params = jax.tree.map(jnp.copy, params0)  # donated: each variant owns a copy
        opt_state = tx.init(params)
        step = _make_step(tx, uses_dotprod)
        memory[name] = _memory(step, params, opt_state, b1, b2)
        for _ in range(10):  # compile, then warm up over one full every=10 period
            params, opt_state = step(params, opt_state, b1, b2)
        jax.block_until_ready(params)
        states[name], steps_fn[name], limits[name] = (params, opt_state), step, limit

    def timed_block(name):
        params, opt_state = states[name]
        step = steps_fn[name]
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            params, opt_state = step(params, opt_state, b1, b2)
        jax.block_until_ready((params, opt_state))
        states[name] = (params, opt_state)
        return (time.perf_counter() - start) / steps, (time.process_time() - cpu_start) / steps

    names = [name for name in states if name != "plain"]
    times = {name: [] for name in states}
    cpu_times = {name: [] for name in states}
    ratios = {name: [] for name in names}
    cpu_ratios = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        before, cpu_before = timed_block("plain")
        times["plain"].append(before)
        cpu_times["plain"].append(cpu_before)
        for name in order:
            t, cpu = timed_block(name)
            after, cpu_after = timed_block("plain")
            times[name].append(t)
            cpu_times[name].append(cpu)
            times["plain"].append(after)
            cpu_times["plain"].append(cpu_after)
            ratios[name].append(2 * t / (before + after))
            cpu_ratios[name].append(2 * cpu / (cpu_before + cpu_after))
            before, cpu_before = after, cpu_after
    ratios["plain"] = [1.0]
    cpu_ratios["plain"] = [1.0]

    rows = []
    for name in states:
        limit = limits[name]
        rows.append(
            {
                "experiment": "bench_dotprod",
                "method": name,
                "params": n_params,
                "batch": batch,
                "ms_per_step": round(1e3 * statistics.median(times[name]), 2),
                "ratio_to_plain": round(statistics.median(ratios[name]), 3),
                "ratio_min_max": f"{min(ratios[name]):.3f}-{max(ratios[name]):.3f}",
                "cpu_ms_per_step": round(1e3 * statistics.median(cpu_times[name]), 2),
                "cpu_ratio_to_plain": round(statistics.median(cpu_ratios[name]), 3),
                "limit": "n/a" if limit is None else round(limit, 3),
                "temp_MB": round(memory[name][0], 1),
                "peak_MB": round(memory[name][1], 1),
            }
        )
    return rows
