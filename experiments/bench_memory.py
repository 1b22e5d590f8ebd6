"""Benchmark section "memory": peak compiled memory and step time of second-order meta-learning.

How memory grows with the number of inner steps K for MAML (second order), MAML with
``remat=True``, FOMAML, ANIL (``inner_mask``: the head only) and iMAML (``mg.imaml``), on
few-shot classification steps (5-way 1-shot, 15 queries per class, meta-batch 4, inner SGD
0.01, outer Adam 1e-3) of

- Conv-4 without batch norm (32 channels, 28×28×1 images; `experiments.models.conv4_apply`);
- ResNet-12 without batch norm (12.4M parameters at width 1; 16×16×3 images by default,
  ``--real-resnet-image`` / ``--real-resnet-width`` as in the "real_models" section).

Memory is the compiled meta-step's ``memory_analysis()``: temp + argument + output bytes (what
XLA allocates for one call; compiling is enough, so every K is measured). Time is the median
over ``--mem-rounds`` calls of the compiled step, measured for K <= ``--mem-time-max-k``
(larger K: compile only, with XLA's backend optimizations off). Every learner runs with
``task_loop="map"`` (one copy of the per-task program, no grouped convolutions on CPU;
``--mem-task-loop unroll`` for faster CPU steps) and ``step_loop="scan"`` (compile time
independent of K), so the figures compare methods, not execution strategies. The loop runs
K-major (every method at the first K, then the next K), writing the JSON after every row;
``--mem-replot a.json b.json`` rebuilds the table and the plot from saved rows. The section
prints a table, writes ``bench_memory.json`` and ``bench_memory.png`` (memory and time against
K, one panel per model) to ``--mem-out``, and states the growth of memory with K per method
(MB per inner step, fitted between the smallest and largest K).
Images are random: memory and step time do not depend on the pixels.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time

import jax
import optax

import metagrad as mg
from experiments.bench_real_models import INNER_LR, OUTER_LR, episodes, make_model

METHODS = ("maml", "maml_remat", "fomaml", "anil", "imaml")
KS = (1, 5, 10, 20, 50)
LAM, CG_STEPS = 1.0, 5  # iMAML: proximal strength, CG iterations
MB = 2**20
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def add_arguments(parser):
    group = parser.add_argument_group("memory")
    add = group.add_argument
    add("--mem-models", nargs="*", choices=("conv4", "resnet12"), default=["conv4", "resnet12"])
    add("--mem-methods", nargs="*", choices=METHODS, default=list(METHODS))
    add("--mem-ks", nargs="*", type=int, default=list(KS), help="inner steps K")
    add("--mem-time-max-k", nargs=2, type=int, default=[5, 1], metavar=("CONV4", "RESNET12"),
        help="time steps for K up to these (per model); 0: compile only")  # fmt: skip
    add(
        "--mem-task-loop",
        choices=("map", "unroll", "vmap"),
        default="map",
        help="task_loop of every learner (unroll: fastest Conv-4 steps on CPU)",
    )
    add("--mem-rounds", type=int, default=3, help="timed calls per entry (median)")
    add("--mem-out", default="experiments/out", help="directory of the JSON and the plot")
    add("--mem-replot", nargs="*", default=None, help="JSON files of saved rows: report only")


def learner(method: str, model, num_steps: int, task_loop: str = "map"):
    """The meta-learner of `method` on `model` with `num_steps` inner steps."""
    outer = optax.adam(OUTER_LR)
    loops = dict(task_loop=task_loop, step_loop="scan")
    inner = optax.sgd(INNER_LR)
    if method == "imaml":
        return mg.imaml(model.loss_fn, inner, num_steps, outer, lam=LAM, cg_steps=CG_STEPS, **loops)
    kw = {
        "maml": {},
        "maml_remat": {"remat": True},
        "fomaml": {"first_order": True},
        # ANIL: the inner loop adapts the dense head (the last element of the params list).
        "anil": {"inner_mask": lambda p: [False] * (len(p) - 1) + [True]},
    }[method]
    return mg.maml(model.loss_fn, inner, num_steps, outer, **loops, **kw)


def measure(method, model, num_steps, tasks, timed: bool, rounds: int, task_loop="map") -> dict:
    meta = learner(method, model, num_steps, task_loop)
    state = meta.init(model.params)
    start = time.perf_counter()
    # Compile-only rows skip XLA's costly backend (LLVM) optimizations: they change the
    # generated code's speed, not the buffers the memory analysis reports.
    options = None if timed else FAST_COMPILE
    compiled = meta.step.lower(state, tasks).compile(compiler_options=options)
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    row = {
        "model": model.name,
        "method": method,
        "K": num_steps,
        "peak_MB": round(
            (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / MB,
            2,
        ),
        "temp_MB": round(mem.temp_size_in_bytes / MB, 2),
        "compile_s": round(compile_s, 1),
        "step_s": None,
    }
    if timed:
        box = [jax.block_until_ready(compiled(state, tasks)[0])]  # warm-up
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            box[0] = jax.block_until_ready(compiled(box[0], tasks)[0])
            times.append(time.perf_counter() - t0)
        row["step_s"] = round(statistics.median(times), 3)
    return row


def growth(rows: list[dict]) -> dict:
    """MB of peak memory per added inner step, per (model, method), smallest to largest K."""
    out = {}
    for key in {(r["model"], r["method"]) for r in rows}:
        mine = sorted((r for r in rows if (r["model"], r["method"]) == key), key=lambda r: r["K"])
        if len(mine) >= 2 and mine[-1]["K"] > mine[0]["K"]:
            slope = (mine[-1]["peak_MB"] - mine[0]["peak_MB"]) / (mine[-1]["K"] - mine[0]["K"])
            out[key] = {
                "MB_per_step": round(slope, 3),
                "ratio_last_first": round(mine[-1]["peak_MB"] / mine[0]["peak_MB"], 3),
            }
    return out


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    panels = 2 if any(r["step_s"] is not None for r in rows) else 1
    fig, axes = plt.subplots(panels, len(models), figsize=(5.5 * len(models), 3.5 * panels),
                             squeeze=False)  # fmt: skip
    for j, name in enumerate(models):
        for method in METHODS:
            mine = sorted((r for r in rows if r["model"] == name and r["method"] == method),
                          key=lambda r: r["K"])  # fmt: skip
            if not mine:
                continue
            axes[0][j].plot([r["K"] for r in mine], [r["peak_MB"] for r in mine], "o-",
                            label=method)  # fmt: skip
            timed = [r for r in mine if r["step_s"] is not None]
            if timed and panels == 2:
                axes[1][j].plot([r["K"] for r in timed], [r["step_s"] for r in timed], "o-",
                                label=method)  # fmt: skip
        axes[0][j].set(title=f"{name}: peak compiled memory", xlabel="inner steps K",
                       ylabel="MB (temp + args + outputs)")  # fmt: skip
        axes[0][j].set_yscale("log")
        if panels == 2:
            axes[1][j].set(title=f"{name}: time per meta-step (CPU)", xlabel="inner steps K",
                           ylabel="s")  # fmt: skip
        for ax in axes[:, j]:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    """A Markdown table: peak MB (and step time) per model and method, one column per K."""
    ks = sorted({r["K"] for r in rows})
    lines = ["| model | method | " + " | ".join(f"K={k}" for k in ks) + " |",
             "|---|---|" + "---|" * len(ks)]  # fmt: skip
    for name in sorted({r["model"] for r in rows}):
        for method in METHODS:
            cells = []
            for k in ks:
                hit = [r for r in rows if (r["model"], r["method"], r["K"]) == (name, method, k)]
                if not hit:
                    cells.append("")
                    continue
                r = hit[0]
                time_s = "" if r["step_s"] is None else f" / {r['step_s']:.2f} s"
                cells.append(f"{r['peak_MB']:.0f} MB{time_s}")
            if any(cells):
                lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(rows: list[dict], out_dir: pathlib.Path, log) -> None:
    log(table(rows))
    for (name, method), g in sorted(growth(rows).items()):
        log(f"  growth {name} {method}: {g['MB_per_step']} MB per inner step, "
            f"peak(K max) / peak(K min) = {g['ratio_last_first']}")  # fmt: skip
    for name in sorted({r["model"] for r in rows}):
        peak = {r["K"]: r["peak_MB"] for r in rows if (r["model"], r["method"]) == (name, "imaml")}
        if 5 in peak and 50 in peak:
            log(f"  {name} imaml peak K=50 / K=5 = {peak[50] / peak[5]:.3f}")
    if rows:
        plot(rows, out_dir / "bench_memory.png")
        log(f"  wrote {out_dir / 'bench_memory.png'}")


def run(args) -> list[dict]:
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    out_dir = pathlib.Path(getattr(args, "mem_out", "experiments/out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    replot = getattr(args, "mem_replot", None)
    if replot:
        rows = [row for path in replot for row in json.loads(pathlib.Path(path).read_text())]
        report(rows, out_dir, log)
        return rows
    max_k = dict(zip(("conv4", "resnet12"), getattr(args, "mem_time_max_k", [5, 1]),
                     strict=True))  # fmt: skip
    rows = []
    for name in getattr(args, "mem_models", ["conv4", "resnet12"]):
        model = make_model(name, args)
        tasks = episodes(model, 1)
        log(f"  {model.label}")
        for k in getattr(args, "mem_ks", KS):
            for method in getattr(args, "mem_methods", METHODS):
                row = measure(method, model, k, tasks, k <= max_k[name],
                              getattr(args, "mem_rounds", 3),
                              getattr(args, "mem_task_loop", "map"))  # fmt: skip
                log(f"    {method:>10} K={k:<3} peak {row['peak_MB']:9.1f} MB  "
                    f"step {row['step_s']} s  (compiled in {row['compile_s']} s)")  # fmt: skip
                rows.append(row)
                with open(out_dir / "bench_memory.json", "w") as f:
                    json.dump(rows, f, indent=1)
    report(rows, out_dir, log)
    return rows
