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

from metagrad._src import checks as _checks
from metagrad._src.base import Params
from metagrad._src.inner_rules import InnerRule, as_inner_rule, step_index


class GradShareParams(NamedTuple):
    """Learned parameters of `grad_share` (logits; the rule uses their sigmoids)."""

    momentum: Any  # m_k: shape [K], or a pytree like params of [K] leaves (per layer)
    gate: Any  # λ_k: same layout as momentum
    inner: Any  # learned parameters of the wrapped inner rule (e.g. Meta-SGD rates)


class GradShareCarry(NamedTuple):
    """Persistent state of `grad_share`: kept across outer steps, never differentiated."""

    average: Params  # G, running average of the normalized mean task gradient
    inner: Any  # carry of the wrapped inner rule


# The matmuls below only average over the task axis: at the default precision a TPU would
# round their inputs to bfloat16.
_EXACT = jax.lax.Precision.HIGHEST


class _Layout(NamedTuple):
    """How the rule's vectors are stored: leaf by leaf, or all leaves in one flat vector.

    A pytree like params becomes a list of *parts*, each ``[..., n]`` with the entries of a
    run of consecutive leaves: one part per leaf (``"leaves"``), or a single part holding
    every leaf (``"flat"``). The flat form has one XLA operation per formula instead of one
    per leaf and formula: fewer kernels per inner step (what an inner step costs on a small
    model) and a shorter compile (what a 50-leaf model costs). Per-leaf quantities
    (``normalize="layer"``, ``per_layer``) are per-leaf reductions and broadcasts within a
    part: nothing is ever sized parameters × leaves.
    """

    treedef: Any
    shapes: tuple  # per leaf, without the batch dimensions
    groups: tuple  # per part: the sizes of its leaves, in order

    @classmethod
    def of(cls, tree: Any, batch_dims: int, flat: bool) -> _Layout:
        leaves, treedef = jax.tree.flatten(tree)
        shapes = tuple(jnp.shape(x)[batch_dims:] for x in leaves)
        sizes = tuple(math.prod(s) for s in shapes)
        groups = (sizes,) if flat else tuple((n,) for n in sizes)
        return cls(treedef, shapes, groups)

    def parts(self, tree: Any, batch_dims: int) -> list[jax.Array]:
        leaves = jax.tree.leaves(tree)
        lead = jnp.shape(leaves[0])[:batch_dims]
        rows = [jnp.reshape(x, lead + (-1,)) for x in leaves]
        if len(self.groups) == len(rows):
            return rows
        return [jnp.concatenate(rows, axis=-1)]

    def tree(self, parts: list[jax.Array]) -> Any:
        lead = parts[0].shape[:-1]
        if len(self.groups) == len(self.shapes):
            rows = parts
        else:
            rows = jnp.split(parts[0], np.cumsum(self.groups[0])[:-1], axis=-1)
        leaves = [jnp.reshape(x, lead + s) for x, s in zip(rows, self.shapes, strict=True)]
        return jax.tree.unflatten(self.treedef, leaves)

    def leaf_sums(self, part: int, x: jax.Array) -> jax.Array:
        """Sums of the entries of each leaf of part `x` ``[..., n]``: ``[..., leaves]``."""
        sizes = self.groups[part]
        if len(sizes) == 1:
            return jnp.sum(x, axis=-1, keepdims=True)
        pieces = jnp.split(x, np.cumsum(sizes)[:-1], axis=-1)
        return jnp.stack([jnp.sum(p, axis=-1) for p in pieces], axis=-1)

    def spread(self, part: int, values: jax.Array) -> jax.Array:
        """Per-leaf values ``[..., leaves]`` of a part, broadcast over its entries."""
        sizes = self.groups[part]
        if len(sizes) == 1:
            return values  # [..., 1] broadcasts against [..., n]
        lead = values.shape[:-1]
        pieces = [jnp.broadcast_to(values[..., j, None], lead + (n,)) for j, n in enumerate(sizes)]
        return jnp.concatenate(pieces, axis=-1)


def _inverse_norm(sq: jax.Array, eps: float) -> jax.Array:
    """``1 / max(sqrt(sq), eps)`` with finite derivatives everywhere, ``sq = 0`` included.

    The branch that is not taken sees a safe argument (the double-``where`` idiom), so its
    derivative never turns into ``inf · 0``: second-order MAML differentiates through here.
    """
    info = jnp.finfo(sq.dtype)
    above = sq > eps * eps  # eps² may underflow to 0: then only exact zeros take the bound
    inverse = jax.lax.rsqrt(jnp.where(above, sq, 1.0))
    return jnp.where(above, inverse, min(1.0 / eps, float(info.max)))


def _normalized_mean(
    layout: _Layout, grads: list[jax.Array], normalize: str, eps: float
) -> list[jax.Array]:
    """Mean over the task axis of the (normalized) task gradients, part by part.

    ``grads`` are the parts ``[tasks, n]`` of the task gradients. Each part's mean is a
    vector-matrix product with per-task weights (1 / tasks, times the inverse norm for
    ``"task"``), which folds the normalization in. On CPU this made second-order MAML's
    outer step faster than a scaled copy followed by a reduction over tasks.
    """
    num_tasks = grads[0].shape[0]
    weights = jnp.full((num_tasks,), 1.0 / num_tasks, grads[0].dtype)
    if normalize == "task":
        sq = sum(jnp.sum(g * g, axis=1) for g in grads)
        weights = weights * _inverse_norm(sq, eps)
    elif normalize == "layer":  # each leaf of each task gradient to unit norm
        grads = [
            g * layout.spread(i, _inverse_norm(layout.leaf_sums(i, g * g), eps))
            for i, g in enumerate(grads)
        ]
    return [jnp.matmul(weights, g, precision=_EXACT) for g in grads]


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
    layout: str = "flat",
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
      layout: how the rule's arithmetic stores its vectors (same numbers either way):
        ``"flat"`` (default: the leaves of each task's vectors concatenated into one, so
        an inner step has one XLA operation per formula whatever the number of leaves)
        or ``"leaves"`` (leaf by leaf: no copies into and out of the flat vector, but one
        operation per leaf and formula; on a ResNet-12-sized model, 50 leaves, its
        compile took several times as long for the same compiled memory).

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
    base = as_inner_rule(inner, "inner")
    _checks.one_of("normalize", normalize, ("task", "layer", "none"))
    init_momentum = _checks.finite_float("init_momentum", init_momentum)
    init_gate = _checks.finite_float("init_gate", init_gate)
    eps = _checks.positive_float("eps", eps)
    _checks.one_of("layout", layout, ("flat", "leaves"))

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

    def layout_of(tree, batch_dims):
        return _Layout.of(tree, batch_dims, flat=layout == "flat")

    def update(grads, state, params, learned, carry, step):
        parts = layout_of(grads, batch_dims=1)
        k = step_index(step, jax.tree.leaves(learned.momentum)[0].shape[0])
        if per_layer:
            # Per part: the sigmoids of its leaves' logits, spread over the part's entries.
            def per_entry(logits):
                leaves, start, out = [x[k] for x in jax.tree.leaves(logits)], 0, []
                for i, sizes in enumerate(parts.groups):
                    values = jnp.stack(leaves[start : start + len(sizes)])
                    out.append(parts.spread(i, jax.nn.sigmoid(values)))
                    start += len(sizes)
                return out

            rate, gate = per_entry(learned.momentum), per_entry(learned.gate)
        else:
            # Sigmoid of all K logits, then index: the sigmoids do not depend on the step, so
            # the backward pass keeps them once instead of stacking them step by step.
            rate = [jax.nn.sigmoid(learned.momentum)[k]] * len(parts.groups)
            gate = [jax.nn.sigmoid(learned.gate)[k]] * len(parts.groups)
        g = parts.parts(grads, batch_dims=1)
        mean = _normalized_mean(parts, g, normalize, eps)
        if axis_name is not None:
            mean = jax.lax.pmean(mean, axis_name)
        # Inside the inner loop G is in the parts form of `loop_carry`.
        average = [(1 - r) * a + r * m for r, a, m in zip(rate, carry.average, mean, strict=True)]
        # The shared average G has no task axis: it broadcasts over the task batch.
        delta = parts.tree([(1 - c) * x + c * a for c, x, a in zip(gate, g, average, strict=True)])
        updates, state, inner_carry = base.update(
            delta, state, params, learned.inner, carry.inner, step
        )
        return updates, state, GradShareCarry(average, inner_carry)

    def loop_carry(carry):
        # G stays in parts form for the whole inner loop: with the flat layout, unravelling
        # and ravelling it at every step would cost one operation per leaf, forward and
        # backward.
        parts = layout_of(carry.average, batch_dims=0)
        if base.loop_carry is None:
            inner, restore_inner = carry.inner, lambda c: c
        else:
            inner, restore_inner = base.loop_carry(carry.inner)

        def restore(c):
            return GradShareCarry(parts.tree(c.average), restore_inner(c.inner))

        return GradShareCarry(parts.parts(carry.average, batch_dims=0), inner), restore

    def eval_carry(carry):
        inner_carry = base.eval_carry(carry.inner) if base.eval_carry else carry.inner
        average = carry.average if carry_into_eval else optax.tree.zeros_like(carry.average)
        return GradShareCarry(average, inner_carry)

    return InnerRule(init, base.init_state, update, eval_carry, loop_carry)
