"""GradDrop (Chen et al., 2020): gradient sign dropout.

Chen et al., `Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout
<https://arxiv.org/abs/2010.06808>`_, NeurIPS 2020.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metagrad._src import checks as _checks
from metagrad._src.mtl.base import check_task_axis, keep_state_if_finite
from metagrad._src.mtl.surgery import _key_from_seed


class GradDropState(NamedTuple):
    """State of `graddrop`."""

    count: chex.Array  # int32 scalar, calls so far
    key: chex.Array  # uint32[2] PRNG key for the per-coordinate draws


def _check_leak(leak: Any) -> Any:
    if isinstance(leak, (Sequence, np.ndarray)) and not isinstance(leak, str):
        values = np.asarray(leak, dtype=np.float64)
        if values.ndim != 1:
            raise ValueError(f"leak must be a number or a 1-D sequence, got shape {values.shape}")
        if not np.all((values >= 0) & (values <= 1)):
            raise ValueError(f"leak must be in [0, 1], got {list(values)}")
        return values
    return _checks.hyperparameter("leak", leak, low=0, low_inclusive=True, high=1)


def graddrop(*, seed: int | jax.Array = 0, leak: Any = 0.0) -> optax.GradientTransformation:
    """GradDrop: per coordinate, keep the task gradients of one sign, drawn by sign purity.

    For every coordinate (every entry of every leaf), with the task gradients g_i there, the
    positive-sign purity P = ½ (1 + Σ_i g_i / Σ_i |g_i|) ∈ [0, 1]; draw U ~ Uniform(0, 1) and keep
    the positive entries if P > U, the negative ones if P < U (Chen et al., Algorithm 1, lines
    10-15, with f the identity):

    .. math::
      M_i = [P > U][g_i > 0] + [P < U][g_i < 0], \\qquad
      d = \\sum_i (\\ell_i + (1 - \\ell_i) M_i)\\, g_i .

    ℓ_i is the `leak` of task i (0: pure GradDrop; 1: the plain sum). As TorchJD's ``GradDrop``
    the masked gradients are summed, on the whole per-task gradient (the paper applies it to the
    gradients at a shared activation layer, summed over the batch). Coordinate-wise, so not a
    Gram-path method and no `axis_name`: with parameters sharded, each device would draw its
    own U.

    Randomness: U comes from a PRNG key held in the state (seeded by `seed`, split every call,
    folded with the leaf's index), so runs are reproducible and checkpointable.

    Args:
      seed: an int or a `jax.random` key.
      leak: a number in [0, 1] for every task, or a sequence of T of them.

    Returns:
      An `optax.GradientTransformation` from per-task gradients (leaves ``[T, ...]``) to d,
      with state `GradDropState`. On a non-finite step the state is kept.

    Example:
      >>> import jax.numpy as jnp, metagrad as mg
      >>> g = jnp.array([[1.0, 2.0], [3.0, -1.0]])  # agreeing first coordinate: kept whole
      >>> tx = mg.graddrop(seed=0)
      >>> out, _ = tx.update(g, tx.init(jnp.zeros(2)))
      >>> out[0].item(), out[1].item() in (2.0, -1.0)
      (4.0, True)

    References:
      Chen et al., `Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout
      <https://arxiv.org/abs/2010.06808>`_, NeurIPS 2020 (Algorithm 1).
    """
    key0 = _key_from_seed(seed)
    leak = _check_leak(leak)

    def init_fn(params):
        del params
        return GradDropState(count=jnp.zeros([], jnp.int32), key=key0)

    def update_fn(updates, state, params=None):
        num_tasks = check_task_axis(updates, params, name="graddrop")
        if isinstance(leak, np.ndarray) and leak.shape != (num_tasks,):
            raise ValueError(
                f"leak has {leak.shape[0]} values but the updates have {num_tasks} tasks"
            )
        key, sub = jax.random.split(state.key)
        leaves, treedef = jax.tree.flatten(updates)
        out = []
        for n, g in enumerate(leaves):
            g32 = g.astype(jnp.promote_types(g.dtype, jnp.float32))
            total, size = jnp.sum(g32, axis=0), jnp.sum(jnp.abs(g32), axis=0)
            purity = 0.5 * (1.0 + total / jnp.where(size > 0, size, 1.0))
            # Drawn in float32 whatever the dtype, so that every dtype sees the same draws.
            u = jax.random.uniform(jax.random.fold_in(sub, n), purity.shape, jnp.float32)
            keep = ((purity > u) & (g32 > 0)) | ((purity < u) & (g32 < 0))
            lk = jnp.reshape(jnp.asarray(leak, g32.dtype), (-1,) + (1,) * (g.ndim - 1))
            summed = jnp.sum((lk + (1 - lk) * keep) * g32, axis=0)
            # A non-finite entry fails every comparison, so its mask is 0 and it would vanish:
            # pass it on instead, for the guard after the aggregator.
            summed = jnp.where(jnp.isfinite(size), summed, size)
            out.append(summed.astype(g.dtype))
        out = jax.tree.unflatten(treedef, out)
        new_state = GradDropState(count=optax.safe_increment(state.count), key=key)
        return out, keep_state_if_finite(out, new_state, state)

    return optax.GradientTransformation(init_fn, update_fn)
