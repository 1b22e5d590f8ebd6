"""Checkpoint and resume: every metagrad state survives orbax and continues bit for bit.

Each case below is a small training loop over a pool of regression tasks whose whole state
(params, optimizer or meta-learner state, PRNG key, step) is one pytree. The test runs it,
saves the state to disk at step 17 with orbax-checkpoint, keeps going to step 67, and then,
as a restarted program would, rebuilds the learner (new closures, new jit), restores the
checkpoint into the abstract state of a fresh ``init`` and runs the same 50 steps: every leaf
must be equal bit for bit. The cases are shared with `test_determinism.py`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import metagrad as mg

NUM_TASKS = 4
DIM = 3
BATCH = 6
INTERRUPT = 17
RESUME_STEPS = 50
SIZES = (50, 200, 100, 400)  # dataset sizes of the tasks, for the PPS / temperature sampler


def _pool() -> jax.Array:
    # Row t = (a_t, c_t) of task t: y = tanh(x . a_t + c_t).
    return jax.random.normal(jax.random.key(1234), (NUM_TASKS, DIM + 1))


def loss_fn(params: Any, batch: Any) -> jax.Array:
    x, y = batch
    return jnp.mean((jnp.tanh(x @ params["w"] + params["b"]) - y) ** 2)


def sample_batch(key: jax.Array, task: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A batch of task `task` (an int, traced is fine)."""
    coef = _pool()[task]
    x = jax.random.normal(key, (BATCH, DIM))
    return x, jnp.tanh(x @ coef[:DIM] + coef[DIM])


def sample_tasks_batch(key: jax.Array, num: int) -> tuple[jax.Array, Any]:
    """`num` task ids (PPS-tempered sampling, q = 1/2) and one batch per task, stacked."""
    k_ids, k_data = jax.random.split(key)
    ids = mg.sample_tasks(k_ids, mg.task_probs(SIZES, q=0.5), num)
    batches = jax.vmap(sample_batch)(jax.random.split(k_data, num), ids)
    return ids, batches


def init_params() -> dict[str, jax.Array]:
    return {"w": jnp.full((DIM,), 0.1, jnp.float32), "b": jnp.zeros((), jnp.float32)}


@dataclasses.dataclass(frozen=True)
class Case:
    """A training loop: ``init(seed) -> state`` and a jitted ``step(state) -> state``."""

    name: str
    build: Callable[[], tuple[Callable[[int], Any], Callable[[Any], Any]]]
    # Checked on the state at the interruption, so the test covers what it claims to.
    at_interrupt: Callable[[Any], None] | None = None


def _optax_case(make_tx: Callable[[], optax.GradientTransformation], update: Callable) -> Callable:
    """A loop of ``params, opt = update(tx, params, opt, key)``."""

    def build():
        tx = make_tx()

        def init(seed):
            params = init_params()
            return {
                "params": params,
                "opt": tx.init(params),
                "key": jax.random.key(seed),
                "step": jnp.zeros((), jnp.int32),
            }

        @jax.jit
        def step(state):
            key, sub = jax.random.split(state["key"])
            params, opt = update(tx, state["params"], state["opt"], sub, state["step"])
            return {"params": params, "opt": opt, "key": key, "step": state["step"] + 1}

        return init, step

    return build


def _dotprod_update(tx, params, opt, key, step):
    del step
    k1, k2, kt = jax.random.split(key, 3)
    task = jax.random.randint(kt, (), 0, NUM_TASKS)
    b1, b2 = sample_batch(k1, task), sample_batch(k2, task)
    g1 = jax.grad(loss_fn)(params, b1)
    updates, opt = tx.update(g1, opt, params, grad_fn=lambda p: jax.grad(loss_fn)(p, b2))
    return optax.apply_updates(params, updates), opt


def _rotating_update(tx, params, opt, key, step):
    # Batches rotate across the tasks (Sequential Reptile through `reptile_outer`).
    batch = sample_batch(key, step % NUM_TASKS)
    updates, opt = tx.update(jax.grad(loss_fn)(params, batch), opt, params)
    return optax.apply_updates(params, updates), opt


def _multitask_update(tx, params, opt, key, step):
    # Per-task gradients stacked on a leading task axis, one batch of every task.
    del step
    batches = jax.vmap(sample_batch)(jax.random.split(key, NUM_TASKS), jnp.arange(NUM_TASKS))
    losses, grads = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))(params, batches)
    updates, opt = tx.update(grads, opt, params, losses=losses)
    return optax.apply_updates(params, updates), opt


def _learner_case(make_learner: Callable[[], mg.MetaLearner], tasks: Callable) -> Callable:
    """A loop of ``learner.step(state, tasks(key, step))``."""

    def build():
        learner = make_learner()

        def init(seed):
            return {
                "learner": learner.init(init_params()),
                "key": jax.random.key(seed),
                "step": jnp.zeros((), jnp.int32),
            }

        @jax.jit
        def step(state):
            key, sub = jax.random.split(state["key"])
            new, _ = learner.step(state["learner"], tasks(sub, state["step"]))
            return {"learner": new, "key": key, "step": state["step"] + 1}

        return init, step

    return build


def _maml_tasks(key, step):
    del step
    k_support, k_query = jax.random.split(key)
    ids, support = sample_tasks_batch(k_support, NUM_TASKS)
    query = jax.vmap(sample_batch)(jax.random.split(k_query, NUM_TASKS), ids)
    return support, query


def _reptile_tasks(key, step):
    del step
    batches = sample_tasks_batch(key, NUM_TASKS)[1]
    return batches, batches  # (support, query)


SEQ_K = 4


def _seq_reptile_tasks(key, step):
    # The Mixed schedule continues across steps through `start`, a function of the step.
    k_ids, k_data = jax.random.split(key)
    ids = mg.mixed_schedule(
        k_ids, NUM_TASKS, target=0, num=SEQ_K, ratio=(2, 1), epoch_length=6, start=step * SEQ_K
    )
    return ids, jax.vmap(sample_batch)(jax.random.split(k_data, SEQ_K), ids)


def _seq_loss(params, batch, task_id):
    del task_id
    return loss_fn(params, batch)


def _sampler_build():
    def init(seed):
        return {
            "counts": jnp.zeros((NUM_TASKS,), jnp.int32),
            "last": jnp.zeros((4,), jnp.int32),
            "key": jax.random.key(seed),
            "step": jnp.zeros((), jnp.int32),
        }

    @jax.jit
    def step(state):
        key, k1, k2, k3 = jax.random.split(state["key"], 4)
        probs = mg.task_probs(SIZES, q=0.2)
        draws = jnp.concatenate(
            [
                mg.sample_tasks(k1, probs, 2, replace=False),
                mg.uniform_tasks(k2, NUM_TASKS, 1),
                mg.mixed_schedule(k3, NUM_TASKS, 1, 1, ratio=2, start=state["step"]),
            ]
        )
        counts = state["counts"] + jnp.bincount(draws, length=NUM_TASKS)
        return {"counts": counts, "last": draws, "key": key, "step": state["step"] + 1}

    return init, step


def _mid_inner_loop(state):
    count = int(state["opt"].count)
    assert 0 < count < 5, f"interrupt at inner step {count}, not mid-inner-loop"


def _mid_dotprod_period(state):
    # every=5: periods of 4 calls (one regularized, three standard); interrupted within one.
    count = int(state["opt"][0].count)
    assert count % 4 != 0, f"interrupt at call {count}, at the start of a period"


def _nonzero_average(state):
    average = state["learner"].carry.average
    assert float(optax.tree.norm(average)) > 0, "grad_share's running average is still zero"


def _maml_pp_mid_anneal(state):
    count = int(state["learner"].count)
    weights = mg.maml_pp_weights(3, 30, count)
    assert 0 < count < 30 and not np.allclose(weights, weights[0]), "MAML++ weights not annealing"


CASES = [
    Case(
        "dotprod",
        _optax_case(
            lambda: optax.chain(mg.dotprod(weight=0.1, every=5), optax.adam(1e-2)),
            _dotprod_update,
        ),
        at_interrupt=_mid_dotprod_period,
    ),
    Case(
        "dotprod_exact_inject",
        _optax_case(
            lambda: optax.chain(
                optax.inject_hyperparams(mg.dotprod, static_args=("scheme",))(
                    weight=0.2, scheme="exact"
                ),
                optax.sgd(0.05, momentum=0.9),
            ),
            _dotprod_update,
        ),
    ),
    Case(
        "reptile_outer",
        # Interrupted at step 17 = 3 * 5 + 2: two inner steps into an outer step.
        _optax_case(
            lambda: mg.reptile_outer(optax.adam(0.05), 5, optax.adam(0.1)), _rotating_update
        ),
        at_interrupt=_mid_inner_loop,
    ),
    Case(
        "maml",
        _learner_case(lambda: mg.maml(loss_fn, optax.sgd(0.3), 2, optax.adam(1e-2)), _maml_tasks),
    ),
    Case(
        "fomaml_inner_state",
        _learner_case(
            lambda: mg.fomaml(
                loss_fn, optax.sgd(0.1, momentum=0.9), 2, optax.adam(1e-2), reset_inner_state=False
            ),
            _maml_tasks,
        ),
    ),
    Case(
        "meta_sgd",
        _learner_case(lambda: mg.maml(loss_fn, mg.meta_sgd(0.3), 1, optax.adam(1e-2)), _maml_tasks),
    ),
    Case(
        "maml_pp",
        _learner_case(
            lambda: mg.maml(
                loss_fn,
                mg.learned_lr(0.3, per_step=True, granularity="layer"),
                3,
                optax.adam(1e-2),
                multi_step_loss=30,
            ),
            _maml_tasks,
        ),
        at_interrupt=_maml_pp_mid_anneal,
    ),
    Case(
        "grad_share",
        _learner_case(
            lambda: mg.maml(loss_fn, mg.grad_share(0.3), 2, optax.adam(1e-2)), _maml_tasks
        ),
        at_interrupt=_nonzero_average,
    ),
    Case(
        "reptile",
        _learner_case(
            lambda: mg.reptile(
                loss_fn, optax.adam(0.05), 3, optax.adam(0.05), reset_inner_state=False
            ),
            _reptile_tasks,
        ),
    ),
    Case(
        "seq_reptile",
        _learner_case(
            lambda: mg.seq_reptile(
                _seq_loss, optax.adam(0.05), SEQ_K, 0.5, reset_inner_state=False, pass_task_id=True
            ),
            _seq_reptile_tasks,
        ),
    ),
    Case(
        "pcgrad",
        _optax_case(lambda: optax.chain(mg.pcgrad(seed=0), optax.adam(1e-2)), _multitask_update),
    ),
    Case(
        "gradvac",
        _optax_case(
            lambda: optax.chain(mg.gradvac(NUM_TASKS, beta=0.1, seed=1), optax.adam(1e-2)),
            _multitask_update,
        ),
    ),
    Case(
        "gradnorm",
        _optax_case(
            lambda: optax.chain(
                mg.gradnorm(NUM_TASKS, learning_rate=optax.adam(1e-2)), optax.adam(1e-2)
            ),
            _multitask_update,
        ),
    ),
    Case(
        "recadam",
        _optax_case(
            lambda: optax.chain(
                mg.mtl_sum(reduction="mean"), mg.recadam(1e-2, anneal_t0=20.0, pretrain_coef=1.0)
            ),
            _multitask_update,
        ),
    ),
    Case("samplers", _sampler_build),
]
CASE_IDS = [case.name for case in CASES]


@functools.cache
def built(name: str) -> tuple[Callable[[int], Any], Callable[[Any], Any]]:
    """The (init, jitted step) of a case, built once per session: compiling is the cost."""
    return next(case for case in CASES if case.name == name).build()


def start(init: Callable[[int], Any], seed: int) -> Any:
    """``init(seed)`` committed to the default device, like arrays restored by orbax.

    Committed and uncommitted arrays are different jit cache entries: without this, the
    first step after a restore would compile the step a second time (harmless, but slow).
    """
    return jax.device_put(init(seed), jax.devices()[0])


def run(step: Callable[[Any], Any], state: Any, num_steps: int) -> Any:
    for _ in range(num_steps):
        state = step(state)
    return state


def as_numpy(state: Any) -> Any:
    """The state's leaves as NumPy arrays, PRNG keys as their raw key data."""

    def leaf(x):
        if jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return jax.tree.map(leaf, state)


def assert_states_equal(actual: Any, expected: Any) -> None:
    """Same tree (NamedTuple types included), same dtypes, bit-identical values."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    actual, expected = as_numpy(actual), as_numpy(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype
        np.testing.assert_array_equal(a, e)


def _save(path, state):
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, state)
        checkpointer.wait_until_finished()


def _restore(path, init):
    # The target is the abstract state of a fresh `init`: it restores the NamedTuple types
    # and the typed PRNG keys (without a target orbax returns plain dicts and lists).
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path, jax.eval_shape(lambda: init(0)))


def _interrupted_and_uninterrupted(init, step, path, at_interrupt=None):
    state = run(step, start(init, 0), INTERRUPT)
    if at_interrupt is not None:
        at_interrupt(state)
    _save(path, state)
    return run(step, state, RESUME_STEPS)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_resume_from_disk_is_bit_identical(case, tmp_path):
    init, step = built(case.name)
    expected = _interrupted_and_uninterrupted(init, step, tmp_path / "ckpt", case.at_interrupt)

    restored = _restore(tmp_path / "ckpt", init)
    assert int(restored["step"]) == INTERRUPT
    actual = run(step, restored, RESUME_STEPS)

    assert_states_equal(actual, expected)
    # The run moved: equality of two frozen states would prove nothing.
    assert int(actual["step"]) == INTERRUPT + RESUME_STEPS
    assert not np.array_equal(as_numpy(actual["key"]), as_numpy(init(0)["key"]))


@pytest.mark.parametrize("name", ["grad_share", "reptile_outer"])
def test_resume_in_a_rebuilt_program(name, tmp_path):
    """As after a restart: a new learner (new closures, new jit) continues the checkpoint."""
    init, step = built(name)
    expected = _interrupted_and_uninterrupted(init, step, tmp_path / "ckpt")
    init, step = next(case for case in CASES if case.name == name).build()
    actual = run(step, _restore(tmp_path / "ckpt", init), RESUME_STEPS)
    assert_states_equal(actual, expected)


def test_restore_without_target_loses_namedtuples(tmp_path):
    """Why the restore needs a target: without one orbax returns dicts and lists."""
    learner = mg.maml(loss_fn, mg.grad_share(0.3), 2, optax.adam(1e-2))
    state = learner.init(init_params())
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", state)
        checkpointer.wait_until_finished()
        raw = checkpointer.restore(tmp_path / "ckpt")
        typed = checkpointer.restore(tmp_path / "ckpt", jax.eval_shape(lambda: state))
    assert not isinstance(raw, mg.MAMLState)
    assert isinstance(typed, mg.MAMLState)
    assert isinstance(typed.carry, mg.GradShareCarry)
    assert isinstance(typed.inner_params, mg.GradShareParams)
    assert_states_equal(typed, state)


def test_raw_key_data_round_trips(tmp_path):
    """Legacy uint32 keys (`jax.random.PRNGKey`, used by pcgrad's state) round-trip too."""
    state = {"key": jax.random.PRNGKey(3), "typed": jax.random.key(3)}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "ckpt", jax.eval_shape(lambda: state))
    assert restored["key"].dtype == jnp.uint32
    assert jnp.issubdtype(restored["typed"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.uniform(restored["typed"], (3,)), jax.random.uniform(state["typed"], (3,))
    )
    np.testing.assert_array_equal(restored["key"], state["key"])


def test_checkpoint_manager_snippet(tmp_path):
    """The README's checkpointing snippet, run as written (with `tmp_path` as directory)."""
    ckpt_dir = tmp_path / "run"
    # --- README snippet starts.
    import orbax.checkpoint as ocp

    loss = lambda p, b: jnp.mean((b[0] @ p - b[1]) ** 2)
    learner = mg.maml(loss, mg.grad_share(0.1), 2, optax.adam(1e-3))
    key = jax.random.key(0)
    state = {"learner": learner.init(jnp.zeros(3)), "key": key}  # everything a step needs

    def train_step(state):
        key, sub = jax.random.split(state["key"])
        x = jax.random.normal(sub, (5, 4, 3))  # 5 tasks of 4 points
        tasks = ((x, x.sum(-1)), (x, x.sum(-1)))  # (support, query)
        learner_state, _ = learner.step(state["learner"], tasks)
        return {"learner": learner_state, "key": key}

    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(ckpt_dir, options=options) as mngr:
        for step in range(30):
            state = train_step(state)
            if step % 10 == 9:
                mngr.save(step, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
    # --- (not in the README)
    trained = state

    # After a restart: rebuild `learner`, then restore into the structure `init` gives.
    abstract = jax.eval_shape(lambda: {"learner": learner.init(jnp.zeros(3)), "key": key})
    with ocp.CheckpointManager(ckpt_dir) as mngr:
        last = mngr.latest_step()
        state = mngr.restore(last, args=ocp.args.StandardRestore(abstract))
    # --- README snippet ends.
    assert last == 29
    assert isinstance(state["learner"], mg.MAMLState)
    assert int(state["learner"].count) == 30
    assert_states_equal(state, trained)
