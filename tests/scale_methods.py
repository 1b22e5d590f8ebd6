"""The methods of the realistic-size tier (`test_scale.py`): one table, one builder per method.

Every public transformation, inner rule and meta-learner of metagrad has an entry (a test
compares the table with the public constructors of `metagrad.__all__`, found by their return
type). An entry builds, for a given parameter tree of `jax.ShapeDtypeStruct` leaves, one
jitted training step and its abstract arguments, and states the step's bound on XLA's
compiled temporary memory in units of the parameters' bytes P, with the reason.

What a step is:

- meta-learners: ``learner.step`` on B = `TASKS` tasks of K = `STEPS` inner steps;
- transformations of one gradient (reptile_outer, recadam): ``update`` and
  ``apply_updates``, the gradient an argument (dotprod also computes its second batch's
  gradients, through ``grad_fn``);
- aggregators: ``update`` (then ``optax.sgd`` and ``apply_updates``) of T = `AGG_TASKS`
  per-task gradients stacked on a leading axis, passed as an argument ([T, P]: the
  arguments hold them, so the temporary memory is what the aggregator adds to them; an
  aggregator that copies the stacked gradients needs T · P there, and says so).

Nothing runs on import (pytest's doctest collection imports this file).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import metagrad as mg
from experiments.bench_grad_share import resnet12_shapes

TASKS, STEPS, AGG_TASKS = 2, 2, 3  # B tasks per meta-batch, K inner steps, T stacked tasks
EXAMPLES = 8


def abstract(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def resnet12_tree() -> dict:
    """ResNet-12's parameters (12.4M in 50 leaves), abstract."""
    return {f"l{i:02d}": abstract(s) for i, s in enumerate(resnet12_shapes())}


def flat_tree(num_leaves: int, total: int) -> dict:
    """`total` parameters in `num_leaves` leaves of (nearly) equal size, abstract."""
    sizes = [total // num_leaves] * (num_leaves - 1)
    sizes.append(total - sum(sizes))
    return {f"l{i:02d}": abstract((n,)) for i, n in enumerate(sizes)}


def num_bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def loss_fn(params, batch):
    """Touches every parameter with a non-zero Hessian, at almost no cost."""
    scale = jnp.mean(batch)
    return scale * sum(jnp.sum(jnp.tanh(p)) for p in jax.tree.leaves(params))


Build = Callable[[dict], tuple[Any, tuple]]  # params -> (jitted step, abstract arguments)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One method of the tier.

    Attributes:
      build: ``build(params) -> (step, args)``: a jitted step and its abstract arguments.
      bound: compiled temporary memory <= bound · P.
      why: what the method keeps, from which the bound is derived.
      covers: the public constructors (names in `metagrad.__all__`) the entry exercises.
      leaves: whether the entry is also compiled on a tree of 5 leaves of the same total size,
        to check that nothing it does costs parameters × leaves (temporary memory and flops).
    """

    build: Build
    bound: float
    why: str
    covers: tuple[str, ...]
    leaves: bool = False


# -- meta-learners ----------------------------------------------------------------------------


def _meta(make: Callable[[], mg.MetaLearner]) -> Build:
    def build(params):
        learner = make()
        batch = abstract((TASKS, EXAMPLES))
        return learner.step, (jax.eval_shape(learner.init, params), (batch, batch))

    return build


def _maml(inner, **kwargs):
    return _meta(lambda: mg.maml(loss_fn, inner(), STEPS, optax.adam(1e-3), **kwargs))


def _seq_reptile(params):
    learner = mg.seq_reptile(
        lambda p, b, t: loss_fn(p, b) * (1.0 + t), optax.sgd(0.01), STEPS, 0.1, pass_task_id=True
    )
    tasks = (abstract((STEPS,), jnp.int32), abstract((STEPS, EXAMPLES)))
    return learner.step, (jax.eval_shape(learner.init, params), tasks)


def _last_leaf(params):
    """ANIL: the inner loop adapts the head only (the last leaf)."""
    names = sorted(params)
    return {k: k == names[-1] for k in params}


# -- transformations --------------------------------------------------------------------------


def transform(make: Callable[[], optax.GradientTransformation], tail: bool = True) -> Build:
    """``update`` of one gradient (an argument), then ``apply_updates``."""

    def build(params):
        tx = optax.chain(make(), optax.sgd(1e-3)) if tail else make()

        @jax.jit
        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return step, (params, jax.eval_shape(tx.init, params), params)

    return build


def _dotprod(scheme):
    def build(params):
        tx = optax.chain(mg.dotprod(scheme=scheme), optax.adam(1e-3))

        @jax.jit
        def step(params, state, b1, b2):
            grads = jax.grad(loss_fn)(params, b1)
            grad_fn = lambda p: jax.grad(loss_fn)(p, b2)
            updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
            return optax.apply_updates(params, updates), state

        batch = abstract((EXAMPLES,))
        return step, (params, jax.eval_shape(tx.init, params), batch, batch)

    return build


def _aggregate(make: Callable[[], optax.GradientTransformation], losses: bool = False) -> Build:
    """``update`` of T stacked task gradients (an argument), ``optax.sgd``, ``apply_updates``."""

    def build(params):
        tx = optax.chain(make(), optax.sgd(1e-3))

        @jax.jit
        def step(params, state, grads, task_losses):
            extra = {"losses": task_losses} if losses else {}
            updates, state = tx.update(grads, state, params, **extra)
            return optax.apply_updates(params, updates), state

        stacked = jax.tree.map(lambda p: abstract((AGG_TASKS, *p.shape), p.dtype), params)
        state = jax.eval_shape(tx.init, params)
        return step, (params, state, stacked, abstract((AGG_TASKS,)))

    return build


T = AGG_TASKS
B, K = TASKS, STEPS

# Temporary memory, in units of the parameters' bytes P (B = TASKS, K = STEPS, T = AGG_TASKS;
# here B = 2, K = 2, T = 3). A single leaf's temporary (a transposed copy of the largest
# leaf, 0.3 P in ResNet-12) comes on top of some; the bounds leave that room.
TABLE: dict[str, Entry] = {
    # -- meta-learners
    "maml": Entry(
        _maml(lambda: optax.sgd(0.01)),
        (3 * K + 2) * B,
        "per inner step and task the adapted params and the loss's derivatives there for the "
        "backward pass (3 [B, P] arrays with this loss), plus the backward pass's own: (3K + 2)B",
        ("maml",),
    ),
    "fomaml": Entry(
        _meta(lambda: mg.fomaml(loss_fn, optax.sgd(0.01), STEPS, optax.adam(1e-3))),
        2 * B,
        "the adapted params and their query gradient: 2B",
        ("fomaml",),
    ),
    "maml+anil": Entry(
        _maml(lambda: optax.sgd(0.01), inner_mask=_last_leaf),
        B,
        "the inner loop adapts the head only: the tasks' query gradients of the shared body, "
        "B (a per-task copy of the body per inner step would show as (3K + 2)B)",
        ("maml",),
    ),
    "maml+grad_share": Entry(
        _maml(lambda: mg.grad_share(0.01)),
        (4 * K + 4) * B,
        "MAML's, plus each step's task gradients g_{t,k} ([B, P], its gate and normalization "
        "are differentiated through them), G ([P] per step) and their flat copies: (4K + 4)B",
        ("grad_share",),
        leaves=True,
    ),
    "maml+meta_sgd": Entry(
        _maml(lambda: mg.meta_sgd(0.01)),
        (3 * K + 2) * B,
        "MAML's; the rates are [P], not [B, P]: (3K + 2)B",
        ("meta_sgd",),
    ),
    "fomaml+learned_lr": Entry(
        _maml(lambda: mg.learned_lr(0.01, per_step=True, granularity="layer"), first_order=True),
        (K + 2) * B,
        "first-order MAML's 2B, plus each inner step's task gradients [B, P] (the rates' "
        "meta-gradient goes through the rule's arithmetic, α_k ⊙ g_{t,k}); the per-leaf, "
        "per-step rates are K x leaves scalars: (K + 2)B",
        ("learned_lr",),
        leaves=True,
    ),
    "imaml": Entry(
        _meta(lambda: mg.imaml(loss_fn, optax.sgd(0.01), STEPS, optax.adam(1e-3), cg_steps=2)),
        7 * B,
        "the inner loop is not differentiated (memory does not grow with K): per task the "
        "adapted params, the query gradient, CG's x, r and p, and the Hessian-vector product "
        "A p with its jvp's tangent: 7B",
        ("imaml",),
    ),
    "reptile": Entry(
        _meta(lambda: mg.reptile(loss_fn, optax.sgd(0.01), STEPS, optax.sgd(1.0))),
        3 * B + 1,
        "the tasks' params, updates and gradients, and their mean: 3B + 1",
        ("reptile",),
    ),
    "seq_reptile": Entry(
        _seq_reptile, 2, "one trajectory: the params and a gradient, 2", ("seq_reptile",)
    ),
    # -- transformations of one gradient
    "dotprod": Entry(
        _dotprod("forward"),
        2,
        "the shifted params and one extra gradient: 2",
        ("dotprod",),
        leaves=True,
    ),
    "dotprod/exact": Entry(
        _dotprod("exact"),
        2,
        "the gradient and its HVP along Ḡ1 (one jvp of the gradient): 2",
        ("dotprod",),
        leaves=True,
    ),
    "reptile_outer": Entry(
        transform(lambda: mg.reptile_outer(optax.sgd(0.01), STEPS), tail=False),
        1,
        "the inner optimizer's running point: 1",
        ("reptile_outer",),
    ),
    "recadam": Entry(
        transform(lambda: mg.recadam(1e-3), tail=False),
        1,
        "Adam's moments are state (arguments); the update's temporaries: 1",
        ("recadam",),
    ),
    # -- aggregators (the stacked [T, P] gradients are an argument)
    "mtl_sum": Entry(
        _aggregate(mg.mtl_sum), 1, "the sum, fused into its output: 1", ("mtl_sum",), leaves=True
    ),
}

# Gram-path aggregators: the T x T Gram matrix, a solver on it, one weighted sum per leaf.
_GRAM = {
    "mgda": lambda: mg.mgda(),
    "cagrad": lambda: mg.cagrad(),
    "nash_mtl": lambda: mg.nash_mtl(T),
    "imtl_g": lambda: mg.imtl_g(),
    "aligned_mtl": lambda: mg.aligned_mtl(),
    "upgrad": lambda: mg.upgrad(),
    "dualproj": lambda: mg.dualproj(),
    "config": lambda: mg.config(),
}
for _name, _make in _GRAM.items():
    TABLE[_name] = Entry(
        _aggregate(_make),
        1,
        "the Gram matrix (T x T) and the weighted sum (its output): nothing parameter-sized "
        "but one leaf's temporaries: 1",
        (_name,),
        leaves=True,
    )

# Loss-weighting aggregators: T weights from the losses (and small state), one weighted sum.
_WEIGHTING = {
    "gradnorm": lambda: mg.gradnorm(T),
    "uncertainty_weighting": lambda: mg.uncertainty_weighting(T),
    "dwa": lambda: mg.dwa(T),
    "rlw": lambda: mg.rlw(),
    "famo": lambda: mg.famo(T),
}
for _name, _make in _WEIGHTING.items():
    TABLE[_name] = Entry(
        _aggregate(_make, losses=True),
        1,
        "T weights (from the losses; gradnorm's from per-task norms too) and the weighted "
        "sum (its output): nothing parameter-sized but one leaf's temporaries: 1",
        (_name,),
        leaves=_name == "gradnorm",
    )
# DB-MTL's state is an EMA of each task's (log-loss) gradient, [T, P]: the new one is held
# until the whole step is known to be finite (else the state is kept whole).
TABLE["db_mtl"] = Entry(
    _aggregate(lambda: mg.db_mtl(T), losses=True),
    T,
    "the new EMA of the T task gradients [T, P], held until the step is known finite: T",
    ("db_mtl",),
    leaves=True,
)

TABLE.update(
    {
        "pcgrad": Entry(
            _aggregate(lambda: mg.pcgrad()),
            T,
            "the projected task gradients, one [P] per task, T",
            ("pcgrad",),
            leaves=True,
        ),
        "pcgrad/leaf": Entry(
            _aggregate(lambda: mg.pcgrad(granularity="leaf")),
            T,
            "per leaf, the projected task gradients: T",
            ("pcgrad",),
            leaves=True,
        ),
        "gradvac": Entry(
            _aggregate(lambda: mg.gradvac(T)),
            T,
            "the adjusted task gradients, one [P] per task: T",
            ("gradvac",),
            leaves=True,
        ),
        "graddrop": Entry(
            _aggregate(lambda: mg.graddrop()),
            T + 2,
            "per coordinate the sign purity and a uniform draw (threefry's bits), and the "
            "masked task gradients [T, P]: T + 2",
            ("graddrop",),
            leaves=True,
        ),
    }
)


def public_constructors() -> set[str]:
    """The public names of metagrad that build a method: by their declared return type."""
    kinds = ("GradientTransformation", "MetaLearner", "InnerRule")
    names = set()
    for name in mg.__all__:
        obj = getattr(mg, name)
        if inspect.isfunction(obj):
            returns = str(inspect.signature(obj).return_annotation)
            if any(kind in returns for kind in kinds):
                names.add(name)
    return names
