"""Tests for the multi-task baselines: mtl_sum, pcgrad, gradvac, gradnorm, recadam."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg

# --------------------------------------------------------------------------------------------
# Naive per-task Python-loop references, written from the papers' update rules on flat vectors.


def naive_pcgrad(grads, orders):
    """Yu et al. 2020, Algorithm 1; grads [T, D], orders[i] the visiting order of task i."""
    grads = np.asarray(grads, np.float64)
    out = []
    for i, order in enumerate(orders):
        gi = grads[i].copy()
        for j in order:
            if j == i:
                continue
            dot = gi @ grads[j]
            if dot < 0:
                gi = gi - dot / (grads[j] @ grads[j]) * grads[j]
        out.append(gi)
    return np.sum(out, axis=0)


def naive_gradvac(grads, orders, target, beta, eps=1e-8):
    """Wang et al. 2021; returns the combined gradient and the new targets (copied)."""
    grads = np.asarray(grads, np.float64)
    target = np.array(target, np.float64)
    out = []
    for i, order in enumerate(orders):
        gi = grads[i].copy()
        for j in order:
            if j == i:
                continue
            gj = grads[j]
            phi = gi @ gj / (np.linalg.norm(gi) * np.linalg.norm(gj) + eps)
            phi_hat = target[i, j]
            if phi < phi_hat:
                coef = (
                    np.linalg.norm(gi)
                    * (phi_hat * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - phi_hat**2))
                    / (np.linalg.norm(gj) * np.sqrt(1 - phi_hat**2) + eps)
                )
                gi = gi + coef * gj
            target[i, j] = (1 - beta) * phi_hat + beta * phi
        out.append(gi)
    return np.sum(out, axis=0), target


def naive_gradnorm(grads_seq, losses_seq, alpha, lr):
    """Chen et al. 2018, Algorithm 1 with SGD on the weights; returns outputs and weights."""
    num_tasks = len(losses_seq[0])
    w = np.ones(num_tasks)
    initial = None
    outs, weights = [], []
    for grads, losses in zip(grads_seq, losses_seq, strict=True):
        grads = np.asarray(grads, np.float64)
        losses = np.asarray(losses, np.float64)
        if initial is None:
            initial = losses
        outs.append(sum(w[i] * grads[i] for i in range(num_tasks)))
        norms = [np.linalg.norm(grads[i]) for i in range(num_tasks)]
        big_g = [w[i] * norms[i] for i in range(num_tasks)]
        mean_g = np.mean(big_g)
        rates = [losses[i] / initial[i] for i in range(num_tasks)]
        inv = [r / np.mean(rates) for r in rates]
        grad_w = [np.sign(big_g[i] - mean_g * inv[i] ** alpha) * norms[i] for i in range(num_tasks)]
        w = w - lr * np.array(grad_w)
        w = w * num_tasks / w.sum()
        weights.append(w.copy())
    return outs, weights


def naive_recadam(params, pretrained, grads_seq, lr, k, t0, gamma, b1=0.9, b2=0.999, eps=1e-8):
    """Chen et al. 2020: Adam on the task gradient, sigmoid-annealed decoupled quadratic pull."""
    p = np.asarray(params, np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    trajectory = []
    for t, g in enumerate(grads_seq, start=1):
        g = np.asarray(g, np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        lam = 1 / (1 + np.exp(-k * (t - t0)))
        p = p - lr * (lam * m_hat / (np.sqrt(v_hat) + eps) + (1 - lam) * gamma * (p - pretrained))
        trajectory.append(p.copy())
    return trajectory


def _tree_grads(key, num_tasks, dtype=jnp.float64):
    k1, k2 = jax.random.split(key)
    return {
        "w": jax.random.normal(k1, (num_tasks, 3, 2), dtype),
        "b": jax.random.normal(k2, (num_tasks, 2), dtype),
    }


def _flat(tree):
    """[T, D] flattening of a per-task tree (leaves in jax.tree order)."""
    leaves = jax.tree.leaves(tree)
    return np.concatenate([np.reshape(np.asarray(x), (x.shape[0], -1)) for x in leaves], axis=1)


def _flat1(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def _params_like(grads):
    return jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)


# --------------------------------------------------------------------------------------------
# mtl_sum


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_mtl_sum_is_sum_or_mean(x64, reduction):
    grads = _tree_grads(jax.random.key(0), 4)
    tx = mg.mtl_sum(reduction=reduction)
    out, _ = tx.update(grads, tx.init(_params_like(grads)), _params_like(grads))
    expected = _flat(grads).sum(0) / (4 if reduction == "mean" else 1)
    np.testing.assert_allclose(_flat1(out), expected, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# PCGrad


def test_pcgrad_non_conflicting_is_plain_sum(x64):
    # All pairwise dot products positive: no projection.
    grads = jnp.array([[1.0, 0.2, 0.0], [0.5, 1.0, 0.1], [0.3, 0.4, 1.0]])
    assert np.all(np.asarray(grads @ grads.T) > 0)
    tx = mg.pcgrad(seed=3)
    out, _ = tx.update(grads, tx.init(jnp.zeros(3)))
    np.testing.assert_allclose(out, grads.sum(0), rtol=1e-12)


def test_pcgrad_two_conflicting_tasks_closed_form(x64):
    g1, g2 = np.array([1.0, 0.0]), np.array([-1.0, 2.0])
    tx = mg.pcgrad()
    out, _ = tx.update(jnp.array([g1, g2]), tx.init(jnp.zeros(2)))
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    np.testing.assert_allclose(out, p1 + p2, rtol=1e-12)
    # The surgered gradients no longer conflict with the originals they were projected on.
    assert abs(p1 @ g2) < 1e-12 and abs(p2 @ g1) < 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pcgrad_fixed_order_matches_naive(x64, seed):
    grads = _tree_grads(jax.random.key(seed), 5)
    params = _params_like(grads)
    tx = mg.pcgrad(shuffle=False)
    out, _ = tx.update(grads, tx.init(params), params)
    flat = _flat(grads)
    assert np.any(flat @ flat.T < 0), "the test needs conflicts"
    expected = naive_pcgrad(flat, [list(range(5))] * 5)
    np.testing.assert_allclose(_flat1(out), expected, rtol=1e-10)


def test_pcgrad_random_order_is_one_of_the_orders_and_follows_the_key(x64):
    # Three tasks where the order matters: the result must be the naive PCGrad for some choice
    # of per-task orders, the same key gives the same result, and keys differ in their choice.
    grads = np.array([[1.0, 0.3], [-0.8, 1.0], [0.2, -1.0]])
    candidates = {}
    for choice in itertools.product(*[itertools.permutations(range(3)) for _ in range(3)]):
        candidates[choice] = naive_pcgrad(grads, choice)
    distinct = {tuple(np.round(v, 9)) for v in candidates.values()}
    assert len(distinct) > 1, "the test needs order-dependent gradients"

    seen = set()
    update = jax.jit(mg.pcgrad().update)  # the seed only enters through init's state
    for seed in range(12):
        state = mg.pcgrad(seed=seed).init(jnp.zeros(2))
        out, state2 = update(jnp.asarray(grads), state)
        again, _ = update(jnp.asarray(grads), state)
        np.testing.assert_array_equal(out, again)
        match = [c for c, v in candidates.items() if np.allclose(out, v, rtol=1e-10)]
        assert match, f"seed {seed}: output is no ordering's PCGrad"
        seen.add(tuple(np.round(np.asarray(out), 9)))
        assert not np.array_equal(state2.key, state.key)
        assert int(state2.count) == 1
    assert len(seen) > 1, "different keys never changed the visiting order"


def test_pcgrad_leaf_granularity_is_per_leaf(x64):
    grads = _tree_grads(jax.random.key(7), 4)
    params = _params_like(grads)
    tx = mg.pcgrad(shuffle=False, granularity="leaf")
    out, _ = tx.update(grads, tx.init(params), params)
    for name in grads:
        flat = np.reshape(np.asarray(grads[name]), (4, -1))
        expected = naive_pcgrad(flat, [range(4)] * 4)
        np.testing.assert_allclose(np.ravel(out[name]), expected, rtol=1e-10)


# --------------------------------------------------------------------------------------------
# GradVac


@pytest.mark.parametrize("granularity", ["global", "leaf"])
def test_gradvac_matches_naive_over_steps(x64, granularity):
    num_tasks, beta, steps = 4, 0.3, 6
    key = jax.random.key(11)
    params = _params_like(_tree_grads(key, num_tasks))
    tx = mg.gradvac(num_tasks, beta=beta, shuffle=False, granularity=granularity)
    state = tx.init(params)
    update = jax.jit(tx.update)
    names = sorted(params)  # jax.tree leaf order of a dict
    targets = {name: np.zeros((num_tasks, num_tasks)) for name in names}
    target = np.zeros((num_tasks, num_tasks))
    adjusted = 0
    for step in range(steps):
        # Gradients drift from correlated to random so that targets rise and then bind.
        base = _tree_grads(jax.random.fold_in(key, 100), 1)
        noise = _tree_grads(jax.random.fold_in(key, step), num_tasks)
        grads = jax.tree.map(lambda b, n, s=step: (1 - s / steps) * b + n, base, noise)
        out, state = update(grads, state, params)
        order = [list(range(num_tasks))] * num_tasks
        if granularity == "global":
            expected, target = naive_gradvac(_flat(grads), order, target, beta)
            adjusted += not np.allclose(expected, _flat(grads).sum(0))
            np.testing.assert_allclose(_flat1(out), expected, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(state.target[0], target, atol=1e-12)
        else:
            for n, name in enumerate(names):
                flat = np.reshape(np.asarray(grads[name]), (num_tasks, -1))
                expected, targets[name] = naive_gradvac(flat, order, targets[name], beta)
                np.testing.assert_allclose(np.ravel(out[name]), expected, rtol=1e-9, atol=1e-12)
                np.testing.assert_allclose(state.target[n], targets[name], atol=1e-12)
    if granularity == "global":
        assert adjusted >= 2, "the test needs steps where the target binds"
    assert int(state.count) == steps


def test_gradvac_adjustment_reaches_target_cosine(x64):
    # Two tasks, target set by a first aligned step; a second, less aligned step is adjusted so
    # that cos(g_1', g_2) equals the target exactly.
    tx = mg.gradvac(2, beta=1.0, eps=0.0)
    state = tx.init(jnp.zeros(2))
    aligned = jnp.array([[1.0, 0.0], [1.0, 1.0]])  # cos = 1/sqrt(2)
    _, state = tx.update(aligned, state)
    np.testing.assert_allclose(state.target[0, 0, 1], 1 / np.sqrt(2), rtol=1e-12)
    g1, g2 = np.array([1.0, 0.0]), np.array([0.0, 2.0])  # cos = 0 < target
    out, state = tx.update(jnp.array([g1, g2]), state)
    # By symmetry each is rotated toward the other: g1' = g1 + c12 g2, g2' = g2 + c21 g1 with
    # c_ij = |g_i| phi_hat / (|g_j| sqrt(1 - phi_hat^2)) at phi = 0.
    c12, c21 = 1.0 / 2.0, 2.0 / 1.0
    g1_adj, g2_adj = g1 + c12 * g2, g2 + c21 * g1
    np.testing.assert_allclose(out, g1_adj + g2_adj, rtol=1e-12)
    for a, b in [(g1_adj, g2), (g2_adj, g1)]:
        cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
        np.testing.assert_allclose(cos, 1 / np.sqrt(2), rtol=1e-12)


def test_gradvac_random_order_two_tasks_equals_any_order(x64):
    grads = _tree_grads(jax.random.key(5), 2)
    params = _params_like(grads)
    a, b = mg.gradvac(2, beta=0.5, seed=0), mg.gradvac(2, beta=0.5, shuffle=False)
    sa, sb = a.init(params), b.init(params)
    update_a, update_b = jax.jit(a.update), jax.jit(b.update)
    for _ in range(3):
        oa, sa = update_a(grads, sa, params)
        ob, sb = update_b(grads, sb, params)
        np.testing.assert_allclose(_flat1(oa), _flat1(ob), rtol=1e-12)


# --------------------------------------------------------------------------------------------
# GradNorm


def test_gradnorm_matches_naive_over_steps(x64):
    num_tasks, alpha, lr = 3, 1.5, 0.01
    key = jax.random.key(2)
    params = _params_like(_tree_grads(key, num_tasks))
    tx = mg.gradnorm(num_tasks, alpha=alpha, learning_rate=lr)
    state = tx.init(params)
    update = jax.jit(tx.update)
    scale = jnp.array([1.0, 3.0, 0.5])  # unequal gradient norms
    grads_seq, losses_seq = [], []
    for step in range(5):
        grads = _tree_grads(jax.random.fold_in(key, step), num_tasks)
        grads = jax.tree.map(lambda g: g * scale.reshape((3,) + (1,) * (g.ndim - 1)), grads)
        losses = jnp.array([2.0, 1.0, 3.0]) * jnp.array([0.9, 0.7, 0.95]) ** step
        grads_seq.append(_flat(grads))
        losses_seq.append(np.asarray(losses))
        out, state = update(grads, state, params, losses=losses)
        outs, weights = naive_gradnorm(grads_seq, losses_seq, alpha, lr)
        np.testing.assert_allclose(_flat1(out), outs[-1], rtol=1e-10)
        np.testing.assert_allclose(state.weights, weights[-1], rtol=1e-10)
    np.testing.assert_allclose(jnp.sum(state.weights), num_tasks, rtol=1e-12)
    np.testing.assert_allclose(state.initial_losses, losses_seq[0], rtol=1e-12)


def test_gradnorm_raises_weight_of_task_with_small_gradient():
    # Equal training rates: the target is the mean weighted norm, so the tasks whose gradient
    # norm is below it get larger weights and the one above it a smaller weight.
    tx = mg.gradnorm(3, alpha=1.5, learning_rate=0.01)
    state = tx.init(jnp.zeros(2))
    grads = jnp.array([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    update = jax.jit(tx.update)
    for _ in range(3):
        _, state = update(grads, state, losses=jnp.ones(3))
    w = np.asarray(state.weights)
    assert w[1] > 1.0 and w[2] > 1.0 > w[0], w


def test_gradnorm_raises_weight_of_slow_task():
    # Equal gradient norms: the task whose loss fell least (largest inverse training rate
    # r_i) has the largest target and gets its weight increased.
    tx = mg.gradnorm(2, alpha=1.0, learning_rate=0.01)
    state = tx.init(jnp.zeros(2))
    grads = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    _, state = tx.update(grads, state, losses=jnp.array([1.0, 1.0]))
    _, state = tx.update(grads, state, losses=jnp.array([0.2, 0.9]))
    assert state.weights[1] > state.weights[0]


def test_gradnorm_norm_mask_selects_leaves(x64):
    grads = {"a": jnp.array([[1.0], [10.0]]), "b": jnp.array([[10.0], [1.0]])}
    params = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
    for mask, bigger in [({"a": True, "b": False}, 0), ({"a": False, "b": True}, 1)]:
        for m in (mask, lambda p, mask=mask: mask):
            tx = mg.gradnorm(2, learning_rate=0.01, norm_mask=m)
            _, state = tx.update(grads, tx.init(params), params, losses=jnp.ones(2))
            # The task with the smaller norm on the selected leaf gains weight.
            assert state.weights[bigger] > state.weights[1 - bigger]


def test_gradnorm_errors():
    tx = mg.gradnorm(2)
    state = tx.init(jnp.zeros(2))
    grads = jnp.ones((2, 2))
    with pytest.raises(ValueError, match="losses"):
        tx.update(grads, state)
    with pytest.raises(ValueError, match="losses"):
        tx.update(grads, state, losses=jnp.ones(3))
    with pytest.raises(ValueError, match="num_tasks"):
        tx.update(jnp.ones((3, 2)), state, losses=jnp.ones(3))
    with pytest.raises(ValueError, match="alpha"):
        mg.gradnorm(2, alpha=-1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        mg.gradnorm(2, learning_rate=0.0)
    with pytest.raises(TypeError, match="num_tasks"):
        mg.gradnorm(2.5)
    with pytest.raises(ValueError, match="norm_mask"):
        mg.gradnorm(2, norm_mask={"a": False}).update(
            {"a": grads}, state, {"a": jnp.zeros(2)}, losses=jnp.ones(2)
        )


# --------------------------------------------------------------------------------------------
# RecAdam


@pytest.mark.parametrize("given", [False, True])
def test_recadam_matches_naive(x64, given):
    key = jax.random.key(4)
    params = jax.random.normal(key, (5,), jnp.float64)
    pretrained = params + 0.5 if given else params
    lr, k, t0, gamma = 0.05, 0.7, 6.0, 3.0
    tx = mg.recadam(
        lr, pretrained=pretrained if given else None, anneal_k=k, anneal_t0=t0, pretrain_coef=gamma
    )
    state = tx.init(params)
    grads_seq = [
        jax.random.normal(jax.random.fold_in(key, t), (5,), jnp.float64) for t in range(15)
    ]
    expected = naive_recadam(params, np.asarray(pretrained), grads_seq, lr, k, t0, gamma)
    p = params
    update = jax.jit(tx.update)
    for t, g in enumerate(grads_seq):
        updates, state = update(g, state, p)
        p = optax.apply_updates(p, updates)
        np.testing.assert_allclose(p, expected[t], rtol=1e-10, atol=1e-12)


def test_recadam_pull_dominates_early_then_fades():
    # With zero gradients the params decay toward theta* early; late (t >> t0) they stay put.
    theta_star = jnp.zeros(2)
    tx = mg.recadam(0.1, pretrained=theta_star, anneal_k=1.0, anneal_t0=5.0, pretrain_coef=1.0)
    p = jnp.array([1.0, -2.0])
    state = tx.init(p)
    u, state = tx.update(jnp.zeros(2), state, p)
    np.testing.assert_allclose(u, -0.1 * (1 - jax.nn.sigmoid(-4.0)) * p, rtol=1e-5)
    update = jax.jit(tx.update)
    for _ in range(40):
        u, state = update(jnp.zeros(2), state, p)
    assert float(jnp.max(jnp.abs(u))) < 1e-15 + 0.1 * (1 - jax.nn.sigmoid(36.0)) * 2


def test_recadam_errors():
    with pytest.raises(ValueError, match="learning_rate"):
        mg.recadam(-1.0)
    with pytest.raises(ValueError, match="anneal_k"):
        mg.recadam(0.1, anneal_k=0.0)
    with pytest.raises(ValueError, match="pretrain_coef"):
        mg.recadam(0.1, pretrain_coef=-1.0)
    tx = mg.recadam(0.1)
    state = tx.init({"a": jnp.zeros(2)})
    with pytest.raises(ValueError, match="params"):
        tx.update({"a": jnp.zeros(2)}, state)
    with pytest.raises(ValueError, match="pretrained"):
        mg.recadam(0.1, pretrained={"b": jnp.zeros(2)}).init({"a": jnp.zeros(2)})


# --------------------------------------------------------------------------------------------
# The shared battery: task-axis errors, jit without retracing, optax.chain, dtype.

COMBINERS = {
    "mtl_sum": lambda: mg.mtl_sum(),
    "pcgrad": lambda: mg.pcgrad(seed=1),
    "gradvac": lambda: mg.gradvac(3, beta=0.5),
    "gradnorm": lambda: mg.gradnorm(3),
}


def _extra(name):
    return {"losses": jnp.array([1.0, 2.0, 3.0])} if name == "gradnorm" else {}


@pytest.mark.parametrize("name", sorted(COMBINERS))
def test_task_axis_errors(name):
    tx = COMBINERS[name]()
    params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    state = tx.init(params)
    unstacked = {"w": jnp.ones((3, 2)), "b": jnp.ones(3)}  # no task axis
    with pytest.raises(ValueError, match="task axis"):
        tx.update({"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, state, params, **_extra(name))
    with pytest.raises(ValueError, match="task axis"):
        tx.update(unstacked, state, params, **_extra(name))
    with pytest.raises(ValueError, match="leading"):
        tx.update({"w": jnp.ones((3, 2, 2)), "b": jnp.ones((2, 2))}, state, **_extra(name))
    with pytest.raises(ValueError, match="scalar"):
        tx.update({"w": jnp.ones((3, 2, 2)), "b": jnp.ones(())}, state, **_extra(name))


@pytest.mark.parametrize("name", sorted(COMBINERS))
def test_jit_without_retrace_and_dtype(name):
    tx = COMBINERS[name]()
    params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2, jnp.bfloat16)}
    traces = []

    @jax.jit
    def step(grads, state):
        traces.append(1)
        return tx.update(grads, state, params, **_extra(name))

    state = tx.init(params)
    shapes = jax.tree.map(jnp.shape, state)
    for i in range(3):
        grads = _tree_like(jax.random.key(i), params, 3)
        out, state = step(grads, state)
        assert jax.tree.map(jnp.shape, state) == shapes
    assert len(traces) == 1
    assert out["w"].dtype == jnp.float32 and out["b"].dtype == jnp.bfloat16
    assert out["w"].shape == (2, 2)


def _tree_like(key, params, num_tasks):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(k, (num_tasks, *p.shape)).astype(p.dtype)
            for k, p in zip(keys, leaves, strict=True)
        ],  # noqa: E501
    )


@pytest.mark.parametrize("name", sorted(COMBINERS))
def test_composes_in_chain(name):
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    chained = optax.chain(COMBINERS[name](), optax.adam(0.1))
    alone, adam = COMBINERS[name](), optax.adam(0.1)
    cs, s1, s2 = chained.init(params), alone.init(params), adam.init(params)
    chained_update, alone_update = jax.jit(chained.update), jax.jit(alone.update)
    for i in range(3):
        grads = _tree_like(jax.random.key(i), params, 3)
        u_chain, cs = chained_update(grads, cs, params, **_extra(name))
        g, s1 = alone_update(grads, s1, params, **_extra(name))
        u, s2 = adam.update(g, s2, params)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_chain), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)
        params = optax.apply_updates(params, u)


def test_recadam_after_mtl_sum_in_chain():
    params = jnp.array([1.0, 2.0])
    tx = optax.chain(mg.mtl_sum(), mg.recadam(0.1, anneal_t0=0.0))
    state = tx.init(params)
    grads = jnp.array([[1.0, 0.0], [1.0, 0.0]])
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert updates.shape == (2,) and float(updates[0]) < 0 and float(updates[1]) == 0.0


def test_constructor_errors():
    with pytest.raises(ValueError, match="reduction"):
        mg.mtl_sum(reduction="max")
    with pytest.raises(ValueError, match="granularity"):
        mg.pcgrad(granularity="layer")
    with pytest.raises(TypeError, match="seed"):
        mg.pcgrad(seed="zero")
    with pytest.raises(ValueError, match="beta"):
        mg.gradvac(2, beta=1.5)
    with pytest.raises(ValueError, match="beta"):
        mg.gradvac(2, beta=0.0)
    with pytest.raises(ValueError, match="num_tasks"):
        mg.gradvac(0)
    with pytest.raises(ValueError, match="num_tasks"):
        mg.gradvac(2).update(jnp.ones((3, 2)), mg.gradvac(2).init(jnp.zeros(2)))


def test_typed_key_seed_equals_int_seed():
    grads = jnp.array([[1.0, 0.3], [-0.8, 1.0], [0.2, -1.0]])
    a, b = mg.pcgrad(seed=5), mg.pcgrad(seed=jax.random.key(5))
    oa, _ = a.update(grads, a.init(jnp.zeros(2)))
    ob, _ = b.update(grads, b.init(jnp.zeros(2)))
    np.testing.assert_array_equal(oa, ob)


INJECTABLE = {
    "gradvac": (mg.gradvac, {"num_tasks": 3, "beta": 0.3}, ("num_tasks",)),
    "gradnorm": (
        mg.gradnorm,
        {"num_tasks": 3, "alpha": 1.0, "learning_rate": 0.05},
        ("num_tasks",),
    ),
    "recadam": (mg.recadam, {"learning_rate": 0.1, "anneal_k": 0.5, "anneal_t0": 2.0}, ()),
}


@pytest.mark.parametrize("name", sorted(INJECTABLE))
def test_inject_hyperparams_matches_plain(name):
    factory, kwargs, static = INJECTABLE[name]
    plain = factory(**kwargs)
    injected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
    params = jnp.array([0.5, -1.0])
    sp, si = plain.init(params), injected.init(params)
    for i in range(3):
        g = jax.random.normal(jax.random.key(i), (3, 2) if name != "recadam" else (2,))
        extra = {"losses": jnp.array([1.0, 2.0, 3.0]) / (i + 1)} if name == "gradnorm" else {}
        up, sp = jax.jit(plain.update)(g, sp, params, **extra)
        ui, si = jax.jit(injected.update)(g, si, params, **extra)
        np.testing.assert_allclose(up, ui, rtol=1e-5)


def test_gradnorm_weight_optimizer_and_mean_reduction(x64):
    grads = jnp.array([[3.0, 0.0], [0.0, 1.0]])
    tx = mg.gradnorm(2, learning_rate=optax.adam(0.1), reduction="mean")
    out, state = tx.update(grads, tx.init(jnp.zeros(2)), losses=jnp.ones(2))
    np.testing.assert_allclose(out, grads.sum(0) / 2, rtol=1e-12)  # weights start at 1
    # Adam's first step is lr * sign: w = (0.9, 1.1), already summing to T = 2.
    np.testing.assert_allclose(state.weights, [0.9, 1.1], rtol=1e-6)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: mg.pcgrad(shuffle=False, reduction="mean"),
        lambda: mg.gradvac(3, beta=0.5, shuffle=False, reduction="mean"),
    ],
)
def test_mean_reduction_is_sum_over_tasks(x64, factory):
    grads = _tree_grads(jax.random.key(9), 3)
    params = _params_like(grads)
    mean_tx = factory()
    sum_tx = (
        mg.pcgrad(shuffle=False)
        if isinstance(mean_tx.init(params), mg.PCGradState)
        else mg.gradvac(3, beta=0.5, shuffle=False)
    )
    om, _ = mean_tx.update(grads, mean_tx.init(params), params)
    osum, _ = sum_tx.update(grads, sum_tx.init(params), params)
    np.testing.assert_allclose(_flat1(om) * 3, _flat1(osum), rtol=1e-12)
