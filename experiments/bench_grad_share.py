"""Benchmark section "grad_share": cost of gradient sharing in a MAML outer step.

Outer-step time of `mg.maml` with ``inner=mg.grad_share(α)`` over the same learner with plain
``optax.sgd(α)`` inner steps (target: ratio <= 1.15), with the paper's K = 5 inner steps, second
and first order, on two models:

- the sinusoid setup (MLP 1-40-40-1 ReLU, 1,761 parameters, K = 10 support and query points,
  Adam 1e-3), task batches of 5 and 25;
- Conv-4, the model of the paper's few-shot experiments, on 5-way 1-shot episodes with 5
  queries per class (28×28 grey images as in Omniglot, 32 channels, task batch 4, random
  pixels: the time does not depend on them).

Real sizes (``--grad-share-real``): for plain MAML / FOMAML and the same learner with
grad_share, the time to trace and lower the step, the peak host RSS increase during that,
XLA's compiled temporary memory and the best step time, with their ratios, on Conv-4 (the
episodes above) and on a ResNet-12-sized parameter tree (12.4M parameters in 50 leaves, task
batch 4) whose loss touches every parameter at almost no cost: there the rule's O(parameters)
work, and what its backward pass keeps, are as large a share of a step as they can be.
Second-order grad_share keeps each inner step's task gradients g_{t,k} for the backward pass
(its gate's and normalization's derivatives need them), one [tasks, parameters] array per
step that plain SGD-MAML does not keep: on this params-only model that is the compiled
memory ratio; a real network's activations are kept by both learners and dilute it.

``--grad-share-real resnet12-84`` (not in the default selection: a few minutes of compiles)
adds the real ResNet-12 (`experiments.models.resnet12_init`, 12.4M parameters in 34 leaves) on
84×84×3 5-way 1-shot episodes with 15 queries per class, task batch 4, K = 5, compile only
(abstract inputs): for MAML and FOMAML, plain and with grad_share, in the library's default
execution layout (``--grad-share-real-layout`` picks another ``task_loop/step_loop``), the
trace + lowering time (best of ``--grad-share-real-traces`` fresh learners after a warm-up
trace; wall and process CPU time), the peak host RSS increase during it, and XLA's compiled
temporary memory, with the grad_share / plain ratios (issue 12's target: each <= 1.2).

Both learners of a row get the same pre-sampled task batch and are timed in interleaved rounds
(best round kept). The comparison is like for like: same model, data, outer optimizer and
compile path; grad_share's learned m_k, λ_k are part of the method, so their outer-optimizer
update and (first order too) their backward pass through the rule's arithmetic are counted.

Where the extra time goes. The rule's arithmetic is O(parameters) per inner step, while the
support gradient it mixes costs O(parameters × examples): on Conv-4 the overhead is within
the noise. The sinusoid MLP is so small that an outer step is a few hundred kernels of about a
microsecond each, and the ratio follows the kernel count and how XLA's CPU runtime schedules
the kernels, not the FLOPs (a `jax.profiler` trace showed plain FOMAML's kernels all running on
the calling thread, and those of grad_share with m_k, λ_k frozen mostly on XLA's thread pool).
Per inner step grad_share adds the ravel of the task gradients, the norms, the mean, the
average and the interpolation, plus the residuals kept for the backward pass; first order it
adds a backward scan over the inner steps for m_k and λ_k (through the rule's arithmetic only:
the task gradients are constants there), which plain FOMAML does not have at all.

What brought the cost down: G kept flat through the whole inner loop (`InnerRule.loop_carry`),
the sigmoids of all K logits taken before indexing, the norm as one ``rsqrt``, and the task
mean as one vector-matrix product.
The ablation rows (task batch 5; skip them with ``--no-grad-share-ablations``) show the floor:
a rule that only ravels and unravels the task gradients costs about 1.0×, while grad_share
with m_k, λ_k frozen (no backward pass for them) still costs about 1.5×. On this MLP the 1.15
target is out of reach for the rule's forward arithmetic alone; on Conv-4 it is met.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metagrad as mg
from experiments.data import sinusoid_tasks
from experiments.fewshot import loss_fn as conv4_loss
from experiments.models import conv4_init, mlp_init, mse_loss, resnet12_apply, resnet12_init
from metagrad._src import loops as _loops  # the "auto" rule, to name the layout measured

INNER_STEPS, INNER_LR, OUTER_LR, SHOTS = 5, 0.01, 1e-3, 10
# Conv-4 episodes: 5-way 1-shot, 5 queries per class, 28×28 grey images, 32 channels.
WAYS, QUERIES, IMAGE, CHANNELS, CONV_TASKS = 5, 5, 28, 32, 4
MODELS = ("sinusoid", "conv4")
REAL_MODELS = ("conv4", "resnet12")
# The real ResNet-12 (84×84×3 inputs, 5-way 1-shot, 15 queries per class, task batch 4),
# compile only: not in the default selection (a few minutes of compiles).
RESNET_84 = "resnet12-84"
RESNET_84_IMAGE, RESNET_84_QUERIES = 84, 15
# ResNet-12-sized rows: task batch and a loss that touches every parameter at almost no cost,
# so the rule's O(parameters) work is as large a share of a step as it can be.
RESNET_TASKS = 4


def resnet12_shapes(channels=(64, 160, 320, 640), in_channels=3, num_classes=5):
    """Parameter shapes of ResNet-12 (12.4M parameters in 50 leaves with the defaults).

    Four residual stages; each has three 3×3 convolutions and a 1×1 shortcut convolution,
    each followed by batch norm (scale and offset), then a linear head on the pooled
    features.
    """
    shapes, cin = [], in_channels
    for c in channels:
        for kernel in ((3, 3, cin, c), (3, 3, c, c), (3, 3, c, c), (1, 1, cin, c)):
            shapes += [kernel, (c,), (c,)]
        cin = c
    return shapes + [(cin, num_classes), (num_classes,)]


def add_arguments(parser):
    group = parser.add_argument_group("grad_share")
    group.add_argument("--grad-share-iters", type=int, default=100, help="steps per round")
    group.add_argument("--grad-share-rounds", type=int, default=5, help="timing rounds")
    group.add_argument(
        "--grad-share-models", nargs="*", choices=MODELS, default=list(MODELS), help="models"
    )
    group.add_argument(
        "--grad-share-conv-iters", type=int, default=2, help="Conv-4 steps per round"
    )
    group.add_argument("--grad-share-conv-rounds", type=int, default=3, help="Conv-4 rounds")
    group.add_argument(
        "--grad-share-real",
        nargs="*",
        choices=REAL_MODELS + (RESNET_84,),
        default=list(REAL_MODELS),
        help="real-size cost rows (trace time, host and compiled memory, step time); "
        f"{RESNET_84}: the real ResNet-12 on 84x84x3 episodes, compile only",
    )
    group.add_argument(
        "--grad-share-real-traces",
        type=int,
        default=3,
        help=f"{RESNET_84}: timed traces per learner (best kept, after a warm-up trace)",
    )
    group.add_argument(
        "--grad-share-real-layout",
        default="auto/auto",
        help=f"{RESNET_84}: the learners' task_loop/step_loop (default: the library's default)",
    )
    group.add_argument(
        "--grad-share-real-iters", type=int, default=3, help="timed steps at real sizes"
    )
    group.add_argument(
        "--no-grad-share-ablations",
        dest="grad_share_ablations",
        action="store_false",
        help="skip the ablated rules (sinusoid MLP, task batch 5)",
    )


def _conv_tasks(key):
    """Random-pixel episodes: the step time does not depend on the pixel values."""
    k_support, k_query = jax.random.split(key)
    labels = lambda n: jnp.tile(jnp.repeat(jnp.arange(WAYS), n), (CONV_TASKS, 1))
    shape = lambda n: (CONV_TASKS, WAYS * n, IMAGE, IMAGE, 1)
    support = (jax.random.normal(k_support, shape(1)), labels(1))
    query = (jax.random.normal(k_query, shape(QUERIES)), labels(QUERIES))
    return support, query


def _time(entries, init_params, tasks, iters, rounds):
    states = {}
    for name, learner in entries.items():
        state, _ = learner.step(learner.init(init_params), tasks)  # compile
        states[name] = jax.block_until_ready(state)
    best = dict.fromkeys(entries, float("inf"))
    for _ in range(rounds):
        for name, learner in entries.items():
            state = states[name]
            start = time.perf_counter()
            for _ in range(iters):
                state, _ = learner.step(state, tasks)
            jax.block_until_ready(state)
            best[name] = min(best[name], time.perf_counter() - start)
            states[name] = state
    return {name: t / iters for name, t in best.items()}


def _ravel_only(alpha: float) -> mg.InnerRule:
    """Ablation: inner SGD through grad_share's flat view (concatenate, split), nothing else."""

    def update(grads, state, params, inner_params, carry, step):
        leaves, treedef = jax.tree.flatten(grads)
        flat = jnp.concatenate([x.reshape(x.shape[0], -1) for x in leaves], axis=1)
        parts = jnp.split(flat, np.cumsum([x[0].size for x in leaves])[:-1], axis=1)
        steps = [-alpha * p.reshape(x.shape) for p, x in zip(parts, leaves, strict=True)]
        return treedef.unflatten(steps), state, carry

    return mg.InnerRule(lambda params, num_steps: ((), ()), lambda params: (), update)


def _frozen(rule: mg.InnerRule) -> mg.InnerRule:
    """Ablation: the rule with its learned parameters under `stop_gradient` (not learned)."""

    def update(grads, state, params, inner_params, carry, step):
        inner_params = jax.lax.stop_gradient(inner_params)
        return rule.update(grads, state, params, inner_params, carry, step)

    return rule._replace(update=update)


ABLATIONS = {
    "ablation: ravel only": lambda: _ravel_only(INNER_LR),
    "ablation: m, λ frozen": lambda: _frozen(mg.grad_share(INNER_LR)),
    "ablation: normalize='none'": lambda: mg.grad_share(INNER_LR, normalize="none"),
}


def _rows(model, loss_fn, init_params, tasks, iters, rounds, ablations=False):
    num_tasks = jax.tree.leaves(tasks)[0].shape[0]
    variants = {"grad_share": lambda: mg.grad_share(INNER_LR)}
    if ablations:
        variants.update(ABLATIONS)
    rows = []
    for first_order in (False, True):
        inners = {"plain": optax.sgd(INNER_LR)} | {k: v() for k, v in variants.items()}
        entries = {
            name: mg.maml(
                loss_fn, inner, INNER_STEPS, optax.adam(OUTER_LR), first_order=first_order
            )
            for name, inner in inners.items()
        }
        times = _time(entries, init_params, tasks, iters, rounds)
        for name in variants:
            rows.append(
                {
                    "model": model,
                    "method": "fomaml" if first_order else "maml",
                    "variant": name,
                    "task_batch": num_tasks,
                    "inner_steps": INNER_STEPS,
                    "ms_plain": round(1e3 * times["plain"], 3),
                    "ms_variant": round(1e3 * times[name], 3),
                    "ratio": round(times[name] / times["plain"], 3),
                    "target": "<= 1.15" if name == "grad_share" else "",
                }
            )
    return rows


def resnet12_sized(key):
    """Params shaped like ResNet-12 (`resnet12_shapes`), small random values."""
    shapes = resnet12_shapes()
    keys = jax.random.split(key, len(shapes))
    return {
        f"l{i:02d}": 0.01 * jax.random.normal(k, s)
        for i, (k, s) in enumerate(zip(keys, shapes, strict=True))
    }


def cheap_loss(params, batch):
    """A scalar that depends on every parameter (non-zero Hessian) and costs O(parameters)."""
    return jnp.mean(batch) * sum(jnp.sum(jnp.tanh(p)) for p in jax.tree.leaves(params))


def reset_peak_rss() -> int | None:
    """Frees what can be freed and resets the peak RSS; the current RSS (None off Linux)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return rss_status("VmRSS")


def rss_status(key: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _cost(learner, params, tasks, iters):
    """Trace + lowering time, host memory during them, compiled temp memory, step time."""
    state = learner.init(params)
    base = reset_peak_rss()
    start = time.perf_counter()
    lowered = learner.step.trace(state, tasks).lower()
    trace = time.perf_counter() - start
    host = None if base is None else rss_status("VmHWM") - base
    compiled = lowered.compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    step = None
    if iters:
        state = jax.block_until_ready(compiled(state, tasks)[0])  # warm-up
        step = float("inf")
        for _ in range(iters):
            begin = time.perf_counter()
            state = jax.block_until_ready(compiled(state, tasks)[0])
            step = min(step, time.perf_counter() - begin)
    return {"trace_s": trace, "host_mb": host and host / 2**20, "temp_mb": temp / 2**20,
            "step_ms": step and 1e3 * step}  # fmt: skip


def _real_rows(model, loss_fn, params, tasks, iters):
    """Plain MAML / FOMAML vs the same learner with grad_share: cost figures and ratios."""
    num_params = sum(x.size for x in jax.tree.leaves(params))
    rows = []
    for first_order in (False, True):
        inners = {
            "plain": lambda: optax.sgd(INNER_LR),
            "grad_share": lambda: mg.grad_share(INNER_LR),
        }

        def learner(name, first_order=first_order, inners=inners):
            return mg.maml(
                loss_fn, inners[name](), INNER_STEPS, optax.adam(OUTER_LR), first_order=first_order
            )

        # Warm-up: the first trace in a process fills JAX's caches (lowering rules, jitted
        # helpers), which would be charged to whichever learner comes first.
        for name in inners:
            fresh = learner(name)
            fresh.step.trace(fresh.init(params), tasks).lower()
        costs = {name: _cost(learner(name), params, tasks, iters) for name in inners}
        row = {
            "model": model,
            "params": num_params,
            "leaves": len(jax.tree.leaves(params)),
            "method": "fomaml" if first_order else "maml",
            "task_batch": jax.tree.leaves(tasks)[0].shape[0],
            "inner_steps": INNER_STEPS,
        }
        rows.append({**row, **_ratio_columns(costs)})
    return rows


def _ratio_columns(costs: dict) -> dict:
    """``{key}_plain``, ``{key}_grad_share`` and their ratio, for every cost both measured."""
    columns = {}
    for key, value in costs["plain"].items():
        other = costs["grad_share"][key]
        if value is None or other is None:
            continue
        columns[f"{key}_plain"] = round(value, 3)
        columns[f"{key}_grad_share"] = round(other, 3)
        columns[f"{key}_ratio"] = round(other / value, 3)
    return columns


def resnet12_loss(params, batch):
    """Cross-entropy of the real ResNet-12 (`experiments.models.resnet12_apply`)."""
    logits = resnet12_apply(params, batch[0])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]))


def resnet12_episodes(num_tasks=RESNET_TASKS, image=RESNET_84_IMAGE, queries=RESNET_84_QUERIES):
    """Abstract 5-way 1-shot episodes (``jax.ShapeDtypeStruct``): nothing is allocated."""

    def part(n):
        x = jax.ShapeDtypeStruct((num_tasks, WAYS * n, image, image, 3), jnp.float32)
        return x, jax.ShapeDtypeStruct((num_tasks, WAYS * n), jnp.int32)

    return part(1), part(queries)


def _trace_costs(makes, tasks, traces):
    """Per learner (``makes``: name -> () -> (learner, state)): the best trace + lowering
    time (wall and process CPU) and the smallest peak-RSS increase over `traces` fresh
    learners, and the compiled temporary bytes of its last lowering.

    Every learner is traced once first (a warm-up: it fills JAX's caches of lowering rules
    and jitted helpers), then the learners take turns, so a change in the machine's load
    hits them alike.
    """
    costs = {name: {"trace_s": float("inf"), "trace_cpu_s": float("inf"), "host_mb": None}
             for name in makes}  # fmt: skip
    lowered = {}
    for i in range(traces + 1):
        for name, make in makes.items():
            learner, state = make()
            base = reset_peak_rss()
            start, start_cpu = time.perf_counter(), time.process_time()
            lowered[name] = learner.step.trace(state, tasks).lower()
            wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if i == 0:
                continue
            cost = costs[name]
            cost["trace_s"] = min(cost["trace_s"], wall)
            # CPU time of the process too: less sensitive than wall time to other processes.
            cost["trace_cpu_s"] = min(cost["trace_cpu_s"], cpu)
            if base is not None:
                grown = (rss_status("VmHWM") - base) / 2**20
                cost["host_mb"] = grown if cost["host_mb"] is None else min(cost["host_mb"], grown)
    for name in makes:
        memory = lowered.pop(name).compile().memory_analysis()
        costs[name]["temp_mb"] = memory.temp_size_in_bytes / 2**20
    return costs


def real_resnet12_rows(
    traces=3, layout="auto/auto", num_steps=INNER_STEPS, image=RESNET_84_IMAGE, width=1.0
):
    """The real ResNet-12 (84×84×3, 5-way 1-shot, 15 queries, T = 4), compile only: plain
    MAML / FOMAML against the same learner with grad_share, in the layout `layout`."""
    params = jax.eval_shape(lambda: resnet12_init(jax.random.PRNGKey(0), 3, WAYS, width))
    tasks = resnet12_episodes(image=image)
    task_loop, step_loop = layout.split("/")
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), tasks[0])
    resolved = _loops.resolve(
        task_loop, step_loop, num_tasks=RESNET_TASKS, num_steps=num_steps,
        jaxpr=jax.make_jaxpr(resnet12_loss)(params, batch),
    )  # fmt: skip
    rows = []
    for first_order in (False, True):

        def make(name, first_order=first_order):
            inner = mg.grad_share(INNER_LR) if name == "grad_share" else optax.sgd(INNER_LR)
            learner = mg.maml(
                resnet12_loss, inner, num_steps, optax.adam(OUTER_LR),
                first_order=first_order, task_loop=task_loop, step_loop=step_loop,
            )  # fmt: skip
            return learner, jax.eval_shape(learner.init, params)

        makes = {name: functools.partial(make, name) for name in ("plain", "grad_share")}
        costs = _trace_costs(makes, tasks, traces)
        row = {
            "model": f"ResNet-12 x{width:g} {image}x{image}x3 5-way 1-shot",
            "params": sum(x.size for x in jax.tree.leaves(params)),
            "leaves": len(jax.tree.leaves(params)),
            "method": "fomaml" if first_order else "maml",
            "layout": f"{layout} = {'/'.join(resolved)}",
            "task_batch": RESNET_TASKS,
            "inner_steps": num_steps,
        }
        rows.append({**row, **_ratio_columns(costs)})
    return rows


def run(args) -> list[dict]:
    models = getattr(args, "grad_share_models", MODELS)
    rows = []
    if "sinusoid" in models:
        iters = getattr(args, "grad_share_iters", 100)
        rounds = getattr(args, "grad_share_rounds", 5)
        params = mlp_init(jax.random.PRNGKey(0))
        ablations = getattr(args, "grad_share_ablations", True)
        for num_tasks in (5, 25):
            tasks = sinusoid_tasks(jax.random.PRNGKey(1), num_tasks, SHOTS, SHOTS)[:2]
            rows += _rows(
                "sinusoid MLP", mse_loss, params, tasks, iters, rounds, ablations and num_tasks == 5
            )
    if "conv4" in models:
        iters = getattr(args, "grad_share_conv_iters", 2)
        rounds = getattr(args, "grad_share_conv_rounds", 3)
        params = conv4_init(jax.random.PRNGKey(0), 1, WAYS, IMAGE, CHANNELS)
        tasks = _conv_tasks(jax.random.PRNGKey(1))
        rows += _rows("Conv-4 5-way 1-shot", conv4_loss, params, tasks, iters, rounds)
    real = getattr(args, "grad_share_real", REAL_MODELS)
    real_iters = getattr(args, "grad_share_real_iters", 3)
    if "conv4" in real:
        params = conv4_init(jax.random.PRNGKey(0), 1, WAYS, IMAGE, CHANNELS)
        tasks = _conv_tasks(jax.random.PRNGKey(1))
        rows += _real_rows("Conv-4 5-way 1-shot", conv4_loss, params, tasks, real_iters)
    if "resnet12" in real:
        params = resnet12_sized(jax.random.PRNGKey(0))
        batch = jax.random.normal(jax.random.PRNGKey(1), (RESNET_TASKS, 8))
        rows += _real_rows("ResNet-12-sized tree", cheap_loss, params, (batch, batch), real_iters)
    if RESNET_84 in real:
        traces = getattr(args, "grad_share_real_traces", 3)
        layout = getattr(args, "grad_share_real_layout", "auto/auto")
        rows += real_resnet12_rows(traces, layout)
    return rows
