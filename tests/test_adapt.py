"""Tests for metagrad/adapt.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg


def _loss(params, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ params["w"]) @ params["v"] - y) ** 2)


def _params():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.standard_normal((2, 3)), jnp.float32),
        "v": jnp.asarray(rng.standard_normal((3, 1)), jnp.float32),
    }


def _batch(seed, leading=()):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*leading, 6, 2), np.float32)
    return x, rng.standard_normal((*leading, 6, 1), np.float32)


_value_and_grad = jax.jit(jax.value_and_grad(_loss))


def _naive(inner, params, batches, num_steps, per_step, state=None):
    state = inner.init(params) if state is None else state
    inner_update = jax.jit(inner.update)
    losses = []
    for k in range(num_steps):
        batch = jax.tree.map(lambda x, k=k: x[k], batches) if per_step else batches
        loss, g = _value_and_grad(params, batch)
        losses.append(loss)
        u, state = inner_update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, np.array(losses), state


def _assert_tree_close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


@pytest.mark.parametrize("per_step", [False, True])
@pytest.mark.parametrize("inner", [optax.sgd(0.1), optax.adam(0.05)])
def test_adapt_matches_naive_loop(inner, per_step):
    batches = _batch(1, (4,) if per_step else ())
    params, losses = mg.adapt(
        _loss, inner, _params(), batches, 4, batch_per_step=per_step, return_losses=True
    )
    ref_params, ref_losses, _ = _naive(inner, _params(), batches, 4, per_step)
    _assert_tree_close(params, ref_params)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


def test_adapt_continues_from_given_state():
    inner = optax.adam(0.05)
    batch = _batch(2)
    _, _, state = _naive(inner, _params(), batch, 2, False)
    params = mg.adapt(_loss, inner, _params(), batch, 3, inner_state=state)
    ref_params, _, _ = _naive(inner, _params(), batch, 3, False, state)
    _assert_tree_close(params, ref_params)


def test_adapt_quadratic_sgd_closed_form(x64):
    a = jnp.array([[2.0, 0.5], [0.5, 1.0]], jnp.float64)
    b = jnp.array([1.0, -1.0], jnp.float64)
    theta0 = jnp.array([3.0, 2.0], jnp.float64)
    loss = lambda p, batch: 0.5 * p @ batch[0] @ p - batch[1] @ p  # noqa: E731
    alpha, k = 0.2, 7
    # θ_k − θ* = (I − αA)^k (θ_0 − θ*), θ* = A⁻¹b.
    star = np.linalg.solve(np.asarray(a), np.asarray(b))
    expected = star + np.linalg.matrix_power(np.eye(2) - alpha * np.asarray(a), k) @ (
        np.asarray(theta0) - star
    )
    np.testing.assert_allclose(
        mg.adapt(loss, optax.sgd(alpha), theta0, (a, b), k), expected, rtol=1e-12
    )


def test_adapt_vmaps_over_tasks_and_jits():
    inner = optax.sgd(0.1)
    tasks = _batch(3, (5,))
    batched = jax.jit(jax.vmap(lambda s: mg.adapt(_loss, inner, _params(), s, 3)))(tasks)
    for t in range(5):
        one = mg.adapt(_loss, inner, _params(), jax.tree.map(lambda x, t=t: x[t], tasks), 3)
        jax.tree.map(
            lambda x, y, t=t: np.testing.assert_allclose(x[t], y, rtol=1e-5, atol=1e-6),
            batched,
            one,
        )


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(loss_fn="mse"), TypeError, "loss_fn"),
        (dict(inner=optax.sgd), TypeError, "inner"),
        (dict(num_steps=0), ValueError, "num_steps"),
        (dict(num_steps=2.5), TypeError, "num_steps"),
        (dict(batch_per_step=True), ValueError, "support"),
    ],
)
def test_adapt_bad_arguments(kwargs, error, match):
    args = dict(
        loss_fn=_loss,
        inner=optax.sgd(0.1),
        params=_params(),
        support=_batch(0),
        num_steps=3,
    )
    args.update(kwargs)
    with pytest.raises(error, match=match):
        mg.adapt(**args)
