"""DB-MTL (Lin et al., 2023) as an optax transformation over per-task gradients."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from metagrad._src import checks as _checks
from metagrad._src.mtl import base as _aggregate
from metagrad._src.mtl import losses as _losses
from metagrad._src.mtl import weighting as _weighting


class DBMTLState(NamedTuple):
    """State of `db_mtl`."""

    count: chex.Array  # int32 scalar, calls so far
    buffer: Any  # params' structure, leaves [T, *shape]: the EMA of the log-loss gradients


def db_mtl(
    num_tasks: int,
    *,
    beta: float = 0.9,
    beta_sigma: float = 0.0,
    reduction: str = "sum",
) -> optax.GradientTransformationExtraArgs:
    """DB-MTL: dual balancing, of loss scales (log losses) and of gradient magnitudes.

    Loss-scale balancing trains on log ℓ_i, whose gradient is g_i / ℓ_i (g_i the task
    gradient, ℓ_i the loss, ``losses=``). Gradient-magnitude balancing keeps an exponential
    moving average of those gradients (from zeros, without bias correction, as the authors'
    code) and rescales every task's average to the largest norm among them:

    .. math::
      \\hat g_i \\leftarrow β_t \\hat g_i + (1-β_t)\\, g_i/\\ell_i,\\quad β_t = β / t^{σ},
      \\qquad d = \\sum_i \\frac{\\max_j \\|\\hat g_j\\|}{\\|\\hat g_i\\|}\\, \\hat g_i,

    norms over the whole model (all leaves given), t = 1, 2, ... the call number. A task whose
    average is zero gets weight 0 (the authors divide by ‖ĝ_i‖ + 1e-8).

    Args:
      num_tasks: T, the size of the leading task axis.
      beta: β in [0, 1) (default 0.9, the authors').
      beta_sigma: σ >= 0, the decay of β over calls (default 0, the authors').
      reduction: ``"sum"`` (default, the paper's d) or ``"mean"`` (d / T).

    Returns:
      An `optax.GradientTransformationExtraArgs`; call ``update(updates, state, params,
      losses=losses)`` with updates of leaves ``[T, ...]`` and losses of shape ``[T]``, which must
      be > 0 (log losses). The state holds one average per task (T times the params' size).
      Concrete non-positive losses raise a ValueError; a step with non-finite (or, traced,
      non-positive) losses or gradients returns a non-finite update and leaves the state
      unchanged, for ``optax.apply_if_finite`` after it.

    Example:
      >>> import jax.numpy as jnp, metagrad as mg
      >>> tx = mg.db_mtl(2, beta=0.0)  # no averaging: the current log-loss gradients
      >>> g = jnp.array([[4.0, 0.0], [0.0, 1.0]])
      >>> out, _ = tx.update(g, tx.init(jnp.zeros(2)), losses=jnp.array([2.0, 1.0]))
      >>> out.tolist()  # g_1 / 2 and g_2 / 1, both scaled to the larger norm, 2
      [2.0, 2.0]

    References:
      Lin et al., `Dual-Balancing for Multi-Task Learning <https://arxiv.org/abs/2308.12029>`_,
      2023 (Algorithm 1).
    """
    num_tasks = _aggregate.num_tasks_arg(num_tasks)
    beta = _checks.hyperparameter("beta", beta, low=0, low_inclusive=True, high=1,
                                  high_inclusive=False)  # fmt: skip
    beta_sigma = _checks.hyperparameter("beta_sigma", beta_sigma, low=0, low_inclusive=True)
    _aggregate.check_reduction(reduction)

    def init_state(params):
        def zeros(p):
            dtype = jnp.promote_types(jnp.result_type(p), jnp.float32)
            return jnp.zeros((num_tasks, *jnp.shape(p)), dtype)

        return DBMTLState(count=jnp.zeros([], jnp.int32), buffer=jax.tree.map(zeros, params))

    def weights_fn(updates, losses, state, params):
        del params
        if jax.tree.structure(state.buffer) != jax.tree.structure(updates):
            raise ValueError(
                "updates must have the tree structure of the params given to init; got "
                f"{jax.tree.structure(updates)}, expected {jax.tree.structure(state.buffer)}"
            )
        count = optax.safe_increment(state.count)
        beta_t = beta / count.astype(losses.dtype) ** beta_sigma

        def average(b, g):
            scale = (1.0 / losses).reshape((num_tasks,) + (1,) * (g.ndim - 1))
            log_grad = g.astype(b.dtype) * scale.astype(b.dtype)
            return log_grad + beta_t.astype(b.dtype) * (b - log_grad)

        buffer = jax.tree.map(average, state.buffer, updates)
        norms = _weighting.task_norms(jax.tree.leaves(buffer), num_tasks).astype(losses.dtype)
        alpha = jnp.where(norms > 0, jnp.max(norms) / jnp.where(norms > 0, norms, 1.0), 0.0)
        return alpha, DBMTLState(count=count, buffer=buffer)

    # The combined vectors are the averaged log-loss gradients of the state.
    return _weighting.loss_weighting(
        "db_mtl", init_state, weights_fn, num_tasks=num_tasks, sign=_losses.POSITIVE,
        reduction=reduction, vectors=lambda state: state.buffer,
    )  # fmt: skip
