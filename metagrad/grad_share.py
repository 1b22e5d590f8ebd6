"""Gradient sharing: an inner-loop rule with meta-learned momentum and gate.

Chang & Lipson, "Accelerating Meta-Learning by Sharing Gradients" (arXiv 2312.08398). Only a
summary of the paper was available to us; every choice it leaves open is an option whose
default is documented as a reconstruction in `grad_share`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metagrad import _checks
from metagrad._base import Params
from metagrad._inner import InnerRule, as_inner_rule, step_index


class GradShareParams(NamedTuple):
    """Learned parameters of `grad_share` (logits; the rule uses their sigmoids)."""

    momentum: Any  # m_k: shape [K], or a pytree like params of [K] leaves (per layer)
    gate: Any  # λ_k: same layout as momentum
    inner: Any  # learned parameters of the wrapped inner rule (e.g. Meta-SGD rates)


class GradShareCarry(NamedTuple):
    """Persistent state of `grad_share`: kept across outer steps, never differentiated."""

    average: Params  # G, running average of the normalized mean task gradient
    inner: Any  # carry of the wrapped inner rule


# The matmuls below only sum, average or spread values: at the default precision a TPU would
# round their inputs to bfloat16.
_EXACT = jax.lax.Precision.HIGHEST


class _Flat(NamedTuple):
    """Views a params-like pytree as one flat vector (per task).

    The rule's arithmetic runs on a single ``[tasks, P]`` array instead of leaf by leaf:
    with small models the cost of an inner step is the number of XLA operations, not
    their size, and one operation per leaf per formula would multiply it.
    """

    treedef: Any
    shapes: tuple
    sizes: tuple
    layers: jax.Array  # [P, num_leaves] one-hot: column j marks the entries of leaf j

    @classmethod
    def of(cls, tree: Any, batch_dims: int) -> _Flat:
        leaves, treedef = jax.tree.flatten(tree)
        shapes = tuple(jnp.shape(x)[batch_dims:] for x in leaves)
        sizes = tuple(math.prod(s) for s in shapes)
        ids = np.repeat(np.arange(len(sizes)), sizes)
        layers = jnp.asarray(ids[:, None] == np.arange(len(sizes))[None, :], leaves[0].dtype)
        return cls(treedef, shapes, sizes, layers)

    def ravel(self, tree: Any, batch_dims: int) -> jax.Array:
        leaves = jax.tree.leaves(tree)
        lead = jnp.shape(leaves[0])[:batch_dims]
        return jnp.concatenate([jnp.reshape(x, lead + (-1,)) for x in leaves], axis=-1)

    def unravel(self, flat: jax.Array) -> Any:
        lead = flat.shape[:-1]
        parts = jnp.split(flat, np.cumsum(self.sizes)[:-1], axis=-1)
        leaves = [jnp.reshape(x, lead + s) for x, s in zip(parts, self.shapes, strict=True)]
        return jax.tree.unflatten(self.treedef, leaves)

    def per_entry(self, per_leaf: jax.Array) -> jax.Array:
        """Spreads per-leaf values ``[..., num_leaves]`` over the entries, ``[..., P]``."""
        return jnp.matmul(per_leaf, self.layers.T, precision=_EXACT)


def _inverse_norm(sq: jax.Array, eps: float) -> jax.Array:
    """``1 / max(sqrt(sq), eps)`` with finite derivatives everywhere, ``sq = 0`` included.

    The branch that is not taken sees a safe argument (the double-``where`` idiom), so its
    derivative never turns into ``inf · 0``: second-order MAML differentiates through here.
    """
    info = jnp.finfo(sq.dtype)
    above = sq > eps * eps  # eps² may underflow to 0: then only exact zeros take the bound
    inverse = jax.lax.rsqrt(jnp.where(above, sq, 1.0))
    return jnp.where(above, inverse, min(1.0 / eps, float(info.max)))


def _normalized_mean(flat: _Flat, grads: jax.Array, normalize: str, eps: float) -> jax.Array:
    """Mean over the task axis of the (normalized) task gradients ``grads`` [tasks, P].

    The mean is a vector-matrix product with per-task weights (1 / tasks, times the inverse
    norm for ``"task"``), which folds the normalization in. On CPU this made second-order
    MAML's outer step faster than a scaled copy followed by a reduction over tasks.
    """
    num_tasks = grads.shape[0]
    weights = jnp.full((num_tasks,), 1.0 / num_tasks, grads.dtype)
    if normalize == "task":
        weights = weights * _inverse_norm(jnp.sum(grads * grads, axis=1), eps)
    elif normalize == "layer":  # each leaf of each task gradient to unit norm
        per_leaf = jnp.matmul(grads * grads, flat.layers, precision=_EXACT)
        grads = grads * flat.per_entry(_inverse_norm(per_leaf, eps))
    return jnp.matmul(weights, grads, precision=_EXACT)


def grad_share(
    inner: float | optax.GradientTransformation | InnerRule,
    *,
    normalize: str = "task",
    per_layer: bool = False,
    init_momentum: float = 0.0,
    init_gate: float = 0.0,
    carry_into_eval: bool = True,
    eps: float = 1e-12,
    axis_name: str | None = None,
) -> InnerRule:
    r"""Gradient sharing (Chang & Lipson): inner updates mixed with a shared running average.

    At inner step k, for the tasks t = 1..B of the batch, with support gradients
    ``g_{t,k} = ∇L_t(θ_{t,k−1})``::

        ḡ_k     = mean_t normalize(g_{t,k})
        G      ← (1 − σ(m_k))·G + σ(m_k)·ḡ_k          (running average, persists)
        Δ_{t,k} = (1 − σ(λ_k))·g_{t,k} + σ(λ_k)·G
        θ_{t,k} = θ_{t,k−1} + inner(Δ_{t,k})            (classic: − α·Δ_{t,k})

    The momentum and gate logits m_k, λ_k (one per inner step, or per step and layer) are
    learned by the outer loop with the initialization: use the rule as the ``inner`` of
    `metagrad.maml` / `metagrad.fomaml`. G lives in the learner state's ``carry``: it
    persists across outer steps, its value from earlier outer steps enters under
    `stop_gradient`, and within an outer step the meta-gradient flows through its updates
    (to m_k, and to θ through ḡ_k for second-order MAML). With one task per batch, ḡ_k is
    that task's own gradient and sharing is with previous tasks only.

    Reconstructions (choices the paper's summary does not fix): the normalization (default
    per-task unit norm before the mean), the initial logits (default 0, i.e. σ = ½), G
    starting at zero, G updated before it is used at the same step, the gradient flowing
    through ḡ_k within an outer step, steps beyond the trained K reusing m_K and λ_K at
    meta-test time, and G being carried into meta-test adaptation (where it is updated with
    the test task's own gradients, without touching the stored average).

    Non-finite values: one task with an inf or NaN loss makes the meta-gradient non-finite
    (wrap the outer optimizer in ``optax.apply_if_finite(opt, max_consecutive_errors)`` to
    skip such steps), and G keeps its previous value in any outer step whose new G is not
    finite, so a skipped step leaves the average untouched.

    Args:
      inner: what turns Δ into an update: a float α (SGD with learning rate α, the paper's
        setting), any optax transformation (applied per task), or an `InnerRule` such as
        `metagrad.meta_sgd` or `metagrad.learned_lr` (Meta-SGD, MAML++).
      normalize: ``"task"`` (each task gradient to unit global norm, default), ``"layer"``
        (each leaf of each task gradient to unit norm) or ``"none"``.
      per_layer: one (m_k, λ_k) per inner step and pytree leaf instead of per step.
      init_momentum: initial momentum logit m (σ(m) is the averaging rate).
      init_gate: initial gate logit λ; a large negative value (e.g. -1e9) closes the gate:
        σ(λ) = 0 exactly and the rule reduces to ``inner``.
      carry_into_eval: whether `MetaLearner.adapt` starts from the stored average G (True)
        or from zero (False).
      eps: lower bound of the norms that normalization divides by.
      axis_name: when the task batch is split over devices (``metagrad.maml(...,
        axis_name=...)``), the same axis name: ḡ_k is then the mean over all tasks of all
        devices (`jax.lax.pmean`) and G stays identical on every device.

    Returns:
      An `InnerRule` with ``inner_params`` a `GradShareParams` and ``carry`` a
      `GradShareCarry`.

    Example:
      >>> import jax.numpy as jnp, optax, metagrad as mg
      >>> loss = lambda p, b: jnp.mean((b[0] * p - b[1]) ** 2)
      >>> learner = mg.maml(loss, mg.grad_share(0.1), 5, optax.adam(1e-3))
      >>> state = learner.init(jnp.zeros(()))
      >>> x = jnp.ones((5, 4)); y = x * jnp.arange(5.0)[:, None]
      >>> state, metrics = learner.step(state, ((x, y), (x, y)))
      >>> state.inner_params.momentum.shape, state.carry.average.shape
      ((5,), ())

    References:
      Chang & Lipson, `Accelerating Meta-Learning by Sharing Gradients
      <https://arxiv.org/abs/2312.08398>`_, 2023.
    """
    if isinstance(inner, (int, float)) and not isinstance(inner, bool):
        inner = optax.sgd(_checks.positive_float("inner", inner))
    base = as_inner_rule(inner, "inner")
    _checks.one_of("normalize", normalize, ("task", "layer", "none"))
    init_momentum = _checks.finite_float("init_momentum", init_momentum)
    init_gate = _checks.finite_float("init_gate", init_gate)
    eps = _checks.positive_float("eps", eps)

    def init(params, num_steps):
        dtype = jnp.result_type(*jax.tree.leaves(params))

        def logits(value):
            if per_layer:
                return jax.tree.map(lambda p: jnp.full((num_steps,), value, dtype), params)
            return jnp.full((num_steps,), value, dtype)

        inner_params, inner_carry = base.init(params, num_steps)
        learned = GradShareParams(logits(init_momentum), logits(init_gate), inner_params)
        carry = GradShareCarry(optax.tree.zeros_like(params), inner_carry)
        return learned, carry

    def update(grads, state, params, learned, carry, step):
        flat = _Flat.of(grads, batch_dims=1)
        k = step_index(step, jax.tree.leaves(learned.momentum)[0].shape[0])
        if per_layer:
            per_leaf = lambda logits: jnp.stack([x[k] for x in jax.tree.leaves(logits)])
            rate = flat.per_entry(jax.nn.sigmoid(per_leaf(learned.momentum)))
            gate = flat.per_entry(jax.nn.sigmoid(per_leaf(learned.gate)))
        else:
            # Sigmoid of all K logits, then index: the sigmoids do not depend on the step, so
            # the backward pass keeps them once instead of stacking them step by step.
            rate = jax.nn.sigmoid(learned.momentum)[k]
            gate = jax.nn.sigmoid(learned.gate)[k]
        g = flat.ravel(grads, batch_dims=1)
        mean = _normalized_mean(flat, g, normalize, eps)
        if axis_name is not None:
            mean = jax.lax.pmean(mean, axis_name)
        # Inside the inner loop G is the flat vector of `loop_carry`.
        average = (1 - rate) * carry.average + rate * mean
        # The shared average G has no task axis: it broadcasts over the task batch.
        delta = flat.unravel((1 - gate) * g + gate * average)
        updates, state, inner_carry = base.update(
            delta, state, params, learned.inner, carry.inner, step
        )
        return updates, state, GradShareCarry(average, inner_carry)

    def loop_carry(carry):
        # G stays one flat vector for the whole inner loop: unravelling and ravelling it at
        # every step would cost one operation per leaf, forward and backward.
        flat = _Flat.of(carry.average, batch_dims=0)
        if base.loop_carry is None:
            inner, restore_inner = carry.inner, lambda c: c
        else:
            inner, restore_inner = base.loop_carry(carry.inner)

        def restore(c):
            return GradShareCarry(flat.unravel(c.average), restore_inner(c.inner))

        return GradShareCarry(flat.ravel(carry.average, batch_dims=0), inner), restore

    def eval_carry(carry):
        inner_carry = base.eval_carry(carry.inner) if base.eval_carry else carry.inner
        average = carry.average if carry_into_eval else optax.tree.zeros_like(carry.average)
        return GradShareCarry(average, inner_carry)

    return InnerRule(init, base.init_state, update, eval_carry, loop_carry)
