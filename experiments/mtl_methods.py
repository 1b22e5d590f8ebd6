"""The multi-task aggregators the `mtl` section compares: one registry, every method once.

Each entry names a public metagrad aggregator and the keyword arguments the experiments give
it. A name that this version of metagrad does not export is skipped (and listed as skipped),
so the section runs on any branch and picks up the Jacobian aggregators once they are merged.
Whether a constructor takes `num_tasks` (as its one positional argument, the library's
convention when the state depends on T) is read from its signature, and keyword arguments it
does not accept are dropped (and reported), so the registry does not hard-code signatures.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import optax

import metagrad as mg


@dataclasses.dataclass(frozen=True)
class Spec:
    """One aggregator of the comparison."""

    name: str  # the metagrad function
    label: str  # the paper's name, for tables and plots
    kwargs: dict = dataclasses.field(default_factory=dict)
    losses: bool = False  # update takes losses=
    positive_losses: bool = False  # the method needs losses > 0 (toy: shifted)


# Paper defaults unless said otherwise. The loss-based methods get the losses (`losses=`).
REGISTRY: tuple[Spec, ...] = (
    Spec("mtl_sum", "Sum (plain MTL)"),
    Spec("pcgrad", "PCGrad", {"seed": 0}),
    Spec("gradvac", "GradVac", {"seed": 0}),
    Spec("mgda", "MGDA"),
    Spec("cagrad", "CAGrad", {"c": 0.5}),  # c = 0.5: the CAGrad paper's toy and MTL runs
    Spec("nash_mtl", "Nash-MTL"),
    Spec("imtl_g", "IMTL-G"),
    Spec("aligned_mtl", "Aligned-MTL"),
    Spec("upgrad", "UPGrad"),
    Spec("dualproj", "DualProj"),
    Spec("config", "ConFIG"),
    Spec("graddrop", "GradDrop", {"seed": 0}),
    Spec("gradnorm", "GradNorm", {"alpha": 1.5, "learning_rate": 0.025}, losses=True,
         positive_losses=True),
    Spec("uncertainty_weighting", "UW", {"learning_rate": optax.adam(0.025)}, losses=True,
         positive_losses=True),
    Spec("dwa", "DWA", {"temperature": 2.0}, losses=True, positive_losses=True),
    Spec("rlw", "RLW", {"seed": 0}, losses=True),
    # The authors' code steps the logits with Adam(0.025), weight decay 1e-3.
    Spec("famo", "FAMO", {"learning_rate": optax.adam(0.025), "weight_decay": 1e-3},
         losses=True, positive_losses=True),
    Spec("db_mtl", "DB-MTL", {"beta": 0.9, "beta_sigma": 0.0}, losses=True,
         positive_losses=True),
)  # fmt: skip

# Public callables of metagrad that are not multi-task aggregators (for `unlisted`).
_NOT_AGGREGATORS = {"recadam"}


def available(only: list[str] | None = None) -> tuple[list[Spec], list[str]]:
    """The registry's methods present in this metagrad, and the names skipped (absent)."""
    chosen = [s for s in REGISTRY if only is None or s.name in only]
    present = [s for s in chosen if callable(getattr(mg, s.name, None)) and s.name in mg.__all__]
    return present, [s.name for s in chosen if s not in present]


def unlisted() -> list[str]:
    """Public metagrad aggregators (an `...State`-less check by module) missing here."""
    names = {s.name for s in REGISTRY} | _NOT_AGGREGATORS
    out = []
    for name in mg.__all__:
        fn = getattr(mg, name)
        if name in names or not inspect.isfunction(fn):
            continue
        if ".mtl." in getattr(fn, "__module__", ""):
            out.append(name)
    return out


def build(spec: Spec, num_tasks: int) -> tuple[optax.GradientTransformation, list[str]]:
    """The aggregator; and the registry's keyword arguments its signature does not take."""
    fn: Callable[..., Any] = getattr(mg, spec.name)
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in spec.kwargs.items() if k in params}
    dropped = sorted(set(spec.kwargs) - set(kwargs))
    first = next(iter(params.values()), None)
    positional = first is not None and first.kind in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )
    if positional and first.name == "num_tasks":
        return fn(num_tasks, **kwargs), dropped
    return fn(**kwargs), dropped
