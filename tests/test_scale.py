"""The realistic-size tier: every method compiled on a ResNet-12-sized parameter tree.

ResNet-12 (4 residual stages of 64, 160, 320 and 640 channels, 12.4M parameters in 50 leaves)
is the usual model of few-shot image classification. Each method's jitted step is traced,
lowered and compiled on abstract inputs (`jax.ShapeDtypeStruct`: nothing parameter-sized is
allocated to run it), with a loss that touches every parameter but costs almost nothing, so
the compiled program's buffers are the method's own. Two promises are checked:

- host memory: tracing and lowering allocate less than ``HOST_BOUND`` × the parameters' bytes
  (the Python side builds programs, not parameter-sized arrays: no cost in parameters ×
  leaves, which is what grad_share's former one-hot [parameters, leaves] matrix cost);
- compiled temporary memory (XLA's ``temp_size_in_bytes``) within a per-method multiple of
  the parameters' bytes, derived from what the method keeps (see ``TEMP_BOUNDS``).
"""

from __future__ import annotations

import ctypes
import gc
import math
import pathlib

import jax
import jax.numpy as jnp
import optax
import pytest

import metagrad as mg
from experiments.bench_grad_share import resnet12_shapes

TASKS, STEPS, AGG_TASKS = 2, 2, 3  # B tasks per meta-batch, K inner steps, T stacked tasks
PARAMS = {
    f"l{i:02d}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(resnet12_shapes())
}
PARAM_BYTES = 4 * sum(math.prod(s.shape) for s in PARAMS.values())
HOST_BOUND = 2.0


def loss_fn(params, batch):
    """Touches every parameter with a non-zero Hessian, at almost no cost."""
    scale = jnp.mean(batch)
    return scale * sum(jnp.sum(jnp.tanh(p)) for p in jax.tree.leaves(params))


def abstract(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _maml(inner, **kwargs):
    def build():
        learner = mg.maml(loss_fn, inner(), STEPS, optax.adam(1e-3), **kwargs)
        batch = abstract((TASKS, 8))
        return learner.step, (jax.eval_shape(learner.init, PARAMS), (batch, batch))

    return build


def _reptile():
    learner = mg.reptile(loss_fn, optax.sgd(0.01), STEPS, optax.sgd(1.0))
    return learner.step, (jax.eval_shape(learner.init, PARAMS), abstract((TASKS, 8)))


def _seq_reptile():
    learner = mg.seq_reptile(lambda p, b, t: loss_fn(p, b) * (1.0 + t), optax.sgd(0.01), STEPS, 0.1)
    tasks = (abstract((STEPS,), jnp.int32), abstract((STEPS, 8)))
    return learner.step, (jax.eval_shape(learner.init, PARAMS), tasks)


def _optax(tx, batches, extra=None):
    """A training step with `tx`: gradients at ``batches[0]``, extra args from the rest."""

    @jax.jit
    def step(params, state, *data):
        grads = jax.grad(loss_fn)(params, data[0])
        kwargs = extra(params, *data) if extra else {}
        updates, state = tx.update(grads, state, params, **kwargs)
        return optax.apply_updates(params, updates), state

    return step, (PARAMS, jax.eval_shape(tx.init, PARAMS), *batches)


def _dotprod():
    tx = optax.chain(mg.dotprod(), optax.adam(1e-3))
    extra = lambda params, b1, b2: {"grad_fn": lambda p: jax.grad(loss_fn)(p, b2)}
    return _optax(tx, (abstract((8,)), abstract((8,))), extra)


def _reptile_outer():
    return _optax(mg.reptile_outer(optax.sgd(0.01), STEPS), (abstract((8,)),))


def _aggregate(make_tx, with_losses=False):
    """Per-task gradients stacked on a leading axis of T tasks, then `tx`."""

    def build():
        tx = optax.chain(make_tx(), optax.sgd(1e-3))

        @jax.jit
        def step(params, state, batches):
            losses, grads = jax.vmap(jax.value_and_grad(loss_fn), (None, 0))(params, batches)
            kwargs = {"losses": losses} if with_losses else {}
            updates, state = tx.update(grads, state, params, **kwargs)
            return optax.apply_updates(params, updates), state

        return step, (PARAMS, jax.eval_shape(tx.init, PARAMS), abstract((AGG_TASKS, 8)))

    return build


def _recadam():
    tx = optax.chain(mg.mtl_sum(), mg.recadam(1e-3))

    @jax.jit
    def step(params, state, batches):
        grads = jax.vmap(jax.grad(loss_fn), (None, 0))(params, batches)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step, (PARAMS, jax.eval_shape(tx.init, PARAMS), abstract((AGG_TASKS, 8)))


# Compiled temporary memory, in units of the parameters' bytes P, per method. B = TASKS,
# K = STEPS, T = AGG_TASKS. Second-order MAML keeps a few [B, P] residuals per inner step
# (the adapted params and the loss's derivatives there) for the backward pass, about 3·B·K
# here, plus the backward's own [B, P] temporaries: bound (4K + 3)·B. grad_share also keeps
# each step's task gradients g_{t,k} ([B, P], needed for the derivative in its gate λ_k and
# normalization) and G ([P] per step): bound (5K + 4)·B. Meta-SGD's per-parameter rates
# add [B, P] products per step: (5K + 3)·B. First-order MAML keeps no per-step residuals:
# the adapted params and their query gradient, 4·B + 4. Reptile: the tasks' trajectories
# and their mean, 4·B + 4. Sequential Reptile: one trajectory, 6. DotProd (with Adam):
# three gradients, the shifted params and Adam's update, 8. reptile_outer: 4. The
# aggregators: T stacked task gradients plus their combination, 2·T + 4 (PCGrad and
# GradVac also a projected copy: 3·T + 4).
TEMP_BOUNDS = {
    "maml": (_maml(lambda: optax.sgd(0.01)), (4 * STEPS + 3) * TASKS),
    "fomaml": (_maml(lambda: optax.sgd(0.01), first_order=True), 4 * TASKS + 4),
    "maml+grad_share": (_maml(lambda: mg.grad_share(0.01)), (5 * STEPS + 4) * TASKS),
    "maml+meta_sgd": (_maml(lambda: mg.meta_sgd(0.01)), (5 * STEPS + 3) * TASKS),
    "reptile": (_reptile, 4 * TASKS + 4),
    "seq_reptile": (_seq_reptile, 6),
    "dotprod": (_dotprod, 8),
    "reptile_outer": (_reptile_outer, 4),
    "pcgrad": (_aggregate(mg.pcgrad), 3 * AGG_TASKS + 4),
    "gradvac": (_aggregate(lambda: mg.gradvac(AGG_TASKS)), 3 * AGG_TASKS + 4),
    "gradnorm": (_aggregate(lambda: mg.gradnorm(AGG_TASKS), with_losses=True), 2 * AGG_TASKS + 4),
    "recadam": (_recadam, 2 * AGG_TASKS + 4),
    "mtl_sum": (_aggregate(mg.mtl_sum), 2 * AGG_TASKS + 4),
}

_CLEAR_REFS = pathlib.Path("/proc/self/clear_refs")


def _reset_peak_rss() -> int:
    """Frees what can be freed, resets the peak RSS (Linux), returns the current RSS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    _CLEAR_REFS.write_text("5")
    return _status("VmRSS")


def _status(key: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _can_measure_rss() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        ctypes.CDLL("libc.so.6")
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def warm():
    # The first lowering of a process sets up MLIR and XLA's compiler: not the method's cost.
    jax.jit(lambda x: jnp.sin(x) + 1).lower(abstract((3,))).compile()


@pytest.mark.parametrize("name", list(TEMP_BOUNDS))
def test_resnet12_sized_tree_traces_compiles_within_memory_bounds(name, warm):
    assert len(PARAMS) == 50 and 12e6 < PARAM_BYTES / 4 < 13e6
    build, bound = TEMP_BOUNDS[name]
    measure_rss = _can_measure_rss()
    start = _reset_peak_rss() if measure_rss else 0
    step, args = build()
    lowered = step.trace(*args).lower()
    if measure_rss:
        host = _status("VmHWM") - start
        assert host < HOST_BOUND * PARAM_BYTES, (
            f"{name}: tracing and lowering took {host / 2**20:.0f} MB of host memory, more than "
            f"{HOST_BOUND} x the parameters ({PARAM_BYTES / 2**20:.0f} MB)"
        )
    # Buffer assignment, hence the memory figure, does not depend on LLVM's optimization
    # level; level 0 compiles faster.
    compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= bound * PARAM_BYTES, (
        f"{name}: compiled temporary memory {temp / PARAM_BYTES:.1f} x the parameters, "
        f"bound {bound}"
    )
