"""Benchmark section "real_models": Conv-4 and ResNet-12 meta-steps beside JAX by hand, PyTorch.

Few-shot classification steps as in the papers: 5-way 1- and 5-shot episodes, 15 queries per
class, meta-batch 4, K inner SGD steps (learning rate 0.01), outer Adam 1e-3, on

- Conv-4 without batch norm (4 × [conv 3×3, ReLU, max-pool 2], 32 channels by default,
  28×28×1 images as in Omniglot, dense head to 5 ways; `experiments.models.conv4_apply`);
- ResNet-12 without batch norm (channels 64-160-320-640, 12.4M parameters at width 1; 84×84
  images are far too slow on a small CPU, so the input size and a channel width factor are
  flags, 16×16×3 and 1.0 by default; `experiments.models.resnet12_apply`).

For each model, shots, K and method (second-order MAML, FOMAML, Reptile, MAML with
`mg.grad_share`), in one run: meta-steps/s (median over interleaved rounds), compile time
(``lower`` + ``compile``) and the compiled program's memory (temp + argument + output bytes
of ``memory_analysis()``) of

- metagrad's learner, one row per execution strategy (``task_loop/step_loop``);
- the hand-written JAX programs of `experiments.bench_real_jax` (four variants; the fastest is
  "best hand-written", the ratio's denominator);
- PyTorch (`experiments.bench_real_torch`, ``torch.set_num_threads(2)`` unless
  ``--real-torch-threads``) when installed (``pip install "metagrad[bench]"``).

Before timing, a correctness guard runs one step (K = 2, outer SGD with rate 1, so the
params move by exactly the meta-gradient) of each method through metagrad, the hand-written
program and PyTorch on the benchmark's model and prints the largest difference of the
meta-gradients relative to their largest entry: the rows compare the same computation.
The sinusoid-MLP rows of the "meta" section (ratio to its fused loop) run too.
Images are random: the step time does not depend on the pixels.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metagrad as mg
from experiments import bench_meta
from experiments.bench_real_jax import VARIANTS
from experiments.bench_real_jax import make_step as hand_step
from experiments.models import (
    conv4_apply,
    conv4_init,
    resnet12_apply,
    resnet12_init,
    torch_layout,
)

try:
    import torch

    from experiments import bench_real_torch as tref
except ModuleNotFoundError:  # the `bench` extra is not installed
    torch = tref = None

MODELS = ("conv4", "resnet12")
METHODS = ("maml", "fomaml", "reptile", "grad_share")
WAYS, QUERIES, META_BATCH, INNER_LR, OUTER_LR = 5, 15, 4, 0.01, 1e-3
CHECK_STEPS, CHECK_RTOL = 2, 1e-3
# Values of the unset selection flags when some are set.
DEFAULTS = (["conv4"], [1], [5], list(METHODS))
_K5 = [("conv4", 1, 5, m) for m in METHODS]
PRESETS = {
    # A few minutes: the headline rows only.
    "quick": dict(
        settings=[("conv4", 1, 5, "maml")],
        strategies=("auto/auto",),
        hand=("unroll/unroll", "vmap/scan"),
        compile_ks=(),
    ),
    # About 15 minutes on 2 idle cores.
    "default": dict(
        settings=_K5
        + [("conv4", 5, 5, "maml"), ("conv4", 1, 1, "maml"), ("conv4", 1, 10, "maml")]
        + [("resnet12", 1, 1, "maml")],
        # On CPU "auto" is unroll/unroll for these K; vmap/scan was the only path before.
        strategies=("auto/auto", "vmap/scan"),
        hand=("unroll/unroll", "vmap/scan"),
        compile_ks=(50,),
    ),
    # Everything: hours on a small CPU.
    "full": dict(
        settings=list(itertools.product(MODELS, (1, 5), (1, 5, 10), METHODS)),
        strategies=("auto/auto", "unroll/unroll", "unroll/scan", "vmap/scan", "map/scan"),
        hand=VARIANTS,
        compile_ks=(50,),
    ),
}


def add_arguments(parser):
    group = parser.add_argument_group("real_models")
    add = group.add_argument
    add("--real-preset", choices=sorted(PRESETS), default="default", help="what to time")
    add("--real-models", nargs="*", choices=MODELS, default=None, help="models (with the next")
    add("--real-shots", nargs="*", type=int, default=None, help="three: their product")
    add("--real-ks", nargs="*", type=int, default=None, help="inner steps K")
    add("--real-methods", nargs="*", choices=METHODS, default=None, help="methods")
    add("--real-strategies", nargs="*", default=None, help="mg task_loop/step_loop pairs")
    add("--real-hand", nargs="*", choices=VARIANTS, default=None, help="hand-written variants")
    add("--real-rounds", type=int, default=5, help="interleaved timing rounds")
    add("--real-iters", type=int, default=2, help="meta-steps per entry and round")
    add("--real-conv4-channels", type=int, default=32, help="Conv-4 channels (paper: 32 or 64)")
    add("--real-resnet-image", type=int, default=16, help="ResNet-12 input size (papers: 84)")
    add("--real-resnet-width", type=float, default=1.0, help="ResNet-12 channel factor")
    add("--real-resnet-rounds", type=int, default=3, help="ResNet-12 rounds (1 step each)")
    add("--real-compile-ks", nargs="*", type=int, default=None, help="compile-only K (maml)")
    add("--real-torch-threads", type=int, default=2, help="torch.set_num_threads")
    add("--no-real-torch", dest="real_torch", action="store_false", help="skip PyTorch")
    add("--no-real-check", dest="real_check", action="store_false", help="skip the guard")
    add("--no-real-sinusoid", dest="real_sinusoid", action="store_false", help="skip MLP rows")


def _xent(logits, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def conv4_loss(params, batch):
    return _xent(conv4_apply(params, batch[0], batch_norm=False), batch[1])


def resnet12_loss(params, batch):
    return _xent(resnet12_apply(params, batch[0]), batch[1])


@dataclasses.dataclass
class Model:
    name: str
    label: str
    params: object
    loss_fn: object
    image: int
    channels: int


def make_model(name, args) -> Model:
    key = jax.random.PRNGKey(0)
    if name == "conv4":
        hidden = getattr(args, "real_conv4_channels", 32)
        params = conv4_init(key, 1, WAYS, 28, hidden, batch_norm=False)
        return Model(name, f"Conv-4 ({hidden} ch, 28x28x1)", params, conv4_loss, 28, 1)
    size, width = getattr(args, "real_resnet_image", 32), getattr(args, "real_resnet_width", 1.0)
    params = resnet12_init(key, 3, WAYS, width)
    count = sum(x.size for x in jax.tree.leaves(params)) / 1e6
    label = f"ResNet-12 (x{width:g} width, {count:.1f}M params, {size}x{size}x3)"
    return Model(name, label, params, resnet12_loss, size, 3)


def episodes(model: Model, shots: int, seed: int = 1, num_tasks: int = META_BATCH):
    """Random-pixel ``(support, query)`` batches with a leading task axis."""
    ks, kq = jax.random.split(jax.random.PRNGKey(seed))

    def part(key, n):
        x = jax.random.normal(key, (num_tasks, WAYS * n, model.image, model.image, model.channels))
        return x, jnp.tile(jnp.repeat(jnp.arange(WAYS), n), (num_tasks, 1))

    return part(ks, shots), part(kq, QUERIES)


def pooled(tasks):
    """Reptile's ``(support, query)``: it trains on support and query pooled, evaluates query."""
    support, query = tasks
    return jax.tree.map(lambda s, q: jnp.concatenate([s, q], axis=1), support, query), query


def mg_learner(method, model, num_steps, outer, strategy=None):
    """metagrad's learner for `method`; `strategy` "task/step" or None (no keywords)."""
    kw = {}
    if strategy is not None:
        kw = dict(zip(("task_loop", "step_loop"), strategy.split("/"), strict=True))
    if method == "reptile":
        return mg.reptile(model.loss_fn, optax.sgd(INNER_LR), num_steps, outer, **kw)
    inner = mg.grad_share(INNER_LR) if method == "grad_share" else optax.sgd(INNER_LR)
    first_order = method == "fomaml"
    return mg.maml(model.loss_fn, inner, num_steps, outer, first_order=first_order, **kw)


def _compile(fn, state, inputs):
    start = time.perf_counter()
    compiled = fn.lower(state, inputs).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    total = None
    if mem is not None:
        total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    return compiled, seconds, total


def _max_rel(a: dict, b: dict, scale: float) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a) / scale


def check(model: Model, method: str, use_torch: bool) -> dict:
    """One step of `method` via metagrad, JAX by hand and torch: max meta-gradient gap."""
    tasks = episodes(model, 1, seed=3)
    inputs = pooled(tasks) if method == "reptile" else tasks
    sgd1 = optax.sgd(1.0)
    learner = mg_learner(method, model, CHECK_STEPS, sgd1)
    state, _ = learner.step(learner.init(model.params), inputs)
    init, step = hand_step(method, model.loss_fn, CHECK_STEPS, INNER_LR, sgd1, "unroll/unroll")
    hand_state, _ = jax.jit(step)(init(model.params), inputs)
    layout = lambda p: torch_layout(p, model.name)
    before = layout(model.params)
    mg_grad = {k: before[k] - v for k, v in layout(state.params).items()}
    hand_grad = {k: before[k] - v for k, v in layout(hand_state[0]).items()}
    scale = max(float(np.max(np.abs(v))) for v in mg_grad.values())
    row = {"check": f"{model.name} {method} K={CHECK_STEPS}", "max_meta_grad": f"{scale:.3g}"}
    gaps = {"hand": _max_rel(mg_grad, hand_grad, scale)}
    if method == "grad_share":
        logits = np.concatenate([state.inner_params.momentum, state.inner_params.gate])
        gaps["hand_logits"] = float(np.max(np.abs(logits - np.concatenate(hand_state[1]))))
    if use_torch:
        ref = tref.TorchMeta(method, model.name, model.params, CHECK_STEPS, INNER_LR, "sgd1")
        ref.step(_torch_inputs(method, tasks))
        torch_grad = {k: before[k] - v for k, v in ref.torch_layout_params().items()}
        gaps["torch"] = _max_rel(mg_grad, torch_grad, scale)
        if method == "grad_share":
            t_logits = np.concatenate([x.detach().numpy() for x in ref.logits])
            gaps["torch_logits"] = float(np.max(np.abs(logits - t_logits)))
    row.update({f"rel_diff_{k}": f"{v:.2e}" for k, v in gaps.items()})
    row["ok"] = all(v <= CHECK_RTOL for v in gaps.values())
    return row


def _torch_inputs(method, tasks):
    inputs = pooled(tasks) if method == "reptile" else tasks
    return tuple(tref.to_torch_batch(*part) for part in inputs)


@dataclasses.dataclass
class Entry:
    name: str
    run: object  # () -> None, one meta-step (keeps its own state)
    sync: object  # () -> None, waits for the device
    compile_s: float | None = None
    memory: int | None = None
    times: list = dataclasses.field(default_factory=list)


def _jax_entry(name, fn, state, inputs):
    compiled, seconds, memory = _compile(fn, state, inputs)
    box = [jax.block_until_ready(compiled(state, inputs)[0])]  # warm-up

    def run():
        box[0] = compiled(box[0], inputs)[0]

    return Entry(name, run, lambda: jax.block_until_ready(box[0]), seconds, memory)


def _entries(model, shots, num_steps, method, hand, strategies, use_torch, log):
    tasks = episodes(model, shots)
    inputs = pooled(tasks) if method == "reptile" else tasks
    adam = optax.adam(OUTER_LR)
    entries = []
    for strategy in strategies:
        name = "mg" if strategy is None else f"mg {strategy}"
        try:
            learner = mg_learner(method, model, num_steps, adam, strategy)
            state = learner.init(model.params)
            entries.append(_jax_entry(name, learner.step, state, inputs))
        except Exception as e:  # noqa: BLE001 - report and go on
            log(f"    {name}: {type(e).__name__}: {e}")
            continue
        log(f"    compiled {name} in {entries[-1].compile_s:.1f} s")
    for variant in hand:
        init, step = hand_step(method, model.loss_fn, num_steps, INNER_LR, adam, variant)
        entries.append(_jax_entry(f"hand {variant}", jax.jit(step), init(model.params), inputs))
        log(f"    compiled hand {variant} in {entries[-1].compile_s:.1f} s")
    if use_torch:
        ref = tref.TorchMeta(method, model.name, model.params, num_steps, INNER_LR, "adam")
        t_inputs = _torch_inputs(method, tasks)
        start = time.perf_counter()
        ref.step(t_inputs)  # warm-up
        entry = Entry("torch", lambda: ref.step(t_inputs), lambda: None)
        entry.compile_s = time.perf_counter() - start  # first step, for reference
        entries.append(entry)
    return entries


def _time(entries, rounds, iters):
    for _ in range(rounds):
        for entry in entries:
            start = time.perf_counter()
            for _ in range(iters):
                entry.run()
            entry.sync()
            entry.times.append((time.perf_counter() - start) / iters)
    return {e.name: 1.0 / statistics.median(e.times) for e in entries}


def _fmt(x, digits=3):
    return None if x is None else float(f"{x:.{digits}g}")


def settings(args) -> list[tuple]:
    """``(model, shots, K, method)`` to time: the preset's, or the product of the flags."""
    flags = [getattr(args, f"real_{n}", None) for n in ("models", "shots", "ks", "methods")]
    if all(f is None for f in flags):
        return PRESETS[getattr(args, "real_preset", "default")]["settings"]
    models, shots, ks, methods = (
        f if f is not None else d for f, d in zip(flags, DEFAULTS, strict=True)
    )
    return list(itertools.product(models, shots, ks, methods))


def run(args) -> list[dict]:
    log = lambda msg: print(msg, flush=True)
    preset = PRESETS[getattr(args, "real_preset", "default")]
    rows = []
    use_torch = getattr(args, "real_torch", True) and torch is not None
    if torch is None:
        log("  real_models: torch is not installed (pip install 'metagrad[bench]'): no torch rows")
    elif use_torch:
        # With other processes on the cores, 2 threads can be several times slower than 1
        # (OpenMP threads wait on each other): measure on an idle machine.
        torch.set_num_threads(getattr(args, "real_torch_threads", 2))
    strategies = getattr(args, "real_strategies", None) or list(preset["strategies"])
    hand = getattr(args, "real_hand", None) or list(preset["hand"])
    rounds, iters = getattr(args, "real_rounds", 5), getattr(args, "real_iters", 2)
    todo = settings(args)
    models = {name: make_model(name, args) for name in dict.fromkeys(s[0] for s in todo)}
    bad = set()
    if getattr(args, "real_check", True):
        for name, method in dict.fromkeys((s[0], s[3]) for s in todo):
            row = check(models[name], method, use_torch)
            log("  " + "  ".join(f"{k}={v}" for k, v in row.items()))
            rows.append(row)
            if not row["ok"]:
                bad.add((name, method))
    for name, shots, num_steps, method in todo:
        model = models[name]
        if (name, method) in bad:
            log(f"  {model.label} {method}: correctness check failed, not timed")
            continue
        log(f"  {model.label}, {shots}-shot, K={num_steps}, {method}")
        entries = _entries(model, shots, num_steps, method, hand, strategies, use_torch, log)
        if name == "resnet12":
            speed = _time(entries, getattr(args, "real_resnet_rounds", 3), 1)
        else:
            speed = _time(entries, rounds, iters)
        rows += _rows(model, shots, num_steps, method, entries, speed, log)
    compile_ks = getattr(args, "real_compile_ks", None)
    for num_steps in preset["compile_ks"] if compile_ks is None else compile_ks:
        model = models.get("conv4") or make_model("conv4", args)
        learner = mg_learner("maml", model, num_steps, optax.adam(OUTER_LR), strategies[0])
        _, seconds, memory = _compile(learner.step, learner.init(model.params), episodes(model, 1))
        row = {"model": model.label, "shots": 1, "K": num_steps, "method": "maml"}
        row |= {"impl": f"mg {strategies[0] or 'default'} (compile only)"}
        row |= {"compile_s": _fmt(seconds), "memory_MB": _fmt(memory / 2**20)}
        log(f"  compile only, maml K={num_steps}: {seconds:.1f} s")
        rows.append(row)
    if getattr(args, "real_sinusoid", True):
        # The sinusoid MLP of section "meta": its fused loop is its hand-written reference.
        for row in bench_meta.run(args):
            row = {"model": "sinusoid MLP (section meta)", "impl": row.pop("method"), **row}
            row["steps_per_s"] = row.pop("meta_it_per_s", None)
            if "ratio_vs_fused" in row:
                row["vs_best_hand"] = row.pop("ratio_vs_fused")
                row["target"] = ">= 0.95"
            rows.append(row)
    _print_table(rows, log)
    return rows


def _rows(model, shots, num_steps, method, entries, speed, log):
    hand = {k: v for k, v in speed.items() if k.startswith("hand")}
    best_hand = max(hand, key=hand.get) if hand else None
    rows = []
    for entry in entries:
        its = speed[entry.name]
        row = {"model": model.label, "shots": shots, "K": num_steps, "method": method}
        row |= {"impl": entry.name + (" (best hand)" if entry.name == best_hand else "")}
        row |= {"steps_per_s": _fmt(its), "compile_s": _fmt(entry.compile_s)}
        row["memory_MB"] = None if entry.memory is None else _fmt(entry.memory / 2**20)
        if best_hand is not None and entry.name.startswith("mg"):
            row["vs_best_hand"] = _fmt(its / hand[best_hand])
        if "torch" in speed and entry.name != "torch":
            row["vs_torch"] = _fmt(its / speed["torch"])
        rows.append(row)
    log(
        f"    {shots}-shot K={num_steps} {method}: "
        + ", ".join(f"{r['impl']} {r['steps_per_s']}/s" for r in rows)
    )
    return rows


def _print_table(rows, log):
    cols = ("model", "shots", "K", "method", "impl", "steps_per_s", "compile_s", "memory_MB")
    cols += ("vs_best_hand", "vs_torch")
    timed = [r for r in rows if "impl" in r]
    if not timed:
        return
    log("| " + " | ".join(cols) + " |")
    log("|" + "---|" * len(cols))
    for r in timed:
        log("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
