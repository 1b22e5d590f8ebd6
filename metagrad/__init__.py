"""metagrad: gradient-alignment meta-learning for JAX and Optax.

Please use only the names exported here; modules starting with an underscore
are private.
"""

from metagrad._base import MetaLearner as MetaLearner
from metagrad._gradnorm import GradNormState as GradNormState
from metagrad._gradnorm import gradnorm as gradnorm
from metagrad._inner import InnerRule as InnerRule
from metagrad._inner import learned_lr as learned_lr
from metagrad._inner import meta_sgd as meta_sgd
from metagrad._recadam import RecAdamState as RecAdamState
from metagrad._recadam import recadam as recadam
from metagrad.dotprod import DotProdState as DotProdState
from metagrad.dotprod import dotprod as dotprod
from metagrad.hvp import fd_hvp as fd_hvp
from metagrad.hvp import fd_step as fd_step
from metagrad.hvp import hvp as hvp
from metagrad.maml import MAMLState as MAMLState
from metagrad.maml import fomaml as fomaml
from metagrad.maml import maml as maml
from metagrad.maml import maml_pp_weights as maml_pp_weights
from metagrad.mtl import GradVacState as GradVacState
from metagrad.mtl import PCGradState as PCGradState
from metagrad.mtl import gradvac as gradvac
from metagrad.mtl import mtl_sum as mtl_sum
from metagrad.mtl import pcgrad as pcgrad
from metagrad.reptile import ReptileOuterState as ReptileOuterState
from metagrad.reptile import reptile_outer as reptile_outer

__version__ = "0.1.0"

__all__ = [
    "DotProdState",
    "GradNormState",
    "GradVacState",
    "InnerRule",
    "MAMLState",
    "MetaLearner",
    "PCGradState",
    "RecAdamState",
    "ReptileOuterState",
    "dotprod",
    "fd_hvp",
    "fd_step",
    "fomaml",
    "gradnorm",
    "gradvac",
    "hvp",
    "learned_lr",
    "maml",
    "maml_pp_weights",
    "meta_sgd",
    "mtl_sum",
    "pcgrad",
    "recadam",
    "reptile_outer",
]
