"""The fine-tuning setting of `experiments.dotprod_sweep` (``--dotprod-sweep-setting finetune``).

Closer to the paper's regime (a pretrained model fine-tuned on a small target task with a
small learning rate) than training from scratch:

- ``digits``: the MLP 64-64-64-5 is pretrained (plain Adam, lr 1e-3, batches of 32) on every
  image of classes 0-4; the target task is the 5-way classification of classes 5-9, per seed
  a random permutation of their images: the first n train, the images after the largest n
  test.
- ``glyphs``: per seed the MLP 196-64-64-P is pretrained on `PRETRAIN_GLYPH_CLASSES` random
  glyph classes (all 20 images each); the target task is `glyph_classes` *other* classes
  (disjoint from the pretraining ones), k images per class train, the last 10 test.

Fine-tuning keeps the pretrained hidden layers and draws a fresh output layer (the same draw
for every cell of a seed), then trains every cell of the grid (weight × size × noise) with
``optax.chain(mg.dotprod(weight=w), optax.adam(finetune_lr))`` as the scratch setting does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.models import mlp_apply, mlp_init

PRETRAIN_LR = 1e-3
PRETRAIN_BATCH = 32
PRETRAIN_GLYPH_CLASSES = 200


def digits_problem(cfg, seed: int):
    from experiments.digits import load_digits
    from experiments.dotprod_sweep import Problem

    x, y = load_digits()
    source, target = y < 5, y >= 5
    rng = np.random.default_rng([seed, 3])
    rows = np.flatnonzero(target)
    perms = np.stack([rows[rng.permutation(len(rows))] for _ in range(cfg.seeds)])
    sizes = tuple(sorted(cfg.digits_sizes))
    if sizes[-1] >= len(rows) - 100:
        raise ValueError(f"digits_sizes must leave >= 100 of the {len(rows)} images of 5-9")
    problem = Problem("digits", x[perms], (y[perms] - 5).astype(np.int32), sizes, sizes[-1], 5,
                      tuple(map(str, sizes)))  # fmt: skip
    px = np.broadcast_to(x[source], (cfg.seeds,) + x[source].shape)
    py = np.broadcast_to(y[source].astype(np.int32), (cfg.seeds, source.sum()))
    return dataclasses.replace(problem, pretrain_x=px, pretrain_y=py, pretrain_classes=5)


def glyph_problem(cfg, seed: int):
    """The scratch setting's glyph problem, plus pretraining classes disjoint from its own."""
    from experiments import dotprod_sweep as ds
    from experiments import glyphs

    problem = ds.glyph_problem(cfg, seed)
    data = glyphs.load(0)
    images = data.images.astype(np.float32) / 255.0
    images = images.reshape(-1, 14, 2, 14, 2).mean((2, 4)).reshape(len(images), -1)
    pick = np.random.default_rng([seed, 4])
    xs, ys = [], []
    for target in problem.classes:
        rest = np.setdiff1d(np.arange(data.num_classes), target)
        classes = pick.choice(rest, PRETRAIN_GLYPH_CLASSES, replace=False)
        rows = np.concatenate([np.flatnonzero(data.labels == k) for k in classes])
        remap = np.full(data.num_classes, -1, np.int32)
        remap[classes] = np.arange(len(classes))
        xs.append(images[rows])
        ys.append(remap[data.labels[rows]])
    return dataclasses.replace(problem, pretrain_x=np.stack(xs), pretrain_y=np.stack(ys),
                               pretrain_classes=PRETRAIN_GLYPH_CLASSES)  # fmt: skip


def pretrain(problem, cfg, keys, hidden: int):
    """Plain Adam on each seed's pretraining set; returns (params per seed, train accuracy)."""
    dims = (problem.x.shape[-1], hidden, hidden, problem.pretrain_classes)
    tx = optax.adam(PRETRAIN_LR)

    def loss(p, x, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(mlp_apply(p, x), y))

    def one(params, x, y, key):
        def body(c, k):
            p, s = c
            idx = jax.random.randint(k, (PRETRAIN_BATCH,), 0, x.shape[0])
            u, s = tx.update(jax.grad(loss)(p, x[idx], y[idx]), s, p)
            return (optax.apply_updates(p, u), s), None

        steps = jax.random.split(key, cfg.pretrain_steps)
        (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), steps)
        acc = jnp.mean(jnp.argmax(mlp_apply(params, x), -1) == y)
        return params, acc

    params = [mlp_init(k, dims) for k in keys]
    params = jax.tree.map(lambda *a: jnp.stack(a), *params)
    run = jax.jit(jax.vmap(one))
    keys2 = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    params, acc = run(params, jnp.asarray(problem.pretrain_x), jnp.asarray(problem.pretrain_y),
                      keys2)  # fmt: skip
    return params, np.asarray(acc)
