"""Tests for metagrad/reptile.py: `reptile_outer` and the parallel meta-learner `reptile`."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg


def _quadratic_grad(params, a, b):
    # L(θ) = ½θᵀAθ − bᵀθ  ⇒  ∇L = Aθ − b.
    return a @ params - b


def _random_quadratic(seed, dim=3, dtype=np.float32):
    # Test data from NumPy: no per-shape compilation as with eager jax.random.
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((dim, dim))
    a = m @ m.T / dim + np.eye(dim)
    return jnp.asarray(a, dtype), jnp.asarray(rng.standard_normal(dim), dtype)


# The reference loops below are plain Python; their pieces are jitted (cached per
# function) only to keep the tests fast.
@functools.cache
def _jit_update(inner):
    return jax.jit(inner.update)


@functools.cache
def _jit_grad(loss_fn):
    return jax.jit(jax.grad(loss_fn))


# ----------------------------------------------------------------------------
# reptile_outer


@pytest.mark.parametrize("inner", [optax.sgd(0.1), optax.adam(0.05), optax.sgd(0.1, momentum=0.9)])
def test_reptile_outer_one_step_lr_one_is_inner_optimizer(inner):
    params = {"w": jnp.arange(3.0), "b": jnp.ones((2, 2))}
    tx = mg.reptile_outer(inner, inner_steps=1, outer=1.0, reset_inner_state=False)
    state, ref_state = tx.init(params), inner.init(params)
    update, ref_update = jax.jit(tx.update), jax.jit(inner.update)
    p, ref_p = params, params
    for i in range(6):
        grads = jax.tree.map(lambda x, i=i: jnp.sin(x + i), p)
        updates, state = update(grads, state, p)
        ref_updates, ref_state = ref_update(grads, ref_state, ref_p)
        p = optax.apply_updates(p, updates)
        ref_p = optax.apply_updates(ref_p, ref_updates)
        jax.tree.map(np.testing.assert_array_equal, p, ref_p)


@pytest.mark.parametrize("inner_steps,outer_lr", [(1, 0.5), (3, 0.5), (4, 0.1), (5, 1.0)])
def test_reptile_outer_matches_lookahead_slow_weights(inner_steps, outer_lr):
    # optax.lookahead with sync_period=K, slow_step_size=η on SGD inner steps is
    # Reptile: slow ← slow + η(fast_K − slow) = φ − η(φ − θ_K).
    a, b = _random_quadratic(0)
    params = jnp.array([1.0, -2.0, 0.5])
    tx = mg.reptile_outer(optax.sgd(0.2), inner_steps, outer_lr, reset_inner_state=False)
    la = optax.lookahead(optax.sgd(0.2), sync_period=inner_steps, slow_step_size=outer_lr)
    state = tx.init(params)
    la_params = optax.LookaheadParams.init_synced(params)
    la_state = la.init(la_params)
    p = params
    update, la_update = jax.jit(tx.update), jax.jit(la.update)
    for step in range(4 * inner_steps):
        updates, state = update(_quadratic_grad(p, a, b), state, p)
        p = optax.apply_updates(p, updates)
        la_updates, la_state = la_update(_quadratic_grad(la_params.fast, a, b), la_state, la_params)
        la_params = optax.apply_updates(la_params, la_updates)
        np.testing.assert_allclose(p, la_params.fast, atol=1e-6)
        if (step + 1) % inner_steps == 0:
            np.testing.assert_allclose(state.outer_params, la_params.slow, atol=1e-6)
            np.testing.assert_allclose(p, state.outer_params, atol=1e-6)


def _naive_reptile(grad_fn, inner, phi, inner_steps, outer_steps, outer_update, reset):
    """Plain-loop Reptile: K inner steps from φ, then φ ← outer_update(φ, φ − θ_K, t)."""
    inner_state = inner.init(phi)
    inner_update = _jit_update(inner)
    phis = []
    for t in range(outer_steps):
        theta = phi
        if reset:
            inner_state = inner.init(phi)
        for _ in range(inner_steps):
            u, inner_state = inner_update(grad_fn(theta), inner_state, theta)
            theta = optax.apply_updates(theta, u)
        phi = outer_update(phi, phi - theta, t)
        phis.append(phi)
    return phis


@pytest.mark.parametrize("reset", [False, True])
def test_reptile_outer_schedule_and_reset_match_naive_loop(reset):
    a, b = _random_quadratic(1)
    sched = optax.linear_schedule(0.9, 0.1, 3)
    inner = optax.adam(0.1)
    phi0 = jnp.array([1.0, 2.0, -1.0])
    ref = _naive_reptile(
        lambda p: _quadratic_grad(p, a, b),
        inner,
        phi0,
        inner_steps=3,
        outer_steps=4,
        outer_update=lambda phi, mg_, t: phi - sched(t) * mg_,
        reset=reset,
    )
    tx = mg.reptile_outer(inner, 3, sched, reset_inner_state=reset)
    update = jax.jit(tx.update)
    state, p = tx.init(phi0), phi0
    for t in range(4):
        for _ in range(3):
            u, state = update(_quadratic_grad(p, a, b), state, p)
            p = optax.apply_updates(p, u)
        np.testing.assert_allclose(state.outer_params, ref[t], rtol=1e-5, atol=1e-6)


def test_reptile_outer_optax_outer_sign_convention():
    a, b = _random_quadratic(2)
    phi0 = jnp.array([0.3, -0.7, 1.1])

    def run(outer_lr):
        tx = mg.reptile_outer(optax.sgd(0.1), 2, outer_lr)
        state, p, update = tx.init(phi0), phi0, jax.jit(tx.update)
        for _ in range(6):
            u, state = update(_quadratic_grad(p, a, b), state, p)
            p = optax.apply_updates(p, u)
        return state.outer_params

    np.testing.assert_allclose(run(optax.sgd(0.3)), run(0.3), rtol=1e-6)
    # Adam outer loop against a naive loop applying Adam to φ − θ_K.
    adam = optax.adam(0.05)
    adam_state = adam.init(phi0)
    holder = {"s": adam_state}

    def adam_outer(phi, meta_grad, t):
        del t
        u, holder["s"] = adam.update(meta_grad, holder["s"], phi)
        return optax.apply_updates(phi, u)

    ref = _naive_reptile(
        lambda p: _quadratic_grad(p, a, b), optax.sgd(0.1), phi0, 2, 3, adam_outer, False
    )
    np.testing.assert_allclose(run(optax.adam(0.05)), ref[-1], rtol=1e-5)


def test_reptile_outer_quadratic_meta_gradient_closed_form(x64):
    # On L(θ) = ½θᵀAθ − bᵀθ with SGD(α): θ_k = θ_{k−1} − α(Aθ_{k−1} − b), and
    # after one outer step φ' = φ − η(φ − θ_K).
    a, b = _random_quadratic(3, dim=4, dtype=jnp.float64)
    phi = jnp.linspace(-1.0, 1.0, 4, dtype=jnp.float64)
    alpha, eta, k = 0.1, 0.7, 5
    theta = np.asarray(phi)
    for _ in range(k):
        theta = theta - alpha * (np.asarray(a) @ theta - np.asarray(b))
    expected = np.asarray(phi) - eta * (np.asarray(phi) - theta)
    tx = mg.reptile_outer(optax.sgd(alpha), k, eta)
    state, p, update = tx.init(phi), phi, jax.jit(tx.update)
    for _ in range(k):
        u, state = update(_quadratic_grad(p, a, b), state, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_allclose(state.outer_params, expected, rtol=1e-12)
    np.testing.assert_allclose(p, expected, rtol=1e-12)


def _scale_by_extra():
    """An inner transformation that needs an extra keyword argument."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, factor):
        del params
        return jax.tree.map(lambda g: -factor * g, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def test_reptile_outer_forwards_extra_args_through_chain():
    params = jnp.array([1.0, 2.0])
    tx = optax.chain(optax.clip(10.0), mg.reptile_outer(_scale_by_extra(), 2, 0.5))
    state = tx.init(params)
    p = params
    for _ in range(2):
        u, state = tx.update(2 * p, state, p, factor=0.25)
        p = optax.apply_updates(p, u)
    # θ_2 = (1 − 0.5)^2 φ = 0.25 φ; φ' = φ − 0.5(φ − 0.25φ) = 0.625 φ.
    np.testing.assert_allclose(p, 0.625 * params, rtol=1e-6)


def test_reptile_outer_jit_compiles_once():
    traces = []
    tx = mg.reptile_outer(optax.adam(0.1), 3, optax.sgd(0.5), reset_inner_state=True)

    @jax.jit
    def step(p, state):
        traces.append(None)
        u, state = tx.update(jax.tree.map(jnp.cos, p), state, p)
        return optax.apply_updates(p, u), state

    p = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    state = tx.init(p)
    shapes = jax.tree.map(jnp.shape, state)
    for _ in range(10):
        p, state = step(p, state)
        assert jax.tree.map(jnp.shape, state) == shapes
    assert len(traces) == 1


def test_reptile_outer_inject_hyperparams():
    a, b = _random_quadratic(4)
    phi0 = jnp.array([0.5, 0.5, -0.5])
    tx = optax.inject_hyperparams(mg.reptile_outer)(optax.sgd(0.1), inner_steps=3, outer=0.4)
    ref = mg.reptile_outer(optax.sgd(0.1), 3, 0.4)
    state, ref_state = tx.init(phi0), ref.init(phi0)
    update = jax.jit(tx.update)
    p = q = phi0
    for _ in range(6):
        u, state = update(_quadratic_grad(p, a, b), state, p)
        v, ref_state = ref.update(_quadratic_grad(q, a, b), ref_state, q)
        p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
    np.testing.assert_allclose(p, q, rtol=1e-6)
    # The injected outer rate can be changed between steps.
    state.hyperparams["outer"] = jnp.asarray(0.0)
    for _ in range(3):
        u, state = update(_quadratic_grad(p, a, b), state, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_allclose(p, q, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_reptile_outer_preserves_dtype(dtype):
    params = jnp.ones((3,), dtype)
    tx = mg.reptile_outer(optax.sgd(0.1), 2, 0.5)
    state = tx.init(params)
    for _ in range(2):
        u, state = tx.update(params, state, params)
        assert u.dtype == dtype
        params = optax.apply_updates(params, u)
    assert state.outer_params.dtype == dtype


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(inner_steps=0), ValueError, "inner_steps"),
        (dict(inner_steps=2.0), TypeError, "inner_steps"),
        (dict(outer=-1.0), ValueError, "outer"),
        (dict(outer=float("nan")), ValueError, "outer"),
        (dict(outer="fast"), TypeError, "outer"),
        (dict(reset_inner_state=1), TypeError, "reset_inner_state"),
        (dict(inner=lambda g, state: (g, state)), TypeError, "inner"),
    ],
)
def test_reptile_outer_bad_arguments(kwargs, error, match):
    args = dict(inner=optax.sgd(0.1), inner_steps=2, outer=0.5)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        mg.reptile_outer(**args)


def test_reptile_outer_requires_params():
    tx = mg.reptile_outer(optax.sgd(0.1), 2)
    state = tx.init(jnp.zeros(2))
    with pytest.raises(ValueError, match="params"):
        tx.update(jnp.ones(2), state)


# ----------------------------------------------------------------------------
# reptile (parallel meta-batch)


def _mlp_loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - y) ** 2)


def _mlp_params(seed):
    rng = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(rng.standard_normal((2, 4)) * 0.5, jnp.float32),
        "b1": jnp.zeros(4),
        "w2": jnp.asarray(rng.standard_normal((4, 1)) * 0.5, jnp.float32),
    }


def _mlp_tasks(seed, num_tasks, leading=()):
    """``(support, query)``; support leaves ``[T, *leading, 5, ...]``, query ``[T, 5, ...]``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_tasks, *leading, 5, 2), np.float32)
    y = rng.standard_normal((num_tasks, *leading, 5, 1), np.float32)
    xq = rng.standard_normal((num_tasks, 5, 2), np.float32)
    yq = rng.standard_normal((num_tasks, 5, 1), np.float32)
    return (x, y), (xq, yq)


def _naive_task_run(loss_fn, inner, phi, batches, inner_steps, per_step, inner_state=None):
    """One task's inner loop as a Python loop (independent of metagrad.adapt)."""
    state = inner.init(phi) if inner_state is None else inner_state
    theta = phi
    for k in range(inner_steps):
        batch = jax.tree.map(lambda x, k=k: x[k], batches) if per_step else batches
        g = _jit_grad(loss_fn)(theta, batch)
        u, state = _jit_update(inner)(g, state, theta)
        theta = optax.apply_updates(theta, u)
    return theta, state


@pytest.mark.parametrize("batch_per_step", [False, True])
def test_reptile_equals_mean_of_serial_runs(batch_per_step):
    phi = _mlp_params(5)
    k = 3
    tasks = _mlp_tasks(6, 4, (k,) if batch_per_step else ())
    support, query = tasks
    inner = optax.adam(0.05)
    learner = mg.reptile(_mlp_loss, inner, k, optax.sgd(0.7), batch_per_step=batch_per_step)
    state, metrics = learner.step(learner.init(phi), tasks)
    thetas = [
        _naive_task_run(
            _mlp_loss, inner, phi, jax.tree.map(lambda x, t=t: x[t], support), k, batch_per_step
        )[0]
        for t in range(4)
    ]
    meta_grad = jax.tree.map(lambda p, *ts: p - sum(ts) / len(ts), phi, *thetas)
    expected = jax.tree.map(lambda p, m: p - 0.7 * m, phi, meta_grad)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state.params, expected
    )
    np.testing.assert_allclose(metrics["meta_grad_norm"], optax.tree.norm(meta_grad), rtol=1e-5)
    first = [
        _mlp_loss(phi, jax.tree.map(lambda x, t=t: x[t, 0] if batch_per_step else x[t], support))
        for t in range(4)
    ]
    np.testing.assert_allclose(metrics["loss_pre"], np.mean(first), rtol=1e-5)
    # The query batches are only evaluated, at each task's adapted params.
    post = [_mlp_loss(thetas[t], jax.tree.map(lambda x, t=t: x[t], query)) for t in range(4)]
    np.testing.assert_allclose(metrics["loss_post"], np.mean(post), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], metrics["loss_post"], rtol=0)


def test_reptile_quadratic_meta_gradient_is_unrolled_recursion(x64):
    # L_t(θ) = ½θᵀA_tθ − b_tᵀθ; SGD(α): θ_k = θ_{k−1} − α(A_t θ_{k−1} − b_t).
    quads = [_random_quadratic(70 + i, dim=3, dtype=jnp.float64) for i in range(3)]
    a = jnp.stack([q[0] for q in quads])
    b = jnp.stack([q[1] for q in quads])
    alpha, eta, k = 0.05, 0.3, 6
    phi = jnp.array([1.0, -0.5, 2.0], jnp.float64)

    def loss_fn(theta, batch):
        a_t, b_t = batch
        return 0.5 * theta @ a_t @ theta - b_t @ theta

    learner = mg.reptile(loss_fn, optax.sgd(alpha), k, eta, alignment=True)
    state, metrics = learner.step(learner.init(phi), ((a, b), (a, b)))
    mgs, grads0 = [], []
    for a_t, b_t in zip(np.asarray(a), np.asarray(b), strict=True):
        theta = np.asarray(phi)
        grads0.append(a_t @ theta - b_t)
        for _ in range(k):
            theta = theta - alpha * (a_t @ theta - b_t)
        mgs.append(np.asarray(phi) - theta)
    meta_grad = np.mean(mgs, axis=0)
    np.testing.assert_allclose(state.params, np.asarray(phi) - eta * meta_grad, rtol=1e-12)
    np.testing.assert_allclose(metrics["meta_grad_norm"], np.linalg.norm(meta_grad), rtol=1e-12)
    cos = [
        grads0[i] @ grads0[j] / np.linalg.norm(grads0[i]) / np.linalg.norm(grads0[j])
        for i in range(3)
        for j in range(3)
        if i != j
    ]
    np.testing.assert_allclose(metrics["alignment"], np.mean(cos), rtol=1e-10)


def test_reptile_carried_inner_state_matches_naive_loop():
    phi = _mlp_params(8)
    inner = optax.sgd(0.1, momentum=0.9)
    learner = mg.reptile(_mlp_loss, inner, 2, optax.sgd(0.5), reset_inner_state=False)
    state = learner.init(phi)
    ref_phi, ref_inner = phi, inner.init(phi)
    for step in range(3):
        tasks = _mlp_tasks(10 + step, 3)
        state, _ = learner.step(state, tasks)
        runs = [
            _naive_task_run(
                _mlp_loss,
                inner,
                ref_phi,
                jax.tree.map(lambda x, t=t: x[t], tasks[0]),
                2,
                False,
                ref_inner,
            )
            for t in range(3)
        ]
        ref_inner = jax.tree.map(lambda *s: sum(s) / len(s), *[r[1] for r in runs])
        ref_phi = jax.tree.map(
            lambda p, *ts: p - 0.5 * (p - sum(ts) / len(ts)), ref_phi, *[r[0] for r in runs]
        )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state.params, ref_phi
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        state.inner_state,
        ref_inner,
    )


def test_reptile_adapt_is_inner_loop_from_learned_init():
    phi = _mlp_params(9)
    inner = optax.sgd(0.1)
    learner = mg.reptile(_mlp_loss, inner, 3, optax.adam(1e-2))
    state, _ = learner.step(learner.init(phi), _mlp_tasks(1, 2))
    support = jax.tree.map(lambda x: x[0], _mlp_tasks(2, 1)[0])
    for num_steps in (None, 5):
        adapted = learner.adapt(state, support, num_steps)
        expected, _ = _naive_task_run(
            _mlp_loss, inner, state.params, support, num_steps or 3, False
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), adapted, expected
        )


@pytest.mark.parametrize("reset", [True, False])
def test_reptile_step_compiles_once(reset):
    traces = []

    def loss_fn(params, batch):
        traces.append(None)
        return _mlp_loss(params, batch)

    learner = mg.reptile(
        loss_fn,
        optax.adam(1e-2),
        2,
        optax.adam(1e-3),
        reset_inner_state=reset,
        alignment=True,
    )
    state = learner.init(_mlp_params(0))
    state, _ = learner.step(state, _mlp_tasks(0, 3))
    count = len(traces)
    for i in range(10):
        state, metrics = learner.step(state, _mlp_tasks(i + 1, 3))
    assert len(traces) == count
    assert np.isfinite(metrics["loss"])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(loss_fn=3), TypeError, "loss_fn"),
        (dict(inner="sgd"), TypeError, "inner"),
        (dict(inner_steps=0), ValueError, "inner_steps"),
        (dict(outer=-0.1), ValueError, "outer"),
        (dict(outer="adam"), TypeError, "outer"),
        (dict(batch_per_step=1), TypeError, "batch_per_step"),
        (dict(reset_inner_state=None), TypeError, "reset_inner_state"),
        (dict(alignment="yes"), TypeError, "alignment"),
    ],
)
def test_reptile_bad_arguments(kwargs, error, match):
    args = dict(loss_fn=_mlp_loss, inner=optax.sgd(0.1), inner_steps=2, outer=optax.sgd(1.0))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        mg.reptile(**args)


def test_reptile_bad_tasks():
    phi = _mlp_params(0)
    learner = mg.reptile(_mlp_loss, optax.sgd(0.1), 3, 1.0, batch_per_step=True)
    state = learner.init(phi)
    with pytest.raises(ValueError, match="tasks"):
        learner.step(state, _mlp_tasks(0, 2, (2,)))  # 2 batches, K = 3
    cos = mg.reptile(_mlp_loss, optax.sgd(0.1), 3, 1.0, alignment=True)
    with pytest.raises(ValueError, match="alignment=True needs at least 2 tasks"):
        cos.step(cos.init(phi), _mlp_tasks(0, 1))


_MULTI_DEVICE_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
import metagrad as mg

def loss(p, b):
    x, y = b
    return jnp.mean((jnp.tanh(x @ p["w"]) @ p["v"] - y) ** 2)

def close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)

k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
params = {"w": jax.random.normal(k1, (2, 3)), "v": jax.random.normal(k2, (3, 1))}
mesh = jax.make_mesh((4,), ("d",))
assert len(jax.devices()) == 4

# reptile: the 8 tasks split over 4 devices.
tasks = (jax.random.normal(k3, (8, 5, 2)), jax.random.normal(k4, (8, 5, 1)))
tasks = (tasks, tasks)  # (support, query)
sharded = jax.device_put(tasks, NamedSharding(mesh, P("d")))
# A carried inner state: its pmean over devices is exercised too.
single = mg.reptile(loss, optax.adam(0.05), 3, optax.adam(0.1), reset_inner_state=False)
multi = mg.reptile(
    loss, optax.adam(0.05), 3, optax.adam(0.1), reset_inner_state=False, axis_name="d")
step = jax.jit(jax.shard_map(
    multi.step, mesh=mesh, in_specs=(P(), P("d")), out_specs=(P(), P())))
s1, s2 = single.init(params), multi.init(params)
for _ in range(2):
    s1, m1 = single.step(s1, tasks)
    s2, m2 = step(s2, sharded)
close((s1, m1), (s2, m2))

# seq_reptile: the examples of every batch split over devices (SGD inner steps, so a
# gradient summed instead of averaged would show).
ids = jnp.array([0, 1, 1, 0], jnp.int32)
batches = (jax.random.normal(k3, (4, 8, 2)), jax.random.normal(k4, (4, 8, 1)))
sharded = jax.device_put(batches, NamedSharding(mesh, P(None, "d")))
seq_loss = lambda p, b, t: loss(p, b) * (1.0 + t)
kw = dict(alignment=True, reset_inner_state=False, pass_task_id=True)
single = mg.seq_reptile(seq_loss, optax.sgd(0.1, momentum=0.9), 4, 0.5, **kw)
multi = mg.seq_reptile(seq_loss, optax.sgd(0.1, momentum=0.9), 4, 0.5, axis_name="d", **kw)
step = jax.jit(jax.shard_map(
    multi.step, mesh=mesh, in_specs=(P(), (P(), P(None, "d"))), out_specs=(P(), P())))
s1, s2 = single.init(params), multi.init(params)
for _ in range(2):
    s1, m1 = single.step(s1, (ids, batches))
    s2, m2 = step(s2, (ids, sharded))
close((s1, m1), (s2, m2))
print("MULTI-DEVICE OK")
"""


def test_reptile_and_seq_reptile_multi_device_match_single_device():
    result = subprocess.run(
        [sys.executable, "-c", _MULTI_DEVICE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MULTI-DEVICE OK" in result.stdout


def test_axis_name_must_be_a_string():
    with pytest.raises(TypeError, match="axis_name"):
        mg.reptile(_mlp_loss, optax.sgd(0.1), 2, 1.0, axis_name=0)
    with pytest.raises(TypeError, match="axis_name"):
        mg.seq_reptile(_mlp_loss, optax.sgd(0.1), 2, 1.0, axis_name=("a",))


def test_reptile_outer_apply_if_finite_skips_bad_steps():
    a, b = _random_quadratic(11)
    phi0 = jnp.array([1.0, 0.0, -1.0])
    tx = optax.apply_if_finite(mg.reptile_outer(optax.sgd(0.1), 2, 0.5), max_consecutive_errors=5)
    ref = mg.reptile_outer(optax.sgd(0.1), 2, 0.5)
    update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
    state, ref_state, p, q = tx.init(phi0), ref.init(phi0), phi0, phi0
    for i in range(6):
        if i in (1, 4):  # a non-finite gradient: no change to params or to the count
            u, state = update(jnp.full(3, jnp.nan), state, p)
            p = optax.apply_updates(p, u)
        u, state = update(_quadratic_grad(p, a, b), state, p)
        v, ref_state = ref_update(_quadratic_grad(q, a, b), ref_state, q)
        p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
    np.testing.assert_allclose(p, q, rtol=1e-6)
    assert np.all(np.isfinite(state.inner_state.outer_params))


def test_states_checkpoint_and_resume_mid_inner_loop():
    from flax import serialization

    # reptile_outer: save after 4 of 6 calls (inside an inner loop of 3), restore, continue.
    a, b = _random_quadratic(12)
    tx = mg.reptile_outer(optax.adam(0.1), 3, optax.adam(0.2))
    update = jax.jit(tx.update)

    def run(p, state, n):
        for _ in range(n):
            u, state = update(_quadratic_grad(p, a, b), state, p)
            p = optax.apply_updates(p, u)
        return p, state

    phi0 = jnp.array([1.0, 2.0, 3.0])
    p_full, s_full = run(phi0, tx.init(phi0), 7)
    p_mid, s_mid = run(phi0, tx.init(phi0), 4)
    blob = serialization.to_bytes((p_mid, s_mid))
    p_res, s_res = serialization.from_bytes((phi0, tx.init(phi0)), blob)
    p_res, s_res = run(p_res, s_res, 3)
    jax.tree.map(np.testing.assert_array_equal, (p_full, s_full), (p_res, s_res))

    # reptile meta-learner with a carried inner state.
    learner = mg.reptile(_mlp_loss, optax.adam(0.05), 2, optax.adam(0.1), reset_inner_state=False)
    state = learner.init(_mlp_params(0))
    for i in range(2):
        state, _ = learner.step(state, _mlp_tasks(i, 2))
    restored = serialization.from_bytes(learner.init(_mlp_params(0)), serialization.to_bytes(state))
    full, _ = learner.step(state, _mlp_tasks(2, 2))
    resumed, _ = learner.step(restored, _mlp_tasks(2, 2))
    jax.tree.map(np.testing.assert_array_equal, full, resumed)
