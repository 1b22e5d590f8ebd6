"""ConFIG (Liu et al., 2024): the conflict-free direction with equal cosines to every task.

Liu, Chu, Thuerey, `ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks
<https://arxiv.org/abs/2408.11104>`_, ICLR 2025.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from metagrad._src.mtl import gram as _gram


def config(*, axis_name: Any = None) -> optax.GradientTransformation:
    """ConFIG: the direction with the same cosine to every task gradient, scaled by projections.

    With unit gradients u_i = g_i/‖g_i‖ (rows of U), ConFIG (Liu et al., Eq. 2) takes
    the direction v = U⁺ 1 (so that ⟨u_i, v⟩ is the same for every task when U has full row
    rank), normalised, and scales it by the sum of the task gradients' projections on it:

    .. math::
      \\hat v = \\frac{U^+ \\mathbf 1}{\\|U^+ \\mathbf 1\\|}, \\qquad
      d = \\Big(\\sum_i \\langle g_i, \\hat v\\rangle\\Big)\\, \\hat v .

    On the Gram matrix: U⁺1 = Jᵀa with a = D⁻¹C⁺1 (D = diag ‖g_i‖, C the cosine matrix
    D⁻¹GD⁻¹), so d = Jᵀ a · (1ᵀGa)/(aᵀGa). A zero task gradient has a zero unit vector (as
    TorchJD's ``nan_to_num``). Scale: TorchJD's ``ConFIG`` and the paper (the sum of the
    projections, no 1/T). The pseudo-inverse of C cuts eigenvalues below T·eps relative to the
    largest (on the Gram side, since C = U Uᵀ; TorchJD cuts U's singular values), which only
    matters for linearly dependent gradients.

    Args:
      axis_name: device axis over which the parameters are sharded, or None.

    Returns:
      The ConFIG transformation: per-task gradients (leaves ``[T, ...]``) in, the
      conflict-free direction out; no state.

    Example:
      >>> import jax.numpy as jnp, metagrad as mg
      >>> g = jnp.array([[2.0, 0.0], [0.0, 1.0]])  # v̂ = (1, 1)/√2, projections √2 and 1/√2
      >>> tx = mg.config()
      >>> out, _ = tx.update(g, tx.init(jnp.zeros(2)))
      >>> [round(x, 4) for x in out.tolist()]
      [1.5, 1.5]

    References:
      Liu, Chu, Thuerey, `ConFIG: Towards Conflict-free Training of Physics Informed Neural
      Networks <https://arxiv.org/abs/2408.11104>`_, ICLR 2025 (Eq. 2).
    """

    def weights_fn(gram, state):
        num = gram.shape[0]
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
        inv_norms = _gram.safe_div(jnp.ones_like(norms), norms)
        cos = gram * inv_norms[:, None] * inv_norms[None, :]
        rtol = num * jnp.finfo(gram.dtype).eps
        pinv = jnp.linalg.pinv(cos, rtol=rtol, hermitian=True)
        a = inv_norms * jnp.matmul(pinv, jnp.ones((num,), gram.dtype), precision=_gram.EXACT)
        ga = jnp.matmul(gram, a, precision=_gram.EXACT)
        return a * _gram.safe_div(jnp.sum(ga), jnp.dot(a, ga)), state

    return _gram.gram_aggregator("config", weights_fn, axis_name=axis_name)
