"""The methods of the conformance battery: one list, one small factory per method.

`METHODS` lists every public transformation and every meta-learner of metagrad (each
meta-learner with each inner rule). A method added to the library joins the battery with
one line there. Each entry knows how to build the method, the inputs its update takes and
"one step" on a tiny linear model, so that `test_conformance.py` (single device) and
`conformance_multidevice_script.py` (4 faked devices) run every method through the same
cells. Nothing runs on import (pytest's doctest collection imports this file).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metagrad as mg

NUM_TASKS = 8  # tasks of a meta-batch (2 per device on 4 devices)
AGG_TASKS = 3  # tasks of an aggregator's stacked gradients
EXAMPLES = 8  # examples of a batch (2 per device on 4 devices)
INNER_STEPS = 2
STEPS = 3  # steps of a reference run
LR = 0.1


def loss(params, batch):
    """A linear least-squares loss; params ``{"w": [3], "b": []}`` (other keys ignored)."""
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def initial_params(seed: int = 0, dtype=jnp.float32) -> dict:
    w = jax.random.normal(jax.random.key(100 + seed), (3,), jnp.float32)
    return {"w": w.astype(dtype), "b": jnp.asarray(np.float32(0.25 + 0.1 * seed), dtype)}


@dataclasses.dataclass(frozen=True)
class Method:
    """One method of the battery.

    Attributes:
      name: the battery's name for it (``learner/inner`` for meta-learners).
      kind: ``"transform"`` (an optax transformation of one gradient), ``"aggregator"``
        (of per-task gradients stacked on a leading task axis), ``"meta"`` (a meta-learner)
        or ``"invalid"`` (a combination that cannot exist: building it must raise).
      make: transform/aggregator: ``make(axis)`` returns a factory ``f(**hyper) ->
        GradientTransformation`` (``axis``: the device axis name or None); meta:
        ``make(outer, axis, inject) -> MetaLearner``; invalid: builds and raises.
      data: the input format: ``"one"`` (a batch), ``"two"`` (two batches, dotprod),
        ``"tasks"`` (per-task batches, aggregators), ``"maml"`` (``(support, query)``: every
        meta-learner but seq_reptile), ``"seq"``.
      hyper: hyper-parameters passed to the factory (and injected by inject_hyperparams).
      tail: whether an ``optax.sgd`` follows the transformation (it is not an optimizer).
      guard: where the documented ``optax.apply_if_finite`` goes: ``"after"`` the method
        (on the tail) or ``"around"`` the method (and its tail).
      losses: whether update takes ``losses=`` (per-task losses).
      bad: ``(name, value)``: a hyper-parameter value the method must reject, also when it
        is given as a concrete array.
      error: for ``"invalid"``, the message the construction must raise.
      noise: the relative difference a change of summation order can make (a finite
        difference divides round-off by its step; dotprod's docstring states ~1e-4 in
        float32); the cells that change the order (vmap, devices) allow this much.
    """

    name: str
    kind: str
    make: Callable[..., Any]
    data: str
    hyper: dict = dataclasses.field(default_factory=dict)
    tail: bool = True
    guard: str = "around"
    losses: bool = False
    bad: tuple[str, Any] | None = None
    error: str | None = None
    noise: float = 0.0


# -- transformations -------------------------------------------------------------------------


def _dotprod(scheme):
    def make(axis):
        def dotprod(weight=0.1):
            return mg.dotprod(None, weight, scheme=scheme, axis_name=axis)

        return dotprod

    return make


def _reptile_outer(axis):
    del axis

    def reptile_outer(outer=0.5):
        return mg.reptile_outer(optax.sgd(LR), INNER_STEPS, outer)

    return reptile_outer


def _recadam(axis):
    del axis

    def recadam(learning_rate=0.05, pretrain_coef=1.0):
        return mg.recadam(learning_rate, anneal_t0=1.0, pretrain_coef=pretrain_coef)

    return recadam


def _pcgrad(axis):
    del axis
    return lambda: mg.pcgrad(seed=0)


def _mtl_sum(axis):
    del axis
    return lambda: mg.mtl_sum()


def _gradvac(axis):
    del axis

    def gradvac(beta=0.5):
        # A large EMA rate, so that the targets move within a few steps.
        return mg.gradvac(AGG_TASKS, beta=beta)

    return gradvac


def _gradnorm(axis):
    del axis

    def gradnorm(alpha=1.5, learning_rate=0.1):
        return mg.gradnorm(AGG_TASKS, alpha=alpha, learning_rate=learning_rate)

    return gradnorm


def _uncertainty_weighting(axis):
    del axis

    def uncertainty_weighting(learning_rate=0.1):
        return mg.uncertainty_weighting(AGG_TASKS, learning_rate=learning_rate)

    return uncertainty_weighting


def _dwa(axis):
    del axis

    def dwa(temperature=2.0):
        return mg.dwa(AGG_TASKS, temperature=temperature)

    return dwa


def _rlw(axis):
    del axis
    return lambda: mg.rlw(seed=0)


def _famo(axis):
    del axis

    def famo(learning_rate=0.5, weight_decay=1e-3):
        # A large step, so that the weights move within a few steps.
        return mg.famo(AGG_TASKS, learning_rate=learning_rate, weight_decay=weight_decay)

    return famo


def _db_mtl(axis):
    del axis

    def db_mtl(beta=0.9, beta_sigma=0.5):
        return mg.db_mtl(AGG_TASKS, beta=beta, beta_sigma=beta_sigma)

    return db_mtl


def _aggregator(build):
    """An aggregator that takes no device axis in the battery: its devices split the examples
    and the gradients arrive whole (pmean'd); `axis_name` (sharded parameters) is checked in
    test_aggregators.py."""

    def make(axis):
        del axis
        return build

    return make


# -- meta-learners ---------------------------------------------------------------------------

INNERS = {
    "sgd": lambda axis: optax.sgd(LR),
    "meta_sgd": lambda axis: mg.meta_sgd(LR),
    "learned_lr": lambda axis: mg.learned_lr(LR, per_step=True, granularity="layer"),
    "grad_share": lambda axis: mg.grad_share(LR, axis_name=axis),
}


def _learner(learner: str, inner: str, loss_fn=loss):
    def make(outer=None, axis=None, inject=False):
        rule = INNERS["sgd" if inner == "anil" else inner](axis)
        if inject and inner in ("sgd", "anil"):
            rule = optax.inject_hyperparams(optax.sgd)(learning_rate=LR)
        outer = optax.adam(1e-2) if outer is None else outer
        # ANIL: the inner loop adapts the last layer ("b") only; a function of the params, so
        # that extra leaves (python_float, none_leaf) are not adapted.
        mask = {"inner_mask": lambda p: {k: k == "b" for k in p}} if inner == "anil" else {}
        if learner in ("maml", "fomaml"):
            return getattr(mg, learner)(loss_fn, rule, INNER_STEPS, outer, axis_name=axis, **mask)
        if learner == "imaml":
            return mg.imaml(loss_fn, rule, INNER_STEPS, outer, lam=1.0, cg_steps=3, axis_name=axis)
        if learner == "reptile":
            return mg.reptile(loss_fn, rule, INNER_STEPS, outer, axis_name=axis)
        return mg.seq_reptile(loss_fn, rule, INNER_STEPS, outer, pass_task_id=False, axis_name=axis)

    return make


def _meta(learner: str, inner: str) -> Method:
    name = f"{learner}/{inner}"
    if learner in ("reptile", "seq_reptile") and inner != "sgd":
        # Reptile needs a per-task optimizer; an InnerRule couples or learns the inner loop.
        return Method(
            name,
            "invalid",
            _learner(learner, inner),
            learner,
            error="inner must be an optax GradientTransformation",
        )
    return Method(
        name,
        "meta",
        _learner(learner, inner),
        "seq" if learner == "seq_reptile" else "maml",
    )


# The battery's one list. A new method joins with one line here.
METHODS: list[Method] = [
    Method("dotprod/forward", "transform", _dotprod("forward"), "two", {"weight": 0.1},
           guard="after", bad=("weight", float("nan")), noise=1e-4),
    Method("dotprod/exact", "transform", _dotprod("exact"), "two", {"weight": 0.1},
           guard="after", bad=("weight", float("nan"))),
    Method("reptile_outer", "transform", _reptile_outer, "one", {"outer": 0.5}, tail=False,
           bad=("outer", float("nan"))),
    Method("recadam", "transform", _recadam, "one",
           {"learning_rate": 0.05, "pretrain_coef": 1.0}, tail=False,
           bad=("learning_rate", -0.1)),
    Method("mtl_sum", "aggregator", _mtl_sum, "tasks", guard="after"),
    Method("pcgrad", "aggregator", _pcgrad, "tasks", guard="after"),
    Method("gradvac", "aggregator", _gradvac, "tasks", {"beta": 0.5}, guard="after",
           bad=("beta", 2.0)),
    Method("gradnorm", "aggregator", _gradnorm, "tasks", {"alpha": 1.5, "learning_rate": 0.1},
           losses=True, guard="after", bad=("alpha", -1.0)),
    Method("uncertainty_weighting", "aggregator", _uncertainty_weighting, "tasks",
           {"learning_rate": 0.1}, losses=True, guard="after", bad=("learning_rate", -0.1)),
    Method("dwa", "aggregator", _dwa, "tasks", {"temperature": 2.0}, losses=True, guard="after",
           bad=("temperature", 0.0)),
    Method("rlw", "aggregator", _rlw, "tasks", losses=True, guard="after"),
    Method("famo", "aggregator", _famo, "tasks", {"learning_rate": 0.5, "weight_decay": 1e-3},
           losses=True, guard="after", bad=("weight_decay", -1.0)),
    Method("db_mtl", "aggregator", _db_mtl, "tasks", {"beta": 0.9, "beta_sigma": 0.5},
           losses=True, guard="after", bad=("beta", 1.0)),
    Method("mgda", "aggregator", _aggregator(lambda: mg.mgda()), "tasks", guard="after"),
    Method("cagrad", "aggregator", _aggregator(lambda c=0.4: mg.cagrad(c=c)), "tasks",
           {"c": 0.4}, guard="after", bad=("c", -0.5)),
    Method("nash_mtl", "aggregator",
           _aggregator(lambda max_norm=1.0: mg.nash_mtl(AGG_TASKS, max_norm=max_norm)), "tasks",
           {"max_norm": 1.0}, guard="after", bad=("max_norm", -1.0)),
    # IMTL-G and ConFIG invert the Gram matrix (condition ~500 on this problem): float32
    # round-off of another summation order comes out amplified by it.
    Method("imtl_g", "aggregator", _aggregator(lambda: mg.imtl_g()), "tasks", guard="after",
           noise=1e-4),
    Method("aligned_mtl", "aggregator", _aggregator(lambda: mg.aligned_mtl()), "tasks",
           guard="after"),
    Method("upgrad", "aggregator", _aggregator(lambda reg_eps=1e-4: mg.upgrad(reg_eps=reg_eps)),
           "tasks", {"reg_eps": 1e-4}, guard="after", bad=("reg_eps", -1.0)),
    Method("dualproj", "aggregator",
           _aggregator(lambda reg_eps=1e-4: mg.dualproj(reg_eps=reg_eps)), "tasks",
           {"reg_eps": 1e-4}, guard="after", bad=("reg_eps", -1.0)),
    Method("config", "aggregator", _aggregator(lambda: mg.config()), "tasks", guard="after",
           noise=1e-4),
    Method("graddrop", "aggregator", _aggregator(lambda leak=0.0: mg.graddrop(seed=0, leak=leak)),
           "tasks", {"leak": 0.0}, guard="after", bad=("leak", 1.5)),
    *[_meta(learner, inner) for learner in ("maml", "fomaml", "reptile", "seq_reptile")
      for inner in INNERS],
    Method("maml/anil", "meta", _learner("maml", "anil"), "maml"),
    Method("imaml/sgd", "meta", _learner("imaml", "sgd"), "maml"),
]  # fmt: skip
BY_NAME = {m.name: m for m in METHODS}


# -- data --------------------------------------------------------------------------------------


def _xy(key, lead, dtype):
    # Drawn in float32 and cast, so that every dtype sees the same numbers.
    x = jax.random.normal(key, (*lead, 3), jnp.float32)
    return x.astype(dtype), jnp.sin(x.sum(-1) + 0.5).astype(dtype)


def make_batch(method: Method, index: int, dtype=jnp.float32, *, bad: bool = False) -> Any:
    """Batch number `index` of a run; `bad` puts one NaN in the first task / example."""
    key = jax.random.fold_in(jax.random.key(7), index)
    k1, k2 = jax.random.split(key)
    d = method.data
    if d == "one":
        batch = _xy(k1, (EXAMPLES,), dtype)
    elif d == "two":
        batch = (_xy(k1, (EXAMPLES,), dtype), _xy(k2, (EXAMPLES,), dtype))
    elif d == "tasks":
        batch = _xy(k1, (AGG_TASKS, EXAMPLES), dtype)
    elif d == "maml":
        batch = (_xy(k1, (NUM_TASKS, 4), dtype), _xy(k2, (NUM_TASKS, 4), dtype))
    else:  # seq: K batches of one task each, in task order 0, 1
        batch = (jnp.arange(INNER_STEPS, dtype=jnp.int32), _xy(k1, (INNER_STEPS, EXAMPLES), dtype))
    if bad:
        first = jax.tree.leaves(batch)[0] if d != "seq" else batch[1][0]
        poisoned = first.at[(0,) * first.ndim].set(jnp.nan)
        batch = jax.tree.map(lambda x: poisoned if x is first else x, batch)
    return batch


# The axis along which each input format is split over devices (None: replicated).
SPLIT_AXES = {
    "one": (0, 0),
    "two": ((0, 0), (0, 0)),
    "tasks": (1, 1),
    "maml": ((0, 0), (0, 0)),
    "seq": (None, (1, 1)),
}


# -- one step ----------------------------------------------------------------------------------


def transform_inputs(method: Method, loss_fn, params, batch, axis=None):
    """What a user passes to ``update``: the gradients and the extra keyword arguments."""
    if axis is None:
        local, mean = (lambda t: t), (lambda t: t)
    else:
        # Data parallel: each device's gradient on its own examples, then their mean. The
        # params are cast to device-varying first: under `shard_map` with check_vma=True a
        # gradient with respect to replicated params would come back summed over devices.
        local = lambda t: jax.lax.pcast(t, axis, to="varying")
        mean = lambda t: jax.lax.pmean(t, axis)
    grad = lambda p, b: jax.grad(loss_fn)(local(p), b)
    if method.data == "one":
        return mean(grad(params, batch)), {}
    if method.data == "two":
        b1, b2 = batch
        # dotprod averages what grad_fn returns itself (axis_name).
        return mean(grad(params, b1)), {"grad_fn": lambda p: grad(p, b2)}
    value_and_grad = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))
    losses, grads = value_and_grad(local(params), batch)
    return mean(grads), ({"losses": mean(losses)} if method.losses else {})


def optimizer(method: Method, axis=None, *, inject=False, guard=False):
    """The method as a user trains with it: with its optax.sgd tail, optionally guarded."""
    factory = method.make(axis)
    tx = optax.inject_hyperparams(factory)(**method.hyper) if inject else factory(**method.hyper)
    tail = optax.sgd(LR) if method.tail else None
    if guard and method.guard == "after":
        return optax.chain(tx, optax.apply_if_finite(tail, 3))
    opt = optax.chain(tx, tail) if tail is not None else tx
    return optax.apply_if_finite(opt, 3) if guard else opt


def frozen(method: Method):
    """A transformation giving zero updates for the leaves a method does not train."""
    zero = optax.set_to_zero()
    return optax.chain(mg.mtl_sum(), zero) if method.kind == "aggregator" else zero


def transform_step(method: Method, opt, loss_fn=loss, axis=None):
    """``step((params, state), batch) -> (params, state)``: one training step (not jitted)."""

    def step(carry, batch):
        params, state = carry
        grads, extra = transform_inputs(method, loss_fn, params, batch, axis)
        updates, state = opt.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    return step


# The battery compiles a few hundred tiny programs; XLA's backend optimizations cost more
# than they save on them (measured: about 30% less compile time for a MAML step).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(fn):
    return jax.jit(fn, compiler_options=FAST_COMPILE)


def meta_step(learner):
    def step(state, batch):
        return learner.step(state, batch)[0]

    return step


@dataclasses.dataclass
class Harness:
    """A method ready to run: ``init(params) -> carry``, ``step(carry, batch) -> carry``."""

    init: Callable[[Any], Any]
    step: Callable[[Any, Any], Any]  # not jitted itself (meta: calls the learner's jit)
    params: Callable[[Any], Any]
    fast: Callable[[Any, Any], Any] | None = None  # `step` jitted, for the runs

    def __post_init__(self):
        # Meta: the learner's jitted step inlined into one program compiled with
        # FAST_COMPILE. Transformations run their few steps eagerly.
        self.fast = self.fast or self.step


def harness(method: Method, *, axis=None, outer=None, inject=False, guard=False, loss_fn=loss):
    """The method with its default optimizer(s), optionally wrapped as a cell needs."""
    if method.kind == "meta":
        if guard:
            outer = optax.apply_if_finite(optax.adam(1e-2), 3)
        if inject:
            outer = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
        learner = _learner(*method.name.split("/"), loss_fn=loss_fn)(outer, axis, inject)
        step = meta_step(learner)
        return Harness(learner.init, step, lambda s: s.params, jit(step))
    opt = optimizer(method, axis, inject=inject, guard=guard) if outer is None else outer
    return Harness(
        lambda p: (p, opt.init(p)), transform_step(method, opt, loss_fn, axis), lambda c: c[0]
    )


def run(h: Harness, params, batches, step=None):
    """The carries of a run: ``[c0, c1, ...]``, one per batch."""
    step = step or h.fast
    carries = [h.init(params)]
    for batch in batches:
        carries.append(step(carries[-1], batch))
    return carries


def max_rel_diff(a, b) -> float:
    """max |a − b| / (1 + max |b|) over the float leaves of two pytrees of equal structure."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape:
            return float("inf")
        if x.size:
            worst = max(worst, float(np.max(np.abs(x - y)) / (1.0 + np.max(np.abs(y)))))
    return worst


def float_leaves(tree) -> list:
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
