"""Data for the experiments: sinusoid regression tasks (MAML paper, Section 5.1).

Everything here is a pure function of a PRNG key, so it runs inside `jax.jit`
and a seed reproduces a run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# MAML paper, Section 5.1 / Appendix C.
AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, jnp.pi)
X_RANGE = (-5.0, 5.0)


def sinusoid_tasks(key, num_tasks: int, num_support: int, num_query: int):
    """Samples sinusoid regression tasks y = A sin(x - phase).

    Args:
      key: a PRNG key.
      num_tasks: how many tasks (leading axis of every output).
      num_support: support points per task (the K of K-shot).
      num_query: query points per task.

    Returns:
      `(support, query, (amplitude, phase))` where `support = (x, y)` with
      shapes `[num_tasks, num_support, 1]`, `query` likewise with `num_query`,
      and amplitude and phase of shape `[num_tasks]`.
    """
    k_amp, k_phase, k_x = jax.random.split(key, 3)
    amp = jax.random.uniform(
        k_amp, (num_tasks,), minval=AMPLITUDE_RANGE[0], maxval=AMPLITUDE_RANGE[1]
    )
    phase = jax.random.uniform(k_phase, (num_tasks,), minval=PHASE_RANGE[0], maxval=PHASE_RANGE[1])
    x = jax.random.uniform(
        k_x, (num_tasks, num_support + num_query, 1), minval=X_RANGE[0], maxval=X_RANGE[1]
    )
    y = amp[:, None, None] * jnp.sin(x - phase[:, None, None])
    support = (x[:, :num_support], y[:, :num_support])
    query = (x[:, num_support:], y[:, num_support:])
    return support, query, (amp, phase)
