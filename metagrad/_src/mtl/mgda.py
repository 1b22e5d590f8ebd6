"""MGDA (Sener & Koltun, 2018): the minimum-norm point of the convex hull of the task gradients.

Sener & Koltun, `Multi-Task Learning as Multi-Objective Optimization
<https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018 (after Désidéri's multiple-gradient descent).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from metagrad._src import checks as _checks
from metagrad._src.mtl import gram as _gram
from metagrad._src.mtl import solvers as _solvers

_SOLVERS = ("fista", "frank_wolfe")


def mgda(
    *,
    solver: str = "fista",
    max_iters: int | None = None,
    tol: float = 1e-3,
    axis_name: Any = None,
) -> optax.GradientTransformation:
    """MGDA: the minimum-norm point of the convex hull of the task gradients.

    .. math::
      \\alpha^* = \\arg\\min_{\\alpha \\ge 0,\\ \\sum_i \\alpha_i = 1}
        \\Big\\|\\sum_i \\alpha_i g_i\\Big\\|^2 = \\arg\\min \\alpha^\\top G \\alpha,
      \\qquad d = \\sum_i \\alpha^*_i g_i .

    d is a common descent direction (⟨g_i, d⟩ >= ‖d‖² for every task, Désidéri 2012) and d = 0
    exactly at a Pareto-stationary point. With two tasks the weight has the closed form
    α₁ = clip(⟨g₂ − g₁, g₂⟩ / ‖g₁ − g₂‖², 0, 1) (the paper's Algorithm 1).

    The weights are computed from the Gram matrix G (T x T) alone. Scale: the weights sum to 1
    (d is a point of the hull), as TorchJD's ``MGDA`` and the paper; LibMTL's MGDA too (with its
    default ``mgda_gn="none"``).

    Solvers:

    - ``"fista"`` (default): accelerated projected gradient on the simplex (`max_iters`
      default 200), then the KKT system solved exactly on the support it found (kept when it
      lowers the norm): the exact min-norm point up to round-off once FISTA has found the
      support (not always so near a Pareto-stationary point, where the norm tends to 0).
    - ``"frank_wolfe"``: the paper's Algorithm 2 (Frank-Wolfe with the exact line search), and
      TorchJD's ``MGDA(epsilon=tol, max_iters)`` step for step: stops after a step γ < `tol`
      (default 1e-3) or `max_iters` (default 100) steps. Cheaper but coarse: Frank-Wolfe
      converges as O(1/k).

    MGDA-UB (the paper's upper bound: the Gram matrix of the gradients with respect to the
    shared representation instead of the shared parameters) is not provided.

    Args:
      solver: ``"fista"`` or ``"frank_wolfe"``.
      max_iters: iterations of the solver (default 200 for FISTA, 100 for Frank-Wolfe).
      tol: Frank-Wolfe's stopping step size (ignored by FISTA).
      axis_name: device axis over which the parameters are sharded (the Gram matrix is summed
        over it; only T x T numbers cross devices), or None.

    Returns:
      An `optax.GradientTransformation` from per-task gradients (leaves ``[T, ...]``) to d; its
      state is empty.

    Example:
      >>> import jax.numpy as jnp, metagrad as mg
      >>> g = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> tx = mg.mgda()
      >>> out, _ = tx.update(g, tx.init(jnp.zeros(2)))
      >>> [round(x, 4) for x in out.tolist()]
      [0.5, 0.5]

    References:
      Sener & Koltun, `Multi-Task Learning as Multi-Objective Optimization
      <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018 (Algorithms 1 and 2).
    """
    _checks.one_of("solver", solver, _SOLVERS)
    if max_iters is None:
        max_iters = 200 if solver == "fista" else 100
    max_iters = _checks.positive_int("max_iters", max_iters)
    tol = _checks.hyperparameter("tol", tol, low=0, low_inclusive=True)

    def weights_fn(gram, state):
        if solver == "frank_wolfe":
            return _solvers.frank_wolfe_min_norm(gram, max_iters, tol), state
        # FISTA on the trace-normalised Gram matrix (same minimiser, step sizes near 1).
        scaled = _gram.trace_normalize(gram, 0.0)
        num = gram.shape[0]
        alpha0 = jnp.full((num,), 1.0 / num, gram.dtype)
        objective = lambda a: jnp.dot(a, jnp.matmul(scaled, a, precision=_solvers.EXACT))
        alpha = _solvers.simplex_minimize(objective, alpha0, max_iters)
        return _solvers.polish_on_support(objective, alpha, steps=1), state

    return _gram.gram_aggregator("mgda", weights_fn, axis_name=axis_name)
