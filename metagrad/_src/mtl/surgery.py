"""Multi-task gradient surgery: plain MTL, PCGrad and GradVac as optax transformations.

These are the multi-task baselines of Lee et al., `Sequential Reptile: Inter-Task Gradient
Alignment for Multilingual Learning <https://openreview.net/forum?id=ivQruFJXNI>`_ (ICLR 2022):
plain multi-task learning (the sum of the task gradients), PCGrad (Yu et al., 2020) and GradVac
(Wang et al., 2021). GradNorm and RecAdam have modules of their own in `metagrad._src.mtl`.

Every combiner here takes per-task gradients stacked on a leading task axis (each leaf of the
update has shape ``[T, *param_shape]``, as `jax.vmap` of a per-task gradient gives) and returns
one combined gradient without the task axis, so it chains with any optimizer::

    per_task = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, task_batches)
    tx = optax.chain(mg.pcgrad(seed=0), optax.adam(1e-3))
    updates, state = tx.update(per_task, state, params)

Both surgeries act on linear combinations of the original task gradients, so they are computed
in the T×T space of the Gram matrix ``G_ij = <g_i, g_j>``: each surgered gradient is
``g_i' = sum_j C_ij g_j`` and the output is ``sum_j (sum_i C_ij) g_j``. The parameter-sized work
is one Gram matrix and one weighted sum per leaf, whatever the number of projections.

An aggregator changes the updates' shapes ([T, ...] in, [...] out), so it goes first in a chain
and optax wrappers that re-run their inner transformation on updates of the params' shape go
after it, around the optimizer:

- Non-finite values: ``optax.chain(mg.pcgrad(), optax.apply_if_finite(optax.adam(lr), n))``.
  A non-finite task gradient (or, for GradNorm, task loss) is not filtered: it propagates into
  the combined gradient, which the guard then skips, while every aggregator keeps its state
  (GradVac's targets, GradNorm's weights, counters and PRNG keys) unchanged on that step. So a
  skipped step leaves no trace: the state and params equal a run without that step.
- Gradient accumulation: ``optax.chain(mg.pcgrad(), optax.MultiSteps(optax.adam(lr), k))``; the
  aggregator combines each mini-batch's task gradients, MultiSteps averages the combined ones.

An aggregator placed inside `optax.apply_if_finite` or `optax.MultiSteps` raises a `ValueError`
that gives the placement above, and one given an already-combined gradient (leaves of the
params' shape) says so.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metagrad._src import checks as _checks
from metagrad._src.diagnostics import leaf_grams
from metagrad._src.mtl import base as _aggregate
from metagrad._src.mtl.base import EXACT as _EXACT
from metagrad._src.mtl.base import check_reduction as _check_reduction
from metagrad._src.mtl.base import check_task_axis, combine, keep_state_if_finite
from metagrad._src.mtl.base import reduce as _reduce

_GRANULARITIES = ("global", "leaf")


def _key_from_seed(seed: int | jax.Array) -> jax.Array:
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return jax.random.PRNGKey(int(seed))
    if isinstance(seed, jax.Array):
        if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
            return jax.random.key_data(seed)
        if seed.dtype == jnp.uint32 and seed.shape == (2,):
            return seed
        if jnp.issubdtype(seed.dtype, jnp.integer) and seed.ndim == 0:
            return jax.random.PRNGKey(seed)  # e.g. under optax.inject_hyperparams
    raise TypeError(
        f"seed must be an int or a jax.random key, got {seed!r} of type {type(seed).__name__}"
    )


def _orders(key: jax.Array, num_tasks: int, shuffle: bool) -> jax.Array:
    """Visiting order of the tasks, one row per task i (i itself is skipped when visited)."""
    if not shuffle:
        return jnp.tile(jnp.arange(num_tasks), (num_tasks, 1))
    keys = jax.random.split(key, num_tasks)
    return jax.vmap(lambda k: jax.random.permutation(k, num_tasks))(keys)


def _grams_for(updates: Any, granularity: str) -> jax.Array:
    grams = leaf_grams(updates)
    return jnp.sum(grams, axis=0, keepdims=True) if granularity == "global" else grams


# --------------------------------------------------------------------------------------------
# Plain MTL.


def mtl_sum(*, reduction: str = "sum") -> optax.GradientTransformation:
    """Plain multi-task learning: combines per-task gradients by summing over the task axis.

    .. math:: g = \\sum_{t=1}^T g_t \\quad (\\text{or } \\tfrac1T \\sum_t g_t)

    The Sequential Reptile paper's MTL baseline minimises the sum of the task losses (its Eq. 1),
    whose gradient is the sum; ``reduction="mean"`` gives the mean, the same direction with a
    step T times smaller (equivalently, a learning rate divided by T).

    Args:
      reduction: ``"sum"`` (default, the paper's MTL objective) or ``"mean"``.

    Returns:
      An `optax.GradientTransformation` mapping updates with leaves ``[T, ...]`` to the combined
      gradient with leaves ``[...]``; its state is empty.

    Example:
      >>> import jax.numpy as jnp, metagrad as mg
      >>> tx = mg.mtl_sum()
      >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])}  # 3 tasks
      >>> out, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
      >>> out["w"].tolist()
      [2.0, 3.0]

    References:
      Lee et al., `Sequential Reptile: Inter-Task Gradient Alignment for Multilingual Learning
      <https://openreview.net/forum?id=ivQruFJXNI>`_, ICLR 2022 (Eq. 1).
    """
    _check_reduction(reduction)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        num_tasks = check_task_axis(updates, params, name="mtl_sum")
        weights = _reduce(jnp.ones((num_tasks,)), reduction, num_tasks)
        return combine(updates, weights), state

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# PCGrad.


class PCGradState(NamedTuple):
    """State of `pcgrad`."""

    count: chex.Array  # int32 scalar, calls so far
    key: chex.Array  # uint32[2] PRNG key for the visiting orders


def _pcgrad_coefficients(gram: jax.Array, orders: jax.Array) -> jax.Array:
    """C with g_i' = sum_j C_ij g_j after PCGrad's projections, from the Gram matrix."""
    num_tasks = gram.shape[0]
    eye = jnp.eye(num_tasks, dtype=gram.dtype)
    diag = jnp.diagonal(gram)
    safe_sq = jnp.where(diag > 0, diag, 1.0)

    def one_task(i, order):
        def visit(c, j):
            # <g_i', g_j> with the surgered g_i' and the ORIGINAL g_j (Yu et al., Algorithm 1).
            dot = jnp.dot(c, gram[:, j], precision=_EXACT)
            conflict = (j != i) & (dot < 0)
            return c - jnp.where(conflict, dot / safe_sq[j], 0.0) * eye[j], None

        c, _ = jax.lax.scan(visit, eye[i], order)
        return c

    return jax.vmap(one_task)(jnp.arange(num_tasks), orders)


def pcgrad(
    *,
    seed: int | jax.Array = 0,
    reduction: str = "sum",
    shuffle: bool = True,
    granularity: str = "global",
) -> optax.GradientTransformation:
    """PCGrad: projects each task gradient off the task gradients it conflicts with.

    For each task i, starting from g_i' = g_i, visit the other tasks j in a random order and
    remove the conflicting component along the original g_j:

    .. math::
      \\text{if } \\langle g_i', g_j\\rangle < 0:\\quad
      g_i' \\leftarrow g_i' - \\frac{\\langle g_i', g_j\\rangle}{\\|g_j\\|^2} g_j,
      \\qquad g = \\sum_i g_i'.

    Non-conflicting task gradients pass unchanged (the output is then the plain sum). Each task
    i gets its own random order, a permutation drawn from a PRNG key held in the state (seeded
    by `seed` at construction and split every call), so runs are reproducible and checkpointable.

    Args:
      seed: an int or a `jax.random` key seeding the visiting orders.
      reduction: ``"sum"`` (default, as in the paper) or ``"mean"`` over the surgered gradients.
      shuffle: if False, visit the tasks in index order 0..T-1 (deterministic; not the paper).
      granularity: ``"global"`` (default: dot products over the whole model, as in the paper)
        or ``"leaf"`` (each parameter leaf gets its own projections).

    Returns:
      An `optax.GradientTransformation` from leaves ``[T, ...]`` to the combined gradient. A step
      with non-finite task gradients returns a non-finite update and leaves the state (count
      and key) unchanged, for ``optax.apply_if_finite`` after it (see the module docstring).

    Example:
      >>> import jax.numpy as jnp, metagrad as mg
      >>> tx = mg.pcgrad(seed=0)
      >>> g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])  # conflicting: <g1, g2> = -1
      >>> out, state = tx.update(g, tx.init(jnp.zeros(2)))
      >>> out.tolist()  # g1 -> (0.5, 0.5), g2 -> (0, 1)
      [0.5, 1.5]

    References:
      Yu et al., `Gradient Surgery for Multi-Task Learning <https://arxiv.org/abs/2001.06782>`_,
      NeurIPS 2020 (Algorithm 1).
    """
    key0 = _key_from_seed(seed)
    _check_reduction(reduction)
    _checks.one_of("granularity", granularity, _GRANULARITIES)
    _checks.boolean("shuffle", shuffle)

    def init_fn(params):
        del params
        return PCGradState(count=jnp.zeros([], jnp.int32), key=key0)

    def update_fn(updates, state, params=None):
        num_tasks = check_task_axis(updates, params, name="pcgrad")
        key, sub = jax.random.split(state.key)
        orders = _orders(sub, num_tasks, shuffle)
        grams = _grams_for(updates, granularity)
        coeffs = jax.vmap(_pcgrad_coefficients, in_axes=(0, None))(grams, orders)
        weights = _reduce(jnp.sum(coeffs, axis=1), reduction, num_tasks)  # [groups, T]
        weights = weights[0] if granularity == "global" else weights
        out = combine(updates, weights)
        new_state = PCGradState(count=optax.safe_increment(state.count), key=key)
        return out, keep_state_if_finite(out, new_state, state)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# GradVac.


class GradVacState(NamedTuple):
    """State of `gradvac`."""

    count: chex.Array  # int32 scalar, calls so far
    key: chex.Array  # uint32[2] PRNG key for the visiting orders
    target: chex.Array  # [groups, T, T] EMA target cosine phi_hat_ij (groups = 1 or #leaves)


def _gradvac_coefficients(gram, orders, target, beta, eps):
    """GradVac's C (g_i' = sum_j C_ij g_j) and the updated EMA targets, from the Gram matrix."""
    num_tasks = gram.shape[0]
    eye = jnp.eye(num_tasks, dtype=gram.dtype)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))

    def one_task(i, order, target_row):
        def visit(carry, j):
            c, row = carry
            gc = jnp.dot(gram, c, precision=_EXACT)
            norm_i = jnp.sqrt(jnp.maximum(jnp.dot(c, gc, precision=_EXACT), 0.0))
            phi = jnp.dot(c, gram[:, j], precision=_EXACT) / (norm_i * norms[j] + eps)
            phi_hat = row[j]
            sin = jnp.sqrt(jnp.maximum(1.0 - phi**2, 0.0))
            sin_hat = jnp.sqrt(jnp.maximum(1.0 - phi_hat**2, 0.0))
            # The coefficient that brings cos(g_i', g_j) up to phi_hat (Wang et al., Eq. 3).
            w = norm_i * (phi_hat * sin - phi * sin_hat) / (norms[j] * sin_hat + eps)
            other = j != i
            c = c + jnp.where(other & (phi < phi_hat), w, 0.0) * eye[j]
            row = row.at[j].set(jnp.where(other, (1.0 - beta) * phi_hat + beta * phi, phi_hat))
            return (c, row), None

        (c, row), _ = jax.lax.scan(visit, (eye[i], target_row), order)
        return c, row

    return jax.vmap(one_task)(jnp.arange(num_tasks), orders, target)


def gradvac(
    num_tasks: int,
    *,
    beta: float = 0.01,
    seed: int | jax.Array = 0,
    reduction: str = "sum",
    shuffle: bool = True,
    granularity: str = "global",
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """GradVac (Gradient Vaccine): raises each pairwise cosine toward an EMA target.

    Keeps a target cosine similarity per task pair, phi_hat_ij (initially 0). For each task i,
    starting from g_i' = g_i, visit the other tasks j in a random order; with
    phi_ij = cos(g_i', g_j):

    .. math::
      \\text{if } \\phi_{ij} < \\hat\\phi_{ij}:\\quad
      g_i' \\leftarrow g_i' + \\frac{\\|g_i'\\| (\\hat\\phi_{ij}\\sqrt{1-\\phi_{ij}^2}
        - \\phi_{ij}\\sqrt{1-\\hat\\phi_{ij}^2})}{\\|g_j\\| \\sqrt{1-\\hat\\phi_{ij}^2}} g_j,
      \\qquad \\hat\\phi_{ij} \\leftarrow (1-\\beta)\\hat\\phi_{ij} + \\beta \\phi_{ij},

    and return g = sum_i g_i'. The adjustment makes cos(g_i', g_j) equal phi_hat_ij. Choices
    where the paper is brief: phi_ij is measured with the partly adjusted g_i' and the original
    g_j, the target is updated with that phi_ij for every visited pair (adjusted or not), and
    the order is random per task, as in PCGrad.

    Args:
      num_tasks: T, the size of the leading task axis (fixes the shape of the targets).
      beta: EMA rate of the targets, in (0, 1]. Default 0.01 (a choice).
      seed: an int or a `jax.random` key seeding the visiting orders.
      reduction: ``"sum"`` (default) or ``"mean"`` over the adjusted gradients.
      shuffle: if False, visit tasks in index order (deterministic).
      granularity: ``"global"`` (default: one target per pair for the whole model, the paper's
        "whole model" variant) or ``"leaf"`` (one target per pair and per parameter leaf, the
        finest of the paper's granularities).
      eps: added to the denominators of the cosine and of the coefficient.

    Returns:
      An `optax.GradientTransformation` from leaves ``[T, ...]`` to the combined gradient; its
      state holds the targets, shape ``[groups, T, T]``. A step with non-finite task gradients
      returns a non-finite update and leaves the state unchanged (see the module docstring for
      the guard). Works under `optax.inject_hyperparams` (``static_args=("num_tasks",)``) with
      `beta` and `eps` injected.

    Example:
      >>> import jax.numpy as jnp, metagrad as mg
      >>> tx = mg.gradvac(num_tasks=2, beta=0.5)
      >>> g = jnp.array([[1.0, 0.0], [0.0, 1.0]])  # orthogonal: phi = 0 = initial target
      >>> out, state = tx.update(g, tx.init(jnp.zeros(2)))
      >>> out.tolist(), state.target.shape
      ([1.0, 1.0], (1, 2, 2))

    References:
      Wang et al., `Gradient Vaccine: Investigating and Improving Multi-task Optimization in
      Massively Multilingual Models <https://arxiv.org/abs/2010.05874>`_, ICLR 2021.
    """
    num_tasks = _aggregate.num_tasks_arg(num_tasks)
    beta = _checks.hyperparameter("beta", beta, low=0, high=1)
    eps = _checks.hyperparameter("eps", eps, low=0, low_inclusive=True)
    key0 = _key_from_seed(seed)
    _check_reduction(reduction)
    _checks.one_of("granularity", granularity, _GRANULARITIES)
    _checks.boolean("shuffle", shuffle)

    def init_fn(params):
        groups = 1 if granularity == "global" else len(jax.tree.leaves(params))
        dtype = jnp.result_type(float)
        return GradVacState(
            count=jnp.zeros([], jnp.int32),
            key=key0,
            target=jnp.zeros((groups, num_tasks, num_tasks), dtype),
        )

    def update_fn(updates, state, params=None):
        check_task_axis(updates, params, num_tasks, name="gradvac")
        groups = 1 if granularity == "global" else len(jax.tree.leaves(updates))
        if state.target.shape != (groups, num_tasks, num_tasks):
            raise ValueError(
                f"state.target has shape {state.target.shape}, expected "
                f"{(groups, num_tasks, num_tasks)}: was the state initialised with these params?"
            )
        key, sub = jax.random.split(state.key)
        orders = _orders(sub, num_tasks, shuffle)
        grams = _grams_for(updates, granularity).astype(state.target.dtype)
        coeffs, target = jax.vmap(_gradvac_coefficients, in_axes=(0, None, 0, None, None))(
            grams, orders, state.target, beta, eps
        )
        weights = _reduce(jnp.sum(coeffs, axis=1), reduction, num_tasks)
        weights = weights[0] if granularity == "global" else weights
        out = combine(updates, weights)
        new_state = GradVacState(count=optax.safe_increment(state.count), key=key, target=target)
        return out, keep_state_if_finite(out, new_state, state)

    return optax.GradientTransformation(init_fn, update_fn)
