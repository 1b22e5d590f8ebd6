"""Property-based tests (hypothesis) of invariants the methods promise for any valid input.

- `dotprod` with weight 0 returns exactly Ḡ1 + Ḡ2, whatever the scheme, step and schedule.
- `reptile_outer` with one inner step, ``outer=1`` and a kept inner state is the inner
  optimizer, bit for bit.
- The task samplers' probabilities are valid (right length, non-negative, summing to one)
  and their draws are in range, for any valid sizes, exponents and ratios.

Examples are few and small (`max_examples`), so the file stays fast; shapes come from a small
set, so that jitted code is not recompiled for every example.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import metagrad as mg

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)
finite = st.floats(-3.0, 3.0, allow_nan=False, width=32)


def vector(n):
    return st.lists(finite, min_size=n, max_size=n).map(lambda v: jnp.asarray(v, jnp.float32))


def loss(params, batch):
    return jnp.sum(jnp.tanh(params["w"] * batch) ** 2) + jnp.sum(params["b"] ** 2 * batch[:2])


@functools.cache
def _dotprod_plain_sum(scheme, inner_alpha, every):
    """Jitted: dotprod's output over two calls, for weight 0 as a float and as a schedule."""

    @jax.jit
    def run(params, b1, b2):
        g1 = jax.grad(loss)(params, b1)
        outs = []
        for weight in (0.0, optax.constant_schedule(0.0)):
            tx = mg.dotprod(inner_alpha, weight, every=every, scheme=scheme)
            state = tx.init(params)
            for _ in range(2):  # a regularized call, then (every > 2) a standard one
                out, state = tx.update(g1, state, params, grad_fn=lambda p: jax.grad(loss)(p, b2))
                outs.append(out)
        return g1, jax.grad(loss)(params, b2), outs

    return run


@pytest.mark.parametrize(
    "scheme, inner_alpha, every", [("forward", None, 2), ("central", 1e-7, 3), ("exact", None, 3)]
)
@SETTINGS
@given(w=vector(4), b=vector(2), b1=vector(4), b2=vector(4))
def test_dotprod_weight_zero_is_the_plain_sum(scheme, inner_alpha, every, w, b, b1, b2):
    g1, g2, outs = _dotprod_plain_sum(scheme, inner_alpha, every)({"w": w, "b": b}, b1, b2)
    for i, out in enumerate(outs):
        # Regularized calls (even i; every call when every=2): the sum of dotprod's own Ḡ1
        # and Ḡ2; our Ḡ2 is computed by a separate XLA computation, hence round-off
        # tolerance, not bit equality. Standard calls (odd i when every=3): Ḡ1 alone.
        g2_or_0 = g2 if i % 2 == 0 or every == 2 else jax.tree.map(jnp.zeros_like, g2)
        jax.tree.map(
            lambda o, a, c: np.testing.assert_allclose(o, a + c, rtol=1e-6, atol=1e-7),
            out, g1, g2_or_0,
        )  # fmt: skip


INNER = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(0.05),
}


@functools.cache
def _reptile_and_inner(inner):
    tx = mg.reptile_outer(INNER[inner](), 1, 1.0, reset_inner_state=False)
    ref = INNER[inner]()

    @jax.jit
    def step(g, p, s, q, r):
        u, s = tx.update(g, s, p)
        v, r = ref.update(g, r, q)
        return optax.apply_updates(p, u), s, optax.apply_updates(q, v), r

    return tx, ref, step


@pytest.mark.parametrize("inner", sorted(INNER))
@SETTINGS
@given(params=vector(3), grads=st.lists(vector(3), min_size=1, max_size=6))
def test_reptile_outer_one_step_lr_one_is_the_inner_optimizer(inner, params, grads):
    tx, ref, step = _reptile_and_inner(inner)
    p, s, q, r = params, tx.init(params), params, ref.init(params)
    for g in grads:
        p, s, q, r = step(g, p, s, q, r)
        np.testing.assert_array_equal(p, q)
        np.testing.assert_array_equal(s.outer_params, q)  # φ follows the params
    jax.tree.map(np.testing.assert_array_equal, s.inner_state, r)


def _assert_valid(probs, num_tasks):
    probs = np.asarray(probs, np.float64)
    assert probs.shape == (num_tasks,)
    assert np.all(np.isfinite(probs)) and np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-5)


@SETTINGS
@given(
    sizes=st.lists(st.integers(1, 10**7), min_size=1, max_size=8),
    q=st.floats(-3.0, 3.0, allow_nan=False),
    seed=st.integers(0, 2**31 - 1),
)
def test_task_probs_are_valid_and_samplable(sizes, q, seed):
    probs = mg.task_probs(sizes, q=q)
    _assert_valid(probs, len(sizes))
    # Larger tasks get more probability for q > 0, less for q < 0 (ties within round-off).
    order = np.argsort(sizes, kind="stable")
    p = np.asarray(probs)[order]
    if q > 0:
        assert np.all(np.diff(p) >= -1e-6)
    elif q < 0:
        assert np.all(np.diff(p) <= 1e-6)
    ids = mg.sample_tasks(jax.random.key(seed), probs, 16)
    assert ids.shape == (16,) and ids.dtype == jnp.int32
    assert np.all((np.asarray(ids) >= 0) & (np.asarray(ids) < len(sizes)))


@SETTINGS
@given(
    num_tasks=st.integers(2, 8),
    target=st.integers(0, 7),
    ratio=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    include_target=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_mixed_probs_are_valid_and_match_the_schedule(
    num_tasks, target, ratio, include_target, seed
):
    target = target % num_tasks
    probs = mg.mixed_probs(num_tasks, target, ratio, include_target=include_target)
    _assert_valid(probs, num_tasks)
    # Over whole epochs the schedule draws the target exactly b/(a+b) of the time. 60 draws
    # are whole epochs for every a+b <= 6 (one shape: compiled once).
    a, b = ratio
    ids = mg.mixed_schedule(
        jax.random.key(seed), num_tasks, target, 60, ratio=ratio, include_target=include_target
    )
    ids = np.asarray(ids)
    assert np.all((ids >= 0) & (ids < num_tasks))
    forced = 60 * b // (a + b)
    assert np.sum(ids == target) >= forced
    if not include_target:
        assert np.sum(ids == target) == forced
        np.testing.assert_allclose(probs[target], b / (a + b), rtol=1e-6)


@SETTINGS
@given(
    weights=st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=1, max_size=8).filter(
        lambda w: sum(w) > 0
    ),
    seed=st.integers(0, 2**31 - 1),
)
def test_sample_tasks_accepts_any_normalized_probs(weights, seed):
    probs = np.asarray(weights, np.float64) / np.sum(weights)
    ids = np.asarray(mg.sample_tasks(jax.random.key(seed), probs, 32))
    assert np.all((ids >= 0) & (ids < len(weights)))
    assert np.all(probs[ids] > 0)  # a task of probability zero is never drawn
