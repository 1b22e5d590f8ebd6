"""Argument checks shared by metagrad's public functions.

Every check raises a `ValueError` or `TypeError` whose message starts with the
parameter's name and says what was expected, so a user sees at once which
argument to fix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def positive_int(name: str, value: Any) -> int:
    """Returns `value` as an int after checking it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"{name} must be an integer >= 1, got {value!r} of type {type(value).__name__}"
        )
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")
    return int(value)


def positive_float(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """Returns `value` as a float after checking it is finite and > 0 (or >= 0)."""
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def finite_float(name: str, value: Any) -> float:
    """Returns `value` as a float after checking it is a finite number."""
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def one_of(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Returns `value` after checking it is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def callable_(name: str, value: Any) -> Callable[..., Any]:
    """Returns `value` after checking it is callable."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {value!r} of type {type(value).__name__}")
    return value


def same_structure(name: str, tree: Any, reference: Any, reference_name: str = "params") -> None:
    """Checks that `tree` has the structure and leaf shapes of `reference`."""
    tdef, rdef = jax.tree.structure(tree), jax.tree.structure(reference)
    if tdef != rdef:
        raise ValueError(
            f"{name} must have the same tree structure as {reference_name}; "
            f"got {tdef}, expected {rdef}"
        )
    for path_leaf, ref_leaf in zip(
        jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(reference), strict=True
    ):
        path, leaf = path_leaf
        if np.shape(leaf) != np.shape(ref_leaf):
            raise ValueError(
                f"{name} must have the leaf shapes of {reference_name}; at "
                f"{jax.tree_util.keystr(path)} got shape {np.shape(leaf)}, "
                f"expected {np.shape(ref_leaf)}"
            )


def boolean(name: str, value: Any) -> bool:
    """Returns `value` after checking it is a Python or NumPy bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def booleans(**flags: Any) -> None:
    """Checks every keyword argument with `boolean`, naming the first that fails."""
    for name, value in flags.items():
        boolean(name, value)
