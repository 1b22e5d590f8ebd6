"""Keyword groups: keyword arguments that several public functions share, defined once.

A group is a `TypedDict` (``total=False``) naming the keywords and their types, whose docstring
documents them in a ``Keyword Args:`` section, and a mapping of their defaults (`KeywordGroup`).
A function takes the group as ``**options: Unpack[Group]`` (PEP 692: type checkers and IDEs
then know the keywords) and is decorated with the `KeywordGroup`, which gives it

- the signature `inspect.signature`, `help` and notebook tooltips show: the group's keywords,
  keyword-only, with their types and defaults, in place of ``**options``;
- their documentation: the docstring's ``**options:`` entry becomes the group's entries.

Inside, `KeywordGroup.resolve` fills in the defaults and refuses an unknown keyword as Python
would; the checks of the values are the group owner's. The meta-learners' group is here (public:
`LearnerOptions`; its decorator `learner_options`, its check `check_learner`); the dual-cone
aggregators' is in `mtl.upgrad`.
"""

from __future__ import annotations

import collections
import inspect
import sys
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypedDict, TypeVar

from metagrad._src import checks as _checks
from metagrad._src import loops as _loops

if sys.version_info >= (3, 11):
    from typing import Unpack as Unpack
else:  # typing_extensions comes with chex
    from typing_extensions import Unpack as Unpack

F = TypeVar("F", bound=Callable[..., Any])

_SECTION = "Keyword Args:"
_ENTRY = "**options:"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _section(doc: str, title: str) -> list[str]:
    """The lines of a docstring's section (``title`` alone on a line, up to the next blank
    line), dedented to its entries."""
    lines = inspect.cleandoc(doc).splitlines()
    start = lines.index(title) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    body = lines[start:end]
    margin = min(_indent(line) for line in body)
    return [line[margin:] for line in body]


class KeywordGroup:
    """The keywords of the `TypedDict` ``options``, with their ``defaults`` (every key, in the
    TypedDict's order), as a decorator for the functions that take them (module docstring)."""

    def __init__(self, options: type, defaults: Mapping[str, Any]):
        types = typing.get_type_hints(options)
        if list(defaults) != list(types):
            raise ValueError(f"defaults {list(defaults)} must name the keys {list(types)}")
        self.defaults = dict(defaults)
        self.parameters = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value,
                              annotation=types[name])
            for name, value in self.defaults.items()
        ]  # fmt: skip
        # (No docstrings under ``python -OO``: nothing to document then.)
        self.entries = None if options.__doc__ is None else _section(options.__doc__, _SECTION)
        # The resolved keywords, read as attributes (``opts.axis_name``).
        self.resolved = collections.namedtuple(options.__name__, list(self.defaults))

    def __call__(self, fn: F) -> F:
        """Gives ``fn`` (which takes ``**options``) the group's keywords in its signature and
        the group's entries in place of the ``**options:`` entry of its docstring."""
        signature = inspect.signature(fn)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        if len(own) == len(signature.parameters):
            raise TypeError(f"{fn.__name__} must take **options to take a keyword group")
        fn.__signature__ = signature.replace(parameters=own + self.parameters)
        if fn.__doc__ is None or self.entries is None:
            return fn
        lines = fn.__doc__.splitlines()
        at = next((i for i, line in enumerate(lines) if line.lstrip().startswith(_ENTRY)), None)
        if at is None:
            raise ValueError(f"{fn.__name__}'s docstring needs an '{_ENTRY}' entry in Args")
        # The entry runs on while its lines are indented deeper than its first one.
        end = at + 1
        while end < len(lines) and lines[end].strip() and _indent(lines[end]) > _indent(lines[at]):
            end += 1
        margin = " " * _indent(lines[at])
        fn.__doc__ = "\n".join(lines[:at] + [margin + e for e in self.entries] + lines[end:])
        return fn

    def resolve(self, name: str, options: Mapping[str, Any]) -> Any:
        """``options`` with the defaults filled in, as a namedtuple; an unknown keyword is the
        TypeError Python raises for one (``name`` the function's name)."""
        for key in options:
            if key not in self.defaults:
                raise TypeError(f"{name}() got an unexpected keyword argument '{key}'")
        return self.resolved(**{**self.defaults, **options})


class LearnerOptions(TypedDict, total=False):
    """The keyword arguments every meta-learner shares: one definition, documentation and check.

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
