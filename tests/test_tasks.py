"""Tests for metagrad/tasks.py: task distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metagrad as mg

NUM_DRAWS = 40_000


def _frequencies(ids, num_tasks):
    return np.bincount(np.asarray(ids), minlength=num_tasks) / np.size(ids)


def _assert_frequencies(ids, probs):
    # Within 5 standard errors of the binomial proportion, plus a small floor.
    probs = np.asarray(probs, np.float64)
    freq = _frequencies(ids, len(probs))
    tol = 5 * np.sqrt(probs * (1 - probs) / np.size(ids)) + 1e-3
    np.testing.assert_array_less(np.abs(freq - probs), tol)


@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 1.0, -1.0])
def test_task_probs_is_normalized_power(q):
    sizes = [14805, 2390, 3696, 100, 6490]  # some TyDi-QA-like sizes
    expected = np.asarray(sizes, np.float64) ** q
    expected /= expected.sum()
    np.testing.assert_allclose(mg.task_probs(sizes, q), expected, rtol=1e-5)


def test_task_probs_large_sizes_do_not_overflow():
    probs = mg.task_probs(np.array([1e30, 3e30]), q=2.0)
    np.testing.assert_allclose(probs, [0.1, 0.9], rtol=1e-5)


def test_task_probs_under_jit():
    probs = jax.jit(mg.task_probs, static_argnums=1)(jnp.array([1.0, 3.0]), 1.0)
    np.testing.assert_allclose(probs, [0.25, 0.75], rtol=1e-6)


@pytest.mark.parametrize("q", [0.0, 0.2, 1.0])
def test_sample_tasks_frequencies(q):
    probs = mg.task_probs([10, 200, 50, 1000], q)
    ids = mg.sample_tasks(jax.random.PRNGKey(0), probs, NUM_DRAWS)
    assert ids.shape == (NUM_DRAWS,) and ids.dtype == jnp.int32
    _assert_frequencies(ids, probs)


def test_sample_tasks_under_jit_with_traced_probs():
    sample = jax.jit(mg.sample_tasks, static_argnums=2)
    probs = jnp.array([0.7, 0.0, 0.3])
    ids = sample(jax.random.PRNGKey(1), probs, NUM_DRAWS)
    _assert_frequencies(ids, probs)
    assert not np.any(np.asarray(ids) == 1)  # zero probability never drawn


def test_sample_tasks_without_replacement_draws_distinct_tasks():
    probs = mg.task_probs([1, 2, 3, 4, 5], 1.0)
    for i in range(20):
        ids = np.asarray(mg.sample_tasks(jax.random.PRNGKey(i), probs, 4, replace=False))
        assert len(set(ids.tolist())) == 4


def test_uniform_tasks_frequencies():
    ids = mg.uniform_tasks(jax.random.PRNGKey(2), 5, NUM_DRAWS)
    _assert_frequencies(ids, np.full(5, 0.2))


@pytest.mark.parametrize(
    "ratio,epoch_length,include_target",
    [(2, None, False), ((5, 1), None, False), ((2, 1), 12, False), ((3, 2), 10, True)],
)
def test_mixed_schedule_structure_and_frequencies(ratio, epoch_length, include_target):
    num_tasks, target = 5, 1
    aux, tgt = (ratio, 1) if isinstance(ratio, int) else ratio
    length = epoch_length or aux + tgt
    num = length * (NUM_DRAWS // length)
    ids = np.asarray(
        mg.mixed_schedule(
            jax.random.PRNGKey(3),
            num_tasks,
            target,
            num,
            ratio=ratio,
            epoch_length=epoch_length,
            include_target=include_target,
        )
    )
    epochs = ids.reshape(-1, length)
    aux_draws = length * aux // (aux + tgt)
    # The last part of every epoch is exclusively the target task.
    assert np.all(epochs[:, aux_draws:] == target)
    if not include_target:
        assert not np.any(epochs[:, :aux_draws] == target)
    _assert_frequencies(
        ids, mg.mixed_probs(num_tasks, target, ratio, include_target=include_target)
    )


def test_mixed_schedule_start_continues_the_epoch_pattern():
    make = jax.jit(lambda key, start: mg.mixed_schedule(key, 4, 0, 7, ratio=(2, 1), start=start))
    full_target = np.arange(21) % 3 == 2
    for start in (0, 7, 14):
        ids = np.asarray(make(jax.random.PRNGKey(start), start))
        np.testing.assert_array_equal(ids == 0, full_target[start : start + 7])


def test_mixed_probs_sum_to_one():
    for include_target in (False, True):
        probs = mg.mixed_probs(6, 2, (5, 1), include_target=include_target)
        np.testing.assert_allclose(np.sum(probs), 1.0, rtol=1e-6)
    np.testing.assert_allclose(mg.mixed_probs(3, 0, 2), [1 / 3, 1 / 3, 1 / 3], rtol=1e-6)


@pytest.mark.parametrize(
    "sizes,q,error,match",
    [
        ([], 1.0, ValueError, "sizes"),
        ([[1, 2]], 1.0, ValueError, "sizes"),
        ([10, 0], 1.0, ValueError, "sizes"),
        ([10, -3], 1.0, ValueError, "sizes"),
        ([10, float("inf")], 1.0, ValueError, "sizes"),
        ([10, 20], float("nan"), ValueError, "q"),
        ([10, 20], "1", TypeError, "q"),
    ],
)
def test_task_probs_bad_arguments(sizes, q, error, match):
    with pytest.raises(error, match=match):
        mg.task_probs(sizes, q)


@pytest.mark.parametrize(
    "probs,num,kwargs,error,match",
    [
        ([0.5, 0.6], 3, {}, ValueError, "probs"),
        ([1.2, -0.2], 3, {}, ValueError, "probs"),
        ([], 3, {}, ValueError, "probs"),
        ([0.5, float("nan")], 3, {}, ValueError, "probs"),
        ([0.5, 0.5], 0, {}, ValueError, "num"),
        ([0.5, 0.5], 3, {"replace": False}, ValueError, "num"),
        ([0.5, 0.5], 1, {"replace": "no"}, TypeError, "replace"),
    ],
)
def test_sample_tasks_bad_arguments(probs, num, kwargs, error, match):
    with pytest.raises(error, match=match):
        mg.sample_tasks(jax.random.PRNGKey(0), probs, num, **kwargs)


@pytest.mark.parametrize(
    "num_tasks,target,kwargs,error,match",
    [
        (1, 0, {}, ValueError, "num_tasks"),
        (3, 3, {}, ValueError, "target"),
        (3, -1, {}, ValueError, "target"),
        (3, 1.0, {}, TypeError, "target"),
        (3, 0, {"ratio": 0}, ValueError, "ratio"),
        (3, 0, {"ratio": (2, 0)}, ValueError, "ratio"),
        (3, 0, {"ratio": "2:1"}, TypeError, "ratio"),
        (3, 0, {"ratio": (2, 1, 1)}, TypeError, "ratio"),
        (3, 0, {"ratio": (2, 1), "epoch_length": 4}, ValueError, "epoch_length"),
        (3, 0, {"include_target": 1}, TypeError, "include_target"),
    ],
)
def test_mixed_bad_arguments(num_tasks, target, kwargs, error, match):
    with pytest.raises(error, match=match):
        mg.mixed_schedule(jax.random.PRNGKey(0), num_tasks, target, 6, **kwargs)
    kwargs.pop("epoch_length", None)
    if "epoch_length" not in match:
        with pytest.raises(error, match=match):
            mg.mixed_probs(num_tasks, target, **kwargs)
