"""Meta-learnable inner-loop rules for the MAML family (`metagrad.maml`).

An inner rule turns the support gradients of a *batch of tasks* at one inner step into
parameter updates. Seeing the whole task batch at once lets a rule couple tasks (gradient
sharing averages over them); seeing the step index lets it use per-step hyper-parameters
(MAML++). The protocol, `InnerRule`, separates three kinds of quantities:

- ``inner_params``: arrays the outer loop *learns* (Meta-SGD learning rates, MAML++ per-step
  rates, grad_share's momentum and gate). The meta-gradient flows into them through the inner
  loop and the outer optimizer updates them together with the initialization.
- ``carry``: state that *persists across outer steps without gradient* (grad_share's running
  average of task gradients). It is shared by the tasks of a batch.
- ``state``: per-task state that lives for one inner loop (an optax optimizer state).

Any optax `GradientTransformation` is an inner rule without learned parameters (`as_inner_rule`).

References:
  Finn et al., `Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks
  <https://arxiv.org/abs/1703.03400>`_, 2017.
  Li et al., `Meta-SGD: Learning to Learn Quickly for Few-Shot Learning
  <https://arxiv.org/abs/1707.09835>`_, 2017.
  Antoniou et al., `How to train your MAML <https://arxiv.org/abs/1810.09502>`_, 2019.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metagrad._src import checks as _checks
from metagrad._src.base import Params


class InnerRule(NamedTuple):
    """A meta-learnable inner-loop update rule (the `inner` of `metagrad.maml`).

    Attributes:
      init: ``init(params, num_steps) -> (inner_params, carry)``. ``inner_params`` is the
        pytree the outer loop learns; ``carry`` persists across outer steps and never
        receives gradient. ``num_steps`` is the learner's number of inner steps, so per-step
        quantities can be allocated.
      init_state: ``init_state(params) -> state``, the per-task state at inner step 0 for
        one task's params (no task axis).
      update: ``update(grads, state, params, inner_params, carry, step) -> (updates, state,
        carry)``. ``grads``, ``state``, ``params`` and ``updates`` carry a leading task
        axis; ``step`` is the 0-based inner-step index (an int32 scalar, traced); updates
        are *added* to params (optax's sign convention). Must be jittable and
        differentiable in ``inner_params`` and (for second order) in ``grads``/``params``.
      eval_carry: optional ``eval_carry(carry) -> carry``, the carry used when adapting to
        a new task at meta-test time (`MetaLearner.adapt`); identity when ``None``.
      loop_carry: optional ``loop_carry(carry) -> (loop_carry, restore)``, the form of the
        carry that ``update`` receives and returns inside the inner loop, and the function
        mapping it back (as `jax.flatten_util.ravel_pytree` does). A rule whose arithmetic
        runs on one flat vector uses it so the inner loop does not split and concatenate the
        carry at every step. ``None``: the carry as it is.
    """

    init: Callable[[Params, int], tuple[Any, Any]]
    init_state: Callable[[Params], Any]
    update: Callable[..., tuple[Any, Any, Any]]
    eval_carry: Callable[[Any], Any] | None = None
    loop_carry: Callable[[Any], tuple[Any, Callable[[Any], Any]]] | None = None


def as_inner_rule(inner: Any, name: str = "inner") -> InnerRule:
    """Returns `inner` as an `InnerRule`; an optax transformation is applied per task, a step
    size η means ``optax.sgd(η)`` (`checks.as_optimizer`)."""
    if isinstance(inner, InnerRule):
        return inner
    try:
        tx = _checks.as_optimizer(name, inner)
    except TypeError:
        if callable(inner):  # a callable that is no schedule: the specific message
            raise
        raise TypeError(
            f"{name} must be an optax GradientTransformation or a metagrad InnerRule, or a step "
            "size > 0 (a number or an optax schedule) meaning optax.sgd(step size), got "
            f"{inner!r} of type {type(inner).__name__}"
        ) from None

    def init(params, num_steps):
        del params, num_steps
        return (), ()

    def update(grads, state, params, inner_params, carry, step):
        del inner_params, step
        updates, state = jax.vmap(tx.update)(grads, state, params)
        return updates, state, carry

    return InnerRule(init, tx.init, update)


def fixed_inner(method: str, inner: Any) -> Any:
    """``inner`` of a learner that does not differentiate its inner loop (`reptile`,
    `seq_reptile`, `imaml`), as an optax transformation (`checks.as_optimizer`). A learned
    `InnerRule` could not be trained there: the error says so and where it can."""
    if isinstance(inner, InnerRule):
        raise TypeError(
            f"inner must be an optax GradientTransformation (or a step size), not an InnerRule: "
            f"mg.{method} does not differentiate its inner loop, so a learned inner rule "
            "(meta_sgd / learned_lr / grad_share) cannot be trained there; use mg.maml or "
            "mg.fomaml for a learned inner rule"
        )
    return _checks.as_optimizer("inner", inner)


def step_index(step: jax.Array, num_steps: int) -> jax.Array:
    """Index of per-step quantities; steps beyond the trained horizon reuse the last one."""
    return jnp.minimum(step, num_steps - 1)


def learned_lr(
    alpha: float, *, per_step: bool = False, granularity: str = "parameter"
) -> InnerRule:
    """Inner SGD with meta-learned learning rates (Meta-SGD, MAML++ LSLR).

    The inner update of task t at step k is ``θ ← θ − α_k ⊙ g_t`` where the learning rates
    ``α`` are learned by the outer loop, initialized to `alpha`. Their shape is chosen by
    `granularity` (``"parameter"``: one per scalar parameter, Meta-SGD; ``"layer"``: one per
    pytree leaf; ``"global"``: a single scalar) and `per_step` (a separate set per inner
    step, MAML++'s "learning per-layer per-step learning rates"). Steps beyond the trained
    number of inner steps (at meta-test) reuse the last step's rates.

    Args:
      alpha: initial learning rate (the MAML inner learning rate), > 0.
      per_step: whether each inner step has its own learning rates.
      granularity: ``"parameter"``, ``"layer"`` (pytree leaf) or ``"global"``.

    Returns:
      An `InnerRule` whose ``inner_params`` are the learning rates: a pytree like params
      (``"parameter"``, ``"layer"``: leaves of shape ``param.shape`` or ``()``) or a scalar
      (``"global"``), with a leading axis of size ``num_steps`` when `per_step`.

    Example:
      >>> import jax.numpy as jnp, metagrad as mg
      >>> rule = mg.learned_lr(0.1, per_step=True, granularity="layer")
      >>> lrs, carry = rule.init({"w": jnp.zeros(3)}, 5)
      >>> lrs["w"].shape
      (5,)

    References:
      Li et al., `Meta-SGD <https://arxiv.org/abs/1707.09835>`_, 2017;
      Antoniou et al., `How to train your MAML <https://arxiv.org/abs/1810.09502>`_, 2019.
    """
    # A rate <= 0 would make the first inner steps ascend the support loss.
    alpha = _checks.positive_float("alpha", alpha)
    _checks.one_of("granularity", granularity, ("parameter", "layer", "global"))

    def init(params, num_steps):
        lead = (num_steps,) if per_step else ()

        def leaf(p):
            shape = jnp.shape(p) if granularity == "parameter" else ()
            return jnp.full(lead + shape, alpha, jnp.result_type(p))

        if granularity == "global":
            dtype = jnp.result_type(*jax.tree.leaves(params))
            return jnp.full(lead, alpha, dtype), ()
        return jax.tree.map(leaf, params), ()

    def update(grads, state, params, lrs, carry, step):
        del params
        if per_step:
            k = step_index(step, jax.tree.leaves(lrs)[0].shape[0])
            lrs = jax.tree.map(lambda lr: lr[k], lrs)
        if granularity == "global":
            updates = jax.tree.map(lambda g: -lrs * g, grads)
        else:
            # lr leaves broadcast against the trailing (parameter) axes of the task batch.
            updates = jax.tree.map(lambda g, lr: -lr * g, grads, lrs)
        return updates, state, carry

    return InnerRule(init, lambda params: (), update)


def meta_sgd(alpha: float) -> InnerRule:
    """Meta-SGD: inner SGD with one meta-learned learning rate per parameter.

    ``θ_t ← θ_t − α ⊙ ∇L_t(θ_t)`` with ``α`` (a pytree like params) learned by the outer
    loop, initialized to `alpha`; shorthand for
    ``learned_lr(alpha, per_step=False, granularity="parameter")``.

    Args:
      alpha: initial learning rate of every parameter, > 0.

    Returns:
      An `InnerRule` for `metagrad.maml`.

    Example:
      >>> import jax.numpy as jnp, metagrad as mg
      >>> lrs, _ = mg.meta_sgd(0.01).init({"w": jnp.zeros((2, 3))}, 1)
      >>> lrs["w"].shape, float(lrs["w"][0, 0])
      ((2, 3), 0.01)

    References:
      Li et al., `Meta-SGD: Learning to Learn Quickly for Few-Shot Learning
      <https://arxiv.org/abs/1707.09835>`_, 2017.
    """
    return learned_lr(alpha, per_step=False, granularity="parameter")
