"""The figures of `experiments.dotprod_sweep`: dotprod_sweep.png (test accuracy and paired
difference to weight 0 vs training-set size) and dotprod_sweep_grad_dot.png (the paper's
Figure 4: the dot product between consecutive batch gradients over training)."""

from __future__ import annotations

import pathlib

import numpy as np

from experiments.dotprod_sweep import LR, Config


def plot(out_dir: pathlib.Path, cfg: Config, results: dict, stem: str = "dotprod_sweep") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(
        2 * len(names),
        len(cfg.noise),
        figsize=(4.2 * len(cfg.noise), 6.4 * len(names)),
        squeeze=False,
    )
    base = cfg.weights.index(0.0)
    lr = cfg.finetune_lr if cfg.setting == "finetune" else LR
    for d, name in enumerate(names):
        problem, metrics = results[name]["problem"], results[name]["metrics"]
        acc = metrics["test_acc"]
        xs = np.arange(len(problem.sizes))
        for z, rate in enumerate(cfg.noise):
            top, bottom = axes[2 * d, z], axes[2 * d + 1, z]
            for w, weight in enumerate(cfg.weights):
                a = acc[:, z, :, w]
                diff = a - acc[:, z, :, base]
                se = a.std(0, ddof=1) / np.sqrt(len(a))
                color = f"C{w}"  # one color per weight in both rows
                top.errorbar(
                    xs, a.mean(0), se, marker="o", capsize=3, label=f"w={weight:g}", color=color
                )
                if w != base:
                    dse = diff.std(0, ddof=1) / np.sqrt(len(diff))
                    bottom.errorbar(xs, diff.mean(0), dse, marker="o", capsize=3,
                                    label=f"w={weight:g}", color=color)  # fmt: skip
            bottom.axhline(0, color="k", lw=0.8)
            for ax in (top, bottom):
                ax.set_xticks(xs, problem.size_labels)
                ax.grid(alpha=0.3)
            top.set_title(f"{name}, label noise {rate:.0%}")
            top.set_ylabel("test accuracy")
            bottom.set_ylabel("paired diff. vs w=0")
            bottom.set_xlabel("training-set size")
        axes[2 * d, 0].legend(fontsize=8)
        axes[2 * d + 1, 0].legend(fontsize=8)
    fig.suptitle(
        f"Meta DotProd ({cfg.setting}): mean ± s.e. over {cfg.seeds} seeds, "
        f"{cfg.steps} Adam steps, lr {lr:g}"
    )
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}.png", dpi=100)
    plt.close(fig)

    # Figure 4: the dot product over training, w = 0 vs 0.1 (and 0.01 when fine-tuning),
    # smallest and largest set.
    shown = (0.0, 0.01, 0.1) if cfg.setting == "finetune" else (0.0, 0.1)  # 0.1 diverges there
    compare = [w for w in shown if w in cfg.weights]
    fig, axes = plt.subplots(len(names), len(cfg.noise), figsize=(4.2 * len(cfg.noise),
                             3.6 * len(names)), squeeze=False)  # fmt: skip
    steps = np.arange(1, cfg.steps // cfg.log_every + 1) * cfg.log_every
    for d, name in enumerate(names):
        problem, dots = results[name]["problem"], results[name]["dots"]
        for z, rate in enumerate(cfg.noise):
            ax = axes[d, z]
            for n in sorted({0, len(problem.sizes) - 1}):
                for weight in compare:
                    # Median and quartiles over seeds: a diverging seed's dot product is
                    # orders of magnitude larger and would swamp a mean.
                    v = dots[:, z, n, cfg.weights.index(weight)]
                    lo, mid, hi = np.percentile(v, [25, 50, 75], axis=0)
                    style = {0.0: "-", 0.01: ":"}.get(weight, "--")
                    label = f"n={problem.size_labels[n]}, w={weight:g}"
                    line = ax.plot(steps, mid, style, label=label)[0]
                    ax.fill_between(steps, lo, hi, alpha=0.2, color=line.get_color())
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_title(f"{name}, label noise {rate:.0%}")
            ax.set_xlabel("Adam step")
            ax.grid(alpha=0.3)
        axes[d, 0].set_ylabel("⟨∇L(θ; b_t), ∇L(θ; b_t+1)⟩")
        axes[d, 0].legend(fontsize=7)
    fig.suptitle(
        "Dot product between consecutive batch gradients (DotProd paper, Fig. 4): median and "
        f"quartiles over {cfg.seeds} seeds"
    )
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}_grad_dot.png", dpi=100)
    plt.close(fig)
