"""One API: every meta-learner takes the same tasks, loss, keywords, and reports the same metrics.

The README's meta-learning snippet says "or mg.fomaml / mg.reptile": the learners are meant to be
swapped on the same `loss_fn` and the same `(support, query)` tasks. These tests hold every
learner of that family to it, and every learner (Sequential Reptile too) to the shared keywords.
"""

import inspect
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg

# The learners of `tasks = (support, query)`; Sequential Reptile takes one trajectory instead.
SWAPPABLE = ("maml", "fomaml", "reptile", "imaml")
LEARNERS = tuple(n for n in SWAPPABLE if hasattr(mg, n))
SHARED = {
    "axis_name": None,
    "task_loop": "auto",
    "step_loop": "auto",
    "reset_inner_state": True,
    "alignment": False,
}
METRICS = {"loss", "loss_pre", "loss_post", "meta_grad_norm"}


def _loss(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _tasks(seed, num_tasks=3):
    rng = np.random.default_rng(seed)

    def batch():
        x = rng.standard_normal((num_tasks, 6, 2)).astype(np.float32)
        y = rng.standard_normal((num_tasks, 6, 1)).astype(np.float32)
        return x, y

    return batch(), batch()


def _params():
    return {"w": jnp.full((2, 1), 0.1), "b": jnp.zeros(1)}


def _make(name, **kwargs):
    return getattr(mg, name)(_loss, optax.sgd(0.1), 2, optax.adam(1e-2), **kwargs)


def test_the_swappable_learners_exist():
    assert {"maml", "fomaml", "reptile"} <= set(LEARNERS)


@pytest.mark.parametrize("name", LEARNERS)
def test_swap_same_tasks_and_loss(name):
    """The same loss and tasks run through every learner, with the same metrics and adapt."""
    learner = _make(name, alignment=True)
    state = learner.init(_params())
    for seed in range(2):
        state, metrics = learner.step(state, _tasks(seed))
    assert METRICS | {"alignment"} <= set(metrics), sorted(metrics)
    for key, value in metrics.items():
        assert np.shape(value) == () and np.isfinite(value), (key, value)
    assert -1.0 <= float(metrics["alignment"]) <= 1.0
    # The meta-objective every learner reports is the query loss after adaptation.
    np.testing.assert_allclose(metrics["loss_post"], metrics["loss"], rtol=1e-6)
    # A reset inner state is None in every learner's state.
    assert state.inner_state is None
    support, query = _tasks(7, 1)
    one = jax.tree.map(lambda x: x[0], support)
    adapted = learner.adapt(state, one)
    assert jax.tree.structure(adapted) == jax.tree.structure(_params())
    # Adaptation decreases the support loss of a fresh task from the learned initialization.
    assert _loss(adapted, one) < _loss(state.params, one)


@pytest.mark.parametrize("name", LEARNERS)
def test_outer_step_size_means_sgd(name):
    """``outer`` may be an optax optimizer or a step size meaning ``optax.sgd(step size)``."""
    make = getattr(mg, name)
    a = make(_loss, optax.sgd(0.1), 2, 0.3)
    b = make(_loss, optax.sgd(0.1), 2, optax.sgd(0.3))
    sa, ma = a.step(a.init(_params()), _tasks(3))
    sb, mb = b.step(b.init(_params()), _tasks(3))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), sa.params, sb.params)


def test_inner_step_size_means_sgd():
    """``inner`` may be a step size meaning ``optax.sgd(step size)``, as ``outer`` may: the
    same numbers, bit for bit, in every learner, `reptile_outer` and `adapt`."""
    params, tasks = _params(), _tasks(4, num_tasks=2)
    support0 = jax.tree.map(lambda x: x[0], tasks[0])
    seq_tasks = (jnp.array([0, 1]), jax.tree.map(lambda x: x[:, 0], tasks[0]))

    def learner(name):
        def run(inner):
            make = getattr(mg, name)
            if name == "seq_reptile":
                lrn = make(_loss, inner, 2, 0.5)
                return lrn.step(lrn.init(params), seq_tasks)[0].params
            lrn = make(_loss, inner, 1, 0.5)
            return lrn.step(lrn.init(params), tasks)[0].params

        return run

    def reptile_outer(inner):
        tx = mg.reptile_outer(inner, 1)
        grads = jax.grad(_loss)(params, support0)
        return tx.update(grads, tx.init(params), params)[0]

    def adapt(inner):
        return mg.adapt(_loss, inner, params, support0, 1)

    runs = {name: learner(name) for name in LEARNERS + ("seq_reptile",)}
    runs.update(reptile_outer=reptile_outer, adapt=adapt)
    assert {"maml", "fomaml", "reptile", "imaml"} <= set(runs)
    for name, run in runs.items():
        expected = run(optax.sgd(0.1))
        # A schedule too, once (the same helper serves every learner).
        for inner in (0.1,) + ((optax.constant_schedule(0.1),) if name == "adapt" else ()):
            got = run(inner)
            jax.tree.map(np.testing.assert_array_equal, got, expected)
            assert jax.tree.structure(got) == jax.tree.structure(expected), name


ALL_LEARNERS = LEARNERS + ("seq_reptile",)


@pytest.mark.parametrize("name", ALL_LEARNERS)
def test_every_learner_accepts_the_shared_keywords(name):
    params = inspect.signature(getattr(mg, name)).parameters
    for keyword, default in SHARED.items():
        assert keyword in params, f"mg.{name} lacks {keyword}"
        assert params[keyword].kind is inspect.Parameter.KEYWORD_ONLY, (name, keyword)
        assert params[keyword].default == default, (name, keyword, params[keyword].default)
    # The first four arguments are the same everywhere.
    assert list(params)[:4] == ["loss_fn", "inner", "inner_steps", "outer"], name


@pytest.mark.parametrize("name", ALL_LEARNERS)
@pytest.mark.parametrize(
    "keyword,value,error",
    [
        ("axis_name", 0, TypeError),
        ("task_loop", "loop", ValueError),
        ("step_loop", "while", ValueError),
        ("reset_inner_state", "yes", TypeError),
        ("alignment", 1, TypeError),
    ],
)
def test_shared_keywords_are_checked_alike(name, keyword, value, error):
    with pytest.raises(error, match=keyword):
        getattr(mg, name)(_loss, optax.sgd(0.1), 2, 0.1, **{keyword: value})


@pytest.mark.parametrize("name", ALL_LEARNERS)
def test_an_unknown_keyword_is_refused_as_python_would(name):
    # fomaml forwards its keywords to maml, which names itself (as before the shared keywords).
    called = "maml" if name == "fomaml" else name
    with pytest.raises(
        TypeError, match=rf"^{called}\(\) got an unexpected keyword argument 'xyz'$"
    ):
        getattr(mg, name)(_loss, optax.sgd(0.1), 2, 0.1, xyz=True)


@pytest.mark.parametrize("name", [n for n in ALL_LEARNERS if n != "fomaml"])
def test_the_shared_keywords_are_documented_in_every_learner(name):
    """The documentation of `mg.LearnerOptions` stands in each learner's Args, in place of
    ``**options``, with the same text (one source). (fomaml's Args refer to maml's.)"""
    doc = inspect.getdoc(getattr(mg, name))
    shared = inspect.getdoc(mg.LearnerOptions)
    args = doc.split("Args:", 1)[1].split("Returns:", 1)[0]
    assert "**options" not in doc
    for keyword in SHARED:
        entry = f"  {keyword}: "
        assert args.count(entry) == 1, (name, keyword)
        first_line = args.split(entry, 1)[1].splitlines()[0]
        assert first_line in shared, (name, keyword)
    assert typing.get_type_hints(mg.LearnerOptions) == {
        "reset_inner_state": bool, "alignment": bool, "axis_name": str | None,
        "task_loop": str, "step_loop": str,
    }  # fmt: skip


@pytest.mark.parametrize("name", LEARNERS)
def test_alignment_needs_two_tasks(name):
    learner = _make(name, alignment=True)
    with pytest.raises(ValueError, match="alignment=True needs at least 2 tasks"):
        learner.step(learner.init(_params()), _tasks(0, num_tasks=1))


def test_device_axis_keyword_is_axis_name_everywhere():
    """No public function spells the device axis another way."""
    for name in mg.__all__:
        obj = getattr(mg, name)
        if not callable(obj) or isinstance(obj, type):
            continue
        for keyword in inspect.signature(obj).parameters:
            assert keyword == "axis_name" or "axis" not in keyword, (name, keyword)
