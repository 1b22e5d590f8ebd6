"""The experiment suite's runner: discovery, output directory, table, combined JSON/CSV.

Every experiment is a module under `experiments/` following one contract::

    NAME = "sinusoid"                  # the command-line name
    DESCRIPTION = "one line for --help"
    def add_arguments(parser): ...     # optional, options prefixed with the name
    def run(out_dir, *, budget="quick", seed=0, progress=True, args=None) -> list[dict]

`run` writes its own files into `out_dir` (one directory per experiment) and returns
table rows: flat dicts of str/float, each with "experiment" and "method" keys. A row may
carry an "error" key instead of numbers, for a method that could not run (e.g. a metagrad
method that is not available); the runner reports it as a failure.

A module that is missing, fails to import, or raises is reported (status, message, the
traceback in `<out>/<name>/error.txt`) and the suite goes on with the others; the exit
status is non-zero when anything failed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import importlib
import json
import math
import os
import pathlib
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from types import ModuleType

BUDGETS = ("tiny", "quick", "full")

# name -> (module, in the default suite). Order is the run order.
REGISTRY: dict[str, tuple[str, bool]] = {
    "synthetic": ("experiments.synthetic", True),
    "sinusoid": ("experiments.sinusoid", True),
    "digits": ("experiments.digits", True),
    "grad_share": ("experiments.grad_share_sinusoid", True),
    # Conv-4 on the rendered glyph set by default (no download); Omniglot / CUB /
    # Mini-ImageNet with --fewshot-dataset when prepared for tensorflow_datasets.
    "fewshot": ("experiments.fewshot", True),
    # Gradient sharing's claims on Conv-4 glyph episodes: several minutes, optional.
    "grad_share_glyphs": ("experiments.grad_share_glyphs", False),
}


@dataclasses.dataclass
class Experiment:
    """One entry of the registry, after trying to import it."""

    name: str
    module_name: str
    default: bool
    module: ModuleType | None = None
    error: str | None = None  # why it cannot run (missing module, import error)

    @property
    def description(self) -> str:
        if self.module is None:
            return f"UNAVAILABLE: {self.error}"
        return getattr(self.module, "DESCRIPTION", "")


def discover(registry: dict[str, tuple[str, bool]] | None = None) -> dict[str, Experiment]:
    """Imports every registered experiment module, recording why one cannot be used."""
    found = {}
    for name, (module_name, default) in (registry or REGISTRY).items():
        exp = Experiment(name, module_name, default)
        try:
            exp.module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                path = module_name.replace(".", "/") + ".py"
                exp.error = f"module {path} not found (not written yet?)"
            else:
                exp.error = f"import failed: {type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
            exp.error = f"import failed: {type(e).__name__}: {e}"
        if exp.module is not None and not callable(getattr(exp.module, "run", None)):
            exp.error, exp.module = f"{module_name} has no run(out_dir, ...) function", None
        found[name] = exp
    return found


def _parse_names(values: Sequence[str] | None) -> list[str] | None:
    """The names given to ``--only``, split on commas, each once, in first-seen order."""
    if values is None:
        return None
    names: list[str] = []
    for v in values:
        names.extend(n for n in v.split(",") if n and n not in names)
    return names


def int_at_least(minimum: int):
    """An argparse ``type`` for integers >= `minimum`; a smaller value is a usage error.

    Use it for every count an experiment takes from the command line, with the same bound
    in the option's help, so the help and the check cannot disagree.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _check_out(out: pathlib.Path) -> str | None:
    """Why `out` cannot be the output directory (None if it can): tried before any run.

    Creates the directory (and its parents) and writes a probe file in it, so a path under
    a file, an existing file, or a directory without write permission is found up front
    instead of as a traceback after the first experiment.
    """
    if out.exists() and not out.is_dir():
        return f"{str(out)!r} exists and is not a directory"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return f"cannot write to directory {str(out)!r}: {e.strerror or e}"
    return None


class _Group:
    """An experiment's argument group; its own `add_argument_group` calls add to it.

    argparse deprecates nested groups, and the runner already groups each
    experiment's options under its name.
    """

    def __init__(self, group):
        self._group = group

    def add_argument_group(self, *args, **kwargs):
        del args, kwargs
        return self

    def __getattr__(self, name):
        return getattr(self._group, name)


def build_parser(experiments: dict[str, Experiment]) -> argparse.ArgumentParser:
    """The command line: common options plus each experiment's own, grouped by experiment."""
    lines = []
    for exp in experiments.values():
        tag = "" if exp.default else " [not in the default suite]"
        lines.append(f"  {exp.name:<11} {exp.description}{tag}")
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description="metagrad's experiment suite: trains with the library's methods and "
        "writes a results table (printed, JSON, CSV) and plots (PNG).",
        epilog="experiments:\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--budget",
        choices=BUDGETS,
        default="quick",
        help="tiny: seconds (tests); quick: the default suite in about 5 minutes on 2 CPU "
        "cores; full: the papers' lengths (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default: %(default)s)")
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default: results/<UTC timestamp>, and results/latest points to it)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        default=None,
        help="run only these experiments (space or comma separated; may name experiments "
        "outside the default suite)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    for exp in experiments.values():
        if exp.module is not None and hasattr(exp.module, "add_arguments"):
            group = parser.add_argument_group(f"{exp.name} options")
            exp.module.add_arguments(_Group(group))
    return parser


def _default_out() -> pathlib.Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return pathlib.Path("results") / stamp


def _link_latest(out: pathlib.Path) -> None:
    latest = out.parent / "latest"
    try:
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(out.name, target_is_directory=True)
    except OSError:
        pass  # e.g. a file system without symlinks: the printed path is enough


# -- helpers for experiment modules ---------------------------------------------------------


class MethodUnavailable(RuntimeError):
    """A metagrad function an experiment needs is not (yet) part of the public API."""


def require(name: str):
    """Returns `metagrad.<name>`, a public function, or raises `MethodUnavailable`.

    A missing method must be reported, not silently skipped, and `mg.reptile` may be
    the submodule `metagrad.reptile` rather than a function while the library is built.
    """
    import metagrad

    obj = getattr(metagrad, name, None)
    if name not in getattr(metagrad, "__all__", ()) or not callable(obj):
        raise MethodUnavailable(f"metagrad.{name} is not available in this version of metagrad")
    return obj


def error_row(out_dir: pathlib.Path, method: str, error: BaseException) -> dict:
    """A table row for a method that could not run; appends its traceback to errors.txt."""
    with open(pathlib.Path(out_dir) / "errors.txt", "a") as f:
        f.write(f"== {method}\n")
        f.write("".join(traceback.format_exception(error)))
    kind = "unavailable" if isinstance(error, MethodUnavailable) else "failed"
    return {"method": method, "error": f"{kind}: {type(error).__name__}: {error}"}


# -- table -----------------------------------------------------------------------------------

_ERROR_SUFFIXES = ("_ci95", "_stderr")


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
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
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item"):  # numpy / jax scalars
        return _jsonable(value.item())
    return value


def write_json(path: pathlib.Path, obj) -> None:
    """Writes JSON, turning numpy scalars into Python numbers and non-finite floats to str."""

    def convert(o):
        if isinstance(o, dict):
            return {k: convert(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [convert(v) for v in o]
        return _jsonable(o)

    with open(path, "w") as f:
        json.dump(convert(obj), f, indent=2)


# -- main --------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("jax", "optax", "metagrad"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = "unavailable"
    return out


def main(argv: Sequence[str] | None = None, registry=None) -> int:
    """Runs the suite; returns the process exit status (0 when everything ran)."""
    experiments = discover(registry)
    parser = build_parser(experiments)
    args = parser.parse_args(argv)

    if args.list:
        for exp in experiments.values():
            tag = "default" if exp.default else "optional"
            print(f"{exp.name:<11} {tag:<9} {exp.description}")
        return 0

    names = _parse_names(args.only)
    if names is None:
        names = [n for n, e in experiments.items() if e.default]
    unknown = [n for n in names if n not in experiments]
    if unknown:
        parser.error(f"--only: unknown experiment(s) {unknown}; choose from {list(experiments)}")

    out = pathlib.Path(args.out) if args.out else _default_out()
    problem = _check_out(out)
    if problem:
        parser.error(f"--out: {problem}")
    if not args.out:
        _link_latest(out)
    print(f"metagrad experiments: {', '.join(names)} | budget={args.budget} seed={args.seed}")
    print(f"writing results to {out.resolve()}", flush=True)

    all_rows: list[dict] = []
    status: dict[str, dict] = {}
    start_all = time.perf_counter()
    for name in names:
        exp = experiments[name]
        exp_dir = out / name
        exp_dir.mkdir(parents=True, exist_ok=True)
        print(f"\n== {name}: {exp.description}", flush=True)
        if exp.module is None:
            status[name] = {"status": "unavailable", "error": exp.error, "seconds": 0.0}
            print(f"   UNAVAILABLE: {exp.error}", flush=True)
            continue
        start = time.perf_counter()
        try:
            rows = exp.module.run(
                exp_dir,
                budget=args.budget,
                seed=args.seed,
                progress=not args.no_progress,
                args=args,
            )
        except Exception as e:  # noqa: BLE001 - reported, then the suite goes on
            seconds = time.perf_counter() - start
            tb = traceback.format_exc()
            (exp_dir / "error.txt").write_text(tb)
            message = f"{type(e).__name__}: {e}"
            status[name] = {"status": "failed", "error": message, "seconds": seconds}
            print(f"   FAILED after {seconds:.1f} s: {message}", flush=True)
            print(f"   traceback: {exp_dir / 'error.txt'}", flush=True)
            continue
        seconds = time.perf_counter() - start
        rows = [{"experiment": name, **row} for row in rows]
        failed = [r for r in rows if r.get("error")]
        status[name] = {
            "status": "partial" if failed else "ok",
            "seconds": seconds,
            "rows": len(rows),
        }
        if failed:
            status[name]["error"] = "; ".join(f"{r.get('method')}: {r['error']}" for r in failed)
        all_rows.extend(rows)
        print(f"   done in {seconds:.1f} s", flush=True)
    total = time.perf_counter() - start_all

    print("\n" + "=" * 78)
    print(f"Results (budget={args.budget}, seed={args.seed})")
    for name in names:
        rows = [r for r in all_rows if r["experiment"] == name and not r.get("error")]
        if rows:
            print(f"\n[{name}]")
            print(format_table([{k: v for k, v in r.items() if k != "error"} for r in rows]))
    print("\nStatus")
    for name in names:
        s = status[name]
        line = f"  {name:<11} {s['status']:<11} {s['seconds']:7.1f} s"
        if s.get("error"):
            line += f"  {s['error']}"
        print(line)
    print(f"  total       {total:.1f} s")

    write_json(
        out / "results.json",
        {
            "config": {
                "budget": args.budget,
                "seed": args.seed,
                "experiments": names,
                "argv": list(argv) if argv is not None else sys.argv[1:],
                "versions": _versions(),
            },
            "status": status,
            "total_seconds": total,
            "rows": all_rows,
        },
    )
    write_csv(out / "results.csv", all_rows)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.csv'} and per-experiment files")
    ok = all(s["status"] == "ok" for s in status.values())
    return 0 if ok else 1
