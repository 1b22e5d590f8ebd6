"""Meta DotProd over the regime where it is supposed to help: small, noisy training sets.

Kedia et al. (2021) report gains from adding ``weight · ∇(G₁·G₂)`` (the gradient that
raises the dot product between two batch gradients) to single-task fine-tuning, chiefly on
small datasets, at the weight 0.1 (their ``LR_{G1G2}``; Figure 3 sweeps it from 0.1 down to
1e-5), and show larger batch-gradient dot products during training (their Figure 4). The
default-suite `experiments.digits` run compares methods at one setting (500 digits, weight
0.1) and finds no gain. This sweep looks for the regime where the regularizer helps, over

- the weight: 0 (the baseline: the same two batches per Adam step, ``G = Ḡ₁ + Ḡ₂``, so
  weight 0 differs from DotProd *only* by the regularizer), the paper's 0.1, and others;
- the training-set size: small (digits: 50 to 500 of the 1797 images; glyphs: 2 to 10
  images per class);
- symmetric label noise on the training labels: 0, 20 %, 40 % (a label is replaced by a
  uniformly drawn *other* class with that probability; test labels stay clean);

on two single-task problems, each a plain classification trained from scratch (the default
``--dotprod-sweep-setting scratch``; ``finetune`` pretrains on disjoint classes first, see
`experiments.dotprod_sweep_finetune`):

- ``digits``: scikit-learn's 8×8 digits (as `experiments.digits`), MLP 64-64-64-10; per
  seed a random permutation: the first n images train, the images after the largest n
  (1297) test, so every size of a seed is tested on the same images.
- ``glyphs``: the rendered characters of `experiments.glyphs` (20 instances per class),
  per seed 20 random classes as a 20-way problem, images average-pooled to 14×14, MLP
  196-64-64-20; k images per class train, the last 10 of each class test.

Training: Adam (lr 1e-3), batches of 16 drawn with replacement from the n training
examples, ``optax.chain(mg.dotprod(weight=w), optax.adam(1e-3))``: every step consumes two
batches (b₁ for Ḡ₁, b₂ for ``grad_fn``), the same number of steps for every cell of the grid
(so the smallest sets are trained for many epochs, where over-fitting, and a regularizer,
matters most). No early stopping, no weight decay. These settings were fixed before looking
at any result.

Pairing: within a seed every cell (weight, size, noise) shares the initialization, the
batch-drawing keys, the split and the noise draws; only the weight (resp. size, noise) differs.
The table reports test accuracy mean ± standard error over seeds and the paired difference
to weight 0 (mean ± s.e. of the per-seed differences), which is what decides "helps".

Cost: one jitted call per chunk runs the whole grid, vmapped over seeds × noise × sizes ×
weights (``weight`` is a traced scalar of `mg.dotprod`), a `jax.lax.scan` over the steps.
Figure 4's quantity: every ``log_every`` steps, the mean dot product (and cosine) between the
gradients of consecutive batches among 8 fresh training batches (noisy labels, as trained on).

Outcome of the full budget (8 seeds, 1200 steps; seed 0; README and the notes have the table):
no cell where DotProd improves test accuracy beyond about two standard errors, at any weight up
to 0.1 and at any size or noise level; weight 0.3 diverges everywhere and 0.1 diverges in most
seeds once the labels are noisy and the set is not tiny (the regularizer maximizes an unbounded
dot product; the exact HVP scheme diverges as well); where it does not diverge, weight 0.1
raises the consecutive-batch gradient dot product 1.2-1.8x, as in the paper's Figure 4.
tests/test_dotprod_sweep.py pins only the divergence at weight 1.

Outputs (``dotprod_sweep_finetune*`` in the finetune setting): ``dotprod_sweep.{json,csv}``,
``dotprod_sweep_raw.npz`` (every run's numbers) and the figures of `dotprod_sweep_plots`.

References:
  Kedia, Chinthakindi, Ryu, `Beyond Reptile: Meta-Learned Dot-Product Maximization between
  Gradients for Improved Single-Task Regularization
  <https://aclanthology.org/2021.findings-emnlp.37/>`_, Findings of EMNLP 2021.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metagrad as mg
from experiments import config, writers
from experiments.config import option
from experiments.dotprod_sweep_data import (  # noqa: F401 - re-exported
    GLYPH_INSTANCES,
    GLYPH_TEST,
    Problem,
    digits_problem,
    glyph_problem,
    noisy_labels,
)
from experiments.models import mlp_apply, mlp_init

NAME = "dotprod_sweep"
DESCRIPTION = (
    "Meta DotProd weight x training-set size x label noise on digits and glyph classification "
    "(optional): test accuracy ± s.e., paired difference to weight 0, gradient dot products"
)
LONG = True  # minutes at the quick budget: a parallel run starts it first

DATASETS = ("digits", "glyphs")
LR = 1e-3
BATCH = 16
HIDDEN = 64
DOT_BATCHES = 8  # fresh batches whose consecutive gradient dot products are logged


@dataclasses.dataclass(frozen=True)
class Config:
    seeds: int = option("seeds", minimum=2)
    steps: int = option("Adam steps (two batches of 16 each) per run", minimum=1)
    log_every: int = option("steps between gradient dot-product logs", minimum=1)
    weights: tuple[float, ...] = option("DotProd weights (0 = the baseline)", type=float, many=True)
    digits_sizes: tuple[int, ...] = option(
        "digits training-set sizes", default=(50, 100, 200, 500), type=int, many=True
    )
    glyph_shots: tuple[int, ...] = option(
        "glyph training images per class", default=(2, 5, 10), type=int, many=True
    )
    glyph_classes: int = option("glyph classes per problem", default=20, minimum=2)
    noise: tuple[float, ...] = option(
        "label-noise rates of the training labels", default=(0.0, 0.2, 0.4), type=float, many=True
    )
    datasets: tuple[str, ...] = option("datasets", default=DATASETS, choices=DATASETS, many=True)
    setting: str = option(
        "scratch (train from a fresh init) or finetune (pretrain on disjoint classes, then "
        "fine-tune a fresh head and the pretrained body; see dotprod_sweep_finetune)",
        default="scratch",
        choices=("scratch", "finetune"),
    )
    finetune_lr: float = option("Adam learning rate of the finetune setting", default=3e-4,
                                type=float)  # fmt: skip
    pretrain_steps: int = option("pretraining Adam steps (finetune setting)", default=1000,
                                 minimum=1)  # fmt: skip
    scheme: str = option(
        "mg.dotprod's G1G2 scheme: forward (the paper's finite difference) or exact (HVP)",
        default="forward",
        choices=("forward", "central", "exact"),
    )

    def __post_init__(self):
        object.__setattr__(self, "log_every", min(self.log_every, self.steps))
        object.__setattr__(self, "steps", self.steps // self.log_every * self.log_every)
        if 0.0 not in self.weights:
            raise ValueError(f"weights must include 0 (the baseline), got {self.weights}")
        if any(w < 0 for w in self.weights):
            raise ValueError(f"weights must be >= 0, got {self.weights}")
        if any(not 0 <= p < 1 for p in self.noise):
            raise ValueError(f"noise rates must be in [0, 1), got {self.noise}")
        if any(s < 1 for s in self.digits_sizes) or max(self.digits_sizes) > 1500:
            raise ValueError(f"digits_sizes must be in [1, 1500], got {self.digits_sizes}")
        if any(not 1 <= k <= GLYPH_INSTANCES - GLYPH_TEST for k in self.glyph_shots):
            raise ValueError(
                f"glyph_shots must be in [1, {GLYPH_INSTANCES - GLYPH_TEST}], "
                f"got {self.glyph_shots}"
            )


BUDGETS = {
    "tiny": dict(seeds=2, steps=40, log_every=20, weights=(0.0, 0.1)),
    "quick": dict(seeds=5, steps=600, log_every=50, weights=(0.0, 0.01, 0.1)),
    "full": dict(seeds=8, steps=1200, log_every=100, weights=(0.0, 0.001, 0.01, 0.03, 0.1, 0.3)),
}


def add_arguments(parser) -> None:
    config.add_options(parser, Config, BUDGETS, NAME)


def _loss(params, batch):
    x, y = batch
    logits = mlp_apply(params, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


# -- the grid, vmapped: seeds x noise x sizes x weights --------------------------------------


def _make(problem: Problem, cfg: Config):
    """(init, chunk, final), each over the whole grid [seeds, noise, sizes, weights]."""
    grad = jax.grad(_loss)
    dims = (problem.x.shape[-1], HIDDEN, HIDDEN, problem.num_classes)

    lr = cfg.finetune_lr if cfg.setting == "finetune" else LR

    def tx_of(weight):
        return optax.chain(mg.dotprod(weight=weight, scheme=cfg.scheme), optax.adam(lr))

    def batch_of(key, n, x, y):
        idx = jax.random.randint(key, (BATCH,), 0, n)
        return x[idx], y[idx]

    def init_one(weight, params):
        return params, tx_of(weight).init(params)

    def chunk_one(carry, weight, n, x, y, key):
        params, opt_state = carry
        tx = tx_of(weight)

        def body(c, k):
            p, s = c
            k1, k2 = jax.random.split(k)
            b1, b2 = batch_of(k1, n, x, y), batch_of(k2, n, x, y)
            g1 = grad(p, b1)
            u, s = tx.update(g1, s, p, grad_fn=lambda q: grad(q, b2))
            return (optax.apply_updates(p, u), s), None

        keys = jax.random.split(key, cfg.log_every + 1)
        (params, opt_state), _ = jax.lax.scan(body, (params, opt_state), keys[1:])
        batches = jax.vmap(batch_of, in_axes=(0, None, None, None))(
            jax.random.split(keys[0], DOT_BATCHES), n, x, y
        )
        grads = jax.vmap(grad, in_axes=(None, 0))(params, batches)
        gram = mg.pairwise_dot(grads)
        norms = jnp.sqrt(jnp.diagonal(gram))
        dots = jnp.diagonal(gram, 1)
        cos = dots / jnp.maximum(norms[:-1] * norms[1:], 1e-30)
        return (params, opt_state), (jnp.mean(dots), jnp.mean(cos))

    def final_one(params, n, x, y_clean, y_noisy):
        test_x, test_y = x[problem.test_from :], y_clean[problem.test_from :]
        test_acc = jnp.mean(jnp.argmax(mlp_apply(params, test_x), -1) == test_y)
        train_mask = jnp.arange(x.shape[0]) < n
        hit = jnp.argmax(mlp_apply(params, x), -1) == y_noisy
        train_acc = jnp.sum(hit * train_mask) / n
        return {"test_acc": test_acc, "train_acc": train_acc}

    sizes = jnp.asarray(problem.sizes, jnp.int32)
    weights = jnp.asarray(cfg.weights, jnp.float32)

    def init_cells(params):
        # Same initialization for every cell of a seed: broadcast over noise, size, weight.
        def per_seed(p):
            cell = jax.vmap(lambda w: init_one(w, p))(weights)  # [W, ...]
            cell = jax.tree.map(
                lambda a: jnp.broadcast_to(a, (len(problem.sizes),) + a.shape), cell
            )
            return jax.tree.map(lambda a: jnp.broadcast_to(a, (len(cfg.noise),) + a.shape), cell)

        return jax.vmap(per_seed)(params)

    init_cells = jax.jit(init_cells)

    def init_all(keys, body=None):
        # One eager `mlp_init` per seed (the same draws as under vmap): compiling the random
        # draws under jit and vmap costs seconds more than these few eager calls. With
        # `body` (pretrained params per seed) the hidden layers are the pretrained ones.
        params = [mlp_init(k, dims) for k in keys]
        if body is not None:
            params = [
                [jax.tree.map(lambda a, s=s: a[s], layer) for layer in body[:-1]] + p[-1:]
                for s, p in enumerate(params)
            ]
        return init_cells(jax.tree.map(lambda *a: jnp.stack(a), *params))

    f = jax.vmap(chunk_one, in_axes=(0, 0, None, None, None, None))  # weights
    f = jax.vmap(f, in_axes=(0, None, 0, None, None, None))  # sizes
    f = jax.vmap(f, in_axes=(0, None, None, None, 0, None))  # noise (labels)
    f = jax.vmap(f, in_axes=(0, None, None, 0, 0, 0))  # seeds (data, labels, keys)
    chunk_grid = jax.jit(lambda carry, x, y, keys: f(carry, weights, sizes, x, y, keys))

    g = jax.vmap(final_one, in_axes=(0, None, None, None, None))  # weights
    g = jax.vmap(g, in_axes=(0, 0, None, None, None))  # sizes
    g = jax.vmap(g, in_axes=(0, None, None, None, 0))  # noise
    g = jax.vmap(g, in_axes=(0, None, 0, 0, 0))  # seeds
    final_grid = jax.jit(lambda params, x, y, y_noisy: g(params, sizes, x, y, y_noisy))
    return init_all, chunk_grid, final_grid


def train_grid(problem: Problem, cfg: Config, seed: int, *, progress: bool):
    """Trains the whole grid; returns (metrics [S, Z, N, W], dots and cosines [S, Z, N, W, T])."""
    from tqdm.auto import tqdm

    init_all, chunk, final = _make(problem, cfg)
    seed_keys = jax.random.split(jax.random.key(seed), cfg.seeds)
    x, y = jnp.asarray(problem.x), jnp.asarray(problem.y)
    noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(seed_keys)
    y_noisy = jax.vmap(
        lambda k, yy: jax.vmap(lambda r: noisy_labels(k, yy, r, problem.num_classes))(
            jnp.asarray(cfg.noise, jnp.float32)
        )
    )(noise_keys, y)  # [S, Z, P]; the same flips at every rate's threshold
    init_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(seed_keys)
    body = None
    if cfg.setting == "finetune":
        from experiments import dotprod_sweep_finetune as ft

        pre_keys = jax.vmap(lambda k: jax.random.fold_in(k, 10**6))(seed_keys)
        body, pretrain_acc = ft.pretrain(problem, cfg, pre_keys, HIDDEN)
        print(f"{problem.name}: pretraining accuracy per seed {np.round(pretrain_acc, 3)}")
    carry = init_all(init_keys, body)
    dots, cosines = [], []
    chunks = cfg.steps // cfg.log_every
    desc = f"dotprod_sweep {problem.name}"
    with tqdm(total=cfg.steps, desc=desc, disable=not progress, leave=False) as bar:
        for i in range(chunks):
            keys = jax.vmap(lambda k, i=i: jax.random.fold_in(k, i + 2))(seed_keys)
            carry, (dot, cos) = chunk(carry, x, y_noisy, keys)
            dots.append(np.asarray(dot))
            cosines.append(np.asarray(cos))
            bar.update(cfg.log_every)
    metrics = final(carry[0], x, y, y_noisy)
    metrics = {k: np.asarray(v) for k, v in metrics.items()}
    return metrics, np.stack(dots, -1), np.stack(cosines, -1)


def _se(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def summarize(problem: Problem, cfg: Config, metrics, dots, cosines) -> list[dict]:
    rows = []
    base = cfg.weights.index(0.0)
    acc = metrics["test_acc"]  # [S, Z, N, W]
    for z, rate in enumerate(cfg.noise):
        for n, size in enumerate(problem.size_labels):
            for w, weight in enumerate(cfg.weights):
                a = acc[:, z, n, w]
                diff = a - acc[:, z, n, base]
                rows.append(
                    {
                        "method": f"DotProd w={weight:g}",
                        "dataset": problem.name,
                        "train_size": size,
                        "noise": rate,
                        "weight": weight,
                        "test_acc": float(a.mean()),
                        "test_acc_stderr": _se(a),
                        "diff_vs_w0": float(diff.mean()),
                        "diff_vs_w0_stderr": _se(diff),
                        "train_acc": float(metrics["train_acc"][:, z, n, w].mean()),
                        "grad_dot": float(dots[:, z, n, w].mean()),
                        "grad_cosine": float(cosines[:, z, n, w].mean()),
                        "seeds": cfg.seeds,
                    }
                )
    return rows


def run(
    out_dir: pathlib.Path,
    *,
    budget: str = "quick",
    seed: int = 0,
    progress: bool = True,
    args: argparse.Namespace | None = None,
) -> list[dict]:
    """Trains the grid on each dataset; writes dotprod_sweep.{json,csv} and the two PNGs."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = config.resolve(Config, BUDGETS, budget, args, NAME)
    makers = {"digits": digits_problem, "glyphs": glyph_problem}
    stem = NAME
    if cfg.setting == "finetune":
        from experiments import dotprod_sweep_finetune as ft

        makers = {"digits": ft.digits_problem, "glyphs": ft.glyph_problem}
        stem = f"{NAME}_finetune"
    rows, results = [], {}
    for name in cfg.datasets:
        try:
            problem = makers[name](cfg, seed)
            metrics, dots, cosines = train_grid(problem, cfg, seed, progress=progress)
        except Exception as e:  # noqa: BLE001 - reported in the table, the others go on
            rows.append(writers.error_row(out_dir, f"{name}", e))
            continue
        results[name] = {"problem": problem, "metrics": metrics, "dots": dots}
        rows.extend(summarize(problem, cfg, metrics, dots, cosines))
    if results:
        from experiments import dotprod_sweep_plots

        dotprod_sweep_plots.plot(out_dir, cfg, results, stem)
    writers.write_json(
        out_dir / f"{stem}.json",
        {
            "config": dataclasses.asdict(cfg) | {"budget": budget, "seed": seed},
            "rows": rows,
            "per_seed_test_acc": {n: r["metrics"]["test_acc"].tolist() for n, r in results.items()},
            "grad_dot_trace": {n: r["dots"].mean(0).tolist() for n, r in results.items()},
            "log_every_steps": cfg.log_every,
        },
    )
    writers.write_csv(out_dir / f"{stem}.csv", rows)
    # Every run's numbers, to re-plot or re-analyse without training again.
    np.savez_compressed(
        out_dir / f"{stem}_raw.npz",
        **{f"{n}_{k}": v for n, r in results.items() for k, v in r["metrics"].items()},
        **{f"{n}_grad_dot": r["dots"] for n, r in results.items()},
    )
    return rows
