"""Tests of `mg.dotprod(mask=...)`: regularizing a subset of the parameters.

The reference shares no code with metagrad: the exact Hessian-vector product by `jax.jvp`
along Ḡ1 restricted to the selected leaves, and optax's own optimizers by hand.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import metagrad as mg
from tests.test_hvp import tanh_problem

# tanh_problem's params are a list of layers {"w", "b"}: a prefix-tree mask that leaves
# the first layer (the "embedding") and the middle bias out of the regularizer.
MASK = [False, {"w": True, "b": False}, True]
SIZES = (4, 8, 8, 2)


def leaf_flags(params):
    per_leaf = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), MASK, params)
    return jax.tree.leaves(per_leaf)


def update(tx, g1, params, grad_fn):
    return tx.update(g1, tx.init(params), params, grad_fn=grad_fn)[0]


@functools.cache
def problem(dtype):
    """One toy problem per dtype for the whole module: its gradient compiles once."""
    return tanh_problem(dtype, sizes=SIZES)


def reference(g1, grad_fn, params, weight):
    """Ḡ1 + Ḡ2 − weight·(H̄2 v) on the selected leaves, v = Ḡ1 there and 0 elsewhere."""
    flags = leaf_flags(params)
    treedef = jax.tree.structure(params)
    g1_leaves = jax.tree.leaves(g1)
    v = [g if f else jnp.zeros_like(g) for g, f in zip(g1_leaves, flags, strict=True)]
    g2, hv = jax.jvp(grad_fn, (params,), (jax.tree.unflatten(treedef, v),))
    out = []
    for a, b, h, f in zip(g1_leaves, jax.tree.leaves(g2), jax.tree.leaves(hv), flags, strict=True):
        out.append(np.asarray(a + b - weight * h) if f else np.asarray(a + b))
    return out, flags


@pytest.mark.parametrize("scheme, rtol", [("forward", 1e-6), ("central", 1e-8), ("exact", 1e-12)])
def test_mask_regularizes_selected_leaves_only(x64, scheme, rtol):
    params, g1, grad_fn = problem(jnp.float64)
    weight = 0.5
    got = update(mg.dotprod(weight=weight, scheme=scheme, mask=MASK), g1, params, grad_fn)
    want, flags = reference(g1, grad_fn, params, weight)
    assert 0 < sum(flags) < len(flags)
    for g, w, f in zip(jax.tree.leaves(got), want, flags, strict=True):
        if f:
            np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max())
        else:
            np.testing.assert_array_equal(g, w)  # the plain sum Ḡ1 + Ḡ2, bit for bit

    # The test can tell the two readings of "mask" apart: dropping the term of the
    # unmasked update on the other leaves (−(H̄2 Ḡ1)[S], cross terms included) differs.
    unmasked = update(mg.dotprod(weight=weight, scheme="exact"), g1, params, grad_fn)
    sel = [np.asarray(u) for u, f in zip(jax.tree.leaves(unmasked), flags, strict=True) if f]
    ref = [w for w, f in zip(want, flags, strict=True) if f]
    assert max(np.abs(a - b).max() for a, b in zip(sel, ref, strict=True)) > 1e-3


def test_mask_forms_agree():
    params, g1, grad_fn = problem(jnp.float32)

    def run(**kw):
        return update(mg.dotprod(**kw), g1, params, grad_fn)

    # A callable of the params (weights only, as one often excludes biases) equals the tree.
    is_weight = lambda p: jax.tree.map(lambda x: x.ndim == 2, p)
    by_tree = run(mask=[{"w": True, "b": False} for _ in params])
    np.testing.assert_array_equal(
        ravel_pytree(run(mask=is_weight))[0],
        ravel_pytree(by_tree)[0],
    )
    # Selecting every leaf is no mask at all.
    np.testing.assert_array_equal(
        ravel_pytree(run(mask=True))[0],
        ravel_pytree(run())[0],
    )


@pytest.mark.parametrize(
    "wrap",
    [
        lambda tx: optax.masked(tx, MASK),
        lambda tx: optax.multi_transform({"a": tx, "b": optax.sgd(0.1)}, ["b", "a", "a"]),
    ],
    ids=["masked", "multi_transform"],
)
def test_inside_optax_masked_raises_pointing_to_mask(wrap):
    params, g1, grad_fn = problem(jnp.float32)
    with pytest.raises(ValueError, match=r"optax\.masked.*pass mask= to dotprod"):
        wrap(mg.dotprod()).init(params)
    # The same error at update time, e.g. for a state built some other way.
    masked_params = jax.tree.map(lambda m, p: p if m else optax.MaskedNode(), MASK, params)
    with pytest.raises(ValueError, match=r"pass mask= to dotprod"):
        mg.dotprod().update(masked_params, mg.dotprod().init(params), masked_params,
                            grad_fn=grad_fn)  # fmt: skip


def test_mask_then_multi_transform_every_3_under_jit():
    # The documented way to treat the embeddings differently: dotprod(mask=...) first,
    # then optax.multi_transform on the full update.
    params, g1, grad_fn = problem(jnp.float32)
    labels = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: "reg" if m else "emb", sub),
                          MASK, params)  # fmt: skip
    lr_adam, lr_sgd, weight = 1e-2, 0.1, 0.5
    tx = optax.chain(
        mg.dotprod(weight=weight, scheme="exact", every=3, mask=MASK),
        optax.multi_transform({"reg": optax.adam(lr_adam), "emb": optax.sgd(lr_sgd)}, labels),
    )
    step = jax.jit(lambda g, s: tx.update(g, s, params, grad_fn=grad_fn))
    state = tx.init(params)
    u1, state = step(g1, state)  # regularized call
    want, flags = reference(g1, grad_fn, params, weight)
    for u, w, f in zip(jax.tree.leaves(u1), want, flags, strict=True):
        # Adam's first step is −lr·G/(|G| + eps); SGD's is −lr·G.
        expected = -lr_adam * w / (np.abs(w) + 1e-8) if f else -lr_sgd * w
        np.testing.assert_allclose(u, expected, rtol=1e-4, atol=1e-7)
    u2, state = step(g1, state)  # standard call: Ḡ1 alone everywhere
    for u, w, f in zip(jax.tree.leaves(u2), jax.tree.leaves(g1), flags, strict=True):
        if not f:
            np.testing.assert_allclose(u, -lr_sgd * np.asarray(w), rtol=1e-6)
    assert int(state[0].count) == 2


def test_bad_masks():
    params, g1, grad_fn = problem(jnp.float32)
    state = mg.dotprod().init(params)
    with pytest.raises(TypeError, match=r"mask must be a pytree of Python bools"):
        mg.dotprod(mask={"w": 1})
    with pytest.raises(ValueError, match=r"mask must have the tree structure of params"):
        mg.dotprod(mask=[True, False]).update(g1, state, params, grad_fn=grad_fn)
    with pytest.raises(TypeError, match=r"mask must be a pytree of Python bools"):
        mg.dotprod(mask=lambda p: jax.tree.map(lambda x: jnp.ones(()), p)).update(
            g1, state, params, grad_fn=grad_fn
        )
    with pytest.raises(ValueError, match=r"mask must select at least one leaf"):
        mg.dotprod(mask=False).update(g1, state, params, grad_fn=grad_fn)
