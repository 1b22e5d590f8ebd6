"""The inner loop of every meta-learner, and the checks of its arguments and inputs (private).

One inner loop for every learner and every execution strategy (`metagrad._src.loops`): the
maths is the same, the task axis and the inner steps are executed as the learner's
``task_loop`` / ``step_loop`` say.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metagrad._src import checks as _checks
from metagrad._src import loops as _loops
from metagrad._src.base import LossFn, to_varying
from metagrad._src.diagnostics import mean_pairwise_cosine


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
