"""Gradient sharing's two claims on Conv-4 few-shot classification (rendered glyphs).

Chang & Lipson (arXiv 2312.08398) evaluate gradient sharing on few-shot image classification
with Conv-4 (the paper's model family) and claim (a) faster meta-training (up to 134%) and
(b) that MAML keeps working with a 10x larger inner learning rate. We test both on the glyph
set of `experiments.glyphs` (5-way 1-shot, evaluation alphabets held out), MAML vs
MAML+grad_share (`metagrad.grad_share` as MAML's inner rule, its momentum and gate learned by the
outer Adam 1e-3 with the initialization), second order, inner SGD at 1x = 0.1 (the
grad_share paper's inner rate) and 10x = 1.0.

Protocol (our choices): per seed, both methods start from the same Conv-4 weights and see
the same episode stream; every ``eval_every`` outer steps each is evaluated on the same 100
held-out 5-way 1-shot episodes (query accuracy after 3 adaptation steps with its own
`MetaLearner.adapt`). (a) The target is MAML's final accuracy at 1x (mean of its last three
evaluations); the outer steps to reach it are read on a 3-point trailing average of each
curve (NaN if never reached), speed-up = MAML's steps / grad_share's. (b) Final accuracy
(mean of the last three evaluations) at 1x and 10x. Mean ± standard error over seeds.

Measured (``python -m experiments --only grad_share_glyphs``, quick budget: 200 outer steps
of 4 tasks, Conv-4 with 16 channels, 1 inner step, 3 seeds, 100 held-out episodes; mean ±
s.e. over seeds of the final held-out accuracy): at 1x, MAML 60.9 ± 0.5%, MAML+grad_share
56.0 ± 2.1%: grad_share was behind at every evaluation on all three seeds and never reached
MAML's final level (no speed-up; the opposite, at this budget); at 10x, MAML 34.8 ± 1.1%,
MAML+grad_share 46.3 ± 2.0%, ahead on all three seeds (the robustness claim holds here).
7.7 CPU-minutes (46 minutes of wall time on a heavily shared 2-core machine).

Not in the default suite (several minutes); run it with::

    python -m experiments --only grad_share_glyphs [--budget full]
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

import jax
import numpy as np

from experiments import config, fewshot, writers
from experiments.config import option
from experiments.models import conv4_init

NAME = "grad_share_glyphs"
DESCRIPTION = (
    "gradient sharing vs MAML on Conv-4 glyph episodes (5-way 1-shot): outer steps to "
    "MAML's final accuracy and accuracy at a 10x inner learning rate, over seeds"
)
LONG = True  # minutes at the quick budget: a parallel run starts it first
METHODS = ("maml", "maml+grad_share")
BASE_LR, WAYS, SHOTS = 0.1, 5, 1


@dataclasses.dataclass(frozen=True)
class Config:
    seeds: int = option("seeds", minimum=2)
    steps: int = option("outer steps", minimum=2)
    eval_every: int = 20
    inner_steps: int = 1
    meta_batch: int = 4
    hidden: int = 32
    queries: int = 5
    eval_steps: int = 3
    eval_episodes: int = 100
    lr_factors: tuple = (1.0, 10.0)


BUDGETS = {
    "tiny": dict(seeds=2, steps=4, eval_every=2, hidden=8, queries=1, eval_episodes=4),
    "quick": dict(seeds=3, steps=200, eval_every=20, hidden=16),
    "full": dict(seeds=3, steps=1500, eval_every=100, inner_steps=2),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_options(parser, Config, BUDGETS, NAME)


def steps_to_reach(points, target: float) -> float:
    """First step where the 3-point trailing mean of ``(step, acc)`` reaches `target`."""
    steps = np.array([s for s, _ in points], float)
    accs = np.array([a for _, a in points], float)
    for i in range(len(accs)):
        if accs[max(0, i - 2) : i + 1].mean() >= target:
            return float(steps[i])
    return float("nan")


def _final(points) -> float:
    return float(np.mean([a for _, a in points[-3:]]))


def _mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, float)
    ok = v[np.isfinite(v)]
    if len(ok) == 0:
        return float("nan"), float("nan")
    return float(ok.mean()), float(ok.std(ddof=1) / np.sqrt(len(ok))) if len(ok) > 1 else 0.0


def run(
    out_dir: pathlib.Path,
    *,
    budget: str = "quick",
    seed: int = 0,
    progress: bool = True,
    args: argparse.Namespace | None = None,
) -> list[dict]:
    out_dir = pathlib.Path(out_dir)
    cfg = config.resolve(Config, BUDGETS, budget, args, NAME)
    train, test = fewshot.make_samplers(
        "glyphs", ways=WAYS, shots=[SHOTS], queries=cfg.queries, args=args
    )
    episodes = fewshot.held_out_episodes(test[SHOTS], cfg.eval_episodes, seed)
    curves: dict[tuple, list] = {}
    for factor in cfg.lr_factors:
        for method in METHODS:
            # One learner (one compiled step and evaluator) per setting, reused across seeds.
            lr = BASE_LR * factor
            learner = fewshot.make_learner(method, inner_lr=lr, inner_steps=cfg.inner_steps)
            evaluate = fewshot.make_evaluator(method, learner, cfg.eval_steps, lr)
            for s in range(cfg.seeds):
                run_seed = seed * 1000 + s
                params0 = conv4_init(jax.random.key(run_seed), 1, WAYS, 28, cfg.hidden)
                points = curves[(method, factor, s)] = []
                fewshot.meta_train(
                    learner,
                    params0,
                    train[SHOTS],
                    iterations=cfg.steps,
                    meta_batch=cfg.meta_batch,
                    seed=run_seed,
                    progress=progress,
                    on_step=fewshot.curve_recorder(
                        evaluate, episodes, cfg.eval_every, cfg.steps, points
                    ),
                    desc=f"{method} {factor:g}x seed {s}",
                )
    rows = []
    for factor in cfg.lr_factors:
        targets = [_final(curves[("maml", 1.0, s)]) for s in range(cfg.seeds)]
        reach = {
            m: [steps_to_reach(curves[(m, factor, s)], targets[s]) for s in range(cfg.seeds)]
            for m in METHODS
        }
        for method in METHODS:
            finals = [_final(curves[(method, factor, s)]) for s in range(cfg.seeds)]
            acc, acc_se = _mean_se(finals)
            row = {
                "method": method,
                "inner_lr": BASE_LR * factor,
                "final_acc": acc,
                "final_acc_stderr": acc_se,
                "seeds": cfg.seeds,
                "steps": cfg.steps,
                "steps_to_maml_1x": _mean_se(reach[method])[0],
                "reached": int(np.isfinite(reach[method]).sum()),
            }
            if method == "maml+grad_share":
                ratios = np.array(reach["maml"]) / np.array(reach[method])
                row["speedup"], row["speedup_stderr"] = _mean_se(ratios)
            rows.append(row)
    _plot(out_dir, curves, cfg)
    writers.write_json(
        out_dir / "grad_share_glyphs.json",
        {
            "config": dataclasses.asdict(cfg) | {"base_lr": BASE_LR, "seed": seed},
            "rows": rows,
            "curves": {f"{m} {f:g}x seed {s}": p for (m, f, s), p in curves.items()},
        },
    )
    writers.write_csv(out_dir / "grad_share_glyphs.csv", rows)
    return rows


def _plot(out_dir, curves, cfg):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cfg.lr_factors), figsize=(5 * len(cfg.lr_factors), 4))
    for ax, factor in zip(np.atleast_1d(axes), cfg.lr_factors, strict=True):
        for method, color in zip(METHODS, ("C0", "C1"), strict=True):
            for s in range(cfg.seeds):
                xs, ys = zip(*curves[(method, factor, s)], strict=True)
                ax.plot(
                    xs, 100 * np.array(ys), color=color, alpha=0.7, label=method if s == 0 else None
                )
        ax.set(
            title=f"inner lr {BASE_LR * factor:g} ({factor:g}x)",
            xlabel="outer step",
            ylabel="held-out 5-way 1-shot accuracy (%)",
        )
        ax.legend()
    fig.tight_layout()
    fig.savefig(pathlib.Path(out_dir) / "grad_share_glyphs.png", dpi=110)
    plt.close(fig)
