"""Tests for metagrad.maml: MAML, FOMAML, Meta-SGD, MAML++ against closed forms and loops."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg

DIM, TASKS = 3, 4


def quad_loss(theta, batch):
    """L(θ) = ½θᵀAθ − bᵀθ."""
    a, b = batch
    return 0.5 * theta @ a @ theta - b @ theta


def quad_tasks(seed, num_tasks=TASKS, dim=DIM):
    rng = np.random.default_rng(seed)

    def spd():
        m = rng.normal(size=(num_tasks, dim, dim))
        return np.einsum("tij,tkj->tik", m, m) / dim + 0.5 * np.eye(dim)

    support = (jnp.asarray(spd()), jnp.asarray(rng.normal(size=(num_tasks, dim))))
    query = (jnp.asarray(spd()), jnp.asarray(rng.normal(size=(num_tasks, dim))))
    theta = jnp.asarray(rng.normal(size=(dim,)))
    return theta, (support, query)


def meta_grad(learner, theta, tasks):
    """Reads the meta-gradient off one outer SGD step with learning rate 1."""
    state = learner.init(theta)
    new_state, metrics = learner.step(state, tasks)
    return state.params - new_state.params, new_state, metrics


@pytest.mark.parametrize("first_order", [False, True])
def test_one_step_matches_closed_form(x64, first_order):
    alpha = 0.1
    theta, tasks = quad_tasks(0)
    (a_s, b_s), (a_q, b_q) = tasks
    learner = mg.maml(quad_loss, optax.sgd(alpha), 1, optax.sgd(1.0), first_order=first_order)
    got, _, metrics = meta_grad(learner, theta, tasks)
    expected = []
    for t in range(TASKS):
        adapted = theta - alpha * (a_s[t] @ theta - b_s[t])
        g_q = a_q[t] @ adapted - b_q[t]
        if not first_order:
            g_q = (jnp.eye(DIM) - alpha * a_s[t]) @ g_q
        expected.append(g_q)
    np.testing.assert_allclose(got, np.mean(expected, axis=0), rtol=0, atol=1e-8)
    # The FOMAML gradient differs from MAML's: the (I - αA_s) factor matters here.
    other = mg.maml(quad_loss, optax.sgd(alpha), 1, optax.sgd(1.0), first_order=not first_order)
    assert np.max(np.abs(meta_grad(other, theta, tasks)[0] - got)) > 1e-3
    pre = np.mean([quad_loss(theta, (a_s[t], b_s[t])) for t in range(TASKS)])
    np.testing.assert_allclose(metrics["loss_pre"], pre, rtol=1e-10)


def test_fomaml_is_maml_first_order(x64):
    theta, tasks = quad_tasks(1)
    a = meta_grad(mg.fomaml(quad_loss, optax.sgd(0.2), 2, optax.sgd(1.0)), theta, tasks)[0]
    b = meta_grad(
        mg.maml(quad_loss, optax.sgd(0.2), 2, optax.sgd(1.0), first_order=True), theta, tasks
    )[0]
    np.testing.assert_array_equal(a, b)


def _naive_meta_loss(theta, tasks, make_inner, steps, weights=None):
    """A Python loop over tasks and inner steps, each task with its own optax state."""
    (a_s, b_s), (a_q, b_q) = tasks
    total = 0.0
    for t in range(TASKS):
        tx = make_inner()
        p, s = theta, tx.init(theta)
        per_step = []
        for _ in range(steps):
            g = jax.grad(quad_loss)(p, (a_s[t], b_s[t]))
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
            per_step.append(quad_loss(p, (a_q[t], b_q[t])))
        total = total + (per_step[-1] if weights is None else jnp.dot(weights, jnp.stack(per_step)))
    return total / TASKS


@pytest.mark.parametrize("make_inner", [lambda: optax.sgd(0.1), lambda: optax.adam(0.05)])
@pytest.mark.parametrize("remat", [False, True])
def test_multi_step_matches_unrolled_loop(x64, make_inner, remat):
    # With and without rematerialization, the same values as the naive loop.
    theta, tasks = quad_tasks(2)
    learner = mg.maml(quad_loss, make_inner(), 3, optax.sgd(1.0), remat=remat)
    got, _, metrics = meta_grad(learner, theta, tasks)
    loss, expected = jax.value_and_grad(_naive_meta_loss)(theta, tasks, make_inner, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-10)
    np.testing.assert_allclose(metrics["loss_post"], loss, rtol=1e-10)


def test_meta_sgd_at_alpha_equals_maml(x64):
    theta, tasks = quad_tasks(3)
    ref = meta_grad(mg.maml(quad_loss, optax.sgd(0.1), 2, optax.sgd(1.0)), theta, tasks)[0]
    got, state, _ = meta_grad(mg.maml(quad_loss, mg.meta_sgd(0.1), 2, optax.sgd(1.0)), theta, tasks)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    # The learning rates are learned too: their gradient is d/dα of the naive loss, per entry.
    lr_grad = jax.grad(lambda lr: _naive_meta_loss(theta, tasks, lambda: optax.scale(-lr), 2))(
        jnp.full(DIM, 0.1)
    )
    np.testing.assert_allclose(0.1 - state.inner_params, lr_grad, rtol=1e-10)


def test_maml_pp_last_step_weight_equals_maml(x64):
    theta, tasks = quad_tasks(4)
    ref = meta_grad(mg.maml(quad_loss, optax.sgd(0.1), 3, optax.sgd(1.0)), theta, tasks)[0]
    rule = mg.learned_lr(0.1, per_step=True, granularity="layer")
    last_only = lambda count: jnp.array([0.0, 0.0, 1.0])
    learner = mg.maml(quad_loss, rule, 3, optax.sgd(1.0), multi_step_loss=last_only)
    got = meta_grad(learner, theta, tasks)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_maml_pp_multi_step_loss_matches_naive(x64):
    theta, tasks = quad_tasks(5)
    steps, anneal = 3, 10
    weights = mg.maml_pp_weights(steps, anneal, jnp.asarray(0))
    np.testing.assert_allclose(weights, np.full(steps, 1 / steps), rtol=1e-6)
    rule = mg.learned_lr(0.1, per_step=True, granularity="global")
    learner = mg.maml(quad_loss, rule, steps, optax.sgd(1.0), multi_step_loss=anneal)
    state = learner.init(theta)
    for _ in range(4):
        before = state
        state, metrics = learner.step(state, tasks)
    w = mg.maml_pp_weights(steps, anneal, jnp.asarray(3))

    def naive(theta, lrs):
        (a_s, b_s), (a_q, b_q) = tasks
        total = 0.0
        for t in range(TASKS):
            p, per_step = theta, []
            for lr in lrs:
                p = p - lr * jax.grad(quad_loss)(p, (a_s[t], b_s[t]))
                per_step.append(quad_loss(p, (a_q[t], b_q[t])))
            total += jnp.dot(w.astype(p.dtype), jnp.stack(per_step))
        return total / TASKS

    loss, (g_theta, g_lr) = jax.value_and_grad(naive, argnums=(0, 1))(
        before.params, before.inner_params
    )
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(before.params - state.params, g_theta, rtol=1e-6)
    np.testing.assert_allclose(before.inner_params - state.inner_params, g_lr, rtol=1e-6)


def test_maml_pp_weights_schedule():
    k, n = 5, 100
    for count in (0, 10, 50, 100, 1000):
        w = np.asarray(mg.maml_pp_weights(k, n, jnp.asarray(count)))
        np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)
        assert np.all(w[:-1] >= 0.03 / k - 1e-9) and w[-1] >= w[0]
    late = np.asarray(mg.maml_pp_weights(k, n, jnp.asarray(10**6)))
    np.testing.assert_allclose(late[:-1], 0.03 / k, rtol=1e-5)


def test_adapt_uses_learned_rule(x64):
    theta, tasks = quad_tasks(6)
    learner = mg.maml(quad_loss, mg.meta_sgd(0.1), 2, optax.adam(0.05))
    state = learner.init(theta)
    state, _ = learner.step(state, tasks)
    support = jax.tree.map(lambda x: x[0], tasks[0])
    p = state.params
    for _ in range(3):
        p = p - state.inner_params * jax.grad(quad_loss)(p, support)
    np.testing.assert_allclose(learner.adapt(state, support, num_steps=3), p, rtol=1e-12)


def test_reset_inner_state_false_carries_the_task_mean(x64):
    theta, tasks = quad_tasks(7)
    learner = mg.maml(
        quad_loss, optax.sgd(0.1, momentum=0.9), 1, optax.sgd(1.0), reset_inner_state=False
    )
    state = learner.init(theta)
    state, _ = learner.step(state, tasks)
    (a_s, b_s), _ = tasks
    grads = [a_s[t] @ theta - b_s[t] for t in range(TASKS)]
    np.testing.assert_allclose(state.inner_state[0].trace, np.mean(grads, axis=0), rtol=1e-12)
    # The next outer step starts each task from that momentum.
    theta2 = state.params
    state2, metrics = learner.step(state, tasks)
    _, (a_q, b_q) = tasks
    expected = np.mean(
        [
            quad_loss(
                theta2 - 0.1 * (0.9 * state.inner_state[0].trace + a_s[t] @ theta2 - b_s[t]),
                (a_q[t], b_q[t]),
            )
            for t in range(TASKS)
        ]
    )
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-12)


def test_alignment_metric(x64):
    theta, tasks = quad_tasks(8)
    learner = mg.maml(quad_loss, optax.sgd(0.1), 1, optax.sgd(1.0), alignment=True)
    _, _, metrics = meta_grad(learner, theta, tasks)
    (a_s, b_s), _ = tasks
    g = [np.asarray(a_s[t] @ theta - b_s[t]) for t in range(TASKS)]
    cos = [g[i] @ g[j] / np.linalg.norm(g[i]) / np.linalg.norm(g[j])
           for i in range(TASKS) for j in range(TASKS) if i != j]  # fmt: skip
    np.testing.assert_allclose(metrics["alignment"], np.mean(cos), rtol=1e-10)


def test_step_compiles_once():
    traces = []

    def loss(p, batch):
        traces.append(1)
        return quad_loss(p, batch)

    theta, tasks = quad_tasks(9)
    tasks = jax.tree.map(lambda x: x.astype(jnp.float32), tasks)
    learner = mg.maml(loss, optax.sgd(0.1), 2, optax.adam(1e-2))
    state = learner.init(theta.astype(jnp.float32))
    state, _ = learner.step(state, tasks)
    n = len(traces)
    for _ in range(10):
        state, metrics = learner.step(state, tasks)
    assert len(traces) == n and np.isfinite(metrics["loss"])


def test_bad_arguments():
    sgd = optax.sgd(0.1)
    with pytest.raises(ValueError, match="inner_steps"):
        mg.maml(quad_loss, sgd, 0, sgd)
    with pytest.raises(TypeError, match="inner_steps"):
        mg.maml(quad_loss, sgd, 1.5, sgd)
    with pytest.raises(TypeError, match="loss_fn"):
        mg.maml(None, sgd, 1, sgd)
    with pytest.raises(TypeError, match="inner"):
        mg.maml(quad_loss, "sgd", 1, sgd)
    with pytest.raises(TypeError, match="outer"):
        mg.maml(quad_loss, sgd, 1, "adam")
    with pytest.raises(ValueError, match="multi_step_loss"):
        mg.maml(quad_loss, sgd, 1, sgd, multi_step_loss=0)
    with pytest.raises(TypeError, match="first_order"):
        mg.fomaml(quad_loss, sgd, 1, sgd, first_order=False)
    with pytest.raises(ValueError, match="granularity"):
        mg.learned_lr(0.1, granularity="row")
    learner = mg.maml(quad_loss, sgd, 1, sgd)
    theta, (support, query) = quad_tasks(10)
    state = learner.init(theta)
    with pytest.raises(ValueError, match="tasks"):
        learner.step(state, (support, jax.tree.map(lambda x: x[:2], query)))
    with pytest.raises(ValueError, match="tasks"):
        learner.step(state, ((support[0], support[1][:2]), query))
    with pytest.raises(TypeError, match="tasks"):
        learner.step(state, support[0])
    with pytest.raises(ValueError, match="num_steps"):
        learner.adapt(state, jax.tree.map(lambda x: x[0], support), num_steps=0)


def test_errors_say_what_to_change():
    sgd = optax.sgd(0.1)
    for bad in (-0.1, 0.0):
        with pytest.raises(ValueError, match="alpha must be > 0"):
            mg.meta_sgd(bad)
        with pytest.raises(ValueError, match="alpha must be > 0"):
            mg.learned_lr(bad, per_step=True)
    with pytest.raises(TypeError, match="axis_name must be None or the str name of a mapped axis"):
        mg.maml(quad_loss, sgd, 1, sgd, axis_name=0)
    with pytest.raises(TypeError, match="axis_name"):
        mg.fomaml(quad_loss, sgd, 1, sgd, axis_name=("d",))
    with pytest.raises(ValueError, match="multi_step_loss must be an integer >= 1"):
        mg.maml(quad_loss, sgd, 1, sgd, multi_step_loss=-3)
    theta, (support, query) = quad_tasks(11)
    learner = mg.maml(quad_loss, sgd, 1, sgd)
    state = learner.init(theta)
    # Support only: a pair (matrices, vectors), so its parts are taken for support and query.
    pair = r"tasks must be a pair \(support, query\)"
    with pytest.raises(ValueError, match=pair + r".*float\d+\[4, 3, 3\]"):
        learner.step(state, support)
    with pytest.raises(TypeError, match=pair + r".*float\d+\[4, 3, 3\]"):
        learner.step(state, (support,))
    # A loss per example instead of a scalar.
    per_example = mg.maml(lambda p, b: b[0] @ p - b[1], sgd, 1, sgd)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar, got .*shape \(3,\)"):
        per_example.step(per_example.init(theta), (support, query))
    # multi_step_loss counts outer steps: more than inner_steps is the usual MAML++ setting.
    annealed = mg.maml(quad_loss, sgd, 2, sgd, multi_step_loss=500)
    _, metrics = annealed.step(annealed.init(theta), (support, query))
    assert np.isfinite(metrics["loss"])
