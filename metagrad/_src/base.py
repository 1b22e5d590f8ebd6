"""Types and building blocks shared by metagrad's meta-learners."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

Params = chex.ArrayTree
Batch = Any
LossFn = Callable[[Params, Batch], chex.Array]


class MetaLearner(NamedTuple):
    """A meta-learner: a pair of pure functions plus task adaptation.

    Attributes:
      init: `init(params) -> state`; `state.params` is the learned
        initialization.
      step: `step(state, tasks) -> (state, metrics)`, one outer (meta) step on a
        batch of tasks; jitted, one compiled call per outer step.
      adapt: `adapt(state, support, num_steps=None) -> params`, the params a
        single task reaches from the learned initialization after the learner's
        inner loop on its support batch (for evaluation at meta-test time).
    """

    init: Callable[[Params], Any]
    step: Callable[[Any, Any], tuple[Any, dict[str, chex.Array]]]
    adapt: Callable[..., Params]


def meta_learner(
    init: Callable[[Params], Any], step: Callable, adapt: Callable, *, state_type: type
) -> MetaLearner:
    """The `MetaLearner` of ``init``, ``step`` (jitted here) and ``adapt``, with the checks
    every meta-learner shares: ``init`` refuses params it cannot differentiate, ``step``
    a state that is not the ``state_type`` from ``init`` (at trace time)."""

    @functools.wraps(init)
    def checked_init(params: Params) -> Any:
        check_float_params(params)
        return init(params)

    @functools.wraps(step)
    def checked_step(state: Any, tasks: Any) -> Any:
        if not isinstance(state, state_type):
            raise TypeError(
                f"state must be the {state_type.__name__} from learner.init(params), got "
                f"{type(state).__name__}: pass state = learner.init(params), not the params. "
                "(A checkpoint restored without a target comes back as a dict: with orbax, "
                "restore into jax.eval_shape(learner.init, params).)"
            )
        return step(state, tasks)

    return MetaLearner(init=checked_init, step=jax.jit(checked_step), adapt=adapt)


def check_float_params(params: Params) -> None:
    """Every leaf of a meta-learner's params is differentiated: it must be a float."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"params leaf {jax.tree_util.keystr(path) or '(root)'} has dtype {dtype.name}: "
                "meta-learners differentiate every leaf of params, so every leaf must be a "
                "float. Close over non-float state in loss_fn instead (e.g. graphdef, params, "
                "rest = nnx.split(model, nnx.Param, ...), merged inside loss_fn)"
            )


def as_arrays(tree: Any) -> Any:
    """Python-number leaves (``{"w": 0.3}``, which optax accepts) as strongly typed arrays.

    The state's dtypes then do not change after the first update; ``None`` leaves stay.
    """

    def convert(x):
        return x if isinstance(x, jax.Array) else jnp.asarray(x, jnp.result_type(x))

    return jax.tree.map(convert, tree)


def keep_if_finite(new: Any, old: Any, *, check: Any = None, axis_name: Any = None) -> Any:
    """`new` if all float leaves of `check` (default: `new`) are finite, else `old`, traceable.

    The one finite guard of persistent state: a carried inner-optimizer state, gradient
    sharing's running average, an aggregator's state. One non-finite task would otherwise
    poison every later step, and a guard on the outer optimizer (`optax.apply_if_finite`) could
    then only delay the NaN. Keeping the previous value makes a skipped step leave no trace.
    `new` and `old` have the same structure; `check` may be another tree (e.g. the form of the
    state that was computed, before it is converted to the stored form). With ``axis_name``
    each device holds a slice of `check`: the devices agree (all finite, or keep `old`), so
    that they keep equal states.
    """
    check = new if check is None else check
    floats = [x for x in jax.tree.leaves(check) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not floats:
        return new
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats]))
    if axis_name is not None:
        ok = jax.lax.psum(jnp.where(ok, 0, 1), axis_name) == 0
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def mean_over_tasks(states: Any, axis_name: str | None = None) -> Any:
    """Averages per-task optimizer states over their leading task axis (and devices).

    The one rule for an inner state carried across outer steps: float leaves (moments) are
    averaged; integer leaves (step counts) are equal across tasks, which all take the same
    number of steps, so task 0's is kept (and the maximum over devices, equal too, marks it
    device-invariant).
    """

    def mean(x):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            x = jnp.mean(x, axis=0)
            return x if axis_name is None else jax.lax.pmean(x, axis_name)
        return x[0] if axis_name is None else jax.lax.pmax(x[0], axis_name)

    return jax.tree.map(mean, states)


def global_norm(tree: Any) -> jax.Array:
    """The global Euclidean norm of a pytree, without overflow for finite leaves.

    `optax.tree.norm` squares the entries first, so finite gradients above about 1e19 give inf
    in float32; scaling by the largest entry first keeps the metric finite whenever they are.
    """
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.zeros([])
    dtype = jnp.result_type(*leaves)
    scale = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0).astype(dtype) for x in leaves]))
    safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    total = sum(jnp.sum(jnp.square(x.astype(dtype) / safe)) for x in leaves)
    return safe * jnp.sqrt(total)


def _varying_axes(x: Any) -> frozenset:
    """The mapped axes a value is typed as varying over (empty outside `jax.shard_map`)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)  # JAX <= 0.8
    if vma is None:  # later JAX: ShapedArray.manual_axis_type.varying
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
    return frozenset(vma)


def to_varying(tree: Any, axis_name: str | None) -> Any:
    """Marks `tree` as varying over the mapped axis ``axis_name``.

    Inside `jax.shard_map`, JAX transposes the implicit broadcast of a
    replicated value into a ``psum``: a gradient with respect to replicated
    params comes back summed over devices. Marking the params as
    device-varying first keeps each device's gradient local, so the caller
    decides how to combine them (a ``pmean``). Leaves already varying, and
    everything when ``axis_name`` is None, pass through.
    """
    if axis_name is None:
        return tree
    pcast = getattr(jax.lax, "pcast", None)
    if pcast is None:  # older JAX: no varying-axes types, gradients stay local
        return tree

    def leaf(x):
        if axis_name in _varying_axes(x):
            return x
        return pcast(x, axis_name, to="varying")

    return jax.tree.map(leaf, tree)


def to_invariant(tree: Any, axis_name: str | None) -> Any:
    """Marks values equal on every device as device-invariant again.

    A value computed from `to_varying` params (e.g. a carry that depends on learned
    inner-rule parameters) is typed device-varying under ``shard_map(check_vma=True)``
    even when every device holds the same number. Such leaves are averaged over the axis
    (``pmax`` for integers), which leaves equal values unchanged up to rounding and makes
    them invariant; leaves not varying pass through.
    """
    if axis_name is None:
        return tree

    def leaf(x):
        if axis_name not in _varying_axes(x):
            return x
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jax.lax.pmean(x, axis_name)
        return jax.lax.pmax(x, axis_name)

    return jax.tree.map(leaf, tree)
