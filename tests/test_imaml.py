"""Tests for metagrad.imaml: the implicit meta-gradient against a closed form and unrolled MAML."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg

DIM, TASKS, LAM = 3, 4, 1.0


def quad_loss(theta, batch):
    """L(θ) = ½θᵀAθ − bᵀθ."""
    a, b = batch
    return 0.5 * theta @ a @ theta - b @ theta


def quad_tasks(seed):
    rng = np.random.default_rng(seed)

    def spd():
        m = rng.normal(size=(TASKS, DIM, DIM))
        return np.einsum("tij,tkj->tik", m, m) / DIM + 0.5 * np.eye(DIM)

    support = (jnp.asarray(spd()), jnp.asarray(rng.normal(size=(TASKS, DIM))))
    query = (jnp.asarray(spd()), jnp.asarray(rng.normal(size=(TASKS, DIM))))
    return jnp.asarray(rng.normal(size=(DIM,))), (support, query)


def meta_grad(learner, params, tasks):
    """The meta-gradient read off one outer SGD step with learning rate 1."""
    state = learner.init(params)
    new, metrics = learner.step(state, tasks)
    return jax.tree.map(lambda a, b: a - b, state.params, new.params), metrics


def test_matches_closed_form_on_quadratics(x64):
    phi, tasks = quad_tasks(0)
    (a_s, b_s), (a_q, b_q) = tasks
    # 150 SGD steps on the proximal objective converge far below 1e-12 (rate <= 0.63).
    learner = mg.imaml(quad_loss, optax.sgd(0.25), 150, optax.sgd(1.0), lam=LAM, cg_steps=6)
    got, metrics = meta_grad(learner, phi, tasks)
    expected = []
    for t in range(TASKS):
        # argmin ½θᵀAθ − bᵀθ + (λ/2)‖θ − φ‖² = (A + λI)⁻¹ (b + λφ); dθ*/dφ = λ (A + λI)⁻¹.
        theta = np.linalg.solve(a_s[t] + LAM * np.eye(DIM), b_s[t] + LAM * phi)
        g_q = a_q[t] @ theta - b_q[t]
        expected.append(LAM * np.linalg.solve(a_s[t] + LAM * np.eye(DIM), g_q))
    expected = np.mean(expected, axis=0)
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= 1e-6
    assert metrics["cg_residual"] < 1e-10 and metrics["prox_grad_norm"] < 1e-10
    np.testing.assert_allclose(metrics["meta_grad_norm"], np.linalg.norm(expected), rtol=1e-6)
    # One CG iteration is not converged: the residual metric says so, the gradient is off.
    short = mg.imaml(quad_loss, optax.sgd(0.25), 150, optax.sgd(1.0), lam=LAM, cg_steps=1)
    got1, metrics1 = meta_grad(short, phi, tasks)
    assert metrics1["cg_residual"] > 1e-3
    assert np.linalg.norm(got1 - expected) / np.linalg.norm(expected) > 1e-4


def mlp_loss(params, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ params["w"]) @ params["v"] - y) ** 2)


def test_matches_unrolled_maml_on_proximal_objective(x64):
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(2, 3)) * 0.5),
              "v": jnp.asarray(rng.normal(size=3) * 0.5)}  # fmt: skip
    x = rng.normal(size=(2, 2, 6, 2))
    (xs, xq), (ys, yq) = jnp.asarray(x), jnp.asarray(np.sin(x.sum(-1)))
    tasks = ((xs, ys), (xq, yq))
    lam, alpha, steps = 2.0, 0.2, 300

    def unrolled(params):
        # Fully unrolled (differentiated) MAML on the proximal support objective.
        total = 0.0
        for t in range(2):

            def sgd_step(_, theta, t=t):
                g = jax.grad(mlp_loss)(theta, (xs[t], ys[t]))
                return jax.tree.map(lambda th, gi, p: th - alpha * (gi + lam * (th - p)),
                                    theta, g, params)  # fmt: skip

            theta = jax.lax.fori_loop(0, steps, sgd_step, params)
            total = total + mlp_loss(theta, (xq[t], yq[t]))
        return total / 2

    expected = jax.jit(jax.grad(unrolled))(params)
    learner = mg.imaml(mlp_loss, optax.sgd(alpha), steps, optax.sgd(1.0), lam=lam, cg_steps=12)
    got, metrics = meta_grad(learner, params, tasks)
    flat = lambda t: np.concatenate([np.ravel(v) for v in jax.tree.leaves(t)])  # noqa: E731
    assert metrics["cg_residual"] < 1e-10
    err = np.linalg.norm(flat(got) - flat(expected)) / np.linalg.norm(flat(expected))
    assert err <= 1e-6, err


def test_inner_state_kept_and_adapt(x64):
    phi, tasks = quad_tasks(2)
    learner = mg.imaml(quad_loss, optax.adam(0.1), 3, optax.sgd(0.1), lam=LAM, cg_steps=3,
                       reset_inner_state=False, alignment=True)  # fmt: skip
    state = learner.init(phi)
    new, metrics = learner.step(state, tasks)
    assert int(new.inner_state[0].count) == 3 and -1 <= metrics["alignment"] <= 1
    reset = mg.imaml(quad_loss, optax.adam(0.1), 3, optax.sgd(0.1), lam=LAM, cg_steps=3)
    assert reset.init(phi).inner_state is None
    # adapt: the proximal inner loop on one task, by hand.
    (a, b), _ = tasks
    theta, opt = phi, optax.adam(0.1)
    s = opt.init(theta)
    for _ in range(3):
        u, s = opt.update(a[0] @ theta - b[0] + LAM * (theta - phi), s, theta)
        theta = theta + u
    np.testing.assert_allclose(reset.adapt(reset.init(phi), (a[0], b[0])), theta, rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"lam": 0.0}, ValueError, "lam"),
        ({"lam": -1.0}, ValueError, "lam"),
        ({"cg_steps": 0}, ValueError, "cg_steps"),
        ({"cg_steps": 2.5}, (TypeError, ValueError), "cg_steps"),
        ({"inner": mg.meta_sgd(0.1)}, TypeError, "inner"),
        ({"inner_steps": 0}, ValueError, "inner_steps"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {"inner": optax.sgd(0.1), "inner_steps": 1, "lam": 1.0, "cg_steps": 2, **kwargs}
    with pytest.raises(error, match=match):
        mg.imaml(quad_loss, args.pop("inner"), args.pop("inner_steps"), optax.sgd(0.1), **args)


def test_alignment_needs_two_tasks():
    phi, ((a, b), (aq, bq)) = quad_tasks(0)
    learner = mg.imaml(quad_loss, optax.sgd(0.1), 1, 0.1, lam=1.0, cg_steps=1, alignment=True)
    with pytest.raises(ValueError, match="alignment"):
        learner.step(learner.init(phi), ((a[:1], b[:1]), (aq[:1], bq[:1])))


def test_compiled_memory_does_not_grow_with_inner_steps():
    # A small MLP whose per-step activations dominate: unrolled MAML's memory grows with K,
    # iMAML's (no differentiated inner loop) does not.
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(8, 64)), jnp.float32),
              "v": jnp.asarray(rng.normal(size=64), jnp.float32)}  # fmt: skip
    x = jnp.asarray(rng.normal(size=(2, 2, 256, 8)), jnp.float32)
    tasks = ((x[0], x[0].sum(-1)), (x[1], x[1].sum(-1)))

    def peak(learner):
        state = learner.init(params)
        # Backend (LLVM) optimizations off: faster to compile, same buffers.
        options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
        mem = learner.step.lower(state, tasks).compile(compiler_options=options).memory_analysis()
        return mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes

    loops = dict(task_loop="vmap", step_loop="scan")
    imaml = [peak(mg.imaml(mlp_loss, optax.sgd(0.01), k, 0.1, lam=1.0, cg_steps=2, **loops))
             for k in (2, 40)]  # fmt: skip
    maml = [peak(mg.maml(mlp_loss, optax.sgd(0.01), k, optax.sgd(0.1), **loops)) for k in (2, 40)]
    assert imaml[1] <= 1.05 * imaml[0], imaml
    assert maml[1] > 2 * maml[0], maml
