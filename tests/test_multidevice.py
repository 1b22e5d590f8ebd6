"""Multi-device: sharded meta-steps and data-parallel dotprod match one device.

One subprocess (`multidevice_script.py`, 4 faked CPU devices: the XLA flag must be set
before JAX starts) runs every check and prints its results as JSON; the tests below read
them. Covered here: `jax.jit` with the batch or the task axis sharded by a `NamedSharding`
(dotprod in an optax chain, maml, grad_share, reptile, seq_reptile, pcgrad), a 5-step
dotprod training loop under `jax.shard_map` with `batch_axis_name`, and restoring a
checkpoint onto 4 devices. Single dotprod updates under `pmap`/`shard_map` are compared in
`test_dotprod_multidevice.py`, reptile's `axis_name` under `shard_map` in `test_reptile.py`.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("multidevice_script.py")
TOLERANCE = 1e-5
JIT_SHARDED = ["dotprod", "maml", "grad_share", "reptile", "seq_reptile", "pcgrad"]


@pytest.fixture(scope="module")
def output():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = str(SCRIPT.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    return json.loads(lines["RESULT"])


@pytest.mark.parametrize("name", JIT_SHARDED)
def test_jit_with_named_sharding_matches_one_device(output, name):
    results = output
    assert results[f"{name}/jit_named_sharding"] <= TOLERANCE
    # The result really was computed on (and lives on) the 4 devices.
    assert results[f"{name}/jit_named_sharding/devices"] == 4


@pytest.mark.parametrize("name", ["maml", "grad_share", "reptile", "seq_reptile"])
def test_task_batch_was_split_over_devices(output, name):
    results = output
    assert results[f"{name}/tasks_devices"] == 4


def test_dotprod_batch_axis_name_training_loop_under_shard_map(output):
    results = output
    assert results["dotprod/shard_map_train"] <= TOLERANCE
    assert results["dotprod/shard_map_train/devices"] == 4


def test_checkpoint_restores_onto_devices_and_continues(output):
    results = output
    assert results["checkpoint/sharded_restore"] == 0.0
    assert results["checkpoint/sharded_restore/devices"] == 4
