"""Documentation checks: every public name of `metagrad` is documented.

Public functions need the sections of the style guide (Args, Returns, and an Example with a
doctest); public classes need a docstring. The doctests themselves run through
``pytest --doctest-modules metagrad`` (set in pyproject's ``addopts``).
"""

from __future__ import annotations

import inspect

import pytest

import metagrad as mg

_FUNCTIONS = sorted(name for name in mg.__all__ if inspect.isfunction(getattr(mg, name)))
_CLASSES = sorted(name for name in mg.__all__ if inspect.isclass(getattr(mg, name)))


def test_all_names_exist_and_are_sorted():
    missing = [name for name in mg.__all__ if not hasattr(mg, name)]
    assert not missing, f"names in metagrad.__all__ without an attribute: {missing}"
    assert list(mg.__all__) == sorted(mg.__all__), "metagrad.__all__ must be kept sorted"
    assert len(set(mg.__all__)) == len(mg.__all__), "metagrad.__all__ has duplicates"


def test_every_public_name_is_a_function_or_class():
    others = [name for name in mg.__all__ if name not in _FUNCTIONS + _CLASSES]
    assert not others, f"public names that are neither functions nor classes: {others}"


def _section_lines(doc: str) -> set[str]:
    return {line.strip() for line in doc.splitlines()}


@pytest.mark.parametrize("name", _FUNCTIONS)
def test_function_docstring_has_args_returns_example(name):
    doc = inspect.getdoc(getattr(mg, name))
    assert doc, f"metagrad.{name} has no docstring"
    lines = _section_lines(doc)
    takes_args = bool(inspect.signature(getattr(mg, name)).parameters)
    sections = {
        "Args:": (takes_args, {"Args:", "Arguments:"}),
        "Returns:": (True, {"Returns:"}),
        "Example:": (True, {"Example:", "Examples:"}),
    }
    missing = [
        section
        for section, (needed, spellings) in sections.items()
        if needed and not lines & spellings
    ]
    assert not missing, f"metagrad.{name}'s docstring lacks the section(s) {missing}"
    example = doc.split("Example", 1)[1]
    assert ">>>" in example, f"metagrad.{name}'s Example has no doctest (>>> line)"


@pytest.mark.parametrize("name", _CLASSES)
def test_class_has_docstring(name):
    cls = getattr(mg, name)
    doc = inspect.getdoc(cls)
    assert doc and doc.strip(), f"metagrad.{name} has no docstring"
    # NamedTuple's generated docstring ("Name(field, ...)") does not count.
    assert not doc.startswith(f"{name}("), f"metagrad.{name} has only the generated docstring"
