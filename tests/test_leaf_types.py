"""dotprod and reptile_outer on the leaf types optax accepts: Python floats, None, dtypes.

The problem is a separable quadratic L(p; b) = ½ Σ b·p², whose gradient b·p and Hessian
diag(b) give every update in closed form, computed here in NumPy float64 from plain Python
numbers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg

B1 = {"w": 1.5, "v": np.array([0.5, 2.0, 1.0])}
B2 = {"w": 0.8, "v": np.array([1.2, 0.3, 2.5])}
RTOL = {jnp.bfloat16: 2e-2, jnp.float32: 1e-5, jnp.float64: 1e-9}
FD_ATOL = {jnp.bfloat16: 2e-2, jnp.float32: 3e-3, jnp.float64: 1e-7}


def make_params(dtype):
    # A Python-float leaf, an array leaf of `dtype` and a None leaf, as optax allows.
    return {"w": 0.3, "v": jnp.array([1.0, -2.0, 0.5], dtype), "n": None}


def grad(params, b):
    # Python float times a Python float stays a Python float at the first call.
    v = params["v"]
    return {"w": b["w"] * params["w"], "v": jnp.asarray(b["v"], v.dtype) * v, "n": None}


def as_np(tree):
    return {k: np.asarray(tree[k], np.float64) for k in ("w", "v")}


@pytest.fixture(params=[jnp.bfloat16, jnp.float32, jnp.float64], ids=lambda d: d.__name__)
def dtype(request):
    if request.param == jnp.float64:
        jax.config.update("jax_enable_x64", True)
        yield request.param
        jax.config.update("jax_enable_x64", False)
    else:
        yield request.param


@pytest.mark.parametrize("scheme", ["forward", "central", "exact"])
@pytest.mark.parametrize("mask", [None, {"w": True, "v": False, "n": False}], ids=["all", "w"])
def test_dotprod_python_float_and_none_leaves(dtype, scheme, mask):
    params = make_params(dtype)
    weight = 0.25
    masking = {} if mask is None else {"mask": mask}
    tx = optax.chain(mg.dotprod(weight=weight, scheme=scheme, every=3, **masking), optax.sgd(1.0))
    state = tx.init(params)
    update = lambda g, s, p: tx.update(g, s, p, grad_fn=lambda q: grad(q, B2))
    p = as_np(params)
    # The first call eagerly, where the leaves are Python floats (under jit they would be
    # tracers already), the second jitted.
    for call, step in enumerate([update, jax.jit(update)]):
        g1 = grad(params, B1)
        u, state = step(g1, state, params)
        assert u["n"] is None
        assert u["v"].dtype == dtype and u["w"].dtype == jnp.asarray(0.3).dtype
        for k in ("w", "v"):
            # Closed form: G = Ḡ1 + Ḡ2 − weight·H̄2·Ḡ1 = (b1 + b2 − weight·b2·b1)·p on the
            # regularized call (every=3: the first) and leaves, Ḡ1 = b1·p on the standard
            # call; the update is −G.
            regularized = call == 0 and (mask is None or mask[k])
            g = (B1[k] + B2[k] - (weight * B2[k] * B1[k] if regularized else 0)) * p[k]
            g = g if call == 0 else B1[k] * p[k]
            # The finite difference's round-off is about sqrt(eps) of the gradients (~1).
            atol = 0 if scheme == "exact" else FD_ATOL[dtype]
            np.testing.assert_allclose(u[k], -g, rtol=RTOL[dtype], atol=atol)


@pytest.mark.parametrize("outer", ["float", "adam"])
def test_reptile_outer_python_float_and_none_leaves(dtype, outer):
    params = make_params(dtype)
    lr, eta, steps = 0.1, 0.5, 2
    outer_lr = eta if outer == "float" else optax.sgd(eta)  # the lax.cond path, same maths
    tx = mg.reptile_outer(optax.sgd(lr), steps, outer_lr)
    state = tx.init(params)
    jitted = jax.jit(tx.update)
    phi = as_np(params)
    # Two outer cycles from Python-float params: the first eagerly (under jit the leaves
    # would be tracers already), the second jitted.
    for step in (tx.update, jitted):
        theta = dict(phi)
        for _ in range(steps):
            u, state = step(grad(params, B1), state, params)
            assert u["n"] is None and u["v"].dtype == dtype
            params = optax.apply_updates(params, u)
            theta = {k: theta[k] - lr * B1[k] * theta[k] for k in theta}
        # Naive Reptile: φ ← φ − η(φ − θ_K), and the params return to φ.
        phi = {k: phi[k] - eta * (phi[k] - theta[k]) for k in phi}
        for k in ("w", "v"):
            np.testing.assert_allclose(params[k], phi[k], rtol=RTOL[dtype])
            np.testing.assert_allclose(state.outer_params[k], phi[k], rtol=RTOL[dtype])
        assert params["n"] is None and state.outer_params["n"] is None
    assert jitted._cache_size() == 1
