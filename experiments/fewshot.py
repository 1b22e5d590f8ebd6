"""Few-shot image classification with Conv-4: MAML, FOMAML, Reptile, Meta-SGD, grad_share, ANIL.

The setting of the MAML (Finn et al., 2017, Section 5.2) and Reptile (Nichol et al., 2018)
papers: N-way K-shot episodes, a Conv-4 network (4 × [conv 3×3, batch norm, ReLU,
max-pool 2], `experiments.models.conv4_apply`), meta-training on episodes of the training
classes and meta-test accuracy (± 95% CI over the episodes) on episodes of held-out classes.
Batch norm uses each batch's own statistics, so the query set is normalized as a batch
(transductive, as in the papers' Omniglot figures).

An episode sampler (`EpisodeSampler`) builds a class index once (label -> record indices),
draws N classes and K + Q examples of each with numpy, reads those records and stacks a
meta-batch of episodes into numpy arrays; one jitted meta-step consumes them. Sources that
hold their images as one array (the glyph set) are gathered with one indexing operation;
tfds sources are read record by record and resized with Pillow.

Datasets (``--fewshot-dataset``):

- ``glyphs`` (default): the Omniglot-like character set of `experiments.glyphs`, rendered
  from the fonts that ship with matplotlib (no download): about 1,600 letters of 15 Unicode
  scripts ("alphabets"), 20 instances each (fonts, stroke widths and random affine
  distortions instead of Omniglot's 20 drawers), 28×28 greyscale; meta-train on the
  background alphabets, meta-test on the evaluation alphabets (class- and alphabet-disjoint).
  It differs from Omniglot: printed glyphs, not handwriting; see `experiments.glyphs`. It is
  rendered once (seconds) and cached (``--fewshot-glyphs-cache``, default
  ``~/.cache/metagrad/glyphs``).
- ``omniglot``: tfds ``omniglot``; meta-train on its ``train`` split (background
  alphabets, 964 characters), meta-test on ``test`` (659 characters); 28×28 grayscale.
- ``cub``: tfds ``caltech_birds2011``. Its splits divide images, not classes, so both are
  pooled and the 200 species split by label (our choice): 0-99 meta-train, 100-149
  validation (unused), 150-199 meta-test; 84×84 RGB.
- ``mini_imagenet``: not in the tfds catalogue. Prepare it yourself as a tfds dataset in
  array_record format with ``image`` and ``label`` features and class-disjoint ``train`` /
  ``test`` splits (Ravi & Larochelle's 64/16/20 classes), e.g. a custom builder named
  ``mini_imagenet`` built with ``tfds build --file_format=array_record``, then pass
  ``--fewshot-data-dir`` (and ``--fewshot-tfds-name`` if you named it differently).

The tfds datasets cannot be downloaded on the project's machines: their path is tested on
`tfds.testing.mock_data` (random images and labels with the real feature specs). With the
data prepared (``tfds build omniglot --file_format=array_record``), run e.g.::

    python -m experiments --only fewshot --fewshot-dataset omniglot --fewshot-shots 1 \\
        --budget full

Methods: MAML, first-order MAML, Reptile, Meta-SGD, MAML with `metagrad.grad_share` as its
inner rule, and ANIL (`metagrad.maml` with ``inner_mask`` selecting Conv-4's head). Settings
of the MAML paper's Omniglot runs: inner SGD learning rate 0.4, one inner step in training,
three at test; outer Adam 1e-3. Reptile: inner Adam (beta1 = 0) 1e-3, 5 inner steps on
support and query pooled, outer SGD 1.0; at test 3 (quick) or 50 Adam steps. Meta-SGD and
grad_share start from inner rate 0.4.

Budgets (glyphs): ``quick`` (the default suite) meta-trains each method once, on 1-shot
episodes (one compiled meta-step per method), 100 outer steps of 2 tasks, Conv-4 with 8
channels, 5 queries, and evaluates that initialization at 1 and 5 shots on the same 600
held-out episodes (5 queries per class); ``full`` trains each shot setting separately (3,000
outer steps of 8 tasks, 64 channels, 15 queries). Where the quick budget's time goes on
2 CPU cores: XLA compiling (a second-order Conv-4 meta-step compiles in 10-20 s of CPU) and
evaluating 7,200 adapted episodes. So the SGD-family methods (MAML, FOMAML, Meta-SGD, ANIL)
share one compiled evaluator per shot (SGD with a learning rate per parameter), and
episodes are dispatched without a host round trip each. Batching episodes (``vmap`` over
episodes, or ``lax.map``) measured slower on XLA:CPU: per-episode weights make grouped
convolutions (5x slower per 5-shot episode than one call per episode) and a convolution in
a loop body runs 3x slower (``lax.map``). Scanning several meta-steps per call would put
the meta-step's convolutions in a loop body too (not measured); the host sync per step
(reading the loss) is small beside a step. Methods run two at a time (threads,
``--fewshot-workers``): compiling uses one core.

Measured (quick budget, seed 0, 600 episodes, % ± 95% CI, 1-shot / 5-shot): MAML 41.4 ± 1.0 /
54.0 ± 1.0, FOMAML 37.7 ± 0.9 / 43.8 ± 1.0, Reptile 22.7 ± 0.8 / 25.7 ± 0.8, Meta-SGD
42.1 ± 1.0 / 54.1 ± 1.0, MAML+grad_share 41.7 ± 0.9 / 54.0 ± 1.0, ANIL 26.9 ± 0.8 / 26.9 ± 0.8
(100 outer steps, 8 channels: far from converged). 363 s of CPU with a cold glyph cache.

Resumable: each meta-training saves a checkpoint (``<out>/fewshot/checkpoints``) every
``save_every`` steps, and ``fewshot_progress.json`` holds the learning curves so far; the
same command with the same ``--out`` continues where it stopped.

The table (``fewshot_table.md``) puts the papers' 5-way Omniglot figures beside ours:
MAML 98.7 / 99.9, first-order MAML 98.3 / 99.2, Reptile 97.68 / 99.48 (1 / 5-shot). The data
differ (printed glyphs vs handwriting) and so do the budgets (60,000 outer steps of 32
tasks in the papers), so the numbers are not comparable; the order of the methods is.

References:
  Finn, Abbeel, Levine, `Model-Agnostic Meta-Learning for Fast Adaptation of Deep
  Networks <https://arxiv.org/abs/1703.03400>`_, ICML 2017.

  Nichol, Achiam, Schulman, `On First-Order Meta-Learning Algorithms
  <https://arxiv.org/abs/1803.02999>`_, 2018.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import pathlib
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metagrad as mg
from experiments import config, writers
from experiments.config import option
from experiments.episodes import (  # noqa: F401 - re-exported
    DATASETS,
    CompileClock,
    DatasetSpec,
    EpisodeSampler,
    cached_index,
    ci95,
    curve_recorder,
    evaluate_episodes,
    glyph_sources,
    held_out_episodes,
    load_sources,
    make_samplers,
    meta_train,
    opt,
)
from experiments.models import conv4_apply, conv4_init

NAME = "fewshot"
DESCRIPTION = (
    "few-shot image classification with Conv-4 on rendered glyphs (or Omniglot / CUB / "
    "Mini-ImageNet via tfds): MAML, FOMAML, Reptile, Meta-SGD, MAML+grad_share, ANIL, "
    "5-way 1/5-shot"
)
LONG = True  # minutes at the quick budget: a parallel run starts it first

METHODS = ("maml", "fomaml", "reptile", "meta_sgd", "maml+grad_share", "anil")
# Methods whose test-time adaptation is SGD with a learning rate per parameter (a constant,
# Meta-SGD's learned rates, zero outside ANIL's head): one compiled evaluator per shot.
SGD_FAMILY = ("maml", "fomaml", "meta_sgd", "anil")


@dataclasses.dataclass(frozen=True)
class Config:
    """A run's settings: the dataset's (SETTINGS) under the budget's under given options."""

    iterations: int = option("meta-iterations", minimum=1)
    eval_episodes: int = option("meta-test episodes per method and shot", minimum=2)
    queries: int = 15
    eval_queries: int = 15
    inner_lr: float = 0.4
    inner_steps: int = 1
    eval_steps: int = 3
    meta_batch: int = 32
    hidden: int = option("Conv-4 channels", minimum=1, default=64)
    reptile_eval_steps: int = 50
    shared_training: bool = False
    curve_points: int = 10
    curve_episodes: int = 100
    save_every: int = 100  # outer steps between checkpoints (resume: same command, same --out)
    workers: int = option("methods trained and evaluated at once (threads)", minimum=1, default=2)


# Per-dataset meta-learning settings (MAML paper Appendix A.1 / Reptile paper Appendix A).
# inner_lr: inner SGD (MAML, FOMAML, ANIL, initial Meta-SGD / grad_share) learning rate;
# meta_batch: tasks per outer step; reptile_eval_steps: Reptile's test-time Adam steps.
_PAPER = dict(inner_lr=0.4, inner_steps=1, eval_steps=3, meta_batch=32, hidden=64)
_LARGE = dict(inner_lr=0.01, inner_steps=5, eval_steps=10, meta_batch=4, hidden=32)
SETTINGS = {"omniglot": _PAPER, "glyphs": _PAPER, "cub": _LARGE, "mini_imagenet": _LARGE}

# shared_training: one meta-training per method (on the first --fewshot-shots value),
# evaluated at every shot value (one compiled meta-step per method); otherwise one
# meta-training per shot value, as in the papers. curve_points / curve_episodes: held-out
# accuracy measured during training (learning curves).
_TINY = dict(
    iterations=2, meta_batch=2, eval_episodes=4, hidden=8, queries=1, eval_queries=1,
    inner_steps=1, eval_steps=1, reptile_eval_steps=1, curve_points=1, curve_episodes=2,
)  # fmt: skip
BUDGETS = {
    "tiny": _TINY,
    "quick": dict(iterations=2000, eval_episodes=200),
    "full": dict(iterations=60000, eval_episodes=600),
}
# The glyph set is in the default suite: its quick budget fits the suite's ~5 minutes on 2
# CPU cores (compiling dominates: one meta-step per method, one evaluator per shot and kind).
GLYPH_BUDGETS = {
    "tiny": _TINY,
    "quick": dict(
        iterations=100,
        meta_batch=2,
        hidden=8,
        queries=5,
        eval_queries=5,
        eval_episodes=600,
        reptile_eval_steps=3,
        shared_training=True,
        curve_points=4,
        curve_episodes=40,
    ),
    "full": dict(iterations=3000, meta_batch=8, eval_episodes=600, curve_points=30, save_every=50),
}

# 5-way Omniglot test accuracy (%) of the papers, 1-shot and 5-shot: MAML (Finn et al. 2017,
# Table 1), first-order MAML (ibid.), Reptile (Nichol et al. 2018, Table 1, transductive).
PAPER_OMNIGLOT = {
    ("maml", 1): 98.7,
    ("maml", 5): 99.9,
    ("fomaml", 1): 98.3,
    ("fomaml", 5): 99.2,
    ("reptile", 1): 97.68,
    ("reptile", 5): 99.48,
}


# -- model and learners --------------------------------------------------------------------


def loss_fn(params, batch):
    """Softmax cross-entropy of Conv-4 on ``(images, labels)``."""
    x, y = batch
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(conv4_apply(params, x), y))


def accuracy(params, batch):
    x, y = batch
    return jnp.mean(jnp.argmax(conv4_apply(params, x), -1) == y)


def head_only(params):
    """ANIL's inner mask: Conv-4's dense head (the last entry of its params list)."""
    return [False] * (len(params) - 1) + [True]


def make_learner(method: str, *, inner_lr: float, inner_steps: int, outer_lr: float = 1e-3):
    """The meta-learner for ``method`` from metagrad's public API (all calls are here)."""
    outer = optax.adam(outer_lr)
    if method in ("maml", "fomaml", "anil"):
        mask = head_only if method == "anil" else None
        fo = method == "fomaml"
        return mg.maml(
            loss_fn, optax.sgd(inner_lr), inner_steps, outer, first_order=fo, inner_mask=mask
        )
    if method == "meta_sgd":
        return mg.maml(loss_fn, mg.meta_sgd(inner_lr), inner_steps, outer)
    if method == "maml+grad_share":
        return mg.maml(loss_fn, mg.grad_share(inner_lr), inner_steps, outer)
    if method == "reptile":
        # Reptile paper (Appendix A): inner Adam (beta1 = 0) on the pooled episode data,
        # outer SGD; our fixed outer learning rate 1.0 (the paper anneals it linearly).
        return mg.reptile(loss_fn, optax.adam(1e-3, b1=0.0), max(inner_steps, 5), optax.sgd(1.0))
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _reptile_tasks(tasks):
    # Reptile has no support/query split: its inner steps train on both (the query
    # batches are only evaluated, for the metrics).
    (sx, sy), (qx, qy) = tasks
    return (np.concatenate([sx, qx], 1), np.concatenate([sy, qy], 1)), (qx, qy)


def sgd_rates(method: str, state, inner_lr: float):
    """The per-parameter SGD learning rates (a pytree like params) `method` adapts with."""
    if method == "meta_sgd":
        return state.inner_params
    rates = jax.tree.map(lambda p: jnp.full_like(p, inner_lr), state.params)
    if method == "anil":
        rates = [jax.tree.map(jnp.zeros_like, r) for r in rates[:-1]] + rates[-1:]
    return rates


def sgd_adapt(params, rates, support, steps: int):
    """`steps` SGD steps on `support` with a learning rate per parameter (`sgd_rates`).

    Written out (no loop: XLA:CPU runs convolutions slower inside a loop body).
    """
    for _ in range(steps):
        grads = jax.grad(loss_fn)(params, support)
        params = jax.tree.map(lambda p, r, g: p - r * g, params, rates, grads)
    return params


@functools.partial(jax.jit, static_argnames="steps")
def _sgd_accuracy(params, rates, support, query, steps):
    return accuracy(sgd_adapt(params, rates, support, steps), query)


def make_evaluator(method: str, learner, eval_steps: int, inner_lr: float):
    """``evaluate(state, support, query) -> accuracy`` of one episode, after adaptation.

    The SGD family (`SGD_FAMILY`) shares one compiled `_sgd_accuracy` per shape (the same
    numbers as ``learner.adapt``, tested); the others adapt with ``learner.adapt``.
    """
    if method in SGD_FAMILY:
        return lambda state, s, q: _sgd_accuracy(
            state.params, sgd_rates(method, state, inner_lr), s, q, eval_steps
        )

    @jax.jit
    def evaluate(state, support, query):
        return accuracy(learner.adapt(state, support, num_steps=eval_steps), query)

    return evaluate


# -- experiment ----------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument(
        "--fewshot-dataset",
        choices=sorted(DATASETS),
        default="glyphs",
        help="glyphs (rendered from matplotlib's fonts, no download; the default) or a "
        "tfds dataset prepared locally",
    )
    parser.add_argument(
        "--fewshot-glyphs-cache",
        default=None,
        help="directory of the rendered glyph set's .npz (default: $METAGRAD_CACHE/glyphs, "
        "else ~/.cache/metagrad/glyphs)",
    )
    parser.add_argument(
        "--fewshot-glyphs-seed", type=int, default=0, help="seed of the glyph set (default: 0)"
    )
    parser.add_argument(
        "--fewshot-glyphs-classes-per-alphabet",
        type=config.int_at_least(1),
        default=None,
        help="a small glyph set: the first N characters of each alphabet (default: all)",
    )
    parser.add_argument(
        "--fewshot-data-dir", default=None, help="tfds data_dir holding the prepared dataset"
    )
    parser.add_argument("--fewshot-tfds-name", default=None, help="override the tfds name")
    parser.add_argument(
        "--fewshot-index-cache",
        default=None,
        help="directory to save/load the class index (labels read once per dataset)",
    )
    at_least = config.int_at_least
    parser.add_argument("--fewshot-ways", type=at_least(2), default=5, help="N (default: 5)")
    parser.add_argument(
        "--fewshot-shots", type=at_least(1), nargs="+", default=None, help="K (default: 1 5)"
    )
    parser.add_argument(
        "--fewshot-methods", nargs="+", choices=METHODS, default=None, help="default: all"
    )
    # Defaults shown for the default dataset (glyphs); tfds datasets use BUDGETS.
    config.add_options(parser, Config, GLYPH_BUDGETS, NAME)


def settings(dataset: str, budget: str, args=None) -> dict:
    """The run's settings: dataset settings, then the budget, then command-line options."""
    budgets = GLYPH_BUDGETS if dataset == "glyphs" else BUDGETS
    cfg = config.resolve(Config, budgets, budget, args, NAME, base=SETTINGS[dataset])
    shots = opt(args, "fewshot_shots", [1, 5])
    extra = dict(dataset=dataset, ways=opt(args, "fewshot_ways", 5), shots=list(shots))
    return dataclasses.asdict(cfg) | extra


def _plot(out_dir, curves, losses, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    for label, points in curves.items():
        xs, ys = zip(*points, strict=True) if points else ((), ())
        ax0.plot(xs, 100 * np.array(ys), marker="o", label=label)
    for label in curves:  # the same order (and colours) as the curves
        if label not in losses:
            continue
        values = np.asarray(losses[label])
        width = max(1, len(values) // 20)
        smooth = np.convolve(values, np.ones(width) / width, mode="valid")
        ax1.plot(np.arange(len(smooth)) + width, smooth, label=label)
    ax0.set(xlabel="meta-iteration", ylabel="held-out episode accuracy (%)", title=title)
    ax1.set(xlabel="meta-iteration", ylabel="meta-training loss (moving average)")
    ax1.set_yscale("log")
    for ax in (ax0, ax1):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(pathlib.Path(out_dir) / "fewshot_training.png", dpi=110)
    plt.close(fig)


def paper_table(rows: Sequence[dict]) -> str:
    """Markdown: our accuracies beside the papers' Omniglot figures (different data)."""
    lines = [
        "| method | shots | this run (%) | paper, Omniglot (%) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        if "test_acc" not in r:
            continue
        paper = PAPER_OMNIGLOT.get((r["method"], r["shots"]))
        ours = f"{100 * r['test_acc']:.1f} ± {100 * r['test_acc_ci95']:.1f}"
        lines.append(f"| {r['method']} | {r['shots']} | {ours} | {paper or '—'} |")
    return "\n".join(lines)


def _clock():
    return time.perf_counter(), CompileClock.start()


def _since(mark, prefix):
    compiles, compile_s = CompileClock.since(mark[1])
    return {
        f"{prefix}_s": time.perf_counter() - mark[0],
        f"{prefix}_compiles": compiles,
        f"{prefix}_compile_s": compile_s,
    }


def run(
    out_dir: pathlib.Path,
    *,
    budget: str = "quick",
    seed: int = 0,
    progress: bool = True,
    args: argparse.Namespace | None = None,
) -> list[dict]:
    """Meta-trains each method on episodes, reports meta-test accuracy (95% CI).

    Resumable: each meta-training saves a checkpoint in ``<out>/checkpoints``; the same
    command with the same ``--out`` continues where it stopped (``fewshot_progress.json``
    holds the learning curves so far).
    """
    out_dir = pathlib.Path(out_dir)
    dataset = opt(args, "fewshot_dataset", "glyphs")
    cfg = settings(dataset, budget, args)
    ways, shots = cfg["ways"], cfg["shots"]
    methods = tuple(opt(args, "fewshot_methods", METHODS))
    start, cpu0 = time.perf_counter(), time.process_time()
    train_eps, test_eps = make_samplers(
        dataset,
        ways=ways,
        shots=shots,
        queries=cfg["queries"],
        eval_queries=cfg["eval_queries"],
        args=args,
    )
    data_s = time.perf_counter() - start
    episodes = {k: held_out_episodes(test_eps[k], cfg["eval_episodes"], seed) for k in shots}
    curve_eps = {k: v.head(cfg["curve_episodes"]) for k, v in episodes.items()}
    spec = DATASETS[dataset]
    params0 = conv4_init(
        jax.random.key(seed), 1 if spec.grayscale else 3, ways, spec.image_size, cfg["hidden"]
    )
    plan = [(shots[0], shots)] if cfg["shared_training"] else [(k, [k]) for k in shots]
    every = max(1, cfg["iterations"] // max(cfg["curve_points"], 1))
    curves, losses_by, lock = {}, {}, threading.Lock()

    def progress_file():
        with lock:
            data = {"config": cfg, "curves": {k: list(v) for k, v in curves.items()}}
            writers.write_json(out_dir / "fewshot_progress.json", data)

    def one(method, train_shots, eval_shots):
        """Meta-trains `method` on `train_shots` episodes; its rows at `eval_shots`."""
        label, rows = f"{method} {train_shots}-shot", []
        try:
            learner = make_learner(method, inner_lr=cfg["inner_lr"], inner_steps=cfg["inner_steps"])
            steps = cfg["reptile_eval_steps"] if method == "reptile" else cfg["eval_steps"]
            evaluate = make_evaluator(method, learner, steps, cfg["inner_lr"])
            curve = curves[label] = []
            record = curve_recorder(
                evaluate, curve_eps[train_shots], every, cfg["iterations"], curve
            )

            def on_step(it, state):
                record(it, state)
                if it % cfg["save_every"] == 0:
                    progress_file()

            mark = _clock()
            state, losses = meta_train(
                learner,
                params0,
                train_eps[train_shots],
                iterations=cfg["iterations"],
                meta_batch=cfg["meta_batch"],
                seed=seed,
                progress=progress,
                on_step=on_step,
                desc=label,
                checkpoint=out_dir / "checkpoints" / f"{label.replace(' ', '_')}.pkl",
                save_every=cfg["save_every"],
                keep={"curve": curve},
                # Settings that change the numbers (not how many threads run them).
                tag=repr(sorted((k, v) for k, v in cfg.items() if k != "workers")),
                prepare=_reptile_tasks if method == "reptile" else None,
            )
            losses_by[label] = losses
            train = _since(mark, "train")
            for k in eval_shots:
                mark = _clock()
                accs = evaluate_episodes(evaluate, state, episodes[k])
                row = dict(method=method, dataset=dataset, ways=ways, shots=k)
                row |= {
                    "trained_shots": train_shots,
                    "test_acc": float(accs.mean()),
                    "test_acc_ci95": ci95(accs),
                    "episodes": len(accs),
                    "paper_omniglot": PAPER_OMNIGLOT.get((method, k), float("nan")),
                    "iterations": cfg["iterations"],
                    "final_train_loss": float(np.mean(losses[-10:])),
                    # Wall seconds, XLA compilations and their seconds: of meta-training
                    # with its learning curve, of this evaluation.
                    **train,
                    **_since(mark, "eval"),
                }
                rows.append(row)
        except Exception as e:  # noqa: BLE001 - reported in the table, the others go on
            rows.append(writers.error_row(out_dir, label, e))
        return rows

    # Methods run `workers` at a time (threads): XLA compiles on one core, and the small
    # Conv-4 programs of the quick budget use about one; the rows are the same either way.
    jobs = [(m, k, ks) for m in methods for k, ks in plan]
    with concurrent.futures.ThreadPoolExecutor(cfg["workers"]) as pool:
        rows = [r for out in pool.map(lambda job: one(*job), jobs) for r in out]
    cpu_s = time.process_time() - cpu0
    progress_file()
    if losses_by:
        _plot(out_dir, curves, losses_by, f"{dataset} {ways}-way")
    table = paper_table(rows)
    note = (
        f"\n\nThis run: {dataset}, Conv-4 ({cfg['hidden']} channels), budget {budget}, "
        f"{cfg['iterations']} meta-iterations of {cfg['meta_batch']} tasks; the papers' "
        "figures are on Omniglot (handwritten, 64 channels, 60,000 iterations of 32 tasks): "
        "the data differ, the numbers are not comparable, only the order of the methods is.\n"
    )
    (out_dir / "fewshot_table.md").write_text(table + note)
    writers.write_json(
        out_dir / "fewshot.json",
        {"config": cfg, "data_s": data_s, "cpu_s": cpu_s, "rows": rows, "curves": curves},
    )
    writers.write_csv(out_dir / "fewshot.csv", rows)
    return rows
