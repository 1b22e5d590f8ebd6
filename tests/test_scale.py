"""The realistic-size tier: every method compiled on a ResNet-12-sized parameter tree.

ResNet-12 (4 residual stages of 64, 160, 320 and 640 channels, 12.4M parameters in 50 leaves)
is the usual model of few-shot image classification. Each method's jitted step is traced,
lowered and compiled on abstract inputs (`jax.ShapeDtypeStruct`: nothing parameter-sized is
allocated to run it), with a loss that touches every parameter but costs almost nothing, so
the compiled program's buffers are the method's own. Two promises are checked:

- host memory: tracing and lowering raise the peak RSS by less than the parameters' bytes
  (the Python side builds programs, not parameter-sized arrays: nothing in parameters ×
  leaves; grad_share's former one-hot [parameters, leaves] matrices took 5.4 GB here, 109×
  the parameters; 18 MB at most now, for plain MAML);
- compiled temporary memory (XLA's ``temp_size_in_bytes``) within a per-method multiple of
  the parameters' bytes, derived from what the method keeps (see ``TEMP_BOUNDS``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
import pytest

import metagrad as mg
from experiments.bench_grad_share import reset_peak_rss, resnet12_shapes, rss_status

TASKS, STEPS, AGG_TASKS = 2, 2, 3  # B tasks per meta-batch, K inner steps, T stacked tasks
PARAMS = {
    f"l{i:02d}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(resnet12_shapes())
}
PARAM_BYTES = 4 * sum(math.prod(s.shape) for s in PARAMS.values())
HOST_BOUND = 1.0


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
    return learner.step, (
        jax.eval_shape(learner.init, PARAMS),
        (abstract((TASKS, 8)), abstract((TASKS, 8))),
    )


def _seq_reptile():
    learner = mg.seq_reptile(
        lambda p, b, t: loss_fn(p, b) * (1.0 + t), optax.sgd(0.01), STEPS, 0.1, pass_task_id=True
    )
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


# Compiled temporary memory, in units of the parameters' bytes P, per method, from what the
# method keeps (B = TASKS, K = STEPS, T = AGG_TASKS; measured here: B = 2, K = 2, T = 3).
# Second-order MAML keeps, per inner step and task, the adapted params and the loss's
# derivatives there for the backward pass (3 [B, P] arrays with this loss), plus the backward
# pass's own temporaries: (3K + 2)·B (measured 13.8 P). Meta-SGD's rates are [P], not
# [B, P]: the same bound (11.4 P). grad_share also keeps each step's task gradients g_{t,k}
# ([B, P]: its gate λ_k and normalization are differentiated through them) and G ([P] per
# step), and its flat copies: (4K + 4)·B (22.2 P). First-order MAML: the adapted params and
# their query gradient, 2·B (2.4 P). Reptile: the tasks' params, updates and gradients and
# their mean, 3·B + 1 (5.4 P). Sequential Reptile, one trajectory: 2 (1.0 P). DotProd: the
# shifted params and one extra gradient, 2 (0.6 P). reptile_outer: 1 (0.0 P). The
# aggregators and mtl_sum + RecAdam: the T stacked task gradients and their combination,
# T + 1 (2.2 to 2.6 P).
TEMP_BOUNDS = {
    "maml": (_maml(lambda: optax.sgd(0.01)), (3 * STEPS + 2) * TASKS),
    "fomaml": (_maml(lambda: optax.sgd(0.01), first_order=True), 2 * TASKS),
    "maml+grad_share": (_maml(lambda: mg.grad_share(0.01)), (4 * STEPS + 4) * TASKS),
    "maml+meta_sgd": (_maml(lambda: mg.meta_sgd(0.01)), (3 * STEPS + 2) * TASKS),
    "reptile": (_reptile, 3 * TASKS + 1),
    "seq_reptile": (_seq_reptile, 2),
    "dotprod": (_dotprod, 2),
    "reptile_outer": (_reptile_outer, 1),
    "pcgrad": (_aggregate(mg.pcgrad), AGG_TASKS + 1),
    "gradvac": (_aggregate(lambda: mg.gradvac(AGG_TASKS)), AGG_TASKS + 1),
    "gradnorm": (_aggregate(lambda: mg.gradnorm(AGG_TASKS), with_losses=True), AGG_TASKS + 1),
    "recadam": (_recadam, AGG_TASKS + 1),
    "mtl_sum": (_aggregate(mg.mtl_sum), AGG_TASKS + 1),
}


@pytest.fixture(scope="module")
def warm():
    # The first lowering of a process sets up MLIR and XLA's compiler: not the method's cost.
    jax.jit(lambda x: jnp.sin(x) + 1).lower(abstract((3,))).compile()


@pytest.mark.parametrize("name", list(TEMP_BOUNDS))
def test_resnet12_sized_tree_traces_compiles_within_memory_bounds(name, warm):
    assert len(PARAMS) == 50 and 12e6 < PARAM_BYTES / 4 < 13e6
    build, bound = TEMP_BOUNDS[name]
    start = reset_peak_rss()  # None where the peak RSS cannot be reset (not Linux)
    step, args = build()
    lowered = step.trace(*args).lower()
    if start is not None:
        host = rss_status("VmHWM") - start
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
