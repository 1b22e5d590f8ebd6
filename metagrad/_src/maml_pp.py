"""MAML++'s options of `metagrad.maml` (Antoniou et al., 2019): the multi-step loss weights
and derivative-order annealing, and the checks of the arguments that select them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metagrad._src import checks as _checks


def maml_pp_weights(num_steps: int, anneal_steps: int, count: jax.Array) -> jax.Array:
    """MAML++ multi-step loss weights after `count` outer steps, shape ``[num_steps]``.

    The weights start uniform (1/K). Over `anneal_steps` outer steps the weights of the
    intermediate steps decay linearly, at rate 1/(K·anneal_steps) per outer step, to a floor
    of 0.03/K, while the last step's weight grows by the same total so the weights keep
    summing to one; afterwards they stay fixed. This reconstructs the schedule of the MAML++
    reference code (the paper only says the weights are annealed towards the last step).

    Args:
      num_steps: K >= 1, the number of inner steps (one weight per step).
      anneal_steps: outer steps over which the weights anneal (values < 1 count as 1).
      count: the number of outer steps taken so far (an int scalar, may be traced).

    Returns:
      A float32 array of shape ``[num_steps]``, non-negative and summing to one.

    Example:
      >>> import metagrad as mg
      >>> print([round(float(w), 4) for w in mg.maml_pp_weights(4, 100, 0)])
      [0.25, 0.25, 0.25, 0.25]
      >>> print([round(float(w), 4) for w in mg.maml_pp_weights(4, 100, 100)])
      [0.0075, 0.0075, 0.0075, 0.9775]

    References:
      Antoniou, Edwards, Storkey, `How to train your MAML
      <https://arxiv.org/abs/1810.09502>`_, ICLR 2019.
    """
    k = num_steps
    count = jnp.asarray(count, jnp.float32)
    floor = 0.03 / k
    decay = 1.0 / k / max(anneal_steps, 1)
    inter = jnp.maximum(1.0 / k - count * decay, floor)
    last = jnp.minimum(1.0 / k + count * (k - 1) * decay, 1.0 - (k - 1) * floor)
    return jnp.concatenate([jnp.full((k - 1,), inter), last[None]])


def derivative_order(first_order: Any) -> tuple[bool | int, bool]:
    """`maml`'s ``first_order``: a bool, or an int N >= 1 (first order for N outer steps).

    Returns it checked, and whether it anneals (an int)."""
    if isinstance(first_order, bool):
        return first_order, False
    if not isinstance(first_order, (int, np.integer)):
        raise TypeError(f"first_order must be a bool or an int >= 1, got {first_order!r}")
    return _checks.positive_int("first_order", int(first_order)), True


def multi_step_weights(multi_step_loss: Any, num_steps: int) -> Callable[[Any], Any] | None:
    """`maml`'s ``multi_step_loss`` as ``count -> weights[num_steps]``, or None (no multi-step
    loss): an int N >= 1 means `maml_pp_weights` annealed over N outer steps."""
    if isinstance(multi_step_loss, bool) or not (
        multi_step_loss is None
        or callable(multi_step_loss)
        or isinstance(multi_step_loss, (int, np.integer))
    ):
        raise TypeError(
            f"multi_step_loss must be None, an int or a callable, got {multi_step_loss!r}"
        )
    if not isinstance(multi_step_loss, (int, np.integer)):
        return multi_step_loss
    anneal = _checks.positive_int("multi_step_loss", multi_step_loss)

    def weights_fn(count):
        return maml_pp_weights(num_steps, anneal, count)

    return weights_fn


def step_weights(weights_fn: Callable[[Any], Any], count: jax.Array, num_steps: int) -> jax.Array:
    """The multi-step loss weights at outer step ``count`` (no gradient), shape-checked."""
    weights = jax.lax.stop_gradient(jnp.asarray(weights_fn(count)))
    if weights.shape != (num_steps,):
        raise ValueError(
            f"multi_step_loss must return inner_steps = {num_steps} weights, "
            f"got shape {weights.shape}"
        )
    return weights
