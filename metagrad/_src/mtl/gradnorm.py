"""GradNorm (Chen et al., 2018) as an optax transformation over per-task gradients.

A baseline of Lee et al., `Sequential Reptile: Inter-Task Gradient Alignment for Multilingual
Learning <https://openreview.net/forum?id=ivQruFJXNI>`_ (ICLR 2022). The paper it implements:
Chen et al., `GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask
Networks <https://arxiv.org/abs/1711.02257>`_, ICML 2018.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from metagrad._src import checks as _checks
from metagrad._src.mtl import base as _aggregate
from metagrad._src.mtl import losses as _losses
from metagrad._src.mtl import weighting as _weighting

_WEIGHT_UPDATES = ("clip", "log")


class GradNormState(NamedTuple):
    """State of `gradnorm`."""

    count: chex.Array  # int32 scalar, calls so far
    weights: chex.Array  # [T] task weights w_i(t), summing to T
    initial_losses: chex.Array  # [T] L_i(0), recorded at the first call
    weight_state: optax.OptState  # state of the optimizer of the weights


def gradnorm(
    num_tasks: int,
    *,
    alpha: float = 1.5,
    learning_rate: float | optax.GradientTransformation = 0.025,
    norm_mask: Any | Callable[[Any], Any] | None = None,
    reduction: str = "sum",
    weight_update: str = "clip",
    min_weight: float = 1e-3,
) -> optax.GradientTransformationExtraArgs:
    """GradNorm: task weights learned so that weighted gradient norms train at equal rates.

    With task weights w_i (initially 1), per-task gradients g_i and losses L_i (``losses=``):

    .. math::
      G_i = w_i \\|g_i\\|,\\quad \\bar G = \\tfrac1T \\sum_i G_i,\\quad
      \\tilde L_i = L_i(t)/L_i(0),\\quad r_i = \\tilde L_i / \\tfrac1T\\sum_j \\tilde L_j,

      L_{grad} = \\sum_i |G_i - \\bar G\\, r_i^{\\alpha}|,

    with the targets Ḡ r_i^α held constant, so ∂L_grad/∂w_i = sign(G_i − Ḡ r_i^α)·‖g_i‖. The
    call returns g = sum_i w_i(t) g_i (the current weights, as in the paper's Algorithm 1), then
    steps the weights on ∂L_grad/∂w with `learning_rate` and renormalises them to sum to T. A task
    whose weighted gradient norm is below its target (it trains too slowly, or its gradient is
    small) gets its weight increased.

    The weights must stay positive (a negative w_i turns the update into gradient ascent on task
    i), which the paper's additive step does not ensure: with task gradient norms far apart, one
    step of size lr·‖g_i‖ can exceed w_i. The paper is silent on this, so `weight_update` chooses:

    - ``"clip"`` (default): the paper's step w_i − lr·∂L_grad/∂w_i, then clipped to at least
      `min_weight` before the renormalisation. Identical to the paper while no weight reaches
      the floor.
    - ``"log"``: the weight optimizer steps s_i = log w_i on the gradient w_i·∂L_grad/∂w_i (with
      SGD, the multiplicative update w_i·exp(−lr·sign(G_i − Ḡ r_i^α)·G_i)); positive by
      construction, and the renormalisation makes w = T·softmax(s). Its steps are relative
      (a weight moves by a factor), so it has no floor to choose but needs its own `learning_rate`.

    The paper measures ‖g_i‖ on the last shared layer W. Here the norms are over the per-task
    gradients given, i.e. the whole model by default; `norm_mask` restricts them to a subset of
    the leaves (e.g. the last shared layer). L_i(0) is the `losses` of the first call. The losses
    must be positive (r_i is a ratio of losses); shift losses that can be negative.

    Args:
      num_tasks: T, the size of the leading task axis.
      alpha: the asymmetry α >= 0 (0 equalises norms; the paper uses 0.12 to 3, default 1.5).
      learning_rate: a float (SGD on the weights with that step) or an optax optimizer for the
        weights. Default 0.025 (a choice).
      norm_mask: None (whole model), a pytree of bools with the structure of params, or a
        callable mapping params to one; leaves marked True enter ‖g_i‖.
      reduction: ``"sum"`` (default: sum_i w_i g_i with sum_i w_i = T) or ``"mean"`` (divided
        by T).
      weight_update: ``"clip"`` (default) or ``"log"``, how the weights are kept positive (above).
      min_weight: the floor of ``"clip"``, in (0, 1) (weights average 1). Default 1e-3.

    Returns:
      An `optax.GradientTransformationExtraArgs`; call ``update(updates, state, params,
      losses=losses)`` with updates of leaves ``[T, ...]`` and losses of shape ``[T]``, which must
      be > 0. Concrete non-positive losses raise a ValueError; a step whose task gradients or
      losses are not all finite (or, traced, not all positive) returns a non-finite update (for
      ``optax.apply_if_finite`` after it to skip) and leaves the state unchanged. Works under
      `optax.inject_hyperparams` (``static_args=("num_tasks", "norm_mask")``) with `alpha`,
      `learning_rate` and `min_weight` injected.

    Example:
      >>> import jax.numpy as jnp, metagrad as mg
      >>> tx = mg.gradnorm(num_tasks=2, alpha=1.0, learning_rate=0.1)
      >>> state = tx.init(jnp.zeros(2))
      >>> g = jnp.array([[4.0, 0.0], [0.0, 1.0]])  # task 2's gradient is smaller
      >>> out, state = tx.update(g, state, losses=jnp.array([1.0, 1.0]))
      >>> out.tolist(), [round(float(w), 2) for w in state.weights]
      ([4.0, 1.0], [0.71, 1.29])

    References:
      Chen et al., `GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
      Multitask Networks <https://arxiv.org/abs/1711.02257>`_, ICML 2018 (Algorithm 1).
    """
    num_tasks = _aggregate.num_tasks_arg(num_tasks)
    alpha = _checks.hyperparameter("alpha", alpha, low=0, low_inclusive=True)
    weight_opt = _losses.optimizer(learning_rate)
    _aggregate.check_reduction(reduction)
    _checks.one_of("weight_update", weight_update, _WEIGHT_UPDATES)
    min_weight = _checks.hyperparameter(
        "min_weight", min_weight, low=0, high=1, high_inclusive=False
    )
    _checks.bool_mask("norm_mask", norm_mask)

    def init_state(params):
        del params
        # The initial losses are recorded at the first call.
        return _weighting.learned_state(
            GradNormState, num_tasks, weight_opt, weights=1.0, initial_losses=1.0
        )

    def task_norms(updates, params):
        if norm_mask is None:
            selected = jax.tree.leaves(updates)
        else:
            if callable(norm_mask) and params is None:
                raise ValueError("gradnorm with a callable norm_mask needs params in update")
            # A mask of params' structure, applied to the updates (a task axis more per leaf).
            reference = updates if params is None else params
            flags = _checks.mask_flags("norm_mask", norm_mask, reference)
            selected = [u for u, m in zip(jax.tree.leaves(updates), flags, strict=True) if m]
            if not selected:
                raise ValueError("norm_mask selects no leaf; mark at least one leaf True")
        return _weighting.task_norms(selected, num_tasks)

    def weights_fn(updates, losses, state, params):
        dtype = state.weights.dtype
        losses = losses.astype(dtype)
        norms = jax.lax.stop_gradient(task_norms(updates, params).astype(dtype))
        weights = state.weights

        initial = jnp.where(state.count == 0, losses, state.initial_losses)
        ratio = losses / initial
        inverse_rate = ratio / jnp.mean(ratio)
        weighted = weights * norms
        target = jnp.mean(weighted) * inverse_rate**alpha
        # d/dw_i |w_i n_i - target_i| with the target held constant.
        grad_w = jnp.sign(weighted - target) * norms
        if weight_update == "clip":
            step, weight_state = weight_opt.update(grad_w, state.weight_state, weights)
            new_weights = jnp.maximum(optax.apply_updates(weights, step), min_weight)
        else:
            # Chain rule through w = exp(s): dL/ds_i = w_i dL/dw_i.
            logs = jnp.log(weights)
            step, weight_state = weight_opt.update(weights * grad_w, state.weight_state, logs)
            new_logs = optax.apply_updates(logs, step)
            new_weights = jnp.exp(new_logs - jnp.max(new_logs))
        new_weights = new_weights * (num_tasks / jnp.sum(new_weights))
        new_state = GradNormState(
            count=optax.safe_increment(state.count),
            weights=new_weights,
            initial_losses=initial,
            weight_state=weight_state,
        )
        # The update uses the current weights (Algorithm 1); a non-finite loss makes it
        # non-finite, so that the guard skips the step.
        return weights, new_state

    return _weighting.loss_weighting(
        "gradnorm", init_state, weights_fn, num_tasks=num_tasks, sign=_losses.POSITIVE,
        reduction=reduction,
    )  # fmt: skip
