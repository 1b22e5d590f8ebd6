"""Multi-device checks on 4 faked CPU devices, run by `test_multidevice.py` in a subprocess.

The XLA flag that fakes devices must be set before JAX starts, so this runs as a script
(``python tests/multidevice_script.py``) and prints one line ``RESULT {json}``: for each
check the largest absolute difference between the multi-device and the single-device
result, and the number of devices the multi-device result lives on. Nothing runs on import
(pytest's doctest collection imports this file).
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=4").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import metagrad as mg

    n_dev = 4
    assert jax.device_count() == n_dev, jax.devices()
    # Auto axes: XLA propagates the shardings of jit's inputs (the classic data parallelism).
    # (`jax.make_mesh`'s default, Explicit axes, is not supported by the meta-steps yet.)
    mesh = jax.make_mesh((n_dev,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    on_axis0 = NamedSharding(mesh, P("d"))
    results: dict[str, float] = {}

    def loss(params, batch):
        x, y = batch
        h = jnp.tanh(x @ params["w"] + params["b"])
        return jnp.mean((h @ params["v"] - y) ** 2)

    keys = iter(jax.random.split(jax.random.key(0), 64))
    params = {
        "w": jax.random.normal(next(keys), (3, 8)) / 2,
        "b": jnp.full((8,), 0.1),
        "v": jax.random.normal(next(keys), (8,)) / 3,
    }

    def data(*lead):
        x = jax.random.normal(next(keys), (*lead, 3))
        return x, jnp.sin(x.sum(-1))

    def max_diff(a, b):
        diffs = jax.tree.map(
            lambda u, v: float(np.max(np.abs(np.asarray(u) - np.asarray(v)))), a, b
        )
        return max(jax.tree.leaves(diffs))

    def num_devices(tree):
        return min(len(x.sharding.device_set) for x in jax.tree.leaves(tree))

    def record(name, single, multi):
        results[name] = max_diff(single, multi)
        results[name + "/devices"] = num_devices(multi)

    # dotprod under plain jax.jit, batches sharded over devices, no axis name: XLA inserts
    # the reductions. A 5-step training loop inside optax.chain.
    tx = optax.chain(mg.dotprod(weight=0.1, scheme="exact"), optax.adam(1e-2))
    batches = [(data(32), data(32)) for _ in range(5)]

    @jax.jit
    def dp_step(params, state, b1, b2):
        g1 = jax.grad(loss)(params, b1)
        updates, state = tx.update(g1, state, params, grad_fn=lambda p: jax.grad(loss)(p, b2))
        return optax.apply_updates(params, updates), state

    def dp_train(put):
        p, s = put(params, replicated), put(tx.init(params), replicated)
        for b1, b2 in batches:
            p, s = dp_step(p, s, put(b1, on_axis0), put(b2, on_axis0))
        return p

    single = dp_train(lambda x, sharding: x)
    record("dotprod/jit_named_sharding", single, dp_train(jax.device_put))

    # dotprod with axis_name in a training loop under shard_map (the per-update
    # comparison is in test_dotprod_multidevice.py): params stay replicated over 5 steps.
    tx_axis = optax.chain(mg.dotprod(weight=0.1, scheme="exact", axis_name="d"), optax.adam(1e-2))

    def local(params, state, b1, b2):
        g1 = jax.grad(loss)(params, b1)
        updates, state = tx_axis.update(g1, state, params, grad_fn=lambda p: jax.grad(loss)(p, b2))
        return optax.apply_updates(params, updates), state

    sm_step = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), P(), P("d"), P("d")),
            out_specs=(P(), P()),
            check_vma=False,
        )
    )
    p, s = params, tx_axis.init(params)
    for b1, b2 in batches:
        p, s = sm_step(p, s, jax.device_put(b1, on_axis0), jax.device_put(b2, on_axis0))
    record("dotprod/shard_map_train", single, p)

    # Meta-steps: the task axis sharded over the 4 devices through jax.jit.
    num_tasks = 8
    support, query = data(num_tasks, 5), data(num_tasks, 5)
    maml_tasks = (support, query)
    learners = {
        "maml": (mg.maml(loss, optax.sgd(0.1), 2, optax.adam(1e-2)), maml_tasks),
        # The normalized mean over tasks couples the devices at every inner step.
        "grad_share": (mg.maml(loss, mg.grad_share(0.1), 2, optax.adam(1e-2)), maml_tasks),
        "reptile": (
            mg.reptile(loss, optax.adam(0.05), 3, optax.adam(0.1), reset_inner_state=False),
            maml_tasks,
        ),
        # The K batches of one sequential trajectory split over devices: correct, though
        # the steps of a trajectory are sequential and gain nothing from it (shard the
        # examples of each batch instead, `axis_name` of seq_reptile).
        "seq_reptile": (
            mg.seq_reptile(loss, optax.sgd(0.1), num_tasks, 0.5),
            (jnp.arange(num_tasks, dtype=jnp.int32) % 3, support),
        ),
    }
    for name, (learner, tasks) in learners.items():
        s1 = learner.init(params)
        s2 = jax.device_put(learner.init(params), replicated)
        sharded = jax.device_put(tasks, on_axis0)
        for _ in range(3):
            s1, m1 = learner.step(s1, tasks)
            s2, m2 = learner.step(s2, sharded)
        record(f"{name}/jit_named_sharding", (s1, m1), (s2, m2))
        results[f"{name}/tasks_devices"] = num_devices(sharded)

    # Meta-steps with `axis_name` under shard_map (check_vma True and False) and pmap, each
    # device holding a slice of the tasks, against the same learner without an axis on one
    # device: 3 outer steps, states and metrics. The conformance battery runs every learner
    # and inner rule through these modes; here, what it does not: a kept inner state and the
    # unrolled task loop.
    def axis_learners(axis):
        kw = dict(axis_name=axis)
        return {
            "maml": mg.maml(
                loss,
                optax.sgd(0.1, momentum=0.5),
                2,
                optax.adam(1e-2),
                reset_inner_state=False,
                **kw,
            ),
            "maml_unroll": mg.maml(
                loss, optax.sgd(0.1), 2, optax.adam(1e-2), task_loop="unroll", **kw
            ),
            # Scanned steps over per-task params with an inner state: the scan's carry must
            # keep its device-varying type (failed under check_vma before the shared
            # inner_loop.task_states typed the starting states).
            "maml_unroll_scan_kept_state": mg.maml(
                loss,
                optax.sgd(0.1, momentum=0.5),
                2,
                optax.adam(1e-2),
                reset_inner_state=False,
                task_loop="unroll",
                step_loop="scan",
                **kw,
            ),
        }

    def split(tree):  # for pmap: a leading device axis
        return jax.tree.map(lambda x: x.reshape((n_dev, -1) + x.shape[1:]), tree)

    singles, multis = axis_learners(None), axis_learners("d")
    for name, single in singles.items():
        tasks = maml_tasks
        s1 = single.init(params)
        for _ in range(3):
            s1, m1 = single.step(s1, tasks)
        multi = multis[name]
        for mode in ("shard_map_check_vma", "shard_map_no_check_vma", "pmap"):
            if mode == "pmap":
                step = jax.pmap(multi.step, axis_name="d")
                s2 = jax.tree.map(lambda x: jnp.stack([x] * n_dev), multi.init(params))
                local = split(tasks)
            else:
                step = jax.jit(
                    jax.shard_map(
                        multi.step,
                        mesh=mesh,
                        in_specs=(P(), P("d")),
                        out_specs=(P(), P()),
                        check_vma=mode == "shard_map_check_vma",
                    )
                )
                s2, local = multi.init(params), tasks
            for _ in range(3):
                s2, m2 = step(s2, local)
            if mode == "pmap":  # every device holds the single-device result
                s1b, m1b = jax.tree.map(lambda x: jnp.stack([x] * n_dev), (s1, m1))
                results[f"{name}/axis_{mode}"] = max_diff((s1b, m1b), (s2, m2))
            else:
                results[f"{name}/axis_{mode}"] = max_diff((s1, m1), (s2, m2))

    # A multi-task combiner on per-task gradients sharded along the task axis.
    pc = optax.chain(mg.pcgrad(seed=0), optax.adam(1e-2))
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, support)
    u1, _ = jax.jit(pc.update)(grads, pc.init(params), params)
    u2, _ = jax.jit(pc.update)(
        jax.device_put(grads, on_axis0), jax.device_put(pc.init(params), replicated), params
    )
    record("pcgrad/jit_named_sharding", u1, u2)

    # Checkpoint a state that lives on 4 devices and restore it with its sharding.
    import tempfile

    import orbax.checkpoint as ocp

    learner, tasks = learners["maml"]
    state = jax.device_put(learner.init(params), replicated)
    sharded = jax.device_put(tasks, on_axis0)
    state, _ = learner.step(state, sharded)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt")
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path, state)
            checkpointer.wait_until_finished()
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                learner.init(params),
            )
            restored = checkpointer.restore(path, abstract)
    expected, _ = learner.step(state, sharded)
    resumed, _ = learner.step(restored, sharded)
    results["checkpoint/sharded_restore"] = max_diff(expected, resumed)
    results["checkpoint/sharded_restore/devices"] = num_devices(restored)

    print("RESULT " + json.dumps(results))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
