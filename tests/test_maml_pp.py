"""MAML++ derivative-order annealing: first order for N outer steps, then second order."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg


def mlp_loss(params, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ params["w"]) @ params["v"] - y) ** 2)


def test_order_switches_at_exactly_n_and_compiles_once(x64):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(2, 3))), "v": jnp.asarray(rng.normal(size=3))}
    x = rng.normal(size=(2, 3, 5, 2))
    tasks = ((jnp.asarray(x[0]), jnp.asarray(np.sin(x[0].sum(-1)))),
             (jnp.asarray(x[1]), jnp.asarray(np.cos(x[1].sum(-1)))))  # fmt: skip
    n = 2
    rule = mg.learned_lr(0.3, per_step=True, granularity="layer")

    def make(order):
        return mg.maml(mlp_loss, rule, 2, optax.sgd(0.5), first_order=order, multi_step_loss=10)

    annealed, fo, so = make(n), make(True), make(False)
    state = annealed.init(params)
    for count in range(n + 2):
        assert int(state.count) == count
        got, _ = annealed.step(state, tasks)
        want = (fo if count < n else so).step(state, tasks)[0]
        other = (so if count < n else fo).step(state, tasks)[0]
        diff = lambda a, b: max(  # noqa: E731 - relative: the params grow to ~1e8 here
            float(np.max(np.abs(u - v)) / max(1.0, np.max(np.abs(v))))
            for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )
        assert diff(got.params, want.params) <= 1e-12, count
        assert diff(got.params, other.params) > 1e-6, count  # the two orders differ here
        state = got
    # One compiled program for every outer step, both orders included.
    assert annealed.step._cache_size() == 1


@pytest.mark.parametrize("value, error", [(0, ValueError), (1.5, TypeError), ("2", TypeError)])
def test_bad_first_order(value, error):
    with pytest.raises(error, match="first_order"):
        mg.maml(mlp_loss, optax.sgd(0.1), 1, optax.sgd(0.1), first_order=value)
