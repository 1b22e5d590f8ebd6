"""IMTL-G (Liu et al., 2021): the update with equal projections on every task's unit gradient.

Liu et al., `Towards Impartial Multi-task Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_,
ICLR 2021 (the gradient part, IMTL-G).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from metagrad._src import checks as _checks
from metagrad._src.mtl import gram as _gram


def imtl_g(*, eps: float = 1e-12, axis_name: Any = None) -> optax.GradientTransformation:
    """IMTL-G: the combination d = Σ α_i g_i, Σ α_i = 1, whose projection on every u_i is equal.

    With unit gradients u_i = g_i/‖g_i‖ the paper asks ⟨d, u_i⟩ = ⟨d, u_j⟩ for all i, j and
    Σα_i = 1, and solves it in closed form (Liu et al., Eq. 6-7):
    α_{2:T} = g₁ Uᵀ (D Uᵀ)⁻¹ with rows U_i = u₁ − u_i, D_i = g₁ − g_i, α₁ = 1 − Σ_{i>1} α_i.

    In the Gram space that system is G α ∝ (‖g_1‖, ..., ‖g_T‖): this computes, as TorchJD's
    ``IMTLG``, v = G⁺ diag(G)^{1/2} and α = v / Σv (α = 0 when |Σv| < `eps`), which equals the
    paper's closed form for linearly independent gradients and extends it to dependent ones.
    Scale: Σα = 1 (TorchJD, the paper and LibMTL agree).

    Args:
      eps: below this |Σv| the weights are zero (TorchJD uses 1e-12).
      axis_name: device axis over which the parameters are sharded, or None.

    Returns:
      The IMTL-G transformation: per-task gradients (leaves ``[T, ...]``) in, the
      equal-projection combination out; no state.

    Example:
      >>> import jax.numpy as jnp, metagrad as mg
      >>> g = jnp.array([[2.0, 0.0], [0.0, 1.0]])  # d = (2/3, 2/3): equal projections
      >>> tx = mg.imtl_g()
      >>> out, _ = tx.update(g, tx.init(jnp.zeros(2)))
      >>> [round(x, 4) for x in out.tolist()]
      [0.6667, 0.6667]

    References:
      Liu et al., `Towards Impartial Multi-task Learning
      <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021.
    """
    eps = _checks.hyperparameter("eps", eps, low=0, low_inclusive=True)

    def weights_fn(gram, state):
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
        # torch.linalg.pinv's default cutoff (TorchJD), T·eps relative to the largest eigenvalue.
        rtol = gram.shape[0] * jnp.finfo(gram.dtype).eps
        pinv = jnp.linalg.pinv(gram, rtol=rtol, hermitian=True)
        v = jnp.matmul(pinv, norms, precision=_gram.EXACT)
        total = jnp.sum(v)
        small = jnp.abs(total) < eps
        return jnp.where(small, 0.0, v / jnp.where(small, 1.0, total)), state

    return _gram.gram_aggregator("imtl_g", weights_fn, axis_name=axis_name)
