"""Multi-task gradient aggregation: the CAGrad/Nash-MTL 2-D toy and MultiDigits (issue 15).

Every multi-task aggregator metagrad exports (the registry in `experiments.mtl_methods`;
names this version lacks are skipped and listed) runs on

(a) the two-objective toy of the CAGrad and Nash-MTL papers (`experiments.mtl_toy`): Adam on
    each method's combined gradient from the papers' starting points, in the CAGrad paper's
    setting and the Nash-MTL paper's (first loss x 0.1); trajectories over the mean-loss
    contours (``toy_cagrad.png``, ``toy_nashmtl.png``) and whether each run ends on the Pareto
    front (``toy.csv``: Pareto-stationarity gap and distance to the Pareto segment per start);
(b) MultiDigits (`experiments.mtl_digits`): two overlapped 8x8 digits per image, a shared MLP
    encoder and two heads; test accuracy per task and Δm% against single-task training,
    mean ± standard error over seeds (``digits.csv``, ``digits.png``).

Budgets: tiny (tests: three methods, a few steps), quick (the default: every method, toy Adam
lr 1e-2 for 5,000 steps, digits 5 seeds x 300 steps), full (toy: the papers' Adam lr 1e-3 for
100,000 steps; digits 5 seeds x 3,000 steps). One jitted program per method and part, the
starts / seeds vmapped inside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

import numpy as np

from experiments import config, mtl_digits, mtl_methods, mtl_toy, writers
from experiments.config import option

NAME = "mtl"
DESCRIPTION = "multi-task aggregators: CAGrad/Nash-MTL 2-D toy and two-digit MultiDigits"

TINY_METHODS = ("mtl_sum", "pcgrad", "famo")


_NAMES = tuple(spec.name for spec in mtl_methods.REGISTRY)


@dataclasses.dataclass(frozen=True)
class Config:
    seeds: int = option("MultiDigits seeds", minimum=2)
    steps: int = option("MultiDigits training steps", minimum=1)
    toy_steps: int = option("toy Adam steps", minimum=1)
    methods: tuple[str, ...] | None = option(
        "metagrad aggregators (default: every one available)",
        default=None, choices=_NAMES, many=True,
    )  # fmt: skip
    toy_lr: float = 0.01
    toy_record: int = 200  # points kept per trajectory
    train_pairs: int = 3000
    test_pairs: int = 2000

    @property
    def toy(self) -> mtl_toy.ToyConfig:
        return mtl_toy.ToyConfig(self.toy_steps, self.toy_lr, self.toy_record)

    @property
    def digits(self) -> mtl_digits.DigitsConfig:
        return mtl_digits.DigitsConfig(self.seeds, self.steps, self.train_pairs, self.test_pairs)


BUDGETS = {
    "tiny": dict(toy_steps=200, toy_lr=0.05, toy_record=20, seeds=2, steps=20, train_pairs=300,
                 test_pairs=300, methods=TINY_METHODS),
    "quick": dict(toy_steps=5000, toy_lr=0.01, seeds=5, steps=300, train_pairs=3000),
    "full": dict(toy_steps=100_000, toy_lr=0.001, toy_record=400, seeds=5, steps=3000,
                 train_pairs=10_000),
}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_options(parser, Config, BUDGETS, NAME)


def _digits_plot(path: pathlib.Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "delta_m" in r and not r["method"].startswith("STL")]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(rows) + 1.5), 3.6))
    x = np.arange(len(rows))
    ax.bar(
        x,
        [r["delta_m"] for r in rows],
        yerr=[r["delta_m_stderr"] for r in rows],
        color=["tab:green" if r["delta_m"] < 0 else "tab:gray" for r in rows],
        capsize=3,
    )
    ax.axhline(0.0, color="k", linewidth=0.8)
    ax.set_xticks(x, [r["method"] for r in rows], rotation=45, ha="right")
    ax.set_ylabel("Δm% vs single-task (lower is better)")
    ax.set_title("MultiDigits: relative multi-task drop, mean ± s.e. over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)  # fmt: skip


def run(out_dir, *, budget="quick", seed=0, progress=True, args=None) -> list[dict]:
    out_dir = pathlib.Path(out_dir)
    cfg = config.resolve(Config, BUDGETS, budget, args, NAME)
    specs, skipped = mtl_methods.available(list(cfg.methods) if cfg.methods else None)
    notes = {"skipped (not in this metagrad)": skipped, "not in the registry":
             mtl_methods.unlisted(), "dropped keyword arguments": {}}  # fmt: skip
    for spec in specs:
        dropped = mtl_methods.build(spec, 2)[1]
        if dropped:
            notes["dropped keyword arguments"][spec.name] = dropped
    if progress and skipped:
        print(f"   skipping (not in this metagrad): {', '.join(skipped)}", flush=True)

    # (a) the toy.
    toy_rows, paths = [], {setting: {} for setting in mtl_toy.SETTINGS}
    for spec in specs:
        start = time.perf_counter()
        runs = mtl_toy.trajectories(spec, cfg.toy)
        seconds = time.perf_counter() - start
        for setting, run_paths in runs.items():
            paths[setting][spec.label] = run_paths
            row = mtl_toy.summarize(spec.label, setting, run_paths)
            toy_rows.append({"part": "toy", **row, "seconds": seconds})
            if progress:
                print(f"   toy    {setting:<8} {spec.label:<16} reached {row['reached']}",
                      flush=True)  # fmt: skip
    for setting, per_method in paths.items():
        tag = setting.lower().replace("-", "")
        mtl_toy.plot(out_dir / f"toy_{tag}.png", per_method, setting)
        np.savez_compressed(out_dir / f"toy_{tag}_trajectories.npz", **per_method)

    # (b) MultiDigits.
    data = mtl_digits.make_data(seed, cfg.digits.train_pairs, cfg.digits.test_pairs)
    start = time.perf_counter()
    stl = np.stack([mtl_digits.train(t, cfg.digits, seed, data)[:, t] for t in (0, 1)], 1)
    digit_rows = [{
        "part": "digits", "method": "STL (one network per task)",
        "acc_left": float(stl[:, 0].mean()), "acc_left_stderr": mtl_digits.stderr(stl[:, 0]),
        "acc_right": float(stl[:, 1].mean()), "acc_right_stderr": mtl_digits.stderr(stl[:, 1]),
        "delta_m": 0.0, "delta_m_stderr": 0.0, "seeds": cfg.digits.seeds,
        "seconds": time.perf_counter() - start,
    }]  # fmt: skip
    for spec in specs:
        start = time.perf_counter()
        acc = mtl_digits.train(spec, cfg.digits, seed, data)
        dm = mtl_digits.delta_m(acc, stl)
        digit_rows.append({
            "part": "digits", "method": spec.label,
            "acc_left": float(acc[:, 0].mean()), "acc_left_stderr": mtl_digits.stderr(acc[:, 0]),
            "acc_right": float(acc[:, 1].mean()),
            "acc_right_stderr": mtl_digits.stderr(acc[:, 1]),
            "delta_m": float(dm.mean()), "delta_m_stderr": mtl_digits.stderr(dm),
            "seeds": cfg.digits.seeds, "seconds": time.perf_counter() - start,
        })  # fmt: skip
        if progress:
            print(f"   digits {spec.label:<16} Δm {dm.mean():+.2f} ± {mtl_digits.stderr(dm):.2f}",
                  flush=True)  # fmt: skip
    _digits_plot(out_dir / "digits.png", digit_rows)

    writers.write_csv(out_dir / "toy.csv", toy_rows)
    writers.write_csv(out_dir / "digits.csv", digit_rows)
    writers.write_json(out_dir / "mtl.json", {
        "budget": budget, "seed": seed, "toy": dataclasses.asdict(cfg.toy),
        "digits": dataclasses.asdict(cfg.digits), "notes": notes,
        "toy_rows": toy_rows, "digits_rows": digit_rows,
    })  # fmt: skip
    return toy_rows + digit_rows
