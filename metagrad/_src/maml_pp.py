"""MAML++'s multi-step loss weights (Antoniou et al., 2019), for `metagrad.maml`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
