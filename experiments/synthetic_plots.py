"""The main figures of `experiments.synthetic`: synthetic.png (trajectories on the MTL loss
surface, end-of-run task-gradient cosines) and synthetic_cosine.png (cosines over training)."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from experiments.synthetic import LABELS, OPTIMA, Config, _tail, mtl_loss


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(x)))
    return np.convolve(x, np.ones(window) / window, mode="valid")


def plot(out_dir: pathlib.Path, cfg: Config, results: dict, minima: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = -11.0, 22.0
    xs = np.linspace(lo, hi, 265)
    grid = np.stack(np.meshgrid(xs, xs), -1)
    surface = np.asarray(jax.vmap(jax.vmap(mtl_loss))(jnp.asarray(grid, jnp.float32)))
    colors = ("tab:red", "tab:cyan", "tab:orange")

    methods = [m for m in cfg.methods if m in results]
    fig, axes = plt.subplots(2, 4, figsize=(18, 9.4), layout="constrained")
    axes = axes.ravel()
    for ax, method in zip(axes, methods, strict=False):
        cs = ax.contourf(xs, xs, surface, levels=30, cmap="viridis")
        ax.contour(xs, xs, surface, levels=15, colors="k", linewidths=0.3, alpha=0.5)
        ax.plot(OPTIMA[:, 0], OPTIMA[:, 1], "X", color="white", ms=10, mec="black", zorder=3)
        for (x, y), label in zip(OPTIMA, ("x1", "x2", "x3"), strict=True):
            ax.annotate(
                label,
                (x, y),
                (-16, 7),
                textcoords="offset points",
                color="white",
                fontsize=10,
                fontweight="bold",
            )
        traj = results[method]["traj"]
        for s, start in enumerate(cfg.starts):
            t = traj[s]
            label = f"start ({start[0]:g}, {start[1]:g})"
            ax.plot(t[:, 0], t[:, 1], "-", color=colors[s], lw=1.8, label=label, zorder=4)
            ax.plot(*t[0], "o", color=colors[s], ms=8, mec="black", zorder=5)
            ax.plot(*t[-1], "*", color=colors[s], ms=17, mec="black", zorder=6)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_title(LABELS[method], fontsize=13)
        ax.set_xlabel("φ₁")
        ax.set_ylabel("φ₂")
    fig.colorbar(cs, ax=axes[: len(methods)].tolist(), shrink=0.5, label="MTL loss Σᵢ Lᵢ(φ)")
    axes[0].legend(fontsize=8, loc="upper right", framealpha=0.85)

    ax = axes[len(methods)]
    table = np.array([[np.mean(_tail(c)) for c in results[m]["cos"]] for m in methods])
    im = ax.imshow(table, cmap="coolwarm", vmin=-1, vmax=1, aspect="auto")
    ax.set_yticks(range(len(methods)), [LABELS[m] for m in methods])
    ax.set_xticks(range(len(cfg.starts)), [f"({a:g}, {b:g})" for a, b in cfg.starts])
    ax.set_xlabel("start")
    for i in range(table.shape[0]):
        for j in range(table.shape[1]):
            ax.text(j, i, f"{table[i, j]:.2f}", ha="center", va="center", fontsize=10)
    ax.set_title("avg pairwise cosine of task gradients\nover the last 10% of updates", fontsize=12)
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine")
    for ax in axes[len(methods) + 1 :]:
        ax.axis("off")
    fig.suptitle(
        f"Sequential Reptile Fig. 3 setup: {cfg.optimizer} lr {cfg.lr}, {cfg.steps} updates of φ, "
        f"Reptile K={cfg.inner_steps}, η={cfg.outer}   (● start, ★ end, X task optima x_i)",
        fontsize=13,
    )
    fig.savefig(out_dir / "synthetic.png", dpi=100)
    plt.close(fig)

    window = max(1, cfg.steps // 40)
    fig, axes = plt.subplots(1, len(cfg.starts), figsize=(5.5 * len(cfg.starts), 4.3), sharey=True)
    for s, (ax, start) in enumerate(zip(np.atleast_1d(axes), cfg.starts, strict=True)):
        for method in methods:
            smooth = _smooth(results[method]["cos"][s], window)
            ax.plot(np.arange(len(smooth)) + window - 1, smooth, label=LABELS[method], lw=1.4)
        ax.set_title(f"start ({start[0]:g}, {start[1]:g})")
        ax.set_xlabel("update of φ")
        ax.set_ylim(-1.05, 1.05)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel(
        f"avg pairwise cosine of task gradients\n(running mean of {window})"
    )
    np.atleast_1d(axes)[0].legend(fontsize=8, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "synthetic_cosine.png", dpi=100)
    plt.close(fig)
