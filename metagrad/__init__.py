"""metagrad: gradient-alignment meta-learning for JAX and Optax.

Please use only the names exported here; modules starting with an underscore
are private.
"""

from metagrad._src.adapt import adapt as adapt
from metagrad._src.base import MetaLearner as MetaLearner
from metagrad._src.diagnostics import mean_pairwise_cosine as mean_pairwise_cosine
from metagrad._src.diagnostics import pairwise_cosine as pairwise_cosine
from metagrad._src.diagnostics import pairwise_dot as pairwise_dot
from metagrad._src.diagnostics import task_gradients as task_gradients
from metagrad._src.dotprod import DotProdState as DotProdState
from metagrad._src.dotprod import dotprod as dotprod
from metagrad._src.fomaml import fomaml as fomaml
from metagrad._src.grad_share import GradShareCarry as GradShareCarry
from metagrad._src.grad_share import GradShareParams as GradShareParams
from metagrad._src.grad_share import grad_share as grad_share
from metagrad._src.hvp import fd_hvp as fd_hvp
from metagrad._src.hvp import fd_step as fd_step
from metagrad._src.hvp import hvp as hvp
from metagrad._src.imaml import IMAMLState as IMAMLState
from metagrad._src.imaml import imaml as imaml
from metagrad._src.inner_rules import InnerRule as InnerRule
from metagrad._src.inner_rules import learned_lr as learned_lr
from metagrad._src.inner_rules import meta_sgd as meta_sgd
from metagrad._src.maml import MAMLState as MAMLState
from metagrad._src.maml import maml as maml
from metagrad._src.maml_pp import maml_pp_weights as maml_pp_weights
from metagrad._src.mtl.aligned_mtl import aligned_mtl as aligned_mtl
from metagrad._src.mtl.cagrad import cagrad as cagrad
from metagrad._src.mtl.config import config as config
from metagrad._src.mtl.db_mtl import DBMTLState as DBMTLState
from metagrad._src.mtl.db_mtl import db_mtl as db_mtl
from metagrad._src.mtl.dualproj import dualproj as dualproj
from metagrad._src.mtl.dwa import DWAState as DWAState
from metagrad._src.mtl.dwa import dwa as dwa
from metagrad._src.mtl.famo import FAMOState as FAMOState
from metagrad._src.mtl.famo import famo as famo
from metagrad._src.mtl.graddrop import GradDropState as GradDropState
from metagrad._src.mtl.graddrop import graddrop as graddrop
from metagrad._src.mtl.gradnorm import GradNormState as GradNormState
from metagrad._src.mtl.gradnorm import gradnorm as gradnorm
from metagrad._src.mtl.imtl_g import imtl_g as imtl_g
from metagrad._src.mtl.mgda import mgda as mgda
from metagrad._src.mtl.nash_mtl import NashMTLState as NashMTLState
from metagrad._src.mtl.nash_mtl import nash_mtl as nash_mtl
from metagrad._src.mtl.recadam import RecAdamState as RecAdamState
from metagrad._src.mtl.recadam import recadam as recadam
from metagrad._src.mtl.rlw import RLWState as RLWState
from metagrad._src.mtl.rlw import rlw as rlw
from metagrad._src.mtl.surgery import GradVacState as GradVacState
from metagrad._src.mtl.surgery import PCGradState as PCGradState
from metagrad._src.mtl.surgery import gradvac as gradvac
from metagrad._src.mtl.surgery import mtl_sum as mtl_sum
from metagrad._src.mtl.surgery import pcgrad as pcgrad
from metagrad._src.mtl.uncertainty import UncertaintyWeightingState as UncertaintyWeightingState
from metagrad._src.mtl.uncertainty import uncertainty_weighting as uncertainty_weighting
from metagrad._src.mtl.upgrad import upgrad as upgrad
from metagrad._src.options import LearnerOptions as LearnerOptions
from metagrad._src.reptile import ReptileState as ReptileState
from metagrad._src.reptile import reptile as reptile
from metagrad._src.reptile_outer import ReptileOuterState as ReptileOuterState
from metagrad._src.reptile_outer import reptile_outer as reptile_outer
from metagrad._src.seq_reptile import seq_reptile as seq_reptile
from metagrad._src.tasks import mixed_probs as mixed_probs
from metagrad._src.tasks import mixed_schedule as mixed_schedule
from metagrad._src.tasks import sample_tasks as sample_tasks
from metagrad._src.tasks import task_probs as task_probs
from metagrad._src.tasks import uniform_tasks as uniform_tasks

__version__ = "0.1.0"

__all__ = [
    "DBMTLState",
    "DWAState",
    "DotProdState",
    "FAMOState",
    "GradDropState",
    "GradNormState",
    "GradShareCarry",
    "GradShareParams",
    "GradVacState",
    "IMAMLState",
    "InnerRule",
    "LearnerOptions",
    "MAMLState",
    "MetaLearner",
    "NashMTLState",
    "PCGradState",
    "RLWState",
    "RecAdamState",
    "ReptileOuterState",
    "ReptileState",
    "UncertaintyWeightingState",
    "adapt",
    "aligned_mtl",
    "cagrad",
    "config",
    "db_mtl",
    "dotprod",
    "dualproj",
    "dwa",
    "famo",
    "fd_hvp",
    "fd_step",
    "fomaml",
    "grad_share",
    "graddrop",
    "gradnorm",
    "gradvac",
    "hvp",
    "imaml",
    "imtl_g",
    "learned_lr",
    "maml",
    "maml_pp_weights",
    "mean_pairwise_cosine",
    "meta_sgd",
    "mgda",
    "mixed_probs",
    "mixed_schedule",
    "mtl_sum",
    "nash_mtl",
    "pairwise_cosine",
    "pairwise_dot",
    "pcgrad",
    "recadam",
    "reptile",
    "reptile_outer",
    "rlw",
    "sample_tasks",
    "seq_reptile",
    "task_gradients",
    "task_probs",
    "uncertainty_weighting",
    "uniform_tasks",
    "upgrad",
]
