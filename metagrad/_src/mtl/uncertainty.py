"""Uncertainty weighting (Kendall et al., 2018) as an optax transformation over task gradients."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax.numpy as jnp
import optax

from metagrad._src import checks as _checks
from metagrad._src.mtl import base as _aggregate
from metagrad._src.mtl import losses as _losses
from metagrad._src.mtl import weighting as _weighting


class UncertaintyWeightingState(NamedTuple):
    """State of `uncertainty_weighting`."""

    count: chex.Array  # int32 scalar, calls so far
    log_vars: chex.Array  # [T] learned log-variances s_i = log sigma_i^2
    log_var_state: optax.OptState  # state of the optimizer of the log-variances


def uncertainty_weighting(
    num_tasks: int,
    *,
    learning_rate: float | optax.GradientTransformation = 0.025,
    init_log_var: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """Uncertainty weighting: task weights from learned homoscedastic log-variances.

    Kendall et al. minimise, jointly over the model θ and one log-variance s_i = log σ_i² per
    task (their eq. 7 for Gaussian likelihoods, in the log-variance form they train),

    .. math::
      \\mathcal L(θ, s) = \\sum_i \\tfrac12 e^{-s_i} L_i(θ) + \\tfrac12 s_i .

    Given the per-task gradients g_i = ∇_θ L_i and the losses L_i (``losses=``), the call returns
    the model's gradient of that objective, sum_i ½ e^{−s_i} g_i (with the current s), and steps
    the log-variances on ∂L/∂s_i = ½ (1 − e^{−s_i} L_i) with their own optimizer
    (`learning_rate`), which is the joint gradient step of the paper split into its two blocks.
    At the fixed point e^{s_i} = L_i: each task is weighted by the inverse of its loss.

    Scale: weights are ½ e^{−s_i} (½ at s = 0), as in the paper's regression form and LibMTL's
    ``UW`` (which starts at s = −0.5). The objective is unbounded below for a negative loss, so
    the losses must be >= 0.

    Args:
      num_tasks: T, the size of the leading task axis.
      learning_rate: a float (SGD on the log-variances with that step) or an optax optimizer
        for them. Default 0.025 (a choice; the paper trains s with the network's optimizer).
      init_log_var: the initial s_i (default 0: weights ½).

    Returns:
      An `optax.GradientTransformationExtraArgs`; call ``update(updates, state, params,
      losses=losses)`` with updates of leaves ``[T, ...]`` and losses of shape ``[T]``. Concrete
      negative losses raise a ValueError; a step with non-finite (or, traced, negative) losses or
      gradients returns a non-finite update and leaves the state unchanged, for
      ``optax.apply_if_finite`` after it.

    Example:
      >>> import jax.numpy as jnp, metagrad as mg
      >>> tx = mg.uncertainty_weighting(2, learning_rate=0.5)
      >>> state = tx.init(jnp.zeros(2))
      >>> g = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> out, state = tx.update(g, state, losses=jnp.array([3.0, 1.0]))
      >>> out.tolist(), state.log_vars.tolist()  # s_1 -= 0.5 * 0.5 * (1 - 3)
      ([0.5, 0.5], [0.5, 0.0])

    References:
      Kendall, Gal and Cipolla, `Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
      Geometry and Semantics <https://arxiv.org/abs/1705.07115>`_, CVPR 2018 (eq. 7).
    """
    num_tasks = _aggregate.num_tasks_arg(num_tasks)
    opt = _losses.optimizer(learning_rate)
    init_log_var = _checks.hyperparameter("init_log_var", init_log_var)

    def init_state(params):
        del params
        return _weighting.learned_state(
            UncertaintyWeightingState, num_tasks, opt, log_vars=init_log_var
        )

    def weights_fn(updates, losses, state, params):
        del updates, params
        s = state.log_vars
        precision = jnp.exp(-s)
        step, log_var_state = opt.update(0.5 * (1.0 - precision * losses), state.log_var_state, s)
        new_state = UncertaintyWeightingState(
            count=optax.safe_increment(state.count),
            log_vars=optax.apply_updates(s, step),
            log_var_state=log_var_state,
        )
        return 0.5 * precision, new_state

    return _weighting.loss_weighting(
        "uncertainty_weighting", init_state, weights_fn, num_tasks=num_tasks,
        sign=_losses.NONNEGATIVE,
    )  # fmt: skip
