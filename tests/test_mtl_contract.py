"""The aggregators' contract inside optax: where the guards go, non-finite steps, bad input.

An aggregator maps per-task gradients [T, ...] to one gradient [...], so it goes first in a
chain and `optax.apply_if_finite` / `optax.MultiSteps` go after it; placed inside them it says
so. A non-finite step under the guard leaves no trace: params and aggregator state equal a run
without that step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg

NUM_TASKS = 3
MAX_ERRORS = 3

AGGREGATORS = {
    "mtl_sum": lambda: mg.mtl_sum(),
    "pcgrad": lambda: mg.pcgrad(seed=1),
    "gradvac": lambda: mg.gradvac(NUM_TASKS, beta=0.5, seed=2),
    "gradnorm": lambda: mg.gradnorm(NUM_TASKS, learning_rate=0.05),
}


def _params():
    return {"w": jnp.array([0.5, -0.3, 0.2]), "b": jnp.array(0.1)}


def _task_loss(params, target):
    # A per-task quadratic with its own minimiser: the task gradients conflict.
    return jnp.sum((params["w"] - target[:3]) ** 2) + (params["b"] - target[3]) ** 2 + 1.0


TARGETS = jnp.array([[1.0, 0.0, -1.0, 0.5], [-1.0, 1.0, 0.0, -0.5], [0.0, -1.0, 1.0, 2.0]])


def _task_grads(params, step, poison=None):
    """Per-task losses [T] and gradients stacked on the task axis; `poison` spoils task 1."""
    targets = TARGETS * (1.0 + 0.1 * step)
    if poison is not None:
        targets = targets.at[1, 0].set(poison)
    return jax.vmap(jax.value_and_grad(_task_loss), in_axes=(None, 0))(params, targets)


def _extra(name, losses):
    return {"losses": losses} if name == "gradnorm" else {}


def _finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------
# Placement: inside apply_if_finite / MultiSteps, or given an already-combined gradient.


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@pytest.mark.parametrize(
    "wrapper, fix",
    [
        (lambda tx: optax.apply_if_finite(tx, MAX_ERRORS), "optax.apply_if_finite(opt"),
        (lambda tx: optax.MultiSteps(tx, 2), "optax.MultiSteps(opt, k)"),
    ],
    ids=["apply_if_finite", "MultiSteps"],
)
def test_wrapped_aggregator_says_where_it_goes(name, wrapper, fix):
    params = _params()
    tx = wrapper(optax.chain(AGGREGATORS[name](), optax.adam(0.1)))
    losses, grads = _task_grads(params, 0)
    with pytest.raises(ValueError, match="cannot sit inside optax") as info:
        jax.eval_shape(tx.update, grads, tx.init(params), params, **_extra(name, losses))
    assert f"optax.chain(mg.{name}(...), {fix}" in str(info.value)


def test_bare_masked_aggregator_raises_and_multi_transform_works():
    # optax.masked passes the unselected leaves on unchanged, still [T, ...]: the params would
    # change shape. Every aggregator says so and points to multi_transform, which works.
    from tests import conformance_methods as cm

    params = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
    grads = jax.tree.map(lambda a: jnp.stack([a, -0.5 * a, 2.0 * a]), params)
    losses = jnp.array([1.0, 2.0, 0.5])
    labels = {"w": "agg", "b": "rest"}
    methods = [m for m in cm.METHODS if m.kind == "aggregator"]
    assert len(methods) >= 18
    for method in methods:
        make = functools.partial(method.make(None), **method.hyper)
        extra = {"losses": losses} if method.losses else {}
        bare = optax.chain(optax.masked(make(), {"w": True, "b": False}), optax.adam(0.1))
        with pytest.raises(ValueError, match="cannot sit inside optax.masked") as info:
            jax.eval_shape(bare.update, grads, bare.init(params), params, **extra)
        assert "optax.multi_transform(" in str(info.value), method.name
        split = optax.multi_transform(
            {
                "agg": optax.chain(make(), optax.adam(0.1)),
                "rest": optax.chain(mg.mtl_sum(), optax.adam(0.1)),
            },
            labels,
        )
        updates, _ = jax.eval_shape(split.update, grads, split.init(params), params, **extra)
        assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params), method.name


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_already_combined_gradient_is_named(name):
    params = _params()
    tx = optax.chain(mg.mtl_sum(), AGGREGATORS[name]())
    losses, grads = _task_grads(params, 0)
    with pytest.raises(ValueError, match="already-combined"):
        jax.eval_shape(tx.update, grads, tx.init(params), params, **_extra(name, losses))


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_zero_tasks_is_a_clear_error(name):
    params = {"w": jnp.zeros(2)}
    tx = AGGREGATORS[name]()
    state = tx.init(params)
    for p in (params, None):
        with pytest.raises(ValueError, match=r"updates have an empty leading task axis \(0 tasks"):
            jax.eval_shape(
                tx.update, {"w": jnp.zeros((0, 2))}, state, p, **_extra(name, jnp.zeros(0))
            )


# ---------------------------------------------------------------------------------------------
# One non-finite step under the documented guard: skipped without a trace.


def _run(tx, name, bad_step, skip, steps=7, poison=np.nan, poison_loss_only=False):
    """Trains `steps` steps; step `bad_step` is poisoned, or left out entirely if `skip`."""
    params = _params()
    state = tx.init(params)
    update = _jitted_update(tx)
    for i in range(steps):
        if i == bad_step and skip:
            continue
        bad = poison if i == bad_step else None
        losses, grads = _task_grads(params, i, None if poison_loss_only else bad)
        if poison_loss_only and bad is not None:
            losses = losses.at[1].set(bad)
        updates, state = update(grads, state, params, **_extra(name, losses))
        params = optax.apply_updates(params, updates)
        assert _finite(params) and _finite(state), (name, i)
    return params, state


_UPDATES = {}


def _jitted_update(tx):
    # One compiled update per transformation (the poisoned and the skipping run share it).
    return _UPDATES.setdefault(id(tx), jax.jit(tx.update))


GUARDED = {
    name: optax.chain(factory(), optax.apply_if_finite(optax.adam(0.05), MAX_ERRORS))
    for name, factory in AGGREGATORS.items()
}
GUARDED["recadam"] = optax.chain(
    mg.mtl_sum(),
    optax.apply_if_finite(mg.recadam(0.05, anneal_t0=2.0, pretrain_coef=1.0), MAX_ERRORS),
)


@pytest.mark.parametrize(
    "name, poison, loss_only",
    [(n, np.nan, False) for n in sorted(GUARDED)]
    + [("gradvac", np.inf, False), ("gradnorm", np.inf, False), ("gradnorm", np.nan, True)],
)
def test_nonfinite_step_under_guard_equals_skipping_it(name, poison, loss_only):
    tx = GUARDED[name]
    # The step must matter: at step 2 the aggregators' states have moved from their init.
    params, state = _run(tx, name, 2, skip=False, poison=poison, poison_loss_only=loss_only)
    params_ref, state_ref = _run(tx, name, 2, skip=True)
    assert int(state[1].total_notfinite) == 1  # the guard saw the step as non-finite
    got = (params, state[0], state[1].inner_state)
    expected = (params_ref, state_ref[0], state_ref[1].inner_state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, expected)


@pytest.mark.parametrize("name", ["pcgrad", "gradvac", "gradnorm"])
def test_aggregator_alone_keeps_state_and_passes_nonfinite_on(name):
    tx = AGGREGATORS[name]()
    update = jax.jit(tx.update)
    params = _params()
    losses, grads = _task_grads(params, 0)
    _, state = update(grads, tx.init(params), params, **_extra(name, losses))
    losses, grads = _task_grads(params, 1, np.nan)
    out, new_state = update(grads, state, params, **_extra(name, losses))
    assert not _finite(out)
    jax.tree.map(np.testing.assert_array_equal, new_state, state)


# ---------------------------------------------------------------------------------------------
# MultiSteps in the documented placement: after the aggregator.


@pytest.mark.parametrize("name", ["gradnorm"])  # stateful, with an extra argument to pass
def test_multisteps_after_aggregator_averages_combined_gradients(name):
    k, lr = 2, 0.1
    tx = optax.chain(AGGREGATORS[name](), optax.MultiSteps(optax.sgd(lr), k))
    agg = AGGREGATORS[name]()
    params, ref_params = _params(), _params()
    state, agg_state = tx.init(params), agg.init(params)
    tx_update, agg_update = jax.jit(tx.update), jax.jit(agg.update)
    acc = []
    for i in range(2 * k):
        losses, grads = _task_grads(params, i)
        updates, state = tx_update(grads, state, params, **_extra(name, losses))
        params = optax.apply_updates(params, updates)
        # Reference: the aggregator on every mini-batch at the params of the last real step, the
        # mean of the combined gradients applied every k-th call.
        losses, grads = _task_grads(ref_params, i)
        combined, agg_state = agg_update(grads, agg_state, ref_params, **_extra(name, losses))
        acc.append(combined)
        if len(acc) == k:
            mean = jax.tree.map(lambda *g: sum(g) / k, *acc)
            ref_params = jax.tree.map(lambda p, g: p - lr * g, ref_params, mean)
            acc = []
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), params, ref_params)
    assert not np.allclose(params["w"], _params()["w"])


# ---------------------------------------------------------------------------------------------
# GradNorm's weights stay positive when task gradient norms differ a lot.


def naive_positive_gradnorm(norms_seq, alpha, lr, mode, floor):
    """Chen et al. 2018 with equal losses, the weight step clipped or taken on log w."""
    num_tasks = len(norms_seq[0])
    w = np.ones(num_tasks)
    out = []
    for norms in norms_seq:
        big_g = w * norms
        grad = np.sign(big_g - big_g.mean() * 1.0**alpha) * norms
        if mode == "clip":
            w = np.maximum(w - lr * grad, floor)
        else:
            w = np.exp(np.log(w) - lr * w * grad)
        w = w * num_tasks / w.sum()
        out.append(w)
    return out


@pytest.mark.parametrize("mode", ["clip", "log"])
def test_gradnorm_weights_stay_positive_with_far_apart_norms(x64, mode):
    scales = np.array([100.0, 1.0, 0.01])
    grads = jnp.asarray(np.diag(scales))  # orthogonal task gradients, norms 100, 1, 0.01
    tx = mg.gradnorm(3, learning_rate=0.025, weight_update=mode, min_weight=1e-3)
    state = tx.init(jnp.zeros(3))
    update = jax.jit(tx.update)
    expected = naive_positive_gradnorm([scales] * 6, 1.5, 0.025, mode, 1e-3)
    for step in range(6):
        out, state = update(grads, state, losses=jnp.ones(3))
        np.testing.assert_allclose(state.weights, expected[step], rtol=1e-10)
        assert np.all(np.asarray(state.weights) > 0), state.weights
        np.testing.assert_allclose(jnp.sum(state.weights), 3.0, rtol=1e-12)
        # Descent on every task: <out, g_i> = w_i |g_i|^2 > 0.
        assert np.all(np.asarray(grads @ out) > 0), (step, out)


# ---------------------------------------------------------------------------------------------
# Hyper-parameters: concrete arrays are checked like numbers, injected ones can be changed.


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: mg.gradvac(2, beta=jnp.array(jnp.nan)), "beta must be finite"),
        (lambda: mg.gradvac(2, beta=jnp.array(2.0)), r"beta must be in \(0, 1\]"),
        (lambda: mg.gradvac(2, eps=np.array(-1.0)), "eps must be >= 0"),
        (lambda: mg.gradvac(2, beta=jnp.ones(2)), "beta must be a scalar"),
        (lambda: mg.gradnorm(2, alpha=jnp.array(-1.0)), "alpha must be >= 0"),
        (lambda: mg.gradnorm(2, learning_rate=jnp.array(0.0)), "learning_rate must be > 0"),
        (lambda: mg.gradnorm(2, min_weight=jnp.array(1.0)), r"min_weight must be in \(0, 1\)"),
        (lambda: mg.gradnorm(2, weight_update="exp"), "weight_update must be one of"),
        (lambda: mg.recadam(jnp.array(jnp.nan)), "learning_rate must be finite"),
        (lambda: mg.recadam(0.1, anneal_k=jnp.array(0.0)), "anneal_k must be > 0"),
        (lambda: mg.recadam(0.1, anneal_t0=jnp.array(jnp.inf)), "anneal_t0 must be finite"),
        (lambda: mg.recadam(0.1, pretrain_coef=jnp.array(-1.0)), "pretrain_coef must be >= 0"),
        (lambda: mg.recadam(0.1, b2=jnp.array(1.0)), r"b2 must be in \[0, 1\)"),
        (lambda: mg.recadam(0.1, b1=-0.1), r"b1 must be in \[0, 1\)"),
    ],
)
def test_array_hyperparameters_are_checked(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_num_tasks_array_names_static_args():
    with pytest.raises(TypeError, match=r"static_args=\('num_tasks',\)"):
        optax.inject_hyperparams(mg.gradvac)(num_tasks=3).init(jnp.zeros(2))


def test_integer_default_under_inject_hyperparams_names_static_args():
    # inject_hyperparams turns numeric defaults into arrays; a loop length must stay static.
    params = jnp.zeros(2)
    cases = [
        (lambda: optax.inject_hyperparams(mg.cagrad)(c=0.4), "max_iters"),
        (
            lambda: optax.inject_hyperparams(mg.nash_mtl, static_args=("num_tasks",))(num_tasks=3),
            "update_weights_every",
        ),
        (
            lambda: optax.inject_hyperparams(mg.dwa, static_args=("num_tasks",))(num_tasks=3),
            "period",
        ),
    ]
    for make, name in cases:
        with pytest.raises(TypeError, match=rf"^{name} must be an integer >= 1, got an array"):
            make().init(params)
        with pytest.raises(TypeError, match=rf"inject_hyperparams pass static_args=\('{name}',\)"):
            make().init(params)
    # With the fix it works.
    tx = optax.inject_hyperparams(mg.cagrad, static_args=("max_iters",))(c=0.4)
    assert tx.init(params).hyperparams["c"] == np.float32(0.4)


def test_traced_hyperparameter_passes_through():
    grads = jnp.array([[1.0, 0.0], [0.3, 1.0]])

    @jax.jit
    def run(beta):
        tx = mg.gradvac(2, beta=beta)
        return tx.update(grads, tx.init(jnp.zeros(2)))[1].target

    np.testing.assert_allclose(run(0.5), 2 * run(0.25), rtol=1e-6)  # targets start at 0


GRADVAC = {"num_tasks": 3, "beta": 0.7, "shuffle": False}
GRADNORM = {"num_tasks": 3, "learning_rate": 0.2}
RECADAM = {"learning_rate": 0.1, "anneal_k": 0.5, "anneal_t0": 2.0, "pretrain_coef": 1.0}
# name: (factory, base kwargs, static args, the hyper-parameter, its new value)
INJECTED = [
    ("gradvac", mg.gradvac, GRADVAC, ("num_tasks",), "beta", 0.2),
    ("gradvac", mg.gradvac, GRADVAC, ("num_tasks",), "eps", 5.0),
    ("gradnorm", mg.gradnorm, GRADNORM, ("num_tasks",), "alpha", 0.2),
    ("gradnorm", mg.gradnorm, GRADNORM, ("num_tasks",), "learning_rate", 0.05),
    ("gradnorm", mg.gradnorm, GRADNORM, ("num_tasks",), "min_weight", 0.5),
    ("recadam", mg.recadam, RECADAM, (), "learning_rate", 0.3),
    ("recadam", mg.recadam, RECADAM, (), "anneal_k", 3.0),
    ("recadam", mg.recadam, RECADAM, (), "anneal_t0", 0.0),
    ("recadam", mg.recadam, RECADAM, (), "pretrain_coef", 0.2),
    ("recadam", mg.recadam, RECADAM, (), "b1", 0.5),
    ("recadam", mg.recadam, RECADAM, (), "b2", 0.5),
    ("recadam", mg.recadam, RECADAM, (), "eps", 3.0),
]


@functools.cache
def _plain(factory, kwargs):
    return factory(**dict(kwargs))


@pytest.mark.parametrize(
    "kind, factory, kwargs, static, hp, value", INJECTED, ids=[f"{c[0]}-{c[4]}" for c in INJECTED]
)
def test_injected_hyperparameter_changes_like_construction(
    kind, factory, kwargs, static, hp, value
):
    injected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
    plain_new = factory(**{**kwargs, hp: value})
    plain_old = _plain(factory, tuple(sorted(kwargs.items())))  # one compiled update per kind
    params = jnp.array([0.5, -1.0])
    si = injected.init(params)
    si.hyperparams[hp] = jnp.asarray(value, si.hyperparams[hp].dtype)
    sn, so = plain_new.init(params), plain_old.init(params)
    update_i, update_n = jax.jit(injected.update), jax.jit(plain_new.update)
    update_o = jax.jit(plain_old.update)
    differs = False
    for i in range(3):
        if kind == "recadam":
            g = jax.random.normal(jax.random.key(i), (2,))
        else:  # task gradient norms far apart, so that gradnorm's min_weight binds
            g = jax.random.normal(jax.random.key(i), (3, 2)) * jnp.array([[30.0], [1.0], [0.1]])
        losses = jnp.array([1.0, 2.0, 3.0]) * jnp.array([0.9, 0.5, 0.99]) ** i
        extra = {"losses": losses} if kind == "gradnorm" else {}
        ui, si = update_i(g, si, params, **extra)
        un, sn = update_n(g, sn, params, **extra)
        uo, so = update_o(g, so, params, **extra)
        np.testing.assert_allclose(ui, un, rtol=1e-5)
        differs |= not np.allclose(un, uo, rtol=1e-4)
        params = params - 0.05 * ui
    assert differs, f"changing {hp} to {value} made no difference: the test would not see it"
