"""The grad_share benchmark's ablated rules compute what their rows claim to time."""

import jax
import numpy as np
import optax

import metagrad as mg
from experiments import bench_grad_share as bench
from experiments.data import sinusoid_tasks
from experiments.models import mlp_init, mse_loss


def _step(inner):
    learner = mg.maml(mse_loss, inner, 3, optax.sgd(0.1))
    tasks = sinusoid_tasks(jax.random.PRNGKey(1), 4, 5, 5)[:2]
    return learner.step(learner.init(mlp_init(jax.random.PRNGKey(0))), tasks)


def test_ravel_only_is_plain_sgd():
    (got, _), (want, _) = _step(bench._ravel_only(0.01)), _step(optax.sgd(0.01))
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_frozen_rule_keeps_its_parameters_and_learned_one_moves():
    frozen, _ = _step(bench._frozen(mg.grad_share(0.01)))
    learned, _ = _step(mg.grad_share(0.01))
    np.testing.assert_array_equal(frozen.inner_params.gate, 0.0)
    np.testing.assert_array_equal(frozen.inner_params.momentum, 0.0)
    assert np.all(np.asarray(learned.inner_params.gate) != 0.0)
    # Frozen or not, the forward arithmetic is the same: the same running average G (to float32
    # rounding: the two are different compiled programs).
    for a, b in zip(jax.tree.leaves(frozen.carry), jax.tree.leaves(learned.carry), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
