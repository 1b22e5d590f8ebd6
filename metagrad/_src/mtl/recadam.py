"""RecAdam (Chen et al., 2020): Adam with an annealed pull toward the pretrained weights.

A baseline of Lee et al., `Sequential Reptile: Inter-Task Gradient Alignment for Multilingual
Learning <https://openreview.net/forum?id=ivQruFJXNI>`_ (ICLR 2022). The paper it implements:
Chen et al., `Recall and Learn: Fine-tuning Deep Pretrained Language Models with Less Forgetting
<https://arxiv.org/abs/2004.12651>`_, EMNLP 2020.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from metagrad._src import checks as _checks

# Adam decay rates: in [0, 1).
_DECAY = dict(low=0, low_inclusive=True, high=1, high_inclusive=False)


class RecAdamState(NamedTuple):
    """State of `recadam`."""

    count: chex.Array  # int32 scalar, calls so far
    adam: optax.OptState  # Adam moments of the task gradient
    pretrained: Any  # theta*, the weights the penalty pulls toward


def recadam(
    learning_rate: float | optax.Schedule,
    *,
    pretrained: Any | None = None,
    anneal_k: float = 0.5,
    anneal_t0: float = 250.0,
    pretrain_coef: float = 5000.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """RecAdam: Adam on the task loss, annealed against a quadratic pull toward θ*.

    RecAdam minimises λ(t)·L_task(θ) + (1 − λ(t))·(γ/2)‖θ − θ*‖² with the sigmoid schedule
    λ(t) = 1 / (1 + exp(−k (t − t0))), and, like AdamW, keeps the quadratic term out of Adam's
    moments. The update at step t = 1, 2, ... implemented here is

    .. math::
      m_t, v_t = \\text{Adam moments of } g_t,\\qquad
      u_t = -\\eta_t \\Big( \\lambda(t)\\, \\frac{\\hat m_t}{\\sqrt{\\hat v_t} + \\epsilon}
        + (1 - \\lambda(t))\\, \\gamma\\, (\\theta_{t-1} - \\theta^*) \\Big),

    with bias-corrected moments as in `optax.scale_by_adam` (the authors' PyTorch code puts ε
    outside the bias correction; the difference is O(ε)). Early on the pull dominates; after t0
    steps the optimizer becomes Adam on the task loss. Stability of the pull needs
    η·γ·(1 − λ) < 2: the defaults (the authors' scale, for fine-tuning with η ~ 1e-5) must be
    scaled down for large learning rates.

    RecAdam takes one (already combined) gradient, without a task axis; the multi-task baseline
    of the Sequential Reptile paper is ``optax.chain(mg.mtl_sum(), mg.recadam(...))``. Like
    `optax.adam` it lets a non-finite gradient into its moments; it keeps the updates' shapes, so
    the guard wraps it directly:
    ``optax.chain(mg.mtl_sum(), optax.apply_if_finite(mg.recadam(...), n))``.

    Args:
      learning_rate: η, a float or an optax schedule of the step count.
      pretrained: θ*, a pytree like params. None (default) takes the params passed to `init`.
      anneal_k: k, the sigmoid's steepness (> 0).
      anneal_t0: t0, the step at which λ = 1/2.
      pretrain_coef: γ >= 0, the strength of the quadratic penalty.
      b1, b2, eps: Adam's hyper-parameters.

    Returns:
      An `optax.GradientTransformation` (a full optimizer, learning rate included, like
      `optax.adam`); `update` needs `params`. The state holds θ*. Works under
      `optax.inject_hyperparams` with any of its numeric arguments injected (e.g. to schedule
      or log the learning rate).

    Example:
      >>> import jax.numpy as jnp, metagrad as mg, optax
      >>> params = jnp.array([1.0, -1.0])
      >>> tx = mg.recadam(0.1, anneal_k=1.0, anneal_t0=0.0, pretrain_coef=1.0)
      >>> state = tx.init(params)  # theta* = params
      >>> updates, state = tx.update(jnp.array([2.0, -3.0]), state, params)
      >>> updates.round(4).tolist()  # -0.1 * sigmoid(1) * sign(g), no pull at theta*
      [-0.0731, 0.0731]

    References:
      Chen et al., `Recall and Learn: Fine-tuning Deep Pretrained Language Models with Less
      Forgetting <https://arxiv.org/abs/2004.12651>`_, EMNLP 2020.
    """
    if not callable(learning_rate):
        learning_rate = _checks.hyperparameter("learning_rate", learning_rate, low=0)
    anneal_k = _checks.hyperparameter("anneal_k", anneal_k, low=0)
    anneal_t0 = _checks.hyperparameter("anneal_t0", anneal_t0)
    pretrain_coef = _checks.hyperparameter(
        "pretrain_coef", pretrain_coef, low=0, low_inclusive=True
    )
    b1 = _checks.hyperparameter("b1", b1, **_DECAY)
    b2 = _checks.hyperparameter("b2", b2, **_DECAY)
    eps = _checks.hyperparameter("eps", eps, low=0, low_inclusive=True)
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def init_fn(params):
        if pretrained is not None:
            _checks.same_structure("pretrained", pretrained, params)
            anchor = jax.tree.map(
                lambda p, q: jnp.asarray(p, jnp.asarray(q).dtype), pretrained, params
            )
        else:
            anchor = jax.tree.map(jnp.asarray, params)
        return RecAdamState(
            count=jnp.zeros([], jnp.int32), adam=adam.init(params), pretrained=anchor
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("recadam needs params: call update(updates, state, params)")
        _checks.same_structure("updates", updates, params)
        direction, adam_state = adam.update(updates, state.adam, params)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.result_type(float))
        lam = jax.nn.sigmoid(anneal_k * (t - anneal_t0))
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate

        def step(d, p, anchor):
            pull = pretrain_coef * (p - anchor)
            # jnp.result_type: a Python-number leaf (which optax accepts) has no dtype.
            return (-lr * (lam * d + (1.0 - lam) * pull)).astype(jnp.result_type(p))

        new_updates = jax.tree.map(step, direction, params, state.pretrained)
        return new_updates, RecAdamState(count=count, adam=adam_state, pretrained=state.pretrained)

    return optax.GradientTransformation(init_fn, update_fn)
