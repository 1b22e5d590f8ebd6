"""Shared checks of the loss-weighting methods (`uncertainty_weighting`, `dwa`, `rlw`, `famo`,
`db_mtl`): the `losses=` argument and the optimizer of learned task parameters."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metagrad._src import checks as _checks

# What a method asks of its losses: any finite value, >= 0, or > 0 (log-based methods).
ANY, NONNEGATIVE, POSITIVE = "any", "nonnegative", "positive"
_BOUND = {NONNEGATIVE: ">= 0", POSITIVE: "> 0"}


def task_losses(
    losses: Any, num_tasks: int, dtype: Any, *, name: str, sign: str = ANY, required: bool = True
) -> tuple[jax.Array | None, jax.Array]:
    """Checks `losses` (shape [num_tasks]); returns them (stop-gradient, in `dtype`) and `valid`.

    Concrete losses out of `sign`'s range raise a ValueError naming ``losses``; traced ones
    cannot be checked, so `valid` (a traced bool, False also for non-finite losses) tells the
    caller to make its update non-finite and keep its state, for ``optax.apply_if_finite``.
    """
    if losses is None:
        if not required:
            return None, jnp.asarray(True)
        raise ValueError(
            f"{name} needs the per-task losses: call update(updates, state, params, "
            f"losses=losses) with losses of shape ({num_tasks},)"
        )
    if not isinstance(losses, jax.core.Tracer):
        shape = np.shape(losses)
    else:
        shape = losses.shape
    if tuple(shape) != (num_tasks,):
        raise ValueError(f"losses must have shape ({num_tasks},) (one per task), got {shape}")
    if not isinstance(losses, jax.core.Tracer) and sign != ANY:
        values = np.asarray(losses, np.float64)
        finite = values[np.isfinite(values)]
        bad = finite <= 0 if sign == POSITIVE else finite < 0
        if np.any(bad):
            raise ValueError(
                f"losses must be {_BOUND[sign]} for {name}, got {values.tolist()}; shift losses "
                "that can take other values by a known lower bound"
            )
    losses = jax.lax.stop_gradient(jnp.asarray(losses).astype(dtype))
    valid = jnp.all(jnp.isfinite(losses))
    if sign == POSITIVE:
        valid &= jnp.all(losses > 0)
    elif sign == NONNEGATIVE:
        valid &= jnp.all(losses >= 0)
    return losses, valid


def optimizer(value: Any) -> optax.GradientTransformation:
    """`learning_rate`: a float (SGD with that step) or an optax optimizer, used as is."""
    if isinstance(value, optax.GradientTransformation):
        return value
    return optax.sgd(_checks.hyperparameter("learning_rate", value, low=0))


def float_dtype() -> Any:
    """The dtype of the methods' float state: float32, or float64 with jax_enable_x64."""
    return jnp.result_type(float)


def task_vector(num_tasks: int, value: float) -> jax.Array:
    """A [num_tasks] vector of the state's float dtype filled with `value` (e.g. initial
    weights, logits or losses)."""
    return jnp.full((num_tasks,), value, float_dtype())
