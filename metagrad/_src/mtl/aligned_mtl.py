"""Aligned-MTL (Senushkin et al., 2023): align the principal components of the task gradients.

Senushkin et al., `Independent Component Alignment for Multi-Task Learning
<https://arxiv.org/abs/2305.19000>`_, CVPR 2023.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from metagrad._src import checks as _checks
from metagrad._src.mtl import base as _aggregate
from metagrad._src.mtl import gram as _gram

_SCALES = ("min", "median", "rmse")


def aligned_mtl(
    *, scale_mode: str = "min", reduction: str = "mean", axis_name: Any = None
) -> optax.GradientTransformation:
    """Aligned-MTL: make the task-gradient matrix orthogonal with equal singular values.

    With G = V Λ Vᵀ (eigenvalues λ_1 >= ... >= λ_r > 0 of rank r), Aligned-MTL replaces the
    stacked gradients J (rows g_i) by the aligned matrix Ĵ = B J with the balance transformation
    (Senushkin et al., Algorithm 1)

    .. math::
      B = \\sqrt{\\sigma}\\, V \\Lambda^{-1/2} V^\\top,

    whose rows are orthogonal with equal norms (Ĵ Ĵᵀ = σ V Vᵀ), and returns the combination
    Σ_i w_i ĝ_i = (B w)ᵀ J: task weights α = B w on the original gradients. σ (`scale_mode`):
    ``"min"`` the smallest non-zero eigenvalue λ_r (the paper and TorchJD's default), ``"median"``
    their (lower) median, ``"rmse"`` their mean. Eigenvalues at most λ_1·T·eps(float32) count
    as zero (TorchJD's rank test); B = I when all do.

    Scale (`reduction`): ``"mean"`` (default, w_i = 1/T, as TorchJD's ``AlignedMTL``) or
    ``"sum"`` (w_i = 1, as LibMTL's ``Aligned_MTL``).

    Args:
      scale_mode: ``"min"``, ``"median"`` or ``"rmse"``.
      reduction: ``"mean"`` or ``"sum"``.
      axis_name: device axis over which the parameters are sharded, or None.

    Returns:
      An `optax.GradientTransformation` from per-task gradients (leaves ``[T, ...]``) to the
      aligned combination; its state is empty.

    Example:
      >>> import jax.numpy as jnp, metagrad as mg
      >>> g = jnp.array([[3.0, 0.0], [0.0, 1.0]])  # aligned: both rescaled to norm 1
      >>> tx = mg.aligned_mtl(reduction="sum")
      >>> out, _ = tx.update(g, tx.init(jnp.zeros(2)))
      >>> [round(x, 4) for x in out.tolist()]
      [1.0, 1.0]

    References:
      Senushkin et al., `Independent Component Alignment for Multi-Task Learning
      <https://arxiv.org/abs/2305.19000>`_, CVPR 2023 (Algorithm 1).
    """
    _checks.one_of("scale_mode", scale_mode, _SCALES)
    _aggregate.check_reduction(reduction)

    def weights_fn(gram, state):
        num = gram.shape[0]
        lam, vecs = jnp.linalg.eigh(gram)  # ascending
        tol = jnp.max(lam) * num * jnp.finfo(jnp.float32).eps
        kept = lam > tol
        rank = jnp.sum(kept)
        if scale_mode == "min":
            sigma = jnp.min(jnp.where(kept, lam, jnp.inf))
        elif scale_mode == "median":  # the lower median of the kept (largest) eigenvalues
            sigma = lam[jnp.clip(num - rank + (rank - 1) // 2, 0, num - 1)]
        else:
            sigma = jnp.sum(jnp.where(kept, lam, 0.0)) / jnp.maximum(rank, 1)
        inv_sqrt = jnp.where(kept, 1.0 / jnp.sqrt(jnp.where(kept, lam, 1.0)), 0.0)
        balance = jnp.sqrt(sigma) * jnp.matmul(vecs * inv_sqrt, vecs.T, precision=_gram.EXACT)
        balance = jnp.where(rank > 0, balance, jnp.eye(num, dtype=gram.dtype))
        w = _aggregate.reduce(jnp.ones((num,), gram.dtype), reduction, num)
        return jnp.matmul(balance, w, precision=_gram.EXACT), state

    return _gram.gram_aggregator("aligned_mtl", weights_fn, axis_name=axis_name)
