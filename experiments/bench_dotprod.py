"""Benchmark section "dotprod": Meta DotProd's overhead per batch against plain Adam.

Model: an MLP 784-1024-1024-10 (ReLU, about 1.9M parameters) with softmax cross-entropy
on random data, so that gradient evaluations dominate the step time. Every variant is a
jitted training step (params and optimizer state donated):

- ``plain``: ``optax.adam`` on ∇L(b) of one batch per step (one gradient per batch);
- ``dotprod every=n`` for the paper's n = 2, 3, 5, 10 (Section 6.3):
  ``optax.chain(mg.dotprod(every=n), optax.adam(...))`` with g1 = ∇L(b1) and ``grad_fn`` =
  ∇L(·; b2). A period of n batches is one regularized call on two batches (three gradients)
  and n - 2 standard calls on one batch (one gradient, ``grad_fn`` not evaluated): n + 1
  gradients per n batches, so the overhead per batch over ``plain`` tends to 1/n (50%, 33%,
  20%, 10%);
- ``dotprod exact`` / ``dotprod central`` (every=2): the HVP by forward-over-reverse, and the
  central difference (four gradients per two batches, overhead limit 100%).

Timing: a block is ``--dotprod-batches`` batches (a multiple of 30, so that it holds whole
periods of every n: 15 calls for n = 2, 20 for 3, 24 for 5, 27 for 10, 30 plain steps); the
schedule of a block is known in advance (each block starts a period, which the benchmark
checks), so no call waits for the host. Each block is timed with ``block_until_ready`` after
a warm-up. Each round times every dotprod variant once, in a rotating order, and times
``plain`` before the first variant and after each one (P V1 P V2 P ...); a variant's ratio in
that round is its time per batch over the mean of the two ``plain`` blocks around it, so that
the load of other processes, which drifts on the scale of seconds, affects numerator and
denominator alike. The overhead is that ratio minus 1: the median over rounds is reported,
with the spread (min-max) of the per-round values, beside 1/n. The same overhead is also
reported in process CPU time (all threads), which other processes on a busy machine disturb
much less than wall-clock time. Memory: the temporary buffers and the estimated peak
(arguments + outputs + temporaries - donated aliases) of each compiled step, from XLA's
``memory_analysis()`` (for dotprod, of the step that may regularize).

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
PAPER_N = (2, 3, 5, 10)
BLOCK_UNIT = 30  # batches: whole periods of every n in PAPER_N


def add_arguments(parser):
    group = parser.add_argument_group("dotprod")
    group.add_argument("--dotprod-batch", type=int, default=256, help="examples per batch")
    group.add_argument(
        "--dotprod-batches",
        type=int,
        default=BLOCK_UNIT,
        help=f"batches per timed block (multiple of {BLOCK_UNIT})",
    )
    group.add_argument("--dotprod-rounds", type=int, default=11, help="interleaved rounds")


def _loss(params, batch):
    x, y = batch
    logits = mlp_apply(params, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _variants():
    """name -> (optimizer, every (None: plain), limit of the overhead per batch or None)."""
    adam = optax.adam(LR)
    variants = {"plain": (adam, None, 0.0)}
    for n in PAPER_N:
        tx = optax.chain(mg.dotprod(weight=WEIGHT, every=n), adam)
        variants[f"dotprod every={n}"] = (tx, n, 1 / n)
    variants["dotprod exact"] = (
        optax.chain(mg.dotprod(weight=WEIGHT, scheme="exact"), adam),
        2,
        None,
    )
    variants["dotprod central"] = (
        optax.chain(mg.dotprod(weight=WEIGHT, scheme="central"), adam),
        2,
        1.0,
    )
    return variants


def _make_step(tx, every):
    grad = jax.grad(_loss)

    if every is None:

        def step(params, opt_state, b1, b2):
            del b2  # one batch per step
            updates, opt_state = tx.update(grad(params, b1), opt_state, params)
            return optax.apply_updates(params, updates), opt_state

    else:

        def step(params, opt_state, b1, b2):
            # b2 is consumed only by the regularized calls; the others never evaluate grad_fn.
            g1 = grad(params, b1)
            updates, opt_state = tx.update(g1, opt_state, params, grad_fn=lambda p: grad(p, b2))
            return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1))


def _calls_per_block(every, batches):
    """Calls that consume `batches` batches: n - 1 calls per period of n batches."""
    if every is None:
        return batches
    return batches // every * (every - 1)


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
    batches = getattr(args, "dotprod_batches", BLOCK_UNIT)
    rounds = getattr(args, "dotprod_rounds", 11)
    if batches <= 0 or batches % BLOCK_UNIT:
        raise ValueError(f"--dotprod-batches must be a positive multiple of 30, got {batches}")

    key = jax.random.key(0)
    kp, kx1, ky1, kx2, ky2 = jax.random.split(key, 5)
    params0 = mlp_init(kp, SIZES)
    n_params = sum(x.size for x in jax.tree.leaves(params0))
    b1 = (jax.random.normal(kx1, (batch, SIZES[0])), jax.random.randint(ky1, (batch,), 0, 10))
    b2 = (jax.random.normal(kx2, (batch, SIZES[0])), jax.random.randint(ky2, (batch,), 0, 10))

    states, steps_fn, memory, limits, everies = {}, {}, {}, {}, {}
    for name, (tx, every, limit) in _variants().items():
        params = jax.tree.map(jnp.copy, params0)  # donated: each variant owns a copy
        opt_state = tx.init(params)
        step = _make_step(tx, every)
        memory[name] = _memory(step, params, opt_state, b1, b2)
        # Compile, then warm up over one block (whole periods: the next block starts one).
        for _ in range(_calls_per_block(every, BLOCK_UNIT)):
            params, opt_state = step(params, opt_state, b1, b2)
        jax.block_until_ready(params)
        states[name], steps_fn[name] = (params, opt_state), step
        limits[name], everies[name] = limit, every

    def timed_block(name):
        params, opt_state = states[name]
        step, every = steps_fn[name], everies[name]
        if every is not None:
            assert bool(opt_state[0].regularizes(every)), "a block must start a period"
        calls = _calls_per_block(every, batches)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(calls):
            params, opt_state = step(params, opt_state, b1, b2)
        jax.block_until_ready((params, opt_state))
        states[name] = (params, opt_state)
        # Per batch.
        return (time.perf_counter() - start) / batches, (time.process_time() - cpu_start) / batches

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
        limit, every = limits[name], everies[name]
        rows.append(
            {
                "experiment": "bench_dotprod",
                "method": name,
                "n": "-" if every is None else every,
                "params": n_params,
                "batch": batch,
                "calls_per_block": _calls_per_block(every, batches),
                "batches_per_block": batches,
                "ms_per_batch": round(1e3 * statistics.median(times[name]), 2),
                "overhead": round(statistics.median(ratios[name]) - 1, 3),
                "overhead_min_max": f"{min(ratios[name]) - 1:.3f}..{max(ratios[name]) - 1:.3f}",
                "cpu_overhead": round(statistics.median(cpu_ratios[name]) - 1, 3),
                "limit(1/n)": "n/a" if limit is None else round(limit, 3),
                "temp_MB": round(memory[name][0], 1),
                "peak_MB": round(memory[name][1], 1),
            }
        )
    return rows
