"""The experiment suite: each experiment in its tiny budget through the command line.

These run the real experiments end to end (training, evaluation, files), in-process
through `experiments.cli.main`, and check the outputs exist and hold sane values; and the
configuration helper (`experiments.config`) every experiment uses.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import pathlib
import sys
import types

import pytest

from experiments import cli, config, writers
from experiments.registry import REGISTRY, discover

DEFAULT_SUITE = [n for n, (_, default) in REGISTRY.items() if default]


def _run(tmp_path, *argv):
    out = tmp_path / "out"
    code = cli.main(["--budget", "tiny", "--no-progress", "--out", str(out), *argv])
    return code, out


def _load(out):
    with open(out / "results.json") as f:
        results = json.load(f)
    with open(out / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    return results, csv_rows


def _numbers(row):
    return {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _available(name):
    exp = discover()[name]
    if exp.module is None and "not found" in (exp.error or ""):
        pytest.skip(f"{name}: {exp.error}")
    return exp


def test_help_lists_every_experiment_and_its_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in REGISTRY:
        assert name in text
    for option in ("--budget", "--seed", "--out", "--only", "--no-progress", "--list"):
        assert option in text
    # Experiment-specific options, grouped per experiment.
    assert "--sinusoid-iterations" in text and "sinusoid options" in text
    assert "--digits-seeds" in text and "--fewshot-dataset" in text


def test_list(capsys):
    assert cli.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(REGISTRY)
    assert "default" in next(line for line in lines if line.startswith("fewshot"))


def test_unknown_experiment_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        _run(tmp_path, "--only", "no_such_experiment")


@pytest.mark.parametrize("name", ["sinusoid", "digits", "synthetic", "grad_share", "mtl"])
def test_experiment_tiny(tmp_path, name):
    exp = _available(name)
    assert exp.module is not None, exp.error
    code, out = _run(tmp_path, "--only", name)
    results, csv_rows = _load(out)
    status = results["status"][name]
    assert status["status"] == "ok", status.get("error")
    assert code == 0
    rows = results["rows"]
    assert rows and len(csv_rows) == len(rows)
    assert all(r["experiment"] == name and r["method"] for r in rows)
    for row in rows:
        for key, value in _numbers(row).items():
            assert math.isfinite(value), (row["method"], key, value)
    # The experiment's own files: a JSON, a CSV and at least one PNG.
    files = {p.suffix for p in (out / name).iterdir()}
    assert {".json", ".csv", ".png"} <= files, files
    for png in (out / name).glob("*.png"):
        assert png.stat().st_size > 1000

    if name == "sinusoid":
        methods = {r["method"] for r in rows}
        assert {"MAML", "FOMAML", "Reptile", "MAML+grad_share", "DotProd pretrain"} <= methods
        for row in rows:
            mses = {k: v for k, v in row.items() if k.startswith("mse_") and "ci95" not in k}
            assert len(mses) == 6
            assert all(v > 0 for v in mses.values())
            assert all(row[k + "_ci95"] > 0 for k in mses)
            assert row["test_tasks"] >= 100
    if name == "mtl":
        methods = {(r["part"], r["method"]) for r in rows}
        assert {("toy", "Sum (plain MTL)"), ("toy", "FAMO"), ("digits", "PCGrad"),
                ("digits", "STL (one network per task)")} <= methods  # fmt: skip
        assert {r["setting"] for r in rows if r["part"] == "toy"} == {"CAGrad", "Nash-MTL"}
        for row in rows:
            if row["part"] == "digits":
                assert 0.0 <= row["acc_left"] <= 1.0 and 0.0 <= row["acc_right"] <= 1.0
    if name == "digits":
        assert {r["method"] for r in rows} == {
            "plain Adam",
            "DotProd",
            "Reptile (reptile_outer)",
            "FOMAML-style",
        }
        for row in rows:
            assert 0.0 <= row["test_acc"] <= 1.0 and 0.0 <= row["train_acc"] <= 1.0
            assert row["test_acc_stderr"] >= 0 and row["test_loss"] > 0
            assert -1.0 <= row["grad_cosine"] <= 1.0


def test_same_seed_same_results_other_seed_differs(tmp_path):
    # One cheap method each: reproducibility comes from the command line's seed and the
    # experiments' key handling, the same for every method.
    argv = ["--only", "digits", "sinusoid", "--digits-methods", "plain", "--digits-seeds", "2"]
    argv += ["--sinusoid-methods", "pretrain", "--sinusoid-test-tasks", "100"]

    def rows(seed, sub):
        code, out = _run(tmp_path / sub, *argv, "--seed", str(seed))
        assert code == 0
        return _load(out)[0]["rows"]

    first, again, other = rows(0, "a"), rows(0, "b"), rows(1, "c")
    assert first == again
    assert first != other


def test_failures_are_reported_not_skipped(tmp_path, monkeypatch, capsys):
    broken = types.ModuleType("tests._broken_experiment")
    broken.DESCRIPTION = "raises"

    def run(out_dir, **kwargs):
        raise RuntimeError("boom")

    broken.run = run
    partial = types.ModuleType("tests._partial_experiment")

    def run_partial(out_dir, **kwargs):
        try:
            raise ValueError("no_such_method went wrong")
        except ValueError as e:
            return [{"method": "x", "value": 1.0}, writers.error_row(out_dir, "y", e)]

    partial.run = run_partial
    monkeypatch.setitem(sys.modules, broken.__name__, broken)
    monkeypatch.setitem(sys.modules, partial.__name__, partial)
    registry = {
        "broken": (broken.__name__, True),
        "partial": (partial.__name__, True),
        "missing": ("experiments.no_such_module", True),
    }
    out = tmp_path / "out"
    code = cli.main(["--out", str(out), "--no-progress"], registry=registry)
    assert code == 1
    status = json.loads((out / "results.json").read_text())["status"]
    assert status["broken"]["status"] == "failed" and "boom" in status["broken"]["error"]
    assert "RuntimeError: boom" in (out / "broken" / "error.txt").read_text()
    assert status["partial"]["status"] == "partial"
    assert "no_such_method" in status["partial"]["error"]
    assert "no_such_method" in (out / "partial" / "errors.txt").read_text()
    assert status["missing"]["status"] == "unavailable"
    assert "experiments/no_such_module.py not found" in status["missing"]["error"]
    text = capsys.readouterr().out
    assert "FAILED" in text and "UNAVAILABLE" in text and "partial" in text


def test_format_table_merges_error_columns():
    text = writers.format_table(
        [{"experiment": "e", "method": "a", "acc": 0.5, "acc_stderr": 0.01, "n": 3}]
    )
    header, _, line = text.splitlines()
    assert "acc_stderr" not in header and "experiment" not in header
    assert "0.5 ± 0.01" in line


def test_default_suite_is_what_the_readme_promises():
    assert DEFAULT_SUITE[:3] == ["synthetic", "sinusoid", "digits"]
    # The multi-task aggregators' experiments run on embedded data.
    assert "mtl" in DEFAULT_SUITE
    # Few-shot classification on the rendered glyph set needs no download: in the suite.
    assert "fewshot" in DEFAULT_SUITE


# -- command-line validation (parse and validate only: no experiment runs) -------------------


def _usage_error(capsys, argv, registry=None):
    """Runs the CLI expecting an argparse usage error; returns its stderr."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv, registry=registry)
    assert e.value.code == 2
    return capsys.readouterr().err


def _counting_registry(monkeypatch, calls):
    module = types.ModuleType("tests._counting_experiment")
    module.DESCRIPTION = "counts its runs"

    def run(out_dir, **kwargs):
        calls.append(pathlib.Path(out_dir).name)
        return [{"method": "m", "value": 1.0}]

    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return {"a": (module.__name__, True), "b": (module.__name__, True)}


def test_ctrl_c_keeps_finished_results_and_latest_moves_only_after(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    seen = []
    module = types.ModuleType("tests._interrupted_experiment")
    module.DESCRIPTION = "finishes, or is interrupted"

    def run(out_dir, **kwargs):
        # While a run is going on, results/latest still names the previous finished run.
        latest = pathlib.Path("results") / "latest"
        seen.append(latest.resolve().name if latest.exists() else None)
        if pathlib.Path(out_dir).name == "stop":
            raise KeyboardInterrupt
        return [{"method": "m", "value": 1.0}]

    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    registry = {"a": (module.__name__, True), "stop": (module.__name__, True)}
    assert cli.main(["--no-progress", "--only", "a"], registry=registry) == 0
    first = (tmp_path / "results" / "latest").resolve()
    assert seen == [None] and (first / "results.json").exists()
    capsys.readouterr()
    monkeypatch.setattr(cli, "_default_out", lambda: pathlib.Path("results") / "second")
    assert cli.main(["--no-progress", "--only", "a,stop"], registry=registry) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err and "interrupted" in captured.out
    assert seen[1:] == [first.name, first.name]
    results = json.loads((tmp_path / "results" / "second" / "results.json").read_text())
    assert results["run_status"] == "interrupted"
    assert results["status"]["a"]["status"] == "ok"
    assert results["status"]["stop"]["status"] == "interrupted"
    assert [r["experiment"] for r in results["rows"]] == ["a"]
    assert (tmp_path / "results" / "latest").resolve().name == "second"
    # Interrupted before anything finished: latest stays on the last run with results.
    monkeypatch.setattr(cli, "_default_out", lambda: pathlib.Path("results") / "third")
    assert cli.main(["--no-progress", "--only", "stop"], registry=registry) == 130
    assert (tmp_path / "results" / "latest").resolve().name == "second"


def test_out_that_is_a_file_is_a_usage_error(tmp_path, capsys, monkeypatch):
    calls = []
    registry = _counting_registry(monkeypatch, calls)
    target = tmp_path / "results.txt"
    target.write_text("not a directory")
    err = _usage_error(capsys, ["--out", str(target), "--no-progress"], registry)
    assert "--out" in err and "not a directory" in err
    # Under a file: the directory cannot be created.
    err = _usage_error(capsys, ["--out", str(target / "sub"), "--no-progress"], registry)
    assert "--out" in err and "cannot write" in err
    assert calls == [] and target.read_text() == "not a directory"


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere"
)
def test_unwritable_out_is_a_usage_error(tmp_path, capsys, monkeypatch):
    calls = []
    registry = _counting_registry(monkeypatch, calls)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        err = _usage_error(capsys, ["--out", str(locked / "run"), "--no-progress"], registry)
        assert "--out" in err and "cannot write" in err
        err = _usage_error(capsys, ["--out", str(locked), "--no-progress"], registry)
        assert "--out" in err and "cannot write" in err
    finally:
        locked.chmod(0o700)
    assert calls == []


def test_unwritable_out_is_found_before_any_run(tmp_path, capsys, monkeypatch):
    # The same check, forced through a failing probe write (works as root too).
    calls = []
    registry = _counting_registry(monkeypatch, calls)
    original = pathlib.Path.write_text

    def refuse(self, *args, **kwargs):
        if self.name.startswith(".write-test-"):
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", refuse)
    err = _usage_error(capsys, ["--out", str(tmp_path / "out"), "--no-progress"], registry)
    assert "--out" in err and "Permission denied" in err
    assert calls == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--grad-share-seeds", "1"], "--grad-share-seeds: must be >= 2, got 1"),
        (["--grad-share-seeds", "0"], "--grad-share-seeds: must be >= 2, got 0"),
        (["--grad-share-steps", "0"], "--grad-share-steps: must be >= 1, got 0"),
        (["--digits-seeds", "1"], "--digits-seeds: must be >= 2, got 1"),
        (["--sinusoid-iterations", "-5"], "--sinusoid-iterations: must be >= 1, got -5"),
        (["--fewshot-ways", "1"], "--fewshot-ways: must be >= 2, got 1"),
        (["--grad-share-seeds", "two"], "--grad-share-seeds: expected an integer, got 'two'"),
    ],
)
def test_counts_below_their_documented_minimum_are_usage_errors(capsys, argv, message):
    err = _usage_error(capsys, ["--list", *argv])
    assert message in err


def test_help_states_the_minimum_that_is_checked(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "seeds (>= 2; default: tiny 2, quick 3, full 5)" in text
    args = cli.build_parser(discover()).parse_args(["--grad-share-seeds", "2"])
    assert args.grad_share_seeds == 2


def test_a_name_repeated_in_only_runs_once(tmp_path, monkeypatch):
    calls = []
    registry = _counting_registry(monkeypatch, calls)
    out = tmp_path / "out"
    argv = ["--out", str(out), "--no-progress", "--only", "b", "a,b", "b,,a"]
    assert cli.main(argv, registry=registry) == 0
    assert calls == ["b", "a"]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["experiments"] == ["b", "a"]
    assert [r["experiment"] for r in results["rows"]] == ["b", "a"]


# -- configuration: budget preset, then the options that were given ----------------------------


@dataclasses.dataclass(frozen=True)
class _Toy:
    steps: int = config.option("steps", minimum=1)
    names: tuple[str, ...] = config.option("names", default=("a",), choices="abc", many=True)
    rate: float = config.option("rate", default=0.5, type=float)
    flag: bool = config.option("a flag", default=False, type=bool)
    hidden: int = 3  # not an option


_TOY_BUDGETS = {"tiny": dict(steps=2), "quick": dict(steps=20, rate=0.1), "full": dict(steps=200)}


def _toy_parser():
    parser = argparse.ArgumentParser()
    config.add_options(parser, _Toy, _TOY_BUDGETS, "toy")
    return parser


def test_resolve_takes_the_budget_preset_then_the_given_options():
    assert config.resolve(_Toy, _TOY_BUDGETS, "quick") == _Toy(steps=20, rate=0.1)
    assert config.resolve(_Toy, _TOY_BUDGETS, "quick", _toy_parser().parse_args([])) == _Toy(
        steps=20, rate=0.1
    )
    args = _toy_parser().parse_args(["--toy-steps", "7", "--toy-names", "b", "c", "--toy-flag"])
    got = config.resolve(_Toy, _TOY_BUDGETS, "quick", args, "toy")
    assert got == _Toy(steps=7, names=("b", "c"), rate=0.1, flag=True, hidden=3)
    # `base` lies under the preset: the preset wins where both set a field.
    got = config.resolve(_Toy, _TOY_BUDGETS, "tiny", None, "toy", base=dict(steps=9, hidden=4))
    assert got == _Toy(steps=2, hidden=4)
    with pytest.raises(ValueError, match=r"budget must be one of \('tiny', 'quick', 'full'\)"):
        config.resolve(_Toy, _TOY_BUDGETS, "huge", args, "toy")


def test_options_help_states_the_defaults_and_rejects_bad_values(capsys):
    help_text = " ".join(_toy_parser().format_help().split())
    assert "--toy-steps TOY_STEPS steps (>= 1; default: tiny 2, quick 20, full 200)" in help_text
    assert "rate (default: quick 0.1, else 0.5)" in help_text
    assert "--toy-hidden" not in help_text
    for argv in (["--toy-steps", "0"], ["--toy-names", "z"]):
        with pytest.raises(SystemExit):
            _toy_parser().parse_args(argv)
    assert "--toy-names: invalid choice: 'z'" in capsys.readouterr().err


def test_experiment_options_reach_their_config():
    from experiments import digits, grad_share_sinusoid, sinusoid, synthetic

    argv = ["--sinusoid-methods", "maml", "pretrain", "--sinusoid-dotprod-scheme", "exact"]
    argv += ["--synthetic-optimizer", "sgd", "--grad-share-task-batch", "3"]
    args = cli.build_parser(discover()).parse_args(argv)
    cfg = config.resolve(sinusoid.Config, sinusoid.BUDGETS, "tiny", args, sinusoid.NAME)
    assert cfg.methods == ("maml", "pretrain") and cfg.dotprod_scheme == "exact"
    assert (cfg.iterations, cfg.test_tasks, cfg.train_shots) == (20, 100, 10)
    cfg = config.resolve(synthetic.Config, synthetic.BUDGETS, "full", args, synthetic.NAME)
    assert (cfg.optimizer, cfg.lr, cfg.steps, cfg.sweep) == ("sgd", 0.02, 4000, True)
    module = grad_share_sinusoid
    cfg = config.resolve(module.Config, module.BUDGETS, "quick", args, module.NAME)
    assert (cfg.task_batch, cfg.seeds, cfg.steps) == (3, 3, 1500)
    for module in (digits, grad_share_sinusoid, sinusoid, synthetic):
        for budget in config.BUDGET_NAMES:
            config.resolve(module.Config, module.BUDGETS, budget)  # every preset is complete


# -- several experiments at a time (--jobs) ---------------------------------------------------


def _fake_registry():
    name = "cli_fake_experiment"  # tests/cli_fake_experiment.py, importable by spawned workers
    return {
        "first": (name, True),
        "fails": (name, True),
        "missing": ("experiments.no_such_module", True),
        "second": (name, True),
    }


def test_jobs_in_worker_processes_give_the_results_of_one_process(tmp_path, capsys):
    registry = _fake_registry()
    argv = ["--no-progress", "--seed", "3"]
    assert cli.main([*argv, "--out", str(tmp_path / "one"), "--jobs", "1"], registry=registry) == 1
    assert cli.main([*argv, "--out", str(tmp_path / "two"), "--jobs", "2"], registry=registry) == 1
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert one["config"]["jobs"] == 1 and two["config"]["jobs"] == 2
    assert (
        two["rows"]
        == one["rows"]
        == [
            {"experiment": "first", "method": "first", "value": 35.0},
            {"experiment": "second", "method": "second", "value": 36.0},
        ]
    )
    # The same status for each, in the registry's order, whichever finished first.
    assert list(two["status"]) == list(one["status"]) == list(registry)
    for name in registry:
        assert two["status"][name]["status"] == one["status"][name]["status"], name
        assert two["status"][name].get("error") == one["status"][name].get("error"), name
    assert two["status"]["fails"]["error"] == "RuntimeError: boom"
    assert "not found" in two["status"]["missing"]["error"]
    # A worker's output, Python's and the file descriptor's, is in the experiment's log.
    log = (tmp_path / "two" / "first" / "log.txt").read_text()
    assert "hello from first, progress=False" in log and "fd-level line from first" in log
    assert (tmp_path / "two" / "fails" / "error.txt").exists()
    assert "fails: failed in" in capsys.readouterr().out


def test_ctrl_c_in_a_worker_stops_the_parallel_run(tmp_path, capsys):
    registry = {"first": ("cli_fake_experiment", True), "stop": ("cli_fake_experiment", True)}
    out = tmp_path / "out"
    assert cli.main(["--out", str(out), "--jobs", "2"], registry=registry) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err and "interrupted" in captured.out
    results = json.loads((out / "results.json").read_text())
    assert results["run_status"] == "interrupted"
    assert results["status"]["stop"]["status"] == "interrupted"
    assert results["status"]["first"]["status"] in ("ok", "interrupted")


def test_jobs_must_be_positive(capsys):
    err = _usage_error(capsys, ["--jobs", "0"])
    assert "--jobs: must be at least 1, got 0" in err


@pytest.mark.parametrize(
    "platforms,cores,expected", [("", 2, 2), ("cpu", 8, 2), ("cpu", 1, 1), ("cuda", 8, 1)]
)
def test_default_jobs_two_processes_only_on_a_multicore_cpu(
    monkeypatch, platforms, cores, expected
):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(cli, "_accelerator_plugin", lambda: False)
    assert cli._default_jobs() == expected
    monkeypatch.setattr(cli, "_accelerator_plugin", lambda: True)
    if not platforms:
        assert cli._default_jobs() == 1  # a GPU / TPU plugin installed: one process
