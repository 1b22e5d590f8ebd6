"""Tests for metagrad/diagnostics.py: gradient dot products and cosines."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metagrad as mg

# Jitted once here: eager dispatch would compile every primitive separately, which
# dominates the run time of these small tests.
_dot = jax.jit(mg.pairwise_dot)
_cos = jax.jit(mg.pairwise_cosine)
_mean_cos = jax.jit(mg.mean_pairwise_cosine)


def _stacked_tree(seed, n):
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((n, 3, 2), np.float32),
        "b": rng.standard_normal((n, 2), np.float32),
        "s": [rng.standard_normal((n,), np.float32)],
    }


def _flat(tree, n):
    return [
        np.concatenate([np.ravel(np.asarray(x[i], np.float64)) for x in jax.tree.leaves(tree)])
        for i in range(n)
    ]


def _naive_dot(tree, n):
    flat = _flat(tree, n)
    return np.array([[flat[i] @ flat[j] for j in range(n)] for i in range(n)])


def _naive_cos(tree, n):
    flat = _flat(tree, n)
    return np.array(
        [
            [
                flat[i] @ flat[j] / (np.linalg.norm(flat[i]) * np.linalg.norm(flat[j]))
                for j in range(n)
            ]
            for i in range(n)
        ]
    )


@pytest.mark.parametrize("n", [2, 5])
def test_pairwise_dot_and_cosine_match_naive_loop(n):
    tree = _stacked_tree(n, n)
    np.testing.assert_allclose(_dot(tree), _naive_dot(tree, n), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_cos(tree), _naive_cos(tree, n), rtol=1e-5, atol=1e-6)


def test_mean_pairwise_cosine_matches_naive_loop():
    n = 6
    tree = _stacked_tree(0, n)
    cos = _naive_cos(tree, n)
    off = [cos[i, j] for i in range(n) for j in range(n) if i != j]
    np.testing.assert_allclose(_mean_cos(tree), np.mean(off), rtol=1e-5)
    ids = np.array([0, 1, 0, 2, 2, 1])
    inter = [cos[i, j] for i in range(n) for j in range(n) if ids[i] != ids[j]]
    np.testing.assert_allclose(_mean_cos(tree, jnp.asarray(ids)), np.mean(inter), rtol=1e-5)


def test_mean_pairwise_cosine_undefined_is_nan():
    tree = _stacked_tree(1, 3)
    assert np.isnan(_mean_cos(tree, jnp.zeros(3, jnp.int32)))


def test_zero_gradient_has_zero_cosine():
    g = jnp.array([[1.0, 2.0], [0.0, 0.0], [-1.0, 0.5]])
    cos = np.asarray(_cos(g))
    assert np.all(np.isfinite(cos))
    np.testing.assert_array_equal(cos[1], 0.0)
    np.testing.assert_array_equal(cos[:, 1], 0.0)


def test_cosine_is_scale_invariant_and_bounded():
    g = np.random.default_rng(2).standard_normal((4, 7)).astype(np.float32)
    scaled = g * np.array([1.0, 1e3, 1e-3, 7.0], np.float32)[:, None]
    np.testing.assert_allclose(_cos(g), _cos(scaled), atol=1e-5)
    np.testing.assert_allclose(np.diagonal(_cos(g)), 1.0, rtol=1e-6)


def test_task_gradients_match_per_batch_grads():
    def loss_fn(params, batch):
        x, y = batch
        return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

    params = {"w": np.ones((3, 1), np.float32), "b": np.zeros(1, np.float32)}
    rng = np.random.default_rng(3)
    batches = (
        rng.standard_normal((4, 5, 3), np.float32),
        rng.standard_normal((4, 5, 1), np.float32),
    )
    grads = jax.jit(mg.task_gradients, static_argnums=0)(loss_fn, params, batches)
    grad_fn = jax.jit(jax.grad(loss_fn))
    for i in range(4):
        ref = grad_fn(params, (batches[0][i], batches[1][i]))
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6), grads, ref
        )


def test_bad_arguments():
    with pytest.raises(ValueError, match="grads"):
        mg.pairwise_dot({"a": np.ones((3, 2)), "b": np.ones((4,))})
    with pytest.raises(ValueError, match="grads"):
        mg.pairwise_dot({})
    with pytest.raises(ValueError, match="grads"):
        mg.mean_pairwise_cosine(np.ones((1, 3)))
    with pytest.raises(ValueError, match="task_ids"):
        mg.mean_pairwise_cosine(np.ones((3, 2)), np.zeros(2, np.int32))
    with pytest.raises(TypeError, match="loss_fn"):
        mg.task_gradients("loss", np.ones(2), np.ones((3, 2)))
    with pytest.raises(ValueError, match="batches"):
        mg.task_gradients(lambda p, b: jnp.sum(p * b), np.ones(2), np.float32(1.0))
