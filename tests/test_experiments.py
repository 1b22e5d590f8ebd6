"""The experiment suite: each experiment in its tiny budget through the command line.

These run the real experiments end to end (training, evaluation, files), in-process
through `experiments.runner.main`, and check the outputs exist and hold sane values.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import sys
import types

import pytest

from experiments import runner

DEFAULT_SUITE = [n for n, (_, default) in runner.REGISTRY.items() if default]


def _run(tmp_path, *argv):
    out = tmp_path / "out"
    code = runner.main(["--budget", "tiny", "--no-progress", "--out", str(out), *argv])
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
    exp = runner.discover()[name]
    if exp.module is None and "not found" in (exp.error or ""):
        pytest.skip(f"{name}: {exp.error}")
    return exp


def test_help_lists_every_experiment_and_its_options(capsys):
    with pytest.raises(SystemExit) as e:
        runner.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in runner.REGISTRY:
        assert name in text
    for option in ("--budget", "--seed", "--out", "--only", "--no-progress", "--list"):
        assert option in text
    # Experiment-specific options, grouped per experiment.
    assert "--sinusoid-iterations" in text and "sinusoid options" in text
    assert "--digits-seeds" in text and "--fewshot-dataset" in text


def test_list(capsys):
    assert runner.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(runner.REGISTRY)
    assert "default" in next(line for line in lines if line.startswith("fewshot"))


def test_unknown_experiment_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        _run(tmp_path, "--only", "no_such_experiment")


@pytest.mark.parametrize("name", ["sinusoid", "digits", "synthetic", "grad_share"])
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
    # One cheap method each: reproducibility comes from the runner's seed and the
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
            runner.require("no_such_method")
        except runner.MethodUnavailable as e:
            return [{"method": "x", "value": 1.0}, runner.error_row(out_dir, "y", e)]

    partial.run = run_partial
    monkeypatch.setitem(sys.modules, broken.__name__, broken)
    monkeypatch.setitem(sys.modules, partial.__name__, partial)
    registry = {
        "broken": (broken.__name__, True),
        "partial": (partial.__name__, True),
        "missing": ("experiments.no_such_module", True),
    }
    out = tmp_path / "out"
    code = runner.main(["--out", str(out), "--no-progress"], registry=registry)
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


def test_require_rejects_submodules_and_unknown_names():
    import metagrad

    assert runner.require("maml") is metagrad.maml
    with pytest.raises(runner.MethodUnavailable, match="no_such"):
        runner.require("no_such")


def test_format_table_merges_error_columns():
    text = runner.format_table(
        [{"experiment": "e", "method": "a", "acc": 0.5, "acc_stderr": 0.01, "n": 3}]
    )
    header, _, line = text.splitlines()
    assert "acc_stderr" not in header and "experiment" not in header
    assert "0.5 ± 0.01" in line


def test_default_suite_is_what_the_readme_promises():
    assert DEFAULT_SUITE[:3] == ["synthetic", "sinusoid", "digits"]
    # Few-shot classification on the rendered glyph set needs no download.
    assert "fewshot" in DEFAULT_SUITE


# -- command-line validation (parse and validate only: no experiment runs) -------------------


def _usage_error(capsys, argv, registry=None):
    """Runs the CLI expecting an argparse usage error; returns its stderr."""
    with pytest.raises(SystemExit) as e:
        runner.main(argv, registry=registry)
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
        runner.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "seeds (>= 2; default: tiny 2, quick 3, full 5)" in text
    args = runner.build_parser(runner.discover()).parse_args(["--grad-share-seeds", "2"])
    assert args.grad_share_seeds == 2


def test_a_name_repeated_in_only_runs_once(tmp_path, monkeypatch):
    calls = []
    registry = _counting_registry(monkeypatch, calls)
    out = tmp_path / "out"
    argv = ["--out", str(out), "--no-progress", "--only", "b", "a,b", "b,,a"]
    assert runner.main(argv, registry=registry) == 0
    assert calls == ["b", "a"]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["experiments"] == ["b", "a"]
    assert [r["experiment"] for r in results["rows"]] == ["b", "a"]
