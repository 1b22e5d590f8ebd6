"""Few-shot episodes: the N-way K-shot sampler shared by every dataset, and tfds loading.

Split out of `experiments.fewshot` (which re-exports these names).
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Sequence

import jax
import numpy as np


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
