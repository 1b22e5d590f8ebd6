"""Types shared by metagrad's meta-learners."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

Params = chex.ArrayTree
Batch = Any
LossFn = Callable[[Params, Batch], chex.Array]


class MetaLearner(NamedTuple):
    """A meta-learner: a pair of pure functions plus task adaptation.

    Attributes:
      init: `init(params) -> state`; `state.params` is the learned
        initialization.
      step: `step(state, tasks) -> (state, metrics)`, one outer (meta) step on a
        batch of tasks; jitted, one compiled call per outer step.
      adapt: `adapt(state, support, num_steps=None) -> params`, the params a
        single task reaches from the learned initialization after the learner's
        inner loop on its support batch (for evaluation at meta-test time).
    """

    init: Callable[[Params], Any]
    step: Callable[[Any, Any], tuple[Any, dict[str, chex.Array]]]
    adapt: Callable[..., Params]


def keep_if_finite(new: Any, old: Any) -> Any:
    """`new` if all its float leaves are finite, else `old` (same structure), traceable.

    For state that persists across outer steps (a carried inner-optimizer state, gradient
    sharing's running average): one non-finite task would otherwise poison every later step,
    and a guard on the outer optimizer (`optax.apply_if_finite`) could then only delay the
    NaN. Keeping the previous value makes a skipped step leave no trace.
    """
    floats = [x for x in jax.tree.leaves(new) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not floats:
        return new
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats]))
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
