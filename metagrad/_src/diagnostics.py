"""Gradient-alignment diagnostics: dot products and cosines between task or batch gradients.

Reptile's meta-gradient implicitly maximizes the inner products between
gradients of different batches (Nichol et al., 2018); Sequential Reptile makes
those batches come from different tasks and reports the average pairwise cosine
similarity between task gradients (Lee et al., 2022, Figure 3(h), Section 4).
These functions compute that quantity from gradients stacked on a leading axis,
with one Gram matrix (N² · d flops for N gradients of d parameters), cheap
enough to log at every step.

References:
  Lee, Lee, Lee, Hwang, `Sequential Reptile: Inter-Task Gradient Alignment for
  Multilingual Learning <https://arxiv.org/abs/2110.02600>`_, ICLR 2022.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from metagrad._src import checks as _checks

Params = chex.ArrayTree


def _leading_size(name: str, tree: Any) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{name} must contain at least one array")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            f"{name} must have the same leading (stacking) axis on every leaf, got shapes "
            f"{[np.shape(x) for x in leaves]}"
        )
    return sizes.pop()


def leaf_grams(grads: Params) -> jax.Array:
    """Per-leaf Gram matrices of gradients stacked on a leading axis, shape ``[leaves, N, N]``.

    The one Gram computation of metagrad: `pairwise_dot` sums these, and the aggregators
    with per-leaf (layer-wise) options use them one by one. Each product is at full
    precision (``Precision.HIGHEST``), in the leaves' highest float dtype and at least
    float32, and nothing larger than the stacked gradients is formed.
    """
    n = _leading_size("grads", grads)
    flat = [jnp.reshape(x, (n, -1)) for x in jax.tree.leaves(grads)]
    dtype = jnp.result_type(*flat, jnp.float32)
    grams = []
    for x in flat:
        x = x.astype(dtype)
        grams.append(jnp.matmul(x, jnp.conj(x).T, precision=jax.lax.Precision.HIGHEST).real)
    return jnp.stack(grams)


def pairwise_dot(grads: Params, *, axis_name: Any = None) -> jax.Array:
    """The Gram matrix G_ij = ⟨g_i, g_j⟩ of gradients stacked on a leading axis.

    Args:
      grads: a pytree whose leaves all have a leading axis of size N (gradient i
        is the i-th slice of every leaf, e.g. the output of `task_gradients`).
      axis_name: under `jax.shard_map` / `jax.pmap` with the parameters sharded
        over this device axis (each device holds a slice of every gradient),
        the per-device partial Gram matrices are summed over it (`psum`, N x N
        numbers cross devices), so every device gets the full Gram matrix.
        None (default): the gradients are whole on each device.

    Returns:
      A float array of shape ``[N, N]`` (in the leaves' highest float dtype).

    Example:
      >>> import jax.numpy as jnp
      >>> import metagrad as mg
      >>> g = {"w": jnp.array([[1.0, 0.0], [1.0, 1.0]]), "b": jnp.array([[2.0], [0.0]])}
      >>> print(mg.pairwise_dot(g).tolist())
      [[5.0, 1.0], [1.0, 2.0]]
    """
    gram = jnp.sum(leaf_grams(grads), axis=0)
    if axis_name is not None:
        gram = jax.lax.psum(gram, axis_name)
    return gram


def pairwise_cosine(grads: Params) -> jax.Array:
    """Cosine similarities C_ij = ⟨g_i, g_j⟩ / (‖g_i‖ ‖g_j‖) between stacked gradients.

    A zero gradient has cosine 0 with everything (and itself), rather than NaN.

    Args:
      grads: a pytree whose leaves all have a leading axis of size N.

    Returns:
      A float array of shape ``[N, N]`` with entries in [−1, 1].

    Example:
      >>> import jax.numpy as jnp
      >>> import metagrad as mg
      >>> g = jnp.array([[1.0, 0.0], [1.0, 1.0], [-2.0, 0.0]])
      >>> print(jnp.round(mg.pairwise_cosine(g)[0], 3).tolist())
      [1.0, 0.707, -1.0]
    """
    gram = pairwise_dot(grads)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    denom = norms[:, None] * norms[None, :]
    safe = jnp.where(denom > 0, denom, 1.0)
    return jnp.where(denom > 0, jnp.clip(gram / safe, -1.0, 1.0), 0.0)


def mean_pairwise_cosine(grads: Params, task_ids: chex.Array | None = None) -> jax.Array:
    """Mean cosine similarity over pairs i ≠ j of stacked gradients.

    .. math::

      \\bar c = \\frac{1}{|P|} \\sum_{(i, j) \\in P} \\cos(g_i, g_j), \\qquad
      P = \\{(i, j): i \\ne j\\}

    With ``task_ids``, only pairs from different tasks (t_i ≠ t_j) count: the
    inter-task alignment that Sequential Reptile promotes.

    Args:
      grads: a pytree whose leaves all have a leading axis of size N >= 2.
      task_ids: optional int array of shape ``[N]``, the task of each gradient.

    Returns:
      A float scalar; NaN when no pair qualifies (all ``task_ids`` equal), so an
      undefined value is not mistaken for orthogonality.

    Example:
      >>> import jax.numpy as jnp
      >>> import metagrad as mg
      >>> g = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
      >>> print(round(float(mg.mean_pairwise_cosine(g)), 4))
      0.3333
      >>> print(round(float(mg.mean_pairwise_cosine(g, task_ids=jnp.array([0, 1, 0]))), 4))
      0.0
    """
    n = _leading_size("grads", grads)
    if n < 2:
        raise ValueError(f"grads must stack at least 2 gradients to compare, got {n}")
    cos = pairwise_cosine(grads)
    mask = ~jnp.eye(n, dtype=bool)
    if task_ids is not None:
        if np.shape(task_ids) != (n,):
            raise ValueError(
                f"task_ids must have shape ({n},), one id per gradient, got {np.shape(task_ids)}"
            )
        task_ids = jnp.asarray(task_ids)
        mask = mask & (task_ids[:, None] != task_ids[None, :])
    count = jnp.sum(mask)
    total = jnp.sum(jnp.where(mask, cos, 0.0))
    return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)


def task_gradients(
    loss_fn: Callable[[Params, Any], chex.Array], params: Params, batches: Any
) -> Params:
    """Gradients ∇L(params; B_i) of several batches at the same params, stacked.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the point where the gradients are taken.
      batches: a pytree whose leaves have a leading axis of size N (batch i is
        slice i), e.g. one batch per task.

    Returns:
      A pytree like ``params`` with a leading axis of size N (vmapped gradient).

    Example:
      >>> import jax.numpy as jnp
      >>> import metagrad as mg
      >>> loss_fn = lambda p, b: jnp.sum((p - b) ** 2)
      >>> g = mg.task_gradients(loss_fn, jnp.zeros(2), jnp.array([[1.0, 0.0], [0.0, 1.0]]))
      >>> print(g.tolist(), round(float(mg.mean_pairwise_cosine(g)), 3))
      [[-2.0, -0.0], [-0.0, -2.0]] 0.0
    """
    _checks.callable_("loss_fn", loss_fn)
    _leading_size("batches", batches)
    return jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, batches)
