"""Meta DotProd: gradient-alignment regularization as an optax transformation.

Kedia, Chinthakindi and Ryu, `Beyond Reptile: Meta-Learned Dot-Product
Maximization between Gradients for Improved Single-Task Regularization
<https://aclanthology.org/2021.findings-emnlp.37/>`_, Findings of EMNLP 2021,
Algorithm 1.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from metagrad._src import checks as _checks
from metagrad._src.base import as_arrays
from metagrad._src.hvp import _check_grad_output, _fd_hvp, _hvp_with_grad, fd_step

_SCHEMES = ("forward", "central", "exact")


class DotProdState(NamedTuple):
    """State of :func:`dotprod`: the number of calls of ``update`` so far.

    ``state.regularizes(every)`` tells whether the next call is a regularized
    one, i.e. whether it consumes the second batch :math:`b_2` (see `every` in
    :func:`dotprod`).
    """

    count: jax.Array  # int32 scalar, calls of `update` so far

    def regularizes(self, every: int | jax.Array) -> jax.Array:
        """Whether the next ``update`` call is regularized (consumes :math:`b_2`).

        Args:
          every: the `every` given to :func:`dotprod` (under
            ``optax.inject_hyperparams``: ``state.hyperparams["every"]``).

        Returns:
          A boolean array, ``count % (every - 1) == 0`` (batched like the count).
        """
        every = _checks.hyperparameter("every", every, integer=True, low=2, low_inclusive=True)
        return _regularized_call(self.count, every)


def _regularized_call(count: jax.Array, every: int | jax.Array) -> jax.Array:
    # A period of `every` batches is one two-batch regularized call followed by
    # every - 2 single-batch calls: every - 1 calls.
    return count % (every - 1) == 0


_WEIGHT_TYPES = "a float, a scalar array or an optax schedule (a callable of the step count)"

_INSIDE_MASKED = (
    "dotprod got params or updates with optax.MaskedNode leaves: it cannot run inside "
    "optax.masked or optax.multi_transform, which hide the unselected parameters while "
    "grad_fn needs all of them. To regularize a subset of the parameters, pass mask= to "
    "dotprod (the convention of optax.masked: a pytree of bools like the params, or a prefix "
    "of it, or a callable of the params returning one) and put optax.masked / "
    "optax.multi_transform after dotprod in the optax.chain."
)


def _is_masked_node(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _check_not_masked(*trees: Any) -> None:
    for tree in trees:
        if any(map(_is_masked_node, jax.tree.leaves(tree, is_leaf=_is_masked_node))):
            raise ValueError(_INSIDE_MASKED)


def dotprod(
    inner_alpha: float | jax.Array | None = None,
    weight: float | jax.Array | optax.Schedule = 0.1,
    *,
    every: int | jax.Array = 2,
    scheme: str = "forward",
    axis_name: Hashable | None = None,
    mask: chex.ArrayTree | Callable[[chex.ArrayTree], chex.ArrayTree] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Meta DotProd: adds the gradient of the dot product between two batch gradients.

    One optimizer step consumes two batches :math:`b_1, b_2`. With
    :math:`\bar G_1 = \nabla L(\theta; b_1)` (the `updates` passed in) and
    :math:`g(p) = \nabla L(p; b_2)` (the keyword argument `grad_fn`), Algorithm 1
    of the paper computes

    .. math::

      \bar G_2 &= g(\theta), \qquad G_{2,1} = g(\theta - \alpha \bar G_1), \\
      G_1G_2 &= (G_{2,1} - \bar G_2) / \alpha \;\approx\; -\bar H_2 \bar G_1, \\
      G &= \bar G_1 + \bar G_2 + \text{weight} \cdot G_1G_2,

    and returns :math:`G`, which any following optimizer (``optax.adam``, ...)
    applies. In expectation over batches :math:`-\bar H_2 \bar G_1` is
    :math:`-\tfrac12 \nabla(\bar G_1 \cdot \bar G_2)`, so descending along
    :math:`G` increases the alignment of the two batch gradients.

    :math:`G` is the *sum* :math:`\bar G_1 + \bar G_2`, as in Algorithm 1, not
    their mean: with a learning rate tuned for single-batch SGD, halve it (or
    chain ``optax.scale(0.5)``) to take the same step. Scale-invariant optimizers
    such as Adam are unaffected. With ``every > 2``, whose standard calls return
    one batch's :math:`\bar G_1`, the sum makes a regularized call (two batches)
    move like two standard ones at the same learning rate.

    Cost of a regularized call: two evaluations of `grad_fn` (``"forward"``),
    three (``"central"``), or one gradient plus one forward-over-reverse HVP
    (``"exact"``), on top of :math:`\bar G_1` computed by the caller: three
    gradients for two batches, 1.5x plain SGD. With ``every=n`` (the paper's
    infrequent regularization, Section 6.3) the other calls are standard
    single-batch steps and ``n`` batches cost ``n + 1`` gradients: an overhead
    of :math:`1/n` over plain SGD (50%, 33%, 20%, 12.5%, 10% for the paper's
    n = 2, 3, 5, 8, 10) with ``"forward"``.

    Args:
      inner_alpha: the finite-difference step :math:`\alpha` > 0, or ``None``
        (default) for the automatic scale-aware step
        ``(eps * (1 + ||theta||))**p / ||G1||`` (``p = 1/2`` forward, ``1/3``
        central, see :func:`metagrad.fd_step`). The paper's fixed
        ``inner_alpha=1e-7`` is reproduced exactly but is only accurate in
        float64: in float32 it is below the resolution of typical weights and
        :math:`G_1G_2` is round-off noise. Ignored by ``scheme="exact"``.
      weight: the weight :math:`\ge 0` of :math:`G_1G_2` (the paper's
        learning rate :math:`LR_{G_1G_2}`, default 0.1): a float, a scalar
        array, or an optax schedule called with the state's count.
      every: the paper's infrequent regularization, counted in batches: one
        regularized call per ``every = n`` batches, which consumes two batches
        (:math:`\bar G_1` on :math:`b_1` from the caller, `grad_fn` on
        :math:`b_2`) and returns :math:`G`, followed by ``n - 2`` standard calls
        that consume :math:`b_1` only: they return :math:`\bar G_1` alone and,
        through ``jax.lax.cond``, never evaluate `grad_fn`. A period is thus
        ``n - 1`` calls for ``n`` batches, and call ``c`` (the state's count,
        from 0) is regularized iff ``c % (n - 1) == 0``, which
        ``DotProdState.regularizes(n)`` returns: draw :math:`b_2` only when it
        is true (on the other calls `grad_fn` is traced but not run, so any
        batch of the right shape, e.g. :math:`b_1`, will do). An integer
        :math:`\ge 2`; ``2`` (default) regularizes every call (Algorithm 1).
        It may be an array (``optax.inject_hyperparams``), then ``lax.cond``
        is used even for 2. Earlier versions counted two-batch calls instead:
        with ``every=m``, calls ``count % m == 0`` were regularized and the others
        returned :math:`\bar G_1 + \bar G_2` of two batches, i.e. one
        regularized pair per ``2m`` batches, overhead :math:`1/(2m)`; the old
        ``every=1`` is the new ``every=2`` (same updates), and the old
        ``every=m`` regularizes as often as the new ``every=2m``, whose other
        steps take one batch each instead of two. Under
        ``jax.vmap`` with a batched state (e.g. vmapping ``init`` and
        ``update`` over seeds), the count and hence the predicate are batched,
        and JAX turns ``lax.cond`` into a select that runs both branches: the
        results are the same, but standard calls pay the full cost of a
        regularized one. To keep the saving, vmap with the state unbatched
        (``in_axes=None`` for it: every seed shares the count) or loop over
        seeds outside ``vmap``.
      scheme: ``"forward"`` (the paper's one-sided difference), ``"central"``
        (:math:`(g(\theta - \alpha\bar G_1) - g(\theta + \alpha\bar G_1))/(2\alpha)`,
        O(alpha**2) accurate, one more gradient) or ``"exact"``
        (:math:`-\bar H_2 \bar G_1` by :func:`metagrad.hvp`).
      axis_name: for data parallelism under ``jax.pmap`` / ``shard_map``:
        the axis over which :math:`\bar G_1` (the incoming `updates`),
        :math:`\bar G_2` and :math:`G_{2,1}` (or the HVP) are averaged with
        ``jax.lax.pmean``, so that, with equal per-device batches and mean
        losses, every device computes the update of one device on the combined
        batches. The perturbed point uses the averaged :math:`\bar G_1`.
        Averaging `updates` that are already averaged changes nothing. Under
        ``jax.shard_map`` with its default ``check_vma=True``, JAX already sums
        the gradients of replicated params over the axis: there, average the
        loss with ``jax.lax.pmean`` so that these sums are means (with
        ``check_vma=False`` gradients stay per-device, as under ``pmap``). In
        float32 the finite difference divides the round-off of the different
        summation order by the step, so single- and multi-device updates agree
        to about 1e-4 relative, not to float32 precision.
      mask: regularize a subset :math:`S` of the parameters only, with the
        convention of ``optax.masked``: a pytree of bools with the structure of
        the params (or a prefix of it, e.g. ``{"embed": False, "mlp": True}``),
        or a callable ``mask(params)`` returning one; ``True`` selects a leaf.
        The difference is then taken along :math:`\bar G_1` restricted to
        :math:`S` (the other leaves stay at :math:`\theta`, and the automatic
        step looks at the selected leaves only), so the selected leaves get
        :math:`\bar G_1 + \bar G_2 - \text{weight}\cdot\bar H_2[S,S]\,\bar G_1[S]`,
        the update of Algorithm 1 for the loss as a function of the
        :math:`S` leaves with the others held fixed, and the other leaves get
        :math:`\bar G_1 + \bar G_2` (on a standard call, every leaf gets
        :math:`\bar G_1`). ``grad_fn`` still receives and returns
        the whole parameter tree. ``None`` (default): all leaves. Use this,
        not ``optax.masked`` / ``optax.multi_transform`` around dotprod: those
        hide the unselected parameters from ``grad_fn`` (and would give those
        leaves :math:`\bar G_1` alone), so dotprod raises a ``ValueError``
        there. ``optax.masked`` / ``multi_transform`` after dotprod in an
        ``optax.chain`` (e.g. to give the embeddings another optimizer) are
        fine. Under ``optax.inject_hyperparams``, list a callable mask in
        ``static_args=("mask",)``, or it is taken for a schedule.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose update is called as
      ``tx.update(g1, state, params, grad_fn=grad_fn)`` (also through
      ``optax.chain``, ``optax.MultiSteps``, ``optax.inject_hyperparams`` and
      ``flax.nnx.Optimizer.update(model, grads, grad_fn=grad_fn)``).
      `grad_fn(p)` must return a pytree with the structure of `params`; it is
      called with array leaves (Python-number leaves of `params` and `g1` are
      converted with ``jnp.asarray``, and ``None`` leaves stay ``None``). Other
      keyword arguments are ignored. Non-finite values in `g1` or in the output of
      `grad_fn` propagate into the update, so ``optax.apply_if_finite`` placed
      after this transformation rejects the step.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import metagrad as mg
      >>> def loss(w, batch):
      ...   x, y = batch
      ...   return jnp.mean((jnp.tanh(x @ w) - y) ** 2)
      >>> kx, ky = jax.random.split(jax.random.key(0))
      >>> x, y = jax.random.normal(kx, (8, 3)), jax.random.normal(ky, (8,))
      >>> b1, b2 = (x[:4], y[:4]), (x[4:], y[4:])
      >>> params = jnp.ones(3)
      >>> tx = optax.chain(mg.dotprod(weight=0.1), optax.adam(1e-2))
      >>> state = tx.init(params)
      >>> g1 = jax.grad(loss)(params, b1)
      >>> grad_fn = lambda p: jax.grad(loss)(p, b2)
      >>> updates, state = tx.update(g1, state, params, grad_fn=grad_fn)
      >>> params = optax.apply_updates(params, updates)
      >>> print(params.shape)
      (3,)

      With ``every=3`` (one regularized pair per 3 batches), draw :math:`b_2`
      only on the calls that consume it: four calls use six batches here.

      >>> tx = optax.chain(mg.dotprod(every=3), optax.adam(1e-2))
      >>> state = tx.init(params)
      >>> batches = iter([(x[i : i + 1], y[i : i + 1]) for i in range(6)])
      >>> for _ in range(4):
      ...   b1 = next(batches)
      ...   b2 = next(batches) if state[0].regularizes(3) else b1
      ...   g1 = jax.grad(loss)(params, b1)
      ...   grad_fn = lambda p: jax.grad(loss)(p, b2)
      ...   updates, state = tx.update(g1, state, params, grad_fn=grad_fn)
      ...   params = optax.apply_updates(params, updates)
      >>> print(int(state[0].count), next(batches, "no batch left"))
      4 no batch left

    References:
      Kedia et al., `Beyond Reptile: Meta-Learned Dot-Product Maximization
      between Gradients for Improved Single-Task Regularization
      <https://aclanthology.org/2021.findings-emnlp.37/>`_, Findings of EMNLP 2021.
    """
    if inner_alpha is not None:
        inner_alpha = _checks.hyperparameter("inner_alpha", inner_alpha, low=0)
    weight = _checks.hyperparameter(
        "weight", weight, low=0, low_inclusive=True, schedule=True, expected=_WEIGHT_TYPES
    )
    every = _checks.hyperparameter("every", every, integer=True, low=2, low_inclusive=True)
    scheme = _checks.one_of("scheme", scheme, _SCHEMES)
    mask = _checks.bool_mask("mask", mask)

    if axis_name is None:
        reduce = lambda tree: tree
    else:
        reduce = lambda tree: jax.lax.pmean(tree, axis_name)

    def init_fn(params: chex.ArrayTree) -> DotProdState:
        _check_not_masked(params)
        return DotProdState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: chex.ArrayTree,
        state: DotProdState,
        params: chex.ArrayTree | None = None,
        *,
        grad_fn: Callable[[chex.ArrayTree], chex.ArrayTree] | None = None,
        **extra_args: Any,
    ) -> tuple[chex.ArrayTree, DotProdState]:
        del extra_args
        _check_not_masked(updates, params)
        if grad_fn is None:
            raise ValueError(
                "dotprod needs grad_fn: call tx.update(g1, state, params, grad_fn=grad_fn) with "
                "grad_fn(p) returning the gradient of the loss on the second batch b2 at p"
            )
        _checks.callable_("grad_fn", grad_fn)
        if params is None:
            raise ValueError("dotprod needs params: call tx.update(g1, state, params, grad_fn=...)")
        _checks.same_structure("updates", updates, params)
        params = as_arrays(params)
        g1 = reduce(as_arrays(updates))
        w = weight(state.count) if callable(weight) else weight

        # With a mask, the regularizer acts on the selected leaves S only: the
        # direction is Ḡ1 on S and 0 elsewhere, so the difference quotient is
        # −H̄2[S, S]·Ḡ1[S] on S (the DotProd term of the loss as a function of
        # the S leaves, the others held fixed), and the unselected leaves get
        # Ḡ1 + Ḡ2 alone.
        treedef = jax.tree.structure(params)
        flags = None if mask is None else _checks.mask_flags("mask", mask, params)
        if flags is not None and all(flags):
            flags = None
        if flags is not None and not any(flags):
            raise ValueError("mask must select at least one leaf of params, got none selected")
        if flags is None:
            keep = jax.tree.unflatten(treedef, [True] * treedef.num_leaves)
            g1_sel = g1
        else:
            keep = jax.tree.unflatten(treedef, flags)
            g1_sel = jax.tree.map(lambda g, k: g if k else jnp.zeros_like(g), g1, keep)

        def grad(p):
            g = grad_fn(p)
            _check_grad_output(g, params)
            return reduce(as_arrays(g))

        def total(g2, g1g2):
            # Ḡ1 + Ḡ2 first, so that weight = 0 gives exactly their sum, while a
            # non-finite G1G2 still propagates (0 * nan = nan).
            return jax.tree.map(
                lambda a, b, c, k: (a + b + w * c if k else a + b).astype(a.dtype),
                g1, g2, g1g2, keep,
            )  # fmt: skip

        if scheme == "exact":
            # The primal output of the jvp is Ḡ2, so the regularized call costs
            # one gradient-and-HVP pass and no separate gradient.
            def regularized():
                g2, h_g1 = _hvp_with_grad(grad_fn, params, g1_sel)
                g2, h_g1 = reduce(g2), reduce(h_g1)
                return total(g2, jax.tree.map(jnp.negative, h_g1))

        else:

            def regularized():
                g2 = grad(params)
                # G1G2 = (g(θ − αḠ1) − Ḡ2)/α is the forward difference along −Ḡ1.
                minus_g1 = jax.tree.map(jnp.negative, g1_sel)
                step = inner_alpha
                if step is None and flags is not None:
                    # The automatic step of the selected leaves, which alone move.
                    def selected(tree):
                        leaves = jax.tree.leaves(tree)
                        return [x for x, k in zip(leaves, flags, strict=True) if k]

                    step = fd_step(selected(params), selected(minus_g1), scheme)
                g1g2 = _fd_hvp(
                    grad_fn, params, minus_g1, step, scheme, grad_at_params=g2, reduce=reduce
                )
                return total(g2, g1g2)

        def standard():
            # A standard single-batch step: Ḡ1 alone, grad_fn (b2) not evaluated.
            return g1

        if isinstance(every, int) and every == 2:
            new_updates = regularized()
        else:
            new_updates = jax.lax.cond(_regularized_call(state.count, every), regularized, standard)
        return new_updates, DotProdState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
