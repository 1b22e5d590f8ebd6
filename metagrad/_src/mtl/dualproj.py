"""DualProj (Quinton & Rey, 2024; after GEM): the mean gradient projected onto the dual cone.

Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
<https://arxiv.org/abs/2406.16232>`_, 2024 (TorchJD); the projection is Lopez-Paz & Ranzato's,
`Gradient Episodic Memory for Continual Learning <https://arxiv.org/abs/1706.08840>`_, 2017.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from metagrad._src.mtl.upgrad import DualConeOptions, dual_cone, dual_cone_options
from metagrad._src.options import Unpack


@dual_cone_options
def dualproj(**options: Unpack[DualConeOptions]) -> optax.GradientTransformation:
    """DualProj: the mean task gradient projected onto the dual cone of the task gradients.

    .. math::
      d = \\pi_J\\Big(\\frac1T\\sum_i g_i\\Big), \\qquad
      \\pi_J(x) = \\arg\\min_{y:\\ \\langle g_i, y\\rangle \\ge 0\\ \\forall i} \\|y - x\\|,

    the projection of GEM (Lopez-Paz & Ranzato, Eq. 11), as TorchJD's ``DualProj``. Computed from
    the Gram matrix as in `upgrad` (π_J(Jᵀu) = Jᵀv, v = argmin_{v >= u} vᵀGv, one T-dimensional
    QP solved exactly by an active-set method; the same `norm_eps` / `reg_eps` regularisation).
    ⟨g_i, d⟩ >= 0 for every task (exactly with ``reg_eps=0`` and independent gradients); the
    mean itself when it conflicts with no task.

    Scale (`reduction`): ``"mean"`` (default, TorchJD) projects the mean; ``"sum"`` the sum.

    Args:
      **options: the keywords of the dual-cone aggregators, as `upgrad`'s.

    Returns:
      The DualProj transformation: per-task gradients (leaves ``[T, ...]``) in, the mean
      projected onto the dual cone out; no state.

    Example:
      >>> import jax.numpy as jnp, metagrad as mg
      >>> g = jnp.array([[1.0, 0.0], [-2.0, 0.5]])  # the mean (-.5, .25) conflicts with g_1
      >>> tx = mg.dualproj(reg_eps=0.0)
      >>> out, _ = tx.update(g, tx.init(jnp.zeros(2)))
      >>> [round(x, 4) for x in out.tolist()]  # projected onto <g_1, d> = 0
      [0.0, 0.25]

    References:
      Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
      <https://arxiv.org/abs/2406.16232>`_, 2024; Lopez-Paz & Ranzato, `Gradient Episodic
      Memory for Continual Learning <https://arxiv.org/abs/1706.08840>`_, NeurIPS 2017.
    """
    # The mean (or sum) of the task gradients is projected: one row of ones.
    return dual_cone("dualproj", lambda num, dtype: jnp.ones((num,), dtype), options)
