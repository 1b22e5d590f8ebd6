"""Tests for metagrad/diagnostics.py: gradient dot products and cosines."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metagrad as mg


def _stacked_tree(key, n):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w": jax.random.normal(k1, (n, 3, 2)),
        "b": jax.random.normal(k2, (n, 2)),
        "s": [jax.random.normal(k3, (n,))],
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
    tree = _stacked_tree(jax.random.PRNGKey(n), n)
    np.testing.assert_allclose(mg.pairwise_dot(tree), _naive_dot(tree, n), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mg.pairwise_cosine(tree), _naive_cos(tree, n), rtol=1e-5, atol=1e-6)


def test_mean_pairwise_cosine_matches_naive_loop():
    n = 6
    tree = _stacked_tree(jax.random.PRNGKey(0), n)
    cos = _naive_cos(tree, n)
    off = [cos[i, j] for i in range(n) for j in range(n) if i != j]
    np.testing.assert_allclose(mg.mean_pairwise_cosine(tree), np.mean(off), rtol=1e-5)
    ids = np.array([0, 1, 0, 2, 2, 1])
    inter = [cos[i, j] for i in range(n) for j in range(n) if ids[i] != ids[j]]
    np.testing.assert_allclose(mg.mean_pairwise_cosine(tree, ids), np.mean(inter), rtol=1e-5)
    jitted = jax.jit(mg.mean_pairwise_cosine)(tree, jnp.asarray(ids))
    np.testing.assert_allclose(jitted, np.mean(inter), rtol=1e-5)


def test_mean_pairwise_cosine_undefined_is_nan():
    tree = _stacked_tree(jax.random.PRNGKey(1), 3)
    assert np.isnan(mg.mean_pairwise_cosine(tree, jnp.zeros(3, jnp.int32)))


def test_zero_gradient_has_zero_cosine():
    g = jnp.array([[1.0, 2.0], [0.0, 0.0], [-1.0, 0.5]])
    cos = np.asarray(mg.pairwise_cosine(g))
    assert np.all(np.isfinite(cos))
    np.testing.assert_array_equal(cos[1], 0.0)
    np.testing.assert_array_equal(cos[:, 1], 0.0)


def test_cosine_is_scale_invariant_and_bounded():
    g = jax.random.normal(jax.random.PRNGKey(2), (4, 7))
    scaled = g * jnp.array([1.0, 1e3, 1e-3, 7.0])[:, None]
    np.testing.assert_allclose(mg.pairwise_cosine(g), mg.pairwise_cosine(scaled), atol=1e-5)
    np.testing.assert_allclose(jnp.diagonal(mg.pairwise_cosine(g)), 1.0, rtol=1e-6)


def test_task_gradients_match_per_batch_grads():
    def loss_fn(params, batch):
        x, y = batch
        return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

    params = {"w": jnp.ones((3, 1)), "b": jnp.zeros(1)}
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    batches = (jax.random.normal(k1, (4, 5, 3)), jax.random.normal(k2, (4, 5, 1)))
    grads = mg.task_gradients(loss_fn, params, batches)
    for i in range(4):
        ref = jax.grad(loss_fn)(params, (batches[0][i], batches[1][i]))
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6), grads, ref
        )


def test_bad_arguments():
    with pytest.raises(ValueError, match="grads"):
        mg.pairwise_dot({"a": jnp.ones((3, 2)), "b": jnp.ones((4,))})
    with pytest.raises(ValueError, match="grads"):
        mg.pairwise_dot({})
    with pytest.raises(ValueError, match="grads"):
        mg.mean_pairwise_cosine(jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="task_ids"):
        mg.mean_pairwise_cosine(jnp.ones((3, 2)), jnp.zeros(2, jnp.int32))
    with pytest.raises(TypeError, match="loss_fn"):
        mg.task_gradients("loss", jnp.ones(2), jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="batches"):
        mg.task_gradients(lambda p, b: jnp.sum(p * b), jnp.ones(2), jnp.float32(1.0))
