"""Tests of metagrad/dotprod.py: Meta DotProd as an optax transformation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import metagrad as mg
from tests.test_hvp import _loss, neg, rel_err, tanh_problem


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0], np.float64)


def algorithm1(g1, grad_fn, params, alpha, weight):
    """Algorithm 1 of the paper, line by line, on flat float64 vectors."""
    theta, unravel = ravel_pytree(params)
    G1 = flat(g1)
    G2 = flat(grad_fn(params))
    theta1 = np.asarray(theta, np.float64) - alpha * G1
    G21 = flat(grad_fn(unravel(jnp.asarray(theta1, theta.dtype))))
    G1G2 = (G21 - G2) / alpha
    return G1 + G2 + weight * G1G2


def update(tx, g1, params, grad_fn, state=None):
    state = tx.init(params) if state is None else state
    return tx.update(g1, state, params, grad_fn=grad_fn)


def test_matches_algorithm1_paper_alpha(x64):
    params, g1, grad_fn = tanh_problem(jnp.float64)
    got, state = update(mg.dotprod(1e-7, weight=0.3), g1, params, grad_fn)
    want = algorithm1(g1, grad_fn, params, 1e-7, 0.3)
    np.testing.assert_allclose(flat(got), want, rtol=1e-9, atol=1e-12)
    assert state.count == 1 and state.count.dtype == jnp.int32


@pytest.mark.parametrize("scheme", ["forward", "central", "exact"])
def test_term_float64_paper_alpha_vs_exact_hvp(x64, scheme):
    # G1G2 = (G − Ḡ1 − Ḡ2)/weight against the oracle −H̄2·Ḡ1, with the paper's α.
    params, g1, grad_fn = tanh_problem(jnp.float64)
    g, _ = update(mg.dotprod(1e-7, weight=1.0, scheme=scheme), g1, params, grad_fn)
    term = flat(g) - flat(g1) - flat(grad_fn(params))
    exact = -flat(mg.hvp(grad_fn, params, g1))
    assert np.linalg.norm(term - exact) / np.linalg.norm(exact) <= 1e-5


@pytest.mark.parametrize("scheme, tol", [("forward", 5e-3), ("central", 5e-4), ("exact", 1e-5)])
def test_term_float32_auto_step(scheme, tol):
    params, g1, grad_fn = tanh_problem(jnp.float32)
    g, _ = update(mg.dotprod(weight=1.0, scheme=scheme), g1, params, grad_fn)
    g1_plus_g2 = jax.tree.map(jnp.add, g1, grad_fn(params))
    term = jax.tree.map(jnp.subtract, g, g1_plus_g2)
    assert rel_err(term, neg(mg.hvp(grad_fn, params, g1))) <= tol
    # ... and the update is exactly Ḡ1 + Ḡ2 + weight·fd_hvp along −Ḡ1.
    if scheme != "exact":
        fd = mg.fd_hvp(grad_fn, params, neg(g1), scheme=scheme)
        want = jax.tree.map(lambda s, t: s + 1.0 * t, g1_plus_g2, fd)
        np.testing.assert_allclose(flat(g), flat(want), rtol=1e-6, atol=1e-7)


def test_float32_paper_alpha_is_noise():
    params, g1, grad_fn = tanh_problem(jnp.float32)
    g, _ = update(mg.dotprod(1e-7, weight=1.0), g1, params, grad_fn)
    term = flat(g) - flat(jax.tree.map(jnp.add, g1, grad_fn(params)))
    exact = -flat(mg.hvp(grad_fn, params, g1))
    assert np.linalg.norm(term - exact) / np.linalg.norm(exact) > 0.1


@pytest.mark.parametrize("dtype, rtol", [(jnp.float64, 1e-10), (jnp.float32, 1e-4)])
@pytest.mark.parametrize("scheme", ["forward", "central", "exact"])
def test_quadratic_term_is_minus_a2_g1(x64, dtype, rtol, scheme):
    # On L2(θ) = ½ θᵀA₂θ + bᵀθ, G1G2 = −A₂·Ḡ1 for any α; α = 1 avoids cancellation.
    k = jax.random.split(jax.random.key(0), 4)
    m = jax.random.normal(k[0], (5, 5), dtype)
    a2 = m @ m.T
    b = jax.random.normal(k[1], (5,), dtype)
    grad_fn = jax.grad(lambda p: 0.5 * p @ a2 @ p + b @ p)
    params = jax.random.normal(k[2], (5,), dtype)
    g1 = jax.random.normal(k[3], (5,), dtype)
    g, _ = update(mg.dotprod(1.0, weight=1.0, scheme=scheme), g1, params, grad_fn)
    a2_64 = np.asarray(a2, np.float64)
    p64, g1_64 = np.asarray(params, np.float64), np.asarray(g1, np.float64)
    want = g1_64 + (a2_64 @ p64 + np.asarray(b, np.float64)) - a2_64 @ g1_64
    scale = np.abs(want).max()
    np.testing.assert_allclose(g, want, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("scheme", ["forward", "central", "exact"])
def test_weight_zero_is_exactly_the_sum(scheme):
    params, g1, grad_fn = tanh_problem(jnp.float32)
    g, _ = update(mg.dotprod(weight=0.0, scheme=scheme), g1, params, grad_fn)
    want = jax.tree.map(lambda a, b: a + b, g1, grad_fn(params))
    for got_leaf, want_leaf in zip(jax.tree.leaves(g), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(got_leaf, want_leaf)


class _Counter:
    """Counts evaluations at run time (not traces), through jax.debug.callback."""

    def __init__(self):
        self.n = 0

    def wrap(self, grad_fn):
        def counted(p):
            jax.debug.callback(self._inc)
            return grad_fn(p)

        return counted

    def _inc(self):
        self.n += 1


def paper_schedule(num_batches, n):
    """Section 6.3 read off the batch stream, by batch index: each block of n batches starts
    with one regularized pair (b_k, b_k+1); its other n - 2 batches are standard steps."""
    steps, k = [], 0
    while k < num_batches:
        if k % n == 0:
            steps.append((k, k + 1))
            k += 2
        else:
            steps.append((k,))
            k += 1
    return steps


@pytest.mark.parametrize(
    "scheme, n, injected",
    [("forward", 3, False), ("exact", 5, False), ("forward", 5, True)],
)
def test_every_n_counts_batches_as_the_paper(x64, scheme, n, injected):
    # Three periods of SGD training, the batches fed as DotProdState.regularizes says,
    # against a naive loop over the batches: pairs get Algorithm 1 (NumPy), the other
    # batches a plain gradient step. float64 and alpha = 1e-6 for tight FD agreement.
    alpha, weight, lr, periods = 1e-6, 0.5, 0.3, 3
    num_batches = periods * n
    params, _, _ = tanh_problem(jnp.float64, sizes=(4, 8, 1))
    keys = jax.random.split(jax.random.key(1), 2 * num_batches)
    batches = [
        (jax.random.normal(keys[2 * k], (8, 4), jnp.float64),
         jax.random.normal(keys[2 * k + 1], (8, 1), jnp.float64))
        for k in range(num_batches)
    ]  # fmt: skip
    grad = jax.jit(jax.grad(_loss))
    make = optax.inject_hyperparams(mg.dotprod) if injected else mg.dotprod
    tx = make(inner_alpha=alpha, weight=weight, every=n, scheme=scheme)
    counter = _Counter()
    step = jax.jit(
        lambda g, s, p, b2: tx.update(g, s, p, grad_fn=counter.wrap(lambda q: grad(q, b2)))
    )
    state = tx.init(params)
    dot_state = lambda s: s.inner_state if injected else s
    every = lambda s: s.hyperparams["every"] if injected else n

    got, p, stream = [], params, iter(range(num_batches))
    for k1 in stream:
        regularized = bool(dot_state(state).regularizes(every(state)))
        k2 = next(stream) if regularized else k1
        g, state = step(grad(p, batches[k1]), state, p, batches[k2])
        p = jax.tree.map(lambda x, u: x - lr * u, p, g)
        got.append(((k1, k2) if regularized else (k1,), flat(p)))

    want, theta = [], params
    for used in paper_schedule(num_batches, n):
        g1 = grad(theta, batches[used[0]])
        if len(used) == 2:
            G = algorithm1(g1, lambda q, b=batches[used[1]]: grad(q, b), theta, alpha, weight)
        else:
            G = flat(g1)
        theta = jax.tree.map(lambda x, u: x - lr * u, theta, ravel_pytree(theta)[1](jnp.asarray(G)))
        want.append((used, flat(theta)))

    assert [u for u, _ in got] == [u for u, _ in want]  # the same batches, step by step
    for (_, a), (_, b) in zip(got, want, strict=True):
        rtol = 1e-7 if scheme == "forward" else 1e-5  # "exact" vs the FD of the reference
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())
    calls, pairs = len(want), num_batches // n
    assert int(dot_state(state).count) == calls == periods * (n - 1)
    # grad_fn runs on the regularized calls only: twice ("forward": Ḡ2 and G21) or once
    # (the jvp of "exact"); the standard calls never evaluate it (lax.cond).
    assert counter.n == pairs * (2 if scheme == "forward" else 1)
    if scheme == "forward":  # n + 1 gradients per n batches, g1 included: overhead 1/n
        assert calls + counter.n == num_batches * (n + 1) // n


def test_every_under_vmap():
    # As documented: vmapped with a batched state, the count is batched and lax.cond
    # becomes a select (both branches run, results unchanged); with the state unbatched
    # the cond, and its saving, stay.
    params, g1 = {"w": jnp.array([0.5, -1.0, 2.0])}, {"w": jnp.array([0.2, 0.1, -0.3])}
    grad_fn = jax.grad(lambda p: jnp.sum(jnp.sin(p["w"]) * jnp.arange(1.0, 4.0)))
    tx = mg.dotprod(weight=0.5, every=3, scheme="exact")
    upd = jax.jit(lambda g, s: tx.update(g, s, params, grad_fn=grad_fn)[0])
    g1s = jax.tree.map(lambda x: jnp.stack([x, 2 * x, -x]), g1)  # three "seeds"
    counts = mg.DotProdState(count=jnp.array([0, 1, 2], jnp.int32))
    batched = jax.vmap(upd)
    got = batched(g1s, counts)
    for i in range(3):
        want = upd(jax.tree.map(lambda x, i=i: x[i], g1s), mg.DotProdState(counts.count[i]))
        np.testing.assert_allclose(flat(jax.tree.map(lambda x, i=i: x[i], got)), flat(want),
                                   rtol=1e-6)  # fmt: skip
    assert "cond[" not in str(jax.make_jaxpr(batched)(g1s, counts))
    shared = jax.vmap(upd, in_axes=(0, None))
    assert str(jax.make_jaxpr(shared)(g1s, mg.DotProdState(jnp.int32(1)))).count("cond[") == 1


@pytest.mark.parametrize("scheme", ["forward", "central", "exact"])
def test_preserves_dtype(scheme):
    params, g1, grad_fn = tanh_problem(jnp.bfloat16, sizes=(4, 8, 1))
    g, state = update(mg.dotprod(scheme=scheme), g1, params, grad_fn)
    assert [x.dtype for x in jax.tree.leaves(g)] == [x.dtype for x in jax.tree.leaves(params)]
    assert np.all(np.isfinite(flat(g)))


def test_chain_with_sgd():
    params, g1, grad_fn = tanh_problem(jnp.float32)
    lr = 0.05
    tx = optax.chain(mg.dotprod(weight=0.2), optax.sgd(lr))
    u, _ = update(tx, g1, params, grad_fn)
    g, _ = update(mg.dotprod(weight=0.2), g1, params, grad_fn)
    np.testing.assert_allclose(flat(u), -lr * flat(g), rtol=1e-6)


def test_chain_passes_other_extra_args():
    params, g1, grad_fn = tanh_problem(jnp.float32, sizes=(4, 8, 1))
    tx = optax.chain(mg.dotprod(), optax.adam(1e-3))
    state = tx.init(params)
    # Extra keyword arguments for other transformations of the chain are ignored.
    u, _ = tx.update(g1, state, params, grad_fn=grad_fn, value=jnp.array(1.0))
    assert jax.tree.structure(u) == jax.tree.structure(params)


def test_inject_hyperparams_scheduled_weight(x64):
    params, g1, grad_fn = tanh_problem(jnp.float64, sizes=(4, 8, 1))
    schedule = optax.linear_schedule(0.0, 1.0, transition_steps=4)
    tx = optax.inject_hyperparams(mg.dotprod)(inner_alpha=1e-3, weight=schedule, every=3)
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
    for i in range(5):
        g, state = step(g1, state, params)
        np.testing.assert_allclose(state.hyperparams["weight"], schedule(i), rtol=1e-6)
        ref = mg.dotprod(1e-3, weight=float(schedule(i)))
        if i % 2 == 0:  # every=3: a regularized call, then a standard one
            want, _ = update(ref, g1, params, grad_fn)
        else:
            want = g1
        np.testing.assert_allclose(flat(g), flat(want), rtol=1e-8, atol=1e-10)


def test_multisteps_accumulates_g1(x64):
    # Under optax.MultiSteps(k), the inner chain sees the mean of the k incoming
    # g1 and the grad_fn of the k-th call; dotprod's count advances once per k.
    params, g1, grad_fn = tanh_problem(jnp.float64, sizes=(4, 8, 1))
    _, g1b, grad_fn_b = tanh_problem(jnp.float64, seed=1, sizes=(4, 8, 1))
    tx = optax.MultiSteps(optax.chain(mg.dotprod(weight=0.3), optax.sgd(1.0)), every_k_schedule=2)
    state = tx.init(params)
    u, state = tx.update(g1, state, params, grad_fn=grad_fn)
    assert np.all(flat(u) == 0)
    u, state = tx.update(g1b, state, params, grad_fn=grad_fn_b)
    mean_g1 = jax.tree.map(lambda a, b: (a + b) / 2, g1, g1b)
    want, _ = update(mg.dotprod(weight=0.3), mean_g1, params, grad_fn_b)
    atol = 1e-7 * np.abs(flat(want)).max()  # FD round-off ~ sqrt(eps_float64)
    np.testing.assert_allclose(flat(u), -flat(want), rtol=1e-7, atol=atol)
    assert state.inner_opt_state[0].count == 1


def test_apply_if_finite_rejects_nonfinite_grad_fn():
    params, g1, grad_fn = tanh_problem(jnp.float32, sizes=(4, 8, 1))
    tx = optax.chain(mg.dotprod(), optax.apply_if_finite(optax.sgd(0.1), 3))
    state = tx.init(params)
    bad = lambda p: jax.tree.map(lambda g: g.at[0].set(jnp.nan), grad_fn(p))
    u, state = tx.update(g1, state, params, grad_fn=bad)
    assert np.all(flat(u) == 0)
    assert state[1].notfinite_count == 1
    u, state = tx.update(g1, state, params, grad_fn=grad_fn)
    assert np.all(np.isfinite(flat(u))) and np.any(flat(u) != 0)
    assert state[1].notfinite_count == 0


def test_jit_no_retrace_and_stable_state():
    params, _, _ = tanh_problem(jnp.float32, sizes=(4, 8, 1))
    tx = optax.chain(mg.dotprod(every=3), optax.adam(1e-2))
    traces = []
    loss = _loss

    @jax.jit
    def step(params, state, b1, b2):
        traces.append(1)
        g1 = jax.grad(loss)(params, b1)
        u, state = tx.update(g1, state, params, grad_fn=lambda p: jax.grad(loss)(p, b2))
        return optax.apply_updates(params, u), state

    state = tx.init(params)
    shapes = jax.tree.map(jnp.shape, state)
    key = jax.random.key(0)
    for _ in range(10):
        key, k1, k2 = jax.random.split(key, 3)
        b1 = (jax.random.normal(k1, (8, 4)), jax.random.normal(k1, (8, 1)))
        b2 = (jax.random.normal(k2, (8, 4)), jax.random.normal(k2, (8, 1)))
        params, state = step(params, state, b1, b2)
    assert len(traces) == 1
    assert jax.tree.map(jnp.shape, state) == shapes
    assert state[0].count == 10


README_SNIPPET = """
import jax, jax.numpy as jnp, optax
from flax import nnx
import metagrad as mg

class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 32, rngs=rngs)
        self.out = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))

def loss_fn(model, batch):
    x, y = batch
    return jnp.mean((model(x) - y) ** 2)

model = MLP(nnx.Rngs(0))
tx = optax.chain(mg.dotprod(weight=0.1), optax.adam(1e-2))
optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

@nnx.jit
def train_step(model, optimizer, b1, b2):
    loss, g1 = nnx.value_and_grad(loss_fn)(model, b1)  # gradient on batch b1
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def grad_fn(params):  # gradient on batch b2 at any params
        return jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), b2))(params)

    optimizer.update(model, g1, grad_fn=grad_fn)
    return loss

x = jax.random.normal(jax.random.key(1), (256, 4))
y = jnp.sin(x.sum(axis=1, keepdims=True))
batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
for step in range(100):
    b1, b2 = batches[(2 * step) % 8], batches[(2 * step + 1) % 8]
    loss = train_step(model, optimizer, b1, b2)
"""


def test_readme_nnx_snippet():
    namespace = {}
    exec(compile(README_SNIPPET, "README_SNIPPET", "exec"), namespace)
    x, y = namespace["x"], namespace["y"]
    model, loss_fn = namespace["model"], namespace["loss_fn"]
    initial = namespace["loss_fn"](namespace["MLP"](namespace["nnx"].Rngs(0)), (x, y))
    assert float(loss_fn(model, (x, y))) < 0.5 * float(initial)


def test_nnx_optimizer_matches_plain_pytrees():
    from flax import nnx

    class Linear(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(3, 4, rngs=rngs)
            self.b = nnx.Linear(4, 1, rngs=rngs)

        def __call__(self, x):
            return self.b(jnp.tanh(self.a(x)))

    def loss_fn(model, batch):
        x, y = batch
        return jnp.mean((model(x) - y) ** 2)

    key = jax.random.key(2)
    x, y = jax.random.normal(key, (16, 3)), jax.random.normal(key, (16, 1))
    b1, b2 = (x[:8], y[:8]), (x[8:], y[8:])
    model = Linear(nnx.Rngs(0))
    graphdef, params0, rest = nnx.split(model, nnx.Param, ...)
    pure0 = nnx.to_pure_dict(params0)
    tx = optax.chain(mg.dotprod(weight=0.5), optax.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def grad_on(params, batch):
        return jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch))(params)

    g1 = nnx.grad(loss_fn)(model, b1)
    optimizer.update(model, g1, grad_fn=lambda p: grad_on(p, b2))

    # The same step on plain dicts of arrays.
    def pure_grad(p, batch):
        state = nnx.state(nnx.merge(graphdef, params0, rest), nnx.Param)
        nnx.replace_by_pure_dict(state, p)
        return nnx.to_pure_dict(grad_on(state, batch))

    u, _ = update(tx, pure_grad(pure0, b1), pure0, lambda p: pure_grad(p, b2))
    want = optax.apply_updates(pure0, u)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np.testing.assert_allclose(flat(got), flat(want), rtol=1e-5, atol=1e-7)


def test_linen_train_state_style():
    from flax.training import train_state

    params, g1, grad_fn = tanh_problem(jnp.float32, sizes=(4, 8, 1))
    tx = optax.chain(mg.dotprod(weight=0.1), optax.adam(1e-2))
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
    # TrainState.apply_gradients does not forward extra arguments; call tx.update.
    updates, opt_state = state.tx.update(g1, state.opt_state, state.params, grad_fn=grad_fn)
    state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
    )
    u, _ = update(tx, g1, params, grad_fn)
    np.testing.assert_allclose(flat(state.params), flat(optax.apply_updates(params, u)))


def test_bad_arguments():
    for alpha in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="inner_alpha"):
            mg.dotprod(alpha)
    with pytest.raises(TypeError, match="inner_alpha"):
        mg.dotprod("1e-7")
    with pytest.raises(ValueError, match="every"):
        mg.dotprod(every=0)
    with pytest.raises(ValueError, match="every"):
        mg.dotprod(every=1)
    with pytest.raises(ValueError, match="every"):
        mg.DotProdState(count=jnp.int32(0)).regularizes(1)
    with pytest.raises(TypeError, match="every"):
        mg.dotprod(every=2.5)
    with pytest.raises(ValueError, match="scheme"):
        mg.dotprod(scheme="backward")
    with pytest.raises(TypeError, match="weight"):
        mg.dotprod(weight="0.1")
    with pytest.raises(ValueError, match="weight"):
        mg.dotprod(weight=float("nan"))
    with pytest.raises(ValueError, match="inner_alpha"):
        optax.inject_hyperparams(mg.dotprod)(inner_alpha=-1.0).init(jnp.zeros(2))

    params, g1, grad_fn = tanh_problem(jnp.float32, sizes=(2, 3, 1))
    tx = mg.dotprod()
    state = tx.init(params)
    with pytest.raises(ValueError, match="grad_fn=grad_fn"):
        tx.update(g1, state, params)
    with pytest.raises(ValueError, match="grad_fn=grad_fn"):
        optax.chain(tx, optax.adam(1e-3)).update(g1, (state, optax.adam(1e-3).init(params)), params)
    with pytest.raises(ValueError, match="params"):
        tx.update(g1, state, None, grad_fn=grad_fn)
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(g1, state, params, grad_fn=lambda p: grad_fn(p)[:1])
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(g1, state, params, grad_fn=lambda p: jax.tree.map(lambda g: g[None], grad_fn(p)))
    with pytest.raises(ValueError, match="updates"):
        tx.update(g1[:1], state, params, grad_fn=grad_fn)
    for scheme in ("central", "exact"):
        with pytest.raises(ValueError, match="grad_fn"):
            mg.dotprod(scheme=scheme, every=3).update(
                g1, state, params, grad_fn=lambda p: grad_fn(p)[:1]
            )
