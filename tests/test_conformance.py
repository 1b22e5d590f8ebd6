"""The conformance battery: every method of metagrad through the same cells.

Every public transformation and every meta-learner (with each inner rule) is listed once,
in `conformance_methods.METHODS`; each runs through the cells below on a tiny linear
model, each cell comparing against an independent reference (the unwrapped method, a
hand-computed composition, the float64 run, the uninterrupted run, one device):

  jit            jitted steps trace once; the state's shapes/dtypes/weak types are stable;
                 a transformation's jitted step equals its eager step
  vmap           `jax.vmap` over three seeds equals the three runs one by one
  chain          inside `optax.chain` (extra arguments reach it): same numbers
  multisteps     `optax.MultiSteps(k=2)`: no move on the first mini-step, then one step
                 on the mean gradient (meta: the mean of the two meta-gradients)
  inject         `optax.inject_hyperparams`: same numbers as fixed hyper-parameters
  array_hyper    hyper-parameters as concrete arrays: same numbers; a bad value is
                 rejected with the parameter's name, as a Python number or as an array
  guard          one non-finite step under the documented `optax.apply_if_finite`:
                 skipped, then training continues equal to the run without that batch,
                 with finite params and finite method state
  multi_transform / masked   on a subset of the leaves: equals the method run on that
                 subset alone (frozen leaves fixed / raw gradient leaves, as optax says)
  bfloat16 / float64   dtypes kept; bfloat16 near float32, float32 near float64
  python_float / none_leaf   a Python-float leaf, a None leaf: same numbers
  checkpoint     state serialized (flax msgpack) mid-run, restored, continued: bit-identical
  pmap / shard_map_vma / shard_map_novma   4 faked devices equal one device (one
                 subprocess, `conformance_multidevice_script.py`, float64)
  construct      (combinations that cannot exist) the constructor raises a clear error

A cell that fails on today's main because of a bug another branch fixes is marked in
`_KNOWN_FAILURES` below: strict xfails, so a fixed cell shows up as XPASS and its mark can go.
"""

from __future__ import annotations

import fnmatch
import functools
import pathlib

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import conformance_methods as cm
from tests.helpers import run_on_four_devices

# Cells that fail on today's main, and the branch that fixes them: (method patterns, cells,
# reason), fnmatch patterns. Strict xfails: drop a row when its branch is merged (a fixed
# cell then reports XPASS(strict) until its row goes).
_KNOWN_FAILURES: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
]  # fmt: skip

TIGHT = 1e-6  # float32, same computation in another composition
VMAP = 1e-5  # float32, batched kernels may sum in another order
F64_VS_F32 = 1e-4  # a 3-step float32 run against the float64 run
BF16 = 5e-2  # a 3-step bfloat16 run against the float32 run
MULTIDEVICE = 1e-9  # float64, one device against four


def _tight(method: cm.Method) -> float:
    # Two compositions of the same computation compile to different programs; a finite
    # difference divides their round-off by its step (method.noise, dotprod's docstring).
    return max(TIGHT, method.noise)


# The Gram-path aggregators share one implementation of the optax plumbing (`mtl/gram.py`:
# the state, the task-axis check, the finite guard; the method only solves for weights on
# G). The cells that test that plumbing inside optax's wrappers run for two of them (a
# stateful one and a stateless one); every other cell runs for all. Each cell
# compiles its own program, and these solvers take seconds to compile on CPU.
GRAM_PATH = {"mgda", "cagrad", "nash_mtl", "imtl_g", "aligned_mtl", "upgrad", "dualproj", "config"}
GRAM_PATH_WRAPPER_CELLS = {"nash_mtl", "upgrad"}
WRAPPER_CELLS = {"chain", "multisteps", "inject", "multi_transform"}


def _cells(method: cm.Method) -> list[str]:
    if method.kind == "invalid":
        return ["construct"]
    common = ["jit", "vmap", "chain", "multisteps", "inject", "guard", "bfloat16", "float64",
              "python_float", "none_leaf", "checkpoint"]  # fmt: skip
    if method.kind == "meta":
        return common
    extra = ["multi_transform"] + (["masked"] if method.kind == "transform" else [])
    cells = common + extra + (["array_hyper"] if method.bad else [])
    if method.name in GRAM_PATH - GRAM_PATH_WRAPPER_CELLS:
        cells = [c for c in cells if c not in WRAPPER_CELLS]
    return cells


MULTIDEVICE_CELLS = ["pmap", "shard_map_vma", "shard_map_novma"]


def _known(name: str, cell: str) -> str | None:
    for methods, cells, reason in _KNOWN_FAILURES:
        if any(fnmatch.fnmatchcase(name, m) for m in methods) and cell in cells:
            return reason
    return None


def _params(cells_of, group):
    out = []
    for method in cm.METHODS:
        for cell in cells_of(method):
            marks = [pytest.mark.xdist_group(group(method))]
            reason = _known(method.name, cell)
            if reason:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            out.append(pytest.param(method.name, cell, marks=marks, id=f"{method.name}-{cell}"))
    return out


# One xdist group per method: its cells share the method's baseline run (`baseline` below),
# and programs compiled by both workers are shared through the session's compilation cache
# (conftest.py). Smaller groups keep both workers busy until the end.
SINGLE = _params(_cells, lambda m: "conformance-" + m.name)
MULTI = _params(
    lambda m: MULTIDEVICE_CELLS if m.kind != "invalid" else [], lambda m: "conformance-devices"
)


def battery_size() -> tuple[int, int]:
    """(cells, methods) of the whole battery."""
    return len(SINGLE) + len(MULTI), len(cm.METHODS)


# -- shared runs -------------------------------------------------------------------------------


def _batches(method, n=cm.STEPS, dtype=jnp.float32):
    return [cm.make_batch(method, i, dtype) for i in range(n)]


def _avals(tree):
    return [(jnp.shape(x), jnp.result_type(x), getattr(x, "weak_type", False))
            for x in jax.tree.leaves(tree)]  # fmt: skip


class _Baseline:
    """The method's default run (float32, 3 steps), its compiled step and its trace count."""

    def __init__(self, method):
        self.traces = 0
        if method.kind == "meta":

            def counted_loss(params, batch):
                self.traces += 1
                return cm.loss(params, batch)

            self.h = cm.harness(method, loss_fn=counted_loss)
            self.step = self.h.fast  # jitted (the learner's own step inside)
        else:
            self.h = cm.harness(method)

            def counted(carry, batch):
                self.traces += 1
                return self.h.step(carry, batch)

            self.step = cm.jit(counted)
        self.batches = _batches(method)
        self.carries = [self.h.init(cm.initial_params())]
        self.carries.append(self.step(self.carries[0], self.batches[0]))
        self.traces_first = self.traces
        for batch in self.batches[1:]:
            self.carries.append(self.step(self.carries[-1], batch))
        self.traces_all = self.traces

    def run(self, params, batches=None):
        return cm.run(self.h, params, self.batches if batches is None else batches, self.step)


@functools.cache
def baseline(name: str) -> _Baseline:
    return _Baseline(cm.BY_NAME[name])


def _final_params(method, h, params, batches, step=None):
    return h.params(cm.run(h, params, batches, step)[-1])


def _assert_finite(tree, what):
    for leaf in cm.float_leaves(tree):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64))), f"{what} not finite: {tree}"


# -- cells -------------------------------------------------------------------------------------


def cell_construct(method):
    with pytest.raises(TypeError, match=method.error):
        method.make()


def cell_jit(method):
    b = baseline(method.name)
    assert b.traces_first >= 1
    assert b.traces_all == b.traces_first, "the jitted step was traced again"
    assert _avals(b.carries[-1]) == _avals(b.carries[1])
    if method.kind != "meta":
        assert _avals(b.carries[1]) == _avals(b.carries[0])
        eager = b.h.step(b.carries[0], b.batches[0])
        assert cm.max_rel_diff(eager, b.carries[1]) <= _tight(method)


def cell_vmap(method):
    b = baseline(method.name)
    seeds = [cm.initial_params(s) for s in range(3)]
    runs = [b.carries] + [b.run(p) for p in seeds[1:]]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[b.h.init(p) for p in seeds])
    vstep = cm.jit(jax.vmap(b.h.step, in_axes=(0, None)))
    for i, batch in enumerate(b.batches):
        stacked = vstep(stacked, batch)
        for s in range(3):
            one = jax.tree.map(lambda x, s=s: x[s], stacked)
            assert cm.max_rel_diff(one, runs[s][i + 1]) <= max(VMAP, method.noise), (s, i)


def cell_chain(method):
    b = baseline(method.name)
    if method.kind == "meta":
        h = cm.harness(method, outer=optax.chain(optax.identity(), optax.adam(1e-2)))
    else:
        h = cm.harness(method, outer=optax.chain(optax.identity(), cm.optimizer(method)))
    got = _final_params(method, h, cm.initial_params(), b.batches)
    assert cm.max_rel_diff(got, b.h.params(b.carries[-1])) <= _tight(method)


class _Recorder:
    """An outer 'optimizer' that keeps the meta-gradient it receives and does not move."""

    @staticmethod
    def make():
        return optax.GradientTransformation(
            lambda p: optax.tree.zeros_like(p),
            lambda g, s, p=None: (optax.tree.zeros_like(g), g),
        )


def cell_multisteps(method):
    b = baseline(method.name)
    p0, (ba, bb) = cm.initial_params(), b.batches[:2]
    if method.kind == "meta":
        # The meta-learners take an optax.MultiSteps as their outer optimizer.
        multi = optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2)
        h = cm.harness(method, outer=multi)
        rec = cm.harness(method, outer=_Recorder.make())
        # The meta-gradients of the two mini-steps, taken at unmoved params and with the
        # state (grad_share's average, a kept inner state) the first mini-step leaves.
        r1 = rec.fast(rec.init(p0), ba)
        r2 = rec.fast(r1, bb)
        pair = lambda s: (s.params, s.inner_params) if hasattr(s, "inner_params") else s.params
        mean = jax.tree.map(lambda u, v: (u + v) / 2, r1.outer_state, r2.outer_state)
        adam = optax.adam(1e-2)
        updates, _ = adam.update(mean, adam.init(pair(r1)), pair(r1))
        expected = optax.apply_updates(pair(r1), updates)
        c1 = h.fast(h.init(p0), ba)
        assert cm.max_rel_diff(pair(c1), pair(r1)) == 0.0, "moved on the first mini-step"
        assert cm.max_rel_diff(pair(h.fast(c1, bb)), expected) <= _tight(method)
        return
    opt = cm.optimizer(method)
    if method.kind == "aggregator":
        _multisteps_after_aggregator(method, p0, ba, bb)
        return
    h = cm.harness(method, outer=optax.MultiSteps(opt, every_k_schedule=2))
    ga, _ = cm.transform_inputs(method, cm.loss, p0, ba)
    gb, extra = cm.transform_inputs(method, cm.loss, p0, bb)
    mean = jax.tree.map(lambda u, v: (u + v) / 2, ga, gb)
    updates, state = opt.update(mean, opt.init(p0), p0, **extra)
    c1 = h.step(h.init(p0), ba)
    assert cm.max_rel_diff(c1[0], p0) == 0.0, "moved on the first mini-step"
    c2 = h.step(c1, bb)
    assert cm.max_rel_diff(c2[0], optax.apply_updates(p0, updates)) <= _tight(method)
    assert cm.max_rel_diff(c2[1].inner_opt_state, state) <= _tight(method)


def _multisteps_after_aggregator(method, p0, ba, bb):
    # An aggregator maps [T, ...] to [...]: MultiSteps goes after it (it accumulates the
    # aggregated gradients) and, placed around it, raises an error giving that placement.
    around = cm.harness(method, outer=optax.MultiSteps(cm.optimizer(method), every_k_schedule=2))
    with pytest.raises(ValueError, match=r"optax\.chain\(mg\.\w+\(\.\.\.\), optax\.MultiSteps"):
        around.step(around.init(p0), ba)
    agg = method.make(None)(**method.hyper)
    multi = optax.MultiSteps(optax.sgd(cm.LR), every_k_schedule=2)
    h = cm.harness(method, outer=optax.chain(agg, multi))
    # Reference: each mini-batch aggregated on its own (the aggregator's state carried on),
    # then one SGD step on the mean of the two aggregated gradients.
    ga, ea = cm.transform_inputs(method, cm.loss, p0, ba)
    gb, eb = cm.transform_inputs(method, cm.loss, p0, bb)
    ua, sa = agg.update(ga, agg.init(p0), p0, **ea)
    ub, _ = agg.update(gb, sa, p0, **eb)
    expected = jax.tree.map(lambda p, u, v: p - cm.LR * (u + v) / 2, p0, ua, ub)
    c1 = h.step(h.init(p0), ba)
    assert cm.max_rel_diff(c1[0], p0) == 0.0, "moved on the first mini-step"
    assert cm.max_rel_diff(h.step(c1, bb)[0], expected) <= _tight(method)


def cell_inject(method):
    b = baseline(method.name)
    h = cm.harness(method, inject=True)
    carries = cm.run(h, cm.initial_params(), b.batches)
    assert cm.max_rel_diff(h.params(carries[-1]), b.h.params(b.carries[-1])) <= _tight(method)


def cell_array_hyper(method):
    b = baseline(method.name)
    as_arrays = {k: jnp.asarray(v) for k, v in method.hyper.items()}
    opt = method.make(None)(**as_arrays)
    if method.tail:
        opt = optax.chain(opt, optax.sgd(cm.LR))
    got = _final_params(method, cm.harness(method, outer=opt), cm.initial_params(), b.batches)
    assert cm.max_rel_diff(got, b.h.params(b.carries[-1])) <= _tight(method)
    name, bad = method.bad
    for value in (bad, jnp.asarray(bad)):
        with pytest.raises(ValueError, match=name):
            tx = method.make(None)(**{**method.hyper, name: value})
            p0 = cm.initial_params()
            grads, extra = cm.transform_inputs(method, cm.loss, p0, b.batches[0])
            tx.update(grads, tx.init(p0), p0, **extra)


def cell_guard(method):
    b = baseline(method.name)
    if method.kind == "aggregator":
        around = optax.apply_if_finite(optax.chain(method.make(None)(**method.hyper),
                                                   optax.sgd(cm.LR)), 3)  # fmt: skip
        h = cm.harness(method, outer=around)
        with pytest.raises(ValueError, match=r"optax\.apply_if_finite\(opt"):
            h.step(h.init(cm.initial_params()), b.batches[0])
    h = cm.harness(method, guard=True)
    bad = cm.make_batch(method, 0, bad=True)
    batches = [b.batches[0], bad, *b.batches[1:]]
    carries = cm.run(h, cm.initial_params(), batches)
    assert cm.max_rel_diff(h.params(carries[2]), h.params(carries[1])) == 0.0, "not skipped"
    _assert_finite(carries[2], "state after the non-finite step")
    _assert_finite(carries[-1], "state after training on")
    assert cm.max_rel_diff(h.params(carries[-1]), b.h.params(b.carries[-1])) <= _tight(method)


def _subset_reference(method, rule):
    """The method trained on {"w"} alone; "b" fixed ('zero') or moved by its raw gradient."""
    opt = cm.optimizer(method)
    p = cm.initial_params()
    w, bias = {"w": p["w"]}, p["b"]
    state = opt.init(w)
    for batch in _batches(method):
        sub_loss = lambda q, bt, bias=bias: cm.loss({"w": q["w"], "b": bias}, bt)
        grads, extra = cm.transform_inputs(method, sub_loss, w, batch)
        g_bias = cm.transform_inputs(method, cm.loss, {**w, "b": bias}, batch)[0]["b"]
        updates, state = opt.update(grads, state, w, **extra)
        w = optax.apply_updates(w, updates)
        if rule == "raw":
            bias = bias + g_bias
    return {"w": w["w"], "b": bias}


def _refuses_subset_wrapper(method, opt):
    # dotprod's grad_fn needs the whole params, which optax.masked / multi_transform hide:
    # it refuses to run there and points to its own mask= argument.
    h = cm.harness(method, outer=opt)
    with pytest.raises(ValueError, match="mask="):
        h.step(h.init(cm.initial_params()), _batches(method)[0])


def cell_multi_transform(method):
    labels = {"w": "train", "b": "frozen"}
    if method.name.startswith("dotprod/"):
        tx = optax.multi_transform({"train": cm.optimizer(method), "frozen": cm.frozen(method)},
                                   labels)  # fmt: skip
        _refuses_subset_wrapper(method, tx)
        return
    opt = optax.multi_transform({"train": cm.optimizer(method), "frozen": cm.frozen(method)},
                                labels)  # fmt: skip
    got = _final_params(method, cm.harness(method, outer=opt), cm.initial_params(),
                        _batches(method))  # fmt: skip
    assert cm.max_rel_diff(got, _subset_reference(method, "zero")) <= _tight(method)


def cell_masked(method):
    opt = optax.masked(cm.optimizer(method), {"w": True, "b": False})
    if method.name.startswith("dotprod/"):
        _refuses_subset_wrapper(method, opt)
        return
    got = _final_params(method, cm.harness(method, outer=opt), cm.initial_params(),
                        _batches(method))  # fmt: skip
    assert cm.max_rel_diff(got, _subset_reference(method, "raw")) <= _tight(method)


def cell_bfloat16(method):
    b = baseline(method.name)
    params = cm.initial_params(dtype=jnp.bfloat16)
    got = _final_params(method, cm.harness(method), params, b.batches)
    assert [x.dtype for x in jax.tree.leaves(got)] == [jnp.bfloat16] * 2
    assert cm.max_rel_diff(got, b.h.params(b.carries[-1])) <= BF16


def cell_float64(method):
    b = baseline(method.name)
    ref32 = b.h.params(b.carries[-1])
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        params = cm.initial_params(dtype=jnp.float64)
        got = _final_params(method, cm.harness(method), params,
                            _batches(method, dtype=jnp.float64))  # fmt: skip
        assert [x.dtype for x in jax.tree.leaves(got)] == [jnp.float64] * 2
        got = jax.tree.map(np.asarray, got)
    finally:
        jax.config.update("jax_enable_x64", previous)
    assert cm.max_rel_diff(ref32, got) <= F64_VS_F32


def cell_python_float(method):
    b = baseline(method.name)
    params = {"w": cm.initial_params()["w"], "b": 0.25}
    # One step, eagerly for a transformation, as a user's first call: under jit the float
    # becomes an array (after it, the params are arrays).
    got = b.h.params(b.h.fast(b.h.init(params), b.batches[0]))
    assert cm.max_rel_diff(got, b.h.params(b.carries[1])) <= _tight(method)


def cell_none_leaf(method):
    b = baseline(method.name)
    params = {**cm.initial_params(), "frozen": None}
    got = b.h.params(b.run(params)[-1])
    assert got["frozen"] is None
    got = {k: got[k] for k in ("w", "b")}
    assert cm.max_rel_diff(got, b.h.params(b.carries[-1])) <= _tight(method)


def cell_checkpoint(method):
    b = baseline(method.name)
    # Mid-run (for reptile_outer, mid-inner-loop: 1 of its 2 inner steps).
    saved = flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(b.carries[1]))
    restored = flax.serialization.from_state_dict(
        b.carries[1], flax.serialization.msgpack_restore(saved)
    )
    restored = jax.tree.map(jnp.asarray, restored)
    assert _avals(restored) == _avals(b.carries[1])
    carry = restored
    for batch in b.batches[1:]:
        carry = b.step(carry, batch)
    for x, y in zip(jax.tree.leaves(carry), jax.tree.leaves(b.carries[-1]), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), "continuation not bit-identical"


CELLS = {name[len("cell_") :]: fn for name, fn in globals().items() if name.startswith("cell_")}


@pytest.mark.parametrize("name, cell", SINGLE)
def test_conformance(name, cell):
    CELLS[cell](cm.BY_NAME[name])


# -- multi-device cells: one subprocess for all of them ---------------------------------------

SCRIPT = pathlib.Path(__file__).with_name("conformance_multidevice_script.py")


@pytest.fixture(scope="module")
def multidevice():
    return run_on_four_devices([str(SCRIPT)])


@pytest.mark.parametrize("name, cell", MULTI)
def test_conformance_multidevice(multidevice, name, cell):
    result = multidevice[f"{name}/{cell}"]
    assert result["error"] is None, result["error"]
    assert result["devices"] == 4
    assert result["spread"] == 0.0, "the devices disagree"
    # A finite difference divides the round-off of the other summation order by its step
    # (in float64 about 1e-8 relative at the automatic step).
    tolerance = MULTIDEVICE * (100 if cm.BY_NAME[name].noise else 1)
    assert result["diff"] <= tolerance, result


def test_battery_lists_every_public_method():
    import metagrad as mg

    covered = {m.name.split("/")[0] for m in cm.METHODS}
    rules = {m.name.split("/")[1] for m in cm.METHODS if "/" in m.name and m.kind != "transform"}
    # Public callables that are methods (transformations, learners, inner rules).
    methods = {"dotprod", "reptile_outer", "recadam", "mtl_sum", "pcgrad", "gradvac",
               "gradnorm", "maml", "fomaml", "reptile", "seq_reptile", "uncertainty_weighting",
               "dwa", "rlw", "famo", "db_mtl", "imaml", "mgda", "cagrad", "nash_mtl", "imtl_g",
               "aligned_mtl", "upgrad", "dualproj", "config", "graddrop"}  # fmt: skip
    assert methods <= covered
    assert {"sgd", "meta_sgd", "learned_lr", "grad_share"} <= rules
    not_methods = {"adapt", "fd_hvp", "fd_step", "hvp", "maml_pp_weights", "mean_pairwise_cosine",
                   "mixed_probs", "mixed_schedule", "pairwise_cosine", "pairwise_dot",
                   "sample_tasks", "task_gradients", "task_probs", "uniform_tasks", "meta_sgd",
                   "learned_lr", "grad_share"}  # fmt: skip
    public = {n for n in mg.__all__ if n[0].islower()}
    # A new public function must join the battery or be listed above as not a method.
    assert public <= methods | not_methods, public - methods - not_methods
