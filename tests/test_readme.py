"""The README's code blocks that a user copies first actually run."""

import pathlib
import re

import jax
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _block_after(heading):
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_meta_learning_snippet_runs_and_learns():
    namespace = {}
    exec(compile(_block_after("## Meta-learning in a few lines"), "README", "exec"), namespace)
    state, metrics = namespace["state"], namespace["metrics"]
    assert int(state.count) == 100
    assert np.isfinite(float(metrics["loss_post"]))
    # Adaptation must lower the new task's query loss from the learned initialization.
    loss_fn, query = namespace["loss_fn"], jax.tree.map(lambda a: a[0], namespace["query"])
    before = float(loss_fn(state.params, query))
    after = float(loss_fn(namespace["adapted"], query))
    assert after < before


def test_multi_task_snippet_runs_and_learns():
    namespace = {}
    exec(
        compile(_block_after("## Multi-task learning in a few lines"), "README", "exec"), namespace
    )
    task_losses, params, w_true = namespace["task_losses"], namespace["params"], namespace["w_true"]
    x = jax.random.normal(jax.random.key(9), (256, 4))
    batch = (x, jax.numpy.tanh(w_true @ x.T))
    # Every task's held-out loss falls far below its value at the start (heads at zero).
    start = {**params, "heads": jax.numpy.zeros_like(params["heads"])}
    assert np.all(
        np.asarray(task_losses(params, batch)) < 0.1 * np.asarray(task_losses(start, batch))
    )
