"""Argument checks shared by metagrad's public functions.

Every check raises a `ValueError` or `TypeError` whose message starts with the
parameter's name and says what was expected, so a user sees at once which
argument to fix.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
import optax


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _range_text(
    low: float | None, low_inclusive: bool, high: float | None, high_inclusive: bool = True
) -> str:
    if low is not None and high is not None:
        return (
            f"in {'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
        )
    if low is not None:
        return f"{'>=' if low_inclusive else '>'} {low:g}"
    if high is not None:
        return f"{'<=' if high_inclusive else '<'} {high:g}"
    return ""


def _check_value(
    name: str,
    value: float,
    *,
    integer: bool,
    low: float | None,
    low_inclusive: bool,
    high: float | None,
    high_inclusive: bool,
) -> None:
    """Range checks on a known value (from a Python number or a concrete array)."""
    if not integer and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        kind = "an integer " if integer else ""
        text = _range_text(low, low_inclusive, high, high_inclusive)
        raise ValueError(f"{name} must be {kind}{text}, got {value}")


def hyperparameter(
    name: str,
    value: Any,
    *,
    integer: bool = False,
    low: float | None = None,
    low_inclusive: bool = False,
    high: float | None = None,
    high_inclusive: bool = True,
    schedule: bool = False,
    expected: str | None = None,
) -> Any:
    """Checks a numeric hyper-parameter, in whichever form it arrives.

    One check for the forms a hyper-parameter takes in an optax-style library:

    - a Python (or NumPy) number: checked and returned as ``int`` / ``float``;
    - a concrete array (e.g. ``jnp.array(0.1)``, or the arrays that
      ``optax.inject_hyperparams`` passes when it is not traced): it must be a
      scalar of an integer (``integer=True``) or real dtype, and its value is
      checked exactly like a number; the array is returned unchanged;
    - a tracer (``inject_hyperparams`` or a user's ``jax.jit``): shape and dtype
      are checked, the value cannot be and is passed through;
    - a callable, accepted as a schedule when ``schedule=True`` and returned
      unchanged (its values are only known at call time).

    Values must be finite; ``integer=True`` asks for an integer; ``low`` and
    ``high`` bound the value (``low`` exclusive unless ``low_inclusive``,
    ``high`` inclusive unless ``high_inclusive`` is False).

    Args:
      name: the parameter's name, which starts every error message.
      value: the value given by the user.
      integer: whether the hyper-parameter is an integer (a count or period).
      low: lower bound, or None.
      low_inclusive: whether ``value == low`` is allowed.
      high: upper bound, or None.
      high_inclusive: whether ``value == high`` is allowed.
      schedule: whether a callable (an optax schedule) is allowed.
      expected: what to say a wrong type should have been; by default "an
        integer >= ..." or "a number".

    Returns:
      ``value`` as a Python number if it was one, else unchanged.

    Raises:
      TypeError: a value of the wrong type (a string, a bool, a float for an
        integer, a non-real array, a callable where no schedule is allowed).
      ValueError: a non-scalar array, or a known value that is non-finite or
        out of range.
    """
    bounds = dict(
        integer=integer, low=low, low_inclusive=low_inclusive, high=high,
        high_inclusive=high_inclusive,
    )  # fmt: skip
    if expected is None:
        expected = (
            f"an integer {_range_text(low, low_inclusive, high, high_inclusive)}".rstrip()
            if integer
            else "a number"
        )

    def wrong_type(what: str) -> TypeError:
        return TypeError(f"{name} must be {expected}, got {what}")

    if isinstance(value, (jax.Array, np.ndarray)):  # includes tracers
        if np.shape(value) != ():
            raise ValueError(f"{name} must be a scalar, got an array of shape {np.shape(value)}")
        dtype = np.dtype(value.dtype)
        ok = np.issubdtype(dtype, np.integer) or (not integer and np.issubdtype(dtype, np.floating))
        if dtype == np.bool_ or not ok:
            raise wrong_type(f"an array of dtype {dtype}")
        if not isinstance(value, jax.core.Tracer):
            number = int(value) if integer else float(value)
            _check_value(name, number, **bounds)
        return value
    if callable(value) and schedule:
        return value
    if integer:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise wrong_type(f"{value!r} of type {type(value).__name__}")
        _check_value(name, int(value), **bounds)
        return int(value)
    if not _is_number(value):
        raise wrong_type(f"{value!r} of type {type(value).__name__}")
    _check_value(name, float(value), **bounds)
    return float(value)


def positive_int(name: str, value: Any) -> int:
    """Returns `value` as an int after checking it is an integer >= 1 (no arrays).

    Such a value fixes a loop length or a state's shape, so it must be known when tracing:
    an array (e.g. a default that `optax.inject_hyperparams` turned into one) is refused with
    the fix, ``static_args``.
    """
    if isinstance(value, (jax.Array, np.ndarray)):
        raise TypeError(
            f"{name} must be an integer >= 1, got an array of dtype {np.dtype(value.dtype)}: "
            f"it fixes a loop length or the state's shape, so it must be a Python int. Under "
            f"optax.inject_hyperparams pass static_args=('{name}',)"
        )
    return hyperparameter(name, value, integer=True, low=1, low_inclusive=True)


def positive_float(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """Returns `value` as a float after checking it is finite and > 0 (or >= 0)."""
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {value!r} of type {type(value).__name__}")
    return hyperparameter(name, value, low=0, low_inclusive=allow_zero)


def finite_float(name: str, value: Any) -> float:
    """Returns `value` as a float after checking it is a finite number."""
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {value!r} of type {type(value).__name__}")
    return hyperparameter(name, value)


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


def _check_schedule(name: str, value: Callable[..., Any]) -> None:
    """A callable given as an optimizer must be a schedule ``count -> step size``: not an optax
    optimizer factory (``optax.sgd`` uncalled), nor a function of other arguments (a loss)."""
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):
        return
    returns = signature.return_annotation
    if (isinstance(returns, type) and issubclass(returns, optax.GradientTransformation)) or (
        isinstance(returns, str) and "GradientTransformation" in returns
    ):
        what = getattr(value, "__qualname__", repr(value))
        raise TypeError(
            f"{name} got the optimizer factory {what}, not an optimizer: call it, e.g. "
            f"{name}=optax.{what}(0.1), or pass a step size"
        )
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [
        p for p in signature.parameters.values()
        if p.kind in kinds and p.default is inspect.Parameter.empty
    ]  # fmt: skip
    if len(required) != 1:
        raise TypeError(
            f"{name} must be an optax GradientTransformation, or a step size > 0 (a number or an "
            f"optax schedule, a function of the step count) meaning optax.sgd(step size); got "
            f"{value!r}, a callable of {len(required)} required arguments"
        )


def as_optimizer(name: str, value: Any) -> optax.GradientTransformation:
    """An optimizer argument (``inner``, ``outer``): an optax transformation, or a step size.

    The one rule for both: a float, scalar array or optax schedule η means ``optax.sgd(η)``
    (for ``outer`` the meta-gradient is the "gradient" the optimizer receives and its update is
    added to the initialization); an `optax.MultiSteps` is converted to its transformation.
    """
    if isinstance(value, optax.MultiSteps):
        return value.gradient_transformation()
    if isinstance(value, optax.GradientTransformation):
        return value
    if callable(value):
        _check_schedule(name, value)
    value = hyperparameter(
        name,
        value,
        low=0,
        schedule=True,
        expected="an optax GradientTransformation, or a step size > 0 (a "
        "number or an optax schedule) meaning optax.sgd(step size)",
    )
    return optax.scale_by_learning_rate(value)  # optax.sgd(value) without its empty chain


def axis_name(value: Any) -> Any:
    """Returns `value` after checking it can name a mapped axis (`jax.shard_map`, `jax.pmap`)."""
    if value is not None and not isinstance(value, str):
        raise TypeError(
            f"axis_name must be None or the str name of a mapped axis (the axis_names of "
            f"jax.shard_map's mesh, or jax.pmap's axis_name), got {value!r}"
        )
    return value


def stacked(name: str, tree: Any, sizes: tuple[int | None, ...], what: str) -> int:
    """Checks the leading axes of every leaf of `tree`; returns the first axis' size.

    ``sizes`` gives the expected leading axes (None: any size, the same on every leaf); an
    empty first axis is refused, since a mean over no tasks would be NaN, silently.
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{name} must contain at least one array")
    first = np.shape(leaves[0])[0] if np.ndim(leaves[0]) else None
    for leaf in leaves:
        shape = np.shape(leaf)
        expected = tuple(first if s is None else s for s in sizes)
        if len(shape) < len(sizes) or shape[: len(sizes)] != expected:
            raise ValueError(
                f"{name} leaves must have leading axes {what}, got a leaf of shape {shape}"
            )
    if sizes[0] is None and first == 0:
        raise ValueError(f"{name} must hold at least one task, got a leading axis of size 0")
    return first


def bool_mask(name: str, mask: Any) -> Any:
    """Returns `mask` after checking it is a mask in `optax.masked`'s convention: None, a
    function of the params returning a mask, or a pytree of Python bools (a prefix of the
    params' structure, a bool then standing for a whole subtree)."""
    if mask is None or callable(mask):
        return mask
    for path, leaf in jax.tree_util.tree_leaves_with_path(mask):
        if not isinstance(leaf, (bool, np.bool_)):
            raise TypeError(
                f"{name} must be a pytree of Python bools (a prefix of params' structure) or a "
                f"function of the params returning one; at {jax.tree_util.keystr(path)} got "
                f"{leaf!r} of type {type(leaf).__name__}"
            )
    return mask


def mask_flags(name: str, mask: Any, params: Any) -> tuple[bool, ...]:
    """A `bool_mask` (not None) as one bool per leaf of `params`."""
    tree = mask(params) if callable(mask) else mask
    bool_mask(name, tree)
    try:
        full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), tree, params)
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(
            f"{name} must have the tree structure of params (or of a prefix of it); got "
            f"{jax.tree.structure(tree)} for params {jax.tree.structure(params)} ({error})"
        ) from error
    return tuple(bool(f) for f in jax.tree.leaves(full))
