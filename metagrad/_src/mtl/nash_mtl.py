"""Nash-MTL (Navon et al., 2022): the Nash bargaining solution between tasks.

Navon et al., `Multi-Task Learning as a Bargaining Game <https://arxiv.org/abs/2202.01017>`_,
ICML 2022.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from metagrad._src import checks as _checks
from metagrad._src.mtl import base as _aggregate
from metagrad._src.mtl import gram as _gram


class NashMTLState(NamedTuple):
    """State of `nash_mtl`."""

    count: chex.Array  # int32 scalar, calls so far
    alpha: chex.Array  # [T] the last bargaining solution (for the normalised Gram), warm start


def bargaining_solution(gram: jax.Array, alpha0: jax.Array, max_iters: int, tol) -> jax.Array:
    """α > 0 with G α = 1/α: damped Newton on the convex ½ αᵀGα − Σ log α_i.

    Its gradient is Gα − 1/α, so its minimiser is the bargaining solution. The function is
    self-concordant, so the damped step α + Δ/(1 + λ) (λ the Newton decrement) stays positive
    and converges from any positive start; the full step is taken once λ < 1/4. Stops when
    ‖Gα − 1/α‖ <= tol·‖1/α‖ or after `max_iters` steps.
    """

    def residual(alpha):
        return jnp.matmul(gram, alpha, precision=_gram.EXACT) - 1.0 / alpha

    def cond(carry):
        alpha, it = carry
        r = residual(alpha)
        return (it < max_iters) & (jnp.sqrt(jnp.dot(r, r)) > tol * jnp.linalg.norm(1.0 / alpha))

    def body(carry):
        alpha, it = carry
        hess = gram + jnp.diag(1.0 / alpha**2)
        delta = -jnp.linalg.solve(hess, residual(alpha))
        decrement = jnp.sqrt(jnp.maximum(-jnp.dot(residual(alpha), delta), 0.0))
        step = jnp.where(decrement < 0.25, 1.0, 1.0 / (1.0 + decrement))
        new = alpha + step * delta
        # Round-off guard: never leave the positive orthant.
        new = jnp.where(new > 0, new, 0.5 * alpha)
        return new, it + 1

    alpha, _ = jax.lax.while_loop(cond, body, (alpha0, jnp.zeros([], jnp.int32)))
    return alpha


def nash_mtl(
    num_tasks: int,
    *,
    max_norm: float = 1.0,
    update_weights_every: int = 1,
    max_iters: int = 20,
    tol: float = 1e-9,
    reg_eps: float = 1e-8,
    axis_name: Any = None,
) -> optax.GradientTransformation:
    """Nash-MTL: task weights α > 0 solving the bargaining condition G α = 1/α.

    The Nash bargaining solution over the ball of updates d = Σ α_i g_i: the paper (Navon et
    al., Claim 3.1) shows it is characterised by Gα = 1/α elementwise, i.e. ⟨g_i, d⟩ = 1/α_i for
    every task. As the paper's and TorchJD's code, α is solved for the Frobenius-normalised
    Gram matrix Ĝ = G / ‖G‖_F (+ `reg_eps`·I, so that a zero gradient keeps α finite), warm
    started from the previous step's α (initially ones); here by damped Newton on
    ½ αᵀĜα − Σ log α (a jittable iterative solver instead of the paper's sequence of cvxpy
    problems; it stops at ‖Ĝα − 1/α‖ <= `tol`·‖1/α‖, tighter than their stopping test). Then, as
    TorchJD's ``NashMTL`` and the official code's gradient clipping, if ‖d‖ = √(αᵀGα) exceeds
    `max_norm` > 0, α is scaled so that ‖d‖ = `max_norm`. With `update_weights_every` = k the
    weights are solved every k-th call and reused in between (TorchJD's ``update_weights_every``,
    the official ``update_weights_every``).

    Scale: TorchJD's (α for the normalised Gram, then clipped). Since Ĝα = 1/α gives
    ‖Σα_i g_i‖² = T·‖G‖_F, the unclipped update has norm √(T‖G‖_F); ``max_norm=0`` keeps it.

    Args:
      num_tasks: T (fixes the shape of the state).
      max_norm: the largest norm of the update; 0 disables the clipping.
      update_weights_every: solve every this many calls (>= 1).
      max_iters: Newton steps per solve.
      tol: stopping tolerance on the relative bargaining residual (in float32 the solver
        usually runs its `max_iters` steps).
      reg_eps: added to the diagonal of the normalised Gram matrix.
      axis_name: device axis over which the parameters are sharded, or None.

    Returns:
      An `optax.GradientTransformation` from per-task gradients (leaves ``[T, ...]``) to d, with
      state `NashMTLState`. On a non-finite step the state is kept.

    Example:
      >>> import jax.numpy as jnp, metagrad as mg
      >>> g = jnp.array([[1.0, 0.0], [0.0, 2.0]])  # Ĝ = diag(1, 4)/√17: α_i = 1/‖ĝ_i‖
      >>> tx = mg.nash_mtl(2, max_norm=0.0)
      >>> out, state = tx.update(g, tx.init(jnp.zeros(2)))
      >>> [round(x, 4) for x in (out / 17 ** 0.25).tolist()]
      [1.0, 1.0]

    References:
      Navon et al., `Multi-Task Learning as a Bargaining Game
      <https://arxiv.org/abs/2202.01017>`_, ICML 2022 (Algorithm 1).
    """
    num_tasks = _aggregate.num_tasks_arg(num_tasks)
    max_norm = _checks.hyperparameter("max_norm", max_norm, low=0, low_inclusive=True)
    every = _checks.positive_int("update_weights_every", update_weights_every)
    max_iters = _checks.positive_int("max_iters", max_iters)
    tol = _checks.hyperparameter("tol", tol, low=0)
    reg_eps = _checks.hyperparameter("reg_eps", reg_eps, low=0, low_inclusive=True)

    def init_state():
        dtype = jnp.result_type(float)
        return NashMTLState(count=jnp.zeros([], jnp.int32), alpha=jnp.ones((num_tasks,), dtype))

    def weights_fn(gram, state):
        def solve(_):
            fro = jnp.sqrt(jnp.sum(gram * gram))
            normalised = _gram.safe_div(gram, fro) + reg_eps * jnp.eye(num_tasks, dtype=gram.dtype)
            return bargaining_solution(normalised, state.alpha, max_iters, tol)

        alpha = jax.lax.cond(state.count % every == 0, solve, lambda _: state.alpha, None)
        norm = jnp.sqrt(jnp.maximum(jnp.dot(alpha, jnp.matmul(gram, alpha)), 0.0))
        clip = (max_norm > 0) & (norm > max_norm)
        weights = jnp.where(clip, alpha * (max_norm / jnp.where(clip, norm, 1.0)), alpha)
        return weights, NashMTLState(count=optax.safe_increment(state.count), alpha=alpha)

    return _gram.gram_aggregator(
        "nash_mtl", weights_fn, init_state=init_state, num_tasks=num_tasks,
        axis_name=axis_name, state_dtype=True,
    )  # fmt: skip
