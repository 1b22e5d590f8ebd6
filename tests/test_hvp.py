"""Tests of metagrad/hvp.py: exact and finite-difference Hessian-vector products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import metagrad as mg


def _init(key, sizes, dtype):
    params = []
    keys = jax.random.split(key, len(sizes) - 1)
    for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:], strict=True):
        w = jax.random.normal(k, (n_in, n_out), dtype) / np.sqrt(n_in)
        params.append({"w": w, "b": jnp.full((n_out,), 0.1, dtype)})
    return params


def _apply(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def _loss(params, batch):
    x, y = batch
    return jnp.mean((_apply(params, x) - y) ** 2)


def tanh_problem(dtype, seed=0, sizes=(4, 32, 32, 2), batch=16):
    """A tanh MLP, two batches; returns params, g1 = ∇L(θ; b1) and grad_fn = ∇L(·; b2)."""
    k = jax.random.split(jax.random.key(seed), 5)
    params = _init(k[0], sizes, dtype)
    b1 = (
        jax.random.normal(k[1], (batch, sizes[0]), dtype),
        jax.random.normal(k[2], (batch, sizes[-1]), dtype),
    )
    b2 = (
        jax.random.normal(k[3], (batch, sizes[0]), dtype),
        jax.random.normal(k[4], (batch, sizes[-1]), dtype),
    )
    # Jitted, so that the eager tests compile the network's gradient once.
    grad = jax.jit(jax.grad(_loss))
    return params, grad(params, b1), lambda p: grad(p, b2)


def rel_err(approx, exact):
    a = np.asarray(ravel_pytree(approx)[0], np.float64)
    e = np.asarray(ravel_pytree(exact)[0], np.float64)
    return np.linalg.norm(a - e) / np.linalg.norm(e)


def neg(tree):
    return jax.tree.map(jnp.negative, tree)


def test_hvp_matches_dense_hessian(x64):
    params, g1, grad_fn = tanh_problem(jnp.float64, sizes=(3, 5, 2))
    flat, unravel = ravel_pytree(params)
    dense = jax.jacfwd(lambda f: ravel_pytree(grad_fn(unravel(f)))[0])(flat)
    v_flat = ravel_pytree(g1)[0]
    got = ravel_pytree(mg.hvp(grad_fn, params, g1))[0]
    np.testing.assert_allclose(got, dense @ v_flat, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_fd_float64_paper_alpha(x64, scheme):
    # The paper's α = 1e-7 is accurate in float64: term vs −H̄2·Ḡ1.
    params, g1, grad_fn = tanh_problem(jnp.float64)
    exact = neg(mg.hvp(grad_fn, params, g1))
    approx = mg.fd_hvp(grad_fn, params, neg(g1), step=1e-7, scheme=scheme)
    assert rel_err(approx, exact) <= 1e-5


@pytest.mark.parametrize("scheme, tol", [("forward", 5e-3), ("central", 5e-4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fd_float32_auto_step(scheme, tol, seed):
    params, g1, grad_fn = tanh_problem(jnp.float32, seed=seed)
    exact = neg(mg.hvp(grad_fn, params, g1))
    approx = mg.fd_hvp(grad_fn, params, neg(g1), scheme=scheme)
    assert rel_err(approx, exact) <= tol


def test_fd_float32_paper_alpha_is_inaccurate():
    # Documents the numerical warning of SPEC section 1: in float32 α = 1e-7 is
    # below the resolution of the weights and the finite difference is noise,
    # more than 30x worse than the automatic step.
    params, g1, grad_fn = tanh_problem(jnp.float32)
    exact = neg(mg.hvp(grad_fn, params, g1))
    paper = rel_err(mg.fd_hvp(grad_fn, params, neg(g1), step=1e-7), exact)
    auto = rel_err(mg.fd_hvp(grad_fn, params, neg(g1)), exact)
    assert paper > 0.1
    assert paper > 30 * auto


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("step", [None, 0.5])
def test_fd_exact_on_quadratic(x64, dtype, scheme, step):
    # L(θ) = ½ θᵀAθ + bᵀθ has no truncation error: any step gives A v up to the
    # round-off of the difference, eps·|Aθ|/h relative for a move of size h.
    k = jax.random.split(jax.random.key(3), 4)
    m = jax.random.normal(k[0], (6, 6), dtype)
    a = m @ m.T + jnp.eye(6, dtype=dtype)
    b = jax.random.normal(k[1], (6,), dtype)
    grad_fn = jax.grad(lambda p: 0.5 * p["x"] @ a @ p["x"] + b @ p["x"])
    params = {"x": jax.random.normal(k[2], (6,), dtype)}
    v = {"x": jax.random.normal(k[3], (6,), dtype)}
    eps = float(jnp.finfo(dtype).eps)
    if step is None:
        rtol = 30 * eps ** (0.5 if scheme == "forward" else 2 / 3)
    else:
        rtol = 300 * eps
    got = mg.fd_hvp(grad_fn, params, v, step=step, scheme=scheme)
    want = np.asarray(a, np.float64) @ np.asarray(v["x"], np.float64)
    np.testing.assert_allclose(got["x"], want, rtol=rtol, atol=rtol * np.abs(want).max())
    np.testing.assert_allclose(mg.hvp(grad_fn, params, v)["x"], want, rtol=300 * eps)


@pytest.mark.parametrize("scheme, power", [("forward", 1 / 2), ("central", 1 / 3)])
def test_fd_step_formula(scheme, power):
    params = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[0.0]])}  # ||θ|| = 5
    v = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([[-2.0]])}  # ||v|| = √5
    eps = np.finfo(np.float32).eps
    want = (eps * 6.0) ** power / np.sqrt(5.0)
    np.testing.assert_allclose(mg.fd_step(params, v, scheme), want, rtol=1e-6)


def test_fd_step_uses_coarsest_dtype():
    params = {"a": jnp.ones(2, jnp.float32), "b": jnp.ones(2, jnp.bfloat16)}
    v = jax.tree.map(jnp.ones_like, params)
    eps = float(jnp.finfo(jnp.bfloat16).eps)
    norm = float(jnp.sqrt(4.0))
    np.testing.assert_allclose(mg.fd_step(params, v), np.sqrt(eps * (1 + norm)) / norm, rtol=1e-2)


@pytest.mark.parametrize("factor", [1e3, 1e25, 1e-25])
def test_fd_step_scale_invariant_in_v(factor):
    # The move α·||v|| does not depend on ||v||, even where ||v||² over- or
    # underflows in float32.
    params, g1, _ = tanh_problem(jnp.float32)
    a1 = mg.fd_step(params, g1)
    a2 = mg.fd_step(params, jax.tree.map(lambda u: u * np.float32(factor), g1))
    np.testing.assert_allclose(a1, factor * a2, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_zero_direction_gives_zeros(scheme):
    params, _, grad_fn = tanh_problem(jnp.float32)
    zeros = jax.tree.map(jnp.zeros_like, params)
    step = mg.fd_step(params, zeros, scheme)
    assert np.isfinite(step) and step > 0
    out = mg.fd_hvp(grad_fn, params, zeros, scheme=scheme)
    for leaf in jax.tree.leaves(out):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


def test_fd_hvp_jit():
    params, g1, grad_fn = tanh_problem(jnp.float32)
    f = jax.jit(lambda p, v: mg.fd_hvp(grad_fn, p, v, scheme="central"))
    got = ravel_pytree(f(params, g1))[0]
    want = ravel_pytree(mg.fd_hvp(grad_fn, params, g1, scheme="central"))[0]
    # jit and eager round differently; the difference quotient scales that by 1/h.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_nonfinite_propagates():
    params, g1, grad_fn = tanh_problem(jnp.float32)
    bad = lambda p: jax.tree.map(lambda g: g * jnp.nan, grad_fn(p))
    assert not np.all(np.isfinite(ravel_pytree(mg.fd_hvp(bad, params, g1))[0]))
    g1_nan = jax.tree.map(lambda g: g.at[0].set(jnp.nan), g1)
    assert not np.all(np.isfinite(ravel_pytree(mg.fd_hvp(grad_fn, params, g1_nan))[0]))


def test_errors():
    params, g1, grad_fn = tanh_problem(jnp.float32, sizes=(2, 3, 1))
    with pytest.raises(ValueError, match="scheme"):
        mg.fd_hvp(grad_fn, params, g1, scheme="backward")
    with pytest.raises(ValueError, match="scheme"):
        mg.fd_step(params, g1, scheme="exact")
    with pytest.raises(ValueError, match="step"):
        mg.fd_hvp(grad_fn, params, g1, step=0.0)
    with pytest.raises(ValueError, match="step"):
        mg.fd_hvp(grad_fn, params, g1, step=float("nan"))
    with pytest.raises(ValueError, match="^v "):
        mg.fd_hvp(grad_fn, params, g1[:1])
    with pytest.raises(ValueError, match="^v "):
        mg.hvp(grad_fn, params, g1[:1])
    with pytest.raises(TypeError, match="grad_fn"):
        mg.hvp("not a function", params, g1)
    wrong = lambda p: grad_fn(p)[0]
    with pytest.raises(ValueError, match="grad_fn"):
        mg.fd_hvp(wrong, params, g1)
    with pytest.raises(ValueError, match="grad_fn"):
        mg.hvp(wrong, params, g1)
    with pytest.raises(TypeError, match="params"):
        mg.fd_step({"i": jnp.arange(3)}, {"i": jnp.arange(3)})
