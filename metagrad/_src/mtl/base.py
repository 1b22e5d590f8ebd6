"""Building blocks shared by the multi-task aggregators of `metagrad._src.mtl`.

An aggregator maps per-task gradients stacked on a leading task axis (leaves ``[T, *shape]``)
to one combined gradient (leaves ``[*shape]``). Because it changes the updates' shapes it can
only sit at the head of an optax chain: wrappers that re-run their inner transformation on
updates of the params' shape (`optax.apply_if_finite`'s skip branch, `optax.MultiSteps`'
accumulator) cannot wrap it, and a bare `optax.masked` would pass the unselected leaves on
still stacked. `check_task_axis` recognises those placements and says what to write instead.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metagrad._src import base as _base
from metagrad._src import checks as _checks

REDUCTIONS = ("sum", "mean")
# Grams, projections and task-weighted sums at full precision (a TPU's default rounds
# matmul inputs to bfloat16), as optax does for its tree inner products.
EXACT = jax.lax.Precision.HIGHEST

# ---------------------------------------------------------------------------------------------
# Hyper-parameters.


def num_tasks_arg(value: Any) -> int:
    """`num_tasks`, a Python int >= 1 (it fixes the shapes of the state)."""
    return _checks.positive_int("num_tasks", value)


def check_reduction(reduction: str) -> str:
    return _checks.one_of("reduction", reduction, REDUCTIONS)


def reduce(weights: jax.Array, reduction: str, num_tasks: int) -> jax.Array:
    return weights / num_tasks if reduction == "mean" else weights


# ---------------------------------------------------------------------------------------------
# Where the aggregator sits, and the task axis.

_PLACEMENT_HELP = {
    "optax.apply_if_finite": (
        "it maps per-task gradients [T, ...] to one gradient [...], and apply_if_finite's skip "
        "branch returns updates of the input's shape. Put the guard after the aggregator: "
        "optax.chain(mg.{name}(...), optax.apply_if_finite(opt, max_consecutive_errors)). On a "
        "non-finite step the aggregator keeps its state and passes the non-finite update on, "
        "for the guard to skip"
    ),
    "optax.MultiSteps": (
        "MultiSteps accumulates updates of the params' shape, without the task axis. Put the "
        "aggregator before it: optax.chain(mg.{name}(...), optax.MultiSteps(opt, k)); the "
        "aggregator then combines each mini-batch's task gradients and MultiSteps averages the "
        "combined gradients"
    ),
    "optax.masked": (
        "optax.masked hides the unselected leaves from the aggregator and passes them on "
        "unchanged, still stacked on the task axis [T, ...], so those params would change "
        "shape. Give every leaf to exactly one aggregator instead: optax.multi_transform("
        "{{'agg': optax.chain(mg.{name}(...), opt), 'rest': optax.chain(mg.mtl_sum(...), "
        "opt)}}, labels), labels a pytree like params of 'agg' / 'rest'"
    ),
}


_PARTITION_UPDATES = ("partition.<locals>.update", "multi_transform.<locals>.update")


def _enclosing_optax_wrapper() -> str | None:
    """The optax wrapper whose `update` is running this call, if any (trace-time only).

    optax gives a transformation no way to know its context, so this reads the caller frames
    for the qualified names of `optax.apply_if_finite`'s, `optax.MultiSteps`' and
    `optax.masked`'s update functions. `optax.multi_transform` (`optax.partition`) runs each
    group's transformation through one `optax.masked`, a correct placement since every leaf
    then reaches exactly one group; so `optax.masked` counts only when there are more masked
    frames than partition frames (a bare `optax.masked`). This only chooses an error message;
    if optax renames them (or on Python 3.10, without `co_qualname`) the user gets optax's own
    error instead.
    """
    frame = sys._getframe(1)
    masked = partitions = 0
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("optax"):
            qualname = getattr(frame.f_code, "co_qualname", "")
            if qualname.startswith("apply_if_finite.<locals>.update"):
                return "optax.apply_if_finite"
            if qualname.startswith("MultiSteps.update"):
                return "optax.MultiSteps"
            if qualname.startswith("masked.<locals>.update"):
                masked += 1
            if qualname.startswith(_PARTITION_UPDATES):
                partitions += 1
        frame = frame.f_back
    return "optax.masked" if masked > partitions else None


def check_task_axis(
    updates: Any, params: Any = None, num_tasks: int | None = None, *, name: str
) -> int:
    """Checks `updates` is stacked on a leading task axis; returns the number of tasks T.

    `name` is the aggregator's public name, for the messages.
    """
    wrapper = _enclosing_optax_wrapper()
    if wrapper is not None:
        raise ValueError(
            f"mg.{name} cannot sit inside {wrapper}: " + _PLACEMENT_HELP[wrapper].format(name=name)
        )
    leaves_with_path = jax.tree_util.tree_leaves_with_path(updates)
    if not leaves_with_path:
        raise ValueError("updates must have at least one leaf (per-task gradients)")
    if params is not None and jax.tree.structure(params) == jax.tree.structure(updates):
        if all(
            np.shape(u) == np.shape(p)
            for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True)
        ):
            raise ValueError(
                "updates have the shapes of params, without the leading task axis: "
                f"mg.{name} combines per-task gradients stacked on axis 0 (leaves "
                "[T, *param_shape]) but got one already-combined gradient. Pass the stacked "
                "per-task gradients (e.g. jax.vmap of the per-task gradient), and put the "
                f"aggregator first in the chain: optax.chain(mg.{name}(...), ...). Inside "
                f"optax.MultiSteps, whose accumulator has params' shape, write "
                f"optax.chain(mg.{name}(...), optax.MultiSteps(opt, k)) instead"
            )
    sizes = {}
    for path, leaf in leaves_with_path:
        if np.ndim(leaf) == 0:
            raise ValueError(
                "updates must be per-task gradients stacked on a leading task axis; the leaf at "
                f"{jax.tree_util.keystr(path)} is a scalar"
            )
        sizes.setdefault(np.shape(leaf)[0], jax.tree_util.keystr(path))
    if len(sizes) > 1:
        detail = ", ".join(f"{where or 'root'}: {size}" for size, where in sizes.items())
        raise ValueError(
            "updates must share one leading task axis; leading sizes differ across leaves "
            f"({detail})"
        )
    (num,) = sizes
    if num == 0:
        raise ValueError(
            "updates have an empty leading task axis (0 tasks): pass the gradients of at least "
            "one task, stacked on axis 0"
        )
    if num_tasks is not None and num != num_tasks:
        raise ValueError(
            f"updates have {num} tasks on their leading task axis but num_tasks={num_tasks}"
        )
    if params is not None:
        pdef, udef = jax.tree.structure(params), jax.tree.structure(updates)
        if pdef != udef:
            raise ValueError(
                f"updates must have the tree structure of params; got {udef}, expected {pdef}"
            )
        for (path, leaf), p in zip(leaves_with_path, jax.tree.leaves(params), strict=True):
            if np.shape(leaf) != (num, *np.shape(p)):
                raise ValueError(
                    "updates must be per-task gradients stacked on a leading task axis: at "
                    f"{jax.tree_util.keystr(path)} got shape {np.shape(leaf)}, expected "
                    f"{(num, *np.shape(p))} (params shape {np.shape(p)} with {num} tasks)"
                )
    return num


# ---------------------------------------------------------------------------------------------
# Gram matrices, weighted sums, state on non-finite steps.


def combine(updates: Any, weights: jax.Array) -> Any:
    """Returns sum_j weights[..., j] * g_j per leaf; weights is [T] or [num_leaves, T]."""
    leaves, treedef = jax.tree.flatten(updates)
    out = []
    for n, leaf in enumerate(leaves):
        w = weights if weights.ndim == 1 else weights[n]
        out.append(jnp.tensordot(w.astype(leaf.dtype), leaf, axes=1, precision=EXACT))
    return jax.tree.unflatten(treedef, out)


def keep_state_if_finite(out: Any, new_state: Any, state: Any, axis_name: Any = None) -> Any:
    """`new_state` if the combined update and the new state are finite, else `state`, whole.

    A non-finite step then leaves no trace in the aggregator (counters and PRNG keys included),
    exactly as if `optax.apply_if_finite` after it had skipped the step, while `out` itself goes
    on non-finite so that the guard sees it. With ``axis_name`` (parameters sharded over it,
    each device holding a slice of `out`) the devices agree, so that they keep equal states.
    """
    return _base.keep_if_finite((out, new_state), (out, state), axis_name=axis_name)[1]
