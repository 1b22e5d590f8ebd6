"""The sensitivity sweep of `experiments.synthetic` (`--synthetic-sweep`): Reptile and
Sequential Reptile (i.i.d. and round-robin task ids) over optimizer, learning rate and K;
the rows of synthetic_sweep.csv and the figure synthetic_order.png."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from experiments.synthetic import LABELS, OPTIMA, Config, mtl_loss, run_method, summarize

# The sensitivity grid for Reptile and Seq. Reptile: (optimizer, learning rate, K).
SWEEP = (
    ("adam", 0.1, 10),
    ("adam", 0.1, 100),
    ("sgd", 0.02, 10),
    ("sgd", 0.02, 100),
    ("sgd", 0.1, 10),
    ("sgd", 0.1, 100),
)


# (method, Seq. Reptile's task order) of the sweep: Reptile, and Seq. Reptile with the paper's
# i.i.d. task ids and with a fixed round-robin order.
SWEEP_METHODS = (("reptile", "iid"), ("seq_reptile", "iid"), ("seq_reptile", "round_robin"))
# The sweep settings drawn in synthetic_order.png: the main table's, and two at larger K·lr.
ORDER_FIGURE = (("adam", 0.1, 10), ("adam", 0.1, 100), ("sgd", 0.1, 100))
CENTROID = OPTIMA.mean(0)


def sweep_label(method: str, order: str) -> str:
    if method == "reptile":
        return LABELS[method]
    return f"{LABELS[method]} ({'i.i.d.' if order == 'iid' else 'round-robin'})"


def sweep(cfg: Config, seed: int, minima: np.ndarray, progress: bool):
    """Reptile and Seq. Reptile (both task orders) over `SWEEP`: rows and trajectories."""
    from tqdm.auto import tqdm

    rows, trajectories = [], {}
    grid = [(g, m) for g in SWEEP for m in SWEEP_METHODS]
    for (optimizer, lr, k), (method, order) in tqdm(
        grid, desc="synthetic sweep", disable=not progress
    ):
        sub = dataclasses.replace(cfg, optimizer=optimizer, lr=lr, inner_steps=k, seq_order=order)
        traj, cos = run_method(method, sub, seed)
        trajectories[(optimizer, lr, k, method, order)] = traj
        for row in summarize(method, sub, traj, cos, minima):
            end = np.array([row["final_x"], row["final_y"]])
            rows.append(
                {
                    **row,
                    "method": sweep_label(method, order),
                    "optimizer": optimizer,
                    "lr": lr,
                    "inner_steps": k,
                    "k_lr": k * lr,
                    "order": order if method == "seq_reptile" else "",
                    "dist_centroid": float(np.linalg.norm(end - CENTROID)),
                }
            )
    return rows, trajectories


def plot_order(out_dir: pathlib.Path, cfg: Config, trajectories: dict) -> None:
    """synthetic_order.png: Reptile and Seq. Reptile (i.i.d. vs round-robin) at three K·lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = np.linspace(-11.0, 22.0, 166)
    grid = np.stack(np.meshgrid(xs, xs), -1)
    surface = np.asarray(jax.vmap(jax.vmap(mtl_loss))(jnp.asarray(grid, jnp.float32)))
    colors = ("tab:red", "tab:cyan", "tab:orange")
    fig, axes = plt.subplots(
        len(SWEEP_METHODS), len(ORDER_FIGURE), figsize=(5 * len(ORDER_FIGURE), 13),
        layout="constrained", squeeze=False,
    )  # fmt: skip
    for c, (optimizer, lr, k) in enumerate(ORDER_FIGURE):
        for r, (method, order) in enumerate(SWEEP_METHODS):
            ax = axes[r, c]
            ax.contourf(xs, xs, surface, levels=30, cmap="viridis")
            ax.plot(OPTIMA[:, 0], OPTIMA[:, 1], "X", color="white", ms=9, mec="black", zorder=3)
            ax.plot(*CENTROID, "P", color="magenta", ms=10, mec="black", zorder=3)
            traj = trajectories.get((optimizer, lr, k, method, order))
            if traj is None:
                ax.axis("off")
                continue
            for s, start in enumerate(cfg.starts):
                t = traj[s]
                ax.plot(t[:, 0], t[:, 1], "-", color=colors[s], lw=1.5,
                        label=f"start ({start[0]:g}, {start[1]:g})", zorder=4)  # fmt: skip
                ax.plot(*t[-1], "*", color=colors[s], ms=14, mec="black", zorder=5)
            ax.set_title(
                f"{sweep_label(method, order)}\n{optimizer} lr {lr}, K={k} (K·lr={k * lr:g})"
            )
            ax.set_xlim(xs[0], xs[-1])
            ax.set_ylim(xs[0], xs[-1])
    axes[0, 0].legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"Reptile vs Sequential Reptile with i.i.d. (the paper's Algorithm 1) and round-robin "
        f"task ids, {cfg.steps} outer steps (X task optima, + centroid, * end)",
        fontsize=12,
    )
    fig.savefig(out_dir / "synthetic_order.png", dpi=90)
    plt.close(fig)
