"""Execution strategies: every (task_loop, step_loop) pair of a meta-learner gives the numbers
of its default, in float64, for each learner and inner rule; bad values are rejected; "auto"
follows its documented rule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg
from metagrad._src import loops as _loops

TASKS, STEPS = 2, 2
COMBOS = [(t, s) for t in ("vmap", "map", "unroll") for s in ("scan", "unroll")]


def mlp_loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["w"] + params["b"])
    return jnp.mean((h @ params["v"] - y) ** 2)


def task_id_loss(params, batch, task_id):
    return (1.0 + task_id) * mlp_loss(params, batch)


LEARNERS = {
    "maml": lambda **kw: mg.maml(mlp_loss, optax.sgd(0.3), STEPS, optax.sgd(1.0), **kw),
    # A carried Adam state: per-task optimizer state through every strategy.
    "fomaml": lambda **kw: mg.fomaml(
        mlp_loss, optax.adam(0.1), STEPS, optax.sgd(1.0), reset_inner_state=False, **kw
    ),
    # Couples the tasks at every inner step; its average persists across outer steps.
    "maml_grad_share": lambda **kw: mg.maml(
        mlp_loss, mg.grad_share(0.3), STEPS, optax.sgd(1.0), alignment=True, **kw
    ),
    "maml_meta_sgd": lambda **kw: mg.maml(mlp_loss, mg.meta_sgd(0.3), STEPS, optax.sgd(1.0), **kw),
    # MAML++: per-step layer rates, the multi-step loss, and rematerialized inner steps.
    "maml_multi_step_loss": lambda **kw: mg.maml(
        mlp_loss,
        mg.learned_lr(0.3, per_step=True, granularity="layer"),
        STEPS,
        optax.sgd(1.0),
        multi_step_loss=2,
        remat=True,
        **kw,
    ),
    "reptile": lambda **kw: mg.reptile(
        mlp_loss,
        optax.adam(0.1),
        STEPS,
        optax.sgd(0.5),
        batch_per_step=True,
        reset_inner_state=False,
        alignment=True,
        **kw,
    ),
    "seq_reptile": lambda **kw: mg.seq_reptile(
        task_id_loss, optax.adam(0.1), STEPS, 0.5, reset_inner_state=False, pass_task_id=True, **kw
    ),
}


def _problem():
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(2, 4)) / 2),
        "b": jnp.asarray(rng.normal(size=(4,)) / 10),
        "v": jnp.asarray(rng.normal(size=(4,)) / 2),
    }

    def batch(*lead):
        x = jnp.asarray(rng.normal(size=(*lead, 5, 2)))
        return x, jnp.sin(x.sum(-1))

    maml_tasks = (batch(TASKS), batch(TASKS))
    return params, {
        "maml": maml_tasks,
        "reptile": (batch(TASKS, STEPS), batch(TASKS)),
        "seq_reptile": (jnp.array([1, 0], jnp.int32), batch(STEPS)),
    }


def _run(name, **kw):
    """Two outer steps (so carried state matters) and, for MAML, adaptation to a task."""
    params, tasks = _problem()
    tasks = tasks["maml" if name.startswith(("maml", "fomaml")) else name]
    learner = LEARNERS[name](**kw)
    state = learner.init(params)
    outs = []
    for _ in range(2):
        state, metrics = learner.step(state, tasks)
        outs.append(metrics)
    if name == "maml_grad_share":
        outs.append(learner.adapt(state, jax.tree.map(lambda x: x[0], tasks[0])))
    return jax.device_get((state, outs))


@functools.cache
def _default(name):
    with jax.enable_x64(True):
        return _run(name)


@pytest.mark.parametrize("task_loop, step_loop", COMBOS)
@pytest.mark.parametrize("name", list(LEARNERS))
def test_every_strategy_equals_the_default(name, task_loop, step_loop):
    expected = _default(name)
    with jax.enable_x64(True):
        got = _run(name, task_loop=task_loop, step_loop=step_loop)
    leaves = jax.tree.leaves(expected)
    assert any(np.asarray(x).dtype == np.float64 for x in leaves)
    for x, y in zip(leaves, jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", list(LEARNERS))
def test_bad_strategies_are_rejected(name):
    with pytest.raises(ValueError, match="task_loop"):
        LEARNERS[name](task_loop="pmap")
    with pytest.raises(ValueError, match="step_loop"):
        LEARNERS[name](step_loop="while")
    with pytest.raises(ValueError, match="step_loop"):
        LEARNERS[name](step_loop=None)


def conv_loss(params, batch):
    x, y = batch
    h = jax.lax.conv_general_dilated(x, params, (1, 1), "SAME")
    return jnp.mean((jnp.sum(h, axis=(1, 2, 3)) - y) ** 2)


def test_auto_rule():
    x, kernel = jnp.ones((2, 1, 4, 4)), jnp.ones((1, 1, 3, 3))
    conv = jax.make_jaxpr(conv_loss)(kernel, (x, jnp.ones(2)))
    params, tasks = _problem()
    dense = jax.make_jaxpr(mlp_loss)(params, jax.tree.map(lambda x: x[0, 0], tasks["reptile"][0]))
    assert _loops.loss_stats(conv)[0] and not _loops.loss_stats(dense)[0]
    # Under a scan the convolution is inside a sub-jaxpr.
    scanned = jax.make_jaxpr(
        lambda k: jax.lax.scan(
            lambda c, _: (c + conv_loss(k, (x, jnp.ones(2))), None), 0.0, None, 2
        )
    )(kernel)
    assert _loops.loss_stats(scanned)[0]
    assert _loops.loss_stats(scanned)[1] > _loops.loss_stats(conv)[1]
    assert jax.default_backend() == "cpu"
    resolve = functools.partial(_loops.resolve, "auto", "auto")
    assert resolve(num_tasks=4, num_steps=5, jaxpr=conv) == ("unroll", "unroll")
    assert resolve(num_tasks=25, num_steps=5, jaxpr=dense) == ("vmap", "scan")
    # Beyond the budget of unrolled equations, the steps run in a scan.
    size = _loops.loss_stats(conv)[1]
    longest = _loops.CPU_UNROLL_BUDGET // (4 * size)
    assert resolve(num_tasks=4, num_steps=longest, jaxpr=conv) == ("unroll", "unroll")
    assert resolve(num_tasks=4, num_steps=longest + 1, jaxpr=conv) == ("unroll", "scan")
    # Explicit choices pass through.
    assert _loops.resolve("map", "scan", num_tasks=4, num_steps=1, jaxpr=conv) == ("map", "scan")
