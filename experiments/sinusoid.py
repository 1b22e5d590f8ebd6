"""Sinusoid few-shot regression, the MAML paper's setup (Finn et al., 2017, Section 5.1).

Tasks are y = A·sin(x − φ) with amplitude A ~ U[0.1, 5], phase φ ~ U[0, π] and inputs
x ~ U[−5, 5]; the model is an MLP 1-40-40-1 with ReLU. Meta-training uses K = 10 support
and K = 10 query points per task, meta-batches of 25 tasks and Adam 1e-3 outer steps; the
inner loop is one SGD step with learning rate 0.01 (MAML paper, Appendix C).

Methods (all start from the same initial weights and see the same task stream):

- ``maml``: second-order MAML, `mg.maml`.
- ``fomaml``: first-order MAML, `mg.fomaml`.
- ``reptile``: `mg.reptile`, inner SGD on the task's support and query points (our
  choice: 10 inner steps with learning rate 0.01, the evaluation protocol's length; outer
  Adam 1e-3 on the meta-gradient φ − θ_K, averaged over the meta-batch).
- ``maml_grad_share``: MAML whose inner update is `mg.grad_share` (meta-learned momentum
  m_k and gate λ_k).
- ``dotprod``: pretraining with `optax.chain(mg.dotprod(...), optax.adam(1e-3))`: each
  step takes the support points of the meta-batch as batch b1 and their query points as
  batch b2 (our pairing; the DotProd paper is single-task), so the regularizer raises the
  dot product between the gradients of two batches of the same tasks. Weight 0.01 (the
  paper's 0.1 diverges within a few hundred steps here). Observed: the dot-product term
  is unbounded (larger gradients give larger dot products) and the curvature of this
  ReLU regression grows with training, so at the full length (70k steps) the run
  diverges after about 7k steps for weights 0.01 and 0.001 and with the exact HVP too;
  at the quick length (4k steps) it is stable and close to ``pretrain``.
- ``pretrain``: the MAML paper's "pretrained on all tasks" baseline: Adam 1e-3 on the
  mean squared error of the meta-batch's support and query points, pooled.

Evaluation (the paper's protocol): from the learned weights, plain SGD with learning rate
0.01 on K = 5 or K = 10 support points of a new task, query MSE on 100 fresh points after
1, 5 and 10 steps, averaged over the test tasks (the same tasks for every method) with a
95% confidence interval (1.96 standard errors). Every method is evaluated with the same
plain-SGD adaptation so the table compares initializations; grad_share's learned inner
update is also used at test time in the additional ``maml_grad_share (own inner loop)``
row when the learner provides ``adapt``.

Divergence: continued plain SGD with lr 0.01 can blow up on a rare test task (1 in 1000
for MAML at 70k iterations, 5-shot). The rows report the mean over all test tasks (as
the paper does) and ``diverged_frac``; sinusoid.json also holds medians and means over
the non-diverged tasks, and sinusoid_curves.npz the per-task curves.

Note: the MAML paper meta-trains a separate model for each K; here one model is
meta-trained with K = 10 (SPEC section 3) and tested at K = 5 and K = 10
(``--sinusoid-train-shots 5`` trains at K = 5 as in the paper's 5-shot row).

References:
  Finn, Abbeel, Levine, `Model-Agnostic Meta-Learning for Fast Adaptation of Deep
  Networks <https://arxiv.org/abs/1703.03400>`_, ICML 2017.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metagrad as mg
from experiments import config, writers
from experiments.config import option
from experiments.data import sinusoid_tasks
from experiments.models import mlp_apply, mlp_init_normal, mse_loss

NAME = "sinusoid"
DESCRIPTION = (
    "sinusoid few-shot regression (MAML paper 5.1): MAML, FOMAML, Reptile, MAML+grad_share, "
    "DotProd, pretrain; query MSE after 1/5/10 SGD steps, 5- and 10-shot, 95% CI"
)

METHODS = ("maml", "fomaml", "reptile", "maml_grad_share", "dotprod", "pretrain")
LABELS = {
    "maml": "MAML",
    "fomaml": "FOMAML",
    "reptile": "Reptile",
    "maml_grad_share": "MAML+grad_share",
    "dotprod": "DotProd pretrain",
    "pretrain": "pretrain (all tasks)",
}
# Table 2 of the MAML paper (5-shot query MSE after 1, 5, 10 steps).
PAPER_5SHOT = {"maml": (0.67, 0.38, 0.35), "pretrain": (2.41, 2.23, 2.19)}

META_BATCH = 25
INNER_LR = 0.01
OUTER_LR = 1e-3
EVAL_STEPS = (1, 5, 10)
EVAL_SHOTS = (5, 10)
EVAL_QUERY = 100
DIVERGED = 100.0


@dataclasses.dataclass(frozen=True)
class Config:
    iterations: int = option("meta-iterations per method", minimum=1)
    test_tasks: int = option("test tasks for the evaluation", minimum=1)
    chunk: int = 10  # meta-iterations per jitted call (a lax.scan)
    train_shots: int = option(
        "K support (and query) points per meta-training task", default=10, minimum=1
    )
    methods: tuple[str, ...] = option("methods to run", default=METHODS, choices=METHODS, many=True)
    reptile_inner_steps: int = 10
    grad_share_inner_steps: int = 1
    dotprod_weight: float = option(
        "weight of DotProd's dot-product gradient (the paper's 0.1 diverges on these tasks)",
        default=0.01,
        type=float,
    )
    dotprod_scheme: str = option(
        "DotProd's Hessian-vector product: the paper's forward difference, central "
        "difference or exact (jax.jvp)",
        default="forward",
        choices=("forward", "central", "exact"),
    )


BUDGETS = {
    "tiny": dict(iterations=20, test_tasks=100, chunk=10),
    "quick": dict(iterations=4000, test_tasks=1000, chunk=250),
    "full": dict(iterations=70000, test_tasks=1000, chunk=1000),
}


def add_arguments(parser) -> None:
    config.add_options(parser, Config, BUDGETS, NAME)


# -- methods: each is (init(params) -> state, step(state, key) -> (state, loss), params_of) ----


@dataclasses.dataclass
class Method:
    init: Callable
    step: Callable  # step(state, key) -> (state, scalar training loss)
    params_of: Callable
    learner: mg.MetaLearner | None = None


def _tasks(key, shots):
    support, query, _ = sinusoid_tasks(key, META_BATCH, shots, shots)
    return support, query


def _from_learner(learner: mg.MetaLearner, shots: int) -> Method:
    def step(state, key):
        support, query = _tasks(key, shots)
        state, metrics = learner.step(state, (support, query))
        return state, metrics["loss"]

    return Method(learner.init, step, lambda s: s.params, learner)


def _pooled(batches):
    (xs, ys), (xq, yq) = batches
    return jnp.concatenate([xs, xq], axis=1), jnp.concatenate([ys, yq], axis=1)


def _optax_method(tx, loss_and_update: Callable) -> Method:
    def init(params):
        return params, tx.init(params)

    return Method(init, loss_and_update, lambda s: s[0])


def build_method(name: str, cfg: Config) -> Method:
    """Builds one method from metagrad's public API (raises AttributeError if missing)."""
    shots = cfg.train_shots
    if name == "maml":
        learner = mg.maml(mse_loss, optax.sgd(INNER_LR), 1, optax.adam(OUTER_LR))
        return _from_learner(learner, shots)
    if name == "fomaml":
        learner = mg.fomaml(mse_loss, optax.sgd(INNER_LR), 1, optax.adam(OUTER_LR))
        return _from_learner(learner, shots)
    if name == "reptile":
        learner = mg.reptile(
            mse_loss, optax.sgd(INNER_LR), cfg.reptile_inner_steps, optax.adam(OUTER_LR)
        )

        def step(state, key):
            support, query = _tasks(key, shots)
            # Reptile has no query set: its inner steps use all of a task's points.
            state, metrics = learner.step(state, (_pooled((support, query)), query))
            return state, metrics["loss"]

        return Method(learner.init, step, lambda s: s.params, learner)
    if name == "maml_grad_share":
        learner = mg.maml(
            mse_loss,
            mg.grad_share(INNER_LR),
            cfg.grad_share_inner_steps,
            optax.adam(OUTER_LR),
        )
        return _from_learner(learner, shots)
    if name == "dotprod":
        tx = optax.chain(
            mg.dotprod(weight=cfg.dotprod_weight, scheme=cfg.dotprod_scheme),
            optax.adam(OUTER_LR),
        )

        def step(state, key):
            params, opt_state = state
            b1, b2 = _tasks(key, shots)
            l1, g1 = jax.value_and_grad(_batch_loss)(params, b1)
            updates, opt_state = tx.update(
                g1, opt_state, params, grad_fn=lambda p: jax.grad(_batch_loss)(p, b2)
            )
            return (optax.apply_updates(params, updates), opt_state), l1

        return _optax_method(tx, step)
    if name == "pretrain":
        tx = optax.adam(OUTER_LR)

        def step(state, key):
            params, opt_state = state
            batch = _pooled(_tasks(key, shots))
            loss, grads = jax.value_and_grad(_batch_loss)(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        return _optax_method(tx, step)
    raise ValueError(f"unknown sinusoid method {name!r}; choose from {METHODS}")


def _batch_loss(params, tasks):
    """Mean squared error over a batch of tasks `(x, y)` with shapes [tasks, points, 1]."""
    return mse_loss(params, tasks)


# -- training and evaluation ---------------------------------------------------------------


def train(method: Method, params, key, cfg: Config, *, progress: bool, desc: str):
    """Runs `cfg.iterations` meta-iterations in jitted chunks; returns (params, losses)."""

    @jax.jit
    def run_chunk(state, keys):
        return jax.lax.scan(method.step, state, keys)

    state = method.init(params)
    keys = jax.random.split(key, cfg.iterations)
    losses = []
    from tqdm.auto import tqdm

    with tqdm(total=cfg.iterations, desc=desc, disable=not progress, leave=False) as bar:
        for start in range(0, cfg.iterations, cfg.chunk):
            chunk = keys[start : start + cfg.chunk]
            state, loss = run_chunk(state, chunk)
            losses.append(np.asarray(loss))
            bar.update(len(chunk))
            bar.set_postfix(loss=f"{float(np.mean(losses[-1])):.3f}")
    return state, np.concatenate(losses)


def _sgd_curve(params, support, query, num_steps: int):
    """Query MSE after 0..num_steps plain SGD steps (lr 0.01) on the support points."""

    def body(p, _):
        p = jax.tree.map(lambda w, g: w - INNER_LR * g, p, jax.grad(mse_loss)(p, support))
        return p, mse_loss(p, query)

    _, after = jax.lax.scan(body, params, None, length=num_steps)
    return jnp.concatenate([mse_loss(params, query)[None], after])


def evaluate(params, key, num_tasks: int) -> np.ndarray:
    """Query MSE curves, shape [len(EVAL_SHOTS), num_tasks, max(EVAL_STEPS) + 1]."""
    return np.asarray(_evaluate(params, key, num_tasks))


def _evaluate_impl(params, key, num_tasks):
    out = []
    for shots in EVAL_SHOTS:
        k = jax.random.fold_in(key, shots)
        support, query, _ = sinusoid_tasks(k, num_tasks, shots, EVAL_QUERY)
        curve = jax.vmap(_sgd_curve, in_axes=(None, 0, 0, None))(
            params, support, query, max(EVAL_STEPS)
        )
        out.append(curve)
    return jnp.stack(out)


_evaluate = jax.jit(_evaluate_impl, static_argnums=2)


def _learner_adapt_curves(learner, state, key, num_tasks: int) -> np.ndarray:
    """Like `evaluate`, adapting with the learner's own inner loop (`learner.adapt`).

    Only the steps in EVAL_STEPS are filled (the others are NaN).
    """

    @jax.jit
    def all_curves(state):
        out = []
        for shots in EVAL_SHOTS:
            k = jax.random.fold_in(key, shots)
            support, query, _ = sinusoid_tasks(k, num_tasks, shots, EVAL_QUERY)
            for steps in EVAL_STEPS:

                def one(s, q, steps=steps):
                    return mse_loss(learner.adapt(state, s, num_steps=steps), q)

                out.append(jax.vmap(one)(support, query))
        return out

    values = iter(jax.device_get(all_curves(state)))
    out = np.full((len(EVAL_SHOTS), num_tasks, max(EVAL_STEPS) + 1), np.nan, np.float32)
    for i in range(len(EVAL_SHOTS)):
        for steps in EVAL_STEPS:
            out[i, :, steps] = next(values)
    return out


@jax.jit
def _adapted_predictions(params, support, xs):
    """Predictions on `xs` before and after 1 and 10 SGD steps, for each task of `support`."""

    def one(sup):
        def body(p, _):
            p = jax.tree.map(lambda w, g: w - INNER_LR * g, p, jax.grad(mse_loss)(p, sup))
            return p, mlp_apply(p, xs)[:, 0]

        _, after = jax.lax.scan(body, params, None, length=max(EVAL_STEPS))
        return jnp.stack([mlp_apply(params, xs)[:, 0], after[0], after[-1]])

    return jax.vmap(one)(support)


def _summary_row(name: str, curves: np.ndarray, iterations: int, label: str | None = None) -> dict:
    row = {"method": label or LABELS[name]}
    n = curves.shape[1]
    for i, shots in enumerate(EVAL_SHOTS):
        for steps in EVAL_STEPS:
            values = curves[i, :, steps]
            key = f"mse_{shots}shot_{steps}step"
            row[key] = float(np.mean(values))
            row[key + "_ci95"] = float(1.96 * np.std(values, ddof=1) / np.sqrt(n))
    final = curves[:, :, max(EVAL_STEPS)]
    # A query MSE above DIVERGED after the last step means SGD blew up on that task (the
    # zero function scores at most 12.5 on these tasks); the mean then says little.
    row["diverged_frac"] = float(np.mean(~(final <= DIVERGED)))
    row["iterations"] = iterations
    row["test_tasks"] = n
    return row


def _plot(out_dir: pathlib.Path, results: dict, params_by_method: dict, key) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    # (1) query MSE vs SGD steps: mean with 95% CI bands (top), median and quartiles
    # (bottom, robust to the few tasks on which SGD diverges).
    fig, axes = plt.subplots(
        2, len(EVAL_SHOTS), figsize=(5.5 * len(EVAL_SHOTS), 8), sharey=True, squeeze=False
    )
    steps = np.arange(max(EVAL_STEPS) + 1)
    for i, shots in enumerate(EVAL_SHOTS):
        for name in names:
            curves = results[name]["curves"][i]
            with np.errstate(invalid="ignore", over="ignore"):
                mean = curves.mean(0)
                ci = 1.96 * curves.std(0, ddof=1) / np.sqrt(curves.shape[0])
            finite = np.isfinite(mean) & (mean < 1e3)
            (line,) = axes[0, i].plot(steps[finite], mean[finite], marker=".", label=LABELS[name])
            axes[0, i].fill_between(
                steps[finite], (mean - ci)[finite], (mean + ci)[finite], alpha=0.2
            )
            q1, med, q3 = np.nanquantile(curves, [0.25, 0.5, 0.75], axis=0)
            axes[1, i].plot(steps, med, marker=".", color=line.get_color(), label=LABELS[name])
            axes[1, i].fill_between(steps, q1, q3, color=line.get_color(), alpha=0.15)
        if shots == 5:
            for name, paper in PAPER_5SHOT.items():
                if name in names:
                    axes[0, i].scatter(EVAL_STEPS, paper, marker="x", color="k", zorder=5)
        axes[0, i].set_title(
            f"{shots}-shot test tasks, mean ± 95% CI"
            + (" (x: MAML paper Table 2)" if shots == 5 else "")
        )
        axes[1, i].set_title(f"{shots}-shot test tasks, median and quartiles")
        for ax in axes[:, i]:
            ax.set_xlabel("SGD steps on the support points (lr 0.01)")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("query MSE (means above 1e3 not drawn)")
    axes[1, 0].set_ylabel("query MSE")
    axes[0, -1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "sinusoid_mse_vs_steps.png", dpi=120)
    plt.close(fig)

    # (2) adapted curves on a few 5-shot test tasks (MAML paper Figure 2).
    num_tasks = 3
    support, _, (amp, phase) = sinusoid_tasks(key, num_tasks, 5, 1)
    xs = jnp.linspace(-5, 5, 200)[:, None]
    fig, axes = plt.subplots(
        num_tasks, len(names), figsize=(3.2 * len(names), 2.6 * num_tasks), squeeze=False
    )
    styles = (("pre-update", ":"), ("1 step", "--"), (f"{max(EVAL_STEPS)} steps", "-"))
    truth = amp[:, None] * jnp.sin(xs[None, :, 0] - phase[:, None])
    for j, name in enumerate(names):
        preds = np.asarray(_adapted_predictions(params_by_method[name], support, xs))
        for t in range(num_tasks):
            ax = axes[t, j]
            ax.plot(xs[:, 0], truth[t], "k", lw=1.5, label="truth")
            for (label, style), pred in zip(styles, preds[t], strict=True):
                ax.plot(xs[:, 0], pred, style, label=label)
            ax.scatter(
                support[0][t, :, 0],
                support[1][t, :, 0],
                c="r",
                s=15,
                zorder=5,
                label="5 support points",
            )
            if t == 0:
                ax.set_title(LABELS[name], fontsize=9)
            ax.set_ylim(-6, 6)
    axes[0, -1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "sinusoid_adapted_curves.png", dpi=110)
    plt.close(fig)


def run(
    out_dir: pathlib.Path,
    *,
    budget: str = "quick",
    seed: int = 0,
    progress: bool = True,
    args: argparse.Namespace | None = None,
) -> list[dict]:
    """Meta-trains every method, evaluates it, writes sinusoid.{json,csv} and two PNGs."""
    out_dir = pathlib.Path(out_dir)
    cfg = config.resolve(Config, BUDGETS, budget, args, NAME)
    key = jax.random.key(seed)
    k_init, k_train, k_eval, k_plot = jax.random.split(key, 4)
    params0 = mlp_init_normal(k_init)

    rows, results, params_by_method = [], {}, {}
    for name in cfg.methods:
        try:
            method = build_method(name, cfg)
            state, losses = train(method, params0, k_train, cfg, progress=progress, desc=name)
            params = method.params_of(state)
            curves = evaluate(params, k_eval, cfg.test_tasks)
            if name == "maml_grad_share":
                own = _learner_adapt_curves(method.learner, state, k_eval, cfg.test_tasks)
        except Exception as e:  # noqa: BLE001 - reported in the table, the others go on
            rows.append(writers.error_row(out_dir, LABELS[name], e))
            continue
        results[name] = {"curves": curves, "train_loss": losses}
        params_by_method[name] = params
        rows.append(_summary_row(name, curves, cfg.iterations))
        if name == "maml_grad_share":
            rows.append(_summary_row(name, own, cfg.iterations, LABELS[name] + " (own inner loop)"))

    if results:
        _plot(out_dir, results, params_by_method, k_plot)
    summary = {
        "config": dataclasses.asdict(cfg) | {"budget": budget, "seed": seed},
        "paper_5shot_table2": PAPER_5SHOT,
        "rows": rows,
        "median_mse_vs_steps": {
            name: {
                f"{shots}shot": np.nanmedian(r["curves"][i], 0).tolist()
                for i, shots in enumerate(EVAL_SHOTS)
            }
            for name, r in results.items()
        },
        # Means over the test tasks on which SGD did not diverge (see diverged_frac).
        "mean_mse_vs_steps_excluding_diverged": {
            name: {
                f"{shots}shot": np.mean(
                    r["curves"][i][r["curves"][i][:, -1] <= DIVERGED], 0
                ).tolist()
                for i, shots in enumerate(EVAL_SHOTS)
            }
            for name, r in results.items()
        },
        "mse_vs_steps": {
            name: {
                f"{shots}shot": r["curves"][i].mean(0).tolist()
                for i, shots in enumerate(EVAL_SHOTS)
            }
            for name, r in results.items()
        },
        # Training loss every iteration would be large at full length: keep 200 points.
        "train_loss": {
            name: r["train_loss"][:: max(1, len(r["train_loss"]) // 200)].tolist()
            for name, r in results.items()
        },
    }
    writers.write_json(out_dir / "sinusoid.json", summary)
    # Per-task query MSEs, [shots, tasks, steps], for re-analysis (medians, divergence).
    np.savez_compressed(
        out_dir / "sinusoid_curves.npz",
        eval_shots=np.array(EVAL_SHOTS),
        **{name: r["curves"] for name, r in results.items()},
    )
    writers.write_csv(out_dir / "sinusoid.csv", rows)
    return rows
