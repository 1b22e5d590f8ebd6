"""Non-finite values: a NaN or inf from `grad_fn` or a task loss never reaches the params.

metagrad does not hide non-finite values: they propagate into the update or meta-gradient
(so that a guard can see them), and the guard is optax's own `optax.apply_if_finite`:

- `dotprod`: after it, ``optax.chain(mg.dotprod(...), optax.apply_if_finite(opt, n))``
  (wrapping the whole chain would check only the incoming Ḡ1, not `grad_fn`'s output);
- `reptile_outer`: around the inner optimizer, or around the whole wrapper (then the
  skipped call leaves the inner-step count unchanged);
- the meta-steps: the outer optimizer, ``outer=optax.apply_if_finite(optax.adam(...), n)``;
- the multi-task aggregators: after them, ``optax.chain(mg.pcgrad(), optax.apply_if_finite(opt,
  n))``, with the aggregator's state kept on a bad step (tested in `tests/test_mtl_contract.py`).

Each test makes a few steps non-finite and checks that the params stay finite, that the
bad steps were skipped, and that training goes on afterwards. `apply_if_finite` applies
the update after more than `max_consecutive_errors` bad steps in a row, so the tests stay
below that number.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg

BAD_STEPS = (2, 3, 7)  # non-finite at these steps, two of them in a row
MAX_ERRORS = 3


def loss(params, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ params["w"] + params["b"]) - y) ** 2)


def init_params():
    return {"w": jnp.full((3,), 0.1, jnp.float32), "b": jnp.zeros((), jnp.float32)}


def batch(seed, poison=None):
    """A batch; `poison` (nan or inf) replaces one input, making loss and gradient non-finite."""
    x = jax.random.normal(jax.random.key(seed), (6, 3))
    if poison is not None:
        x = x.at[0, 0].set(poison)
    return x, jnp.sin(x.sum(-1))


def all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _dotprod_step(tx):
    @jax.jit
    def step(params, state, b1, b2):
        g1 = jax.grad(loss)(params, b1)
        grad_fn = lambda p: jax.grad(loss)(p, b2)
        updates, state = tx.update(g1, state, params, grad_fn=grad_fn)
        # The documented behaviour: dotprod itself propagates the non-finite value.
        raw, _ = mg.dotprod(weight=0.1).update(
            g1, mg.dotprod().init(params), params, grad_fn=grad_fn
        )
        return optax.apply_updates(params, updates), state, raw

    return step


@pytest.mark.parametrize("poison", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["grad_fn", "g1"])
def test_dotprod_guarded_by_apply_if_finite_after_it(poison, where):
    tx = optax.chain(mg.dotprod(weight=0.1), optax.apply_if_finite(optax.adam(1e-2), MAX_ERRORS))
    step = _dotprod_step(tx)
    params = init_params()
    state = tx.init(params)
    for i in range(10):
        bad = poison if i in BAD_STEPS else None
        b1 = batch(2 * i, bad if where == "g1" else None)
        b2 = batch(2 * i + 1, bad if where == "grad_fn" else None)
        new, state, raw = step(params, state, b1, b2)
        assert all_finite(raw) == (bad is None)
        assert all_finite(new)
        unchanged = all(
            jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), new, params))
        )
        assert unchanged == (bad is not None)
        params = new
    assert int(state[1].total_notfinite) == len(BAD_STEPS)


def test_dotprod_unguarded_becomes_nonfinite():
    """Without the guard the params do become NaN: the guard is what the tests above show."""
    tx = optax.chain(mg.dotprod(weight=0.1), optax.adam(1e-2))
    params = init_params()
    g1 = jax.grad(loss)(params, batch(0))
    updates, _ = tx.update(
        g1, tx.init(params), params, grad_fn=lambda p: jax.grad(loss)(p, batch(1, np.nan))
    )
    assert not all_finite(optax.apply_updates(params, updates))


@pytest.mark.parametrize("guard", ["inner", "whole"])
def test_reptile_outer_guarded(guard):
    inner = optax.adam(0.05)
    if guard == "inner":
        tx = mg.reptile_outer(optax.apply_if_finite(inner, MAX_ERRORS), 4, 0.5)
    else:
        tx = optax.apply_if_finite(mg.reptile_outer(inner, 4, 0.5), MAX_ERRORS)
    params = init_params()
    state = tx.init(params)
    for i in range(12):  # three outer steps
        b = batch(i, np.nan if i in BAD_STEPS else None)
        updates, state = tx.update(jax.grad(loss)(params, b), state, params)
        params = optax.apply_updates(params, updates)
        assert all_finite(params)
        assert all_finite(state)  # Adam's moments did not take the NaN in
    if guard == "whole":
        # Skipped calls are not inner steps: 12 calls, 3 skipped, 9 inner steps = 2*4 + 1.
        assert int(state.inner_state.count) == 1
    # Training went on: the params moved from the start.
    assert not np.allclose(params["w"], init_params()["w"])


def _maml_tasks(step, poison):
    x = jax.random.normal(jax.random.key(step), (4, 6, 3))
    if poison is not None:
        x = x.at[1, 0, 0].set(poison)  # one task of four
    y = jnp.sin(x.sum(-1))
    return (x, y), (x, y)


LEARNERS = {
    "maml": lambda outer: mg.maml(loss, optax.sgd(0.1), 2, outer),
    "meta_sgd": lambda outer: mg.maml(loss, mg.meta_sgd(0.1), 1, outer),
    "reptile": lambda outer: mg.reptile(loss, optax.sgd(0.1), 2, outer),
    "seq_reptile": lambda outer: mg.seq_reptile(loss, optax.sgd(0.1), 4, outer),
}


def _tasks_for(name, step, poison):
    support, query = _maml_tasks(step, poison)
    if name == "seq_reptile":
        return jnp.array([0, 1, 2, 3], jnp.int32), support
    return support, query


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_meta_steps_guarded_by_apply_if_finite_outer(name):
    outer = optax.apply_if_finite(optax.adam(1e-2), MAX_ERRORS)
    learner = LEARNERS[name](outer)
    state = learner.init(init_params())
    for i in range(9):
        bad = i in BAD_STEPS
        before = state.params
        state, metrics = learner.step(state, _tasks_for(name, i, np.nan if bad else None))
        assert all_finite(state.params), (name, i)
        unchanged = all(
            jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), state.params, before))
        )
        assert unchanged == bad, (name, i)
    assert int(state.outer_state.total_notfinite) == len(BAD_STEPS)


CARRIED = {
    # State that persists across outer steps: gradient sharing's running average, or the
    # inner optimizer state when it is not reset.
    "grad_share": lambda outer: mg.maml(loss, mg.grad_share(0.1), 2, outer),
    "maml_kept_inner_state": lambda outer: mg.maml(
        loss, optax.sgd(0.1, momentum=0.9), 2, outer, reset_inner_state=False
    ),
    "reptile_kept_inner_state": lambda outer: mg.reptile(
        loss, optax.adam(0.1), 2, outer, reset_inner_state=False
    ),
    "seq_reptile_kept_inner_state": lambda outer: mg.seq_reptile(
        loss, optax.adam(0.1), 4, outer, reset_inner_state=False
    ),
}


@pytest.mark.parametrize("name", sorted(CARRIED))
def test_one_bad_step_does_not_poison_carried_state(name):
    # More bad-free steps after the NaN than max_consecutive_errors: with a poisoned carry
    # every later step would be non-finite and the guard would finally let NaN through.
    learner = CARRIED[name](optax.apply_if_finite(optax.adam(1e-2), MAX_ERRORS))
    kind = "reptile" if name.startswith("reptile") else "seq_reptile" if "seq" in name else "maml"
    state = learner.init(init_params())
    for i in range(2 + MAX_ERRORS + 2):
        state, metrics = learner.step(state, _tasks_for(kind, i, np.nan if i == 1 else None))
        assert all_finite(state), (name, i)
        assert bool(jnp.isfinite(metrics["loss"])) == (i != 1), (name, i)
    assert int(state.outer_state.total_notfinite) == 1
