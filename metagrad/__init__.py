"""metagrad: gradient-alignment meta-learning for JAX and Optax.

Please use only the names exported here; modules starting with an underscore
are private.
"""

from metagrad._base import MetaLearner as MetaLearner
from metagrad.reptile import ReptileOuterState as ReptileOuterState
from metagrad.reptile import reptile_outer as reptile_outer

__version__ = "0.1.0"

__all__ = [
    "MetaLearner",
    "ReptileOuterState",
    "reptile_outer",
]
