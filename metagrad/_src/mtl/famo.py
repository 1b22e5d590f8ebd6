"""FAMO (Liu et al., 2023) as an optax transformation over per-task gradients."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from metagrad._src import checks as _checks
from metagrad._src.mtl import base as _aggregate
from metagrad._src.mtl import losses as _losses
from metagrad._src.mtl import weighting as _weighting


class FAMOState(NamedTuple):
    """State of `famo`."""

    count: chex.Array  # int32 scalar, calls so far
    logits: chex.Array  # [T] task logits ξ; the task weights are z = softmax(ξ)
    prev_losses: chex.Array  # [T] the losses of the previous call
    logit_state: optax.OptState  # state of the optimizer of the logits


def famo(
    num_tasks: int,
    *,
    learning_rate: float | optax.GradientTransformation = 0.025,
    weight_decay: float = 1e-3,
    reduction: str = "mean",
) -> optax.GradientTransformationExtraArgs:
    """FAMO: fast adaptive multitask optimization, balanced log-loss descent with O(1) cost.

    With task logits ξ (initially 0), z = softmax(ξ) and the per-task losses ℓ_i (``losses=``),
    the update direction of the paper's Algorithm 1 is

    .. math::
      d = c \\sum_i \\frac{z_i}{\\ell_i} g_i,
      \\qquad c = \\Big(\\sum_i \\frac{z_i}{\\ell_i}\\Big)^{-1},

    (a convex combination of the task gradients; z_i / ℓ_i g_i = z_i ∇ log ℓ_i). The logits then
    learn from how much each log-loss actually decreased: with δ_i = log ℓ_i(before) −
    log ℓ_i(after), the step is ξ ← ξ − β (J_zᵀ δ + γ ξ), J_z the Jacobian of softmax, i.e.
    (J_zᵀ δ)_i = z_i (δ_i − Σ_j z_j δ_j).

    The paper measures ℓ(after) at the new parameters, which a gradient transformation does not
    see. Here each call first steps the logits with δ = log ℓ(previous call) − log ℓ(this call),
    then returns d for this call's losses with the updated weights. This is the paper's update
    with the "after" losses taken on the next batch instead of re-evaluated on the previous
    one (no extra forward pass), and the order the authors' own toy trainer uses (update the
    logits with the current losses, then weight them); the first call does not step the logits.

    Args:
      num_tasks: T, the size of the leading task axis.
      learning_rate: β: a float (SGD on the logits with that step, the paper's Algorithm 1) or
        an optax optimizer for them (the authors' code and LibMTL use
        ``optax.adam(0.025)``). Default 0.025.
      weight_decay: γ >= 0, added as γ ξ to the logits' gradient (default 1e-3, the authors').
      reduction: ``"mean"`` (default, the paper's: the coefficients c z_i / ℓ_i sum to 1) or
        ``"sum"`` (multiplied by T).

    Returns:
      An `optax.GradientTransformationExtraArgs`; call ``update(updates, state, params,
      losses=losses)`` with updates of leaves ``[T, ...]`` and losses of shape ``[T]``, which must
      be > 0 (shift losses by a known lower bound, as the authors' ``min_losses``). Concrete
      non-positive losses raise a ValueError; a step with non-finite (or, traced, non-positive)
      losses or gradients returns a non-finite update and leaves the state unchanged, for
      ``optax.apply_if_finite`` after it.

    Example:
      >>> import jax.numpy as jnp, metagrad as mg
      >>> tx = mg.famo(2)
      >>> g = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> out, state = tx.update(g, tx.init(jnp.zeros(2)), losses=jnp.array([1.0, 3.0]))
      >>> out.tolist()  # z = (1/2, 1/2): the weights are proportional to 1/loss
      [0.75, 0.25]

    References:
      Liu et al., `FAMO: Fast Adaptive Multitask Optimization
      <https://arxiv.org/abs/2306.03792>`_, NeurIPS 2023 (Algorithm 1).
    """
    num_tasks = _aggregate.num_tasks_arg(num_tasks)
    opt = _losses.optimizer(learning_rate)
    weight_decay = _checks.hyperparameter("weight_decay", weight_decay, low=0, low_inclusive=True)
    _aggregate.check_reduction(reduction)

    def init_state(params):
        del params
        return _weighting.learned_state(FAMOState, num_tasks, opt, logits=0.0, prev_losses=1.0)

    def weights_fn(updates, losses, state, params):
        del updates, params
        xi = state.logits
        # The logits' step on the decrease of the log-losses since the previous call.
        delta = jnp.log(state.prev_losses) - jnp.log(losses)
        z = jax.nn.softmax(xi)
        grad = z * (delta - jnp.dot(z, delta)) + weight_decay * xi
        step, logit_state = opt.update(grad, state.logit_state, xi)
        first = state.count == 0
        xi = jnp.where(first, xi, optax.apply_updates(xi, step))
        logit_state = jax.tree.map(
            lambda old, new: jnp.where(first, old, new), state.logit_state, logit_state
        )
        scaled = jax.nn.softmax(xi) / losses
        new_state = FAMOState(
            count=optax.safe_increment(state.count),
            logits=xi,
            prev_losses=losses,
            logit_state=logit_state,
        )
        return num_tasks * scaled / jnp.sum(scaled), new_state

    return _weighting.loss_weighting(
        "famo", init_state, weights_fn, num_tasks=num_tasks, sign=_losses.POSITIVE,
        reduction=reduction,
    )  # fmt: skip
