"""How the meta-learners execute their task axis and their inner steps (private helpers).

The maths of a meta-step does not depend on these choices; its speed and its compile time
do. Two keyword arguments of every meta-learner pick them:

- ``task_loop``: ``"vmap"`` (the tasks of a batch as one batched program), ``"map"``
  (`jax.lax.map`, a loop over tasks inside the compiled program) or ``"unroll"`` (one copy
  of the per-task program per task, each task's parameters a separate pytree).
- ``step_loop``: ``"scan"`` (`jax.lax.scan` over inner steps) or ``"unroll"`` (one copy of
  the inner step per step).

``"auto"`` (the default of both) is resolved when the step is traced, by `resolve`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from metagrad._src import checks as _checks

TASK_LOOPS = ("auto", "vmap", "map", "unroll")
STEP_LOOPS = ("auto", "scan", "unroll")

# On XLA's CPU backend, the largest unrolled program "auto" builds, in equations of the loss's
# jaxpr times inner-step copies (steps unrolled times tasks unrolled). Compile time grows
# linearly with it: a second-order Conv-4 step (a 63-equation loss) compiled in 12 s of CPU
# time with 4 copies and 48 s with 40 copies (2,520 equations) on the project's 2-core CPU.
# Beyond the budget the inner steps run in `lax.scan`.
CPU_UNROLL_BUDGET = 2600


def check(task_loop: Any, step_loop: Any) -> None:
    """Raises a ValueError naming the parameter if a strategy is not a known one."""
    _checks.one_of("task_loop", task_loop, TASK_LOOPS)
    _checks.one_of("step_loop", step_loop, STEP_LOOPS)


def loss_stats(jaxpr: Any) -> tuple[bool, int]:
    """Whether a (closed) jaxpr contains a convolution, and its number of equations, both
    counting sub-jaxprs (scan or cond bodies, custom derivatives)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    conv, size = False, 0
    for eqn in jaxpr.eqns:
        size += 1
        conv = conv or eqn.primitive.name == "conv_general_dilated"
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    sub_conv, sub_size = loss_stats(inner)
                    conv, size = conv or sub_conv, size + sub_size
    return conv, size


def resolve(
    task_loop: str, step_loop: str, *, num_tasks: int, num_steps: int, jaxpr: Any
) -> tuple[str, str]:
    """Resolves ``"auto"`` strategies from the loss's jaxpr (the rule is documented in
    `metagrad.maml`); other values pass through."""
    cpu = jax.default_backend() == "cpu"
    convolution, size = loss_stats(jaxpr)
    if task_loop == "auto":
        task_loop = "unroll" if cpu and convolution else "vmap"
    if step_loop == "auto":
        # Unrolled steps pay where they let each task's convolutions run outside a loop body.
        # With batched tasks they only add buffers: a 12M-parameter dense Reptile step needed
        # 8.8x the parameters' bytes of temporaries with unrolled steps, 5.4x with a scan.
        copies = num_steps * num_tasks
        fits = copies * size <= CPU_UNROLL_BUDGET
        step_loop = "unroll" if cpu and task_loop == "unroll" and fits else "scan"
    return task_loop, step_loop


def trace_loss(loss_fn: Callable[..., Any], *args: Any) -> Any:
    """The closed jaxpr of ``loss_fn(*args)`` and its output shape (for checks and `resolve`)."""
    return jax.make_jaxpr(loss_fn, return_shape=True)(*args)


@jax.tree_util.register_pytree_node_class
class PerTask:
    """The parameters of T tasks as T separate pytrees (the ``"unroll"`` task loop)."""

    def __init__(self, trees: tuple):
        self.trees = tuple(trees)

    def tree_flatten(self):
        return self.trees, None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        return cls(children)


def stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def index(tree: Any, t: int) -> Any:
    return jax.tree.map(lambda x: x[t], tree)


def unstack(x: jax.Array) -> tuple[jax.Array, ...]:
    """``tuple(x)`` along the leading axis. One operation whose derivative is one stack,
    where indexing costs a slice and a squeeze per entry, and its derivative a pad per entry
    and their sum (hundreds of operations per inner step for a 50-leaf model)."""
    if hasattr(jax.lax, "unstack"):  # JAX >= 0.4.36
        return tuple(jax.lax.unstack(x, axis=0))
    return tuple(x[t] for t in range(x.shape[0]))


class TaskLoop:
    """Runs per-task functions over a task batch with one of the task strategies.

    Per-task parameters are *shared* (one pytree without task axis, before the first
    update), *stacked* (a leading task axis; ``"vmap"``, ``"map"``) or a `PerTask`
    (``"unroll"``). Results of `map` always come back stacked.
    """

    def __init__(self, mode: str, num_tasks: int):
        self.mode, self.num_tasks = mode, num_tasks

    def start(self, params: Any) -> Any:
        """The shared params in this strategy's representation."""
        return PerTask((params,) * self.num_tasks) if self.mode == "unroll" else params

    def map(self, fn: Callable[[Any, Any], Any], params: Any, data: Any, shared: bool) -> Any:
        """``stack([fn(params_t, data_t) for t])``; ``data`` has a task axis."""
        if self.mode == "unroll":
            if isinstance(params, PerTask):
                trees = params.trees
            elif shared:
                trees = (params,) * self.num_tasks
            else:
                trees = tuple(index(params, t) for t in range(self.num_tasks))
            return stack([fn(p, index(data, t)) for t, p in enumerate(trees)])
        if self.mode == "vmap":
            return jax.vmap(fn, (None if shared else 0, 0))(params, data)
        if shared:
            return jax.lax.map(lambda d: fn(params, d), data)
        return jax.lax.map(lambda pd: fn(*pd), (params, data))

    def stacked(self, params: Any, shared: bool) -> Any:
        """The params with a leading task axis (what an `InnerRule` receives)."""
        if isinstance(params, PerTask):
            return stack(list(params.trees))
        if shared:
            n = self.num_tasks
            return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), params)
        return params

    def add(self, params: Any, updates: Any) -> Any:
        """Adds stacked updates to the params (shared params broadcast over tasks)."""

        def add(p, u):
            return (p + u).astype(p.dtype)

        if isinstance(params, PerTask):
            treedef = jax.tree.structure(params.trees[0])
            pieces = [unstack(u) for u in treedef.flatten_up_to(updates)]

            def task(t, p_t):
                leaves = treedef.flatten_up_to(p_t)
                return treedef.unflatten(add(p, u[t]) for p, u in zip(leaves, pieces, strict=True))

            return PerTask(tuple(task(t, p_t) for t, p_t in enumerate(params.trees)))
        return jax.tree.map(add, params, updates)

    def take(self, params: Any, t: int) -> Any:
        return params.trees[t] if isinstance(params, PerTask) else index(params, t)


def run_steps(
    body: Callable[[Any, Any, Any], tuple[Any, Any]],
    carry: Any,
    num_steps: int,
    mode: str,
    *,
    xs: Any = None,
    start: int = 0,
) -> tuple[Any, Any]:
    """``body(carry, k, x_k) -> (carry, out)`` for k = start..start+num_steps-1.

    ``mode`` is ``"scan"`` (`jax.lax.scan`) or ``"unroll"`` (a Python loop; k is then a
    concrete int32 array). Returns the final carry and the outputs stacked along a leading
    step axis. ``xs`` (leading axis ``num_steps``) may be None.
    """
    steps = jnp.arange(start, start + num_steps, dtype=jnp.int32)
    if mode == "scan":
        return jax.lax.scan(lambda c, kx: body(c, *kx), carry, (steps, xs))
    outs = []
    for i in range(num_steps):
        x = None if xs is None else index(xs, i)
        carry, out = body(carry, jnp.asarray(start + i, jnp.int32), x)
        outs.append(out)
    return carry, stack(outs)
