"""The experiment registry: which modules make up the suite, and importing them.

Every experiment is a module under `experiments/` following one contract::

    NAME = "sinusoid"                  # the command-line name
    DESCRIPTION = "one line for --help"
    def add_arguments(parser): ...     # optional, options prefixed with the name
    LONG = True                        # optional: a parallel run (--jobs) starts it first
    def run(out_dir, *, budget="quick", seed=0, progress=True, args=None) -> list[dict]

`run` writes its own files into `out_dir` (one directory per experiment) and returns
table rows: flat dicts of str/float, each with a "method" key. A row may carry an "error"
key instead of numbers, for a method that raised (`experiments.writers.error_row`); the
command line reports it as a failure. Settings come from `experiments.config`.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

# name -> (module, in the default suite). Order is the run order.
REGISTRY: dict[str, tuple[str, bool]] = {
    "synthetic": ("experiments.synthetic", True),
    "sinusoid": ("experiments.sinusoid", True),
    "digits": ("experiments.digits", True),
    "grad_share": ("experiments.grad_share_sinusoid", True),
    "mtl": ("experiments.mtl", True),
    # Conv-4 on the rendered glyph set by default (no download); Omniglot / CUB /
    # Mini-ImageNet with --fewshot-dataset when prepared for tensorflow_datasets.
    "fewshot": ("experiments.fewshot", True),
    # Gradient sharing's claims on Conv-4 glyph episodes: several minutes, optional.
    "grad_share_glyphs": ("experiments.grad_share_glyphs", False),
    # Meta DotProd over weight x training-set size x label noise (digits, glyphs): optional.
    "dotprod_sweep": ("experiments.dotprod_sweep", False),
}


@dataclasses.dataclass
class Experiment:
    """One entry of the registry, after trying to import it."""

    name: str
    module_name: str
    default: bool
    module: ModuleType | None = None
    error: str | None = None  # why it cannot run (missing module, import error)

    @property
    def description(self) -> str:
        if self.module is None:
            return f"UNAVAILABLE: {self.error}"
        return getattr(self.module, "DESCRIPTION", "")


def discover(registry: dict[str, tuple[str, bool]] | None = None) -> dict[str, Experiment]:
    """Imports every registered experiment module, recording why one cannot be used."""
    found = {}
    for name, (module_name, default) in (registry or REGISTRY).items():
        exp = Experiment(name, module_name, default)
        try:
            exp.module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                path = module_name.replace(".", "/") + ".py"
                exp.error = f"module {path} not found"
            else:
                exp.error = f"import failed: {type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
            exp.error = f"import failed: {type(e).__name__}: {e}"
        if exp.module is not None and not callable(getattr(exp.module, "run", None)):
            exp.error, exp.module = f"{module_name} has no run(out_dir, ...) function", None
        found[name] = exp
    return found
