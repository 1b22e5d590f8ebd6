"""The real_models benchmark compares like with like.

Its hand-written JAX programs (every variant) and its PyTorch programs must compute the same
outer step as metagrad's learners, or its ratios mean nothing. One step on a tiny Conv-4
(16×16 images, so the dense head sees a 2×2 map and the flattening order matters; 4 channels,
2 tasks, K = 2) with outer SGD at rate 1, so the params move by
exactly the meta-gradient.
"""

import functools

import jax
import numpy as np
import optax
import pytest

from experiments import bench_real_models as brm
from experiments.bench_real_jax import make_step as hand_step
from experiments.models import conv4_init, torch_layout

STEPS, RTOL = 2, 1e-4
# Compiling a second-order Conv-4 step takes seconds on CPU; XLA's cheaper backend passes
# halve that and leave the maths alone.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _step_once(jitted, state, inputs):
    return jitted.lower(state, inputs).compile(FAST_COMPILE)(state, inputs)


@functools.cache
def _setup():
    params = conv4_init(jax.random.PRNGKey(0), 1, brm.WAYS, 16, 4, batch_norm=False)
    model = brm.Model("conv4", "tiny", params, brm.conv4_loss, 16, 1)
    tasks = brm.episodes(model, 1, seed=5, num_tasks=2)
    return model, tasks


@functools.cache
def _mg_update(method):
    model, tasks = _setup()
    inputs = brm.pooled(tasks) if method == "reptile" else tasks
    learner = brm.mg_learner(method, model, STEPS, optax.sgd(1.0))
    state, _ = _step_once(learner.step, learner.init(model.params), inputs)
    logits = None
    if method == "grad_share":
        logits = np.concatenate([state.inner_params.momentum, state.inner_params.gate])
    return _meta_grad(model, torch_layout(state.params, "conv4")), logits


def _meta_grad(model, after):
    before = torch_layout(model.params, "conv4")
    return np.concatenate([(before[k] - after[k]).ravel() for k in sorted(before)])


def _assert_close(got, want):
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * scale)


def test_first_and_second_order_differ():
    # The tolerance below separates the methods: FOMAML is not within it of MAML.
    so, _ = _mg_update("maml")
    fo, _ = _mg_update("fomaml")
    assert np.max(np.abs(so - fo)) > 100 * RTOL * np.max(np.abs(so))


# The two layouts at the ends of the range for MAML (tasks and steps unrolled, the fastest
# on CPU; vmap + scan), and the code the other methods add (stop_gradient, the sharing rule,
# Reptile's task mean) in the unrolled one. Not the full product, to keep the compile time of
# the test suite down; the benchmark also checks each method against the unrolled program
# (and PyTorch) before timing it.
CASES = [("maml", "unroll/unroll"), ("maml", "vmap/scan")] + [
    ("fomaml", "unroll/unroll"),
    ("grad_share", "unroll/unroll"),
    ("reptile", "unroll/unroll"),
]


@pytest.mark.parametrize("method, variant", CASES)
def test_hand_written_jax_equals_metagrad(method, variant):
    model, tasks = _setup()
    inputs = brm.pooled(tasks) if method == "reptile" else tasks
    init, step = hand_step(method, model.loss_fn, STEPS, brm.INNER_LR, optax.sgd(1.0), variant)
    (params, learned, _, _), _ = _step_once(jax.jit(step), init(model.params), inputs)
    want, want_logits = _mg_update(method)
    _assert_close(_meta_grad(model, torch_layout(params, "conv4")), want)
    if method == "grad_share":
        np.testing.assert_allclose(np.concatenate(learned), want_logits, atol=1e-5)


@pytest.mark.parametrize("method", brm.METHODS)
def test_torch_equals_metagrad(method):
    pytest.importorskip("torch")
    from experiments import bench_real_torch as tref

    model, tasks = _setup()
    ref = tref.TorchMeta(method, "conv4", model.params, STEPS, brm.INNER_LR, "sgd1")
    inputs = brm.pooled(tasks) if method == "reptile" else tasks
    ref.step(tuple(tref.to_torch_batch(*part) for part in inputs))
    want, want_logits = _mg_update(method)
    _assert_close(_meta_grad(model, ref.torch_layout_params()), want)
    if method == "grad_share":
        logits = np.concatenate([x.detach().numpy() for x in ref.logits])
        np.testing.assert_allclose(logits, want_logits, atol=1e-5)


def test_torch_layout_names_every_parameter():
    model, _ = _setup()
    leaves = jax.tree.leaves(model.params)
    layout = torch_layout(model.params, "conv4")
    assert sum(v.size for v in layout.values()) == sum(x.size for x in leaves)
