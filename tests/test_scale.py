"""The realistic-size tier: every method compiled on a ResNet-12-sized parameter tree.

ResNet-12 (4 residual stages of 64, 160, 320 and 640 channels, 12.4M parameters in 50 leaves)
is the usual model of few-shot image classification. Each method's jitted step (the table
of `scale_methods.py`: every public transformation, inner rule and meta-learner) is traced,
lowered and compiled on abstract inputs (`jax.ShapeDtypeStruct`: nothing parameter-sized is
allocated to run it), with a loss that touches every parameter but costs almost nothing, so
the compiled program's buffers are the method's own. Three promises are checked:

- host memory: tracing and lowering raise the peak RSS by less than the parameters' bytes
  (the Python side builds programs, not parameter-sized arrays: nothing in parameters ×
  leaves; grad_share's former one-hot [parameters, leaves] matrices took 5.4 GB here, 109×
  the parameters; 18 MB at most now, for plain MAML);
- compiled temporary memory (XLA's ``temp_size_in_bytes``) within a per-method multiple of
  the parameters' bytes P, derived from what the method keeps (``scale_methods.TABLE``);
- no per-step cost in parameters × leaves, for the methods where one is a risk (per-leaf
  arithmetic, flat copies, Gram matrices, masks): the same step on 5 leaves of the same total
  size has nearly the same temporary memory and the same flops. A [P, leaves] array would
  add about 45 P from 5 to 50 leaves; the checks allow P.

Run as a script (``PYTHONPATH=. python tests/test_scale.py``) it prints the table of bounds
and measured figures (for the README).
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.bench_grad_share import reset_peak_rss, rss_status
from tests import scale_methods as sm

PARAMS = sm.resnet12_tree()
PARAM_BYTES = sm.num_bytes(PARAMS)
FEW_LEAVES = sm.flat_tree(5, PARAM_BYTES // 4)
HOST_BOUND = 1.0
# Buffer assignment, hence the memory figures, depends on neither LLVM's optimization level
# nor the fusion emitters (checked on every entry: same temporary bytes); without them the
# 50-leaf programs compile in about two thirds of the time.
COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


@dataclasses.dataclass(frozen=True)
class Cost:
    host: int | None  # peak RSS growth while tracing and lowering (None off Linux)
    temp: int  # compiled temporary bytes
    flops: float  # of the program as lowered (before XLA's fusion, which counts a fused
    # slice's whole operand: see test_no_cost_scales_with_parameters_times_leaves)


def _warm():
    # The first lowering of a process sets up MLIR and XLA's compiler: not a method's cost.
    jax.jit(lambda x: jnp.sin(x) + 1).lower(sm.abstract((3,))).compile(COMPILE)


def compile_step(build: sm.Build, params) -> Cost:
    """A step, traced, lowered and compiled on the abstract tree `params`."""
    _warm()
    start = reset_peak_rss()  # None where the peak RSS cannot be reset (not Linux)
    step, args = build(params)
    lowered = step.trace(*args).lower()
    host = None if start is None else rss_status("VmHWM") - start
    analysis = lowered.cost_analysis()
    flops = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
    compiled = lowered.compile(compiler_options=COMPILE)
    return Cost(host, compiled.memory_analysis().temp_size_in_bytes, flops)


@functools.cache
def measure(name: str, few_leaves: bool = False) -> Cost:
    """One entry of the table on the 50-leaf tree (or on 5 leaves of the same size)."""
    return compile_step(sm.TABLE[name].build, FEW_LEAVES if few_leaves else PARAMS)


def leaves_scaling(many: Cost, few: Cost) -> list[str]:
    """What grows from 5 to 50 leaves of the same total size more than the checks allow:
    temporary memory beyond 2x + P, flops beyond 1.25x (a [P, leaves] array adds ~45 P)."""
    problems, per_param = [], PARAM_BYTES / 4
    if many.temp > 2 * few.temp + PARAM_BYTES:
        problems.append(
            f"temporary memory {many.temp / PARAM_BYTES:.2f} P at 50 leaves, "
            f"{few.temp / PARAM_BYTES:.2f} P at 5 leaves"
        )
    if many.flops > 1.25 * few.flops:
        problems.append(
            f"{many.flops / per_param:.1f} flops per parameter at 50 leaves, "
            f"{few.flops / per_param:.1f} at 5 leaves"
        )
    return problems


def _params(names):
    # A method's two tests share its 50-leaf measurement: one xdist worker runs both.
    return [pytest.param(n, marks=pytest.mark.xdist_group(f"scale-{n}")) for n in names]


def test_tier_lists_every_public_method():
    """A public constructor of a transformation, inner rule or meta-learner added later
    without an entry here fails this test."""
    public = sm.public_constructors()
    covered = {name for entry in sm.TABLE.values() for name in entry.covers}
    assert public - covered == set(), f"methods without a realistic-size entry: {public - covered}"
    assert covered <= public, f"entries naming no public constructor: {covered - public}"
    # The constructors' variants with their own cost: ANIL (inner_mask), both dotprod schemes,
    # pcgrad per leaf, a per-leaf learned rate.
    assert {"maml+anil", "dotprod/exact", "pcgrad/leaf", "fomaml+learned_lr"} <= set(sm.TABLE)
    assert len(PARAMS) == 50 and 12e6 < PARAM_BYTES / 4 < 13e6
    assert len(FEW_LEAVES) == 5 and sm.num_bytes(FEW_LEAVES) == PARAM_BYTES


@pytest.mark.parametrize("name", _params(sm.TABLE))
def test_resnet12_sized_tree_traces_compiles_within_memory_bounds(name):
    cost = measure(name)
    if cost.host is not None:
        assert cost.host < HOST_BOUND * PARAM_BYTES, (
            f"{name}: tracing and lowering took {cost.host / 2**20:.0f} MB of host memory, "
            f"more than {HOST_BOUND} x the parameters ({PARAM_BYTES / 2**20:.0f} MB)"
        )
    entry = sm.TABLE[name]
    assert cost.temp <= entry.bound * PARAM_BYTES, (
        f"{name}: compiled temporary memory {cost.temp / PARAM_BYTES:.2f} x the parameters, "
        f"bound {entry.bound} ({entry.why})"
    )


@pytest.mark.parametrize("name", _params(n for n, e in sm.TABLE.items() if e.leaves))
def test_no_cost_scales_with_parameters_times_leaves(name):
    """50 leaves cost what 5 leaves of the same total size cost: temporary memory within
    2x + P, flops within 1.25x.

    The flops are those of the program as lowered: XLA's figure after fusion counts, for a
    fusion that slices one leaf out of a flat vector, the whole vector's arithmetic
    (grad_share's flat layout reads 2758 flops per parameter there at 50 leaves, 378 at 5,
    202 as lowered in both; at 2M parameters its step ran in 0.85 s on 50 leaves, 0.94 s
    on 5).
    """
    problems = leaves_scaling(measure(name), measure(name, few_leaves=True))
    assert not problems, f"{name}, 50 leaves vs 5 of the same total size: {problems}"


def _one_hot_leaf_norms():
    """Per-leaf normalization through a one-hot [P, leaves] matrix, as grad_share's flat
    layout once did: what the leaves check is for."""

    def update(updates, state, params=None):
        leaves, treedef = jax.tree.flatten(updates)
        ends = np.cumsum([x.size for x in leaves])
        flat = jnp.concatenate([x.ravel() for x in leaves])
        segment = jnp.searchsorted(jnp.asarray(ends), jnp.arange(flat.size), side="right")
        one_hot = jax.nn.one_hot(segment, len(leaves), dtype=flat.dtype)
        flat = flat / (one_hot @ jnp.sqrt((flat * flat) @ one_hot))
        out = [y.reshape(x.shape) for y, x in zip(jnp.split(flat, ends[:-1]), leaves, strict=True)]
        return jax.tree.unflatten(treedef, out), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def test_leaves_check_detects_a_parameters_times_leaves_array():
    build = sm.transform(_one_hot_leaf_norms)
    many, few = compile_step(build, PARAMS), compile_step(build, FEW_LEAVES)
    # Measured: 53 P and 311 flops per parameter at 50 leaves, 8 P and 41 at 5.
    assert len(leaves_scaling(many, few)) == 2, (many, few)
    assert many.temp > 45 * PARAM_BYTES


def main(names):
    """Prints the tier as a Markdown table: bound and measured figures, in units of P."""
    print(f"P = {PARAM_BYTES / 2**20:.1f} MB ({PARAM_BYTES // 4} float32 parameters, 50 leaves);"
          f" B = {sm.TASKS}, K = {sm.STEPS}, T = {sm.AGG_TASKS}")  # fmt: skip
    print("| entry | temp bound (P) | temp measured (P) | host (P) | 5 leaves: temp (P) |"
          " flops/param 50 vs 5 leaves |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    per_param = PARAM_BYTES / 4
    for name in names:
        entry, cost = sm.TABLE[name], measure(name)
        host = "-" if cost.host is None else f"{cost.host / PARAM_BYTES:.2f}"
        few, flops = "-", "-"
        if entry.leaves:
            other = measure(name, few_leaves=True)
            few = f"{other.temp / PARAM_BYTES:.2f}"
            flops = f"{cost.flops / per_param:.0f} vs {other.flops / per_param:.0f}"
        print(f"| {name} | {entry.bound:g} | {cost.temp / PARAM_BYTES:.2f} | {host} | {few} |"
              f" {flops} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:] or list(sm.TABLE))
