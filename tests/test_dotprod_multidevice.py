"""dotprod's axis_name on 4 faked CPU devices, in a subprocess.

The XLA flag that fakes devices must be set before JAX starts, hence the
subprocess. Each case compares the update computed under `jax.pmap` or
`jax.shard_map` on per-device batches with `dotprod` on one device and the
combined batches.
"""

import textwrap

import pytest

from tests.helpers import run_on_four_devices

SCRIPT = textwrap.dedent(
    """
    import json

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.flatten_util import ravel_pytree
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import metagrad as mg

    N_DEV, PER_DEV = 4, 8
    assert jax.device_count() == N_DEV, jax.devices()


    def loss(params, batch):
        x, y = batch
        h = jnp.tanh(x @ params["w1"] + params["b1"])
        return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


    def problem(dtype):
        k = jax.random.split(jax.random.key(0), 6)
        params = {
            "w1": jax.random.normal(k[0], (3, 16), dtype) / 2,
            "b1": jnp.full((16,), 0.1, dtype),
            "w2": jax.random.normal(k[1], (16, 2), dtype) / 4,
            "b2": jnp.zeros((2,), dtype),
        }
        n = N_DEV * PER_DEV
        b1 = (jax.random.normal(k[2], (n, 3), dtype), jax.random.normal(k[3], (n, 2), dtype))
        b2 = (jax.random.normal(k[4], (n, 3), dtype), jax.random.normal(k[5], (n, 2), dtype))
        return params, b1, b2


    def flat(tree):
        return np.asarray(ravel_pytree(tree)[0], np.float64)


    def rel(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())


    def run(dtype, scheme, every, modes, calls, mask=None):
        params, b1, b2 = problem(dtype)
        kwargs = dict(weight=0.5, every=every, scheme=scheme)
        if mask is not None:
            kwargs["mask"] = mask
        single = mg.dotprod(**kwargs)
        state = single.init(params)
        refs = []
        for _ in range(calls):  # one device, combined batches
            g1 = jax.grad(loss)(params, b1)
            ref, state = single.update(
                g1, state, params, grad_fn=lambda p: jax.grad(loss)(p, b2)
            )
            refs.append(flat(ref))

        tx = mg.dotprod(**kwargs, axis_name="batch")

        def local_step(params, state, b1, b2, loss=loss):
            g1 = jax.grad(loss)(params, b1)
            return tx.update(g1, state, params, grad_fn=lambda p: jax.grad(loss)(p, b2))

        mesh = jax.make_mesh((N_DEV,), ("batch",))
        specs = dict(mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch")), out_specs=(P(), P()))
        split = lambda b: jax.tree.map(lambda a: a.reshape(N_DEV, PER_DEV, *a.shape[1:]), b)
        shard = lambda b: jax.device_put(b, NamedSharding(mesh, P("batch")))
        # Under shard_map's default check_vma=True, JAX itself sums the gradient
        # of replicated params over the axis; a pmean-ed loss makes it the mean.
        global_loss = lambda p, b: jax.lax.pmean(loss(p, b), "batch")
        steps = {
            "pmap": (jax.pmap(local_step, axis_name="batch", in_axes=(None, 0, 0, 0)), split),
            "shard_map": (jax.jit(jax.shard_map(local_step, check_vma=False, **specs)), shard),
            "shard_map_vma": (
                jax.jit(jax.shard_map(lambda *a: local_step(*a, loss=global_loss), **specs)),
                shard,
            ),
        }
        out = {}
        for mode in modes:
            step, put = steps[mode]
            state = tx.init(params)
            if mode == "pmap":
                state = jax.tree.map(lambda s: jnp.broadcast_to(s, (N_DEV, *s.shape)), state)
            for i in range(calls):
                upd, state = step(params, state, put(b1), put(b2))
                if mode == "pmap":  # every device holds a copy
                    err = max(rel(flat(jax.tree.map(lambda u: u[d], upd)), refs[i])
                              for d in range(N_DEV))
                else:
                    err = rel(flat(upd), refs[i])
                masked = "" if mask is None else "/mask"
                out[f"{jnp.dtype(dtype).name}/{scheme}/every={every}{masked}/{mode}/call={i}"] = err
        return out


    errors = {}
    errors.update(run(jnp.float32, "exact", 2, ["pmap", "shard_map_vma"], 1))
    errors.update(run(jnp.float32, "forward", 3, ["pmap"], 2))
    jax.config.update("jax_enable_x64", True)
    for scheme in ("forward", "central", "exact"):
        errors.update(run(jnp.float64, scheme, 2, ["pmap", "shard_map_vma"], 1))
    errors.update(run(jnp.float64, "forward", 3, ["shard_map"], 2))
    # mask= (the second layer only): the selection is static, the pmean is over whole trees.
    mask = {"w1": False, "b1": False, "w2": True, "b2": True}
    errors.update(run(jnp.float64, "forward", 2, ["pmap", "shard_map_vma"], 1, mask=mask))
    print("RESULT " + json.dumps(errors))
    """
)


# One worker runs the whole module, so the subprocess runs once.
pytestmark = pytest.mark.xdist_group("dotprod-multidevice")


@pytest.fixture(scope="module")
def errors():
    return run_on_four_devices(["-c", SCRIPT])


def test_cases_ran(errors):
    assert len(errors) == 14


def test_multidevice_matches_one_device_on_combined_batches(errors):
    # Relative to the largest entry of the update: ≤ 1e-5 except for float32
    # finite differences, where the different summation order of the per-device
    # gradients (round-off ~1e-7) is divided by the step (~1e-3): ≤ 1e-3 there.
    for case, err in errors.items():
        fd32 = case.startswith("float32/forward") and case.endswith("call=0")
        assert err <= (1e-3 if fd32 else 1e-5), (case, err)
