"""MultiDigits: a MultiMNIST-style two-task problem built from scikit-learn's 8x8 digits.

Each image is 8 x 12: a left digit in columns 0-7 and a right digit in columns 4-11, combined
by a pixel-wise max, so the two digits overlap on 4 columns (as MultiMNIST overlaps shifted
MNIST digits). Task 1 classifies the left digit, task 2 the right one. Train and test pairs
are built from disjoint halves of the 1,797 digits (no digit image is in both).

Model: a shared MLP encoder 96-100 (ReLU) and one linear head per task; Adam (lr 1e-3),
batches of 128. The aggregator combines the two task gradients of the shared parameters
(`losses=` the two mean cross-entropies for the loss-based methods) before Adam; each head
trains on its own task's gradient (as in LibMTL, which aggregates the shared parameters only).
Single-task baselines (STL): the same network trained on one task alone. Δm% (Maninis et al.
2019; Liu et al. 2021): Δm = −(1/T) Σ_t (acc_t − acc_t^STL) / acc_t^STL × 100, per seed against
the STL run of the same seed; lower is better, negative beats single-task training.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from experiments import mtl_methods

HIDDEN = (100,)
LR = 1e-3
BATCH = 128
OVERLAP_SHIFT = 4  # the right digit starts at column 4


@dataclasses.dataclass
class DigitsConfig:
    seeds: int
    steps: int
    train_pairs: int
    test_pairs: int = 2000


def make_data(seed: int, train_pairs: int, test_pairs: int):
    """(x_train [N, 96], y_train [N, 2]), (x_test, y_test), float32 / int32 NumPy arrays."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    half = len(order) // 2
    split = {"train": order[:half], "test": order[half:]}

    def pairs(pool, n):
        left, right = rng.choice(pool, n), rng.choice(pool, n)
        canvas = np.zeros((n, 8, 8 + OVERLAP_SHIFT), np.float32)
        canvas[:, :, :8] = images[left]
        shifted = np.zeros_like(canvas)
        shifted[:, :, OVERLAP_SHIFT:] = images[right]
        x = np.maximum(canvas, shifted).reshape(n, -1)
        return x, np.stack([labels[left], labels[right]], 1)

    return pairs(split["train"], train_pairs), pairs(split["test"], test_pairs)


def init_params(key, dim_in: int):
    sizes = (dim_in, *HIDDEN)
    keys = jax.random.split(key, len(sizes) + 1)
    shared = [
        {"w": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys[: len(sizes) - 1], sizes[:-1], sizes[1:], strict=True)
    ]
    heads = [
        {"w": jax.random.normal(k, (HIDDEN[-1], 10)) * jnp.sqrt(1.0 / HIDDEN[-1]),
         "b": jnp.zeros(10)}
        for k in keys[-2:]
    ]  # fmt: skip
    return {"shared": shared, "heads": heads}


def _logits(params, x):
    h = x
    for layer in params["shared"]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return [h @ head["w"] + head["b"] for head in params["heads"]]


def task_losses(params, x, y):
    """The two mean cross-entropies, shape [2]."""
    return jnp.stack([
        optax.softmax_cross_entropy_with_integer_labels(lg, y[:, t]).mean()
        for t, lg in enumerate(_logits(params, x))
    ])  # fmt: skip


def accuracies(params, x, y):
    return jnp.stack([jnp.mean(jnp.argmax(lg, -1) == y[:, t])
                      for t, lg in enumerate(_logits(params, x))])  # fmt: skip


def train(spec: mtl_methods.Spec | int, cfg: DigitsConfig, seed: int, data) -> np.ndarray:
    """Test accuracies [seeds, 2] after training; `spec` an aggregator or a task id (STL)."""
    (x_train, y_train), (x_test, y_test) = data
    x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
    x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)
    single = isinstance(spec, int)
    agg = None if single else mtl_methods.build(spec, 2)[0]
    shared_opt = optax.adam(LR) if single else optax.chain(agg, optax.adam(LR))
    head_opt = optax.adam(LR)

    # Shared parameters and heads each as one flat vector: one leaf per optimizer and per
    # aggregator (a smaller program; the methods see the same numbers either way).
    shapes = jax.eval_shape(lambda k: init_params(k, x_train.shape[1]), jax.random.key(0))
    template = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    _, unravel_shared = ravel_pytree(template["shared"])
    _, unravel_heads = ravel_pytree(template["heads"])

    def flat_losses(params, x, y):
        tree = {"shared": unravel_shared(params["shared"]), "heads": unravel_heads(params["heads"])}
        return task_losses(tree, x, y)

    def init(tree):
        params = {
            "shared": ravel_pytree(tree["shared"])[0],
            "heads": ravel_pytree(tree["heads"])[0],
        }
        return params, shared_opt.init(params["shared"]), head_opt.init(params["heads"])

    def step(carry, idx, x_train, y_train):
        params, s_state, h_state = carry
        x, y = x_train[idx], y_train[idx]
        values = flat_losses(params, x, y)
        jac = jax.jacrev(flat_losses)(params, x, y)  # leaves [2, ...]
        if single:
            shared_grad = jax.tree.map(lambda g: g[spec], jac["shared"])
            s_upd, s_state = shared_opt.update(shared_grad, s_state, params["shared"])
            head_grad = jax.tree.map(lambda g: g[spec], jac["heads"])
        else:
            extra = {"losses": values} if spec.losses else {}
            s_upd, s_state = shared_opt.update(jac["shared"], s_state, params["shared"], **extra)
            head_grad = jax.tree.map(lambda g: g.sum(0), jac["heads"])  # each head: its task
        h_upd, h_state = head_opt.update(head_grad, h_state, params["heads"])
        params = {"shared": optax.apply_updates(params["shared"], s_upd),
                  "heads": optax.apply_updates(params["heads"], h_upd)}  # fmt: skip
        return (params, s_state, h_state), None

    def run_one(tree, batches, x_train, y_train):
        # Initial params, batch indices and data are arguments: random draws inside the
        # program (threefry) and captured constants cost compile time in every method's program.
        body = lambda c, idx: step(c, idx, x_train, y_train)
        (params, _, _), _ = jax.lax.scan(body, init(tree), batches)
        return unravel_shared(params["shared"]), unravel_heads(params["heads"])

    inits = _initial_params(jax.random.split(jax.random.key(seed), cfg.seeds), x_train.shape[1])
    rng = np.random.default_rng(seed)
    batches = rng.integers(0, x_train.shape[0], (cfg.seeds, cfg.steps, BATCH), dtype=np.int32)
    program = jax.jit(jax.vmap(run_one, in_axes=(0, 0, None, None)))
    shared, heads = program(inits, jnp.asarray(batches), x_train, y_train)
    return np.asarray(_test_accuracies({"shared": shared, "heads": heads}, x_test, y_test))


@functools.partial(jax.jit, static_argnums=1)
def _initial_params(keys, dim_in):
    return jax.vmap(lambda k: init_params(k, dim_in))(keys)


@jax.jit
def _test_accuracies(params, x, y):
    # Compiled once for every method (same shapes), outside the methods' programs.
    return jax.vmap(accuracies, in_axes=(0, None, None))(params, x, y)


def delta_m(acc: np.ndarray, stl: np.ndarray) -> np.ndarray:
    """Per-seed Δm% [seeds] of accuracies [seeds, T] against STL accuracies [seeds, T]."""
    return -100.0 * np.mean((acc - stl) / stl, axis=1)


def stderr(v: np.ndarray) -> float:
    return float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
