"""The data of `experiments.dotprod_sweep` (scratch setting): per seed a pool of examples whose
first n train and whose tail tests, and symmetric label noise."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from experiments.dotprod_sweep import Config

GLYPH_INSTANCES = 20  # per class in the rendered set
GLYPH_TEST = 10  # test images per class


# -- data: per seed a pool [P, D] whose first n examples train and whose tail tests ----------


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    x: np.ndarray  # float32 [seeds, P, D]
    y: np.ndarray  # int32 [seeds, P] clean labels
    sizes: tuple[int, ...]  # training-set sizes n (train = pool[:n])
    test_from: int  # test = pool[test_from:]
    num_classes: int
    size_labels: tuple[str, ...]
    classes: np.ndarray | None = None  # glyphs: the classes of each seed's problem [S, C]
    # The fine-tuning setting: each seed's pretraining set, disjoint from the target task.
    pretrain_x: np.ndarray | None = None
    pretrain_y: np.ndarray | None = None
    pretrain_classes: int = 0


def digits_problem(cfg: Config, seed: int) -> Problem:
    from experiments.digits import load_digits

    x, y = load_digits()
    rng = np.random.default_rng([seed, 1])
    perms = np.stack([rng.permutation(len(y)) for _ in range(cfg.seeds)])
    sizes = tuple(sorted(cfg.digits_sizes))
    return Problem("digits", x[perms], y[perms], sizes, sizes[-1], 10, tuple(map(str, sizes)))


def glyph_problem(cfg: Config, seed: int) -> Problem:
    """Per seed `glyph_classes` random classes, interleaved so pool[:k·C] has k per class."""
    from experiments import glyphs

    data = glyphs.load(0)
    images = data.images.astype(np.float32) / 255.0
    images = images.reshape(-1, 14, 2, 14, 2).mean((2, 4)).reshape(len(images), -1)
    rng = np.random.default_rng([seed, 2])
    c = cfg.glyph_classes
    xs, ys, picked = [], [], []
    for _ in range(cfg.seeds):
        classes = rng.choice(data.num_classes, c, replace=False)
        picked.append(classes)
        rows = np.stack([np.flatnonzero(data.labels == k) for k in classes])  # [C, 20]
        rows = np.stack([rng.permutation(r) for r in rows])
        xs.append(images[rows.T.reshape(-1)])  # instance-major: j·C + class
        ys.append(np.tile(np.arange(c, dtype=np.int32), rows.shape[1]))
    shots = tuple(sorted(cfg.glyph_shots))
    return Problem(
        "glyphs",
        np.stack(xs),
        np.stack(ys),
        tuple(k * c for k in shots),
        (GLYPH_INSTANCES - GLYPH_TEST) * c,
        c,
        tuple(f"{k}/class" for k in shots),
        np.stack(picked),
    )


def noisy_labels(key, y, rate, num_classes):
    """Symmetric noise: with probability `rate` a label becomes a uniform *other* class."""
    k1, k2 = jax.random.split(key)
    flip = jax.random.uniform(k1, y.shape) < rate
    shift = jax.random.randint(k2, y.shape, 1, num_classes)
    return jnp.where(flip, (y + shift) % num_classes, y)
