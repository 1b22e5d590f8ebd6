"""MAML, first-order MAML, Meta-SGD and MAML++ as jitted meta-steps.

Model-agnostic meta-learning (Finn et al. 2017), in the form used for multi-task NLU by
Dou et al. (2019, Section 2.3), with the Meta-SGD (Li et al. 2017) and MAML++ (Antoniou et
al. 2019) options. The inner loop is a `lax.scan` over inner steps of (a `vmap` over tasks
of the support gradient), followed by an `InnerRule` that sees the whole task batch, so a
rule can couple tasks at each step (`metagrad.grad_share`).

References:
  Finn et al., `Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks
  <https://arxiv.org/abs/1703.03400>`_, 2017.
  Dou et al., `Investigating Meta-Learning Algorithms for Low-Resource Natural Language
  Understanding Tasks <https://arxiv.org/abs/1908.10423>`_, 2019.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metagrad._src import base as _base
from metagrad._src import checks as _checks
from metagrad._src import inner_mask as _mask
from metagrad._src import loops as _loops
from metagrad._src import maml_pp as _pp
from metagrad._src.base import LossFn, MetaLearner, Params, meta_learner
from metagrad._src.inner_loop import check_loss, inner_loop, start_step, task_states
from metagrad._src.inner_rules import InnerRule, as_inner_rule
from metagrad._src.options import LearnerOptions, Unpack, check_learner, learner_options


class MAMLState(NamedTuple):
    """State of `maml` / `fomaml`."""

    params: Params  # the learned initialization θ
    inner_params: Any  # learned inner-rule parameters (Meta-SGD rates, m_k, λ_k, ...)
    outer_state: optax.OptState  # of `outer`, over the pair (params, inner_params)
    carry: Any  # the inner rule's persistent carry (no gradient), e.g. grad_share's average
    inner_state: Any  # inner optimizer state kept across outer steps; None when reset
    count: jax.Array  # int32 scalar, outer steps so far


def _split_inexact(tree: Any) -> tuple[list, Callable[[list], Any]]:
    """The floating leaves of `tree`, and the function putting new ones back in their place."""
    leaves, treedef = jax.tree.flatten(tree)
    where = [i for i, x in enumerate(leaves) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]

    def merge(floats):
        out = list(leaves)
        for i, x in zip(where, floats, strict=True):
            out[i] = x
        return jax.tree.unflatten(treedef, out)

    return [leaves[i] for i in where], merge


@learner_options
def maml(
    loss_fn: LossFn,
    inner: float | optax.Schedule | optax.GradientTransformation | InnerRule,
    inner_steps: int,
    outer: float | optax.Schedule | optax.GradientTransformation,
    *,
    first_order: bool | int = False,
    multi_step_loss: None | int | Callable[[jax.Array], jax.Array] = None,
    remat: bool = False,
    inner_mask: Any = None,
    **options: Unpack[LearnerOptions],
) -> MetaLearner:
    r"""Model-agnostic meta-learning (MAML) as a jitted meta-step.

    For each task t of a batch, `inner_steps` inner steps on the support batch from the
    learned initialization θ give θ_t (classic: ``θ_t = θ − α ∇L_t^s(θ)``); the meta-loss is
    the query loss at the adapted params averaged over tasks,
    ``J(θ) = mean_t L_t^q(θ_t)``, and `outer` applies ``∇J``. Second order differentiates
    through the inner loop (for one SGD step ``∇J = mean_t (I − α H_t^s) ∇L_t^q(θ_t)``);
    first order treats the inner gradients as constants (``∇J = mean_t ∇L_t^q(θ_t)``).

    Options:
      - Meta-SGD: ``inner=metagrad.meta_sgd(α)``, per-parameter learned learning rates.
      - MAML++ (Antoniou et al. 2019), all of its training choices:
        per-layer per-step learned inner rates,
        ``inner=metagrad.learned_lr(α, per_step=True, granularity="layer")``; the multi-step
        loss, ``multi_step_loss=N``: the meta-loss becomes ``Σ_k w_k mean_t L_t^q(θ_{t,k})``
        with the weights of `maml_pp_weights` annealed over N outer steps;
        derivative-order annealing, ``first_order=M``: first order for the first M outer
        steps, second order afterwards (one compiled program); the cosine-annealed outer
        rate, an optax schedule: ``outer=optax.adam(optax.cosine_decay_schedule(1e-3,
        decay_steps=num_outer_steps, alpha=1e-5 / 1e-3))``. Per-step batch normalization
        is model code. Statistics: with Flax, call ``nn.BatchNorm(use_running_average=False)``
        inside ``loss_fn`` (``model.apply(params, x, mutable=["batch_stats"])``, discarding
        the returned statistics): every inner step then normalizes with the statistics of
        its own batch at its own params, which is what per-step statistics are during
        meta-training (MAML++'s per-step running averages serve evaluation only). BN
        scale and bias: MAML++ learns them in the outer loop only; exclude them from the
        inner loop with ``inner_mask`` (e.g. ``lambda p: jax.tree.map_with_path(lambda
        path, _: "BatchNorm" not in jax.tree_util.keystr(path), p)``). Separate scale and
        bias per inner step would need the step index inside ``loss_fn``, which it does
        not receive.
      - Gradient sharing: ``inner=metagrad.grad_share(...)``.
      - ANIL / BOIL: ``inner_mask=`` selects the leaves the inner loop adapts (the head
        for ANIL, the body for BOIL); the outer loop learns every leaf.

    The outer optimizer sees the pair ``(params, inner_params)``, so learned inner-rule
    parameters are trained with the initialization (use `optax.multi_transform` on that pair
    for separate optimizers).

    Non-finite values: a task loss that is inf or NaN makes the meta-gradient non-finite;
    ``outer=optax.apply_if_finite(opt, max_consecutive_errors)`` skips such outer steps.
    State carried across outer steps (the rule's carry, a kept inner state) keeps its
    previous value whenever its new value is not finite.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner: an optax transformation applied per task (``optax.sgd(α)`` is classic MAML;
        its state starts fresh for every task unless `reset_inner_state` is False), a step
        size α (a float or an optax schedule) meaning ``optax.sgd(α)``, or an `InnerRule`
        (`meta_sgd`, `learned_lr`, `grad_share`).
      inner_steps: number of inner steps K (>= 1).
      outer: the optax optimizer applied to the meta-gradient, or a step size (a float or an
        optax schedule) meaning ``optax.sgd(outer)``.
      first_order: if True, first-order MAML (inner gradients under `stop_gradient`);
        learned inner-rule parameters still receive their first-order gradient. An int
        N >= 1 is MAML++'s derivative-order annealing: first order for the first N outer
        steps (``state.count < N``), second order from step N on. Both variants are
        compiled into one program and `jax.lax.cond` on ``state.count`` picks one at run
        time: the step compiles once, and each outer step runs (and pays for) one variant.
      multi_step_loss: ``None`` (meta-loss at the last inner step only), an int N >= 1 or a
        callable ``count -> weights[K]``. The int N is a number of OUTER steps, not of inner
        steps: the MAML++ weights of the K inner steps' query losses (`maml_pp_weights`)
        anneal from uniform towards the last inner step over the first N outer steps
        (MAML++ uses N of the order of a few hundred to thousands), so N > `inner_steps`
        is normal.
      remat: rematerialize each inner step in the backward pass (`jax.checkpoint`): the
        backward pass of second-order MAML keeps only the per-step params (and rule state)
        instead of every step's activations, at the cost of recomputing each inner step's
        forward pass.
      inner_mask: ``None`` (adapt every parameter) or the leaves the inner loop adapts, as
        in `optax.masked`: a pytree of bools with the structure of params (or of a prefix of
        it, a bool then standing for a whole subtree), or a function ``params -> mask``.
        ANIL (Raghu et al. 2020) adapts the head only, BOIL (Oh et al. 2021) the body
        only. The unselected leaves are shared by all tasks in the inner loop: they are
        neither copied per task nor differentiated by the inner gradients (so ANIL's
        step is cheaper than MAML's), but the outer loop learns them through the query
        loss. The inner rule sees only the selected leaves: its learned parameters
        (Meta-SGD rates, ...) and state exist for them only, and ``alignment`` is
        measured on their gradients. With every leaf selected the step equals plain MAML.
      **options: the keywords every meta-learner shares, `LearnerOptions`.

    Returns:
      A `MetaLearner`: ``init(params) -> MAMLState``; ``step(state, (support, query)) ->
      (state, metrics)`` with support and query pytrees whose leaves have a leading task
      axis, metrics ``loss`` (the meta-objective), ``loss_pre`` (support loss at θ),
      ``loss_post`` (query loss after adaptation), optionally ``alignment``;
      ``adapt(state, support, num_steps=None) -> params`` for one task (no task axis).

    Example:
      >>> import jax, jax.numpy as jnp, optax, metagrad as mg
      >>> loss = lambda p, b: jnp.mean((b[0] * p["w"] - b[1]) ** 2)
      >>> learner = mg.maml(loss, optax.sgd(0.1), 1, optax.adam(1e-2))
      >>> state = learner.init({"w": jnp.zeros(())})
      >>> x = jnp.ones((4, 5)); y = x * jnp.arange(4.0)[:, None]
      >>> state, metrics = learner.step(state, ((x, y), (x, y)))
      >>> sorted(metrics), learner.adapt(state, (x[0], y[0]))["w"].shape
      (['loss', 'loss_post', 'loss_pre', 'meta_grad_norm'], ())

    References:
      Finn et al., `Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks
      <https://arxiv.org/abs/1703.03400>`_, 2017.
    """
    inner_steps, outer, opts = check_learner(
        "maml", loss_fn, inner_steps, outer, options, remat=remat
    )
    rule = as_inner_rule(inner, "inner")
    first_order, anneal_order = _pp.derivative_order(first_order)
    weights_fn = _pp.multi_step_weights(multi_step_loss, inner_steps)
    step_query = weights_fn is not None
    eval_carry = rule.eval_carry or (lambda c: c)

    def loop_carry(carry):
        # The carry in the form the rule's update works on inside the inner loop.
        return rule.loop_carry(carry) if rule.loop_carry else (carry, lambda c: c)

    _mask.check(inner_mask)

    def adapted(params):
        # The leaves the inner loop adapts, and the map back to full params.
        return _mask.split(_mask.flags(inner_mask, params), params)

    def bound(merge):
        return loss_fn if inner_mask is None else _mask.bind(loss_fn, merge)

    def init(params):
        inner_params, carry = rule.init(adapted(params)[0], inner_steps)
        inner_state = None if opts.reset_inner_state else rule.init_state(adapted(params)[0])
        return MAMLState(
            params=params,
            inner_params=inner_params,
            outer_state=outer.init((params, inner_params)),
            carry=carry,
            inner_state=inner_state,
            count=jnp.zeros((), jnp.int32),
        )

    def start_state(state, num_tasks, axis_name):
        return task_states(
            rule.init_state, adapted(state.params)[0], state.inner_state, num_tasks,
            reset=opts.reset_inner_state, axis_name=axis_name,
        )  # fmt: skip

    def step(state, tasks):
        support, query, run_tasks, step_mode = start_step(
            loss_fn, state.params, tasks, alignment=opts.alignment, task_loop=opts.task_loop,
            step_loop=opts.step_loop, num_steps=inner_steps,
        )  # fmt: skip
        carry0, restore_carry = loop_carry(jax.lax.stop_gradient(state.carry))
        istate0 = start_state(state, run_tasks.num_tasks, opts.axis_name)
        if step_query:
            weights = _pp.step_weights(weights_fn, state.count, inner_steps)

        # The carry enters the differentiated function as an argument (its gradient is
        # dropped): the carry of a rule with learned parameters (grad_share's G) gets a
        # tangent at the first inner step, and had it entered with a symbolic-zero one,
        # JAX's scan would find that out by tracing the inner step's derivative twice
        # (forward and partial evaluation each iterate to a fixed point): up to 1.5x the
        # trace time of a real ResNet-12 step with unrolled tasks and scanned steps.
        carry_floats, merge_carry = _split_inexact(carry0)

        def objective(diff, carry_floats, first_order):
            params, inner_params = diff
            carry0 = merge_carry(carry_floats)
            # Unselected leaves (inner_mask) are closed over by the loss: shared by the tasks.
            params, merge = adapted(params)
            task_loss = bound(merge)
            params_t, istate, carry, outs = inner_loop(
                task_loss, rule, params, inner_params, carry0, istate0,
                support, query, inner_steps, first_order=first_order, remat=remat,
                step_query=step_query, alignment=opts.alignment, task_loop=run_tasks.mode,
                step_loop=step_mode,
            )  # fmt: skip
            if step_query:
                per_step = jnp.mean(outs["query_loss"], axis=1)
                loss, post = jnp.sum(weights * per_step), per_step[-1]
            else:
                post = loss = jnp.mean(run_tasks.map(task_loss, params_t, query, False))
            metrics = {"loss": loss, "loss_pre": jnp.mean(outs["support_loss"][0])}
            metrics["loss_post"] = post
            if opts.alignment:
                metrics["alignment"] = outs["alignment"]
            return loss, (metrics, istate, carry)

        diff = (state.params, state.inner_params)

        # Under shard_map, differentiating replicated params would return their gradient
        # already summed over devices (the transpose of the implicit broadcast): mark them
        # device-varying so each device's gradient stays local until the pmean below.
        def value_and_grad(order):
            grad_fn = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
            value, (grads, _) = grad_fn(
                _base.to_varying(diff, opts.axis_name),
                _base.to_varying(carry_floats, opts.axis_name),
                order,
            )
            return value, grads

        if anneal_order:
            # MAML++ derivative-order annealing: both orders in one program, one run per step.
            (_, (metrics, istate, carry)), grads = jax.lax.cond(
                state.count < first_order,
                lambda: value_and_grad(True),
                lambda: value_and_grad(False),
            )
        else:
            (_, (metrics, istate, carry)), grads = value_and_grad(first_order)
        istate = None if opts.reset_inner_state else _base.mean_over_tasks(istate, opts.axis_name)
        if opts.axis_name is not None:
            grads, metrics = jax.lax.pmean((grads, metrics), opts.axis_name)
        metrics["meta_grad_norm"] = _base.global_norm(grads)
        updates, outer_state = outer.update(grads, state.outer_state, diff)
        params, inner_params = optax.apply_updates(diff, updates)
        carry = _base.to_invariant(jax.lax.stop_gradient(carry), opts.axis_name)
        new_state = MAMLState(
            params=params,
            inner_params=inner_params,
            outer_state=outer_state,
            # A non-finite task must not poison the state carried to later steps. The check
            # runs on the loop form of the carry (one flat vector for grad_share), same values.
            carry=_base.keep_if_finite(restore_carry(carry), state.carry, check=carry),
            inner_state=_base.keep_if_finite(istate, state.inner_state),
            count=state.count + 1,
        )
        return new_state, metrics

    def adapt_fn(state, support, num_steps):
        support = jax.tree.map(lambda x: jnp.asarray(x)[None], support)
        istate = start_state(state, 1, None)  # outside the device axis
        carry, _ = loop_carry(eval_carry(state.carry))
        jaxpr = check_loss(loss_fn, state.params, (support, support))
        loops = _loops.resolve(
            opts.task_loop, opts.step_loop, num_tasks=1, num_steps=num_steps, jaxpr=jaxpr
        )
        params, merge = adapted(state.params)
        params_t, *_ = inner_loop(
            bound(merge), rule, params, state.inner_params, carry, istate,
            support, None, num_steps, first_order=True, remat=False, step_query=False,
            alignment=False, task_loop=loops[0], step_loop=loops[1],
        )  # fmt: skip
        return merge(_loops.TaskLoop(loops[0], 1).take(params_t, 0))

    adapt_jit = jax.jit(adapt_fn, static_argnums=2)

    def adapt(state: MAMLState, support: Any, num_steps: int | None = None) -> Params:
        num_steps = inner_steps if num_steps is None else num_steps
        return adapt_jit(state, support, _checks.positive_int("num_steps", num_steps))

    return meta_learner(init, step, adapt, state_type=MAMLState)
