"""Tests for metagrad.grad_share against a naive loop, finite differences and plain MAML."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg

DIM, ALPHA = 4, 0.1


def loss_fn(params, batch):
    """A quadratic ½θᵀAθ − bᵀθ over params split into two leaves (two "layers")."""
    a, b = batch
    theta = jnp.concatenate([params["u"], params["v"]])
    return 0.5 * theta @ a @ theta - b @ theta


def make_tasks(rng, num_tasks):
    def spd():
        m = rng.normal(size=(num_tasks, DIM, DIM))
        return np.einsum("tij,tkj->tik", m, m) / DIM + 0.5 * np.eye(DIM)

    support = (jnp.asarray(spd()), jnp.asarray(rng.normal(size=(num_tasks, DIM))))
    query = (jnp.asarray(spd()), jnp.asarray(rng.normal(size=(num_tasks, DIM))))
    return support, query


def make_params(rng):
    theta = rng.normal(size=DIM)
    return {"u": jnp.asarray(theta[:2]), "v": jnp.asarray(theta[2:])}


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def naive_inner(theta, average, support, momentum, gate, steps, normalize, per_layer):
    """Gradient sharing written as plain loops over steps, tasks and layers (numpy)."""
    a_s, b_s = (np.asarray(x) for x in support)
    num_tasks = a_s.shape[0]
    cuts = {"u": slice(0, 2), "v": slice(2, DIM)}
    thetas = [dict(theta) for _ in range(num_tasks)]
    average = dict(average)
    k_max = len(momentum["u"] if per_layer else momentum) - 1
    for k in range(steps):
        kk = min(k, k_max)
        grads = []
        for t in range(num_tasks):
            full = np.concatenate([thetas[t]["u"], thetas[t]["v"]])
            g = a_s[t] @ full - b_s[t]
            grads.append({name: g[cut] for name, cut in cuts.items()})
        for name in cuts:
            m = momentum[name][kk] if per_layer else momentum[kk]
            lam = gate[name][kk] if per_layer else gate[kk]
            total = 0.0
            for t in range(num_tasks):
                if normalize == "task":
                    scale = 1 / np.sqrt(sum(np.sum(grads[t][n] ** 2) for n in cuts))
                elif normalize == "layer":
                    scale = 1 / np.linalg.norm(grads[t][name])
                else:
                    scale = 1.0
                total = total + scale * grads[t][name]
            average[name] = (1 - sigmoid(m)) * average[name] + sigmoid(m) * total / num_tasks
            for t in range(num_tasks):
                delta = (1 - sigmoid(lam)) * grads[t][name] + sigmoid(lam) * average[name]
                thetas[t][name] = thetas[t][name] - ALPHA * delta
    return thetas, average


def random_logits(rng, steps, per_layer, params):
    if per_layer:
        return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=steps)), params)
    return jnp.asarray(rng.normal(size=steps))


# Task batches of 1 (sharing with earlier tasks only) and 5 (concurrent tasks); the rule's
# arithmetic on one flat vector (the default) and leaf by leaf.
@pytest.mark.parametrize(
    "normalize, per_layer, num_tasks, layout",
    [("task", False, 5, "flat"), ("layer", True, 1, "flat"), ("none", False, 3, "flat"),
     ("task", False, 3, "leaves"), ("layer", True, 2, "leaves")],
)  # fmt: skip
def test_matches_naive_loop_over_inner_and_outer_steps(
    x64, normalize, per_layer, num_tasks, layout
):
    rng = np.random.default_rng(0)
    steps = 3
    params = make_params(rng)
    rule = mg.grad_share(ALPHA, normalize=normalize, per_layer=per_layer, layout=layout)
    # Outer learning rate 0 keeps θ, m and λ fixed, isolating the inner arithmetic.
    learner = mg.maml(loss_fn, rule, steps, optax.sgd(0.0))
    state = learner.init(params)
    momentum = random_logits(rng, steps, per_layer, params)
    gate = random_logits(rng, steps, per_layer, params)
    state = state._replace(inner_params=mg.GradShareParams(momentum, gate, ()))
    to_np = lambda tree: jax.tree.map(np.asarray, tree)
    average = {k: np.zeros_like(v) for k, v in to_np(params).items()}
    for _ in range(3):
        support, query = make_tasks(rng, num_tasks)
        state, metrics = learner.step(state, (support, query))
        thetas, average = naive_inner(
            to_np(params), average, support, to_np(momentum), to_np(gate), steps,
            normalize, per_layer,
        )  # fmt: skip
        post = np.mean(
            [loss_fn(theta, (query[0][t], query[1][t])) for t, theta in enumerate(thetas)]
        )
        np.testing.assert_allclose(metrics["loss_post"], post, rtol=1e-10)
        for name in ("u", "v"):
            np.testing.assert_allclose(state.carry.average[name], average[name], rtol=1e-10)
    # Meta-test adaptation starts from the stored average (or zero), one task, 4 steps.
    for carry_into_eval in (True, False):
        rule = mg.grad_share(
            ALPHA,
            normalize=normalize,
            per_layer=per_layer,
            carry_into_eval=carry_into_eval,
            layout=layout,
        )
        tester = mg.maml(loss_fn, rule, steps, optax.sgd(0.0))
        task = jax.tree.map(lambda x: x[:1], make_tasks(rng, 1)[0])
        start = average if carry_into_eval else jax.tree.map(np.zeros_like, average)
        thetas, _ = naive_inner(
            to_np(params), start, task, to_np(momentum), to_np(gate), 4, normalize, per_layer
        )
        got = tester.adapt(state, jax.tree.map(lambda x: x[0], task), num_steps=4)
        for name in ("u", "v"):
            np.testing.assert_allclose(got[name], thetas[0][name], rtol=1e-10)


@pytest.mark.parametrize(
    "make_inner, kwargs",
    [
        (lambda: optax.sgd(ALPHA), {}),
        (lambda: optax.sgd(ALPHA), {"first_order": True}),
        (lambda: mg.meta_sgd(ALPHA), {}),
        (lambda: mg.learned_lr(ALPHA, per_step=True, granularity="layer"), {"multi_step_loss": 5}),
    ],
)
def test_closed_gate_reproduces_maml(make_inner, kwargs):
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: x.astype(jnp.float32), make_params(rng))
    runs = []
    for rule in (make_inner(), mg.grad_share(make_inner(), init_gate=-1e9)):
        learner = mg.maml(loss_fn, rule, 2, optax.adam(1e-2), **kwargs)
        state = learner.init(params)
        task_rng = np.random.default_rng(2)
        for _ in range(3):
            tasks = jax.tree.map(lambda x: x.astype(jnp.float32), make_tasks(task_rng, 3))
            state, metrics = learner.step(state, tasks)
        runs.append((state, metrics))
    (ref, ref_metrics), (got, got_metrics) = runs
    jax.tree.map(np.testing.assert_array_equal, got.params, ref.params)
    np.testing.assert_array_equal(got_metrics["loss"], ref_metrics["loss"])
    lrs = got.inner_params.inner
    jax.tree.map(np.testing.assert_array_equal, lrs, ref.inner_params)


# First order ignores how m_k, λ_k move later inner gradients, so it equals the derivative of
# the meta-loss only with one inner step.
@pytest.mark.parametrize(
    "first_order, num_tasks, per_layer, steps",
    [(False, 3, False, 2), (False, 1, True, 2), (True, 5, False, 1)],
)
def test_meta_gradient_matches_finite_differences(x64, first_order, num_tasks, per_layer, steps):
    rng = np.random.default_rng(3)
    params = make_params(rng)
    rule = mg.grad_share(ALPHA, per_layer=per_layer, init_momentum=-0.5, init_gate=0.3)
    learner = mg.maml(loss_fn, rule, steps, optax.sgd(1.0), first_order=first_order)
    state = learner.init(params)
    for _ in range(2):  # a non-zero stored average G enters the next step
        state, _ = learner.step(learner.init(params)._replace(carry=state.carry),
                                make_tasks(rng, num_tasks))  # fmt: skip
    tasks = make_tasks(rng, num_tasks)
    new, _ = learner.step(state, tasks)
    grad = jax.tree.map(lambda a, b: a - b, state.inner_params, new.inner_params)

    def meta_loss(inner_params):
        return learner.step(state._replace(inner_params=inner_params), tasks)[1]["loss"]

    leaves, treedef = jax.tree.flatten(state.inner_params)
    grad_leaves = jax.tree.leaves(grad)
    h = 1e-5
    for i, leaf in enumerate(leaves):
        for j in range(leaf.shape[0]):

            def shifted(d, i=i, j=j):
                moved = list(leaves)
                moved[i] = leaves[i].at[j].add(d)
                return jax.tree.unflatten(treedef, moved)

            fd = (meta_loss(shifted(h)) - meta_loss(shifted(-h))) / (2 * h)
            got = grad_leaves[i][j]
            assert abs(got) > 1e-6
            np.testing.assert_allclose(got, fd, rtol=1e-5)


@pytest.mark.parametrize("normalize", ["task", "layer"])
@pytest.mark.parametrize("eps", [1e-12, 1e-30])
def test_zero_task_gradient_normalizes_to_zero_not_nan(normalize, eps):
    # At θ = 0 the gradient is −b: task 0 gets b = 0 (an exactly zero gradient), task 1 a
    # zero "u" leaf. In float32 1e-30 ** 2 underflows; the norm's bound must still hold.
    rng = np.random.default_rng(3)
    support, query = make_tasks(rng, 2)
    params = {"u": jnp.zeros(2, jnp.float32), "v": jnp.zeros(DIM - 2, jnp.float32)}
    a, b = (np.array(x, np.float32) for x in support)
    b[0] = 0.0
    b[1][:2] = 0.0
    support = (jnp.asarray(a), jnp.asarray(b))
    rule = mg.grad_share(ALPHA, normalize=normalize, eps=eps)
    learner = mg.maml(loss_fn, rule, 1, optax.sgd(0.1))
    state, metrics = learner.step(learner.init(params), (support, query))
    for leaf in jax.tree.leaves((state, metrics)):
        assert np.all(np.isfinite(leaf))
    # Both normalizations: G = σ(0) · (0 + (0, g_v / ‖g_v‖)) / 2 tasks.
    g_v = -b[1][2:]
    np.testing.assert_array_equal(state.carry.average["u"], 0.0)
    np.testing.assert_allclose(
        state.carry.average["v"], 0.25 * g_v / np.linalg.norm(g_v), rtol=1e-5
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="normalize"):
        mg.grad_share(0.1, normalize="batch")
    with pytest.raises(ValueError, match="init_gate"):
        mg.grad_share(0.1, init_gate=float("-inf"))
    with pytest.raises(TypeError, match="init_momentum"):
        mg.grad_share(0.1, init_momentum="high")
    with pytest.raises(ValueError, match="inner"):
        mg.grad_share(-0.1)
    with pytest.raises(TypeError, match="inner"):
        mg.grad_share("sgd")
    with pytest.raises(ValueError, match="eps"):
        mg.grad_share(0.1, eps=0.0)


def test_experiment_tiny_budget_writes_finite_results(tmp_path):
    from experiments import grad_share_sinusoid

    rows = grad_share_sinusoid.run(tmp_path, budget="tiny", progress=False)
    for name in ("grad_share_curves.png", "grad_share.json", "grad_share.csv"):
        assert (tmp_path / name).stat().st_size > 0
    assert {(r["method"], r["lr_factor"]) for r in rows} == {
        (m, f) for m in ("maml", "maml+grad_share") for f in (1.0, 10.0)
    }
    assert all(r["experiment"] == "grad_share" and np.isfinite(r["final_loss"]) for r in rows)


def test_unknown_layout_is_rejected():
    with pytest.raises(ValueError, match="layout must be one of"):
        mg.grad_share(0.1, layout="auto")
