"""The suite's result writers: the printed table, CSV and JSON files, a failed method's row."""

from __future__ import annotations

import csv
import json
import math
import pathlib
import traceback
from collections.abc import Sequence

_ERROR_SUFFIXES = ("_ci95", "_stderr")


def error_row(out_dir: pathlib.Path, method: str, error: BaseException) -> dict:
    """A table row for a method that raised; appends its traceback to ``errors.txt``."""
    with open(pathlib.Path(out_dir) / "errors.txt", "a") as f:
        f.write(f"== {method}\n")
        f.write("".join(traceback.format_exception(error)))
    return {"method": method, "error": f"failed: {type(error).__name__}: {error}"}


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[dict]) -> str:
    """Formats rows of one experiment as an aligned text table.

    A column `x` with a companion `x_ci95` or `x_stderr` is shown as `x ± err`.
    """
    if not rows:
        return "  (no rows)"
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys and k != "experiment")
    shown = [
        k for k in keys if not any(k.endswith(s) and k[: -len(s)] in keys for s in _ERROR_SUFFIXES)
    ]
    table = [shown]
    for row in rows:
        cells = []
        for k in shown:
            if k not in row:
                cells.append("")
                continue
            cell = _fmt(row[k])
            for s in _ERROR_SUFFIXES:
                if k + s in row:
                    cell += " ± " + _fmt(row[k + s])
            cells.append(cell)
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(shown))]
    lines = [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table
    ]
    lines.insert(1, "  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_csv(path: pathlib.Path, rows: Sequence[dict]) -> None:
    """Writes rows to CSV with the union of their keys (first-seen order)."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy / jax scalars
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_json(path: pathlib.Path, obj) -> None:
    """Writes JSON, turning numpy scalars into Python numbers and non-finite floats to str."""
    with open(path, "w") as f:
        json.dump(_jsonable(obj), f, indent=2)
