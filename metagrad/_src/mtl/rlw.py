"""Random Loss Weighting (Lin et al., 2022) as an optax transformation over task gradients."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from metagrad._src import checks as _checks
from metagrad._src.mtl import base as _aggregate
from metagrad._src.mtl import losses as _losses
from metagrad._src.mtl import weighting as _weighting
from metagrad._src.mtl.surgery import _key_from_seed

_DISTRIBUTIONS = ("normal", "uniform", "dirichlet")


class RLWState(NamedTuple):
    """State of `rlw`."""

    count: chex.Array  # int32 scalar, calls so far
    key: chex.Array  # uint32[2] PRNG key of the weights


def random_weights(key: jax.Array, num_tasks: int, distribution: str, dtype) -> jax.Array:
    """One draw of RLW's weights λ (summing to 1), shape [num_tasks].

    Drawn in float32 and cast, so that a run draws the same weights under jax_enable_x64.
    """
    f32 = jnp.float32
    if distribution == "dirichlet":
        draw = jax.random.dirichlet(key, jnp.ones((num_tasks,), f32))
    elif distribution == "uniform":
        draw = jax.nn.softmax(jax.random.uniform(key, (num_tasks,), f32))
    else:
        draw = jax.nn.softmax(jax.random.normal(key, (num_tasks,), f32))
    return draw.astype(dtype)


def rlw(
    *,
    seed: int | jax.Array = 0,
    distribution: str = "normal",
    reduction: str = "mean",
) -> optax.GradientTransformationExtraArgs:
    """Random Loss Weighting: a fresh random convex combination of the task gradients each step.

    Each call draws λ on the simplex and returns sum_i λ_i g_i. The paper's default (and
    LibMTL's ``RLW``) draws λ = softmax(ε), ε ~ N(0, I); ``distribution`` also offers
    softmax of U(0, 1) draws and the flat Dirichlet(1, ..., 1), both among the paper's
    variants. The PRNG key lives in the state (seeded by `seed`, split every call), so runs are
    reproducible and checkpointable.

    The weights do not depend on the losses: ``losses=`` is accepted (optional) so that RLW is
    called like the other loss-weighting methods; given, it is checked (shape [T]) and a
    non-finite loss makes the update non-finite (the state is then kept).

    Args:
      seed: an int or a `jax.random` key.
      distribution: ``"normal"`` (default), ``"uniform"`` or ``"dirichlet"``.
      reduction: ``"mean"`` (default, the paper's: λ sums to 1) or ``"sum"`` (T λ, summing to
        T, the scale of `mtl_sum`).

    Returns:
      An `optax.GradientTransformationExtraArgs` from leaves ``[T, ...]`` to the combined
      gradient. A step with non-finite task gradients (or losses) returns a non-finite update
      and leaves the state (count and key) unchanged, for ``optax.apply_if_finite`` after it.

    Example:
      >>> import jax.numpy as jnp, metagrad as mg
      >>> tx = mg.rlw(seed=0)
      >>> g = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> out, state = tx.update(g, tx.init(jnp.zeros(2)))
      >>> round(float(out.sum()), 6), bool((out > 0).all())  # weights on the simplex
      (1.0, True)

    References:
      Lin et al., `Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
      Learning <https://arxiv.org/abs/2111.10603>`_, TMLR 2022.
    """
    key0 = _key_from_seed(seed)
    _checks.one_of("distribution", distribution, _DISTRIBUTIONS)
    _aggregate.check_reduction(reduction)

    def init_state(params):
        del params
        return RLWState(count=jnp.zeros([], jnp.int32), key=key0)

    def weights_fn(updates, losses, state, params):
        del losses, params
        num_tasks = jax.tree.leaves(updates)[0].shape[0]
        key, sub = jax.random.split(state.key)
        weights = num_tasks * random_weights(sub, num_tasks, distribution, _losses.float_dtype())
        return weights, RLWState(count=optax.safe_increment(state.count), key=key)

    return _weighting.loss_weighting(
        "rlw", init_state, weights_fn, losses_required=False, reduction=reduction
    )
