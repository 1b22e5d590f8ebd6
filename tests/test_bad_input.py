"""Bad arguments and inputs across the public API: clear errors naming the parameter.

Each row calls one public function with one bad argument or input and states the error
type and a message pattern that names the parameter and what was expected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import metagrad as mg


def loss(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] - y) ** 2)


def seq_loss(params, batch, task_id):
    del task_id
    return loss(params, batch)


PARAMS = {"w": jnp.zeros(3)}
X, Y = jnp.ones((4, 5, 3)), jnp.ones((4, 5))  # 4 tasks of 5 points
TASKS = ((X, Y), (X, Y))  # (support, query)
KEY = jax.random.key(0)


def grad_fn(p):
    return jax.grad(loss)(p, (X[0], Y[0]))


def _dotprod_update(**kwargs):
    tx = mg.dotprod()
    args = dict(updates=PARAMS, state=tx.init(PARAMS), params=PARAMS, grad_fn=grad_fn)
    args.update(kwargs)
    return tx.update(args.pop("updates"), args.pop("state"), args.pop("params"), **args)


def _maml_step(tasks, **kwargs):
    learner = mg.maml(loss, optax.sgd(0.1), 2, optax.adam(1e-2), **kwargs)
    return learner.step(learner.init(PARAMS), tasks)


def _aux_loss_step():
    learner = mg.maml(lambda p, b: (loss(p, b), {"mse": loss(p, b)}), optax.sgd(0.1), 1, 0.01)
    return learner.step(learner.init(PARAMS), TASKS)


def _reptile_step(tasks, **kwargs):
    learner = mg.reptile(loss, optax.sgd(0.1), 2, 0.5, **kwargs)
    return learner.step(learner.init(PARAMS), tasks)


def _seq_step(tasks):
    learner = mg.seq_reptile(seq_loss, optax.sgd(0.1), 4, 0.5, pass_task_id=True)
    return learner.step(learner.init(PARAMS), tasks)


def _reptile_outer_update(updates):
    tx = mg.reptile_outer(optax.sgd(0.1), 3)
    return tx.update(updates, tx.init(PARAMS), PARAMS)


# (id, call, error type, message pattern)
CASES = [
    # dotprod: hyper-parameters
    ("dotprod/inner_alpha<0", lambda: mg.dotprod(inner_alpha=-1e-3), ValueError,
     r"inner_alpha must be > 0"),
    ("dotprod/inner_alpha-str", lambda: mg.dotprod(inner_alpha="1e-7"), TypeError,
     r"inner_alpha must be a number"),
    ("dotprod/weight-str", lambda: mg.dotprod(weight="0.1"), TypeError,
     r"weight must be a float, a scalar array or an optax schedule"),
    ("dotprod/weight-nan", lambda: mg.dotprod(weight=float("nan")), ValueError,
     r"weight must be finite"),
    ("dotprod/weight-vector", lambda: mg.dotprod(weight=jnp.ones(2)), ValueError,
     r"weight must be a scalar"),
    ("dotprod/every=0", lambda: mg.dotprod(every=0), ValueError, r"every must be an integer >= 2"),
    ("dotprod/every=1", lambda: mg.dotprod(every=1), ValueError, r"every must be an integer >= 2"),
    ("dotprod/every-float", lambda: mg.dotprod(every=2.5), TypeError,
     r"every must be an integer >= 2"),
    ("dotprod/weight<0", lambda: mg.dotprod(weight=-0.1), ValueError, r"weight must be >= 0"),
    ("dotprod/inner_alpha-nan-array", lambda: mg.dotprod(inner_alpha=jnp.array(jnp.nan)),
     ValueError, r"inner_alpha must be finite"),
    ("dotprod/mask-leaf", lambda: mg.dotprod(mask={"w": 1}), TypeError,
     r"mask must be a pytree of Python bools"),
    ("dotprod/mask-structure",
     lambda: mg.dotprod(mask={"v": True}).update(PARAMS, mg.dotprod().init(PARAMS), PARAMS,
                                                 grad_fn=grad_fn),
     ValueError, r"mask must have the tree structure of params"),
    ("dotprod/inside-optax.masked",
     lambda: optax.masked(mg.dotprod(), {"w": False}).init(PARAMS), ValueError,
     r"cannot run inside optax.masked or optax.multi_transform.*pass mask= to dotprod"),
    ("dotprod/scheme", lambda: mg.dotprod(scheme="backward"), ValueError,
     r"scheme must be one of \('forward', 'central', 'exact'\)"),
    # dotprod: call-time inputs
    ("dotprod/no-grad_fn", lambda: _dotprod_update(grad_fn=None), ValueError, r"needs grad_fn"),
    ("dotprod/grad_fn-not-callable", lambda: _dotprod_update(grad_fn=3), TypeError,
     r"grad_fn must be callable"),
    ("dotprod/updates-tree", lambda: _dotprod_update(updates={"v": jnp.zeros(3)}), ValueError,
     r"updates must have the same tree structure as params"),
    ("dotprod/grad_fn-shape", lambda: _dotprod_update(grad_fn=lambda p: {"w": jnp.ones(4)}),
     ValueError, r"grad_fn\(params\) must have the leaf shapes of params"),
    ("dotprod/int-params",
     lambda: _dotprod_update(updates={"w": jnp.ones(3, int)}, params={"w": jnp.ones(3, int)},
                             grad_fn=lambda p: p),
     TypeError, r"params must contain at least one floating-point array"),
    # hvp / fd_hvp / fd_step
    ("hvp/grad_fn", lambda: mg.hvp(3, PARAMS, PARAMS), TypeError, r"grad_fn must be callable"),
    ("hvp/v-shape", lambda: mg.hvp(grad_fn, PARAMS, {"w": jnp.ones(4)}), ValueError,
     r"v must have the leaf shapes of params"),
    ("fd_hvp/step=0", lambda: mg.fd_hvp(grad_fn, PARAMS, PARAMS, step=0.0), ValueError,
     r"step must be > 0"),
    ("fd_hvp/scheme", lambda: mg.fd_hvp(grad_fn, PARAMS, PARAMS, scheme="exact"), ValueError,
     r"scheme must be one of \('forward', 'central'\)"),
    # reptile_outer
    ("reptile_outer/inner", lambda: mg.reptile_outer("sgd", 3), TypeError,
     r"inner must be an optax.GradientTransformation"),
    ("reptile_outer/inner_steps=0", lambda: mg.reptile_outer(optax.sgd(0.1), 0), ValueError,
     r"inner_steps must be an integer >= 1"),
    ("reptile_outer/inner_steps-float", lambda: mg.reptile_outer(optax.sgd(0.1), 2.0), TypeError,
     r"inner_steps must be an integer >= 1"),
    ("reptile_outer/outer<0", lambda: mg.reptile_outer(optax.sgd(0.1), 3, -0.5), ValueError,
     r"outer must be > 0"),
    ("reptile_outer/outer-nan-array",
     lambda: mg.reptile_outer(optax.sgd(0.1), 3, jnp.array(jnp.nan)), ValueError,
     r"outer must be finite"),
    ("reptile_outer/inner_steps-float-array",
     lambda: mg.reptile_outer(optax.sgd(0.1), jnp.array(2.0)), TypeError,
     r"inner_steps must be an integer >= 1, got an array of dtype float32"),
    ("reptile_outer/outer-str", lambda: mg.reptile_outer(optax.sgd(0.1), 3, "adam"),
     TypeError, r"outer must be an optax GradientTransformation, or a step size"),
    ("reptile_outer/reset-str",
     lambda: mg.reptile_outer(optax.sgd(0.1), 3, reset_inner_state="yes"), TypeError,
     r"reset_inner_state must be a bool"),
    ("reptile_outer/no-params",
     lambda: mg.reptile_outer(optax.sgd(0.1), 3).update(PARAMS, mg.reptile_outer(
         optax.sgd(0.1), 3).init(PARAMS)), ValueError, r"requires params"),
    ("reptile_outer/updates-tree", lambda: _reptile_outer_update({"v": jnp.zeros(3)}),
     ValueError, r"updates must have the same tree structure as params"),
    ("reptile_outer/updates-shape", lambda: _reptile_outer_update({"w": jnp.zeros(4)}),
     ValueError, r"updates must have the leaf shapes of params"),
    # reptile
    ("reptile/loss_fn", lambda: mg.reptile(3, optax.sgd(0.1), 2, 0.5), TypeError,
     r"loss_fn must be callable"),
    ("reptile/outer<0", lambda: mg.reptile(loss, optax.sgd(0.1), 2, -1.0), ValueError,
     r"outer must be > 0"),
    ("reptile/flag", lambda: mg.reptile(loss, optax.sgd(0.1), 2, 0.5, batch_per_step=1),
     TypeError, r"batch_per_step must be a bool"),
    ("reptile/empty-tasks", lambda: _reptile_step(()), TypeError,
     r"tasks must be a pair \(support, query\)"),
    ("reptile/support-only", lambda: _reptile_step((X, Y)), ValueError,
     r"loss_fn\(params, batch\) failed on the support batch of task 0"),
    ("maml/loss-returns-tuple", _aux_loss_step, ValueError,
     r"returned a tuple .*loss_fn must return a scalar \(no has_aux\)"),
    ("reptile/zero-tasks", lambda: _reptile_step(((X[:0], Y[:0]), (X[:0], Y[:0]))), ValueError,
     r"tasks must hold at least one task"),
    ("reptile/task-axes", lambda: _reptile_step(((X, Y[:3]), (X, Y))), ValueError,
     r"tasks: the support leaves have different leading \(task\) axes"),
    ("reptile/batch_per_step-K",
     lambda: _reptile_step(((X, Y), (X, Y)), batch_per_step=True), ValueError,
     r"tasks: support leaves must have leading axes \[num_tasks, inner_steps, ...\]"),
    ("reptile/alignment-one-task",
     lambda: _reptile_step(((X[:1], Y[:1]), (X[:1], Y[:1])), alignment=True), ValueError,
     r"alignment=True needs at least 2 tasks"),
    # maml family
    ("maml/outer-str", lambda: mg.maml(loss, optax.sgd(0.1), 1, "adam"), TypeError,
     r"outer must be an optax GradientTransformation, or a step size"),
    ("maml/outer-negative", lambda: mg.maml(loss, optax.sgd(0.1), 1, -1e-3), ValueError,
     r"outer must be > 0"),
    ("maml/inner-factory", lambda: mg.maml(loss, optax.sgd, 1, 0.01), TypeError,
     r"inner got the optimizer factory sgd, not an optimizer: call it"),
    ("reptile/outer-loss", lambda: mg.reptile(loss, 0.1, 1, loss), TypeError,
     r"outer must be .*a function of the step count.*2 required arguments"),
    ("maml/inner", lambda: mg.maml(loss, "sgd", 1, optax.adam(1e-3)), TypeError,
     r"inner must be an optax GradientTransformation or a metagrad InnerRule"),
    ("maml/inner_steps", lambda: mg.maml(loss, optax.sgd(0.1), -1, optax.adam(1e-3)),
     ValueError, r"inner_steps must be an integer >= 1"),
    ("maml/multi_step_loss=0",
     lambda: mg.maml(loss, optax.sgd(0.1), 2, optax.adam(1e-3), multi_step_loss=0),
     ValueError, r"multi_step_loss must be an integer >= 1"),
    ("maml/multi_step_loss-bool",
     lambda: mg.maml(loss, optax.sgd(0.1), 2, optax.adam(1e-3), multi_step_loss=True),
     TypeError, r"multi_step_loss must be None, an int or a callable"),
    ("maml/multi_step_loss-shape", lambda: _maml_step(TASKS, multi_step_loss=lambda c: jnp.ones(3)),
     ValueError, r"multi_step_loss must return inner_steps = 2 weights"),
    ("maml/first_order-flag",
     lambda: mg.maml(loss, optax.sgd(0.1), 1, optax.adam(1e-3), first_order="no"), TypeError,
     r"first_order must be a bool"),
    ("maml/remat-flag", lambda: mg.maml(loss, optax.sgd(0.1), 1, optax.adam(1e-3), remat=1),
     TypeError, r"remat must be a bool"),
    ("fomaml/first_order", lambda: mg.fomaml(loss, optax.sgd(0.1), 1, optax.adam(1e-3),
                                             first_order=False),
     TypeError, r"first_order is fixed to True by fomaml"),
    ("maml/tasks-not-pair", lambda: _maml_step({"support": (X, Y)}), TypeError,
     r"tasks must be a pair \(support, query\)"),
    ("maml/empty-support", lambda: _maml_step(((), (X, Y))), ValueError,
     r"tasks: support has no array leaves"),
    ("maml/zero-tasks", lambda: _maml_step(((X[:0], Y[:0]), (X[:0], Y[:0]))), ValueError,
     r"tasks must hold at least one task"),
    ("maml/support-vs-query", lambda: _maml_step(((X, Y), (X[:3], Y[:3]))), ValueError,
     r"tasks: support and query have different numbers of tasks \(4 vs 3\)"),
    ("maml/task-axes", lambda: _maml_step(((X, Y[:3]), (X, Y))), ValueError,
     r"tasks: the support leaves have different leading \(task\) axes"),
    ("maml/adapt-num_steps",
     lambda: (lambda m: m.adapt(m.init(PARAMS), (X[0], Y[0]), 0))(
         mg.maml(loss, optax.sgd(0.1), 1, optax.adam(1e-3))),
     ValueError, r"num_steps must be an integer >= 1"),
    ("maml/inner_mask-structure",
     lambda: mg.maml(loss, optax.sgd(0.1), 1, 0.1, inner_mask={"v": True}).init(PARAMS),
     ValueError, r"inner_mask must have the tree structure of params"),
    ("maml/inner_mask-leaf",
     lambda: mg.maml(loss, optax.sgd(0.1), 1, optax.adam(1e-3), inner_mask={"w": "yes"}),
     TypeError, r"inner_mask must be a pytree of Python bools"),
    ("imaml/lam=0", lambda: mg.imaml(loss, optax.sgd(0.1), 1, 0.1, lam=0.0, cg_steps=2),
     ValueError, r"lam must be > 0"),
    ("imaml/cg_steps=0", lambda: mg.imaml(loss, optax.sgd(0.1), 1, 0.1, lam=1.0, cg_steps=0),
     ValueError, r"cg_steps must be an integer >= 1"),
    ("imaml/inner-rule", lambda: mg.imaml(loss, mg.meta_sgd(0.1), 1, 0.1, lam=1.0, cg_steps=2),
     TypeError, r"inner must be an optax GradientTransformation"),
    ("learned_lr/granularity", lambda: mg.learned_lr(0.1, granularity="row"), ValueError,
     r"granularity must be one of \('parameter', 'layer', 'global'\)"),
    ("meta_sgd/alpha", lambda: mg.meta_sgd("0.1"), TypeError, r"alpha must be a number"),
    ("grad_share/inner<0", lambda: mg.grad_share(-0.1), ValueError, r"inner must be > 0"),
    ("grad_share/normalize", lambda: mg.grad_share(0.1, normalize="l2"), ValueError,
     r"normalize must be one of \('task', 'layer', 'none'\)"),
    ("grad_share/eps", lambda: mg.grad_share(0.1, eps=0.0), ValueError, r"eps must be > 0"),
    # seq_reptile
    ("seq_reptile/tasks-not-pair", lambda: _seq_step((X, Y, Y)), TypeError,
     r"tasks must be a pair \(task_ids, batches\)"),
    ("seq_reptile/task_ids-shape", lambda: _seq_step((jnp.zeros(3, jnp.int32), (X, Y))),
     ValueError, r"task_ids\) must have shape \(4,\) = \(inner_steps,\)"),
    ("seq_reptile/support-query", lambda: _seq_step(((X, Y), (X, Y))), ValueError,
     r"task_ids\) must be one int array.*not \(support, query\).*mg\.sample_tasks\("),
    ("seq_reptile/3-arg-loss-without-pass_task_id",
     lambda: mg.seq_reptile(seq_loss, optax.sgd(0.1), 4, 0.5), TypeError,
     r"loss_fn takes a third argument .*pass pass_task_id=True"),
    ("seq_reptile/task_ids-float", lambda: _seq_step((jnp.zeros(4), (X, Y))), TypeError,
     r"task_ids\) must be integers"),
    ("seq_reptile/batches-K", lambda: _seq_step((jnp.zeros(4, jnp.int32), (X[:3], Y[:3]))),
     ValueError, r"batches\) leaves must have leading axes \[inner_steps, ...\]"),
    # adapt
    ("adapt/num_steps", lambda: mg.adapt(loss, optax.sgd(0.1), PARAMS, (X[0], Y[0]), 0),
     ValueError, r"num_steps must be an integer >= 1"),
    ("adapt/batch_per_step",
     lambda: mg.adapt(loss, optax.sgd(0.1), PARAMS, (X, Y), 3, batch_per_step=True),
     ValueError, r"support leaves must have leading axes \[num_steps = 3, ...\], got a leaf"),
    # task samplers
    ("task_probs/empty", lambda: mg.task_probs([]), ValueError, r"sizes must not be empty"),
    ("task_probs/2d", lambda: mg.task_probs([[1, 2]]), ValueError,
     r"sizes must be a 1-D sequence"),
    ("task_probs/zero-size", lambda: mg.task_probs([0, 10]), ValueError,
     r"sizes must be finite and > 0"),
    ("task_probs/q-inf", lambda: mg.task_probs([1, 2], q=float("inf")), ValueError,
     r"q must be finite"),
    ("sample_tasks/sum", lambda: mg.sample_tasks(KEY, [0.5, 0.6], 3), ValueError,
     r"probs must sum to 1, got sum 1.1"),
    ("sample_tasks/negative", lambda: mg.sample_tasks(KEY, [1.5, -0.5], 3), ValueError,
     r"probs must be finite and >= 0"),
    ("sample_tasks/empty", lambda: mg.sample_tasks(KEY, [], 3), ValueError,
     r"probs must not be empty"),
    ("sample_tasks/num=0", lambda: mg.sample_tasks(KEY, [0.5, 0.5], 0), ValueError,
     r"num must be an integer >= 1"),
    ("sample_tasks/no-replace", lambda: mg.sample_tasks(KEY, [0.5, 0.5], 3, replace=False),
     ValueError, r"num must be <= the number of tasks \(2\) when replace=False"),
    ("uniform_tasks/num_tasks", lambda: mg.uniform_tasks(KEY, 0, 3), ValueError,
     r"num_tasks must be an integer >= 1"),
    ("mixed_schedule/target", lambda: mg.mixed_schedule(KEY, 3, 5, 4), ValueError,
     r"target must be in \[0, 3\)"),
    ("mixed_schedule/ratio", lambda: mg.mixed_schedule(KEY, 3, 1, 4, ratio=(0, 1)),
     ValueError, r"ratio must be positive integers"),
    ("mixed_schedule/epoch_length",
     lambda: mg.mixed_schedule(KEY, 3, 1, 4, ratio=2, epoch_length=4), ValueError,
     r"epoch_length must be a multiple of a\+b = 3"),
    ("mixed_probs/num_tasks", lambda: mg.mixed_probs(1, 0), ValueError,
     r"num_tasks must be >= 2"),
    # diagnostics
    ("pairwise_dot/axes", lambda: mg.pairwise_dot({"a": jnp.ones((2, 3)), "b": jnp.ones((3,))}),
     ValueError, r"grads must have the same leading \(stacking\) axis on every leaf"),
    ("pairwise_cosine/empty", lambda: mg.pairwise_cosine({}), ValueError,
     r"grads must contain at least one array"),
    ("mean_pairwise_cosine/one", lambda: mg.mean_pairwise_cosine(jnp.ones((1, 3))), ValueError,
     r"grads must stack at least 2 gradients"),
    # multi-task baselines
    ("mtl_sum/reduction", lambda: mg.mtl_sum(reduction="max"), ValueError,
     r"reduction must be one of \('sum', 'mean'\)"),
    ("pcgrad/seed", lambda: mg.pcgrad(seed="a"), TypeError,
     r"seed must be an int or a jax.random key"),
    ("pcgrad/no-task-axis", lambda: mg.pcgrad().update(jnp.ones(()), mg.pcgrad().init(1.0)),
     ValueError, r"updates must be per-task gradients stacked on a leading task axis"),
    ("gradvac/beta", lambda: mg.gradvac(3, beta=2.0), ValueError, r"beta must be in \(0, 1\]"),
    ("gradvac/num_tasks",
     lambda: mg.gradvac(3).update(jnp.ones((2, 4)), mg.gradvac(3).init(jnp.ones(4))),
     ValueError, r"updates have 2 tasks on their leading task axis but num_tasks=3"),
    ("gradnorm/alpha", lambda: mg.gradnorm(2, alpha=-1.0), ValueError, r"alpha must be >= 0"),
    ("gradnorm/losses-shape",
     lambda: mg.gradnorm(2).update(jnp.ones((2, 4)), mg.gradnorm(2).init(jnp.ones(4)),
                                   losses=jnp.ones(3)),
     ValueError, r"losses must have shape \(2,\)"),
    ("recadam/learning_rate", lambda: mg.recadam(0.0), ValueError,
     r"learning_rate must be > 0"),
    ("recadam/pretrained", lambda: mg.recadam(0.1, pretrained={"v": jnp.ones(3)}).init(PARAMS),
     ValueError, r"pretrained must have the same tree structure as params"),
]  # fmt: skip


def test_loss_error_on_well_formed_tasks_is_the_loss_own():
    # The tasks are fine, the loss is broken: its own error type, with a note, no tasks hint.
    class Broken(Exception):
        pass

    def broken(params, batch):
        raise Broken("inside the loss")

    learner = mg.maml(broken, optax.sgd(0.1), 1, 0.01)
    with pytest.raises(Broken, match="inside the loss") as info:
        learner.step(learner.init(PARAMS), TASKS)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "loss_fn(params, batch) on task 0's support batch" in notes
    assert "tasks must be a pair" not in str(info.value) + notes


LEARNERS = {
    "maml": lambda: mg.maml(loss, optax.sgd(0.1), 1, 0.01),
    "fomaml": lambda: mg.fomaml(loss, optax.sgd(0.1), 1, 0.01),
    "maml/meta_sgd": lambda: mg.maml(loss, mg.meta_sgd(0.1), 1, 0.01),
    "maml/grad_share": lambda: mg.maml(loss, mg.grad_share(0.1), 1, 0.01),
    "reptile": lambda: mg.reptile(loss, optax.sgd(0.1), 1, 0.5),
    "imaml": lambda: mg.imaml(loss, optax.sgd(0.1), 1, 0.01),
    "seq_reptile": lambda: mg.seq_reptile(loss, optax.sgd(0.1), 4, 0.5),
}


def test_non_float_params_leaf_is_named_at_init():
    for make in LEARNERS.values():
        for leaf in (jnp.array(1, jnp.int32), jnp.array(True)):
            params = dict(PARAMS, n=leaf)
            with pytest.raises(TypeError, match=r"params leaf \['n'\] has dtype .*nnx\.split"):
                make().init(params)
        make().init(PARAMS)  # float leaves: fine


def test_step_given_params_names_the_state():
    for make in LEARNERS.values():
        with pytest.raises(TypeError, match=r"state must be the \w+State from learner\.init"):
            make().step(PARAMS, TASKS)
    with pytest.raises(TypeError, match=r"jax\.eval_shape\(learner\.init, params\)"):
        LEARNERS["maml"]().step(PARAMS, TASKS)


def test_learned_inner_rule_where_the_inner_loop_is_not_differentiated():
    rules = {"meta_sgd": mg.meta_sgd(0.1), "learned_lr": mg.learned_lr(0.1),
             "grad_share": mg.grad_share(0.1)}  # fmt: skip
    for name, make in (("reptile", mg.reptile), ("seq_reptile", mg.seq_reptile),
                       ("imaml", mg.imaml)):  # fmt: skip
        for rule in rules.values():
            with pytest.raises(TypeError, match=rf"mg\.{name} does not differentiate its inner "
                               r"loop.*cannot be trained.*use mg\.maml or mg\.fomaml"):  # fmt: skip
                make(loss, rule, 2, 0.5)


def test_table_is_large():
    assert len(CASES) >= 20
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("call, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()
