"""Task distributions for multi-task meta-learning: Uniform, PPS / temperature, Mixed.

Dou et al. (2019, Section 2.4) compare three task distributions for
meta-learning on GLUE: Uniform, Probability Proportional to Size (PPS) and
Mixed (tasks sampled uniformly, then exclusively the target task). Sequential
Reptile (Lee et al., 2022, Section 3.1) samples t_k ~ Cat(p_1..p_T) with
p_t ∝ N_t^q, which covers both: q = 0 is Uniform, q = 1 is PPS, and the paper
uses q = 1/5. Every sampler is a pure function of a PRNG key and runs inside
`jax.jit`.

References:
  Dou, Yu, Anastasopoulos, `Investigating Meta-Learning Algorithms for
  Low-Resource Natural Language Understanding Tasks
  <https://arxiv.org/abs/1908.10423>`_, EMNLP 2019.

  Lee, Lee, Lee, Hwang, `Sequential Reptile: Inter-Task Gradient Alignment for
  Multilingual Learning <https://arxiv.org/abs/2110.02600>`_, ICLR 2022.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from metagrad._src import checks as _checks

_PROB_TOL = 1e-5


def _concrete(x: Any) -> np.ndarray | None:
    """`x` as a NumPy array, or None when it is traced (values unknown)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _check_vector(name: str, x: Any) -> None:
    shape = np.shape(x)
    if len(shape) != 1:
        raise ValueError(f"{name} must be a 1-D sequence (one entry per task), got shape {shape}")
    if shape[0] == 0:
        raise ValueError(f"{name} must not be empty")


def task_probs(sizes: Any, q: float = 1.0) -> jax.Array:
    """Task probabilities p_t ∝ N_t^q from dataset sizes N_t.

    .. math::

      p_t = \\frac{N_t^q}{\\sum_s N_s^q}

    ``q = 1`` is PPS (probability proportional to size, Dou et al.), ``q = 0``
    Uniform, ``0 < q < 1`` a temperature τ = 1/q that flattens the distribution
    toward small tasks (Lee et al. use q = 1/5).

    Args:
      sizes: N_t > 0 for each task, a 1-D sequence or array (may be traced
        inside `jax.jit`; then its values are not checked).
      q: the exponent, a finite float.

    Returns:
      A float32 array of shape ``[T]`` summing to 1.

    Example:
      >>> import metagrad as mg
      >>> print([round(float(p), 3) for p in mg.task_probs([100, 300], q=1.0)])
      [0.25, 0.75]
      >>> print([round(float(p), 3) for p in mg.task_probs([100, 300], q=0.0)])
      [0.5, 0.5]

    References:
      Lee et al., `Sequential Reptile: Inter-Task Gradient Alignment for
      Multilingual Learning <https://arxiv.org/abs/2110.02600>`_, ICLR 2022.
    """
    q = _checks.finite_float("q", q)
    _check_vector("sizes", sizes)
    values = _concrete(sizes)
    if values is not None:
        if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.bool_):
            raise TypeError(f"sizes must be numbers, got dtype {values.dtype}")
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise ValueError(f"sizes must be finite and > 0, got {values.tolist()}")
    # In log space: N^q overflows float32 for large sizes and exponents.
    logits = q * jnp.log(jnp.asarray(sizes, jnp.float32))
    return jax.nn.softmax(logits)


def _check_probs(probs: Any) -> None:
    _check_vector("probs", probs)
    values = _concrete(probs)
    if values is None:
        return
    if not np.issubdtype(values.dtype, np.floating) and not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"probs must be numbers, got dtype {values.dtype}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"probs must be finite and >= 0, got {values.tolist()}")
    total = float(np.sum(values, dtype=np.float64))
    if abs(total - 1.0) > _PROB_TOL:
        raise ValueError(f"probs must sum to 1, got sum {total}")


def sample_tasks(key: chex.PRNGKey, probs: Any, num: int, *, replace: bool = True) -> jax.Array:
    """Draws ``num`` task indices from Cat(p_1..p_T).

    Args:
      key: a PRNG key.
      probs: p_t >= 0 summing to 1, shape ``[T]`` (e.g. from `task_probs`);
        checked when concrete, trusted when traced.
      num: how many indices (static, >= 1).
      replace: i.i.d. draws (default); False draws distinct tasks (a
        meta-batch without repeats; needs ``num <= T``).

    Returns:
      int32 array of shape ``[num]``.

    Example:
      >>> import jax
      >>> import metagrad as mg
      >>> ids = mg.sample_tasks(jax.random.PRNGKey(0), mg.task_probs([10, 20, 30]), 5)
      >>> print(ids.shape, ids.dtype)
      (5,) int32
    """
    num = _checks.positive_int("num", num)
    _check_probs(probs)
    if not isinstance(replace, bool):
        raise TypeError(f"replace must be a bool, got {replace!r}")
    num_tasks = np.shape(probs)[0]
    if not replace and num > num_tasks:
        raise ValueError(
            f"num must be <= the number of tasks ({num_tasks}) when replace=False, got {num}"
        )
    probs = jnp.asarray(probs, jnp.float32)
    if replace:
        ids = jax.random.categorical(key, jnp.log(probs), shape=(num,))
    else:
        ids = jax.random.choice(key, num_tasks, (num,), replace=False, p=probs)
    return ids.astype(jnp.int32)


def uniform_tasks(
    key: chex.PRNGKey,
    num_tasks: int,
    num: int,
    *,
    order: str = "iid",
    start: int | jax.Array = 0,
) -> jax.Array:
    """Draws ``num`` task indices from ``range(num_tasks)``, i.i.d. or round-robin.

    ``order="iid"`` (default): i.i.d. uniform draws, t_k ~ Cat(1/T, ..., 1/T),
    as Sequential Reptile's Algorithm 1 samples its K task ids (Lee et al.,
    2022, line 5, with uniform p). ``order="round_robin"``: no randomness
    (``key`` is unused), draw i is task ``(start + i) mod T``, so the tasks are
    visited in the fixed order 0, 1, ..., T−1, 0, 1, ...; a training loop that
    passes ``start = step * num`` (traced is fine) continues the cycle across
    calls and visits every task equally often (within one) at every prefix.
    Round-robin is not the paper's sampler; it is an option for comparing the
    two.

    Args:
      key: a PRNG key (unused by ``order="round_robin"``).
      num_tasks: T >= 1, the number of tasks.
      num: how many indices to draw (static, >= 1).
      order: ``"iid"`` or ``"round_robin"``.
      start: the position of the first draw in the round-robin cycle (an int
        or int scalar array; ignored by ``"iid"``).

    Returns:
      int32 array of shape ``[num]`` with values in ``[0, num_tasks)``.

    Example:
      >>> import jax
      >>> import metagrad as mg
      >>> print(mg.uniform_tasks(jax.random.PRNGKey(0), 4, 3).shape)
      (3,)
      >>> print(mg.uniform_tasks(None, 3, 5, order="round_robin", start=2).tolist())
      [2, 0, 1, 2, 0]
    """
    num_tasks = _checks.positive_int("num_tasks", num_tasks)
    num = _checks.positive_int("num", num)
    order = _checks.one_of("order", order, ("iid", "round_robin"))
    if order == "round_robin":
        start = jnp.asarray(start)
        if start.shape != () or not jnp.issubdtype(start.dtype, jnp.integer):
            raise TypeError(f"start must be an int scalar, got {start!r}")
        position = start.astype(jnp.int32) + jnp.arange(num, dtype=jnp.int32)
        return position % jnp.int32(num_tasks)
    return jax.random.randint(key, (num,), 0, num_tasks, dtype=jnp.int32)


def _check_ratio(ratio: Any) -> tuple[int, int]:
    if isinstance(ratio, (int, np.integer)) and not isinstance(ratio, bool):
        ratio = (ratio, 1)
    if not isinstance(ratio, (tuple, list)) or len(ratio) != 2:
        raise TypeError(
            f"ratio must be an int r (meaning r:1) or a pair (aux, target) of ints, got {ratio!r}"
        )
    aux, target = ratio
    for part in (aux, target):
        if isinstance(part, bool) or not isinstance(part, (int, np.integer)) or part < 1:
            raise ValueError(f"ratio must be positive integers (aux, target), got {ratio!r}")
    return int(aux), int(target)


def _check_mixed(num_tasks, target, ratio, include_target):
    num_tasks = _checks.positive_int("num_tasks", num_tasks)
    if num_tasks < 2:
        raise ValueError(
            f"num_tasks must be >= 2 (a target and an auxiliary task), got {num_tasks}"
        )
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise TypeError(f"target must be an int task index, got {target!r}")
    if not 0 <= target < num_tasks:
        raise ValueError(f"target must be in [0, {num_tasks}), got {target}")
    if not isinstance(include_target, bool):
        raise TypeError(f"include_target must be a bool, got {include_target!r}")
    return num_tasks, int(target), _check_ratio(ratio)


def mixed_probs(
    num_tasks: int, target: int, ratio: int | tuple[int, int] = 2, *, include_target: bool = False
) -> jax.Array:
    """The long-run task frequencies of `mixed_schedule` (its marginal distribution).

    With ``ratio = (a, b)`` and T tasks: the target gets b/(a+b), each auxiliary
    task a/((a+b)(T−1)) (or, with ``include_target``, the target also gets its
    uniform share a/((a+b)T)).

    Args:
      num_tasks: T >= 2.
      target: the target task's index in ``[0, T)``.
      ratio: ``(a, b)`` auxiliary : target draws per epoch, or an int r for r:1.
      include_target: whether the uniform phase also draws the target.

    Returns:
      float32 array of shape ``[num_tasks]`` summing to one.

    Example:
      >>> import metagrad as mg
      >>> print([round(float(p), 3) for p in mg.mixed_probs(3, target=2, ratio=2)])
      [0.333, 0.333, 0.333]
    """
    num_tasks, target, (aux, tgt) = _check_mixed(num_tasks, target, ratio, include_target)
    pool = num_tasks if include_target else num_tasks - 1
    share = aux / ((aux + tgt) * pool)
    probs = np.full(num_tasks, share)
    probs[target] = tgt / (aux + tgt) + (share if include_target else 0.0)
    return jnp.asarray(probs, jnp.float32)


def mixed_schedule(
    key: chex.PRNGKey,
    num_tasks: int,
    target: int,
    num: int,
    *,
    ratio: int | tuple[int, int] = 2,
    epoch_length: int | None = None,
    start: int | jax.Array = 0,
    include_target: bool = False,
) -> jax.Array:
    """Task indices of the Mixed distribution: auxiliary tasks, then the target.

    Dou et al. (2019, Section 2.4): "at each epoch, we first sample tasks
    uniformly and then exclusively select the target task", at mix ratios 2:1
    and 5:1. The paper does not define the epoch or the ratio precisely; this
    is our reconstruction: an epoch is ``epoch_length`` draws (default a+b for
    ``ratio = (a, b)``); its first ``epoch_length·a/(a+b)`` draws are uniform
    over the auxiliary tasks (all tasks but ``target``; with
    ``include_target=True`` over all tasks) and its last ``epoch_length·b/(a+b)``
    draws are ``target``. Draw i of the whole schedule has epoch position
    ``(start + i) mod epoch_length``, so a training loop can pass
    ``start = step * num`` (traced is fine) to continue the schedule.

    Args:
      key: a PRNG key.
      num_tasks: T >= 2.
      target: the target task's index in ``[0, T)``.
      num: how many indices to return (static, >= 1).
      ratio: ``(a, b)`` auxiliary : target draws per epoch, or an int r for r:1.
      epoch_length: draws per epoch, a multiple of a+b; default a+b.
      start: position of the first draw in the schedule.
      include_target: whether the uniform phase also draws the target.

    Returns:
      int32 array of shape ``[num]``.

    Example:
      >>> import jax
      >>> import metagrad as mg
      >>> ids = mg.mixed_schedule(jax.random.PRNGKey(0), 4, target=3, num=6, ratio=2)
      >>> print(ids[2::3].tolist())  # every third draw is the target
      [3, 3]

    References:
      Dou, Yu, Anastasopoulos, `Investigating Meta-Learning Algorithms for
      Low-Resource Natural Language Understanding Tasks
      <https://arxiv.org/abs/1908.10423>`_, EMNLP 2019.
    """
    num_tasks, target, (aux, tgt) = _check_mixed(num_tasks, target, ratio, include_target)
    num = _checks.positive_int("num", num)
    if epoch_length is None:
        epoch_length = aux + tgt
    epoch_length = _checks.positive_int("epoch_length", epoch_length)
    if epoch_length % (aux + tgt):
        raise ValueError(
            f"epoch_length must be a multiple of a+b = {aux + tgt} for ratio {ratio!r}, "
            f"got {epoch_length}"
        )
    aux_draws = epoch_length * aux // (aux + tgt)
    position = (jnp.asarray(start, jnp.int32) + jnp.arange(num, dtype=jnp.int32)) % epoch_length
    if include_target:
        uniform = jax.random.randint(key, (num,), 0, num_tasks, dtype=jnp.int32)
    else:
        # Uniform over the T−1 auxiliary tasks: draw from [0, T−1) and skip the target.
        uniform = jax.random.randint(key, (num,), 0, num_tasks - 1, dtype=jnp.int32)
        uniform = uniform + (uniform >= target).astype(jnp.int32)
    return jnp.where(position < aux_draws, uniform, jnp.int32(target))
