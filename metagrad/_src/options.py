"""Keyword groups: keyword arguments that several public functions share, defined once (private).

A group is a `TypedDict` (``total=False``) naming the keywords and their types, whose docstring
documents them in a ``Keyword Args:`` section, and a mapping of their defaults (`KeywordGroup`).
A function takes the group as ``**options: Unpack[Group]`` (PEP 692: type checkers and IDEs
then know the keywords) and is decorated with the `KeywordGroup`, which gives it

- the signature `inspect.signature`, `help` and notebook tooltips show: the group's keywords,
  keyword-only, with their types and defaults, in place of ``**options``;
- their documentation: the docstring's ``**options:`` entry becomes the group's entries.

Inside, `KeywordGroup.resolve` fills in the defaults and refuses an unknown keyword as Python
would; the checks of the values are the group owner's.
"""

from __future__ import annotations

import collections
import inspect
import sys
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

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
        self.entries = _section(options.__doc__ or "", _SECTION)
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
        lines = (fn.__doc__ or "").splitlines()
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
