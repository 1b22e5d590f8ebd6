"""Few-shot image classification: the episode sampler, Conv-4, and an episode through MAML.

The real datasets cannot be downloaded here; `tfds.testing.mock_data` serves
`tfds.data_source` with random records of the real feature specs, which exercises the
loading code unchanged. Label-correctness checks use an in-memory source whose images
encode their label (mock labels and images are random, so they cannot show that).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg
from experiments import fewshot
from experiments.models import conv4_apply, conv4_init

tfds = pytest.importorskip("tensorflow_datasets")


def _labelled_source(num_classes=8, per_class=4, size=12):
    """Records whose every pixel equals 10 * label + 5, so images reveal their class."""
    return [
        {"image": np.full((size, size, 3), 10 * c + 5, np.uint8), "label": np.int64(c)}
        for c in range(num_classes)
        for _ in range(per_class)
    ]


def test_episode_shapes_and_labels_follow_classes():
    source = _labelled_source()
    sampler = fewshot.EpisodeSampler(
        [source], ways=3, shots=2, queries=2, image_size=6, grayscale=False
    )
    (sx, sy), (qx, qy) = sampler.episode(np.random.default_rng(0))
    assert sx.shape == (6, 6, 6, 3) and qx.shape == (6, 6, 6, 3)
    assert sx.dtype == np.float32 and sy.dtype == np.int32
    np.testing.assert_array_equal(sy, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(qy, [0, 0, 1, 1, 2, 2])
    # Decode each image's original class from its pixel value.
    cls = lambda x: np.round((x[:, 0, 0, 0] * 255 - 5) / 10).astype(int)  # noqa: E731
    support_cls, query_cls = cls(sx), cls(qx)
    for way in range(3):
        # All support and query examples of a way come from one class ...
        assert len(set(support_cls[sy == way]) | set(query_cls[qy == way])) == 1
    # ... and the three ways are three different classes.
    assert len(set(support_cls)) == 3


def test_support_and_query_are_disjoint_records():
    # One class per label value, each record a distinct image value.
    source = [{"image": np.full((4, 4, 1), i, np.uint8), "label": i // 5} for i in range(20)]
    sampler = fewshot.EpisodeSampler(
        [source], ways=4, shots=2, queries=3, image_size=4, grayscale=True
    )
    rng = np.random.default_rng(1)
    for _ in range(5):
        (sx, _), (qx, _) = sampler.episode(rng)
        ids = np.round(np.concatenate([sx, qx])[:, 0, 0, 0] * 255).astype(int)
        assert len(set(ids)) == len(ids) == 4 * 5
        assert sx.shape[-1] == 1


def test_classes_too_small_or_filtered_out():
    source = _labelled_source(num_classes=4, per_class=2)
    with pytest.raises(ValueError, match="ways=3"):
        fewshot.EpisodeSampler([source], ways=3, shots=2, queries=1, image_size=4, grayscale=False)
    sampler = fewshot.EpisodeSampler(
        [source], ways=2, shots=1, queries=1, image_size=4, grayscale=False, classes=(2, 4)
    )
    assert sampler.classes.tolist() == [2, 3]
    with pytest.raises(ValueError, match="shots"):
        fewshot.EpisodeSampler([source], ways=2, shots=0, queries=1, image_size=4, grayscale=False)


def test_meta_batch_stacks_episodes():
    sampler = fewshot.EpisodeSampler(
        [_labelled_source()], ways=2, shots=1, queries=3, image_size=5, grayscale=True
    )
    (sx, sy), (qx, qy) = sampler.meta_batch(np.random.default_rng(0), 4)
    assert sx.shape == (4, 2, 5, 5, 1) and sy.shape == (4, 2)
    assert qx.shape == (4, 6, 5, 5, 1) and qy.shape == (4, 6)


@pytest.mark.parametrize("size,channels", [(28, 1), (12, 3)])
def test_conv4_shapes(size, channels):
    params = conv4_init(jax.random.key(0), channels, 5, size, hidden=8)
    assert len(params) == 5 and params[0]["w"].shape == (3, 3, channels, 8)
    x = jax.random.uniform(jax.random.key(1), (6, size, size, channels))

    @jax.jit
    def outputs(params, x):
        return {
            "all": conv4_apply(params, x),
            "first": conv4_apply(params, x[:3]),
            "all_no_bn": conv4_apply(params, x, batch_norm=False),
            "first_no_bn": conv4_apply(params, x[:3], batch_norm=False),
        }

    out = outputs(params, x)
    assert out["all"].shape == (6, 5)
    # Batch norm uses the batch's own statistics: an example's logits depend on the
    # rest of its batch, and do not when batch norm is off.
    assert not np.allclose(out["first"], out["all"][:3], atol=1e-4)
    np.testing.assert_allclose(out["first_no_bn"], out["all_no_bn"][:3], rtol=1e-5, atol=1e-6)


def test_mock_data_source_episodes():
    """tfds.data_source (mocked) -> the episode sampler, record by record."""
    spec = fewshot.DATASETS["omniglot"]
    with tfds.testing.mock_data(num_examples=200):
        sources = fewshot.load_sources(spec, spec.train_splits, None)
        assert len(sources[0]) == 200
        sampler = fewshot.EpisodeSampler(
            sources, ways=3, shots=1, queries=1, image_size=spec.image_size, grayscale=True
        )
        tasks = sampler.meta_batch(np.random.default_rng(0), 2)
    (sx, sy), (qx, qy) = tasks
    assert sx.shape == (2, 3, 28, 28, 1) and qx.shape == (2, 3, 28, 28, 1)
    assert 0.0 <= sx.min() and sx.max() <= 1.0


def test_shared_sgd_evaluator_adapts_as_the_learners_do():
    """MAML/FOMAML/Meta-SGD/ANIL share one compiled evaluator: SGD with a rate per
    parameter. It must adapt as each learner's own `adapt` does (Meta-SGD with random
    learned rates; ANIL adapting the head only)."""
    rng = np.random.default_rng(0)
    params = conv4_init(jax.random.key(0), 1, 3, 8, hidden=2)
    support = (rng.uniform(size=(3, 8, 8, 1)).astype(np.float32), np.arange(3, dtype=np.int32))
    adapt = jax.jit(fewshot.sgd_adapt, static_argnums=3)
    for method in ("meta_sgd", "anil"):
        learner = fewshot.make_learner(method, inner_lr=0.4, inner_steps=1)
        state = learner.init(params)
        if method == "meta_sgd":
            rates = jax.tree.map(lambda r: r * rng.uniform(0, 2, r.shape), state.inner_params)
            state = state._replace(inner_params=rates)
        expected = learner.adapt(state, support, num_steps=2)
        got = adapt(state.params, fewshot.sgd_rates(method, state, 0.4), support, 2)
        for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # ANIL's body is not adapted, its head is.
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(got[:-1]), jax.tree.leaves(params[:-1]), strict=True)
    )
    assert not np.allclose(got[-1]["w"], params[-1]["w"])


class _Stream:
    """A sampler of linear-regression tasks (support, query) for `meta_train`."""

    def meta_batch(self, rng, size):
        w = rng.normal(size=(size, 1, 3))
        x = rng.normal(size=(size, 2, 4, 3)).astype(np.float32)
        y = np.sum(x * w[:, None], -1).astype(np.float32)
        return (x[:, 0], y[:, 0]), (x[:, 1], y[:, 1])


def test_meta_train_resumes_where_it_stopped(tmp_path):
    """Checkpointed training stopped after 3 of 5 steps and resumed == 5 steps at once."""
    loss = lambda p, b: jnp.mean((b[0] @ p["w"] - b[1]) ** 2)  # noqa: E731
    learner = mg.fomaml(loss, optax.sgd(0.1), 1, optax.adam(0.1))
    params, kw = {"w": jnp.zeros(3)}, dict(meta_batch=2, seed=0, progress=False)
    state, losses = fewshot.meta_train(learner, params, _Stream(), iterations=5, **kw)
    path, curve = tmp_path / "ck.pkl", []
    record = lambda it, s: curve.append(it)  # noqa: E731
    ck = dict(checkpoint=path, save_every=2, keep={"curve": curve}, tag="a", on_step=record)
    fewshot.meta_train(learner, params, _Stream(), iterations=3, **kw, **ck)
    curve.clear()  # restored from the checkpoint
    again, losses2 = fewshot.meta_train(learner, params, _Stream(), iterations=5, **kw, **ck)
    assert curve == [1, 2, 3, 4, 5] and losses2 == losses
    np.testing.assert_array_equal(again.params["w"], state.params["w"])
    with pytest.raises(ValueError, match="other settings"):
        fewshot.meta_train(learner, params, _Stream(), iterations=5, **kw, **(ck | {"tag": "b"}))


def test_missing_dataset_error_says_how_to_prepare(tmp_path):
    with pytest.raises(RuntimeError, match="tfds build"):
        fewshot.run(
            tmp_path,
            budget="tiny",
            progress=False,
            args=type(
                "A",
                (),
                {"fewshot_data_dir": str(tmp_path / "empty"), "fewshot_dataset": "omniglot"},
            )(),
        )
