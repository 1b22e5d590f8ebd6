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
import numpy as np
import optax

from metagrad import _checks
from metagrad.hvp import _check_grad_output, _fd_hvp, _hvp_with_grad

_SCHEMES = ("forward", "central", "exact")


class DotProdState(NamedTuple):
    """State of :func:`dotprod`."""

    count: jax.Array  # int32 scalar, calls of `update` so far


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _scalar_array(name: str, x: Any) -> None:
    if np.shape(x) != ():
        raise ValueError(f"{name} must be a scalar, got an array of shape {np.shape(x)}")


def _check_inner_alpha(inner_alpha: Any) -> Any:
    if inner_alpha is None:
        return None
    if _is_array(inner_alpha):
        # `optax.inject_hyperparams` passes hyper-parameters as (possibly traced)
        # arrays; check the value whenever it is known.
        _scalar_array("inner_alpha", inner_alpha)
        if _concrete(inner_alpha):
            _checks.positive_float("inner_alpha", float(inner_alpha))
        return inner_alpha
    return _checks.positive_float("inner_alpha", inner_alpha)


def _check_weight(weight: Any) -> Any:
    if callable(weight):
        return weight
    if _is_array(weight):
        _scalar_array("weight", weight)
        if _concrete(weight):
            _checks.finite_float("weight", float(weight))
        return weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer, np.floating)):
        raise TypeError(
            "weight must be a float, a scalar array or an optax schedule (a callable of the "
            f"step count), got {weight!r} of type {type(weight).__name__}"
        )
    return _checks.finite_float("weight", weight)


def _check_every(every: Any) -> Any:
    if _is_array(every):
        _scalar_array("every", every)
        if not jnp.issubdtype(every.dtype, jnp.integer):
            raise TypeError(f"every must be an integer >= 1, got an array of dtype {every.dtype}")
        if _concrete(every):
            _checks.positive_int("every", int(every))
        return every
    return _checks.positive_int("every", every)


def dotprod(
    inner_alpha: float | jax.Array | None = None,
    weight: float | jax.Array | optax.Schedule = 0.1,
    *,
    every: int | jax.Array = 1,
    scheme: str = "forward",
    batch_axis_name: Hashable | None = None,
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
    such as Adam are unaffected.

    Cost per call: two evaluations of `grad_fn` (``"forward"``), three
    (``"central"``), or one gradient plus one forward-over-reverse HVP
    (``"exact"``), on top of :math:`\bar G_1` computed by the caller: 1.5x a
    plain step on the same two batches for ``"forward"``, and
    :math:`1 + 1/(2n)` with ``every=n``.

    Args:
      inner_alpha: the finite-difference step :math:`\alpha` > 0, or ``None``
        (default) for the automatic scale-aware step
        ``(eps * (1 + ||theta||))**p / ||G1||`` (``p = 1/2`` forward, ``1/3``
        central, see :func:`metagrad.fd_step`). The paper's fixed
        ``inner_alpha=1e-7`` is reproduced exactly but is only accurate in
        float64: in float32 it is below the resolution of typical weights and
        :math:`G_1G_2` is round-off noise. Ignored by ``scheme="exact"``.
      weight: the weight of :math:`G_1G_2` (the paper's :math:`LR_{G_1G_2}`,
        default 0.1): a float, a scalar array, or an optax schedule called with
        the state's count.
      every: apply the regularizer on calls ``count % every == 0`` only, i.e.
        the 1st, (n+1)-th, (2n+1)-th, ... calls (the paper's infrequent
        regularization). The other calls return :math:`\bar G_1 + \bar G_2` and,
        through ``jax.lax.cond``, never evaluate :math:`G_{2,1}`.
      scheme: ``"forward"`` (the paper's one-sided difference), ``"central"``
        (:math:`(g(\theta - \alpha\bar G_1) - g(\theta + \alpha\bar G_1))/(2\alpha)`,
        O(alpha**2) accurate, one more gradient) or ``"exact"``
        (:math:`-\bar H_2 \bar G_1` by :func:`metagrad.hvp`).
      batch_axis_name: for data parallelism under ``jax.pmap`` / ``shard_map``:
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

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose update is called as
      ``tx.update(g1, state, params, grad_fn=grad_fn)`` (also through
      ``optax.chain``, ``optax.MultiSteps``, ``optax.inject_hyperparams`` and
      ``flax.nnx.Optimizer.update(model, grads, grad_fn=grad_fn)``).
      `grad_fn(p)` must return a pytree with the structure of `params`. Other
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

    References:
      Kedia et al., `Beyond Reptile: Meta-Learned Dot-Product Maximization
      between Gradients for Improved Single-Task Regularization
      <https://aclanthology.org/2021.findings-emnlp.37/>`_, Findings of EMNLP 2021.
    """
    inner_alpha = _check_inner_alpha(inner_alpha)
    weight = _check_weight(weight)
    every = _check_every(every)
    scheme = _checks.one_of("scheme", scheme, _SCHEMES)

    if batch_axis_name is None:
        reduce = lambda tree: tree
    else:
        reduce = lambda tree: jax.lax.pmean(tree, batch_axis_name)

    def init_fn(params: chex.ArrayTree) -> DotProdState:
        del params
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
        if grad_fn is None:
            raise ValueError(
                "dotprod needs grad_fn: call tx.update(g1, state, params, grad_fn=grad_fn) with "
                "grad_fn(p) returning the gradient of the loss on the second batch b2 at p"
            )
        _checks.callable_("grad_fn", grad_fn)
        if params is None:
            raise ValueError("dotprod needs params: call tx.update(g1, state, params, grad_fn=...)")
        _checks.same_structure("updates", updates, params)
        g1 = reduce(updates)
        w = weight(state.count) if callable(weight) else weight

        def grad(p):
            g = grad_fn(p)
            _check_grad_output(g, params)
            return reduce(g)

        def total(g2, g1g2=None):
            # Ḡ1 + Ḡ2 first, so that weight = 0 (or a skipped call) gives exactly
            # their sum, while a non-finite G1G2 still propagates (0 * nan = nan).
            if g1g2 is None:
                return jax.tree.map(lambda a, b: (a + b).astype(a.dtype), g1, g2)
            return jax.tree.map(lambda a, b, c: (a + b + w * c).astype(a.dtype), g1, g2, g1g2)

        if scheme == "exact":
            # The primal output of the jvp is Ḡ2, so the regularized call costs
            # one gradient-and-HVP pass and no separate gradient.
            def regularized():
                g2, h_g1 = _hvp_with_grad(grad_fn, params, g1)
                g2, h_g1 = reduce(g2), reduce(h_g1)
                return total(g2, jax.tree.map(jnp.negative, h_g1))

            def plain():
                return total(grad(params))

        else:
            g2 = grad(params)

            def regularized():
                # G1G2 = (g(θ − αḠ1) − Ḡ2)/α is the forward difference along −Ḡ1.
                minus_g1 = jax.tree.map(jnp.negative, g1)
                g1g2 = _fd_hvp(
                    grad_fn, params, minus_g1, inner_alpha, scheme, grad_at_params=g2, reduce=reduce
                )
                return total(g2, g1g2)

            def plain():
                return total(g2)

        if isinstance(every, int) and every == 1:
            new_updates = regularized()
        else:
            new_updates = jax.lax.cond(state.count % every == 0, regularized, plain)
        return new_updates, DotProdState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
