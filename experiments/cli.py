"""The suite's command line, `python -m experiments`: options, output directory, run, report.

The experiments come from `experiments.registry`, their settings from `experiments.config`,
and the table and files are written by `experiments.writers`. A module that is missing,
fails to import, or raises is reported (status, message, the traceback in
`<out>/<name>/error.txt`) and the suite goes on with the others; the exit status is
non-zero when anything failed. Ctrl-C stops the suite: results.json then holds the experiments
that finished (``"run_status": "interrupted"``) and the exit status is 130.
`results/latest` points to the last run that wrote its results.

``--jobs N`` runs N experiments at a time, each in a worker process of its own (spawned, so
each has its own JAX runtime), its output in ``<out>/<name>/log.txt``. By default N is 2
when JAX runs on a CPU with two or more cores and no GPU / TPU plugin is installed (two
accelerator processes would compete for one device's memory), else 1; with N = 1 the
experiments run in this process, in order, with progress bars. The results are the same
either way: every experiment draws from its own seeds.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib
import importlib.metadata
import multiprocessing
import os
import pathlib
import platform
import sys
import time
import traceback
from collections.abc import Sequence

from experiments.config import BUDGET_NAMES
from experiments.registry import Experiment, discover
from experiments.writers import format_table, write_csv, write_json


def _parse_names(values: Sequence[str] | None) -> list[str] | None:
    """The names given to ``--only``, split on commas, each once, in first-seen order."""
    if values is None:
        return None
    names: list[str] = []
    for v in values:
        names.extend(n for n in v.split(",") if n and n not in names)
    return names


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

    argparse deprecates nested groups, and the command line already groups each
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
        choices=BUDGET_NAMES,
        default="quick",
        help="tiny: the smallest settings, for the tests (mostly compile time); quick: the "
        "default suite (README: its time on 2 CPU cores); full: the papers' lengths "
        "(default: %(default)s)",
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
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="run N experiments at a time, each in its own process, its output in "
        "<out>/<name>/log.txt (default: 2 when JAX runs on a CPU with 2 or more cores, else 1)",
    )
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


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("jax", "optax", "metagrad"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = "unavailable"
    return out


def _run_one(exp: Experiment, exp_dir: pathlib.Path, args) -> tuple[dict, list[dict]]:
    """Runs one experiment; returns its status entry and its rows (tagged with its name)."""
    if exp.module is None:
        print(f"   UNAVAILABLE: {exp.error}", flush=True)
        return {"status": "unavailable", "error": exp.error, "seconds": 0.0}, []
    start = time.perf_counter()
    try:
        rows = exp.module.run(
            exp_dir, budget=args.budget, seed=args.seed, progress=not args.no_progress, args=args
        )
    except Exception as e:  # noqa: BLE001 - reported, then the suite goes on
        seconds = time.perf_counter() - start
        (exp_dir / "error.txt").write_text(traceback.format_exc())
        message = f"{type(e).__name__}: {e}"
        print(f"   FAILED after {seconds:.1f} s: {message}", flush=True)
        print(f"   traceback: {exp_dir / 'error.txt'}", flush=True)
        return {"status": "failed", "error": message, "seconds": seconds}, []
    seconds = time.perf_counter() - start
    rows = [{"experiment": exp.name, **row} for row in rows]
    failed = [r for r in rows if r.get("error")]
    status = {"status": "partial" if failed else "ok", "seconds": seconds, "rows": len(rows)}
    if failed:
        status["error"] = "; ".join(f"{r.get('method')}: {r['error']}" for r in failed)
    print(f"   done in {seconds:.1f} s", flush=True)
    return status, rows


def _worker(name: str, module_name: str, exp_dir: pathlib.Path, args) -> tuple[dict, list[dict]]:
    """`_run_one` in a worker process, everything it prints in ``<exp_dir>/log.txt``."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(exp_dir / "log.txt", "w") as log:
        # The file descriptors, so that XLA's own messages land in the log too.
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            return _run_one(discover({name: (module_name, True)})[name], exp_dir, args)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


def _accelerator_plugin() -> bool:
    """Whether a JAX GPU / TPU plugin is installed (without starting JAX)."""
    prefixes = ("jax-cuda", "jax-rocm", "jax-tpu", "libtpu", "jax-metal")
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith(prefixes):
            return True
    return False


def _default_jobs() -> int:
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    on_cpu = platforms == "cpu" if platforms else not _accelerator_plugin()
    return 2 if on_cpu and (os.cpu_count() or 1) >= 2 else 1


def _run_parallel(names, experiments, out, args, jobs) -> tuple[dict, dict, bool]:
    """Runs the experiments `jobs` at a time in spawned worker processes.

    The long ones (a module's ``LONG = True``) start first. Returns the status and the rows
    of each experiment, and whether Ctrl-C stopped the run.
    """
    quiet = argparse.Namespace(**{**vars(args), "no_progress": True})
    order = sorted(names, key=lambda n: not getattr(experiments[n].module, "LONG", False))
    status, rows, start = {}, {}, time.perf_counter()
    pool = concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=multiprocessing.get_context("spawn")
    )
    futures = {}
    for name in order:
        exp = experiments[name]
        exp_dir = out / name
        exp_dir.mkdir(parents=True, exist_ok=True)
        print(f"\n== {name}: {exp.description}", flush=True)
        futures[pool.submit(_worker, name, exp.module_name, exp_dir, quiet)] = name
    print(f"\n{len(order)} experiments, {jobs} at a time; the output of each: {out}/<name>/log.txt")
    interrupted = False
    try:
        for future in concurrent.futures.as_completed(futures):
            name = futures[future]
            try:
                status[name], rows[name] = future.result()
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - a worker that died: reported, the rest go on
                seconds = time.perf_counter() - start
                status[name] = {"status": "failed", "error": repr(e), "seconds": seconds}
                rows[name] = []
            s = status[name]
            line = f"   {name}: {s['status']} in {s['seconds']:.1f} s"
            print(line + (f"  {s['error']}" if s.get("error") else ""), flush=True)
    except KeyboardInterrupt:
        interrupted = True
        for name in order:
            if name not in status:
                status[name] = {"status": "interrupted", "seconds": time.perf_counter() - start}
        print("\n   INTERRUPTED", flush=True)
    finally:
        pool.shutdown(wait=not interrupted, cancel_futures=True)
    if interrupted:
        # Ctrl-C means now: a worker inside an XLA compilation would only see it afterwards.
        for process in multiprocessing.active_children():
            process.terminate()
            process.join(timeout=10)
    return status, rows, interrupted


def _report(names, status, all_rows, args, total) -> None:
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
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs: must be at least 1, got {args.jobs}")
    # Worker processes import each experiment by its module name: a registry given to
    # `main` (the tests') runs in this process unless --jobs says otherwise.
    jobs = args.jobs or (1 if registry is not None else _default_jobs())
    jobs = min(jobs, len(names))
    print(f"metagrad experiments: {', '.join(names)} | budget={args.budget} seed={args.seed}")
    print(f"writing results to {out.resolve()}", flush=True)

    all_rows: list[dict] = []
    status: dict[str, dict] = {}
    interrupted = False
    start_all = time.perf_counter()
    if jobs > 1:
        found, rows_by, interrupted = _run_parallel(names, experiments, out, args, jobs)
        status = {n: found[n] for n in names if n in found}
        all_rows = [r for n in names for r in rows_by.get(n, [])]
    for name in names if jobs == 1 else ():
        exp = experiments[name]
        exp_dir = out / name
        exp_dir.mkdir(parents=True, exist_ok=True)
        print(f"\n== {name}: {exp.description}", flush=True)
        start = time.perf_counter()
        try:
            status[name], rows = _run_one(exp, exp_dir, args)
        except KeyboardInterrupt:
            # Ctrl-C: keep what finished, say which one was cut short, no traceback.
            seconds = time.perf_counter() - start
            print(f"\n   INTERRUPTED after {seconds:.1f} s", flush=True)
            status[name] = {"status": "interrupted", "seconds": seconds}
            interrupted = True
            break
        all_rows.extend(rows)
    total = time.perf_counter() - start_all
    names_run = list(status)
    _report(names_run, status, all_rows, args, total)

    write_json(
        out / "results.json",
        {
            "config": {
                "budget": args.budget,
                "seed": args.seed,
                "experiments": names,
                "argv": list(argv) if argv is not None else sys.argv[1:],
                "jobs": jobs,
                "versions": _versions(),
            },
            "run_status": "interrupted" if interrupted else "finished",
            "status": status,
            "total_seconds": total,
            "rows": all_rows,
        },
    )
    write_csv(out / "results.csv", all_rows)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.csv'} and per-experiment files")
    # `results/latest` moves only to a run that wrote its results: finished, or interrupted
    # after at least one experiment finished.
    if not args.out and any(s["status"] != "interrupted" for s in status.values()):
        _link_latest(out)
    if interrupted:
        print("interrupted (Ctrl-C): results.json holds the experiments that finished")
        return 130
    ok = all(s["status"] == "ok" for s in status.values())
    return 0 if ok else 1
