"""The inner loop of every meta-learner, and the checks of its arguments and inputs (private).

One inner loop for every learner and every execution strategy (`metagrad._src.loops`): the
maths is the same, the task axis and the inner steps are executed as the learner's
``task_loop`` / ``step_loop`` say.
"""

from __future__ import annotations

from typing import Any, TypedDict

import jax
import jax.numpy as jnp
import numpy as np

from metagrad._src import checks as _checks
from metagrad._src import loops as _loops
from metagrad._src.base import LossFn, to_varying
from metagrad._src.diagnostics import mean_pairwise_cosine
from metagrad._src.options import KeywordGroup


def check_tasks(tasks: Any) -> tuple[Any, Any, int]:
    if not isinstance(tasks, (tuple, list)) or len(tasks) != 2:
        raise TypeError(
            "tasks must be a pair (support, query) of batches with a leading task axis, got "
            f"{type(tasks).__name__} {describe(tasks)}"
        )
    support, query = tasks
    sizes = {}
    for part, tree in (("support", support), ("query", query)):
        leaves = jax.tree.leaves(tree)
        if not leaves:
            raise ValueError(f"tasks: {part} has no array leaves")
        for leaf in leaves:
            if np.ndim(leaf) < 1:
                raise ValueError(f"tasks: every {part} leaf needs a leading task axis")
        sizes[part] = {np.shape(leaf)[0] for leaf in leaves}
        if len(sizes[part]) != 1:
            raise ValueError(
                f"tasks: the {part} leaves have different leading (task) axes {sizes[part]}"
            )
    if sizes["support"] != sizes["query"]:
        raise ValueError(
            f"tasks: support and query have different numbers of tasks "
            f"({sizes['support'].pop()} vs {sizes['query'].pop()})"
        )
    num_tasks = sizes["support"].pop()
    if num_tasks == 0:
        # The meta-loss would be a mean over no tasks: NaN, silently.
        raise ValueError("tasks must hold at least one task, got a leading (task) axis of size 0")
    return support, query, num_tasks


def check_alignment(alignment: bool, num_tasks: int) -> None:
    """The ``alignment`` metric compares tasks: it needs two of them (per device)."""
    if alignment and num_tasks < 2:
        raise ValueError(
            "alignment=True needs at least 2 tasks per step (on each device, under axis_name) "
            f"to compare their gradients, got {num_tasks}"
        )


class LearnerOptions(TypedDict, total=False):
    """The keyword arguments every meta-learner shares, documented and checked here once.

    `maml`, `fomaml`, `reptile`, `seq_reptile` and `imaml` take them (keyword-only, with the
    defaults below); a learner's own docstring says where one means more for it. As a type,
    `LearnerOptions` annotates a dict of them, passed on with ``**``:

    >>> import jax.numpy as jnp, metagrad as mg
    >>> options: mg.LearnerOptions = {"alignment": True, "task_loop": "vmap"}
    >>> learner = mg.reptile(lambda p, b: jnp.sum((p - b) ** 2), 0.1, 1, 1.0, **options)

    Keyword Args:
      reset_inner_state: if True (default) the inner optimizer state is fresh at every outer
        step: every task starts from ``inner.init`` at the initialization, and the learner's
        state holds ``None``. If False the state reached at the end of an outer step's inner
        loop, averaged over tasks (float leaves averaged, integer counts kept; a choice:
        tasks change every outer step), starts the next one; a new value that is not finite
        is not kept (the previous one stays), so one bad task does not poison later steps.
      alignment: if True, ``metrics["alignment"]`` is the mean pairwise cosine similarity
        between the tasks' support gradients at the initialization (their first inner
        gradients, so it costs no extra gradient). It compares tasks: a step with fewer than
        2 tasks (on each device, under ``axis_name``) raises a ValueError.
      axis_name: for data parallelism over the task batch: call ``step`` inside
        `jax.shard_map` (or `jax.pmap`) with this axis name, each device holding a slice of
        the tasks; the meta-gradient, the metrics and a kept inner state are averaged over
        the axis with `jax.lax.pmean`, so every device applies the same update (the
        single-device step's when devices hold equal numbers of tasks; ``alignment`` then
        covers each device's own tasks). An inner rule that averages over tasks
        (`metagrad.grad_share`) takes the same ``axis_name``. Correct under `jax.pmap` and
        under `jax.shard_map` with or without ``check_vma`` (the params are marked
        device-varying before differentiation, so JAX does not sum their gradient over
        devices behind the pmean). Under plain `jax.jit` with sharded inputs no axis name
        is needed.
      task_loop: how the tasks of a batch are executed: ``"vmap"`` (one batched program),
        ``"map"`` (`jax.lax.map`, a loop over tasks), ``"unroll"`` (one copy of the
        per-task program per task, each task's params a separate pytree: no grouped
        convolutions) or ``"auto"`` (default; the rule is in `metagrad.LearnerOptions`). An
        inner rule still sees the whole task batch at each step (its inputs are stacked
        along the task axis).
      step_loop: how the inner steps are executed: ``"scan"`` (`jax.lax.scan`),
        ``"unroll"`` (one copy per step) or ``"auto"`` (default; the rule is in
        `metagrad.LearnerOptions`).

    Execution strategies: every (`task_loop`, `step_loop`) pair computes the same numbers
    (tested to 1e-10 in float64); they differ in speed, compile time and memory.
    ``"auto"`` is resolved when the step is traced, from the backend
    (`jax.default_backend`), the number of tasks T, the number of inner steps K and the
    jaxpr of ``loss_fn`` on one task's batch (whether it contains a convolution, its size):

    - CPU: ``task_loop="unroll"`` if the loss contains a convolution, else ``"vmap"``
      (vmapping a convolution over per-task weights makes a grouped convolution, which
      XLA's CPU backend runs several times slower than T plain ones, and a convolution
      inside a loop body (``"map"``, ``"scan"``) is slower too; small dense models are
      faster batched); with unrolled tasks, ``step_loop="unroll"`` while the unrolled
      program stays small: K × T × (the number of equations in the loss's jaxpr) <= 2600,
      about 40 copies of a Conv-4 step; else ``"scan"`` (compile time grows linearly with
      the unrolled size). With batched tasks, ``"scan"``: unrolled steps there only add
      buffers (a 12M-parameter dense Reptile step: 8.8x the parameters' bytes of
      temporaries unrolled, 5.4x with a scan).
    - GPU / TPU: ``task_loop="vmap"``, ``step_loop="scan"`` (the conventional batched
      program; not measured by us).

    Measured (CPU time per second-order MAML step, Conv-4 with 32 channels, 5-way 1-shot,
    15 queries, 4 tasks, on a 2-core CPU): K = 5, tasks/steps unroll/unroll 0.86 s (a
    hand-written unrolled JAX step 0.85 s), unroll/scan 2.2 s, vmap/scan 4.6 s; K = 10,
    unroll/unroll 1.2 s after 48 s of compilation, unroll/scan 3.2 s after 20 s.
    """

    reset_inner_state: bool
    alignment: bool
    axis_name: str | None
    task_loop: str
    step_loop: str


# The decorator of the learners, and the defaults of their shared keywords.
learner_options = KeywordGroup(
    LearnerOptions,
    {"reset_inner_state": True, "alignment": False, "axis_name": None, "task_loop": "auto",
     "step_loop": "auto"},
)  # fmt: skip


def check_learner(name, loss_fn, inner_steps, outer, options, **flags):
    """The checks of the arguments every meta-learner takes, each error naming its parameter:
    ``loss_fn``, ``inner_steps``, ``outer``, the shared keywords ``options`` (an unknown one
    is a TypeError naming the learner ``name``, as Python's own) and the learner's own bool
    keywords given in ``flags``. Returns ``inner_steps`` and ``outer`` as the learner uses
    them (an int, an optax transformation) and the shared keywords with their defaults filled
    in (attributes ``opts.axis_name``, ...)."""
    opts = learner_options.resolve(name, options)
    _checks.callable_("loss_fn", loss_fn)
    inner_steps = _checks.positive_int("inner_steps", inner_steps)
    outer = _checks.as_optimizer("outer", outer)
    _checks.booleans(reset_inner_state=opts.reset_inner_state, alignment=opts.alignment, **flags)
    _checks.axis_name(opts.axis_name)
    _loops.check(opts.task_loop, opts.step_loop)
    return inner_steps, outer, opts


def start_step(
    loss_fn, params, tasks, *, alignment, task_loop, step_loop, num_steps, batch_per_step=False
):
    """What every ``(support, query)`` learner's step starts with: its input checks and the
    execution strategies "auto" resolves to. With ``batch_per_step`` the support leaves are
    ``[T, num_steps, ...]``. Returns ``(support, query, tasks, step_loop)``, ``tasks`` the
    `_loops.TaskLoop` of the task batch."""
    support, query, num_tasks = check_tasks(tasks)
    if batch_per_step:
        what = "[num_tasks, inner_steps, ...] (batch_per_step=True)"
        _checks.stacked("tasks: support", support, (None, num_steps), what)
        tasks = (jax.tree.map(lambda x: x[:, 0], support),)
    check_alignment(alignment, num_tasks)
    jaxpr = check_loss(loss_fn, params, tasks)
    task_loop, step_loop = _loops.resolve(
        task_loop, step_loop, num_tasks=num_tasks, num_steps=num_steps, jaxpr=jaxpr
    )
    return support, query, _loops.TaskLoop(task_loop, num_tasks), step_loop


def task_states(init_state, params, kept, num_tasks, *, reset, axis_name=None):
    """The per-task inner states at the first inner step: ``init_state(params)`` for every
    task when ``reset``, else the state ``kept`` from the previous outer step, broadcast.

    With ``axis_name`` they are typed device-varying (`base.to_varying`), as the states the
    inner steps return are: a scanned inner loop needs its carry's type to stay the same.
    """
    if reset:
        states = jax.vmap(init_state)(broadcast(params, num_tasks))
    else:
        states = broadcast(kept, num_tasks)
    return to_varying(states, axis_name)


def describe(tree: Any) -> str:
    """``tree`` with each array leaf shown as dtype[shape], for error messages."""

    def leaf(x):
        return f"{jnp.result_type(x).name}{list(np.shape(x))}" if hasattr(x, "shape") else repr(x)

    return str(jax.tree.map(leaf, tree))


def _same_form(support: Any, query: Any) -> bool:
    """Whether support and query have one tree structure, leaf ranks and dtypes (the form
    of a well-built ``(support, query)``; their shot counts may differ)."""
    if jax.tree.structure(support) != jax.tree.structure(query):
        return False
    return all(
        np.ndim(s) == np.ndim(q) and jnp.result_type(s) == jnp.result_type(q)
        for s, q in zip(jax.tree.leaves(support), jax.tree.leaves(query), strict=True)
    )


def check_loss(loss_fn: LossFn, params: Any, tasks: Any) -> Any:
    """Traces ``loss_fn`` on task 0's support batch: checks that it applies and returns a
    scalar; returns its jaxpr (for the "auto" strategies).

    If it raises on tasks whose support and query have one form, the loss itself failed: its
    error propagates (same type), with a note naming loss_fn and the batch. Otherwise the
    tasks are likely not ``(support, query)``: a ValueError says so."""
    batch = jax.tree.map(lambda x: x[0], tasks[0])
    try:
        jaxpr, out = _loops.trace_loss(loss_fn, params, batch)
    except Exception as error:
        if _same_form(*tasks):
            # Support and query are batches of one form: the loss itself failed. Its own error,
            # of its own type, with where it was called.
            error.add_note(
                "metagrad: raised by loss_fn(params, batch) on task 0's support batch, batch = "
                f"{describe(batch)} (tasks[0] without its leading task axis)"
            )
            raise
        raise ValueError(
            "loss_fn(params, batch) failed on the support batch of task 0 "
            f"({type(error).__name__}: {error}). tasks must be a pair (support, query), "
            "each a batch in the form loss_fn takes with a leading task axis; got tasks = "
            f"{describe(tasks)}"
        ) from error
    if isinstance(out, (tuple, list)):
        raise ValueError(
            f"loss_fn returned a {type(out).__name__} ({describe(out)}) on task 0's support "
            "batch; loss_fn must return a scalar (no has_aux): meta-learners take "
            "loss_fn(params, batch) -> scalar, so return the loss only"
        )
    shape = getattr(out, "shape", None)
    if shape != ():
        raise ValueError(
            f"loss_fn must return a scalar, got an output of shape {shape} "
            f"({describe(out)}) on task 0's support batch"
        )
    return jaxpr


def inner_loop(
    loss_fn, rule, params, inner_params, carry, state, support, query, num_steps, *,
    task_loop, step_loop, first_order=False, remat=False, step_query=False, alignment=False,
    batch_per_step=False, value_and_grad=None,
):  # fmt: skip
    """Runs `num_steps` inner steps on a task batch from the shared initialization `params`.

    The one inner loop of metagrad: `metagrad.maml` (and the learners built on it),
    `metagrad.imaml`, `metagrad.reptile`, `metagrad.seq_reptile` and `metagrad.adapt` (the
    last two as a batch of one task). At step k every task takes its support gradient, then
    `rule` (an `InnerRule`; `inner_rules.as_inner_rule` makes one of an optax optimizer)
    turns the task batch's gradients into updates.

    `state` and `support` (and `query`) carry the task axis, `params` does not; with
    ``batch_per_step`` the support leaves are ``[T, num_steps, ...]`` and step k uses slice
    k, else every step uses the same batch. ``value_and_grad(params, batch) -> (loss,
    grads)`` replaces ``jax.value_and_grad(loss_fn)`` (iMAML's proximal gradient, Sequential
    Reptile's gradient averaged over a data-parallel axis); ``loss_fn`` then only evaluates
    the query batches (``step_query``). ``first_order`` stops the gradient through the inner
    gradients, ``remat`` rematerializes each step in the backward pass.

    Returns the adapted params in `task_loop`'s representation (`_loops.TaskLoop`), the
    rule's state and carry, and the outputs: ``"support_loss"`` (``[num_steps, T]``, the
    loss before each step), ``"query_loss"`` (the same shape, after each step; with
    ``step_query``) and ``"alignment"`` (the mean pairwise cosine of the first step's
    gradients; with ``alignment``). Until the first update the params are shared by all
    tasks: the first step's gradients are taken at the unbroadcast params (with ``"vmap"``,
    one plain batched program instead of one over copies of the weights, which for a
    convolution would be a grouped convolution).
    """
    num_tasks = jax.tree.leaves(support)[0].shape[0]
    tasks = _loops.TaskLoop(task_loop, num_tasks)
    if value_and_grad is None:
        value_and_grad = jax.value_and_grad(loss_fn)

    def batch_at(k):
        if not batch_per_step:
            return support
        return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, k, 1, False), support)

    def one_step(params, state, carry, k, first):
        losses, grads = tasks.map(value_and_grad, params, batch_at(k), first)
        if first_order:
            grads = jax.lax.stop_gradient(grads)
        out = {"support_loss": losses}
        if alignment and first:
            out["alignment"] = mean_pairwise_cosine(grads)
        batched = tasks.stacked(params, first)
        updates, state, carry = rule.update(grads, state, batched, inner_params, carry, k)
        params = tasks.add(params, updates)
        if step_query:
            out["query_loss"] = tasks.map(loss_fn, params, query, False)
        return params, state, carry, out

    def step(first, prevent_cse):
        def body(c, k, _):
            params, state, carry, out = one_step(*c, k, first)
            return (params, state, carry), out

        return jax.checkpoint(body, prevent_cse=prevent_cse) if remat else body

    c = (tasks.start(params), state, carry)
    # The first step is peeled off the loop: it runs at the shared params (stacked params
    # only; per-task params, `"unroll"` tasks, need no peeling in a scan) and it alone
    # measures the alignment. Unrolled, remat needs CSE prevention (XLA would otherwise merge
    # the recomputation with the forward pass).
    unrolled = step_loop == "unroll"
    peel = unrolled or task_loop != "unroll" or alignment
    if not peel:
        c, outs = _loops.run_steps(step(False, False), c, num_steps, "scan")
        return (*c, outs)
    c, out0 = step(True, unrolled)(c, jnp.zeros((), jnp.int32), None)
    align = out0.pop("alignment", None)
    if num_steps > 1:
        c, outs = _loops.run_steps(step(False, unrolled), c, num_steps - 1, step_loop, start=1)
        outs = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), out0, outs)
    else:
        outs = jax.tree.map(lambda a: a[None], out0)
    if align is not None:
        outs["alignment"] = align
    return (*c, outs)


def broadcast(tree: Any, num_tasks: int) -> Any:
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_tasks,) + jnp.shape(x)), tree)
