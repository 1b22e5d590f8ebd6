"""metagrad: gradient-alignment meta-learning for JAX and Optax.

Please use only the names exported here; modules starting with an underscore
are private.
"""

from metagrad._base import MetaLearner as MetaLearner
from metagrad.dotprod import DotProdState as DotProdState
from metagrad.dotprod import dotprod as dotprod
from metagrad.hvp import fd_hvp as fd_hvp
from metagrad.hvp import fd_step as fd_step
from metagrad.hvp import hvp as hvp
from metagrad.reptile import ReptileOuterState as ReptileOuterState
from metagrad.reptile import reptile_outer as reptile_outer

__version__ = "0.1.0"

__all__ = [
    "DotProdState",
    "MetaLearner",
    "ReptileOuterState",
    "dotprod",
    "fd_hvp",
    "fd_step",
    "hvp",
    "reptile_outer",
]
