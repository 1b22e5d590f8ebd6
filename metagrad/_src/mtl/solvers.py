"""Small jittable solvers on a T x T Gram matrix, for the Jacobian aggregators.

Every solver here works in the T-dimensional space of task weights, with a fixed bound on its
iterations (`jax.lax.while_loop` with a counter), so it traces once, runs under `jit`, `vmap`,
`shard_map`, and cannot loop forever on non-finite input.

- `frank_wolfe_min_norm`: the minimum-norm point of the convex hull of the task gradients,
  Algorithm 2 of Sener & Koltun (2018), line search in closed form (MGDA).
- `simplex_minimize`: FISTA with backtracking and the Euclidean projection onto the simplex,
  for a smooth convex objective of the weights (MGDA, CAGrad's dual), and `polish_on_support`,
  Newton steps on the face of the simplex FISTA found, which make the result exact.
- `nonneg_qp`: min ½ zᵀGz + cᵀz subject to z >= 0 by a primal active-set method (the QP
  analogue of Lawson & Hanson's NNLS), exact up to round-off in finitely many steps; the
  projections onto the dual cone of UPGrad and DualProj.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from metagrad._src.mtl.base import EXACT


def _mv(a: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.matmul(a, x, precision=EXACT)


# ---------------------------------------------------------------------------------------------
# MGDA: Frank-Wolfe.


def frank_wolfe_min_norm(gram: jax.Array, max_iters: int, tol) -> jax.Array:
    """Convex weights α (α >= 0, Σα = 1) minimising αᵀGα, by Frank-Wolfe.

    Starts at the uniform weights; each step moves toward the vertex e_t with the smallest
    (Gα)_t by the exact line search on the segment, and stops after a step γ < `tol` (that
    step included) or `max_iters` steps, as Algorithm 2 of Sener & Koltun (2018).
    """
    num = gram.shape[0]
    eye = jnp.eye(num, dtype=gram.dtype)

    def cond(carry):
        _, it, gamma = carry
        return (it < max_iters) & (gamma >= tol)

    def body(carry):
        alpha, it, _ = carry
        g_alpha = _mv(gram, alpha)
        t = jnp.argmin(g_alpha)
        a = g_alpha[t]  # <d, g_t>
        b = jnp.dot(alpha, g_alpha, precision=EXACT)  # ||d||^2
        c = gram[t, t]  # ||g_t||^2
        # Minimiser over γ in [0, 1] of ||(1-γ) d + γ g_t||^2.
        denom = b + c - 2 * a
        gamma = jnp.where(
            c <= a, 1.0, jnp.where(b <= a, 0.0, (b - a) / jnp.where(denom > 0, denom, 1.0))
        )
        gamma = gamma.astype(gram.dtype)
        return (1 - gamma) * alpha + gamma * eye[t], it + 1, gamma

    alpha0 = jnp.full((num,), 1.0 / num, gram.dtype)
    inf = jnp.asarray(jnp.inf, gram.dtype)
    alpha, _, _ = jax.lax.while_loop(cond, body, (alpha0, jnp.zeros([], jnp.int32), inf))
    return alpha


# ---------------------------------------------------------------------------------------------
# Smooth convex objectives on the simplex: FISTA.


def project_simplex(v: jax.Array) -> jax.Array:
    """Euclidean projection onto {w >= 0, Σw = 1} (sort-based, Held et al. 1974)."""
    num = v.shape[0]
    u = jnp.sort(v)[::-1]
    css = jnp.cumsum(u) - 1.0
    ks = jnp.arange(1, num + 1, dtype=v.dtype)
    rho = jnp.sum(u - css / ks > 0)
    theta = css[rho - 1] / rho.astype(v.dtype)
    return jnp.maximum(v - theta, 0.0)


def simplex_minimize(
    f: Callable[[jax.Array], jax.Array], w0: jax.Array, max_iters: int
) -> jax.Array:
    """argmin of a smooth convex `f` over the simplex: FISTA with backtracking (Beck & Teboulle).

    `max_iters` accelerated projected-gradient steps; the step size 1/L starts at 1 and L is
    doubled until the quadratic upper bound holds (at most 40 doublings per step).
    """
    value_and_grad = jax.value_and_grad(f)

    def step(_, carry):
        x, y, t, lips = carry
        fy, gy = value_and_grad(y)

        def bound_fails(c):
            lips_, x_new, k = c
            d = x_new - y
            upper = fy + jnp.dot(gy, d) + 0.5 * lips_ * jnp.dot(d, d)
            # Slack for round-off in f (else, near the minimum in float32, L would blow up).
            slack = 10 * jnp.finfo(fy.dtype).eps * jnp.abs(fy)
            return (f(x_new) > upper + slack) & (k < 40)

        def grow(c):
            lips_, _, k = c
            lips_ = 2 * lips_
            return lips_, project_simplex(y - gy / lips_), k + 1

        lips, x_new, _ = jax.lax.while_loop(
            bound_fails, grow, (lips, project_simplex(y - gy / lips), jnp.zeros([], jnp.int32))
        )
        t_new = 0.5 * (1 + jnp.sqrt(1 + 4 * t * t))
        y = x_new + ((t - 1) / t_new) * (x_new - x)
        return x_new, y, t_new, lips

    one = jnp.ones([], w0.dtype)
    x, _, _, _ = jax.lax.fori_loop(0, max_iters, step, (w0, w0, one, one))
    return x


def polish_on_support(
    f: Callable[[jax.Array], jax.Array], w: jax.Array, steps: int = 4
) -> jax.Array:
    """Newton steps for a smooth convex `f` on the face of the simplex where `w` lives.

    FISTA's iterates have exact zeros (the projection makes them), so once it has found the
    support S of the minimiser, what is left is an equality-constrained problem on S: each step
    solves the KKT system [H_SS 1; 1ᵀ 0] [Δ; ν] = [−∇f_S; 0] (H the Hessian). For a quadratic
    (MGDA) one step is exact. The result is kept when it is finite, in the simplex and no
    worse than `w` (so a wrong support costs nothing); otherwise `w` is returned.
    """
    num = w.shape[0]
    # The support; weights within round-off of 0 are taken as 0.
    free = w > 10 * jnp.finfo(w.dtype).eps * jnp.max(w)
    eye = jnp.eye(num, dtype=w.dtype)
    ones = free.astype(w.dtype)

    def newton(_, x):
        grad, hess = jax.grad(f)(x), jax.hessian(f)(x)
        kkt = jnp.zeros((num + 1, num + 1), w.dtype)
        kkt = kkt.at[:num, :num].set(jnp.where(free[:, None] & free[None, :], hess, eye))
        kkt = kkt.at[:num, num].set(ones).at[num, :num].set(ones)
        rhs = jnp.concatenate([jnp.where(free, -grad, 0.0), jnp.zeros((1,), w.dtype)])
        step = jnp.linalg.solve(kkt, rhs)[:num]
        return x + jnp.where(free, step, 0.0)

    new = jax.lax.fori_loop(0, steps, newton, w)
    new = jnp.where(free, new, 0.0)
    new = new / jnp.sum(new)  # round-off on the sum
    slack = 10 * jnp.finfo(w.dtype).eps * jnp.abs(f(w))
    ok = jnp.all(jnp.isfinite(new)) & jnp.all(new >= 0) & (f(new) <= f(w) + slack)
    return jnp.where(ok, new, w)


# ---------------------------------------------------------------------------------------------
# Non-negative QP: active set.


def nonneg_qp(gram: jax.Array, lin: jax.Array) -> jax.Array:
    """argmin over z >= 0 of ½ zᵀGz + linᵀz, G positive definite, by a primal active-set method.

    The free set P starts empty (z = 0). Each major step adds the coordinate with the most
    negative gradient (Gz + lin)_j outside P; the minor steps solve the equality-constrained
    problem on P and, when that leaves the orthant, move to its boundary and drop the
    coordinates that reach 0. It stops when no coordinate outside P has a negative gradient
    (the KKT conditions), or after 3T + 10 major steps.
    """
    num = gram.shape[0]
    eye = jnp.eye(num, dtype=gram.dtype)
    tol = 100 * jnp.finfo(gram.dtype).eps * jnp.maximum(1.0, jnp.max(jnp.abs(gram)))
    inf = jnp.asarray(jnp.inf, gram.dtype)

    def solve_on(free):
        a = jnp.where(free[:, None] & free[None, :], gram, eye)
        s = jnp.linalg.solve(a, jnp.where(free, -lin, 0.0))
        return jnp.where(free, s, 0.0)

    def minor_cond(c):
        _, _, k, done = c
        return (~done) & (k <= num)

    def minor(c):
        z, free, k, _ = c
        s = solve_on(free)
        blocked = free & (s <= tol)
        feasible = ~jnp.any(blocked)
        ratios = jnp.where(blocked, z / jnp.where(blocked, z - s, 1.0), inf)
        i = jnp.argmin(ratios)
        step = jnp.clip(ratios[i], 0.0, 1.0)
        z_step = z + step * (s - z)
        keep = free & (z_step > tol)
        keep = keep.at[i].set(False)
        z_new = jnp.where(feasible, s, jnp.where(keep, z_step, 0.0))
        free_new = jnp.where(feasible, free, keep)
        return z_new, free_new, k + 1, feasible

    def major_cond(c):
        _, _, it, stop = c
        return (~stop) & (it < 3 * num + 10)

    def major(c):
        z, free, it, _ = c
        descent = -(_mv(gram, z) + lin)
        candidates = jnp.where(free, -inf, descent)
        j = jnp.argmax(candidates)
        stop = ~(candidates[j] > tol)
        free = jnp.where(stop, free, free.at[j].set(True))
        zero = jnp.zeros([], jnp.int32)
        z, free, _, _ = jax.lax.while_loop(minor_cond, minor, (z, free, zero, stop))
        return z, free, it + 1, stop

    start = (
        jnp.zeros((num,), gram.dtype),
        jnp.zeros((num,), bool),
        jnp.zeros([], jnp.int32),
        jnp.zeros([], bool),
    )
    z, _, _, _ = jax.lax.while_loop(major_cond, major, start)
    return z
