"""Single-task regularization on scikit-learn's 8×8 digits (the DotProd paper's setting, small).

Kedia et al. (2021) add the gradient of the dot product between the gradients of two
batches to ordinary single-task training and report better test scores (their Tables 4-7)
and larger batch-gradient dot products during training (their Figure 4). This experiment
reproduces that comparison at laptop scale: a small MLP classifier (64-64-10, ReLU) on the
8×8 digits that ship inside scikit-learn, with a limited training set (500 examples, the
other 1297 for testing), every seed drawing its own split, initialization and batches.

Methods, all with Adam (lr 1e-3) and batches of 32:

- ``plain``: one batch per Adam step.
- ``dotprod``: ``optax.chain(mg.dotprod(weight=0.1), optax.adam(1e-3))``; each step takes
  two batches (b1 gives the gradient passed in, b2 the ``grad_fn``).
- ``reptile``: ``mg.reptile_outer(optax.adam(1e-3), 4, 0.5, reset_inner_state=False)``:
  every call is an inner Adam step on one batch; every 4th call moves the outer weights
  halfway to the inner ones (the DotProd paper keeps k = 4 for Reptile and FOMAML); one
  task throughout, so the Adam state carries over outer steps.
- ``fomaml``: single-task FOMAML-style (our choice): each step splits its two batches into
  support b1 and query b2, takes one inner SGD step on b1 (lr 0.1) and applies the query
  gradient at the adapted weights, ∇L(θ − α∇L(θ; b1); b2), with Adam; this is `mg.fomaml`
  on a meta-batch of one task. Its expectation holds the dot-product term −α·H₂·g₁ that
  DotProd scales explicitly.

Budget: every method consumes the same number of batches (the same epochs over the
training set), so DotProd and FOMAML take half as many optimizer steps (two batches each)
with 1.5× and 1× plain training's gradient evaluations respectively; the table reports the
gradient evaluations. Test accuracy is the mean ± standard error over seeds, vmapped.

The DotProd paper's Figure 4 quantity, the dot product between the gradients of two
consecutive batches at the current weights, is logged during training (`mg.pairwise_dot`
on the stacked gradients of 16 fresh batches, averaged over the 15 consecutive pairs) and
plotted per method with its cosine.

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
from experiments.models import mlp_apply, mlp_init

NAME = "digits"
DESCRIPTION = (
    "single-task regularization on sklearn 8x8 digits (500 training examples): plain vs "
    "DotProd vs Reptile vs FOMAML-style, test accuracy ± s.e. over seeds, gradient dot products"
)

METHODS = ("plain", "dotprod", "reptile", "fomaml")
LABELS = {
    "plain": "plain Adam",
    "dotprod": "DotProd",
    "reptile": "Reptile (reptile_outer)",
    "fomaml": "FOMAML-style",
}
# Gradient evaluations per two batches consumed.
GRAD_EVALS_PER_ROUND = {"plain": 2, "dotprod": 3, "reptile": 2, "fomaml": 2}

BATCH = 32
LR = 1e-3
HIDDEN = 64
DOT_BATCHES = 16  # batches whose consecutive gradient dot products are logged


@dataclasses.dataclass(frozen=True)
class Config:
    seeds: int = option("seeds", minimum=2)
    batches: int = option("batches of 32 consumed per run", minimum=1)
    log_every: int = 50  # in batches; also the chunk of one jitted call
    train_size: int = option("training examples", default=500, minimum=1)
    methods: tuple[str, ...] = option("methods", default=METHODS, choices=METHODS, many=True)
    dotprod_weight: float = option("DotProd weight", default=0.1, type=float)
    reptile_k: int = 4
    reptile_outer: float = 0.5
    fomaml_inner_lr: float = 0.1

    def __post_init__(self):
        # Whole rounds of two batches, whole Reptile cycles, whole logging chunks.
        batches = max(8, self.batches)
        log_every = max(8, min(self.log_every, batches) // 8 * 8)
        object.__setattr__(self, "log_every", log_every)
        object.__setattr__(self, "batches", batches // log_every * log_every)


BUDGETS = {
    "tiny": dict(seeds=2, batches=40, log_every=20),
    "quick": dict(seeds=5, batches=1600, log_every=50),
    "full": dict(seeds=10, batches=10000, log_every=200),
}


def add_arguments(parser) -> None:
    config.add_options(parser, Config, BUDGETS, NAME)


def load_digits():
    """The 1797 8×8 digit images scaled to [0, 1], as float32 [1797, 64] and int32 labels."""
    from sklearn.datasets import load_digits as sk_load

    data = sk_load()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int32)


def _loss(params, batch):
    x, y = batch
    logits = mlp_apply(params, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _accuracy(params, x, y):
    return jnp.mean(jnp.argmax(mlp_apply(params, x), -1) == y)


# -- one method: a "round" consumes two batches ----------------------------------------------


def _make_round(name: str, cfg: Config):
    """(init(params) -> opt_state, round(params, opt_state, b1, b2) -> (params, opt_state))."""
    grad = jax.grad(_loss)

    def two_steps(tx):
        # One optimizer step per batch: the round of the methods that see one batch at a time.
        def round_fn(params, opt_state, b1, b2):
            for b in (b1, b2):
                updates, opt_state = tx.update(grad(params, b), opt_state, params)
                params = optax.apply_updates(params, updates)
            return params, opt_state

        return tx.init, round_fn

    if name == "plain":
        return two_steps(optax.adam(LR))
    if name == "dotprod":
        tx = optax.chain(mg.dotprod(weight=cfg.dotprod_weight), optax.adam(LR))

        def round_fn(params, opt_state, b1, b2):
            updates, opt_state = tx.update(
                grad(params, b1), opt_state, params, grad_fn=lambda p: grad(p, b2)
            )
            return optax.apply_updates(params, updates), opt_state

        return tx.init, round_fn
    if name == "reptile":
        # One task throughout: the inner Adam state carries over outer steps.
        tx = mg.reptile_outer(
            optax.adam(LR), cfg.reptile_k, cfg.reptile_outer, reset_inner_state=False
        )
        return two_steps(tx)
    if name == "fomaml":
        learner = mg.fomaml(_loss, optax.sgd(cfg.fomaml_inner_lr), 1, optax.adam(LR))

        def init(params):
            return learner.init(params)

        def round_fn(params, state, b1, b2):
            # One task: support b1, query b2 (a leading task axis of size 1).
            tasks = jax.tree.map(lambda x: x[None], (b1, b2))
            state, _ = learner.step(state, tasks)
            return state.params, state

        return init, round_fn
    raise ValueError(f"unknown digits method {name!r}; choose from {METHODS}")


def splits(cfg: Config, seed_keys, n_total: int):
    """Per seed: (train indices [seeds, train_size], test indices [seeds, rest])."""
    perm = jax.jit(jax.vmap(lambda k: jax.random.permutation(k, n_total)))(seed_keys)
    return perm[:, : cfg.train_size], perm[:, cfg.train_size :]


@jax.jit
def _final(params, train_idx, test_idx, x_all, y_all):
    def one(p, tr, te):
        return {
            "test_acc": _accuracy(p, x_all[te], y_all[te]),
            "test_loss": _loss(p, (x_all[te], y_all[te])),
            "train_acc": _accuracy(p, x_all[tr], y_all[tr]),
        }

    return jax.vmap(one)(params, train_idx, test_idx)


def _make_chunk(name: str, cfg: Config, x_all, y_all):
    """(init, chunk): chunk is jitted and seed-vmapped, runs `log_every` batches, logs a dot."""
    init_opt, round_fn = _make_round(name, cfg)
    grad = jax.grad(_loss)
    pairwise_dot = mg.pairwise_dot

    def batch_of(key, train_idx):
        idx = train_idx[jax.random.randint(key, (BATCH,), 0, train_idx.shape[0])]
        return x_all[idx], y_all[idx]

    def init_one(key):
        params = mlp_init(key, (x_all.shape[1], HIDDEN, 10))
        return params, init_opt(params)

    def chunk_one(carry, train_idx, key):
        params, opt_state = carry

        def body(c, k):
            p, s = c
            k1, k2 = jax.random.split(k)
            return round_fn(p, s, batch_of(k1, train_idx), batch_of(k2, train_idx)), None

        keys = jax.random.split(key, cfg.log_every // 2 + 1)
        (params, opt_state), _ = jax.lax.scan(body, (params, opt_state), keys[1:])
        # Figure 4's quantity: the dot product of two consecutive batches' gradients.
        # Averaged over DOT_BATCHES - 1 consecutive pairs of a fresh batch sequence, to
        # tame the noise of single pairs (the paper smooths over 100 batches instead).
        batches = jax.vmap(batch_of, in_axes=(0, None))(
            jax.random.split(keys[0], DOT_BATCHES), train_idx
        )
        grads = jax.vmap(grad, in_axes=(None, 0))(params, batches)
        gram = pairwise_dot(grads)
        norms = jnp.sqrt(jnp.diagonal(gram))
        dots = jnp.diagonal(gram, 1)
        cosines = dots / jnp.maximum(norms[:-1] * norms[1:], 1e-30)
        return (params, opt_state), (jnp.mean(dots), jnp.mean(cosines))

    # init runs once per method, eagerly (op by op, no compilation of its own).
    return jax.vmap(init_one), jax.jit(jax.vmap(chunk_one))


def train_method(name: str, cfg: Config, seed_keys, x_all, y_all, *, progress: bool):
    """Trains one method for every seed at once; returns (final metrics, dot trace, cos trace)."""
    from tqdm.auto import tqdm

    init, chunk = _make_chunk(name, cfg, x_all, y_all)
    train_idx, test_idx = splits(cfg, seed_keys, x_all.shape[0])
    init_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(seed_keys)
    carry = init(init_keys)
    dots, cosines = [], []
    num_chunks = cfg.batches // cfg.log_every
    with tqdm(total=cfg.batches, desc=f"digits {name}", disable=not progress, leave=False) as bar:
        for i in range(num_chunks):
            keys = jax.vmap(lambda k, i=i: jax.random.fold_in(k, i + 1))(seed_keys)
            carry, (dot, cos) = chunk(carry, train_idx, keys)
            dots.append(np.asarray(dot))
            cosines.append(np.asarray(cos))
            bar.update(cfg.log_every)
    metrics = _final(carry[0], train_idx, test_idx, x_all, y_all)
    metrics = {k: np.asarray(v) for k, v in metrics.items()}
    return metrics, np.stack(dots, 1), np.stack(cosines, 1)


def _stderr(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def _plot(out_dir: pathlib.Path, cfg: Config, traces: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, cfg.batches // cfg.log_every + 1) * cfg.log_every
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, (dots, cosines) in traces.items():
        for ax, values in zip(axes, (dots, cosines), strict=True):
            mean = values.mean(0)
            se = values.std(0, ddof=1) / np.sqrt(values.shape[0]) if values.shape[0] > 1 else 0
            ax.plot(steps, mean, label=LABELS[name])
            ax.fill_between(steps, mean - se, mean + se, alpha=0.2)
    axes[0].set_yscale("symlog", linthresh=1e-3)
    axes[0].set_ylabel("⟨∇L(θ; b_t), ∇L(θ; b_t+1)⟩")
    axes[1].set_ylabel("cosine similarity")
    for ax in axes:
        ax.set_xlabel("batches consumed")
        ax.grid(alpha=0.3)
    axes[0].set_title("Dot product between consecutive batch gradients\n(DotProd paper, Fig. 4)")
    axes[1].set_title(f"Cosine, mean ± s.e. over {cfg.seeds} seeds")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "digits_grad_dot.png", dpi=120)
    plt.close(fig)


def run(
    out_dir: pathlib.Path,
    *,
    budget: str = "quick",
    seed: int = 0,
    progress: bool = True,
    args: argparse.Namespace | None = None,
) -> list[dict]:
    """Trains every method over the seeds, writes digits.{json,csv} and digits_grad_dot.png."""
    out_dir = pathlib.Path(out_dir)
    cfg = config.resolve(Config, BUDGETS, budget, args, NAME)
    x_np, y_np = load_digits()
    x_all, y_all = jnp.asarray(x_np), jnp.asarray(y_np)
    seed_keys = jax.random.split(jax.random.key(seed), cfg.seeds)

    rows, traces, per_seed = [], {}, {}
    for name in cfg.methods:
        try:
            metrics, dots, cosines = train_method(
                name, cfg, seed_keys, x_all, y_all, progress=progress
            )
        except Exception as e:  # noqa: BLE001 - reported in the table, the others go on
            rows.append(writers.error_row(out_dir, LABELS[name], e))
            continue
        traces[name] = (dots, cosines)
        per_seed[name] = {k: v.tolist() for k, v in metrics.items()}
        rows.append(
            {
                "method": LABELS[name],
                "test_acc": float(metrics["test_acc"].mean()),
                "test_acc_stderr": _stderr(metrics["test_acc"]),
                "test_loss": float(metrics["test_loss"].mean()),
                "test_loss_stderr": _stderr(metrics["test_loss"]),
                "train_acc": float(metrics["train_acc"].mean()),
                "grad_dot": float(dots.mean()),
                "grad_cosine": float(cosines.mean()),
                "grad_evals": cfg.batches // 2 * GRAD_EVALS_PER_ROUND[name],
                "seeds": cfg.seeds,
            }
        )
    if traces:
        _plot(out_dir, cfg, traces)
    writers.write_json(
        out_dir / "digits.json",
        {
            "config": dataclasses.asdict(cfg) | {"budget": budget, "seed": seed},
            "rows": rows,
            "per_seed": per_seed,
            "grad_dot_trace": {n: t[0].mean(0).tolist() for n, t in traces.items()},
            "grad_cosine_trace": {n: t[1].mean(0).tolist() for n, t in traces.items()},
            "log_every_batches": cfg.log_every,
        },
    )
    writers.write_csv(out_dir / "digits.csv", rows)
    return rows
