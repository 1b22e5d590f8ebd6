"""Dynamic Weight Average (Liu et al., 2019) as an optax transformation over task gradients."""

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


class DWAState(NamedTuple):
    """State of `dwa`."""

    count: chex.Array  # int32 scalar, calls so far
    periods: chex.Array  # int32 scalar, periods (epochs) completed
    loss_sum: chex.Array  # [T] sum of the losses of the current period
    last: chex.Array  # [T] mean loss of the last completed period, L(t-1)
    before_last: chex.Array  # [T] mean loss of the period before, L(t-2)


def dwa(
    num_tasks: int,
    *,
    temperature: float = 2.0,
    period: int = 1,
    reduction: str = "sum",
) -> optax.GradientTransformationExtraArgs:
    """Dynamic Weight Average: tasks whose loss decreases slowly get larger weights.

    With L_k(t) the mean loss of task k over period t (an epoch in the paper) and the descent
    rates r_k(t−1) = L_k(t−1) / L_k(t−2), the weights used during period t are

    .. math::
      w_k(t) = T\\,\\frac{\\exp(r_k(t-1)/\\tau)}{\\sum_i \\exp(r_i(t-1)/\\tau)},

    and w_k(t) = 1 for the first two periods. The call returns sum_k w_k(t) g_k and adds the
    losses (``losses=``) to the running mean of the current period; after `period` calls the
    period closes. ``period=1`` (default) updates the weights from the losses of the last two
    calls; set it to the number of steps of an epoch for the paper's (and LibMTL's) epoch-level
    averages.

    Args:
      num_tasks: T, the size of the leading task axis.
      temperature: τ > 0 (default 2, the paper's); larger τ gives more uniform weights.
      period: calls per period (epoch), an int >= 1 (default 1).
      reduction: ``"sum"`` (default, the paper's: weights sum to T) or ``"mean"`` (divided by T).

    Returns:
      An `optax.GradientTransformationExtraArgs`; call ``update(updates, state, params,
      losses=losses)`` with updates of leaves ``[T, ...]`` and losses of shape ``[T]``, which must
      be > 0 (ratios of losses). Concrete non-positive losses raise a ValueError; a step with
      non-finite (or, traced, non-positive) losses or gradients returns a non-finite update and
      leaves the state unchanged, for ``optax.apply_if_finite`` after it.

    Example:
      >>> import jax.numpy as jnp, metagrad as mg
      >>> tx = mg.dwa(2, temperature=1.0)
      >>> state = tx.init(jnp.zeros(2))
      >>> g = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> for losses in ([1.0, 1.0], [0.5, 1.0]):  # task 1 descends, task 2 does not
      ...     out, state = tx.update(g, state, losses=jnp.array(losses))
      >>> out, state = tx.update(g, state, losses=jnp.array([0.4, 1.0]))
      >>> [round(x, 3) for x in out.tolist()]  # 2 softmax([0.5, 1.0])
      [0.755, 1.245]

    References:
      Liu, Johns and Davison, `End-to-End Multi-Task Learning with Attention
      <https://arxiv.org/abs/1803.10704>`_, CVPR 2019 (eq. 1).
    """
    num_tasks = _aggregate.num_tasks_arg(num_tasks)
    temperature = _checks.hyperparameter("temperature", temperature, low=0)
    period = _checks.positive_int("period", period)
    _aggregate.check_reduction(reduction)

    def init_state(params):
        del params
        return DWAState(
            count=jnp.zeros([], jnp.int32),
            periods=jnp.zeros([], jnp.int32),
            loss_sum=_losses.task_vector(num_tasks, 0.0),
            last=_losses.task_vector(num_tasks, 1.0),
            before_last=_losses.task_vector(num_tasks, 1.0),
        )

    def weights_fn(updates, losses, state, params):
        del updates, params
        rates = state.last / state.before_last
        weights = jnp.where(
            state.periods >= 2, num_tasks * jax.nn.softmax(rates / temperature), 1.0
        )
        loss_sum = state.loss_sum + losses
        count = optax.safe_increment(state.count)
        closes = count % period == 0
        new_state = DWAState(
            count=count,
            periods=jnp.where(closes, optax.safe_increment(state.periods), state.periods),
            loss_sum=jnp.where(closes, jnp.zeros_like(loss_sum), loss_sum),
            last=jnp.where(closes, loss_sum / period, state.last),
            before_last=jnp.where(closes, state.last, state.before_last),
        )
        return weights, new_state

    return _weighting.loss_weighting(
        "dwa", init_state, weights_fn, num_tasks=num_tasks, sign=_losses.POSITIVE,
        reduction=reduction,
    )  # fmt: skip
