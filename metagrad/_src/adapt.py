"""Adapting parameters to one task: a few steps of an optax optimizer in `lax.scan`.

This is the inner loop shared by Reptile-style meta-learners (Nichol et al.,
2018; Lee et al., 2022) and the fine-tuning step of meta-test evaluation (Finn
et al., 2017, Section 5.1).

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
import numpy as np
import optax

from metagrad._src import checks as _checks
from metagrad._src import loops as _loops

Params = chex.ArrayTree


def _check_leading_axis(name: str, tree: Any, size: int, what: str) -> None:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{name} must contain at least one array")
    for leaf in leaves:
        shape = np.shape(leaf)
        if not shape or shape[0] != size:
            raise ValueError(
                f"{name} must have a leading axis of {what} = {size} on every leaf, "
                f"got a leaf of shape {shape}"
            )


def _varying_axes(x: Any) -> frozenset:
    """The mapped axes a value is typed as varying over (empty outside `jax.shard_map`)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)  # JAX <= 0.8
    if vma is None:  # later JAX: ShapedArray.manual_axis_type.varying
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
    return frozenset(vma)


def to_varying(tree: Any, axis_name: str | None) -> Any:
    """Marks `tree` as varying over the mapped axis ``axis_name`` (private helper).

    Inside `jax.shard_map`, JAX transposes the implicit broadcast of a
    replicated value into a ``psum``: a gradient with respect to replicated
    params comes back summed over devices. Marking the params as
    device-varying first keeps each device's gradient local, so the caller
    decides how to combine them (a ``pmean``). Leaves already varying, and
    everything when ``axis_name`` is None, pass through.
    """
    if axis_name is None:
        return tree
    pcast = getattr(jax.lax, "pcast", None)
    if pcast is None:  # older JAX: no varying-axes types, gradients stay local
        return tree

    def leaf(x):
        if axis_name in _varying_axes(x):
            return x
        return pcast(x, axis_name, to="varying")

    return jax.tree.map(leaf, tree)


def to_invariant(tree: Any, axis_name: str | None) -> Any:
    """Marks values equal on every device as device-invariant again (private helper).

    A value computed from `to_varying` params (e.g. a carry that depends on learned
    inner-rule parameters) is typed device-varying under ``shard_map(check_vma=True)``
    even when every device holds the same number. Such leaves are averaged over the axis
    (``pmax`` for integers), which leaves equal values unchanged up to rounding and makes
    them invariant; leaves not varying pass through.
    """
    if axis_name is None:
        return tree

    def leaf(x):
        if axis_name not in _varying_axes(x):
            return x
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jax.lax.pmean(x, axis_name)
        return jax.lax.pmax(x, axis_name)

    return jax.tree.map(leaf, tree)


def inner_loop(
    loss_fn: Callable[..., chex.Array],
    inner: optax.GradientTransformation,
    params: Params,
    inner_state: optax.OptState,
    batches: Any,
    num_steps: int,
    *,
    batch_per_step: bool,
    keep_first_grad: bool = False,
    axis_name: str | None = None,
    step_loop: str = "scan",
):
    """The inner loop behind `adapt` and the Reptile learners (private helper).

    ``loss_fn(params, batch)``; with ``batch_per_step`` the leaves of
    ``batches`` have a leading axis of length ``num_steps`` and step k uses
    slice k, otherwise the same batch is used at every step. ``step_loop`` is
    ``"scan"`` (`jax.lax.scan`) or ``"unroll"`` (one copy of the step per step).

    Returns ``(params, inner_state, losses, first_grad)``: ``losses[k]`` is the
    loss at the params before step k, ``first_grad`` the gradient at the
    starting params (None unless ``keep_first_grad``). With ``axis_name``, each
    step's loss and gradient are averaged over that mapped axis (data
    parallelism within a batch, under `jax.shard_map` or `jax.pmap`).
    """
    grad_fn = jax.value_and_grad(loss_fn)

    def body(carry, k, batch):
        del k
        p, s = carry
        batch = batch if batch_per_step else batches
        loss, g = grad_fn(to_varying(p, axis_name), batch)
        if axis_name is not None:
            loss, g = jax.lax.pmean((loss, g), axis_name)
        u, s = inner.update(g, s, p)
        return (optax.apply_updates(p, u), s), (loss, g)

    xs = batches if batch_per_step else None
    carry = (params, inner_state)
    if step_loop == "unroll":
        losses, first_grad = [], None
        for k in range(num_steps):
            batch = None if xs is None else jax.tree.map(lambda x, k=k: x[k], xs)
            carry, (loss, g) = body(carry, k, batch)
            losses.append(loss)
            if k == 0 and keep_first_grad:
                first_grad = g
        return (*carry, jnp.stack(losses), first_grad)

    def step(carry, k, batch):
        carry, (loss, _) = body(carry, k, batch)
        return carry, loss

    if not keep_first_grad:
        carry, losses = _loops.run_steps(step, carry, num_steps, "scan", xs=xs)
        return (*carry, losses, None)
    # The first step is peeled off the scan so its gradient (at the starting params, the
    # quantity Reptile's meta-gradient expands around) is kept without storing all K.
    first_batch = jax.tree.map(lambda x: x[0], xs) if batch_per_step else None
    carry, (loss0, first_grad) = body(carry, 0, first_batch)
    rest = jax.tree.map(lambda x: x[1:], xs) if batch_per_step else None
    carry, losses = _loops.run_steps(step, carry, num_steps - 1, "scan", xs=rest, start=1)
    return (*carry, jnp.concatenate([loss0[None], losses]), first_grad)


def adapt(
    loss_fn: Callable[[Params, Any], chex.Array],
    inner: optax.GradientTransformation,
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
        the classic few-shot fine-tuning).
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
        _check_leading_axis("support", support, num_steps, "num_steps")
    if inner_state is None:
        inner_state = inner.init(params)
    params, _, losses, _ = inner_loop(
        loss_fn, inner, params, inner_state, support, num_steps, batch_per_step=batch_per_step
    )
    if return_losses:
        return params, losses
    return params
