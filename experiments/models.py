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


def conv4_init(
    key, in_channels: int, num_classes: int, image_size: int, hidden: int = 64, dtype=jnp.float32
):
    """Conv-4 of the MAML and Reptile papers: 4 × [conv 3×3, batch norm, ReLU, max-pool 2].

    Returns a list of four conv blocks `{"w", "b", "scale", "offset"}` (HWIO kernels,
    He-normal) and a dense head `{"w", "b"}` over the flattened features.
    """
    keys = jax.random.split(key, 5)
    blocks, channels, size = [], in_channels, image_size
    for k in keys[:4]:
        std = jnp.sqrt(2.0 / (9 * channels))
        blocks.append(
            {
                "w": std * jax.random.normal(k, (3, 3, channels, hidden), dtype),
                "b": jnp.zeros((hidden,), dtype),
                "scale": jnp.ones((hidden,), dtype),
                "offset": jnp.zeros((hidden,), dtype),
            }
        )
        channels, size = hidden, max(size // 2, 1)
    features = hidden * size * size
    head = {
        "w": jax.random.normal(keys[4], (features, num_classes), dtype) / jnp.sqrt(features),
        "b": jnp.zeros((num_classes,), dtype),
    }
    return blocks + [head]


def conv4_apply(params, x, *, batch_norm: bool = True):
    """Logits of Conv-4 for images `x` of shape `[batch, height, width, channels]`.

    Batch norm uses the statistics of the batch it is given, with learned scale and
    offset and no running averages, as in the MAML reference code (so a task's support
    and query sets are normalized separately, each with its own statistics).
    """
    for block in params[:-1]:
        x = jax.lax.conv_general_dilated(
            x, block["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = x + block["b"]
        if batch_norm:
            mean = jnp.mean(x, axis=(0, 1, 2))
            var = jnp.var(x, axis=(0, 1, 2))
            x = (x - mean) * jax.lax.rsqrt(var + 1e-5) * block["scale"] + block["offset"]
        x = jax.nn.relu(x)
        if x.shape[1] >= 2:
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    x = x.reshape(x.shape[0], -1)
    return x @ params[-1]["w"] + params[-1]["b"]
