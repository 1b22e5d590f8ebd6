"""Hand-written JAX meta-steps, the "best hand-written" reference of the real_models benchmark.

What a JAX user writes without metagrad: one `jax.jit` around the whole outer step, the inner
SGD steps written out. Shares no code with metagrad. Four ways to run the task axis and the
inner steps (``"tasks/steps"``):

- ``unroll/unroll``: a Python loop over tasks (each task's params a separate pytree) and over
  inner steps; XLA sees every convolution with plain weights.
- ``unroll/scan``: tasks unrolled, inner steps in `jax.lax.scan`.
- ``vmap/scan``: `jax.vmap` over tasks (per-task weights become grouped convolutions),
  `jax.lax.scan` over steps; the first step is taken at the shared params (one convolution
  over all tasks' images), as a careful JAX user would.
- ``vmap/unroll``: `jax.vmap` over tasks, steps unrolled.

The benchmark times all four and reports the fastest as "best hand-written".

Methods (``make_step(method, ...)``): second-order MAML (``"maml"``), first-order MAML
(``"fomaml"``), MAML with gradient sharing (``"grad_share"``: the rule of SPEC section 1 with
m_k, λ_k learned, G carried across outer steps, per-task unit-norm normalization, logits
starting at 0) and Reptile (``"reptile"``: K SGD steps per task on its support batch,
meta-gradient φ − mean_t θ_t, and the query loss at θ_t, the loss `metagrad.reptile`
reports). The outer optimizer is any optax transformation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

VARIANTS = ("unroll/unroll", "unroll/scan", "vmap/scan", "vmap/unroll")
METHODS = ("maml", "fomaml", "reptile", "grad_share")


def _split(tree, num):
    return [jax.tree.map(lambda x, t=t: x[t], tree) for t in range(num)]


def _task_grads(loss_fn, params, batch, tasks, shared, first_order):
    """Support losses and gradients of every task, in the representation of `tasks`."""
    if tasks == "unroll":
        # params: a list of per-task trees (or one shared tree); batch: a list of batches.
        plist = [params] * len(batch) if shared else params
        out = [jax.value_and_grad(loss_fn)(p, b) for p, b in zip(plist, batch, strict=True)]
        losses = jnp.stack([o[0] for o in out])
        grads = [o[1] for o in out]
    else:
        in_axes = (None, 0) if shared else (0, 0)
        losses, grads = jax.vmap(jax.value_and_grad(loss_fn), in_axes)(params, batch)
    if first_order:
        grads = jax.lax.stop_gradient(grads)
    return losses, grads


def _tree_sum_sq(tree):
    return sum(jnp.sum(x * x) for x in jax.tree.leaves(tree))


def _share(grads, average, rate, gate, tasks):
    """Gradient sharing: ḡ = mean_t g_t/‖g_t‖, G ← (1−r)G + rḡ, Δ_t = (1−λ)g_t + λG."""
    if tasks == "unroll":
        inv = [jax.lax.rsqrt(_tree_sum_sq(g)) for g in grads]
        mean = jax.tree.map(
            lambda *gs: sum(i * g for i, g in zip(inv, gs, strict=True)) / len(gs), *grads
        )
        average = jax.tree.map(lambda a, m: (1 - rate) * a + rate * m, average, mean)
        deltas = [jax.tree.map(lambda g, a: (1 - gate) * g + gate * a, g, average) for g in grads]
        return deltas, average
    sq = sum(jnp.sum(x * x, axis=tuple(range(1, x.ndim))) for x in jax.tree.leaves(grads))
    inv = jax.lax.rsqrt(sq)

    def mean_leaf(g):
        return jnp.tensordot(inv, g, axes=1) / g.shape[0]

    average = jax.tree.map(lambda a, g: (1 - rate) * a + rate * mean_leaf(g), average, grads)
    deltas = jax.tree.map(lambda g, a: (1 - gate) * g + gate * a, grads, average)
    return deltas, average


def _sgd(params, deltas, lr, tasks, shared, num_tasks):
    if tasks == "unroll":
        plist = [params] * num_tasks if shared else params
        return [
            jax.tree.map(lambda p, d: p - lr * d, p, d) for p, d in zip(plist, deltas, strict=True)
        ]
    # Broadcasting the shared params against the per-task deltas gives per-task params.
    return jax.tree.map(lambda p, d: p - lr * d, params, deltas)


def inner_loop(loss_fn, params, support, num_steps, lr, variant, *, first_order, share=None):
    """Adapts `params` to every task; returns (adapted, first support losses, final G).

    `support` has a leading task axis. `share` is ``(momentum_logits, gate_logits, G)`` for
    gradient sharing, or None for plain SGD. The adapted params come as a list of trees
    (tasks unrolled) or one stacked tree (tasks vmapped).
    """
    tasks, steps = variant.split("/")
    num_tasks = jax.tree.leaves(support)[0].shape[0]
    batch = _split(support, num_tasks) if tasks == "unroll" else support
    rates = gates = None
    average = None
    if share is not None:
        momentum, gate_logits, average = share
        rates, gates = jax.nn.sigmoid(momentum), jax.nn.sigmoid(gate_logits)

    def one_step(p, average, k, shared):
        losses, grads = _task_grads(loss_fn, p, batch, tasks, shared, first_order)
        if share is not None:
            grads, average = _share(grads, average, rates[k], gates[k], tasks)
        return _sgd(p, grads, lr, tasks, shared, num_tasks), average, losses

    # Step 0 at the shared params, the rest per task.
    p, average, first_losses = one_step(params, average, 0, True)
    if steps == "unroll":
        for k in range(1, num_steps):
            p, average, _ = one_step(p, average, k, False)
    elif num_steps > 1:

        def body(carry, k):
            p, average = carry
            p, average, _ = one_step(p, average, k, False)
            return (p, average), None

        (p, average), _ = jax.lax.scan(body, (p, average), jnp.arange(1, num_steps))
    return p, first_losses, average


def _query_loss(loss_fn, adapted, query, tasks):
    num_tasks = jax.tree.leaves(query)[0].shape[0]
    if tasks == "unroll":
        qs = _split(query, num_tasks)
        return sum(loss_fn(p, q) for p, q in zip(adapted, qs, strict=True)) / num_tasks
    return jnp.mean(jax.vmap(loss_fn)(adapted, query))


def make_step(method, loss_fn, num_steps, lr, outer, variant):
    """``(init(params) -> state, step(state, tasks) -> (state, loss))``, step not jitted.

    `tasks` is ``(support, query)`` for every method (Reptile trains on the support batch
    and evaluates the query batch after adaptation, as `metagrad.reptile` does).
    The state is ``(params, learned, opt_state, G)``: `learned` holds grad_share's logits
    ``(m[K], λ[K])`` (else ``()``), `G` its running average (else ``()``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    tasks_mode = variant.split("/")[0]

    def init(params):
        learned = ()
        average = ()
        if method == "grad_share":
            learned = (jnp.zeros((num_steps,)), jnp.zeros((num_steps,)))
            average = jax.tree.map(jnp.zeros_like, params)
        return params, learned, outer.init((params, learned)), average

    def meta_loss(diff, average, tasks):
        params, learned = diff
        support, query = tasks
        share = (*learned, average) if method == "grad_share" else None
        adapted, _, average = inner_loop(
            loss_fn, params, support, num_steps, lr, variant,
            first_order=method == "fomaml", share=share,
        )  # fmt: skip
        loss = _query_loss(loss_fn, adapted, query, tasks_mode)
        return loss, (() if share is None else average)

    def step(state, tasks):
        params, learned, opt_state, average = state
        diff = (params, learned)
        if method == "reptile":
            support, query = tasks
            adapted, _, _ = inner_loop(
                loss_fn, params, support, num_steps, lr, variant, first_order=True
            )
            if tasks_mode == "unroll":
                mean = jax.tree.map(lambda *xs: sum(xs) / len(xs), *adapted)
            else:
                mean = jax.tree.map(lambda x: jnp.mean(x, axis=0), adapted)
            grads = (jax.tree.map(jnp.subtract, params, mean), learned)
            loss = _query_loss(loss_fn, adapted, query, tasks_mode)
        else:
            (loss, average), grads = jax.value_and_grad(meta_loss, has_aux=True)(
                diff, average, tasks
            )
            average = jax.lax.stop_gradient(average)
        updates, opt_state = outer.update(grads, opt_state, diff)
        params, learned = optax.apply_updates(diff, updates)
        return (params, learned, opt_state, average), loss

    return init, step
