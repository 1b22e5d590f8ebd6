"""Determinism: the same seed gives the same result, for every method and an experiment.

"Same seed, same result" is checked in two parts, so that each method is compiled once:

- Building a method twice (new closures, as in two runs of a script) gives the same
  initial state and the same program: identical StableHLO text for its jitted step.
- The compiled step, run twice from the same seed, gives bit-identical trajectories
  (no run-to-run variation from threads or reductions), and a different seed gives a
  different trajectory (the seed is used).

Together they say that two runs with one seed compute the same numbers. The methods are the
training loops of `test_checkpoint.py`, which covers every state metagrad defines.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import pytest
from test_checkpoint import CASE_IDS, CASES, as_numpy, assert_states_equal, built, run, start

STEPS = 8


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_same_seed_same_trajectory(case):
    init, step = built(case.name)
    first = run(step, start(init, 0), STEPS)
    second = run(step, start(init, 0), STEPS)
    assert_states_equal(second, first)

    other = as_numpy(run(step, start(init, 1), STEPS))
    differs = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(as_numpy(first)), strict=True)
    ]
    # Every case draws its data from the key: another seed changes more than the key.
    assert sum(differs) >= 2


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_rebuilt_method_is_the_same_program(case):
    init, step = built(case.name)
    init2, step2 = case.build()
    state = start(init, 0)
    assert_states_equal(start(init2, 0), state)
    assert step2.lower(state).as_text() == step.lower(state).as_text()


def test_experiment_same_seed_same_rows(tmp_path):
    """The sinusoid experiment (MAML only, tiny budget) gives the same table twice."""
    sinusoid = pytest.importorskip("experiments.sinusoid")
    parser = argparse.ArgumentParser()
    sinusoid.add_arguments(parser)
    args = parser.parse_args(["--sinusoid-methods", "maml", "--sinusoid-test-tasks", "10"])

    def rows(name):
        out = tmp_path / name
        out.mkdir()
        return sinusoid.run(out, budget="tiny", seed=0, progress=False, args=args)

    first, second = rows("a"), rows("b")
    assert first and all(isinstance(row, dict) for row in first)
    # Rows hold results only (no timings), so the whole table must repeat exactly.
    assert second == first
