"""Tests for the loss-weighting methods: uncertainty_weighting, dwa, rlw, famo, db_mtl.

Each method against a NumPy transcription of its paper's update (written from the paper's
equations and the authors' / LibMTL's code, sharing nothing with the implementation), over
several steps on a two-leaf tree; the contract of `losses=`; bad input. The optax contract
(jit, vmap, chain, guards, inject_hyperparams, dtypes, devices) is the conformance battery's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg

T = 3
STEPS = 6


def _problem(seed=0):
    """Per-task gradients (a two-leaf tree) and positive losses for STEPS steps, float64."""
    rng = np.random.default_rng(seed)
    scale = np.array([1.0, 4.0, 0.3])[:, None]  # unequal gradient norms
    grads, losses = [], []
    for step in range(STEPS):
        flat = rng.normal(size=(T, 7)) * scale
        grads.append(flat)
        losses.append(np.array([2.0, 1.0, 3.0]) * np.array([0.9, 0.97, 0.8]) ** step
                      * rng.uniform(0.9, 1.1, size=T))  # fmt: skip
    return grads, losses


def _tree(flat):
    return {"a": jnp.asarray(flat[:, :3]), "b": jnp.asarray(flat[:, 3:].reshape(T, 2, 2))}


def _flat(tree):
    return np.concatenate([np.asarray(tree["a"]).ravel(), np.asarray(tree["b"]).ravel()])


PARAMS = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}


def _run(tx, grads, losses):
    """The outputs (flat) and the states of the method over the steps (eager calls)."""
    state = tx.init(jax.tree.map(lambda p: p.astype(jnp.float64), PARAMS))
    outs, states = [], []
    for g, loss in zip(grads, losses, strict=True):
        out, state = tx.update(_tree(g), state, losses=jnp.asarray(loss))
        outs.append(_flat(out))
        states.append(state)
    return outs, states


def _softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


# -- NumPy transcriptions ----------------------------------------------------------------------


def ref_uncertainty(grads, losses, lr, s0):
    # Kendall et al. eq. 7 with s = log sigma^2: sum_i exp(-s_i) L_i / 2 + s_i / 2, one SGD
    # step on (theta, s) jointly from the same point.
    s = np.full(T, s0)
    outs, logs = [], []
    for g, l in zip(grads, losses, strict=True):  # noqa: E741 (l: the losses, as in the papers)
        outs.append(sum(0.5 * np.exp(-s[i]) * g[i] for i in range(T)))
        s = s - lr * (0.5 - 0.5 * np.exp(-s) * l)
        logs.append(s.copy())
    return outs, logs


def ref_dwa(grads, losses, temperature, period):
    # Liu et al. eq. 1 on period means: w(t) = T softmax(L(t-1) / L(t-2) / temp), 1 for t < 2.
    means, current, outs = [], [], []
    for g, l in zip(grads, losses, strict=True):  # noqa: E741 (l: the losses, as in the papers)
        if len(means) >= 2:
            w = T * _softmax(means[-1] / means[-2] / temperature)
        else:
            w = np.ones(T)
        outs.append(w @ g)
        current.append(l)
        if len(current) == period:
            means.append(np.mean(current, axis=0))
            current = []
    return outs


def ref_famo(grads, losses, beta, gamma):
    # FAMO Algorithm 1 with SGD on the logits; the "after" losses of step t are those the next
    # call brings.
    xi = np.zeros(T)
    prev = None
    outs, logits = [], []
    for g, l in zip(grads, losses, strict=True):  # noqa: E741 (l: the losses, as in the papers)
        if prev is not None:
            delta = np.log(prev) - np.log(l)
            z = _softmax(xi)
            jac = np.diag(z) - np.outer(z, z)  # d softmax / d xi (symmetric)
            xi = xi - beta * (jac.T @ delta + gamma * xi)
        z = _softmax(xi)
        c = 1.0 / np.sum(z / l)
        outs.append(sum(c * z[i] / l[i] * g[i] for i in range(T)))
        logits.append(xi.copy())
        prev = l
    return outs, logits


def ref_db_mtl(grads, losses, beta, sigma):
    # LibMTL's DB_MTL: buffer = g + beta_t (buffer - g), g the log-loss gradients; rescale each
    # task's buffer to the largest norm, then sum.
    buf = np.zeros((T, grads[0].shape[1]))
    outs = []
    for t, (g, l) in enumerate(zip(grads, losses, strict=True), start=1):  # noqa: E741
        log_grads = g / l[:, None]
        beta_t = beta / t**sigma
        buf = log_grads + beta_t * (buf - log_grads)
        norms = np.linalg.norm(buf, axis=1)
        outs.append(sum(norms.max() / norms[i] * buf[i] for i in range(T)))
    return outs


# -- against the transcriptions ----------------------------------------------------------------


@pytest.mark.parametrize("lr, s0", [(0.1, 0.0), (0.3, -0.5)])
def test_uncertainty_weighting_matches_numpy(x64, lr, s0):
    grads, losses = _problem()
    outs, states = _run(mg.uncertainty_weighting(T, learning_rate=lr, init_log_var=s0),
                        grads, losses)  # fmt: skip
    ref_outs, ref_logs = ref_uncertainty(grads, losses, lr, s0)
    np.testing.assert_allclose(outs, ref_outs, rtol=1e-12)
    np.testing.assert_allclose([s.log_vars for s in states], ref_logs, rtol=1e-12)


def test_uncertainty_weighting_reaches_inverse_loss_weights(x64):
    # At the fixed point exp(s_i) = L_i: the weights 1/(2 sigma^2) become 1 / (2 L_i).
    tx = mg.uncertainty_weighting(2, learning_rate=optax.adam(0.05))
    losses = jnp.array([4.0, 0.25])
    g = jnp.eye(2)

    def step(state, _):
        return tx.update(g, state, losses=losses)[1], None

    state, _ = jax.lax.scan(step, tx.init(jnp.zeros(2)), None, length=2000)
    out, _ = tx.update(g, state, losses=losses)
    np.testing.assert_allclose(out, 0.5 / losses, rtol=1e-3)


@pytest.mark.parametrize("temperature, period", [(2.0, 1), (0.5, 2)])
def test_dwa_matches_numpy(x64, temperature, period):
    grads, losses = _problem(1)
    outs, _ = _run(mg.dwa(T, temperature=temperature, period=period), grads, losses)
    np.testing.assert_allclose(outs, ref_dwa(grads, losses, temperature, period), rtol=1e-12)


def test_dwa_mean_reduction_divides_by_num_tasks(x64):
    grads, losses = _problem(2)
    total, _ = _run(mg.dwa(T), grads, losses)
    mean, _ = _run(mg.dwa(T, reduction="mean"), grads, losses)
    np.testing.assert_allclose(np.array(mean) * T, total, rtol=1e-12)


@pytest.mark.parametrize("beta, gamma", [(0.5, 1e-3), (2.0, 0.1)])
def test_famo_matches_numpy(x64, beta, gamma):
    grads, losses = _problem(3)
    outs, states = _run(mg.famo(T, learning_rate=beta, weight_decay=gamma), grads, losses)
    ref_outs, ref_logits = ref_famo(grads, losses, beta, gamma)
    np.testing.assert_allclose(outs, ref_outs, rtol=1e-12)
    np.testing.assert_allclose([s.logits for s in states], ref_logits, rtol=1e-12, atol=1e-15)
    # The logits did move (a test that cannot pass with frozen weights).
    assert np.ptp(ref_logits[-1]) > 1e-3


def test_famo_sum_reduction_and_adam_optimizer(x64):
    grads, losses = _problem(4)
    mean, _ = _run(mg.famo(T, learning_rate=optax.adam(0.1)), grads, losses)
    total, states = _run(mg.famo(T, learning_rate=optax.adam(0.1), reduction="sum"), grads,
                         losses)  # fmt: skip
    np.testing.assert_allclose(np.array(mean) * T, total, rtol=1e-12)
    # Adam's first step has size ~lr per coordinate whatever the gradient's scale.
    assert np.max(np.abs(np.asarray(states[1].logits))) > 0.05


@pytest.mark.parametrize("beta, sigma", [(0.9, 0.0), (0.5, 0.5), (0.0, 0.0)])
def test_db_mtl_matches_numpy(x64, beta, sigma):
    grads, losses = _problem(5)
    outs, _ = _run(mg.db_mtl(T, beta=beta, beta_sigma=sigma), grads, losses)
    np.testing.assert_allclose(outs, ref_db_mtl(grads, losses, beta, sigma), rtol=1e-11)


def test_db_mtl_balances_gradient_magnitudes(x64):
    # With beta = 0 every task's log-loss gradient is rescaled to the largest norm.
    grads, losses = _problem(6)
    tx = mg.db_mtl(T, beta=0.0)
    g = jnp.asarray(grads[0])
    out, _ = tx.update(g, tx.init(jnp.zeros(7)), losses=jnp.asarray(losses[0]))
    coef = np.linalg.lstsq(grads[0].T, np.asarray(out), rcond=None)[0]
    scaled = np.linalg.norm(coef[:, None] * grads[0], axis=1)
    np.testing.assert_allclose(scaled, scaled.max(), rtol=1e-10)


def test_rlw_draws_softmax_of_standard_normal(x64):
    # LibMTL's RLW: lambda = softmax(eps), eps ~ N(0, I), from the key split off the state's.
    tx = mg.rlw(seed=3)
    state = tx.init(jnp.zeros(T))
    key = jax.random.PRNGKey(3)
    for _ in range(3):
        out, state = tx.update(jnp.eye(T), state)
        key, sub = jax.random.split(key)
        eps = np.asarray(jax.random.normal(sub, (T,), jnp.float32), np.float64)
        np.testing.assert_allclose(out, _softmax(eps), rtol=1e-6)


@pytest.mark.parametrize("distribution", ["normal", "uniform", "dirichlet"])
def test_rlw_weight_distribution(distribution):
    # 4000 draws: on the simplex, and the spread each distribution implies.
    tx = mg.rlw(seed=0, distribution=distribution, reduction="sum")

    def step(state, _):
        out, state = tx.update(jnp.eye(T), state)
        return state, out

    _, lam = jax.lax.scan(step, tx.init(jnp.zeros(T)), None, length=4000)
    lam = np.asarray(lam, np.float64) / T
    np.testing.assert_allclose(lam.sum(1), 1.0, rtol=1e-5)
    assert np.all(lam > 0)
    np.testing.assert_allclose(lam.mean(0), 1 / T, atol=0.02)  # ~6 standard errors
    if distribution == "dirichlet":
        np.testing.assert_allclose(lam.var(0), (T - 1) / (T**2 * (T + 1)), rtol=0.1)
    else:
        # log(lambda_0 / lambda_1) = eps_0 - eps_1: variance 2 (normal) or 1/6 (uniform).
        expected = 2.0 if distribution == "normal" else 1.0 / 6.0
        np.testing.assert_allclose(np.var(np.log(lam[:, 0] / lam[:, 1])), expected, rtol=0.1)


def test_rlw_seeds():
    g = jnp.eye(T)
    draw = lambda seed: mg.rlw(seed=seed).update(g, mg.rlw(seed=seed).init(jnp.zeros(T)))[0]
    np.testing.assert_array_equal(draw(1), draw(1))
    assert not np.allclose(draw(1), draw(2))
    np.testing.assert_array_equal(draw(jax.random.key(5)), draw(5))


# -- losses: traced invalid values, non-finite steps ------------------------------------------

LOG_BASED = {
    "uncertainty_weighting": lambda: mg.uncertainty_weighting(T),
    "dwa": lambda: mg.dwa(T),
    "famo": lambda: mg.famo(T),
    "db_mtl": lambda: mg.db_mtl(T),
}


@pytest.mark.parametrize("name", sorted(LOG_BASED))
@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_invalid_traced_losses_give_nonfinite_update_and_keep_state(name, bad):
    # Under jit the values cannot raise: the update is non-finite (for optax.apply_if_finite to
    # skip) and the state is the one before the step.
    tx = LOG_BASED[name]()
    grads, losses = _problem(7)
    g = _tree(grads[0]).copy()
    g = jax.tree.map(lambda x: x.astype(jnp.float32), g)
    state = tx.init(PARAMS)
    _, state = tx.update(g, state, losses=jnp.asarray(losses[0], jnp.float32))
    poisoned = jnp.asarray(losses[1], jnp.float32).at[1].set(bad)
    out, new_state = jax.jit(tx.update)(g, state, losses=poisoned)
    assert not np.all(np.isfinite(_flat(out)))
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_rlw_nonfinite_losses_make_update_nonfinite():
    tx = mg.rlw()
    state = tx.init(jnp.zeros(T))
    out, new_state = tx.update(jnp.eye(T), state, losses=jnp.array([1.0, jnp.inf, 1.0]))
    assert not np.all(np.isfinite(out))
    np.testing.assert_array_equal(new_state.key, state.key)


# -- bad input ---------------------------------------------------------------------------------


def _update(tx, losses, tasks=T):
    return tx.update(jnp.ones((tasks, 4)), tx.init(jnp.zeros(4)), losses=losses)


BAD = [
    ("uw/num_tasks", lambda: mg.uncertainty_weighting(2.5), TypeError, r"num_tasks must be"),
    ("uw/learning_rate", lambda: mg.uncertainty_weighting(T, learning_rate=0.0), ValueError,
     r"learning_rate must be > 0"),
    ("uw/init_log_var", lambda: mg.uncertainty_weighting(T, init_log_var=float("inf")),
     ValueError, r"init_log_var must be finite"),
    ("uw/negative-losses", lambda: _update(mg.uncertainty_weighting(T), jnp.array([1.0, -1, 1])),
     ValueError, r"losses must be >= 0 for uncertainty_weighting"),
    ("uw/no-losses", lambda: _update(mg.uncertainty_weighting(T), None), ValueError,
     r"uncertainty_weighting needs the per-task losses"),
    ("dwa/temperature", lambda: mg.dwa(T, temperature=0.0), ValueError,
     r"temperature must be > 0"),
    ("dwa/period", lambda: mg.dwa(T, period=0), ValueError, r"period must be an integer >= 1"),
    ("dwa/reduction", lambda: mg.dwa(T, reduction="max"), ValueError,
     r"reduction must be one of"),
    ("dwa/zero-loss", lambda: _update(mg.dwa(T), jnp.array([1.0, 0.0, 1.0])), ValueError,
     r"losses must be > 0 for dwa"),
    ("dwa/losses-shape", lambda: _update(mg.dwa(T), jnp.ones(2)), ValueError,
     r"losses must have shape \(3,\)"),
    ("dwa/num-tasks", lambda: _update(mg.dwa(T), jnp.ones(T), tasks=2), ValueError,
     r"updates have 2 tasks on their leading task axis but num_tasks=3"),
    ("rlw/distribution", lambda: mg.rlw(distribution="bernoulli"), ValueError,
     r"distribution must be one of \('normal', 'uniform', 'dirichlet'\)"),
    ("rlw/seed", lambda: mg.rlw(seed="a"), TypeError, r"seed must be an int or a jax.random key"),
    ("rlw/positional", lambda: mg.rlw(0), TypeError, r"positional argument"),
    ("rlw/losses-shape", lambda: _update(mg.rlw(), jnp.ones(4)), ValueError,
     r"losses must have shape \(3,\)"),
    ("famo/weight_decay", lambda: mg.famo(T, weight_decay=-1.0), ValueError,
     r"weight_decay must be >= 0"),
    ("famo/learning_rate", lambda: mg.famo(T, learning_rate="fast"), TypeError,
     r"learning_rate must be a number"),
    ("famo/negative-loss", lambda: _update(mg.famo(T), jnp.array([1.0, 2.0, -0.5])), ValueError,
     r"losses must be > 0 for famo"),
    ("famo/no-losses", lambda: _update(mg.famo(T), None), ValueError,
     r"famo needs the per-task losses"),
    ("db_mtl/beta", lambda: mg.db_mtl(T, beta=1.0), ValueError, r"beta must be in \[0, 1\)"),
    ("db_mtl/beta_sigma", lambda: mg.db_mtl(T, beta_sigma=-0.5), ValueError,
     r"beta_sigma must be >= 0"),
    ("db_mtl/zero-loss", lambda: _update(mg.db_mtl(T), jnp.zeros(T)), ValueError,
     r"losses must be > 0 for db_mtl"),
    ("db_mtl/structure", lambda: mg.db_mtl(T).update({"x": jnp.ones((T, 4))},
                                                     mg.db_mtl(T).init(jnp.zeros(4)),
                                                     losses=jnp.ones(T)),
     ValueError, r"updates must have the tree structure of the params given to init"),
]  # fmt: skip


@pytest.mark.parametrize("call, error, match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
