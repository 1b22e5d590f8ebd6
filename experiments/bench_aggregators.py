"""Benchmark section "aggregators": the cost of aggregating T task gradients, relative to them.

For each model and number of tasks T, in one run:

- the time of computing the T task gradients (``jax.grad`` over the tasks' batches, vmapped in
  chunks of 10 tasks, jitted: the gradients a multi-task step needs anyway);
- the time of each aggregator's ``update`` on those stacked gradients (jitted, the
  gradients precomputed), and its ratio to the gradients' time.

The models are the few-shot ones of `experiments.models`: Conv-4 (32 channels, 28×28×1
images) and ResNet-12 (channels 64-160-320-640, 12.4M parameters, 32×32×3 images by default),
each task a 5-way episode of 1 support and 15 query images per class (80 images;
``--agg-per-class``). Times are
the minimum over `--agg-rounds` rounds of one call each, the gradients and the aggregators
interleaved in every round, so that a busy machine slows both alike. Images are random: the
times do not depend on the pixels.

Run: ``python -m experiments.benchmark --only aggregators`` (``--agg-tasks 2 10 40``,
``--agg-models conv4 resnet12``).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax

import metagrad as mg
from experiments.models import conv4_apply, conv4_init, resnet12_apply, resnet12_init

WAYS = 5
GRAM_PATH = ("mgda", "cagrad", "nash_mtl", "imtl_g", "aligned_mtl", "upgrad", "dualproj",
             "config")  # fmt: skip
OTHERS = ("mtl_sum", "pcgrad", "graddrop")


def add_arguments(parser):
    group = parser.add_argument_group("aggregators")
    group.add_argument("--agg-tasks", nargs="*", type=int, default=[2, 10], help="T values")
    group.add_argument(
        "--agg-models", nargs="*", choices=("conv4", "resnet12"), default=["conv4", "resnet12"]
    )
    group.add_argument("--agg-rounds", type=int, default=3, help="timing rounds")
    group.add_argument("--agg-image", type=int, default=32, help="ResNet-12 image size")
    group.add_argument(
        "--agg-per-class", type=int, default=16, help="images per class of a task's episode"
    )


def _xent(logits, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _model(name, image):
    key = jax.random.PRNGKey(0)
    if name == "conv4":
        params = conv4_init(key, 1, WAYS, 28, 32, batch_norm=False)
        loss = lambda p, b: _xent(conv4_apply(p, b[0], batch_norm=False), b[1])
        return "Conv-4", params, loss, (28, 28, 1)
    params = resnet12_init(key, 3, WAYS)
    loss = lambda p, b: _xent(resnet12_apply(p, b[0]), b[1])
    return "ResNet-12", params, loss, (image, image, 3)


def _aggregator(name, num_tasks):
    if name == "nash_mtl":
        return mg.nash_mtl(num_tasks)
    if name == "graddrop":
        return mg.graddrop(seed=0)
    return getattr(mg, name)()


def _task_gradients(loss, chunk):
    def grads(params, batches):
        return jax.lax.map(lambda b: jax.grad(loss)(params, b), batches, batch_size=chunk)

    return jax.jit(grads)


def _timed(fn, *args):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def run(args) -> list[dict]:
    rows = []
    for model in args.agg_models:
        label, params, loss, shape = _model(model, args.agg_image)
        count = sum(x.size for x in jax.tree.leaves(params))
        leaves = len(jax.tree.leaves(params))
        for num_tasks in args.agg_tasks:
            # Tasks vmapped in chunks of 10 (one bigger batch of the shared model per chunk).
            grads_fn = _task_gradients(loss, min(num_tasks, 10))
            key = jax.random.PRNGKey(num_tasks)
            per_class = args.agg_per_class
            x = jax.random.normal(key, (num_tasks, WAYS * per_class, *shape))
            y = jnp.tile(jnp.repeat(jnp.arange(WAYS), per_class), (num_tasks, 1))
            grads = jax.block_until_ready(grads_fn(params, (x, y)))  # compiles
            methods = {}
            for name in GRAM_PATH + OTHERS:
                tx = _aggregator(name, num_tasks)
                update = jax.jit(tx.update)
                state = tx.init(params)
                jax.block_until_ready(update(grads, state, params))  # compiles
                methods[name] = (update, state)
            gram = jax.jit(mg.pairwise_dot)
            jax.block_until_ready(gram(grads))
            best = {name: float("inf") for name in (*methods, "gram", "grads")}
            for _ in range(args.agg_rounds):
                best["grads"] = min(best["grads"], _timed(grads_fn, params, (x, y)))
                best["gram"] = min(best["gram"], _timed(gram, grads))
                for name, (update, state) in methods.items():
                    best[name] = min(best[name], _timed(update, grads, state, params))
            base = best["grads"]
            for name in ("gram", *methods):
                rows.append({
                    "model": f"{label} ({count / 1e6:.2f}M params, {leaves} leaves, "
                             f"{shape[0]}x{shape[1]}x{shape[2]}, {WAYS * per_class} images/task)",
                    "T": num_tasks,
                    "method": name,
                    "path": "gram" if name in GRAM_PATH else "other",
                    "agg_ms": round(1e3 * best[name], 2),
                    "grads_ms": round(1e3 * base, 1),
                    "ratio_pct": round(100 * best[name] / base, 2),
                })  # fmt: skip
            del grads, methods
    return rows
