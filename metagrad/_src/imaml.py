"""Implicit MAML (iMAML): the meta-gradient of a proximal inner loop by conjugate gradient.

Rajeswaran, Finn, Kakade, Levine, `Meta-Learning with Implicit Gradients
<https://arxiv.org/abs/1909.04630>`_, NeurIPS 2019.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metagrad._src import base as _base
from metagrad._src import checks as _checks
from metagrad._src.adapt import one_task
from metagrad._src.base import LossFn, MetaLearner, Params, meta_learner
from metagrad._src.hvp import hvp as _hvp
from metagrad._src.inner_loop import inner_loop, start_step, task_states
from metagrad._src.inner_rules import as_inner_rule, fixed_inner
from metagrad._src.options import LearnerOptions, Unpack, check_learner, learner_options


class IMAMLState(NamedTuple):
    """State of `imaml`."""

    params: Params  # the learned initialization φ
    outer_state: optax.OptState  # of `outer`
    inner_state: Any  # inner optimizer state kept across outer steps; None when reset
    count: jax.Array  # int32 scalar, outer steps so far


def conjugate_gradient(matvec, b: Any, num_steps: int) -> tuple[Any, jax.Array]:
    """`num_steps` iterations of conjugate gradient on ``A x = b`` from ``x = 0``.

    ``A`` (``matvec``) must be symmetric positive definite. Returns ``x`` and the relative
    residual ``‖b − A x‖ / ‖b‖`` of the recurrence (0 when ``b = 0``). A converged residual
    stays converged: a zero step size is taken once ``r = 0`` or ``pᵀAp <= 0``.
    """
    vdot = optax.tree.vdot
    rr0 = vdot(b, b)

    def body(carry, _):
        x, r, p, rr = carry
        ap = matvec(p)
        pap = vdot(p, ap)
        ok = (pap > 0) & (rr > 0)
        alpha = jnp.where(ok, rr / jnp.where(ok, pap, 1.0), 0.0)
        x = optax.tree.add_scale(x, alpha, p)
        r = optax.tree.add_scale(r, -alpha, ap)
        rr_new = vdot(r, r)
        beta = jnp.where(ok, rr_new / jnp.where(ok, rr, 1.0), 0.0)
        p = optax.tree.add_scale(r, beta, p)
        return (x, r, p, jnp.where(ok, rr_new, rr)), None

    x0 = optax.tree.zeros_like(b)
    (x, _, _, rr), _ = jax.lax.scan(body, (x0, b, b, rr0), None, length=num_steps)
    return x, jnp.sqrt(rr / jnp.where(rr0 > 0, rr0, 1.0))


@learner_options
def imaml(
    loss_fn: LossFn,
    inner: float | optax.Schedule | optax.GradientTransformation,
    inner_steps: int,
    outer: float | optax.Schedule | optax.GradientTransformation,
    *,
    lam: float = 1.0,
    cg_steps: int = 5,
    **options: Unpack[LearnerOptions],
) -> MetaLearner:
    r"""Implicit MAML: a proximal inner loop and its implicit meta-gradient.

    For each task t the inner loop approximately minimizes the proximal support objective
    ``G_t(θ) = L_t^s(θ) + (λ/2)‖θ − φ‖²`` from ``θ = φ`` with `inner_steps` steps of
    `inner` (any optax optimizer, fed ``∇G_t``), giving ``θ_t*``. At an exact minimizer,
    ``dθ_t*/dφ = (I + H_t/λ)^{-1}`` with ``H_t = ∇²L_t^s(θ_t*)``, so the meta-gradient is

        ``∇J(φ) = mean_t (I + H_t/λ)^{-1} ∇L_t^q(θ_t*)``,

    solved per task by `cg_steps` iterations of conjugate gradient whose products ``H_t v``
    are exact Hessian-vector products (`metagrad.hvp`). The inner loop is never
    differentiated (``θ_t*`` is a constant): memory does not grow with `inner_steps`, and
    any optax optimizer or number of steps may be used. The linear system is positive
    definite when ``G_t`` is strongly convex near ``θ_t*`` (``H_t ≻ −λI``); a larger λ makes
    it better conditioned (CG converges faster) and keeps ``θ_t*`` closer to φ.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner: the optax optimizer of the inner loop (e.g. ``optax.sgd(α)``, or the step
        size α meaning it), applied per task to ``∇G_t``; its state starts fresh for every
        task unless `reset_inner_state` is False.
      inner_steps: number of inner steps K (>= 1).
      outer: the optax optimizer applied to the meta-gradient (or a float / optax
        schedule, meaning ``optax.sgd(outer)``).
      lam: the proximal regularization strength λ > 0 (default 1.0, a starting point: the
        paper tunes λ per benchmark).
      cg_steps: conjugate-gradient iterations per task (>= 1; default 5).
      **options: the keywords every meta-learner shares, `LearnerOptions`.

    ``task_loop`` runs each task's inner loop and CG solve as one per-task program.

    Returns:
      A `MetaLearner`: ``init(params) -> IMAMLState``; ``step(state, (support, query)) ->
      (state, metrics)`` (leaves with a leading task axis, as `metagrad.maml`); metrics
      ``loss`` and ``loss_post`` (mean query loss at θ*), ``loss_pre`` (mean support loss at
      φ), ``meta_grad_norm``, ``cg_residual`` (the largest relative CG residual
      ``‖b − A x‖/‖b‖`` over the tasks), ``prox_grad_norm`` (the largest ``‖∇G_t(θ_t*)‖``
      over the tasks: how far the inner loop is from the proximal minimizer), optionally
      ``alignment``; ``adapt(state, support, num_steps=None) -> params``, the proximal inner
      loop for one task.

    Example:
      >>> import jax.numpy as jnp, optax, metagrad as mg
      >>> loss = lambda p, b: jnp.mean((b[0] * p - b[1]) ** 2)
      >>> learner = mg.imaml(loss, optax.sgd(0.1), 5, optax.sgd(0.1), lam=1.0, cg_steps=3)
      >>> state = learner.init(jnp.zeros(()))
      >>> x = jnp.ones((3, 4))
      >>> state, metrics = learner.step(state, ((x, 2 * x), (x, 2 * x)))
      >>> sorted(metrics)
      ['cg_residual', 'loss', 'loss_post', 'loss_pre', 'meta_grad_norm', 'prox_grad_norm']

    References:
      Rajeswaran et al., `Meta-Learning with Implicit Gradients
      <https://arxiv.org/abs/1909.04630>`_, NeurIPS 2019.
    """
    inner_steps, outer, opts = check_learner("imaml", loss_fn, inner_steps, outer, options)
    inner = fixed_inner("imaml", inner)
    rule = as_inner_rule(inner)
    lam = _checks.positive_float("lam", lam)
    cg_steps = _checks.positive_int("cg_steps", cg_steps)
    grad_fn = jax.grad(loss_fn)

    def init(params):
        params = jax.tree.map(jnp.asarray, params)
        return IMAMLState(
            params=params,
            outer_state=outer.init(params),
            inner_state=None if opts.reset_inner_state else inner.init(params),
            count=jnp.zeros((), jnp.int32),
        )

    def prox_value_and_grad(phi):
        """The support loss and the gradient of G(θ) = L^s(θ) + (λ/2)‖θ − φ‖²."""

        def value_and_grad(theta, support):
            loss, grad = jax.value_and_grad(loss_fn)(theta, support)
            return loss, optax.tree.add_scale(grad, lam, optax.tree.sub(theta, phi))

        return value_and_grad

    def implicit_grad(phi, theta, batches):
        """One task's meta-gradient (I + H/λ)^{-1} ∇L^q(θ*) by conjugate gradient."""
        support, query = batches
        theta = jax.lax.stop_gradient(theta)
        loss_q, g_q = jax.value_and_grad(loss_fn)(theta, query)

        def matvec(v):  # (I + H/λ) v
            hv = _hvp(lambda p: grad_fn(p, support), theta, v)
            return optax.tree.add_scale(v, 1.0 / lam, hv)

        meta_grad, residual = conjugate_gradient(matvec, g_q, cg_steps)
        prox = prox_value_and_grad(phi)(theta, support)[1]
        out = {"loss_post": loss_q, "cg_residual": residual}
        out["prox_grad_norm"] = _base.global_norm(prox)
        return meta_grad, out

    def step(state, tasks):
        support, query, run_tasks, step_mode = start_step(
            loss_fn, state.params, tasks, alignment=opts.alignment, task_loop=opts.task_loop,
            step_loop=opts.step_loop, num_steps=inner_steps,
        )  # fmt: skip
        # Device-varying params: gradients taken on each device's tasks stay local until
        # the pmean below (see metagrad.maml).
        phi = _base.to_varying(state.params, opts.axis_name)
        istate0 = task_states(
            inner.init, phi, state.inner_state, run_tasks.num_tasks,
            reset=opts.reset_inner_state, axis_name=opts.axis_name,
        )  # fmt: skip
        # The proximal inner loop: θ_t* ≈ argmin L_t^s(θ) + (λ/2)‖θ − φ‖², never differentiated.
        thetas, istate, _, inner_outs = inner_loop(
            loss_fn, rule, phi, (), (), istate0, support, None, inner_steps,
            task_loop=run_tasks.mode, step_loop=step_mode, alignment=opts.alignment,
            value_and_grad=prox_value_and_grad(phi),
        )  # fmt: skip
        grads, outs = run_tasks.map(
            lambda theta, batches: implicit_grad(phi, theta, batches),
            thetas, (support, query), False,
        )  # fmt: skip
        grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
        loss = jnp.mean(outs["loss_post"])
        # At θ = φ the proximal term and its gradient vanish: the first inner step's loss and
        # gradients are those of L^s at φ.
        loss_pre = jnp.mean(inner_outs["support_loss"][0])
        metrics = {"loss": loss, "loss_pre": loss_pre, "loss_post": loss}
        if opts.alignment:
            metrics["alignment"] = inner_outs["alignment"]
        worst = {"cg_residual": jnp.max(outs["cg_residual"]),
                 "prox_grad_norm": jnp.max(outs["prox_grad_norm"])}  # fmt: skip
        if opts.axis_name is not None:
            grads, metrics = jax.lax.pmean((grads, metrics), opts.axis_name)
            worst = jax.lax.pmax(worst, opts.axis_name)
        metrics["meta_grad_norm"] = _base.global_norm(grads)
        metrics.update(worst)
        updates, outer_state = outer.update(grads, state.outer_state, state.params)
        kept = None
        if not opts.reset_inner_state:
            kept = _base.mean_over_tasks(istate, opts.axis_name)
            kept = _base.keep_if_finite(kept, state.inner_state)
        new_state = IMAMLState(
            params=optax.apply_updates(state.params, updates),
            outer_state=outer_state,
            inner_state=kept,
            count=state.count + 1,
        )
        return new_state, metrics

    def adapt_fn(state, support, num_steps):
        istate = inner.init(state.params) if opts.reset_inner_state else state.inner_state
        value_and_grad = prox_value_and_grad(state.params)
        return one_task(
            loss_fn, inner, state.params, istate, support, num_steps, value_and_grad=value_and_grad
        )[0]

    adapt_jit = jax.jit(adapt_fn, static_argnums=2)

    def adapt(state: IMAMLState, support: Any, num_steps: int | None = None) -> Params:
        num_steps = inner_steps if num_steps is None else num_steps
        return adapt_jit(state, support, _checks.positive_int("num_steps", num_steps))

    return meta_learner(init, step, adapt, state_type=IMAMLState)
