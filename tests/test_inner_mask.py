"""Tests for `inner_mask` of the MAML family (ANIL / BOIL) against a naive reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg

TASKS, ALPHA, K = 3, 0.3, 2


def mlp_loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["body"]["w"] + params["body"]["b"])
    return jnp.mean((h @ params["head"]["w"] + params["head"]["b"] - y) ** 2)


def problem():
    rng = np.random.default_rng(3)
    params = {
        "body": {"w": jnp.asarray(rng.normal(size=(2, 4))), "b": jnp.asarray(rng.normal(size=4))},
        "head": {"w": jnp.asarray(rng.normal(size=4)), "b": jnp.asarray(0.1)},
    }

    def batch():
        x = rng.normal(size=(TASKS, 5, 2))
        return jnp.asarray(x), jnp.asarray(np.sin(x.sum(-1)))

    return params, (batch(), batch())


def reference_grad(params, tasks, adapt_keys, rates=None, first_order=False):
    """Meta-gradient of mean_t L_q(θ_t), θ_t from K SGD steps on the `adapt_keys` parts only.

    A Python loop over tasks and steps; `rates` (a pytree like the adapted parts) are
    Meta-SGD learning rates, differentiated too.
    """
    (xs, ys), (xq, yq) = tasks

    def objective(params, rates):
        total = 0.0
        for t in range(TASKS):
            p = dict(params)
            for _ in range(K):
                g = jax.grad(mlp_loss)(p, (xs[t], ys[t]))
                if first_order:
                    g = jax.lax.stop_gradient(g)
                for key in adapt_keys:
                    lr = rates[key] if rates is not None else jax.tree.map(lambda _: ALPHA, p[key])
                    p[key] = jax.tree.map(lambda w, gw, a: w - a * gw, p[key], g[key], lr)
            total = total + mlp_loss(p, (xq[t], yq[t]))
        return total / TASKS

    return jax.jit(jax.grad(objective, argnums=(0, 1)))(params, rates)


def one_step_grads(learner, params, tasks):
    state = learner.init(params)
    new, metrics = learner.step(state, tasks)
    delta = jax.tree.map(
        lambda a, b: a - b, (state.params, state.inner_params), (new.params, new.inner_params)
    )
    return delta, metrics


ANIL = {"body": False, "head": True}  # a prefix of params' structure


@pytest.mark.parametrize("first_order", [False, True])
def test_anil_matches_naive_reference(x64, first_order):
    params, tasks = problem()
    learner = mg.maml(
        mlp_loss, optax.sgd(ALPHA), K, optax.sgd(1.0), first_order=first_order, inner_mask=ANIL
    )
    (got, _), _ = one_step_grads(learner, params, tasks)
    want, _ = reference_grad(params, tasks, ["head"], first_order=first_order)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), got, want)
    # The body's inner updates matter: plain MAML differs.
    full, _ = reference_grad(params, tasks, ["body", "head"], first_order=first_order)
    assert np.max(np.abs(got["body"]["w"] - full["body"]["w"])) > 1e-4


def test_boil_mask_function_and_meta_sgd(x64):
    params, tasks = problem()
    boil = lambda p: {"body": jax.tree.map(lambda _: True, p["body"]), "head": False}  # noqa: E731
    learner = mg.maml(mlp_loss, mg.meta_sgd(ALPHA), K, optax.sgd(1.0), inner_mask=boil)
    state = learner.init(params)
    # Learned rates exist for the adapted leaves only.
    assert state.inner_params["head"] == {"w": None, "b": None}
    (got, got_rates), _ = one_step_grads(learner, params, tasks)
    rates = {"body": jax.tree.map(lambda w: jnp.full_like(w, ALPHA), params["body"])}
    want, want_rates = reference_grad(params, tasks, ["body"], rates=rates)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)  # noqa: E731
    jax.tree.map(close, got, want)
    jax.tree.map(close, got_rates["body"], want_rates["body"])


def test_inner_rule_sees_only_selected_leaves(x64):
    params, tasks = problem()
    seen = []
    sgd = mg.learned_lr(ALPHA, granularity="global")

    def update(grads, state, p, inner_params, carry, step):
        seen.append(
            (
                [x.shape for x in jax.tree.leaves(grads)],
                grads["body"],
                [x.shape for x in jax.tree.leaves(p)],
            )
        )
        return sgd.update(grads, state, p, inner_params, carry, step)

    rule = mg.InnerRule(sgd.init, sgd.init_state, update)
    for task_loop in ("vmap", "unroll"):
        seen.clear()
        learner = mg.maml(mlp_loss, rule, K, optax.sgd(1.0), inner_mask=ANIL, task_loop=task_loop)
        learner.step(learner.init(params), tasks)
        assert seen
        for grads, body, p in seen:
            assert grads == p == [(TASKS,), (TASKS, 4)]  # head b, head w
            assert body == {"w": None, "b": None}


@pytest.mark.parametrize("inner", ["learned_lr", "grad_share"])
def test_all_selected_equals_plain_maml(x64, inner):
    params, tasks = problem()
    make = {
        "learned_lr": lambda: mg.learned_lr(ALPHA, per_step=True, granularity="layer"),
        "grad_share": lambda: mg.grad_share(ALPHA),
    }[inner]
    kwargs = {"multi_step_loss": 10} if inner == "learned_lr" else {}
    runs = []
    for mask in (None, jax.tree.map(lambda _: True, params)):
        learner = mg.maml(mlp_loss, make(), 1, optax.adam(0.01), inner_mask=mask, **kwargs)
        runs.append(learner.step(learner.init(params), tasks))
    jax.tree.map(np.testing.assert_array_equal, runs[0], runs[1])


def test_adapt_keeps_unselected_leaves(x64):
    params, tasks = problem()
    learner = mg.fomaml(mlp_loss, optax.sgd(ALPHA), K, optax.sgd(0.1), inner_mask=ANIL)
    state = learner.init(params)
    out = learner.adapt(state, (tasks[0][0][0], tasks[0][1][0]))
    jax.tree.map(np.testing.assert_array_equal, out["body"], state.params["body"])
    assert np.max(np.abs(out["head"]["w"] - state.params["head"]["w"])) > 1e-3


def test_bad_masks():
    params, _ = problem()
    loss = mlp_loss
    with pytest.raises(ValueError, match="inner_mask"):
        mg.maml(loss, optax.sgd(0.1), 1, optax.sgd(0.1), inner_mask={"head": True}).init(params)
    with pytest.raises(ValueError, match="inner_mask"):
        mg.maml(loss, optax.sgd(0.1), 1, optax.sgd(0.1), inner_mask=lambda p: [True, False]).init(
            params
        )
    with pytest.raises(ValueError, match="inner_mask selects no parameter"):
        mg.maml(
            loss, optax.sgd(0.1), 1, optax.sgd(0.1), inner_mask={"body": False, "head": False}
        ).init(params)
    with pytest.raises(TypeError, match="inner_mask"):
        mg.fomaml(loss, optax.sgd(0.1), 1, optax.sgd(0.1), inner_mask={"body": 1, "head": 0})
