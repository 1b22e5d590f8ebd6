"""Small models in plain JAX (no framework needed), used by the experiments."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def mlp_init(key, sizes: Sequence[int] = (1, 40, 40, 1), dtype=jnp.float32):
    """He-uniform-like init of an MLP as a list of `{"w", "b"}` dicts."""
    params = []
    keys = jax.random.split(key, len(sizes) - 1)
    for k, (n_in, n_out) in zip(keys, zip(sizes[:-1], sizes[1:], strict=True), strict=True):
        bound = jnp.sqrt(6.0 / n_in)
        w = jax.random.uniform(k, (n_in, n_out), dtype, -bound, bound)
        params.append({"w": w, "b": jnp.zeros((n_out,), dtype)})
    return params


def mlp_apply(params, x, activation=jax.nn.relu):
    """Applies the MLP to `x` of shape `[..., sizes[0]]`."""
    for layer in params[:-1]:
        x = activation(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def mse_loss(params, batch):
    """Mean squared error of the MLP on `batch = (x, y)`."""
    x, y = batch
    return jnp.mean((mlp_apply(params, x) - y) ** 2)


def mlp_init_normal(
    key, sizes: Sequence[int] = (1, 40, 40, 1), stddev: float = 0.01, dtype=jnp.float32
):
    """Init of the MAML reference code: weights ~ truncated normal(0, stddev), biases zero.

    Same structure as `mlp_init`. With He init and inputs in [-5, 5] (the sinusoid
    tasks) the last layer's curvature is large enough that plain SGD with the MAML
    paper's learning rate 0.01 diverges before meta-training has shaped the weights;
    small initial weights avoid that.
    """
    params = []
    keys = jax.random.split(key, len(sizes) - 1)
    for k, (n_in, n_out) in zip(keys, zip(sizes[:-1], sizes[1:], strict=True), strict=True):
        w = stddev * jax.random.truncated_normal(k, -2.0, 2.0, (n_in, n_out), dtype)
        params.append({"w": w, "b": jnp.zeros((n_out,), dtype)})
    return params
