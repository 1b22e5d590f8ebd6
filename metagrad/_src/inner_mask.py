"""`inner_mask`: the parameters the MAML family adapts in its inner loop (ANIL, BOIL).

The inner loop works on the *selected* leaves only: a pytree like params whose unselected
leaves are ``None`` (empty subtrees, so they are neither copied per task nor differentiated
by the inner gradients). The unselected leaves are closed over by the loss as parameters
shared by every task; the outer gradient still reaches them through the query loss.

References:
  Raghu, Raghu, Bengio, Vinyals, `Rapid Learning or Feature Reuse? Towards Understanding
  the Effectiveness of MAML <https://arxiv.org/abs/1909.09157>`_, ICLR 2020 (ANIL).
  Oh, Yoo, Kim, Yun, `BOIL: Towards Representation Change for Few-shot Learning
  <https://arxiv.org/abs/2008.08882>`_, ICLR 2021.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from metagrad._src import checks as _checks
from metagrad._src.base import LossFn, Params


def check(inner_mask: Any) -> None:
    """Construction-time check: None, a callable or a pytree of bools."""
    _checks.bool_mask("inner_mask", inner_mask)


def flags(inner_mask: Any, params: Params) -> tuple[bool, ...] | None:
    """One bool per leaf of `params` (optax.masked's convention), or None without a mask."""
    if inner_mask is None:
        return None
    selected = _checks.mask_flags("inner_mask", inner_mask, params)
    if not any(selected):
        raise ValueError("inner_mask selects no parameter: the inner loop would adapt nothing")
    return selected


def split(
    selected: tuple[bool, ...] | None, params: Params
) -> tuple[Params, Callable[[Params], Params]]:
    """``(adapted, merge)``: the selected leaves (``None`` elsewhere) and the function
    mapping one task's adapted leaves back to full params (the others are `params`')."""
    if selected is None:
        return params, lambda adapted: adapted
    leaves, treedef = jax.tree.flatten(params)
    adapted = treedef.unflatten([x if s else None for x, s in zip(leaves, selected, strict=True)])

    def merge(adapted):
        new = iter(jax.tree.leaves(adapted))
        return treedef.unflatten(
            [next(new) if s else x for x, s in zip(leaves, selected, strict=True)]
        )

    return adapted, merge


def bind(loss_fn: LossFn, merge: Callable[[Params], Params]) -> LossFn:
    """The loss as a function of the adapted leaves (the others closed over)."""
    return lambda adapted, batch: loss_fn(merge(adapted), batch)
