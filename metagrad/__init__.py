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
from metagrad.adapt import adapt as adapt
from metagrad.diagnostics import mean_pairwise_cosine as mean_pairwise_cosine
from metagrad.diagnostics import pairwise_cosine as pairwise_cosine
from metagrad.diagnostics import pairwise_dot as pairwise_dot
from metagrad.diagnostics import task_gradients as task_gradients
from metagrad.dotprod import DotProdState as DotProdState
from metagrad.dotprod import dotprod as dotprod
from metagrad.grad_share import GradShareCarry as GradShareCarry
from metagrad.grad_share import GradShareParams as GradShareParams
from metagrad.grad_share import grad_share as grad_share
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
from metagrad.reptile import ReptileState as ReptileState
from metagrad.reptile import reptile as reptile
from metagrad.reptile import reptile_outer as reptile_outer
from metagrad.seq_reptile import seq_reptile as seq_reptile
from metagrad.tasks import mixed_probs as mixed_probs
from metagrad.tasks import mixed_schedule as mixed_schedule
from metagrad.tasks import sample_tasks as sample_tasks
from metagrad.tasks import task_probs as task_probs
from metagrad.tasks import uniform_tasks as uniform_tasks

__version__ = "0.1.0"

__all__ = [
    "DotProdState",
    "GradNormState",
    "GradShareCarry",
    "GradShareParams",
    "GradVacState",
    "InnerRule",
    "MAMLState",
    "MetaLearner",
    "PCGradState",
    "RecAdamState",
    "ReptileOuterState",
    "ReptileState",
    "adapt",
    "dotprod",
    "fd_hvp",
    "fd_step",
    "fomaml",
    "grad_share",
    "gradnorm",
    "gradvac",
    "hvp",
    "learned_lr",
    "maml",
    "maml_pp_weights",
    "mean_pairwise_cosine",
    "meta_sgd",
    "mixed_probs",
    "mixed_schedule",
    "mtl_sum",
    "pairwise_cosine",
    "pairwise_dot",
    "pcgrad",
    "recadam",
    "reptile",
    "reptile_outer",
    "sample_tasks",
    "seq_reptile",
    "task_gradients",
    "task_probs",
    "uniform_tasks",
]
