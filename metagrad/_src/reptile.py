"""Reptile as a meta-batch learner: `reptile` (the optax wrapper is `metagrad.reptile_outer`).

Reptile (Nichol et al., 2018) runs K steps of an inner optimizer from the
shared weights φ, reaching θ_K, and then moves φ towards θ_K:
φ ← φ − η·(φ − θ_K). Dou et al. (2019) use it for multi-task NLU with a
meta-batch of tasks whose meta-gradients φ − θ_K are averaged (references in
`reptile`'s docstring).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from metagrad._src import base as _base
from metagrad._src.adapt import adapt
from metagrad._src.base import MetaLearner, meta_learner
from metagrad._src.inner_loop import inner_loop, start_step, task_states
from metagrad._src.inner_rules import as_inner_rule, fixed_inner
from metagrad._src.options import LearnerOptions, Unpack, check_learner, learner_options

Params = chex.ArrayTree


class ReptileState(NamedTuple):
    """State of the `reptile` and `seq_reptile` meta-learners.

    Attributes:
      params: the learned initialization φ.
      outer_state: state of the outer optimizer.
      inner_state: the inner optimizer state carried across outer steps, or
        None when it is reset at every outer step (``reset_inner_state=True``).
    """

    params: Params
    outer_state: optax.OptState
    inner_state: optax.OptState | None


def reptile_init(
    outer: optax.GradientTransformation,
    inner: optax.GradientTransformation,
    reset_inner_state: bool,
    params: Params,
) -> ReptileState:
    """The ``init`` of `reptile` and `seq_reptile`: the outer state at ``params``, and the
    inner state to carry (None when reset at every outer step)."""
    params = jax.tree.map(jnp.asarray, params)
    return ReptileState(
        params=params,
        outer_state=outer.init(params),
        inner_state=None if reset_inner_state else inner.init(params),
    )


@learner_options
def reptile(
    loss_fn: Callable[[Params, Any], chex.Array],
    inner: float | optax.Schedule | optax.GradientTransformation,
    inner_steps: int,
    outer: float | optax.Schedule | optax.GradientTransformation,
    *,
    batch_per_step: bool = False,
    **options: Unpack[LearnerOptions],
) -> MetaLearner:
    """Parallel (meta-batch) Reptile as a jitted meta-step.

    For each task t of a meta-batch of T tasks, K = ``inner_steps`` steps of
    ``inner`` on the task's support batch from φ reach θ_K^t; the
    meta-gradient is their mean displacement and any optax optimizer applies
    it:

    .. math::

      MG = \\frac{1}{T} \\sum_t (φ − θ_K^t), \\qquad
      φ ← φ + \\text{outer.update}(MG).

    ``outer = optax.sgd(eta)`` (or the float ``eta``) is classic Reptile
    φ ← φ − η·MG (Nichol et al., 2018; Dou et al., 2019, Section 2.3).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, one task's loss on a batch.
      inner: the inner optimizer, any optax transformation, or a step size α (a float or
        an optax schedule) meaning ``optax.sgd(α)``.
      inner_steps: K >= 1.
      outer: the optimizer applied to MG (its update is added to φ), or a
        float / schedule η meaning ``optax.sgd(η)``.
      batch_per_step: how the support batches feed the inner loop. False
        (default): every support leaf is ``[T, ...]`` and task t reuses its
        batch at all K steps; True: support leaves are ``[T, K, ...]`` and
        step k uses batch k.
      **options: the keywords every meta-learner shares, `LearnerOptions`.

    ``reset_inner_state=False`` makes a serial Reptile that never resets its optimizer
    parallel (our choice): each task starts from the carried inner state.

    A non-finite task loss makes the meta-gradient non-finite; pass
    ``outer=optax.apply_if_finite(opt, max_consecutive_errors)`` to skip such
    outer steps. A carried inner state keeps its previous value when its
    update is non-finite, so one bad task does not poison later steps.

    Returns:
      A `MetaLearner`: ``init(params) -> ReptileState``;
      ``step(state, tasks) -> (state, metrics)``, jitted, with
      ``tasks = (support, query)`` as in `metagrad.maml` (every leaf with a
      leading task axis T; the query batches are only evaluated, Reptile
      trains on the support batches) and the metrics of every metagrad
      meta-learner: ``"loss"`` and ``"loss_post"`` (mean query loss after
      adaptation: Reptile optimizes no explicit objective, so ``loss`` is the
      one MAML minimizes, to compare learners), ``"loss_pre"`` (mean support
      loss at φ), ``"meta_grad_norm"`` (‖MG‖) and optionally ``"alignment"``;
      ``adapt(state, support, num_steps=None)`` runs `adapt` from
      ``state.params`` with a fresh inner state on one task's batch (reused at
      every step), ``num_steps`` defaulting to ``inner_steps``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import metagrad as mg
      >>> loss_fn = lambda p, b: jnp.sum((p - b) ** 2)
      >>> learner = mg.reptile(loss_fn, optax.sgd(0.1), 5, optax.sgd(1.0))
      >>> state = learner.init(jnp.zeros(2))
      >>> targets = jnp.array([[1.0, 0.0], [-1.0, 2.0]])  # one target per task
      >>> tasks = (targets, targets)  # (support, query)
      >>> for _ in range(50):
      ...     state, metrics = learner.step(state, tasks)
      >>> print([round(float(x), 3) for x in state.params])  # the tasks' mean
      [0.0, 1.0]

    References:
      Nichol, Achiam, Schulman, `On First-Order Meta-Learning Algorithms
      <https://arxiv.org/abs/1803.02999>`_, 2018.

      Dou, Yu, Anastasopoulos, `Investigating Meta-Learning Algorithms for
      Low-Resource Natural Language Understanding Tasks
      <https://arxiv.org/abs/1908.10423>`_, EMNLP 2019.
    """
    inner_steps, outer_tx, opts = check_learner(
        "reptile", loss_fn, inner_steps, outer, options, batch_per_step=batch_per_step
    )
    inner = fixed_inner("reptile", inner)
    rule = as_inner_rule(inner)

    def step_fn(state, tasks):
        support, query, run_tasks, step_mode = start_step(
            loss_fn, state.params, tasks, alignment=opts.alignment, task_loop=opts.task_loop,
            step_loop=opts.step_loop, num_steps=inner_steps, batch_per_step=batch_per_step,
        )  # fmt: skip
        phi = state.params
        inner_states = task_states(
            inner.init, phi, state.inner_state, run_tasks.num_tasks,
            reset=opts.reset_inner_state, axis_name=opts.axis_name,
        )  # fmt: skip
        # Each device adapts its own tasks: see `to_varying` for why φ is cast.
        thetas, inner_states, _, outs = inner_loop(
            loss_fn, rule, _base.to_varying(phi, opts.axis_name), (), (), inner_states, support,
            None, inner_steps, task_loop=run_tasks.mode, step_loop=step_mode,
            alignment=opts.alignment, batch_per_step=batch_per_step,
        )  # fmt: skip
        query_losses = run_tasks.map(loss_fn, thetas, query, False)
        thetas = run_tasks.stacked(thetas, False)
        meta_grad = jax.tree.map(lambda p, t: jnp.mean(p[None] - t, axis=0), phi, thetas)
        if opts.axis_name is not None:
            meta_grad = jax.lax.pmean(meta_grad, opts.axis_name)
        outer_updates, outer_state = outer_tx.update(meta_grad, state.outer_state, phi)
        new_phi = optax.apply_updates(phi, outer_updates)
        loss_post = jnp.mean(query_losses)
        metrics = {
            "loss": loss_post,
            "loss_pre": jnp.mean(outs["support_loss"][0]),
            "loss_post": loss_post,
            "meta_grad_norm": _base.global_norm(meta_grad),
        }
        if opts.alignment:
            metrics["alignment"] = outs["alignment"]
        new_inner_state = None
        if not opts.reset_inner_state:
            # A non-finite task must not poison the state carried to later steps.
            new_inner_state = _base.keep_if_finite(
                _base.mean_over_tasks(inner_states, opts.axis_name), state.inner_state
            )
        if opts.axis_name is not None:
            metrics = jax.lax.pmean(metrics, opts.axis_name)
        new_state = ReptileState(
            params=new_phi, outer_state=outer_state, inner_state=new_inner_state
        )
        return new_state, metrics

    def adapt_fn(state, support, num_steps=None):
        return adapt(
            loss_fn, inner, state.params, support, inner_steps if num_steps is None else num_steps
        )

    return meta_learner(
        functools.partial(reptile_init, outer_tx, inner, opts.reset_inner_state),
        step_fn,
        jax.jit(adapt_fn, static_argnames="num_steps"),
        state_type=ReptileState,
    )
