"""Few-shot episodes: the datasets, the N-way K-shot sampler, tfds loading, and the loops.

The loops: `meta_train` (one jitted meta-step per sampled meta-batch, resumable from a
checkpoint) and `evaluate_episodes` (one jitted evaluation per held-out episode). Split out
of `experiments.fewshot` (which re-exports these names and describes the datasets).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import pickle
import threading
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    tfds_name: str
    train_splits: tuple[str, ...]
    test_splits: tuple[str, ...]
    image_size: int
    grayscale: bool
    # Label ranges [lo, hi) for meta-train and meta-test when the splits are not
    # class-disjoint (CUB); None keeps every class of the splits.
    train_classes: tuple[int, int] | None = None
    test_classes: tuple[int, int] | None = None


DATASETS = {
    # Rendered locally (experiments.glyphs), not from tfds; the splits are its alphabet splits.
    "glyphs": DatasetSpec("glyphs", ("background",), ("evaluation",), 28, True),
    "omniglot": DatasetSpec("omniglot", ("train",), ("test",), 28, True),
    "cub": DatasetSpec(
        "caltech_birds2011", ("train", "test"), ("train", "test"), 84, False, (0, 100), (150, 200)
    ),
    "mini_imagenet": DatasetSpec("mini_imagenet", ("train",), ("test",), 84, False),
}


def opt(args, name, default=None):
    """``args.<name>`` when given (not None), else `default`."""
    value = getattr(args, name, None) if args is not None else None
    return default if value is None else value


class EpisodeSampler:
    """N-way K-shot episodes from indexable sources of ``{"image", "label"}`` records.

    Any sequence of dicts works (a `tfds.data_source`, a list): ``len(source)`` and
    ``source[i]`` are all it uses. The class index (label -> indices) is built once by
    reading every record's label; classes with fewer than ``shots + queries`` examples
    are left out.

    Args:
      sources: the record sources (several are pooled, e.g. CUB's two splits).
      ways, shots, queries: N classes per episode, K support and Q query examples each.
      image_size: side of the square images the records are resized to.
      grayscale: keep one channel (Omniglot) instead of three.
      classes: an optional [lo, hi) label range to keep.
      index: a precomputed index, a list (one per source) of label arrays.
    """

    def __init__(
        self,
        sources: Sequence,
        *,
        ways: int,
        shots: int,
        queries: int,
        image_size: int,
        grayscale: bool,
        classes: tuple[int, int] | None = None,
        index: Sequence[np.ndarray] | None = None,
        label_key: str = "label",
        image_key: str = "image",
    ):
        for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.sources = list(sources)
        self.ways, self.shots, self.queries = ways, shots, queries
        self.image_size, self.grayscale = image_size, grayscale
        self.label_key, self.image_key = label_key, image_key
        if index is None:
            index = [self.read_labels(s, label_key) for s in self.sources]
        labels = np.concatenate([np.asarray(x, np.int64) for x in index])
        refs = np.concatenate(
            [np.stack([np.full(len(x), i), np.arange(len(x))], 1) for i, x in enumerate(index)]
        )
        keep = np.ones(len(labels), bool)
        if classes is not None:
            keep = (labels >= classes[0]) & (labels < classes[1])
        by_class = {}
        for label in np.unique(labels[keep]):
            members = refs[keep & (labels == label)]
            if len(members) >= shots + queries:
                by_class[int(label)] = members
        if len(by_class) < ways:
            raise ValueError(
                f"ways={ways} needs {ways} classes with at least shots + queries = "
                f"{shots + queries} examples; the data have {len(by_class)}"
            )
        self.classes = np.array(sorted(by_class))
        self.by_class = by_class

    @staticmethod
    def read_labels(source, label_key: str = "label") -> np.ndarray:
        """The labels of every record (decodes each record once)."""
        return np.array([int(source[i][label_key]) for i in range(len(source))], np.int64)

    def _image(self, ref) -> np.ndarray:
        from PIL import Image

        image = np.asarray(self.sources[ref[0]][int(ref[1])][self.image_key])
        if image.ndim == 2:
            image = image[..., None]
        image = image[..., :1] if self.grayscale else np.repeat(image, 3 // image.shape[-1], -1)
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        pil = pil.resize((self.image_size, self.image_size), Image.BILINEAR)
        out = np.asarray(pil, np.float32) / 255.0
        return out[..., None] if out.ndim == 2 else out

    def _images(self, refs) -> np.ndarray:
        """The images of ``refs`` (``[n, 2]`` source/record pairs) as float32 ``[n, H, W, C]``.

        Sources that hold their images as one array (``source.images``, uint8 ``[n, H, W]`` or
        ``[n, H, W, C]`` already at ``image_size``, e.g. `experiments.glyphs.GlyphSource`)
        are gathered with one indexing operation; others are read record by record. Both
        give the same numbers.
        """
        refs = np.asarray(refs).reshape(-1, 2)
        arrays = [getattr(s, "images", None) for s in self.sources]
        size = (self.image_size, self.image_size)
        if all(isinstance(a, np.ndarray) and a.shape[1:3] == size for a in arrays):
            channels = 1 if self.grayscale else 3
            out = np.empty((len(refs), *size, channels), np.float32)
            for i, a in enumerate(arrays):
                rows = refs[:, 0] == i
                x = a[refs[rows, 1]]
                x = x[..., None] if x.ndim == 3 else x
                x = x[..., :1] if self.grayscale else np.repeat(x, 3 // x.shape[-1], -1)
                out[rows] = x.astype(np.float32) / 255.0
            return out
        return np.stack([self._image(r) for r in refs])

    def episode(self, rng: np.random.Generator):
        """One episode: ``((support_x, support_y), (query_x, query_y))``.

        Shapes ``[N·K, H, W, C]``, ``[N·K]``, ``[N·Q, H, W, C]``, ``[N·Q]``; labels are
        0..N−1 in a random assignment of the drawn classes.
        """
        chosen = rng.choice(self.classes, self.ways, replace=False)
        support, query = [], []
        for members in (self.by_class[int(c)] for c in chosen):
            pick = members[rng.choice(len(members), self.shots + self.queries, replace=False)]
            support.append(pick[: self.shots])
            query.append(pick[self.shots :])
        sx = self._images(np.concatenate(support))
        qx = self._images(np.concatenate(query))
        sy = np.repeat(np.arange(self.ways, dtype=np.int32), self.shots)
        qy = np.repeat(np.arange(self.ways, dtype=np.int32), self.queries)
        return (sx, sy), (qx, qy)

    def meta_batch(self, rng: np.random.Generator, size: int):
        """``size`` episodes stacked on a leading task axis."""
        episodes = [self.episode(rng) for _ in range(size)]
        return jax.tree.map(lambda *xs: np.stack(xs), *episodes)


def load_sources(spec, splits: Sequence[str], data_dir: str | None):
    """`tfds.data_source` for each split of ``spec.tfds_name`` (no download: prepared data)."""
    import tensorflow_datasets as tfds

    return [
        tfds.data_source(spec.tfds_name, split=s, data_dir=data_dir, download=False) for s in splits
    ]


def cached_index(sources, spec, splits: Sequence[str], cache_dir=None):
    """Labels per source, read once; saved as .npy under ``cache_dir`` when one is given."""
    out = []
    for source, split in zip(sources, splits, strict=True):
        if cache_dir is None:
            out.append(EpisodeSampler.read_labels(source))
            continue
        tag = hashlib.sha1(f"{spec.tfds_name}/{split}/{len(source)}".encode()).hexdigest()[:12]
        path = pathlib.Path(cache_dir) / f"{spec.tfds_name}_{split}_{tag}.npy"
        if path.exists():
            labels = np.load(path)
        else:
            labels = EpisodeSampler.read_labels(source)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, labels)
        out.append(labels)
    return out


def glyph_sources(seed: int = 0, cache_dir=None, classes_per_alphabet: int | None = None):
    """``{split: GlyphSource}`` of the rendered glyph set (`experiments.glyphs.load`, cached)."""
    from experiments import glyphs

    data = glyphs.load(seed, classes_per_alphabet=classes_per_alphabet, cache_dir=cache_dir)
    return {split: data.source(split) for split in ("background", "evaluation")}


def make_samplers(
    dataset: str,
    *,
    ways: int,
    shots: Sequence[int],
    queries: int,
    eval_queries: int | None = None,
    args=None,
):
    """``(train sampler per shot, test sampler per shot)`` for `dataset`, one code path.

    Test episodes have `eval_queries` queries per class (default: `queries`).

    Glyphs come from `glyph_sources` (seeded by ``--fewshot-glyphs-seed``, cached in
    ``--fewshot-glyphs-cache``); the tfds datasets from `load_sources`. Both go through the
    same `EpisodeSampler`.
    """
    spec = DATASETS[dataset]
    if dataset == "glyphs":
        small = opt(args, "fewshot_glyphs_classes_per_alphabet")
        found = glyph_sources(
            opt(args, "fewshot_glyphs_seed", 0), opt(args, "fewshot_glyphs_cache"), small
        )
        train_src, test_src = [found["background"]], [found["evaluation"]]
        train_index, test_index = [train_src[0].labels], [test_src[0].labels]
    else:
        if opt(args, "fewshot_tfds_name"):
            spec = dataclasses.replace(spec, tfds_name=args.fewshot_tfds_name)
        data_dir, index_cache = opt(args, "fewshot_data_dir"), opt(args, "fewshot_index_cache")
        try:
            train_src = load_sources(spec, spec.train_splits, data_dir)
            test_src = load_sources(spec, spec.test_splits, data_dir)
        except Exception as e:
            raise RuntimeError(
                f"dataset {spec.tfds_name!r} is not available locally ({type(e).__name__}: {e}). "
                "Prepare it in array_record format (e.g. `tfds build "
                f"{spec.tfds_name} --file_format=array_record`) and pass --fewshot-data-dir, "
                "or use --fewshot-dataset glyphs (rendered locally)."
            ) from e
        train_index = cached_index(train_src, spec, spec.train_splits, index_cache)
        test_index = cached_index(test_src, spec, spec.test_splits, index_cache)

    def samplers(sources, index, classes, q):
        return {
            k: EpisodeSampler(
                sources,
                ways=ways,
                shots=k,
                queries=q,
                classes=classes,
                index=index,
                image_size=spec.image_size,
                grayscale=spec.grayscale,
            )
            for k in shots
        }

    train = samplers(train_src, train_index, spec.train_classes, queries)
    test = samplers(test_src, test_index, spec.test_classes, eval_queries or queries)
    return train, test


class held_out_episodes:  # noqa: N801 - used like a function returning a sequence
    """``count`` fixed episodes (the same for every method of a run), drawn lazily.

    Every iteration draws the same episodes again from the seed, so large images (CUB) are
    never all held in memory; ``head(n)`` is the first n of them.
    """

    def __init__(self, sampler: EpisodeSampler, count: int, seed: int):
        self.sampler, self.count, self.seed = sampler, count, seed

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        rng = np.random.default_rng([self.seed, 2, self.sampler.shots])
        for _ in range(self.count):
            yield self.sampler.episode(rng)

    def head(self, n: int) -> held_out_episodes:
        return held_out_episodes(self.sampler, min(n, self.count), self.seed)


# -- loops ---------------------------------------------------------------------------------


def evaluate_episodes(evaluate, state, episodes) -> np.ndarray:
    """Accuracy per episode; dispatched asynchronously, read back once."""
    return np.asarray(jax.device_get([evaluate(state, s, q) for s, q in episodes]), float)


def ci95(accs: np.ndarray) -> float:
    return float(1.96 * accs.std(ddof=1) / np.sqrt(len(accs))) if len(accs) > 1 else float("nan")


def curve_recorder(evaluate, episodes, every: int, total: int, curve: list):
    """``on_step`` for `meta_train`: appends ``(iteration, mean accuracy)`` to `curve`."""

    def on_step(it, state):
        if it % every == 0 or it == total:
            curve.append((it, float(evaluate_episodes(evaluate, state, episodes).mean())))

    return on_step


def meta_train(
    learner,
    params0,
    sampler,
    *,
    iterations,
    meta_batch,
    seed,
    progress,
    on_step=None,
    desc=None,
    checkpoint=None,
    save_every=100,
    keep=None,
    tag=None,
    prepare=None,
):
    """Meta-trains from `params0`; returns ``(state, losses)``.

    ``on_step(iteration, state)`` is called after each outer step (e.g. to evaluate). With
    a `checkpoint` path, the state, losses, sampler position and the lists in `keep` (e.g.
    a learning curve) are saved there every `save_every` steps and at the end, and a run
    finding that file (made with the same `tag`, e.g. the settings) starts where it stopped.
    ``prepare(tasks)`` maps each sampled meta-batch before the step (e.g. Reptile's pooling).
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng([seed, 1])
    state, losses, start, keep = learner.init(params0), [], 0, keep or {}
    path = pathlib.Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        saved = pickle.loads(path.read_bytes())
        if saved["tag"] != tag:
            raise ValueError(f"checkpoint {path} was made with other settings: use another --out")
        state = jax.tree.map(jnp.asarray, saved["state"])
        losses, start = saved["losses"], saved["iteration"]
        rng.bit_generator.state = saved["rng"]
        for name, values in keep.items():
            values[:] = saved["keep"][name]

    def save(it):
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = dict(iteration=it, state=jax.device_get(state), losses=losses, tag=tag)
        blob |= dict(rng=rng.bit_generator.state, keep={k: list(v) for k, v in keep.items()})
        path.with_suffix(".tmp").write_bytes(pickle.dumps(blob))
        path.with_suffix(".tmp").replace(path)

    step = jax.jit(learner.step)
    bar = tqdm(range(start, iterations), desc=desc, disable=not progress, leave=False)
    for it in bar:
        tasks = sampler.meta_batch(rng, meta_batch)
        if prepare is not None:
            tasks = prepare(tasks)
        state, metrics = step(state, tasks)
        losses.append(float(metrics["loss"]))
        if on_step is not None:
            on_step(it + 1, state)
        if (it + 1) % save_every == 0 or it + 1 == iterations:
            save(it + 1)
    return state, losses


class CompileClock:
    """Counts the XLA compilations of the calling thread and their seconds (a `jax.monitoring`
    listener, registered once; JAX reports a compilation in the thread that asked for it)."""

    _local = threading.local()
    _registered = False

    @classmethod
    def _get(cls):
        return getattr(cls._local, "count", 0), getattr(cls._local, "seconds", 0.0)

    @classmethod
    def start(cls):
        if not cls._registered:
            jax.monitoring.register_event_duration_secs_listener(cls._listen)
            cls._registered = True
        return cls._get()

    @classmethod
    def _listen(cls, event, duration, **kwargs):
        if event.endswith("backend_compile_duration"):
            count, seconds = cls._get()
            cls._local.count, cls._local.seconds = count + 1, seconds + duration

    @classmethod
    def since(cls, mark):
        count, seconds = cls._get()
        return count - mark[0], seconds - mark[1]
