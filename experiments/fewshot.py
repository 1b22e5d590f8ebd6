"""Few-shot image classification with Conv-4: MAML, FOMAML, Reptile, Meta-SGD, MAML+grad_share.

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

Budgets (glyphs): ``quick`` (the default suite) meta-trains each method once, on 1-shot
episodes (one compiled meta-step per method), 150 outer steps of 2 tasks, Conv-4 with 16
channels, and evaluates that initialization at 1 and 5 shots on 600 held-out episodes each
(5 queries per class); ``full`` trains each shot setting separately (3,000 outer steps of 8
tasks, 64 channels, 15 queries). Settings of the MAML paper's Omniglot runs: inner SGD
learning rate 0.4, one inner step in training, three at test; outer Adam 1e-3. Reptile:
inner Adam (beta1 = 0) 1e-3, 5 inner steps on support and query pooled, outer SGD 1.0; at
test 10 (quick) or 50 Adam steps. Meta-SGD and grad_share start from inner rate 0.4.

The table (``fewshot_table.md``) puts the papers' 5-way Omniglot figures beside ours:
MAML 98.7 / 99.9, first-order MAML 98.3 / 99.2, Reptile 97.68 / 99.48 (1 / 5-shot). The data
differ (printed glyphs vs handwriting) and so do the budgets (60,000 outer steps of 32
tasks in the papers), so the numbers are not comparable; the order of the methods is.

Measured (quick budget, seed 0, 600 episodes, % ± 95% CI, 1-shot / 5-shot): MAML 52.7 ± 1.1 /
64.3 ± 1.2, FOMAML 38.8 ± 0.9 / 47.8 ± 0.9, Reptile 31.1 ± 1.0 / 49.1 ± 1.0, Meta-SGD
53.2 ± 1.1 / 65.7 ± 1.1, MAML+grad_share 58.9 ± 1.1 / 73.3 ± 1.0 (150 outer steps: far from
converged; the 1-shot order MAML > FOMAML > Reptile is the papers' order).

References:
  Finn, Abbeel, Levine, `Model-Agnostic Meta-Learning for Fast Adaptation of Deep
  Networks <https://arxiv.org/abs/1703.03400>`_, ICML 2017.

  Nichol, Achiam, Schulman, `On First-Order Meta-Learning Algorithms
  <https://arxiv.org/abs/1803.02999>`_, 2018.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metagrad as mg
from experiments import config, writers
from experiments.config import option
from experiments.episodes import EpisodeSampler, cached_index, load_sources
from experiments.models import conv4_apply, conv4_init

NAME = "fewshot"
DESCRIPTION = (
    "few-shot image classification with Conv-4 on rendered glyphs (or Omniglot / CUB / "
    "Mini-ImageNet via tfds): MAML, FOMAML, Reptile, Meta-SGD, MAML+grad_share, 5-way 1/5-shot"
)

METHODS = ("maml", "fomaml", "reptile", "meta_sgd", "maml+grad_share")


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
    hidden: int = 64
    reptile_eval_steps: int = 50
    shared_training: bool = False
    curve_points: int = 10
    curve_episodes: int = 100


# Per-dataset meta-learning settings (MAML paper Appendix A.1 / Reptile paper Appendix A).
# inner_lr: inner SGD (MAML, FOMAML, initial Meta-SGD / grad_share) learning rate;
# meta_batch: tasks per outer step; reptile_eval_steps: Reptile's test-time Adam steps.
SETTINGS = {
    "omniglot": dict(
        inner_lr=0.4, inner_steps=1, eval_steps=3, meta_batch=32, hidden=64, reptile_eval_steps=50
    ),
    "cub": dict(
        inner_lr=0.01, inner_steps=5, eval_steps=10, meta_batch=4, hidden=32, reptile_eval_steps=50
    ),
    "mini_imagenet": dict(
        inner_lr=0.01, inner_steps=5, eval_steps=10, meta_batch=4, hidden=32, reptile_eval_steps=50
    ),
}
SETTINGS["glyphs"] = dict(SETTINGS["omniglot"])

# shared_training: one meta-training per method (on the first --fewshot-shots value),
# evaluated at every shot value (one compiled meta-step per method); otherwise one
# meta-training per shot value, as in the papers. curve_points / curve_episodes: held-out
# accuracy measured during training (learning curves).
_COMMON = dict(shared_training=False, curve_points=10, curve_episodes=100, eval_queries=15)
BUDGETS = {
    "tiny": _COMMON
    | dict(
        iterations=2,
        meta_batch=2,
        eval_episodes=4,
        hidden=8,
        queries=1,
        eval_queries=1,
        inner_steps=1,
        eval_steps=1,
        reptile_eval_steps=1,
        curve_points=1,
        curve_episodes=2,
    ),
    "quick": _COMMON | dict(iterations=2000, eval_episodes=200, queries=15),
    "full": _COMMON | dict(iterations=60000, eval_episodes=600, queries=15),
}
# The glyph set is in the default suite: its quick budget fits the suite's ~5 minutes.
GLYPH_BUDGETS = {
    "tiny": BUDGETS["tiny"],
    "quick": _COMMON
    | dict(
        iterations=150,
        meta_batch=2,
        hidden=16,
        queries=5,
        eval_queries=5,
        eval_episodes=600,
        reptile_eval_steps=10,
        shared_training=True,
        curve_points=5,
        curve_episodes=50,
    ),
    "full": _COMMON | dict(iterations=3000, meta_batch=8, hidden=64, queries=15, eval_episodes=600),
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
        small = _opt(args, "fewshot_glyphs_classes_per_alphabet")
        found = glyph_sources(
            _opt(args, "fewshot_glyphs_seed", 0), _opt(args, "fewshot_glyphs_cache"), small
        )
        train_src, test_src = [found["background"]], [found["evaluation"]]
        train_index, test_index = [train_src[0].labels], [test_src[0].labels]
    else:
        if _opt(args, "fewshot_tfds_name"):
            spec = dataclasses.replace(spec, tfds_name=args.fewshot_tfds_name)
        data_dir, index_cache = _opt(args, "fewshot_data_dir"), _opt(args, "fewshot_index_cache")
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
    kw = dict(ways=ways, image_size=spec.image_size, grayscale=spec.grayscale)
    train = {
        k: EpisodeSampler(
            train_src, shots=k, queries=queries, classes=spec.train_classes, index=train_index, **kw
        )
        for k in shots
    }
    test = {
        k: EpisodeSampler(
            test_src,
            shots=k,
            queries=eval_queries or queries,
            classes=spec.test_classes,
            index=test_index,
            **kw,
        )
        for k in shots
    }
    return train, test


# -- model and learners --------------------------------------------------------------------


def loss_fn(params, batch):
    """Softmax cross-entropy of Conv-4 on ``(images, labels)``."""
    x, y = batch
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(conv4_apply(params, x), y))


def accuracy(params, batch):
    x, y = batch
    return jnp.mean(jnp.argmax(conv4_apply(params, x), -1) == y)


def make_learner(method: str, *, inner_lr: float, inner_steps: int, outer_lr: float = 1e-3):
    """The meta-learner for ``method`` from metagrad's public API (all calls are here)."""
    outer = optax.adam(outer_lr)
    if method in ("maml", "fomaml"):
        return (mg.maml if method == "maml" else mg.fomaml)(
            loss_fn, optax.sgd(inner_lr), inner_steps, outer
        )
    if method == "meta_sgd":
        rule = mg.meta_sgd(inner_lr)
        return mg.maml(loss_fn, rule, inner_steps, outer)
    if method == "maml+grad_share":
        rule = mg.grad_share(inner_lr)
        return mg.maml(loss_fn, rule, inner_steps, outer)
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


@functools.partial(jax.jit, static_argnames="steps")
def _sgd_evaluate(params, lr, support, query, steps):
    return accuracy(mg_adapt()(loss_fn, optax.sgd(lr), params, support, steps), query)


def mg_adapt():
    return mg.adapt


def make_evaluator(learner, eval_steps: int, *, sgd_lr: float | None = None):
    """A jitted ``evaluate(state, support, query) -> accuracy`` for one episode.

    Adapts with ``learner.adapt``; with `sgd_lr` (MAML, FOMAML, whose adaptation is plain
    SGD) with `metagrad.adapt` and that learning rate instead, one compiled function shared
    by those methods (the same numbers: both run ``eval_steps`` SGD steps).
    """
    if sgd_lr is not None:
        return lambda state, s, q: _sgd_evaluate(state.params, sgd_lr, s, q, eval_steps)

    @jax.jit
    def evaluate(state, support, query):
        return accuracy(learner.adapt(state, support, num_steps=eval_steps), query)

    return evaluate


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


def evaluate_episodes(evaluate, state, episodes) -> np.ndarray:
    return np.array([float(evaluate(state, s, q)) for s, q in episodes])


def ci95(accs: np.ndarray) -> float:
    return float(1.96 * accs.std(ddof=1) / np.sqrt(len(accs))) if len(accs) > 1 else float("nan")


def meta_train(
    method,
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
):
    """Meta-trains from `params0`; returns ``(state, losses)``.

    ``on_step(iteration, state)`` is called after each outer step (e.g. to evaluate).
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng([seed, 1])
    state, losses = learner.init(params0), []
    step = jax.jit(learner.step)
    for it in tqdm(range(iterations), desc=desc or method, disable=not progress, leave=False):
        tasks = sampler.meta_batch(rng, meta_batch)
        if method == "reptile":
            tasks = _reptile_tasks(tasks)
        state, metrics = step(state, tasks)
        losses.append(float(metrics["loss"]))
        if on_step is not None:
            on_step(it + 1, state)
    return state, losses


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
        help="directory of the rendered glyph set's .npz (default: ~/.cache/metagrad/glyphs)",
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
    config.add_options(parser, Config, BUDGETS, NAME)


def _opt(args, name, default=None):
    value = getattr(args, name, None) if args is not None else None
    return default if value is None else value


def settings(dataset: str, budget: str, args=None) -> dict:
    """The run's settings: dataset settings, then the budget, then command-line options."""
    budgets = GLYPH_BUDGETS if dataset == "glyphs" else BUDGETS
    cfg = config.resolve(Config, budgets, budget, args, NAME, base=SETTINGS[dataset])
    shots = _opt(args, "fewshot_shots", [1, 5])
    extra = dict(dataset=dataset, ways=_opt(args, "fewshot_ways", 5), shots=list(shots))
    return dataclasses.asdict(cfg) | extra


def _plot(out_dir, curves, losses, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    for label, points in curves.items():
        xs, ys = zip(*points, strict=True) if points else ((), ())
        ax0.plot(xs, 100 * np.array(ys), marker="o", label=label)
    for label, values in losses.items():
        values = np.asarray(values)
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


def run(
    out_dir: pathlib.Path,
    *,
    budget: str = "quick",
    seed: int = 0,
    progress: bool = True,
    args: argparse.Namespace | None = None,
) -> list[dict]:
    """Meta-trains each method on episodes, reports meta-test accuracy (95% CI)."""
    out_dir = pathlib.Path(out_dir)
    dataset = _opt(args, "fewshot_dataset", "glyphs")
    cfg = settings(dataset, budget, args)
    ways, shots = cfg["ways"], cfg["shots"]
    methods = tuple(_opt(args, "fewshot_methods", METHODS))
    train_eps, test_eps = make_samplers(
        dataset,
        ways=ways,
        shots=shots,
        queries=cfg["queries"],
        eval_queries=cfg["eval_queries"],
        args=args,
    )
    episodes = {k: held_out_episodes(test_eps[k], cfg["eval_episodes"], seed) for k in shots}
    curve_eps = {k: v.head(cfg["curve_episodes"]) for k, v in episodes.items()}
    spec = DATASETS[dataset]
    params0 = conv4_init(
        jax.random.key(seed), 1 if spec.grayscale else 3, ways, spec.image_size, cfg["hidden"]
    )
    plan = [(shots[0], shots)] if cfg["shared_training"] else [(k, [k]) for k in shots]
    every = max(1, cfg["iterations"] // max(cfg["curve_points"], 1))
    rows, curves, losses_by = [], {}, {}
    for method in methods:
        for train_shots, eval_shots in plan:
            label = f"{method} {train_shots}-shot"
            try:
                learner = make_learner(
                    method, inner_lr=cfg["inner_lr"], inner_steps=cfg["inner_steps"]
                )
                steps = cfg["reptile_eval_steps"] if method == "reptile" else cfg["eval_steps"]
                sgd_lr = cfg["inner_lr"] if method in ("maml", "fomaml") else None
                evaluate = make_evaluator(learner, steps, sgd_lr=sgd_lr)
                curve = curves[label] = []

                def on_step(it, state, evaluate=evaluate, curve=curve, k=train_shots):
                    if it % every == 0 or it == cfg["iterations"]:
                        if not curve or curve[-1][0] != it:
                            accs = evaluate_episodes(evaluate, state, curve_eps[k])
                            curve.append((it, float(accs.mean())))

                start = time.process_time()
                state, losses = meta_train(
                    method,
                    learner,
                    params0,
                    train_eps[train_shots],
                    iterations=cfg["iterations"],
                    meta_batch=cfg["meta_batch"],
                    seed=seed,
                    progress=progress,
                    on_step=on_step,
                    desc=label,
                )
                losses_by[label] = losses
                train_cpu = time.process_time() - start
                for k in eval_shots:
                    start = time.process_time()
                    accs = evaluate_episodes(evaluate, state, episodes[k])
                    rows.append(
                        {
                            "method": method,
                            "dataset": dataset,
                            "ways": ways,
                            "shots": k,
                            "trained_shots": train_shots,
                            "test_acc": float(accs.mean()),
                            "test_acc_ci95": ci95(accs),
                            "episodes": len(accs),
                            "paper_omniglot": PAPER_OMNIGLOT.get((method, k), float("nan")),
                            "iterations": cfg["iterations"],
                            "final_train_loss": float(np.mean(losses[-10:])),
                            # CPU seconds (all threads) of meta-training with its learning
                            # curve, and of this evaluation, compilation included.
                            "train_cpu_s": train_cpu,
                            "eval_cpu_s": time.process_time() - start,
                        }
                    )
            except Exception as e:  # noqa: BLE001 - reported in the table, the others go on
                rows.append(writers.error_row(out_dir, label, e))
    if losses_by:
        _plot(out_dir, curves, losses_by, f"{dataset} {ways}-way")
    table = paper_table(rows)
    note = (
        f"\n\nThis run: {dataset}, Conv-4 ({cfg['hidden']} channels), budget {budget}, "
        f"{cfg['iterations']} meta-iterations; the papers' figures are on Omniglot "
        "(handwritten, 60,000 iterations of 32 tasks): the data differ, the numbers "
        "are not comparable, only the order of the methods is.\n"
    )
    (out_dir / "fewshot_table.md").write_text(table + note)
    writers.write_json(
        out_dir / "fewshot.json",
        {"config": cfg, "rows": rows, "curves": {k: v for k, v in curves.items()}},
    )
    writers.write_csv(out_dir / "fewshot.csv", rows)
    return rows
