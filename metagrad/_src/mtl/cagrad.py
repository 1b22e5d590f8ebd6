"""CAGrad (Liu et al., 2021): conflict-averse gradient descent.

Liu, Liu, Jin, Stone, Liu, `Conflict-Averse Gradient Descent for Multi-task Learning
<https://arxiv.org/abs/2110.14048>`_, NeurIPS 2021.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from metagrad._src import checks as _checks
from metagrad._src.mtl import gram as _gram
from metagrad._src.mtl import solvers as _solvers

_RESCALES = {"none": lambda c: 1.0, "c_squared": lambda c: 1.0 + c**2, "c": lambda c: 1.0 + c}


def cagrad(
    *,
    c: float = 0.4,
    rescale: str = "none",
    max_iters: int = 200,
    norm_eps: float = 1e-4,
    axis_name: Any = None,
) -> optax.GradientTransformation:
    """CAGrad: the direction in a ball around the mean gradient that helps the worst task most.

    With the mean gradient g₀ = (1/T) Σ g_i, CAGrad solves (Liu et al., Eq. 3)

    .. math::
      \\max_d \\min_i \\langle g_i, d\\rangle \\quad\\text{s.t.}\\quad
      \\|d - g_0\\| \\le c\\,\\|g_0\\|,

    through its dual over the simplex (their Algorithm 1): with g_w = Σ w_i g_i,

    .. math::
      w^* = \\arg\\min_{w \\in \\Delta} \\ \\langle g_w, g_0\\rangle + c\\|g_0\\|\\,\\|g_w\\|,
      \\qquad d = g_0 + \\frac{c\\|g_0\\|}{\\|g_{w^*}\\|}\\, g_{w^*}.

    Everything is on the Gram matrix: ⟨g_w, g₀⟩ = wᵀG1/T, ‖g_w‖² = wᵀGw. The dual is solved by
    FISTA on the simplex (`max_iters` steps; the paper and TorchJD use scipy / cvxpy) on the
    trace-normalised G, with √(‖g_w‖² + 1e-12) for the norm, then a few Newton steps on the
    face of the simplex FISTA found (kept if they lower the objective). c = 0 gives the mean
    gradient; as c → ∞ the direction tends to MGDA's.

    Scale (`rescale`): ``"none"`` (default) returns d itself, as TorchJD's ``CAGrad``;
    ``"c_squared"`` returns d / (1 + c²), the default of the official code and LibMTL
    (``rescale=1``); ``"c"`` returns d / (1 + c) (their ``rescale=2``). As TorchJD, when
    ‖g_w‖ < `norm_eps` (relative to the Frobenius norm of the stacked gradients: the task
    gradients are near Pareto-stationary) the update is zero.

    Args:
      c: radius of the ball relative to ‖g₀‖, >= 0 (the paper uses 0.4 / 0.5; c < 1 converges
        to a stationary point of the mean loss, c >= 1 to a Pareto-stationary point).
      rescale: ``"none"``, ``"c_squared"`` or ``"c"`` (above).
      max_iters: FISTA steps on the dual.
      norm_eps: the relative ‖g_w‖ below which the update is zero, and the trace below which
        the Gram matrix counts as zero.
      axis_name: device axis over which the parameters are sharded, or None.

    Returns:
      An `optax.GradientTransformation` from per-task gradients (leaves ``[T, ...]``) to d; its
      state is empty. `c` can be injected with `optax.inject_hyperparams`.

    Example:
      >>> import jax.numpy as jnp, metagrad as mg
      >>> g = jnp.array([[1.0, 0.0], [0.0, 1.0]])  # symmetric: d along the mean
      >>> tx = mg.cagrad(c=0.5)
      >>> out, _ = tx.update(g, tx.init(jnp.zeros(2)))
      >>> [round(x, 3) for x in out.tolist()]  # g0 = (.5, .5), |d - g0| = 0.5 |g0|
      [0.75, 0.75]

    References:
      Liu et al., `Conflict-Averse Gradient Descent for Multi-task Learning
      <https://arxiv.org/abs/2110.14048>`_, NeurIPS 2021 (Algorithm 1).
    """
    c = _checks.hyperparameter("c", c, low=0, low_inclusive=True)
    _checks.one_of("rescale", rescale, tuple(_RESCALES))
    max_iters = _checks.positive_int("max_iters", max_iters)
    norm_eps = _checks.hyperparameter("norm_eps", norm_eps, low=0, low_inclusive=True)

    def weights_fn(gram, state):
        num = gram.shape[0]
        scaled = _gram.trace_normalize(gram, norm_eps)
        mean = jnp.full((num,), 1.0 / num, gram.dtype)
        g0_dot = jnp.matmul(scaled, mean, precision=_gram.EXACT)  # <g_i, g0>
        radius = c * jnp.sqrt(jnp.maximum(jnp.dot(mean, g0_dot), 0.0))  # c ||g0||

        def dual(w):
            quad = jnp.dot(w, jnp.matmul(scaled, w, precision=_gram.EXACT))
            return jnp.dot(w, g0_dot) + radius * jnp.sqrt(jnp.maximum(quad, 0.0) + 1e-12)

        w = _solvers.simplex_minimize(dual, mean, max_iters)
        w = _solvers.polish_on_support(dual, w)
        gw_norm = jnp.sqrt(jnp.maximum(jnp.dot(w, jnp.matmul(scaled, w)), 0.0))
        ok = gw_norm >= norm_eps
        weights = mean + (radius / jnp.where(ok, gw_norm, 1.0)) * w
        weights = jnp.where(ok, weights, 0.0) / _RESCALES[rescale](c)
        return weights.astype(gram.dtype), state

    return _gram.gram_aggregator("cagrad", weights_fn, axis_name=axis_name)
