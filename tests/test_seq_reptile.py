"""Tests for metagrad/seq_reptile.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg

NUM_TASKS = 3


def _loss(params, batch, task_id):
    # A shared trunk and one linear head per task, picked by the task id.
    x, y = batch
    h = jnp.tanh(x @ params["w"])
    return jnp.mean((h @ params["heads"][task_id] - y) ** 2)


# Jitted only to keep the reference loops fast; the loops themselves stay plain Python.
_grad = jax.jit(jax.grad(_loss), static_argnums=2)


def _params(seed):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.standard_normal((2, 3)) * 0.5, jnp.float32),
        "heads": jnp.asarray(rng.standard_normal((NUM_TASKS, 3, 1)) * 0.5, jnp.float32),
    }


def _batches(seed, k):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((k, 4, 2), np.float32), rng.standard_normal((k, 4, 1), np.float32)


def _assert_tree_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _naive_seq_reptile(phi, inner, outer_lr, steps, reset):
    """Algorithm 1 of Lee et al. (2022) as Python loops; `steps` = [(ids, batches), ...]."""
    inner_state = inner.init(phi)
    inner_update = jax.jit(inner.update)
    for ids, batches in steps:
        if reset:
            inner_state = inner.init(phi)
        theta = phi
        for k, t in enumerate(np.asarray(ids)):
            batch = jax.tree.map(lambda x, k=k: x[k], batches)
            g = _grad(theta, batch, int(t))
            u, inner_state = inner_update(g, inner_state, theta)
            theta = optax.apply_updates(theta, u)
        phi = jax.tree.map(lambda p, th: p - outer_lr * (p - th), phi, theta)
    return phi


@pytest.mark.parametrize("reset", [True, False])
def test_seq_reptile_matches_naive_algorithm(reset):
    k = 4
    phi = _params(0)
    inner = optax.adam(0.05)
    steps = [
        (
            mg.sample_tasks(jax.random.PRNGKey(10 + i), mg.task_probs([10, 20, 40], q=0.2), k),
            _batches(20 + i, k),
        )
        for i in range(3)
    ]
    learner = mg.seq_reptile(_loss, inner, k, 0.3, reset_inner_state=reset, pass_task_id=True)
    state = learner.init(phi)
    for tasks in steps:
        state, metrics = learner.step(state, tasks)
    _assert_tree_close(state.params, _naive_seq_reptile(phi, inner, 0.3, steps, reset))
    assert set(metrics) == {"loss", "loss_pre", "meta_grad_norm"}


@pytest.mark.parametrize("reset", [True, False])
def test_seq_reptile_on_one_task_equals_reptile_outer(reset):
    k, outer_steps = 3, 3
    phi = _params(1)
    inner, outer = optax.adam(0.05), optax.adam(0.1)
    learner = mg.seq_reptile(
        lambda p, b: _loss(p, b, 1), inner, k, outer, reset_inner_state=reset, pass_task_id=False
    )
    tx = mg.reptile_outer(inner, k, outer, reset_inner_state=reset)
    state, tx_state, params = learner.init(phi), tx.init(phi), phi
    tx_update = jax.jit(tx.update)
    for i in range(outer_steps):
        batches = _batches(30 + i, k)
        state, metrics = learner.step(state, (jnp.zeros(k, jnp.int32), batches))
        for j in range(k):
            g = _grad(params, jax.tree.map(lambda x, j=j: x[j], batches), 1)
            u, tx_state = tx_update(g, tx_state, params)
            params = optax.apply_updates(params, u)
        _assert_tree_close(state.params, tx_state.outer_params)
    _assert_tree_close(params, state.params)


def test_seq_reptile_alignment_is_inter_task_mean():
    k = 5
    phi = _params(2)
    ids = jnp.array([0, 1, 0, 2, 1], jnp.int32)
    batches = _batches(3, k)
    learner = mg.seq_reptile(_loss, optax.sgd(0.1), k, 0.5, alignment=True, pass_task_id=True)
    _, metrics = learner.step(learner.init(phi), (ids, batches))
    grads = []
    for j in range(k):
        g = _grad(phi, jax.tree.map(lambda x, j=j: x[j], batches), int(ids[j]))
        grads.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]))
    cos = [
        grads[i] @ grads[j] / np.linalg.norm(grads[i]) / np.linalg.norm(grads[j])
        for i in range(k)
        for j in range(k)
        if ids[i] != ids[j]
    ]
    np.testing.assert_allclose(metrics["alignment"], np.mean(cos), rtol=1e-5)
    np.testing.assert_allclose(
        metrics["loss_pre"], _loss(phi, jax.tree.map(lambda x: x[0], batches), 0), rtol=1e-6
    )


def test_seq_reptile_adapt():
    phi = _params(4)
    inner = optax.sgd(0.1)
    learner = mg.seq_reptile(_loss, inner, 2, 1.0, pass_task_id=True)
    state = learner.init(phi)
    batch = jax.tree.map(lambda x: x[0], _batches(5, 1))
    adapted = learner.adapt(state, (2, batch), 3)
    theta = phi
    for _ in range(3):
        theta = jax.tree.map(lambda p, g: p - 0.1 * g, theta, _grad(theta, batch, 2))
    _assert_tree_close(adapted, theta)
    with pytest.raises(TypeError, match="support"):
        learner.adapt(state, batch[0])


def test_seq_reptile_step_compiles_once():
    traces = []

    def loss_fn(params, batch, task_id):
        traces.append(None)
        return _loss(params, batch, task_id)

    k = 3
    learner = mg.seq_reptile(
        loss_fn, optax.adam(1e-2), k, optax.adam(1e-3), alignment=True, pass_task_id=True
    )
    state = learner.init(_params(0))
    probs = mg.task_probs([1, 2, 3], q=1.0)
    count = None
    for i in range(11):
        ids = np.random.default_rng(i).choice(3, k, p=np.asarray(probs)).astype(np.int32)
        state, metrics = learner.step(state, (ids, _batches(i, k)))
        count = len(traces) if count is None else count
    assert len(traces) == count
    assert np.isfinite(metrics["loss"])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(loss_fn=None), TypeError, "loss_fn"),
        (dict(inner=optax.sgd), TypeError, "inner"),
        (dict(inner_steps=-1), ValueError, "inner_steps"),
        (dict(outer=0.0), ValueError, "outer"),
        (dict(reset_inner_state="no"), TypeError, "reset_inner_state"),
        (dict(pass_task_id=0), TypeError, "pass_task_id"),
        (dict(alignment=1), TypeError, "alignment"),
    ],
)
def test_seq_reptile_bad_arguments(kwargs, error, match):
    args = dict(loss_fn=_loss, inner=optax.sgd(0.1), inner_steps=2, outer=0.5, pass_task_id=True)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        mg.seq_reptile(**args)


def test_seq_reptile_bad_tasks():
    k = 3
    learner = mg.seq_reptile(_loss, optax.sgd(0.1), k, 0.5, pass_task_id=True)
    state = learner.init(_params(0))
    batches = _batches(0, k)
    with pytest.raises(TypeError, match="tasks"):
        learner.step(state, batches[0])
    with pytest.raises(ValueError, match="task_ids"):
        learner.step(state, (jnp.zeros(2, jnp.int32), batches))
    with pytest.raises(TypeError, match="task_ids"):
        learner.step(state, (jnp.zeros(k), batches))
    with pytest.raises(ValueError, match="batches"):
        learner.step(state, (jnp.zeros(k, jnp.int32), _batches(0, k + 1)))


# -- the task sampler's order: i.i.d. (Algorithm 1) or round-robin -------------------------------


@pytest.mark.parametrize("num_tasks,num,start", [(3, 10, 0), (3, 10, 7), (4, 9, 2), (1, 5, 3)])
def test_uniform_tasks_round_robin_is_a_fixed_cycle(num_tasks, num, start):
    # Reference: a plain Python cycle through 0..T-1 from position `start`.
    expected = [(start + i) % num_tasks for i in range(num)]
    ids = mg.uniform_tasks(None, num_tasks, num, order="round_robin", start=start)
    assert ids.dtype == jnp.int32 and ids.tolist() == expected
    traced = jax.jit(
        lambda s: mg.uniform_tasks(None, num_tasks, num, order="round_robin", start=s)
    )(jnp.int32(start))
    assert traced.tolist() == expected
    # Continued across calls with start = step * num: every task equally often (within one)
    # at every prefix, and exactly equally often over whole cycles.
    ids = np.concatenate(
        [
            mg.uniform_tasks(None, num_tasks, num, order="round_robin", start=s * num)
            for s in range(num_tasks)
        ]  # fmt: skip
    )
    for prefix in range(1, len(ids) + 1):
        counts = np.bincount(ids[:prefix], minlength=num_tasks)
        assert counts.max() - counts.min() <= 1
    assert len(set(np.bincount(ids, minlength=num_tasks))) == 1


def test_uniform_tasks_iid_matches_the_categorical_distribution():
    # Algorithm 1's t_k ~ Cat(p) with uniform p: frequencies 1/T, and independent consecutive
    # draws (pair frequencies 1/T^2), which the round-robin order is not.
    t, n = 3, 30_000
    ids = np.asarray(mg.uniform_tasks(jax.random.PRNGKey(3), t, n))
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < t
    freq = np.bincount(ids, minlength=t) / n
    np.testing.assert_allclose(freq, 1 / t, atol=4 * np.sqrt((1 / t) * (1 - 1 / t) / n))
    pairs = np.bincount(ids[:-1] * t + ids[1:], minlength=t * t) / (n - 1)
    np.testing.assert_allclose(pairs, 1 / t**2, atol=5 * np.sqrt(1 / t**2 / n))
    # order="iid" is the default and the same draws.
    key = jax.random.PRNGKey(4)
    np.testing.assert_array_equal(
        mg.uniform_tasks(key, t, 50, order="iid"), mg.uniform_tasks(key, t, 50)
    )
    rr = np.asarray(mg.uniform_tasks(None, t, n, order="round_robin"))
    rr_pairs = np.bincount(rr[:-1] * t + rr[1:], minlength=t * t)
    assert np.count_nonzero(rr_pairs) == t  # only (i, i+1 mod T) follow each other


def test_uniform_tasks_bad_order_and_start():
    with pytest.raises(ValueError, match="order"):
        mg.uniform_tasks(jax.random.PRNGKey(0), 3, 4, order="cyclic")
    with pytest.raises(TypeError, match="start"):
        mg.uniform_tasks(None, 3, 4, order="round_robin", start=1.5)
    with pytest.raises(TypeError, match="start"):
        mg.uniform_tasks(None, 3, 4, order="round_robin", start=jnp.arange(2))
