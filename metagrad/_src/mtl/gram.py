"""The Gram path shared by the Jacobian aggregators that see the task gradients only through G.

MGDA, CAGrad, Nash-MTL, IMTL-G, Aligned-MTL, UPGrad, DualProj and ConFIG all return
``d = sum_i w_i g_i`` with weights ``w = f(G)`` that depend on the per-task gradients g_i only
through their Gram matrix ``G_ij = <g_i, g_j>`` (T x T). So each one is: one Gram matrix (one
pass over the stacked gradients, full precision), a small solver on G, one weighted sum per
leaf. Nothing larger than the stacked gradients is materialised.

With the parameters sharded over a device axis (`axis_name`), each device holds a slice of
every task gradient: its partial Gram matrix is summed over the axis (T x T numbers cross
devices), every device then solves the same small problem and combines its own slice. The
result equals one device's.

This module holds that plumbing once; a method module supplies
``weights_fn(gram, state) -> (weights, new_state)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from metagrad._src import diagnostics as _diagnostics
from metagrad._src.mtl.base import EXACT as EXACT
from metagrad._src.mtl.base import check_task_axis, combine, keep_state_if_finite

WeightsFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


def gram_aggregator(
    name: str,
    weights_fn: WeightsFn,
    *,
    init_state: Callable[[], Any] | None = None,
    num_tasks: int | None = None,
    axis_name: Any = None,
    state_dtype: bool = False,
) -> optax.GradientTransformation:
    """An aggregator ``d = sum_i w_i g_i`` with ``w, state = weights_fn(G, state)``.

    Args:
      name: the public name (``mg.<name>``), for error messages.
      weights_fn: maps the Gram matrix [T, T] (float32 or wider) and the state to the task
        weights [T] and the new state. Traced; it must not branch in Python on values.
      init_state: returns the initial state (None: `optax.EmptyState`).
      num_tasks: the T the state was built for (checked against the updates), or None.
      axis_name: device axis over which the parameters are sharded (the partial Gram matrices
        are summed over it), or None.
      state_dtype: if True the Gram matrix is cast to the dtype of the state's first float
        leaf, so that the state's dtype is stable across steps (e.g. float32 state with
        bfloat16 gradients).

    Returns:
      An `optax.GradientTransformation`. On a step whose output or new state is not finite the
      state is kept whole and the (non-finite) output passed on, for `optax.apply_if_finite`.
    """

    def init_fn(params):
        del params
        return optax.EmptyState() if init_state is None else init_state()

    def update_fn(updates, state, params=None):
        check_task_axis(updates, params, num_tasks, name=name)
        gram = _diagnostics.pairwise_dot(updates, axis_name=axis_name)
        if state_dtype:
            floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
            gram = gram.astype(floats[0].dtype)
        weights, new_state = weights_fn(gram, state)
        out = combine(updates, weights)
        return out, keep_state_if_finite(out, new_state, state, axis_name)

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# Small helpers on the Gram matrix.


def trace_normalize(gram: jax.Array, eps: Any) -> jax.Array:
    """G / tr(G), the Gram matrix of J / ||J||_F; zero when tr(G) < eps (as TorchJD's)."""
    trace = jnp.trace(gram)
    small = trace < eps
    return jnp.where(small, jnp.zeros_like(gram), gram / jnp.where(small, 1.0, trace))


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 where den == 0."""
    zero = den == 0
    return jnp.where(zero, 0.0, num / jnp.where(zero, 1.0, den))
