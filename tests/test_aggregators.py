"""The Jacobian aggregators (mgda, cagrad, nash_mtl, imtl_g, aligned_mtl, upgrad, dualproj,
config, graddrop) against independent references.

Each reference shares no code with the implementation: NumPy transcriptions of the papers'
formulas and algorithms (on the gradient matrix J itself, not its Gram matrix, wherever the
paper works on J), closed forms (two-task MGDA, IMTL-G), scipy's solvers for the QPs in the
parameter space, and the defining properties (MGDA: the min-norm point of the hull; UPGrad /
DualProj: <g_i, d> >= 0; Nash-MTL: G α = 1/α). Float64 throughout (the `x64` fixture), on
small matrices. The multi-device checks (parameters sharded over 4 faked devices, the Gram
matrix psum'd) run in one subprocess at the end.
"""

from __future__ import annotations

import functools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import metagrad as mg
from tests.conformance_methods import FAST_COMPILE
from tests.helpers import run_on_four_devices

pytestmark = pytest.mark.usefixtures("x64")


def _matrix(seed, tasks=4, dim=7, conflict=True):
    rng = np.random.default_rng(seed)
    j = rng.normal(size=(tasks, dim))
    if conflict:
        j[1] = -0.7 * j[0] + 0.3 * j[1]  # tasks 0 and 1 conflict
    return j


def _tree(j):
    """J split into a two-leaf pytree (the Gram path must sum over leaves)."""
    return {"a": jnp.asarray(j[:, :3]), "b": jnp.asarray(j[:, 3:]).reshape(j.shape[0], -1, 1)}


def _flat(out):
    return np.concatenate([np.asarray(out["a"]).ravel(), np.asarray(out["b"]).ravel()])


@functools.cache
def _compiled(name, kwargs):
    tx = getattr(mg, name)(**dict(kwargs))
    return tx, jax.jit(tx.update, compiler_options=FAST_COMPILE)


def _run(name, j, state=None, **kwargs):
    """mg.<name>(**kwargs) applied to J (as a two-leaf tree); jitted once per method."""
    kwargs = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
    tx, update = _compiled(name, kwargs)
    tree = _tree(j)
    params = jax.tree.map(lambda x: x[0], tree)
    state = tx.init(params) if state is None else state
    out, state = update(tree, state, params)
    return _flat(out), state


SEEDS = [0, 1, 2]


# -- MGDA ----------------------------------------------------------------------------------------


def _min_norm_scipy(j):
    g = j @ j.T
    t = len(j)
    res = optimize.minimize(
        lambda a: a @ g @ a, np.full(t, 1 / t), jac=lambda a: 2 * g @ a, method="SLSQP",
        bounds=[(0, 1)] * t, constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1}],
        options={"ftol": 1e-16, "maxiter": 1000},
    )  # fmt: skip
    return res.x @ j


@pytest.mark.parametrize("solver", ["fista", "frank_wolfe"])
@pytest.mark.parametrize("seed", SEEDS)
def test_mgda_two_tasks_closed_form(solver, seed):
    j = _matrix(seed, tasks=2)
    g1, g2 = j
    # Sener & Koltun, Algorithm 1: the min-norm point of the segment [g1, g2].
    a = np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0, 1)
    d, _ = _run("mgda", j, solver=solver)
    np.testing.assert_allclose(d, a * g1 + (1 - a) * g2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_mgda_is_the_min_norm_point_of_the_hull(seed):
    j = _matrix(seed)
    d, _ = _run("mgda", j)
    ref = _min_norm_scipy(j)
    np.testing.assert_allclose(d, ref, atol=1e-6 * np.abs(j).max())
    # First-order optimality of the min-norm point: <g_i, d> >= ||d||^2 for every task.
    assert np.all(j @ d >= d @ d - 1e-8)


def test_mgda_frank_wolfe_is_the_papers_algorithm_2():
    j = _matrix(3)
    g = j @ j.T
    # Algorithm 2 (as TorchJD's MGDAWeighting), transcribed.
    alpha = np.full(4, 1 / 4)
    for _ in range(100):
        t = np.argmin(g @ alpha)
        e = np.eye(4)[t]
        a, b, c = alpha @ g @ e, alpha @ g @ alpha, e @ g @ e
        gamma = 1.0 if c <= a else (0.0 if b <= a else (b - a) / (b + c - 2 * a))
        alpha = (1 - gamma) * alpha + gamma * e
        if gamma < 1e-3:
            break
    d, _ = _run("mgda", j, solver="frank_wolfe")
    np.testing.assert_allclose(d, alpha @ j, rtol=1e-10, atol=1e-12)


def test_mgda_is_zero_at_a_pareto_stationary_point():
    j = _matrix(4, tasks=2)
    j[1] = -2.0 * j[0]  # 0 is in the hull
    d, _ = _run("mgda", j)
    assert np.abs(d).max() < 1e-8 * np.abs(j).max()


# -- CAGrad --------------------------------------------------------------------------------------


def _cagrad_reference(j, c):
    """The official CAGrad algorithm (scipy on the dual, unnormalised), transcribed."""
    t = len(j)
    gg = j @ j.T
    g0 = j.mean(0)
    g0_norm = np.linalg.norm(g0)
    phi = c * g0_norm

    def dual(w):
        gw = w @ j
        return gw @ g0 + phi * np.sqrt(gw @ gw)

    best = None
    for start in (np.full(t, 1 / t), *np.eye(t) * 0.9 + 0.1 / t):
        res = optimize.minimize(
            dual, start, method="SLSQP", bounds=[(0, 1)] * t,
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
            options={"ftol": 1e-15, "maxiter": 2000},
        )  # fmt: skip
        best = res if best is None or res.fun < best.fun else best
    gw = best.x @ j
    del gg
    return g0 + phi / np.linalg.norm(gw) * gw


@pytest.mark.parametrize("c", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("seed", SEEDS)
def test_cagrad_matches_official_algorithm(c, seed):
    j = _matrix(seed)
    d, _ = _run("cagrad", j, c=c)
    ref = _cagrad_reference(j, c)
    np.testing.assert_allclose(d, ref, atol=2e-5 * np.abs(ref).max())
    # The primal: d is on the ball ||d - g0|| = c ||g0||.
    g0 = j.mean(0)
    np.testing.assert_allclose(np.linalg.norm(d - g0), c * np.linalg.norm(g0), rtol=1e-6)


def test_cagrad_rescale_options():
    j = _matrix(5)
    base, _ = _run("cagrad", j, c=0.5)
    sq, _ = _run("cagrad", j, c=0.5, rescale="c_squared")
    lin, _ = _run("cagrad", j, c=0.5, rescale="c")
    np.testing.assert_allclose(sq, base / 1.25, rtol=1e-10)
    np.testing.assert_allclose(lin, base / 1.5, rtol=1e-10)


def test_cagrad_raises_the_worst_task_above_the_mean():
    j = _matrix(6)
    d, _ = _run("cagrad", j, c=0.5)
    g0 = j.mean(0)
    assert np.min(j @ d) > np.min(j @ g0)


# -- Nash-MTL ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_nash_mtl_bargaining_first_order_conditions(seed):
    j = _matrix(seed)
    d, state = _run("nash_mtl", j, num_tasks=4, max_norm=0.0, reg_eps=0.0)
    g = j @ j.T
    gn = g / np.linalg.norm(g)
    alpha = np.asarray(state.alpha)
    assert np.all(alpha > 0)
    np.testing.assert_allclose(gn @ alpha, 1 / alpha, rtol=1e-9)
    np.testing.assert_allclose(d, alpha @ j, rtol=1e-9)
    # Each task's directional derivative along d is 1/α_i (times the normalisation).
    np.testing.assert_allclose(j @ d, np.linalg.norm(g) / alpha, rtol=1e-7)
    # The same point minimises the convex ½ αᵀĜα − Σ log α (scipy, from elsewhere).
    res = optimize.minimize(
        lambda a: 0.5 * a @ gn @ a - np.log(a).sum(), np.full(4, 3.0),
        jac=lambda a: gn @ a - 1 / a, bounds=[(1e-9, None)] * 4, method="L-BFGS-B",
        options={"ftol": 1e-16, "gtol": 1e-12},
    )  # fmt: skip
    np.testing.assert_allclose(alpha, res.x, rtol=1e-5)


def test_nash_mtl_max_norm_and_update_every():
    j = _matrix(7)
    nash = dict(num_tasks=4, max_norm=0.5, update_weights_every=2, reg_eps=0.0)
    d, state = _run("nash_mtl", j, **nash)
    np.testing.assert_allclose(np.linalg.norm(d), 0.5, rtol=1e-9)
    unclipped, _ = _run("nash_mtl", j, num_tasks=4, max_norm=0.0, reg_eps=0.0)
    np.testing.assert_allclose(d, unclipped * 0.5 / np.linalg.norm(unclipped), rtol=1e-8)
    # Second call (count 1): the weights of the first call, on new gradients.
    j2 = _matrix(8)
    d2, state2 = _run("nash_mtl", j2, state, **nash)
    alpha = np.asarray(state.alpha)
    ref = alpha @ j2
    ref = ref * min(1.0, 0.5 / np.linalg.norm(ref))
    np.testing.assert_allclose(d2, ref, rtol=1e-9)
    np.testing.assert_array_equal(np.asarray(state2.alpha), alpha)
    assert int(state2.count) == 2


# -- IMTL-G --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tasks", [2, 4])
def test_imtl_g_matches_papers_closed_form(tasks):
    j = _matrix(tasks, tasks=tasks)
    u = j / np.linalg.norm(j, axis=1, keepdims=True)
    # Liu et al. (2021), Eq. 6-7: alpha_{2:T} = g_1 U^T (D U^T)^{-1}, rows U_i = u_1 - u_i,
    # D_i = g_1 - g_i; alpha_1 = 1 - sum(alpha_{2:T}).
    big_u = u[0] - u[1:]
    big_d = j[0] - j[1:]
    rest = j[0] @ big_u.T @ np.linalg.inv(big_d @ big_u.T)
    alpha = np.concatenate([[1 - rest.sum()], rest])
    d, _ = _run("imtl_g", j)
    np.testing.assert_allclose(d, alpha @ j, rtol=1e-8, atol=1e-12)
    proj = u @ d  # equal projections on every unit gradient
    np.testing.assert_allclose(proj, proj[0], rtol=1e-8)


# -- Aligned-MTL ---------------------------------------------------------------------------------


def _aligned_reference(j, scale_mode, weights):
    # On J's SVD, J = U S V^T: the aligned matrix is sqrt(sigma) U V^T (orthogonal rows of
    # equal norms), sigma from the squared singular values (the Gram's eigenvalues).
    u, s, vt = np.linalg.svd(j, full_matrices=False)
    lam = s**2
    keep = lam > lam.max() * len(j) * np.finfo(np.float32).eps
    lam, u, vt = lam[keep], u[:, keep], vt[keep]
    sigma = {"min": lam.min(), "median": np.sort(lam)[(len(lam) - 1) // 2],
             "rmse": lam.mean()}[scale_mode]  # fmt: skip
    aligned = np.sqrt(sigma) * u @ vt
    return weights @ aligned


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_aligned_mtl_matches_svd_reference(scale_mode, reduction):
    j = _matrix(9)
    w = np.full(4, 0.25 if reduction == "mean" else 1.0)
    d, _ = _run("aligned_mtl", j, scale_mode=scale_mode, reduction=reduction)
    np.testing.assert_allclose(d, _aligned_reference(j, scale_mode, w), rtol=1e-8, atol=1e-12)


def test_aligned_mtl_rank_deficient():
    j = _matrix(10)
    j[3] = j[0] + 2 * j[2]  # rank 3
    d, _ = _run("aligned_mtl", j)
    np.testing.assert_allclose(d, _aligned_reference(j, "min", np.full(4, 0.25)), atol=1e-8)


# -- UPGrad / DualProj ---------------------------------------------------------------------------


def _project_dual_cone_scipy(j, x):
    """argmin ||y - x|| subject to J y >= 0, in the parameter space (SLSQP)."""
    res = optimize.minimize(
        lambda y: 0.5 * (y - x) @ (y - x), x, jac=lambda y: y - x, method="SLSQP",
        constraints=[{"type": "ineq", "fun": lambda y: j @ y, "jac": lambda y: j}],
        options={"ftol": 1e-15, "maxiter": 1000},
    )  # fmt: skip
    return res.x


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_upgrad_is_the_mean_of_the_projections(seed, reduction):
    j = _matrix(seed)
    d, _ = _run("upgrad", j, reg_eps=0.0, reduction=reduction)
    projections = np.stack([_project_dual_cone_scipy(j, g) for g in j])
    ref = projections.mean(0) if reduction == "mean" else projections.sum(0)
    np.testing.assert_allclose(d, ref, atol=1e-7 * np.abs(j).max())
    assert np.all(j @ d >= -1e-10)  # the defining property: no task conflicts with d


@pytest.mark.parametrize("seed", SEEDS)
def test_dualproj_is_the_projected_mean(seed):
    j = _matrix(seed)
    d, _ = _run("dualproj", j, reg_eps=0.0)
    np.testing.assert_allclose(d, _project_dual_cone_scipy(j, j.mean(0)), atol=1e-7)
    assert np.all(j @ d >= -1e-10)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone_default_regularisation(name):
    # TorchJD's defaults (reg 1e-4 on the trace-normalised Gram): conflicts only up to it.
    j = _matrix(11)
    d, _ = _run(name, j)
    assert np.all(j @ d >= -1e-4 * np.trace(j @ j.T) * np.abs(d).max())
    # Without conflicts both are the plain mean.
    k = np.abs(_matrix(12, conflict=False))
    d, _ = _run(name, k)
    np.testing.assert_allclose(d, k.mean(0), rtol=1e-12)


# -- ConFIG --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tasks", [2, 4])
def test_config_matches_paper_formula(tasks):
    j = _matrix(tasks + 20, tasks=tasks, dim=7)
    units = j / np.linalg.norm(j, axis=1, keepdims=True)
    v = np.linalg.pinv(units) @ np.ones(tasks)  # Liu et al. (2024), Eq. 2
    v = v / np.linalg.norm(v)
    ref = (j @ v).sum() * v
    d, _ = _run("config", j)
    np.testing.assert_allclose(d, ref, rtol=1e-9, atol=1e-12)
    cos = units @ d / np.linalg.norm(d)
    np.testing.assert_allclose(cos, cos[0], rtol=1e-9)
    assert np.all(cos > 0)


# -- GradDrop ------------------------------------------------------------------------------------


def test_graddrop_matches_algorithm_with_the_same_draws():
    j = _matrix(30)
    d, state = _run("graddrop", j, seed=5, leak=[0.0, 0.5, 0.2, 1.0])
    # The draws: the state's key split, folded with each leaf's index (documented).
    _, sub = jax.random.split(jax.random.PRNGKey(5))
    leak = np.array([0.0, 0.5, 0.2, 1.0])
    ref = []
    for n, (lo, hi) in enumerate([(0, 3), (3, 7)]):
        g = j[:, lo:hi]
        u = np.asarray(jax.random.uniform(jax.random.fold_in(sub, n), (hi - lo,), jnp.float32))
        p = 0.5 * (1 + g.sum(0) / np.abs(g).sum(0))  # Chen et al., Algorithm 1
        mask = (p > u) * (g > 0) + (p < u) * (g < 0)
        ref.append(((leak[:, None] + (1 - leak[:, None]) * mask) * g).sum(0))
    np.testing.assert_allclose(d, np.concatenate(ref), rtol=1e-12)
    assert int(state.count) == 1


def test_graddrop_keeps_one_sign_with_probability_purity():
    g = jnp.array([[1.0, 2.0, -1.0], [3.0, -1.0, -2.0]])
    tx = mg.graddrop(seed=0)
    step = jax.jit(tx.update, compiler_options=FAST_COMPILE)
    state = tx.init(jnp.zeros(3))
    outs = []
    for _ in range(400):
        out, state = step(g, state)
        outs.append(np.asarray(out))
    outs = np.stack(outs)
    np.testing.assert_array_equal(outs[:, 0], 4.0)  # all positive: kept whole
    np.testing.assert_array_equal(outs[:, 2], -3.0)
    assert set(np.unique(outs[:, 1])) == {2.0, -1.0}  # one sign's entries
    # P(keep positive) = purity = (1 + 1/3) / 2 = 2/3; 400 draws: s.e. 0.024.
    assert abs(np.mean(outs[:, 1] == 2.0) - 2 / 3) < 0.1
    plain, _ = mg.graddrop(leak=1.0).update(g, mg.graddrop().init(jnp.zeros(3)))
    np.testing.assert_allclose(plain, g.sum(0))


# -- The Gram path: shared behaviour -------------------------------------------------------------

GRAM_PATH = {
    "mgda": ("mgda", {}),
    "mgda_fw": ("mgda", {"solver": "frank_wolfe"}),
    "cagrad": ("cagrad", {"c": 0.5}),
    "nash_mtl": ("nash_mtl", {"num_tasks": 4, "max_norm": 0.0, "reg_eps": 0.0}),
    "imtl_g": ("imtl_g", {}),
    "aligned_mtl": ("aligned_mtl", {}),
    "upgrad": ("upgrad", {}),
    "dualproj": ("dualproj", {}),
    "config": ("config", {}),
}


def test_gram_path_methods_see_gradients_only_through_the_gram_matrix():
    # Rotating every task gradient by the same orthogonal map Q keeps G, so the output
    # rotates with it: d(JQ) = d(J) Q. (Graddrop is coordinate-wise and does not.)
    j = _matrix(40)
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(7, 7)))
    for name, (method, kwargs) in GRAM_PATH.items():
        d, _ = _run(method, j, **kwargs)
        dq, _ = _run(method, j @ q, **kwargs)
        np.testing.assert_allclose(dq, d @ q, atol=1e-7 * np.abs(d).max(), err_msg=name)


def test_non_finite_input_keeps_state():
    j = _matrix(41)
    j[1, 2] = np.nan
    for name, kwargs in (GRAM_PATH["nash_mtl"], ("graddrop", {"seed": 1})):
        state0 = getattr(mg, name)(**kwargs).init(jax.tree.map(lambda x: x[0], _tree(j)))
        out, state = _run(name, j, state0, **kwargs)
        assert not np.all(np.isfinite(out))
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state0), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- Bad input -----------------------------------------------------------------------------------

_G = jnp.ones((2, 4))
BAD = [
    ("mgda/solver", lambda: mg.mgda(solver="qp"), ValueError, r"solver must be one of"),
    ("mgda/max_iters", lambda: mg.mgda(max_iters=0), ValueError, r"max_iters must be"),
    ("mgda/tol", lambda: mg.mgda(tol=-1.0), ValueError, r"tol must be >= 0"),
    ("cagrad/c", lambda: mg.cagrad(c=-0.5), ValueError, r"c must be >= 0"),
    ("cagrad/c-nan", lambda: mg.cagrad(c=float("nan")), ValueError, r"c must be finite"),
    ("cagrad/rescale", lambda: mg.cagrad(rescale=1), ValueError, r"rescale must be one of"),
    ("nash_mtl/num_tasks", lambda: mg.nash_mtl(0), ValueError, r"num_tasks must be"),
    ("nash_mtl/num_tasks-array", lambda: mg.nash_mtl(jnp.array(3)), TypeError,
     r"num_tasks must be an integer >= 1, got an array.*must be a Python int"),
    ("nash_mtl/max_norm", lambda: mg.nash_mtl(2, max_norm=-1.0), ValueError,
     r"max_norm must be >= 0"),
    ("nash_mtl/update_weights_every", lambda: mg.nash_mtl(2, update_weights_every=0),
     ValueError, r"update_weights_every must be"),
    ("nash_mtl/tasks-mismatch", lambda: mg.nash_mtl(3).update(_G, mg.nash_mtl(3).init(_G[0])),
     ValueError, r"updates have 2 tasks on their leading task axis but num_tasks=3"),
    ("imtl_g/eps", lambda: mg.imtl_g(eps=-1.0), ValueError, r"eps must be >= 0"),
    ("aligned_mtl/scale_mode", lambda: mg.aligned_mtl(scale_mode="max"), ValueError,
     r"scale_mode must be one of \('min', 'median', 'rmse'\)"),
    ("aligned_mtl/reduction", lambda: mg.aligned_mtl(reduction="max"), ValueError,
     r"reduction must be one of"),
    ("upgrad/reg_eps", lambda: mg.upgrad(reg_eps=-1e-4), ValueError, r"reg_eps must be >= 0"),
    ("upgrad/norm_eps", lambda: mg.upgrad(norm_eps="a"), TypeError, r"norm_eps must be a number"),
    ("dualproj/reduction", lambda: mg.dualproj(reduction="none"), ValueError,
     r"reduction must be one of"),
    ("config/no-task-axis", lambda: mg.config().update(jnp.ones(()), mg.config().init(1.0)),
     ValueError, r"updates must be per-task gradients stacked on a leading task axis"),
    ("upgrad/combined-gradient", lambda: mg.upgrad().update(_G[0], mg.upgrad().init(_G[0]),
                                                            _G[0]),
     ValueError, r"without the leading task axis"),
    ("graddrop/seed", lambda: mg.graddrop(seed="a"), TypeError, r"seed must be an int"),
    ("graddrop/leak", lambda: mg.graddrop(leak=1.5), ValueError, r"leak must be in \[0, 1\]"),
    ("graddrop/leak-list", lambda: mg.graddrop(leak=[0.1, -1.0]), ValueError,
     r"leak must be in \[0, 1\]"),
    ("graddrop/leak-tasks", lambda: mg.graddrop(leak=[0.1, 0.2, 0.3]).update(
        _G, mg.graddrop().init(_G[0])), ValueError, r"leak has 3 values but the updates have 2"),
]  # fmt: skip


@pytest.mark.parametrize("call, error, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# -- Multi-device: parameters sharded over 4 devices, the Gram matrix psum'd ------------------

SCRIPT = textwrap.dedent(
    """
    import json
    import os

    # Many small programs: XLA's backend optimisations cost more than they save here.
    os.environ["XLA_FLAGS"] += (
        " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import PartitionSpec as P

    import metagrad as mg

    jax.config.update("jax_enable_x64", True)
    N_DEV, T = 4, 3
    assert jax.device_count() == N_DEV, jax.devices()
    mesh = jax.make_mesh((N_DEV,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    PMAP_CHECKED = ("mgda", "nash_mtl", "upgrad")
    FACTORIES = {
        "mgda": lambda a: mg.mgda(axis_name=a),
        "mgda_fw": lambda a: mg.mgda(solver="frank_wolfe", axis_name=a),
        "cagrad": lambda a: mg.cagrad(c=0.4, axis_name=a),
        "nash_mtl": lambda a: mg.nash_mtl(T, max_norm=0.5, axis_name=a),
        "imtl_g": lambda a: mg.imtl_g(axis_name=a),
        "aligned_mtl": lambda a: mg.aligned_mtl(axis_name=a),
        "upgrad": lambda a: mg.upgrad(axis_name=a),
        "dualproj": lambda a: mg.dualproj(axis_name=a),
        "config": lambda a: mg.config(axis_name=a),
    }
    rng = np.random.default_rng(0)
    # Two steps of per-task gradients; every leaf's axis 1 (the parameters') is sharded.
    steps = [{"w": jnp.asarray(rng.normal(size=(T, 8, 3))),
              "b": jnp.asarray(rng.normal(size=(T, 4)))} for _ in range(2)]
    params = jax.tree.map(lambda x: x[0], steps[0])
    spec = {"w": P(None, "d"), "b": P(None, "d")}
    pspec = {"w": P("d"), "b": P("d")}
    results = {}
    for name, factory in FACTORIES.items():
        single, sharded = factory(None), factory("d")

        def run(tx, grads_list, params):
            state = tx.init(params)
            outs = []
            for g in grads_list:
                out, state = tx.update(g, state, params)
                outs.append(out)
            return outs, state

        ref, ref_state = jax.jit(lambda gl, p: run(single, gl, p))(steps, params)
        # pmap is checked for three (its code path is shard_map's; pmap is the older API).
        for mode in ("shard_map", "pmap") if name in PMAP_CHECKED else ("shard_map",):
            if mode == "shard_map":
                fn = jax.jit(jax.shard_map(
                    lambda gl, p: run(sharded, gl, p), mesh=mesh,
                    in_specs=([spec, spec], pspec), out_specs=([pspec, pspec], P()),
                ))
                outs, state = fn(steps, params)
            else:
                split = lambda x, a: jnp.moveaxis(
                    x.reshape(*x.shape[:a], N_DEV, x.shape[a] // N_DEV, *x.shape[a + 1:]), a, 0)
                gl = [jax.tree.map(lambda x: split(x, 1), g) for g in steps]
                p = jax.tree.map(lambda x: split(x, 0), params)
                o, s = jax.pmap(lambda gl, p: run(sharded, gl, p), "d")(gl, p)
                merge = lambda x: jnp.moveaxis(x, 0, 0).reshape(-1, *x.shape[2:])
                outs = [jax.tree.map(merge, oo) for oo in o]
                state = jax.tree.map(lambda x: x[0], s)
            diff = max(
                float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves((outs, state)), jax.tree.leaves((ref, ref_state)))
            )
            results[f"{name}/{mode}"] = diff
    print("RESULT " + json.dumps(results))
    """
)


PMAP_CHECKED = ("mgda", "nash_mtl", "upgrad")


@pytest.fixture(scope="module")
def multidevice():
    return run_on_four_devices(["-c", SCRIPT])


def test_sharded_parameters_match_one_device(multidevice):
    expected = {f"{n}/shard_map" for n in GRAM_PATH} | {f"{n}/pmap" for n in PMAP_CHECKED}
    assert set(multidevice) == expected
    bad = {k: v for k, v in multidevice.items() if not v < 1e-10}
    assert not bad, bad
