"""Multi-device: sharded meta-steps and data-parallel dotprod match one device.

One subprocess (`multidevice_script.py`, 4 faked CPU devices: the XLA flag must be set
before JAX starts) runs every check and prints its results as JSON; the tests below read
them. Covered here: `jax.jit` with the batch or the task axis sharded by a `NamedSharding`
(dotprod in an optax chain, maml, grad_share, reptile, seq_reptile, pcgrad), a 5-step
dotprod training loop under `jax.shard_map` with `axis_name`, and restoring a
checkpoint onto 4 devices; the meta-learners' ``axis_name`` under `jax.shard_map` (with and
without ``check_vma``) and `jax.pmap` against one device, including the unrolled task loop.
Single dotprod updates under `pmap`/`shard_map` are compared in
`test_dotprod_multidevice.py`, reptile's `axis_name` under `shard_map` in `test_reptile.py`.
"""

from __future__ import annotations

import pathlib

import pytest

from tests.helpers import run_on_four_devices

# One worker runs the whole module, so the subprocess runs once.
pytestmark = pytest.mark.xdist_group("multidevice")
SCRIPT = pathlib.Path(__file__).with_name("multidevice_script.py")
TOLERANCE = 1e-5
JIT_SHARDED = ["dotprod", "maml", "grad_share", "reptile", "seq_reptile", "pcgrad"]


@pytest.fixture(scope="module")
def output():
    return run_on_four_devices([str(SCRIPT)])


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


def test_dotprod_axis_name_training_loop_under_shard_map(output):
    results = output
    assert results["dotprod/shard_map_train"] <= TOLERANCE
    assert results["dotprod/shard_map_train/devices"] == 4


def test_checkpoint_restores_onto_devices_and_continues(output):
    results = output
    assert results["checkpoint/sharded_restore"] == 0.0
    assert results["checkpoint/sharded_restore/devices"] == 4


AXIS_NAME = ["maml", "maml_unroll", "maml_unroll_scan_kept_state"]


@pytest.mark.parametrize("mode", ["shard_map_check_vma", "shard_map_no_check_vma", "pmap"])
@pytest.mark.parametrize("name", AXIS_NAME)
def test_axis_name_matches_one_device(output, name, mode):
    # With check_vma=True, maml's meta-gradient used to come back summed over the devices
    # (by JAX) before the learner's pmean: up to 4x the single-device update here.
    assert output[f"{name}/axis_{mode}"] <= TOLERANCE
