"""metagrad: gradient-alignment meta-learning for JAX and Optax.

Please use only the names exported here; modules starting with an underscore
are private.
"""

from metagrad._base import MetaLearner as MetaLearner

__version__ = "0.1.0"

__all__ = [
    "MetaLearner",
]
