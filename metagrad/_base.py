"""Types shared by metagrad's meta-learners."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex

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
