"""Synthetic multi-task experiment of Sequential Reptile (Lee et al., 2022, Section 4.1, Fig. 3).

Three tasks on φ ∈ R²,  L_i(φ) = −200·exp(−0.2·‖φ − x_i‖₂)  with x1 = (0, 10), x2 = (0, 0),
x3 = (10, 0); the MTL loss is Σ_i L_i. Each x_i is a local minimum of the MTL loss (a cusp:
near x_i task i's pull has norm 40, the others' at most 2·40·e⁻² ≈ 10.8). The paper's claim:
every multi-task baseline ends in one of these MTL local minima, Reptile and Sequential Reptile
avoid them, and Sequential Reptile ends where the task gradients agree best (highest average
pairwise cosine similarity).

Methods (all through metagrad's public API):

- MTL: ``optax.chain(mg.mtl_sum(), base)``; PCGrad, GradVac, GradNorm: the same with
  ``mg.pcgrad``, ``mg.gradvac``, ``mg.gradnorm`` in place of ``mg.mtl_sum``.
- RecAdam: ``optax.chain(mg.mtl_sum(), mg.recadam(lr, pretrained=start))``: the start plays
  the pretrained weights.
- Reptile: ``mg.reptile`` (parallel): each task runs its own K-step inner trajectory of
  ``base`` from φ; φ ← φ − η·mean_t(φ − θ_K^t).
- Seq. Reptile: ``mg.seq_reptile``: one K-step inner trajectory of ``base`` whose task ids are
  drawn uniformly (p uniform), φ ← φ − η·(φ − θ_K). The ids are i.i.d. draws, as the paper's
  Algorithm 1 specifies (line 5: t_k ~ Cat(p_1, ..., p_T), for k = 1..K);
  ``--synthetic-seq-order round_robin`` visits the tasks in the fixed order 0, 1, 2, 0, ...
  instead (``mg.uniform_tasks(order="round_robin")``, the cycle continued across outer steps).

Settings (chosen once for all methods, before looking at the outcome; the paper gives none):

- base optimizer ``base`` = Adam, learning rate 0.1 (``--synthetic-optimizer sgd`` switches every
  method, Reptile inner loops included, to SGD with learning rate 0.02, which keeps the step
  at a cusp, 0.02·40 = 0.8 per task gradient, below the distance between optima);
  RecAdam uses Adam with the same learning rate whatever the switch, as it is Adam by
  definition.
- steps: 1000 updates of φ for every method ("quick"; "tiny" 250, "full" 4000). For Reptile
  and Seq. Reptile one update is an outer step of K = 10 inner steps (Reptile: 10 per task;
  Seq. Reptile: 10 in total, ≈3.3 per task) with outer step η = 0.1 (the paper's η), so
  η·K = 1 and φ moves at the pace of the other methods' steps.
- inner optimizer state reset at every outer step (metagrad's default for both learners).
- PCGrad / GradVac: random task order from a key; GradVac β = 0.01, whole-model granularity.
  GradNorm: α = 1.5, weights by SGD with step 0.025 (metagrad's defaults); its losses are
  L_i + 200 (the loss above its optimum value −200), since its training rate L_i(t)/L_i(0)
  needs positive losses. RecAdam: k = 0.05, t0 = steps/4, γ = 1 (pull 0.1·(θ − θ*) per step
  at first, gone after t0 + ~100 steps); metagrad's defaults (γ = 5000) are for fine-tuning
  with learning rates ~1e-5 and are unstable at 0.1.
- starts: (20, 5) (the paper's) and two of our choice, (15, 15) and (−8, 3), since the paper's
  Appendix F does not state its other two starts.
- The loss uses ‖d‖ = sqrt(d·d + 1e-12) so the gradient at x_i is finite (0); the function
  differs from the paper's by less than 1e-5.

Outcome at these settings (seed 0; asserted by tests/test_experiment_synthetic.py): MTL, PCGrad,
GradVac and RecAdam end in (within 1 of) an MTL local minimum, as the paper says; GradNorm does
not (its weights balance the weighted gradients at an interior point near (3.5, 3)); Reptile
ends at (0.4, 0.4), 0.56 from x2, inside our radius; Seq. Reptile ends in a minimum (x3 from
(20, 5), x2 from the other starts); and Seq. Reptile's average cosine is not the highest (MTL's
and RecAdam's, measured at the cusps, are). So the paper's claims about Reptile and Seq. Reptile
do not reproduce at these settings. The sweep below shows Reptile leaving the minima for the
centroid (10/3, 10/3) once K·lr is large (K = 100, or SGD), and Seq. Reptile leaving them only
with large SGD steps (lr 0.1), for interior points whose cosine (≈ −0.47) is no higher.

With ``--budget full`` (or ``--synthetic-sweep``) Reptile and Seq. Reptile (with i.i.d. and
with round-robin task ids) are also run over a small grid of optimizers, learning rates and K
(`SWEEP`), written to ``synthetic_sweep.csv`` and drawn for three settings in
``synthetic_order.png``: it shows which settings let them leave the minima, without changing
the main table's settings. At K·lr = 10 (Adam lr 0.1 with K = 100, or SGD lr 0.02 with K = 100)
plain Reptile ends within 0.01 of the centroid from every start: the interior point the paper
describes, reached once the inner trajectories get to their task optima. Seq. Reptile with
either task order still ends in an MTL local minimum at those settings (asserted by
tests/test_experiment_synthetic.py at 100 outer steps); only with large SGD steps (lr 0.1,
K = 100) does its i.i.d. version end in the interior, at points (≈ (2.6, 1.4)) whose average
cosine (≈ −0.47) is no higher than Reptile's at the centroid (−0.48), and the round-robin
version then ends near x2 or x3. So the paper's trade-off does not appear with either order.

Outputs (in the experiment's directory): ``synthetic.png`` (MTL loss contours, the three optima,
each method's trajectories from the three starts, one panel per method, and a heatmap of the
final average pairwise cosine similarity), ``synthetic_cosine.png`` (cosine similarity between
task gradients along each trajectory), ``synthetic.json`` and ``synthetic.csv`` (the table).
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

NAME = "synthetic"
DESCRIPTION = (
    "Sequential Reptile Section 4.1 synthetic 3-task problem: MTL, PCGrad, GradVac, GradNorm, "
    "RecAdam, Reptile, Seq. Reptile trajectories and task-gradient cosine"
)

OPTIMA = np.array([[0.0, 10.0], [0.0, 0.0], [10.0, 0.0]])
OPTIMA_LABELS = ("x1=(0,10)", "x2=(0,0)", "x3=(10,0)")
STARTS = ((20.0, 5.0), (15.0, 15.0), (-8.0, 3.0))
METHODS = ("mtl", "pcgrad", "gradvac", "gradnorm", "recadam", "reptile", "seq_reptile")
LABELS = {
    "mtl": "MTL",
    "pcgrad": "PCGrad",
    "gradvac": "GradVac",
    "gradnorm": "GradNorm",
    "recadam": "RecAdam",
    "reptile": "Reptile",
    "seq_reptile": "Seq. Reptile",
}
LR = {"adam": 0.1, "sgd": 0.02}
# A point within this distance of an MTL local minimum counts as having converged to it; the
# oscillation of a fixed-step optimizer around a cusp stays well inside it.
MINIMUM_RADIUS = 1.0


@dataclasses.dataclass(frozen=True)
class Config:
    """The experiment's settings (see the module docstring)."""

    steps: int = option("updates of φ per method", minimum=1)
    optimizer: str = option(
        "base optimizer of every method (adam: lr 0.1; sgd: lr 0.02)",
        default="adam",
        choices=tuple(sorted(LR)),
    )
    lr: float | None = None  # None: LR[optimizer]
    inner_steps: int = 10
    outer: float = 0.1
    gradvac_beta: float = 0.01
    gradnorm_alpha: float = 1.5
    gradnorm_lr: float = 0.025
    recadam_k: float = 0.05
    recadam_t0: float | None = None  # None: steps / 4
    recadam_coef: float = 1.0
    starts: tuple[tuple[float, float], ...] = STARTS
    methods: tuple[str, ...] = METHODS
    seq_order: str = option(
        "order of Seq. Reptile's task ids within and across trajectories: iid (uniform i.i.d. "
        "draws, the paper's Algorithm 1) or round_robin (tasks 0, 1, 2, 0, ... continued "
        "across outer steps)",
        default="iid",
        choices=("iid", "round_robin"),
    )
    sweep: bool = option(
        "also run Reptile and Seq. Reptile over a small grid of optimizers, learning rates "
        "and K; writes synthetic_sweep.csv",
        default=False,
        type=bool,
    )

    def __post_init__(self):
        if self.lr is None:
            object.__setattr__(self, "lr", LR[self.optimizer])
        if self.recadam_t0 is None:
            object.__setattr__(self, "recadam_t0", self.steps / 4)


BUDGETS = {
    "tiny": dict(steps=250),
    "quick": dict(steps=1000),
    "full": dict(steps=4000, sweep=True),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_options(parser, Config, BUDGETS, NAME)


# -- the problem -------------------------------------------------------------------------------


def task_loss(phi: jax.Array, task: jax.Array) -> jax.Array:
    """L_task(φ) = −200·exp(−0.2·‖φ − x_task‖), task an int scalar."""
    d = phi - jnp.asarray(OPTIMA, phi.dtype)[task]
    return -200.0 * jnp.exp(-0.2 * jnp.sqrt(jnp.sum(d * d) + 1e-12))


def task_losses(phi: jax.Array) -> jax.Array:
    return jax.vmap(task_loss, in_axes=(None, 0))(phi, jnp.arange(len(OPTIMA)))


def mtl_loss(phi: jax.Array) -> jax.Array:
    return jnp.sum(task_losses(phi))


def task_grads(phi: jax.Array) -> jax.Array:
    """Per-task gradients stacked on a leading task axis, shape [3, 2]."""
    return jax.jacrev(task_losses)(phi)


def mtl_minima() -> np.ndarray:
    """The MTL loss's local minima, found by normalized gradient descent from a grid."""

    @jax.jit
    def descend(points):
        def step(p, lr):
            g = jax.vmap(jax.grad(mtl_loss))(p)
            n = jnp.linalg.norm(g, axis=1, keepdims=True)
            return p - lr * g / jnp.maximum(n, 1e-12), None

        lrs = jnp.geomspace(0.5, 1e-4, 3000)
        return jax.lax.scan(step, points, lrs)[0]

    grid = np.stack(np.meshgrid(np.linspace(-10, 20, 16), np.linspace(-10, 20, 16)), -1)
    ends = np.asarray(descend(jnp.asarray(grid.reshape(-1, 2))))
    minima = []
    for p in ends:
        if all(np.linalg.norm(p - m) > 0.5 for m in minima):
            minima.append(p)
    return np.array(sorted(minima, key=lambda m: (m[0], m[1])))


# -- the methods -------------------------------------------------------------------------------


def _base(cfg: Config) -> optax.GradientTransformation:
    return optax.adam(cfg.lr) if cfg.optimizer == "adam" else optax.sgd(cfg.lr)


def _combiner_run(method: str, cfg: Config, seed: int):
    """A function start -> (trajectory [steps+1, 2], cosine [steps+1]) for a gradient method."""
    num_tasks = len(OPTIMA)
    if method == "recadam":
        tx = optax.chain(
            mg.mtl_sum(),
            mg.recadam(
                cfg.lr,
                anneal_k=cfg.recadam_k,
                anneal_t0=cfg.recadam_t0,
                pretrain_coef=cfg.recadam_coef,
            ),
        )
    else:
        combiner = {
            "mtl": lambda: mg.mtl_sum(),
            "pcgrad": lambda: mg.pcgrad(seed=seed),
            "gradvac": lambda: mg.gradvac(num_tasks, beta=cfg.gradvac_beta, seed=seed),
            "gradnorm": lambda: mg.gradnorm(
                num_tasks, alpha=cfg.gradnorm_alpha, learning_rate=cfg.gradnorm_lr
            ),
        }[method]()
        tx = optax.chain(combiner, _base(cfg))

    def run_one(start):
        def step(carry, _):
            phi, state = carry
            grads = task_grads(phi)
            extra = {"losses": task_losses(phi) + 200.0} if method == "gradnorm" else {}
            updates, state = tx.update(grads, state, phi, **extra)
            phi = optax.apply_updates(phi, updates)
            return (phi, state), phi

        _, traj = jax.lax.scan(step, (start, tx.init(start)), None, length=cfg.steps)
        return jnp.concatenate([start[None], traj])

    return run_one


def _reptile_run(method: str, cfg: Config, seed: int):
    num_tasks = len(OPTIMA)
    if method == "reptile":
        learner = mg.reptile(task_loss, _base(cfg), cfg.inner_steps, cfg.outer)

        def tasks_for(key, step):
            del key, step
            ids = jnp.arange(num_tasks)  # every task, each with its own inner trajectory
            return ids, ids  # (support, query): a task's loss needs only its id
    else:
        learner = mg.seq_reptile(
            lambda phi, batch, task: task_loss(phi, task),
            _base(cfg),
            cfg.inner_steps,
            cfg.outer,
            pass_task_id=True,
        )

        def tasks_for(key, step):
            # Round-robin continues its cycle across outer steps (start = step·K).
            ids = mg.uniform_tasks(
                key, num_tasks, cfg.inner_steps, order=cfg.seq_order, start=step * cfg.inner_steps
            )
            return ids, jnp.zeros((cfg.inner_steps,))

    def run_one(start, key):
        def step(state, xs):
            state, _ = learner.step(state, tasks_for(*xs))
            return state, state.params

        keys = jax.random.split(key, cfg.steps)
        xs = (keys, jnp.arange(cfg.steps, dtype=jnp.int32))
        _, traj = jax.lax.scan(step, learner.init(start), xs)
        return jnp.concatenate([start[None], traj])

    return run_one


def run_method(method: str, cfg: Config, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Runs one method from every start in one jitted, vmapped scan.

    Returns:
      trajectories [starts, steps+1, 2] and the mean pairwise cosine between the task gradients
      at each point, [starts, steps+1].
    """
    starts = jnp.asarray(cfg.starts, jnp.float32)
    keys = jax.random.split(jax.random.key(seed), len(cfg.starts))
    if method in ("reptile", "seq_reptile"):
        fn = jax.vmap(_reptile_run(method, cfg, seed))
        args = (starts, keys)
    else:
        fn = jax.vmap(_combiner_run(method, cfg, seed))
        args = (starts,)

    @jax.jit
    def go(*args):
        traj = fn(*args)
        cos = jax.vmap(jax.vmap(lambda p: mg.mean_pairwise_cosine(task_grads(p))))(traj)
        return traj, cos

    traj, cos = go(*args)
    return np.asarray(traj), np.asarray(cos)


# -- table and plots ---------------------------------------------------------------------------


def _tail(x: np.ndarray) -> np.ndarray:
    """The last 10% of a trajectory's values: at a cusp the fixed-step iterates oscillate and
    the task gradients flip direction from step to step, so one point's cosine is noise."""
    return x[-max(1, len(x) // 10) :]


def summarize(method, cfg, traj, cos, minima) -> list[dict]:
    rows = []
    for s, start in enumerate(cfg.starts):
        end = traj[s, -1]
        dist_opt = np.linalg.norm(OPTIMA - end, axis=1)
        dist_min = np.linalg.norm(minima - end, axis=1)
        rows.append(
            {
                "experiment": NAME,
                "method": LABELS[method],
                "start": f"({start[0]:g}, {start[1]:g})",
                "final_x": float(end[0]),
                "final_y": float(end[1]),
                "mtl_loss": float(mtl_loss(jnp.asarray(end))),
                "nearest_optimum": OPTIMA_LABELS[int(np.argmin(dist_opt))],
                "dist_nearest_optimum": float(dist_opt.min()),
                "in_mtl_minimum": bool(dist_min.min() < MINIMUM_RADIUS),
                "cos_final": float(np.mean(_tail(cos[s]))),
                "cos_mean": float(np.mean(cos[s])),
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
    """Runs every method from every start; writes synthetic.{png,json,csv}, synthetic_cosine.png."""
    from tqdm.auto import tqdm

    from experiments import synthetic_plots, synthetic_sweep

    out_dir = pathlib.Path(out_dir)
    cfg = config.resolve(Config, BUDGETS, budget, args, NAME)
    minima = mtl_minima()
    rows, results = [], {}
    for method in tqdm(cfg.methods, desc="synthetic", disable=not progress, leave=False):
        try:
            traj, cos = run_method(method, cfg, seed)
        except Exception as e:  # noqa: BLE001 - reported in the table, the others go on
            rows.append(writers.error_row(out_dir, LABELS[method], e))
            continue
        results[method] = {"traj": traj, "cos": cos}
        rows.extend(summarize(method, cfg, traj, cos, minima))
    if results:
        synthetic_plots.plot(out_dir, cfg, results, minima)
    sweep_rows = []
    if cfg.sweep:
        sweep_rows, sweep_trajectories = synthetic_sweep.sweep(cfg, seed, minima, progress)
        writers.write_csv(out_dir / "synthetic_sweep.csv", sweep_rows)
        synthetic_sweep.plot_order(out_dir, cfg, sweep_trajectories)
        print(writers.format_table(sweep_rows))
    summary = {
        "config": dataclasses.asdict(cfg) | {"budget": budget, "seed": seed},
        "mtl_local_minima": minima.tolist(),
        "rows": rows,
        "sweep": sweep_rows,
        "trajectories": {
            m: r["traj"][:, :: max(1, cfg.steps // 200)].tolist() for m, r in results.items()
        },
    }
    writers.write_json(out_dir / "synthetic.json", summary)
    writers.write_csv(out_dir / "synthetic.csv", rows)
    return rows
