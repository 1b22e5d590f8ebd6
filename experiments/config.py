"""One way to configure an experiment: a frozen dataclass, budget presets, command-line options.

An experiment declares its settings once, as a dataclass whose fields that may be set from
the command line carry an `option` (help text, minimum, choices)::

    @dataclasses.dataclass(frozen=True)
    class Config:
        iterations: int = option("meta-iterations per method", minimum=1)  # from the budget
        methods: tuple[str, ...] = option("methods to run", default=METHODS, choices=METHODS)
        chunk: int = 10  # not on the command line

    BUDGETS = {"tiny": dict(iterations=20), "quick": dict(iterations=4000), ...}

    def add_arguments(parser):
        config.add_options(parser, Config, BUDGETS, NAME)  # --<NAME>-iterations, ...

    cfg = config.resolve(Config, BUDGETS, budget, args, NAME)

`resolve` starts from the budget's preset (field values; the dataclass defaults fill in the
rest) and lets each ``--<prefix>-<field>`` option that was given override its field. Options
default to None ("not given"), so a preset is never overridden by an option's default, and
the help text states the default the budget gives.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

BUDGET_NAMES = ("tiny", "quick", "full")
_MISSING = dataclasses.MISSING


def int_at_least(minimum: int):
    """An argparse ``type`` for integers >= `minimum`; a smaller value is a usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def option(
    help: str,  # noqa: A002 - argparse's name
    *,
    default: Any = _MISSING,
    minimum: int | None = None,
    type: Any = None,  # noqa: A002
    choices: Sequence[Any] | None = None,
    many: bool = False,
):
    """A dataclass field that `add_options` exposes as ``--<prefix>-<field>``.

    Args:
      help: what the option sets; the checked minimum and the default (per budget when
        the budgets set it) are appended.
      default: the field's default; without one, every budget preset must set it.
      minimum: an integer option checked to be >= minimum (`int_at_least`).
      type: the argparse type (default: str, or int with a minimum); ``bool`` makes a
        flag that sets the field to True.
      choices: the allowed values.
      many: one or more values (``nargs="+"``), stored as a tuple.
    """
    spec = dict(help=help, minimum=minimum, type=type, choices=choices, many=many)
    return dataclasses.field(default=default, metadata={"option": spec})


def _flag(prefix: str, name: str) -> str:
    return "--" + "-".join(p for p in (prefix, name) if p).replace("_", "-")


def _dest(prefix: str, name: str) -> str:
    return _flag(prefix, name)[2:].replace("-", "_")


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple | list):
        return " ".join(str(v) for v in value)
    return str(value)


def _default_text(field: dataclasses.Field, budgets: Mapping[str, Mapping]) -> str:
    per_budget = [(name, preset[field.name]) for name, preset in budgets.items()
                  if field.name in preset]  # fmt: skip
    if per_budget:
        fallback = "" if field.default is _MISSING else f", else {_show(field.default)}"
        values = {v for _, v in per_budget}
        if len(per_budget) == len(budgets) and len(values) == 1:
            return _show(per_budget[0][1])
        return ", ".join(f"{name} {_show(v)}" for name, v in per_budget) + fallback
    return _show(field.default)


def add_options(parser, config_cls, budgets: Mapping[str, Mapping], prefix: str) -> None:
    """Adds ``--<prefix>-<field>`` for every field of `config_cls` declared with `option`."""
    for field in dataclasses.fields(config_cls):
        spec = field.metadata.get("option")
        if spec is None:
            continue
        kw: dict[str, Any] = {"default": None, "dest": _dest(prefix, field.name)}
        if spec["type"] is bool:
            kw["action"] = "store_true"
        else:
            kw["type"] = (
                int_at_least(spec["minimum"])
                if spec["minimum"] is not None
                else (spec["type"] or str)
            )
            if spec["choices"] is not None:
                kw["choices"] = spec["choices"]
            if spec["many"]:
                kw["nargs"] = "+"
        minimum = "" if spec["minimum"] is None else f">= {spec['minimum']}; "
        kw["help"] = f"{spec['help']} ({minimum}default: {_default_text(field, budgets)})"
        parser.add_argument(_flag(prefix, field.name), **kw)


def resolve(
    config_cls,
    budgets: Mapping[str, Mapping],
    budget: str,
    args: argparse.Namespace | None = None,
    prefix: str = "",
    *,
    base: Mapping | None = None,
):
    """The configuration of a run: `base`, then the budget's preset, then the given options.

    Args:
      config_cls: the experiment's (frozen) dataclass.
      budgets: budget name -> preset, a mapping of field values.
      budget: the budget's name; an unknown one is a ValueError.
      args: the parsed command line (or None): each ``<prefix>_<field>`` attribute that is
        not None overrides its field (a list becomes a tuple).
      prefix: the options' prefix, the experiment's name.
      base: field values under the preset (e.g. a dataset's settings).
    """
    if budget not in budgets:
        raise ValueError(f"budget must be one of {tuple(budgets)}, got {budget!r}")
    values = {**(base or {}), **budgets[budget]}
    for field in dataclasses.fields(config_cls):
        given = getattr(args, _dest(prefix, field.name), None) if args is not None else None
        if given is not None:
            values[field.name] = tuple(given) if isinstance(given, list) else given
    return config_cls(**values)
