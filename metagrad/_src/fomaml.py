"""First-order MAML: `metagrad.maml` with ``first_order=True``."""

from __future__ import annotations

import inspect
from typing import Any

import optax

from metagrad._src.base import LossFn, MetaLearner
from metagrad._src.inner_rules import InnerRule
from metagrad._src.maml import maml


def fomaml(
    loss_fn: LossFn,
    inner: float | optax.Schedule | optax.GradientTransformation | InnerRule,
    inner_steps: int,
    outer: float | optax.Schedule | optax.GradientTransformation,
    **kwargs: Any,
) -> MetaLearner:
    """First-order MAML: `maml` with ``first_order=True``.

    The meta-gradient is ``mean_t ∇L_t^q(θ_t)``, the query gradient at the adapted params,
    with the inner gradients treated as constants (no Hessian terms).
    Learned inner-rule parameters (Meta-SGD rates, grad_share's m_k and λ_k) still need a
    backward pass through the inner loop, but only through the rule's arithmetic: the inner
    gradients are constants there. Non-finite values are handled as in `maml`.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner: an optax transformation, a step size α meaning ``optax.sgd(α)``, or an
        `InnerRule`, as in `maml`.
      inner_steps: number of inner steps (>= 1).
      outer: the optax optimizer applied to the meta-gradient, or a step size (a float or an
        optax schedule) meaning ``optax.sgd(outer)``.
      **kwargs: the other keyword arguments of `maml` (not `first_order`).

    Returns:
      A `MetaLearner`, as `maml`.

    Example:
      >>> import jax.numpy as jnp, optax, metagrad as mg
      >>> loss = lambda p, b: jnp.mean((b[0] * p - b[1]) ** 2)
      >>> learner = mg.fomaml(loss, optax.sgd(0.1), 2, optax.sgd(0.1))
      >>> state = learner.init(jnp.zeros(()))
      >>> x = jnp.ones((3, 4))
      >>> state, metrics = learner.step(state, ((x, 2 * x), (x, 2 * x)))
      >>> round(float(metrics["loss"]), 2)
      1.64

    References:
      Finn et al., `Model-Agnostic Meta-Learning <https://arxiv.org/abs/1703.03400>`_,
      2017, Section 5.2 (first-order approximation).
    """
    if "first_order" in kwargs:
        raise TypeError("first_order is fixed to True by fomaml; use maml to choose it")
    return maml(loss_fn, inner, inner_steps, outer, first_order=True, **kwargs)


# `fomaml` forwards maml's keywords: show them in its signature (help(), IDEs, inspect).
_MAML_SIGNATURE = inspect.signature(maml)
fomaml.__signature__ = _MAML_SIGNATURE.replace(
    parameters=[p for p in _MAML_SIGNATURE.parameters.values() if p.name != "first_order"]
)
