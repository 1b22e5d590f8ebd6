"""Sequential Reptile: one inner trajectory over batches drawn across tasks.

Lee et al. (2022) replace Reptile's per-task inner trajectories by a single
trajectory whose K batches come from tasks t_k ~ Cat(p_1..p_T) (Algorithm 1,
Appendix A). The implicit objective then rewards aligned gradients *between
different tasks* (their Eq. 7 and Appendix C).

References:
  Lee, Lee, Lee, Hwang, `Sequential Reptile: Inter-Task Gradient Alignment for
  Multilingual Learning <https://arxiv.org/abs/2110.02600>`_, ICLR 2022.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metagrad._src import checks as _checks
from metagrad._src import loops as _loops
from metagrad._src.adapt import adapt, one_task
from metagrad._src.base import MetaLearner, global_norm, keep_if_finite, meta_learner
from metagrad._src.diagnostics import mean_pairwise_cosine, task_gradients
from metagrad._src.inner_loop import describe
from metagrad._src.inner_rules import fixed_inner
from metagrad._src.options import LearnerOptions, Unpack, check_learner, learner_options
from metagrad._src.reptile import ReptileState, reptile_init

Params = chex.ArrayTree

_FORMAT = (
    "seq_reptile takes tasks = (task_ids[K], batches[K, ...]), one trajectory of K = "
    "inner_steps batches, not (support, query); draw the ids with "
    "mg.sample_tasks(key, mg.task_probs(sizes, q), K) and stack batch k of task task_ids[k] "
    "as slice k"
)


def _required_positional(fn: Callable[..., chex.Array]) -> int:
    """The number of positional parameters of ``fn`` without a default (0 if unknown)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 0
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in parameters)


@learner_options
def seq_reptile(
    loss_fn: Callable[..., chex.Array],
    inner: float | optax.Schedule | optax.GradientTransformation,
    inner_steps: int,
    outer: float | optax.Schedule | optax.GradientTransformation,
    *,
    pass_task_id: bool = False,
    **options: Unpack[LearnerOptions],
) -> MetaLearner:
    """Sequential Reptile (Lee et al., 2022, Algorithm 1) as a jitted meta-step.

    From θ_0 = φ, K = ``inner_steps`` steps of ``inner``, step k on a batch
    B_k of task t_k (the batches and ids are the step's input), then the
    Reptile outer update:

    .. math::

      θ_k = θ_{k−1} + \\text{inner.update}(∇L(θ_{k−1}; B_k, t_k)), \\qquad
      MG = φ − θ_K, \\qquad φ ← φ + \\text{outer.update}(MG).

    ``outer = optax.sgd(eta)`` (or the float ``eta``) is the paper's
    φ ← φ − η·MG (η = 0.1 in the paper, with AdamW inner steps). Draw the task
    ids with `sample_tasks` and `task_probs` (the paper's i.i.d. t_k ~ Cat(p),
    p_t ∝ N_t^q), or with `uniform_tasks` (``order="round_robin"`` visits the
    tasks in a fixed cyclic order instead, which the paper does not do).

    Input format: ``tasks = (task_ids, batches)`` with ``task_ids`` an int
    array of shape ``[K]`` and every leaf of ``batches`` of shape ``[K, ...]``
    (batch k is slice k). Batches of all tasks must therefore share shapes;
    tasks with different data can pass indices in the batch and let
    ``loss_fn`` look the data up by task id (e.g. with `jax.lax.switch`).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, as for every metagrad
        learner, or ``loss_fn(params, batch, task_id)`` with
        ``pass_task_id=True`` (``task_id`` an int32 scalar, e.g. to pick a task
        head).
      inner: the inner optimizer, any optax transformation, or a step size α (a float or
        an optax schedule) meaning ``optax.sgd(α)``.
      inner_steps: K >= 1, the trajectory length (``task_ids`` has K entries).
      outer: the optimizer applied to MG (its update is added to φ), or a
        float / schedule η meaning ``optax.sgd(η)``.
      pass_task_id: whether ``loss_fn`` takes the task id (default False).
      **options: the keywords every meta-learner shares, `LearnerOptions`.

    On one trajectory the shared keywords mean: ``reset_inner_state=False``, the inner state
    carries over from the previous trajectory (the paper does not say; resetting makes each
    outer step a function of φ alone); ``alignment``, the mean cosine between the gradients
    at φ of the K batches over pairs from different tasks (NaN if all K come from one
    task), K extra gradient evaluations (vmapped), so it needs ``inner_steps >= 2``;
    ``axis_name``, every batch's examples split along the mapped axis, each inner gradient
    and loss averaged over it (the single-device step when ``loss_fn`` is a mean over
    equally sized shards; the trajectory itself is sequential); ``task_loop`` is accepted
    and checked but has no effect (one trajectory, no task axis to execute).

    A non-finite batch loss makes the meta-gradient non-finite; pass
    ``outer=optax.apply_if_finite(opt, max_consecutive_errors)`` to skip such
    outer steps. A carried inner state keeps its previous value when its
    update is non-finite.

    Returns:
      A `MetaLearner`: ``init(params) -> ReptileState``;
      ``step(state, tasks) -> (state, metrics)``, jitted, with the metrics
      of every metagrad learner that apply to one trajectory without query
      batches: ``"loss"`` (mean inner loss along the trajectory),
      ``"loss_pre"`` (loss at φ on B_1), ``"meta_grad_norm"`` (‖MG‖) and
      optionally ``"alignment"``; ``adapt(state, support, num_steps=None)``
      runs `adapt` from ``state.params`` with a fresh inner state, where
      ``support`` is a batch (or ``(task_id, batch)`` when
      ``pass_task_id=True``), reused at every step, and ``num_steps``
      defaults to ``inner_steps``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import metagrad as mg
      >>> targets = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> loss_fn = lambda p, batch, t: jnp.sum((p - targets[t]) ** 2)
      >>> learner = mg.seq_reptile(loss_fn, optax.sgd(0.1), 4, 0.5, pass_task_id=True)
      >>> state = learner.init(jnp.zeros(2))
      >>> key = jax.random.PRNGKey(0)
      >>> for _ in range(3):
      ...     key, sub = jax.random.split(key)
      ...     ids = mg.sample_tasks(sub, mg.task_probs([100, 300], q=0.2), 4)
      ...     state, metrics = learner.step(state, (ids, jnp.zeros((4, 1))))
      >>> print(state.params.shape, sorted(metrics))
      (2,) ['loss', 'loss_pre', 'meta_grad_norm']

    References:
      Lee, Lee, Lee, Hwang, `Sequential Reptile: Inter-Task Gradient Alignment
      for Multilingual Learning <https://arxiv.org/abs/2110.02600>`_, ICLR 2022.
    """
    inner_steps, outer_tx, opts = check_learner(
        "seq_reptile", loss_fn, inner_steps, outer, options, pass_task_id=pass_task_id
    )
    inner = fixed_inner("seq_reptile", inner)
    if not pass_task_id and _required_positional(loss_fn) >= 3:
        raise TypeError(
            "loss_fn takes a third argument (the task id?) but pass_task_id=False: "
            "pass pass_task_id=True for loss_fn(params, batch, task_id), or take "
            "loss_fn(params, batch)"
        )
    if opts.alignment and inner_steps < 2:
        raise ValueError("alignment=True needs inner_steps >= 2 batches to compare, got 1")

    def tagged_loss(params, tagged):
        task_id, batch = tagged
        if pass_task_id:
            return loss_fn(params, batch, task_id)
        return loss_fn(params, batch)

    def step_fn(state, tasks):
        if not isinstance(tasks, (tuple, list)) or len(tasks) != 2:
            raise TypeError(f"tasks must be a pair (task_ids, batches); {_FORMAT}")
        task_ids, batches = tasks
        if not isinstance(task_ids, (jax.Array, np.ndarray)):
            raise ValueError(
                f"tasks[0] (task_ids) must be one int array, got {describe(task_ids)}: {_FORMAT}"
            )
        if np.shape(task_ids) != (inner_steps,):
            raise ValueError(
                f"tasks[0] (task_ids) must have shape ({inner_steps},) = (inner_steps,), "
                f"got {np.shape(task_ids)}; {_FORMAT}"
            )
        if not jnp.issubdtype(jnp.result_type(task_ids), jnp.integer):
            raise TypeError(
                f"tasks[0] (task_ids) must be integers, got {jnp.result_type(task_ids)}"
            )
        _checks.stacked("tasks[1] (batches)", batches, (inner_steps,), "[inner_steps, ...]")
        task_ids = jnp.asarray(task_ids, jnp.int32)
        tagged = (task_ids, batches)
        phi = state.params
        inner_state = inner.init(phi) if opts.reset_inner_state else state.inner_state
        one = jax.tree.map(lambda x: x[0], tagged)
        # One trajectory: "auto" makes it the single unrolled task of a convolutional loss.
        _, step_mode = _loops.resolve(
            "auto",
            opts.step_loop,
            num_tasks=1,
            num_steps=inner_steps,
            jaxpr=_loops.trace_loss(tagged_loss, phi, one)[0],
        )
        theta, inner_state, losses = one_task(
            tagged_loss,
            inner,
            phi,
            inner_state,
            tagged,
            inner_steps,
            batch_per_step=True,
            axis_name=opts.axis_name,
            step_loop=step_mode,
        )
        meta_grad = jax.tree.map(lambda p, t: p - t, phi, theta)
        outer_updates, outer_state = outer_tx.update(meta_grad, state.outer_state, phi)
        new_phi = optax.apply_updates(phi, outer_updates)
        metrics = {
            "loss": jnp.mean(losses),
            "loss_pre": losses[0],
            "meta_grad_norm": global_norm(meta_grad),
        }
        if opts.alignment:
            grads = task_gradients(tagged_loss, phi, tagged)
            if opts.axis_name is not None:
                grads = jax.lax.pmean(grads, opts.axis_name)
            metrics["alignment"] = mean_pairwise_cosine(grads, task_ids=task_ids)
        new_state = ReptileState(
            params=new_phi,
            outer_state=outer_state,
            # A non-finite batch must not poison the state carried to later steps.
            inner_state=None
            if opts.reset_inner_state
            else keep_if_finite(inner_state, state.inner_state),
        )
        return new_state, metrics

    def adapt_fn(state, support, num_steps=None):
        num_steps = inner_steps if num_steps is None else num_steps
        if pass_task_id:
            if not isinstance(support, (tuple, list)) or len(support) != 2:
                raise TypeError("support must be a pair (task_id, batch) when pass_task_id=True")
            task_id, batch = support
            support = (jnp.asarray(task_id, jnp.int32), batch)
        else:
            support = (jnp.zeros([], jnp.int32), support)
        return adapt(tagged_loss, inner, state.params, support, num_steps)

    return meta_learner(
        functools.partial(reptile_init, outer_tx, inner, opts.reset_inner_state),
        step_fn,
        jax.jit(adapt_fn, static_argnames="num_steps"),
        state_type=ReptileState,
    )
