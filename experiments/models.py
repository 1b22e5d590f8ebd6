"""Small models in plain JAX (no framework needed), used by the experiments."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


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
    key,
    in_channels: int,
    num_classes: int,
    image_size: int,
    hidden: int = 64,
    dtype=jnp.float32,
    *,
    batch_norm: bool = True,
):
    """Conv-4 of the MAML and Reptile papers: 4 × [conv 3×3, batch norm, ReLU, max-pool 2].

    Returns a list of four conv blocks `{"w", "b", "scale", "offset"}` (HWIO kernels,
    He-normal) and a dense head `{"w", "b"}` over the flattened features. With
    ``batch_norm=False`` the blocks are `{"w", "b"}` only (apply with ``batch_norm=False``).
    """
    keys = jax.random.split(key, 5)
    blocks, channels, size = [], in_channels, image_size
    for k in keys[:4]:
        std = jnp.sqrt(2.0 / (9 * channels))
        block = {
            "w": std * jax.random.normal(k, (3, 3, channels, hidden), dtype),
            "b": jnp.zeros((hidden,), dtype),
        }
        if batch_norm:
            block |= {"scale": jnp.ones((hidden,), dtype), "offset": jnp.zeros((hidden,), dtype)}
        blocks.append(block)
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


def _conv(x, w, b):
    y = jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + b


RESNET12_CHANNELS = (64, 160, 320, 640)


def resnet12_init(key, in_channels: int, num_classes: int, width: float = 1.0, dtype=jnp.float32):
    """ResNet-12 of the few-shot literature (MetaOptNet, TADAM), without batch norm.

    Four residual stages of three 3×3 convolutions (leaky ReLU 0.1 between them) plus a
    1×1 shortcut convolution, each followed by a 2×2 max-pool; channels 64-160-320-640
    (times `width`), global average pooling and a dense head: 12.4M parameters at
    ``width=1``. Without batch norm the third convolution of each stage starts scaled by
    0.1 (our choice) so activations do not grow with depth. Returns a list of four stages
    ``{"convs": [3 × {"w", "b"}], "short": {"w", "b"}}`` and the head ``{"w", "b"}``.
    """
    keys = iter(jax.random.split(key, 17))
    stages, channels = [], in_channels
    for out in (max(1, round(c * width)) for c in RESNET12_CHANNELS):
        convs = []
        for i, cin in enumerate((channels, out, out)):
            std = jnp.sqrt(2.0 / (9 * cin)) * (0.1 if i == 2 else 1.0)
            w = std * jax.random.normal(next(keys), (3, 3, cin, out), dtype)
            convs.append({"w": w, "b": jnp.zeros((out,), dtype)})
        w = jnp.sqrt(1.0 / channels) * jax.random.normal(next(keys), (1, 1, channels, out), dtype)
        stages.append({"convs": convs, "short": {"w": w, "b": jnp.zeros((out,), dtype)}})
        channels = out
    head = {
        "w": jax.random.normal(next(keys), (channels, num_classes), dtype) / jnp.sqrt(channels),
        "b": jnp.zeros((num_classes,), dtype),
    }
    return stages + [head]


def resnet12_apply(params, x):
    """Logits of `resnet12_init`'s model for images `x` of shape `[batch, h, w, channels]`."""
    act = lambda v: jax.nn.leaky_relu(v, 0.1)
    for stage in params[:-1]:
        y = x
        for i, conv in enumerate(stage["convs"]):
            y = _conv(y, conv["w"], conv["b"])
            if i < 2:
                y = act(y)
        x = act(y + _conv(x, stage["short"]["w"], stage["short"]["b"]))
        if x.shape[1] >= 2:
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    x = jnp.mean(x, axis=(1, 2))
    return x @ params[-1]["w"] + params[-1]["b"]


def _torch_named_leaves(params, model: str):
    """``{torch parameter name: (leaf, kind)}`` for Conv-4 (no batch norm) or ResNet-12."""
    out = {}

    def conv(name, layer):
        out[f"{name}.weight"] = (layer["w"], "conv")
        out[f"{name}.bias"] = (layer["b"], "bias")

    if model == "conv4":
        for i, block in enumerate(params[:-1]):
            conv(f"convs.{i}", block)
    else:
        for i, stage in enumerate(params[:-1]):
            for j, layer in enumerate(stage["convs"]):
                conv(f"stages.{i}.convs.{j}", layer)
            conv(f"stages.{i}.short", stage["short"])
    out["head.weight"] = (params[-1]["w"], "dense")
    out["head.bias"] = (params[-1]["b"], "bias")
    return out


_TO_TORCH = {"conv": (3, 2, 0, 1), "dense": (1, 0), "bias": (0,)}


def torch_layout(params, model: str):
    """Conv-4 (no batch norm) or ResNet-12 params as ``{torch name: numpy array}``.

    The names and layouts (OIHW kernels, ``[out, in]`` dense weights) of the same model in
    PyTorch (`experiments.bench_real_torch`); `model` is "conv4" or "resnet12". Works on
    any tree shaped like the params (gradients, updates).
    """
    return {
        name: np.transpose(np.asarray(leaf), _TO_TORCH[kind])
        for name, (leaf, kind) in _torch_named_leaves(params, model).items()
    }
