"""UPGrad (Quinton & Rey, 2024): each task gradient projected onto the dual cone, averaged.

Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
<https://arxiv.org/abs/2406.16232>`_, 2024 (TorchJD).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from metagrad._src import checks as _checks
from metagrad._src.mtl import base as _aggregate
from metagrad._src.mtl import gram as _gram
from metagrad._src.mtl import solvers as _solvers


def dual_cone_weights(gram: jax.Array, u: jax.Array, norm_eps, reg_eps) -> jax.Array:
    """Weights v of the projection Jᵀv of Jᵀu onto the dual cone {d: Jd >= 0}.

    By Quinton & Rey's Proposition 1 the projection is Jᵀv with v = argmin_{v >= u} vᵀGv, here
    on the regularised, trace-normalised Gram matrix G/tr(G) + reg_eps·I (TorchJD's), written
    v = u + z with z >= 0 for `solvers.nonneg_qp`. `u` is [T] or [k, T] (k projections).
    """
    num = gram.shape[0]
    reg = _gram.trace_normalize(gram, norm_eps) + reg_eps * jnp.eye(num, dtype=gram.dtype)

    def one(u_row):
        lin = jnp.matmul(reg, u_row, precision=_gram.EXACT)
        return u_row + _solvers.nonneg_qp(reg, lin)

    return one(u) if u.ndim == 1 else jax.vmap(one)(u)


def check_eps(norm_eps, reg_eps):
    return (
        _checks.hyperparameter("norm_eps", norm_eps, low=0, low_inclusive=True),
        _checks.hyperparameter("reg_eps", reg_eps, low=0, low_inclusive=True),
    )


def upgrad(
    *,
    reduction: str = "mean",
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    axis_name: Any = None,
) -> optax.GradientTransformation:
    """UPGrad: project every task gradient onto the dual cone of all of them; average.

    The dual cone of the task gradients is {d : ⟨g_i, d⟩ >= 0 for every i}: the directions
    that conflict with no task. UPGrad (Quinton & Rey, Eq. 5) returns

    .. math::
      d = \\frac1T \\sum_i \\pi_J(g_i), \\qquad
      \\pi_J(x) = \\arg\\min_{y:\\ J y \\ge 0} \\|y - x\\|,

    in the cone itself (a sum of its points), so ⟨g_i, d⟩ >= 0 for every task, and equal to the
    mean when no two tasks conflict. Each projection is computed from the Gram matrix
    (Proposition 1): π_J(Jᵀu) = Jᵀv with v = argmin_{v >= u} vᵀGv, a T-dimensional QP solved
    exactly by an active-set method (no QP library). As TorchJD the QP uses G/tr(G) + `reg_eps`·I
    (positive definite; tr(G) < `norm_eps` counts as G = 0). Then the conflict-freeness holds
    up to that regularisation: ⟨g_i, d⟩ >= −reg_eps·tr(G)·v_i; ``reg_eps=0`` makes it exact
    when the task gradients are linearly independent.

    Scale (`reduction`): ``"mean"`` (default, TorchJD's ``UPGrad``, the paper's Eq. 5) or
    ``"sum"`` (T times larger: the sum of the projections).

    Args:
      reduction: ``"mean"`` or ``"sum"``.
      norm_eps: trace of G below which it counts as zero (TorchJD's, 1e-4).
      reg_eps: added to the diagonal of the normalised Gram matrix (TorchJD's, 1e-4).
      axis_name: device axis over which the parameters are sharded, or None.

    Returns:
      The UPGrad transformation: per-task gradients (leaves ``[T, ...]``) in, the mean of
      their dual-cone projections out; no state.

    Example:
      >>> import jax.numpy as jnp, metagrad as mg
      >>> g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])  # conflicting
      >>> tx = mg.upgrad(reg_eps=0.0)
      >>> out, _ = tx.update(g, tx.init(jnp.zeros(2)))
      >>> [round(x, 4) for x in out.tolist()]  # mean of (.5, .5) and (0, 1)
      [0.25, 0.75]

    References:
      Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
      <https://arxiv.org/abs/2406.16232>`_, 2024 (Eq. 5, Proposition 1).
    """
    _aggregate.check_reduction(reduction)
    norm_eps, reg_eps = check_eps(norm_eps, reg_eps)

    def weights_fn(gram, state):
        num = gram.shape[0]
        rows = _aggregate.reduce(jnp.eye(num, dtype=gram.dtype), reduction, num)
        return jnp.sum(dual_cone_weights(gram, rows, norm_eps, reg_eps), axis=0), state

    return _gram.gram_aggregator("upgrad", weights_fn, axis_name=axis_name)
