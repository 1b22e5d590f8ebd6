"""The skeleton shared by the loss-weighting aggregators (GradNorm, uncertainty weighting, DWA,
RLW, FAMO, DB-MTL).

Each of them returns ``d = sum_i w_i v_i`` with task weights ``w`` computed from the per-task
losses (``losses=``, shape [T]), its state and (for some) the task gradients; ``v_i`` are the
task gradients, or (DB-MTL) vectors the method keeps in its state. The optax plumbing around
that rule is the same for all of them and lives here once: the task-axis check, the `losses=`
check, a non-finite (or out-of-range traced) loss turning the update non-finite, the reduction,
and the state kept whole on a non-finite step. A method module supplies ``init_state`` and
``weights_fn``, as a Gram-path method supplies its solver to `gram.gram_aggregator`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from metagrad._src.mtl import base as _aggregate
from metagrad._src.mtl import losses as _losses

# weights_fn(updates, losses, state, params) -> (weights [T], new_state)
WeightsFn = Callable[[Any, Any, Any, Any], tuple[jax.Array, Any]]


def loss_weighting(
    name: str,
    init_state: Callable[[Any], Any],
    weights_fn: WeightsFn,
    *,
    num_tasks: int | None = None,
    sign: str = _losses.ANY,
    losses_required: bool = True,
    reduction: str | None = None,
    vectors: Callable[[Any], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """An aggregator ``d = sum_i w_i v_i`` with ``w, state = weights_fn(...)`` (private).

    Args:
      name: the public name (``mg.<name>``), for error messages.
      init_state: ``init_state(params) -> state``.
      weights_fn: ``weights_fn(updates, losses, state, params) -> (weights, new_state)``:
        ``updates`` the per-task gradients (leaves ``[T, ...]``), ``losses`` the checked
        losses (stop-gradient, float32 or float64 with jax_enable_x64; None when optional and
        not given), weights of shape [T]. Traced; it must not branch in Python on values.
      num_tasks: the T the state was built for (checked against the updates), or None.
      sign: what the method asks of the losses (`losses.ANY`, ``NONNEGATIVE``, ``POSITIVE``).
      losses_required: whether ``losses=`` must be given.
      reduction: ``"sum"`` or ``"mean"`` (the weights divided by T), or None (as returned).
      vectors: ``vectors(new_state)``, the vectors to combine instead of the task gradients.

    Returns:
      An `optax.GradientTransformationExtraArgs`; ``update(updates, state, params,
      losses=losses)``. A step whose losses are not all finite (or out of `sign`'s range, when
      traced) returns a non-finite update; a step whose update or new state is not finite
      leaves the state unchanged, for ``optax.apply_if_finite`` after the aggregator.
    """

    def update_fn(updates, state, params=None, *, losses=None, **extra_args):
        del extra_args
        num = _aggregate.check_task_axis(updates, params, num_tasks, name=name)
        losses, valid = _losses.task_losses(
            losses, num, _losses.float_dtype(), name=name, sign=sign, required=losses_required
        )
        weights, new_state = weights_fn(updates, losses, state, params)
        weights = jnp.where(valid, weights, jnp.nan)
        if reduction is not None:
            weights = _aggregate.reduce(weights, reduction, num)
        combined = _aggregate.combine(updates if vectors is None else vectors(new_state), weights)
        out = jax.tree.map(lambda o, g: o.astype(g.dtype), combined, updates)
        return out, _aggregate.keep_state_if_finite(out, new_state, state)

    return optax.GradientTransformationExtraArgs(init_state, update_fn)


def learned_state(state_type: Any, num_tasks: int, opt: Any, **vectors: float) -> Any:
    """The initial state of a method that learns a [T] task vector with its own optimizer
    (`famo`, `gradnorm`, `uncertainty_weighting`): ``state_type`` with ``count`` 0, each
    [T] vector of ``vectors`` filled with its value (the first one is the learned vector), and
    its last field, ``opt``'s state for the learned vector."""
    filled = {name: _losses.task_vector(num_tasks, value) for name, value in vectors.items()}
    learned = next(iter(filled.values()))
    opt_state = {state_type._fields[-1]: opt.init(learned)}
    return state_type(count=jnp.zeros([], jnp.int32), **filled, **opt_state)


def task_norms(trees: list[Any], num_tasks: int) -> jax.Array:
    """The Euclidean norm of each task's slice over the leaves `trees` (leaves ``[T, ...]``)."""
    sq = sum(jnp.sum(jnp.abs(jnp.reshape(x, (num_tasks, -1))) ** 2, axis=1) for x in trees)
    return jnp.sqrt(sq)
