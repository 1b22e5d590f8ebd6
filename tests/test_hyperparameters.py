"""Hyper-parameters get the same checks as a Python number and as a concrete array.

For every numeric hyper-parameter of dotprod, fd_hvp and reptile_outer (and the `outer`
rate of reptile / seq_reptile, which shares reptile_outer's check): NaN, infinity, values
out of range and values of the wrong type raise a ValueError / TypeError that names the
parameter, whether given as a Python number or as a concrete `jnp` array; tracers (from
`optax.inject_hyperparams` under `jax.jit`) pass through and give the same updates as the
numbers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg

PARAMS = {"w": jnp.array([1.0, -2.0])}
GRAD_FN = jax.grad(lambda p: jnp.sum(jnp.sin(p["w"])))


def _loss(p, batch):
    return jnp.sum((p["w"] - batch) ** 2)


# name -> (builder taking the value, integer?, lowest valid value, is the lowest allowed?)
HYPERPARAMETERS = {
    "dotprod/inner_alpha": (lambda v: mg.dotprod(inner_alpha=v), False, 0.0, False),
    "dotprod/weight": (lambda v: mg.dotprod(weight=v), False, 0.0, True),
    "dotprod/every": (lambda v: mg.dotprod(every=v), True, 2, True),
    "fd_hvp/step": (lambda v: mg.fd_hvp(GRAD_FN, PARAMS, PARAMS, step=v), False, 0.0, False),
    "reptile_outer/inner_steps": (lambda v: mg.reptile_outer(optax.sgd(0.1), v), True, 1, True),
    "reptile_outer/outer": (lambda v: mg.reptile_outer(optax.sgd(0.1), 2, v), False, 0.0,
                               False),
    "reptile/outer": (lambda v: mg.reptile(_loss, optax.sgd(0.1), 2, v), False, 0.0, False),
}  # fmt: skip


def _bad_values(integer, low, inclusive):
    """(id, value, error) triples, each as a Python value and as a concrete array."""
    below = low - 1 if inclusive else low
    cases = [
        ("below", below, ValueError),
        ("below-array", jnp.array(below, jnp.int32 if integer else jnp.float32), ValueError),
        ("negative", -3, ValueError),
        ("negative-array", jnp.array(-3), ValueError),
        ("string", "0.5", TypeError),
        ("bool", True, TypeError),
        ("bool-array", jnp.array(True), TypeError),
        ("vector-array", jnp.ones(2, jnp.int32 if integer else jnp.float32), ValueError),
    ]
    if integer:
        # A float where a count is expected: NaN and 2.0 alike, as numbers or arrays.
        cases += [("nan", float("nan"), TypeError),
                  ("nan-array", jnp.array(jnp.nan), TypeError),
                  ("float", 2.0, TypeError),
                  ("float-array", jnp.array(2.0), TypeError)]  # fmt: skip
    else:
        cases += [("nan", float("nan"), ValueError), ("nan-array", jnp.array(jnp.nan), ValueError),
                  ("inf", float("inf"), ValueError),
                  ("inf-array", np.array(np.inf, np.float32), ValueError)]  # fmt: skip
    return cases


BAD = [
    pytest.param(build, name.split("/")[1], value, error, id=f"{name}/{case}")
    for name, (build, integer, low, inclusive) in HYPERPARAMETERS.items()
    for case, value, error in _bad_values(integer, low, inclusive)
]


@pytest.mark.parametrize("build, name, value, error", BAD)
def test_bad_hyperparameter_raises_naming_it(build, name, value, error):
    with pytest.raises(error, match=rf"^{name} must be"):
        build(value)


@pytest.mark.parametrize("name", list(HYPERPARAMETERS))
def test_valid_concrete_arrays_are_accepted(name):
    build, integer, low, inclusive = HYPERPARAMETERS[name]
    value = (low if inclusive else low + 0.5) + (1 if integer else 0)
    build(value)
    build(jnp.array(value))
    build(np.array(value))


@pytest.mark.parametrize(
    "call",
    [lambda: mg.dotprod(scheme=1), lambda: mg.fd_hvp(GRAD_FN, PARAMS, PARAMS, scheme="exact"),
     lambda: mg.fd_step(PARAMS, PARAMS, scheme=None)],
    ids=["dotprod", "fd_hvp", "fd_step"],
)  # fmt: skip
def test_bad_scheme(call):
    with pytest.raises(ValueError, match=r"^scheme must be one of"):
        call()


def test_tracers_pass_through_inject_hyperparams_and_jit():
    # Every numeric hyper-parameter injected (traced under jit) gives the update of the
    # Python numbers.
    g1 = {"w": jnp.array([0.3, -0.1])}
    tx = optax.inject_hyperparams(mg.dotprod)(inner_alpha=1e-2, weight=0.4, every=2)
    step = jax.jit(lambda g, s: tx.update(g, s, PARAMS, grad_fn=GRAD_FN))
    ref = mg.dotprod(inner_alpha=1e-2, weight=0.4, every=2)
    state, ref_state = tx.init(PARAMS), ref.init(PARAMS)
    for _ in range(2):
        (u, state), (want, ref_state) = step(g1, state), ref.update(g1, ref_state, PARAMS,
                                                                     grad_fn=GRAD_FN)  # fmt: skip
        np.testing.assert_allclose(u["w"], want["w"], rtol=1e-6)

    tx = optax.inject_hyperparams(mg.reptile_outer, static_args="inner")(
        optax.sgd(0.1), inner_steps=2, outer=0.5
    )
    ref = mg.reptile_outer(optax.sgd(0.1), 2, 0.5)
    step = jax.jit(lambda s, p: tx.update(GRAD_FN(p), s, p))
    p, q, state, ref_state = PARAMS, PARAMS, tx.init(PARAMS), ref.init(PARAMS)
    for _ in range(4):
        u, state = step(state, p)
        v, ref_state = ref.update(GRAD_FN(q), ref_state, q)
        p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
        np.testing.assert_allclose(p["w"], q["w"], rtol=1e-6)

    hv = jax.jit(lambda s: mg.fd_hvp(GRAD_FN, PARAMS, PARAMS, step=s))(1e-3)
    np.testing.assert_allclose(hv["w"], mg.fd_hvp(GRAD_FN, PARAMS, PARAMS, step=1e-3)["w"])


def test_shared_check_forms():
    # The one check behind the above, on the forms the public functions do not all use.
    from metagrad._src.checks import hyperparameter

    assert hyperparameter("b", np.float32(0.5), low=0, high=1) == 0.5
    with pytest.raises(ValueError, match=r"^b must be in \(0, 1\], got 2.0"):
        hyperparameter("b", jnp.array(2.0), low=0, high=1)
    with pytest.raises(ValueError, match=r"^k must be an integer in \[1, 4\], got 5"):
        hyperparameter("k", 5, integer=True, low=1, low_inclusive=True, high=4)
    with pytest.raises(TypeError, match=r"^lr must be a number"):
        hyperparameter("lr", lambda count: 0.1, low=0)  # no schedule allowed here
    schedule = optax.constant_schedule(0.1)
    assert hyperparameter("lr", schedule, low=0, schedule=True) is schedule
    # A tracer's value is unknown: passed through (here NaN, unchecked) ...
    out = jax.jit(lambda v: hyperparameter("lr", v, low=0))(jnp.nan)
    assert np.isnan(out)
    # ... but its shape and dtype are known and checked.
    with pytest.raises(ValueError, match=r"^lr must be a scalar"):
        jax.jit(lambda v: hyperparameter("lr", v, low=0))(jnp.ones(2))
    with pytest.raises(TypeError, match=r"^k must be an integer >= 1, got an array of dtype"):
        jax.jit(lambda v: hyperparameter("k", v, integer=True, low=1, low_inclusive=True))(2.0)
