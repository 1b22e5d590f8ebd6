"""The conformance battery's multi-device cells, on 4 faked CPU devices.

Run by `test_conformance.py` in one subprocess (the XLA flag that fakes devices must be
set before JAX starts). For every method of `conformance_methods.METHODS`, three steps on
one device are compared with the same three steps under `jax.pmap`, and under
`jax.shard_map` with ``check_vma=True`` and ``check_vma=False``: the batch (meta-learners:
the task batch; seq_reptile and transformations: the examples of each batch) split over
the 4 devices, the method given the device axis name where it takes one (``axis_name``,
``axis_name``), the user's gradients averaged with ``jax.lax.pmean`` otherwise. In
float64, so that only a real difference shows. Prints one line ``RESULT {json}`` with, per
method and cell, the largest relative difference to one device, the spread between the
devices' copies, the number of devices and the error (None if it ran). Nothing runs on
import.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

AXIS = "d"
N_DEV = 4


def main() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags += " --xla_force_host_platform_device_count=4"
    # Many tiny programs: XLA's backend optimizations cost more than they save here.
    flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from tests import conformance_methods as cm

    assert jax.device_count() == N_DEV, jax.devices()
    mesh = jax.make_mesh((N_DEV,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    results: dict[str, dict] = {}

    def is_axis(x):
        return x is None or isinstance(x, int)

    def split_for_pmap(batch, axes):
        # Axis `a` of size n becomes [N_DEV, ..., n / N_DEV, ...] with the devices first.
        def one(a, x):
            if a is None:
                return jnp.broadcast_to(x, (N_DEV, *x.shape))
            shape = (*x.shape[:a], N_DEV, x.shape[a] // N_DEV, *x.shape[a + 1 :])
            return jnp.moveaxis(x.reshape(shape), a, 0)

        return jax.tree.map(one, axes, batch, is_leaf=is_axis)

    def specs(axes):
        return jax.tree.map(
            lambda a: P() if a is None else P(*([None] * a), AXIS), axes, is_leaf=is_axis
        )

    def pmap_in_axes(axes):
        return jax.tree.map(lambda a: 0, axes, is_leaf=is_axis)

    for method in cm.METHODS:
        if method.kind == "invalid":
            continue
        batches = [cm.make_batch(method, i, jnp.float64) for i in range(cm.STEPS)]
        params = cm.initial_params(dtype=jnp.float64)
        single = cm.harness(method)
        step1 = single.fast if method.kind == "meta" else jax.jit(single.step)
        expected = cm.run(single, params, batches, step1)[-1]
        axes = cm.SPLIT_AXES[method.data]
        for cell in ("pmap", "shard_map_vma", "shard_map_novma"):
            key = f"{method.name}/{cell}"
            out = {"error": None, "diff": None, "spread": None, "devices": None}
            try:
                h = cm.harness(method, axis=AXIS)
                carry = h.init(params)
                if cell == "pmap":
                    pstep = jax.pmap(h.step, AXIS, in_axes=(None, pmap_in_axes(axes)))
                    spread = 0.0
                    for batch in batches:
                        stacked = pstep(carry, split_for_pmap(batch, axes))
                        carry = jax.tree.map(lambda x: x[0], stacked)
                        for d in range(1, N_DEV):
                            other = jax.tree.map(lambda x, d=d: x[d], stacked)
                            spread = max(spread, cm.max_rel_diff(other, carry))
                    devices = len(jax.tree.leaves(stacked)[0].sharding.device_set)
                else:
                    sstep = jax.jit(
                        jax.shard_map(
                            h.step,
                            mesh=mesh,
                            in_specs=(P(), specs(axes)),
                            out_specs=P(),
                            check_vma=cell == "shard_map_vma",
                        )
                    )
                    for batch in batches:
                        carry = sstep(carry, batch)
                    # out_specs=P() promises replicated outputs: compare the copies.
                    spread = 0.0
                    for leaf in cm.float_leaves(carry):
                        shards = [s.data for s in leaf.addressable_shards]
                        spread = max(spread, max(cm.max_rel_diff(s, shards[0]) for s in shards))
                    devices = len(jax.tree.leaves(carry)[0].sharding.device_set)
                out.update(diff=cm.max_rel_diff(carry, expected), spread=spread, devices=devices)
            except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
                tb = traceback.format_exc(limit=3)
                out["error"] = f"{type(e).__name__}: {str(e)[:600]}\n{tb[-1500:]}"
            results[key] = out
            print(key, out["diff"], out["error"] and out["error"][:200], file=sys.stderr)

    print("RESULT " + json.dumps(results))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
