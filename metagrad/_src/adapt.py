"""Adapting parameters to one task: a few steps of an optax optimizer in `lax.scan`.

The fine-tuning step of meta-test evaluation (Finn et al., 2017, Section 5.1),
and the one-task form of the inner loop every meta-learner shares
(`metagrad._src.inner_loop`), as Reptile's (Nichol et al., 2018) and
Sequential Reptile's (Lee et al., 2022) trajectories use it.

References:
  Finn, Abbeel, Levine, `Model-Agnostic Meta-Learning for Fast Adaptation of
  Deep Networks <https://arxiv.org/abs/1703.03400>`_, ICML 2017.

  Nichol, Achiam, Schulman, `On First-Order Meta-Learning Algorithms
  <https://arxiv.org/abs/1803.02999>`_, 2018.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from metagrad._src import checks as _checks
from metagrad._src.base import Params, to_varying
from metagrad._src.inner_loop import inner_loop
from metagrad._src.inner_rules import as_inner_rule


def one_task(
    loss_fn: Callable[..., chex.Array],
    inner: optax.GradientTransformation,
    params: Params,
    inner_state: optax.OptState,
    support: Any,
    num_steps: int,
    *,
    batch_per_step: bool = False,
    axis_name: str | None = None,
    value_and_grad: Callable[..., Any] | None = None,
    step_loop: str = "scan",
) -> tuple[Params, optax.OptState, chex.Array]:
    """The inner loop (`inner_loop.inner_loop`) on one task, without task axis (private).

    Behind `adapt`, Sequential Reptile's trajectory and the learners' ``adapt``: a batch of
    one task, whose per-task program (``task_loop="unroll"``) is the plain one. With
    ``axis_name``, each step's loss and gradient are averaged over that mapped axis (data
    parallelism within a batch, under `jax.shard_map` or `jax.pmap`).

    Returns ``(params, inner_state, losses)``, ``losses[k]`` the loss before step k.
    """
    if value_and_grad is None:
        value_and_grad = jax.value_and_grad(loss_fn)
    if axis_name is not None:
        local = value_and_grad

        def value_and_grad(p, batch):
            # See `to_varying`: each device's gradient stays local until the pmean.
            return jax.lax.pmean(local(to_varying(p, axis_name), batch), axis_name)

    def one(tree):
        return jax.tree.map(lambda x: jnp.asarray(x)[None], tree)

    params, inner_state, _, outs = inner_loop(
        loss_fn, as_inner_rule(inner), params, (), (), one(inner_state), one(support),
        None, num_steps, task_loop="unroll", step_loop=step_loop,
        batch_per_step=batch_per_step, value_and_grad=value_and_grad,
    )  # fmt: skip
    return params.trees[0], jax.tree.map(lambda x: x[0], inner_state), outs["support_loss"][:, 0]


def adapt(
    loss_fn: Callable[[Params, Any], chex.Array],
    inner: float | optax.Schedule | optax.GradientTransformation,
    params: Params,
    support: Any,
    num_steps: int,
    *,
    batch_per_step: bool = False,
    inner_state: optax.OptState | None = None,
    return_losses: bool = False,
) -> Params | tuple[Params, chex.Array]:
    """Runs ``num_steps`` steps of an optax optimizer on one task's support data.

    .. math::

      θ_0 = \\text{params}, \\qquad
      θ_k = θ_{k−1} + \\text{inner.update}(∇L(θ_{k−1}; B_k)), \\quad k = 1..K,

    with B_k = ``support`` at every step, or its k-th slice along the leading
    axis when ``batch_per_step=True``. The loop is a `jax.lax.scan`; the
    function is pure, so it runs under `jax.jit` and `jax.vmap` (vmap it over a
    leading task axis of ``support`` to adapt to many tasks at once).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner: the optimizer, any optax transformation (``optax.sgd(alpha)`` for
        the classic few-shot fine-tuning), or a step size alpha (a float or an optax
        schedule) meaning ``optax.sgd(alpha)``.
      params: the starting params (e.g. a learned initialization).
      support: the task's support batch, a pytree of arrays.
      num_steps: K >= 1, the number of optimizer steps (static).
      batch_per_step: if True, every leaf of ``support`` has a leading axis of
        length ``num_steps`` and step k uses slice k; if False (default) the
        same batch is used at every step.
      inner_state: the optimizer state to start from; None (default) means
        ``inner.init(params)``.
      return_losses: if True, also return the losses before each step.

    Returns:
      The adapted params θ_K, or ``(θ_K, losses)`` with ``losses[k] = L(θ_k; B_{k+1})``
      of shape ``[num_steps]`` when ``return_losses``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import metagrad as mg
      >>> loss_fn = lambda p, b: jnp.sum((p - b) ** 2)
      >>> params, losses = mg.adapt(
      ...     loss_fn, optax.sgd(0.25), jnp.zeros(2), jnp.array([1.0, 2.0]), 3,
      ...     return_losses=True)
      >>> print([round(float(x), 4) for x in params])  # 1 − 0.5³ of the way
      [0.875, 1.75]
      >>> print(losses.shape)
      (3,)

    References:
      Finn, Abbeel, Levine, `Model-Agnostic Meta-Learning for Fast Adaptation
      of Deep Networks <https://arxiv.org/abs/1703.03400>`_, ICML 2017.
    """
    _checks.callable_("loss_fn", loss_fn)
    inner = _checks.as_optimizer("inner", inner)
    num_steps = _checks.positive_int("num_steps", num_steps)
    if batch_per_step:
        _checks.stacked("support", support, (num_steps,), f"[num_steps = {num_steps}, ...]")
    if inner_state is None:
        inner_state = inner.init(params)
    params, _, losses = one_task(
        loss_fn, inner, params, inner_state, support, num_steps, batch_per_step=batch_per_step
    )
    if return_losses:
        return params, losses
    return params
