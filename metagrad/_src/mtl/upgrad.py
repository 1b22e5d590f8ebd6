"""UPGrad (Quinton & Rey, 2024): each task gradient projected onto the dual cone, averaged.

Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
<https://arxiv.org/abs/2406.16232>`_, 2024 (TorchJD).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypedDict

import jax
import jax.numpy as jnp
import optax

from metagrad._src import checks as _checks
from metagrad._src.mtl import base as _aggregate
from metagrad._src.mtl import gram as _gram
from metagrad._src.mtl import solvers as _solvers
from metagrad._src.options import KeywordGroup, Unpack


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


class DualConeOptions(TypedDict, total=False):
    """The keywords of `upgrad` and `dualproj`, the aggregators that project onto the dual cone
    with `dual_cone_weights` (TorchJD's regularisation; defaults TorchJD's).

    Keyword Args:
      reduction: ``"mean"`` (default) or ``"sum"``, the scale (above).
      norm_eps: trace of G below which it counts as zero (default 1e-4).
      reg_eps: added to the diagonal of the normalised Gram matrix (default 1e-4).
      axis_name: device axis over which the parameters are sharded, or None (default).
    """

    reduction: str
    norm_eps: float
    reg_eps: float
    axis_name: Any


dual_cone_options = KeywordGroup(
    DualConeOptions, {"reduction": "mean", "norm_eps": 1e-4, "reg_eps": 1e-4, "axis_name": None}
)


def dual_cone(
    name: str, targets: Callable[[int, Any], jax.Array], options: Mapping[str, Any]
) -> optax.GradientTransformation:
    """The aggregator ``d = Jᵀ sum_k v_k``, v_k the dual-cone weights of the rows u_k of
    ``targets(T, dtype)`` ([T] or [k, T], scaled by the reduction): the checks of the shared
    keywords ``options`` and the Gram-path plumbing of `upgrad` and `dualproj` (``name``)."""
    opts = dual_cone_options.resolve(name, options)
    _aggregate.check_reduction(opts.reduction)
    norm_eps = _checks.hyperparameter("norm_eps", opts.norm_eps, low=0, low_inclusive=True)
    reg_eps = _checks.hyperparameter("reg_eps", opts.reg_eps, low=0, low_inclusive=True)

    def weights_fn(gram, state):
        num = gram.shape[0]
        rows = _aggregate.reduce(targets(num, gram.dtype), opts.reduction, num)
        weights = dual_cone_weights(gram, rows, norm_eps, reg_eps)
        return (weights if weights.ndim == 1 else jnp.sum(weights, axis=0)), state

    return _gram.gram_aggregator(name, weights_fn, axis_name=opts.axis_name)


@dual_cone_options
def upgrad(**options: Unpack[DualConeOptions]) -> optax.GradientTransformation:
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
      **options: the keywords of the dual-cone aggregators, `DualConeOptions`.

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
    # Each task gradient is projected: the rows of the identity.
    return dual_cone("upgrad", lambda num, dtype: jnp.eye(num, dtype=dtype), options)
