"""The directions of issue 16's findings that hold at a tiny budget, through the experiments' code.

Each test runs the experiment's own functions (`experiments.fewshot`'s samplers, learners and
`meta_train`, as `experiments.grad_share_glyphs` uses them; `experiments.dotprod_sweep.train_grid`)
at a configuration small enough for the suite, and asserts only a direction that held, with
margin, on every one of at least five seeds of that same configuration; each docstring gives
the range seen over those seeds. Not pinned here:

- grad_share at the paper's 1x inner rate trails MAML in held-out accuracy at this budget
  (10 of 10 seeds), but pinning it takes two more second-order Conv-4 compilations (~15 s of
  CPU), more than this module's share of the suite;
- DotProd's weight 0.3 diverging from scratch (every cell of the sweep and of our tiny runs): the
  same mechanism as weight 1's divergence, pinned in tests/test_dotprod_sweep.py;
- DotProd's accuracy differences at weights <= 0.1: no stable direction (the sweep finds no gain).
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import numpy as np
import pytest

from experiments import dotprod_sweep as ds
from experiments import dotprod_sweep_finetune as ft
from experiments import fewshot
from experiments import grad_share_glyphs as gsg
from experiments.models import conv4_init

# -- gradient sharing on Conv-4 glyph episodes ---------------------------------------------------
# grad_share_glyphs' protocol (5-way 1-shot, 5 queries, one inner SGD step, outer Adam 1e-3,
# both methods from the same Conv-4 weights on the same episode stream) at a tiny size: glyphs
# resized to 14x14, 8 channels, 2 tasks per outer step, 100 outer steps, the glyph set's first
# 10 characters per alphabet (60 training classes).
SIZE, HIDDEN, META_BATCH, STEPS, TAIL = 14, 8, 2, 100, 20


def test_grad_share_keeps_maml_training_at_ten_times_the_inner_rate(tmp_path):
    """Chang & Lipson's robustness claim (seen on glyphs at 200 steps: held-out accuracy
    MAML 35% vs 46%): at inner rate 1.0 MAML+grad_share's post-adaptation query loss over the
    last 20 of 100 outer steps is below MAML's. Stability (this configuration, seeds 0-9):
    lower by 0.028 to 0.086 (mean 0.059) in all 10. The training query loss, not held-out
    accuracy: at 100 steps the accuracy gain was positive in all 10 seeds but as small as
    +0.009 (9 of 1,000 held-out queries), and it costs two more compilations."""
    args = argparse.Namespace(
        fewshot_glyphs_classes_per_alphabet=10, fewshot_glyphs_cache=str(tmp_path)
    )
    small = dataclasses.replace(fewshot.DATASETS["glyphs"], image_size=SIZE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(fewshot.DATASETS, "glyphs", small)  # the sampler resizes (PIL, bilinear)
        train, _ = fewshot.make_samplers(
            "glyphs", ways=gsg.WAYS, shots=[gsg.SHOTS], queries=5, args=args
        )
    seed, tail = 0, []
    for method in gsg.METHODS:  # MAML, then MAML+grad_share: same init, same episodes
        learner = fewshot.make_learner(method, inner_lr=10 * gsg.BASE_LR, inner_steps=1)
        params0 = conv4_init(jax.random.key(seed), 1, gsg.WAYS, SIZE, HIDDEN)
        _, losses = fewshot.meta_train(
            learner,
            params0,
            train[gsg.SHOTS],
            iterations=STEPS,
            meta_batch=META_BATCH,
            seed=seed,
            progress=False,
        )
        tail.append(np.mean(losses[-TAIL:]))
    maml, shared = tail
    assert np.isfinite(maml) and np.isfinite(shared)
    assert maml - shared > 0.01, (maml, shared)


# -- Meta DotProd from scratch: the direction of the paper's Figure 4 ----------------------------


def test_dotprod_raises_the_batch_gradient_dot_product():
    """Kedia et al.'s Figure 4: with the regularizer (the paper's weight 0.1) the dot product
    between consecutive batch gradients, averaged over training, is higher than without (the
    full sweep: 1.2-1.8x). dotprod_sweep's scratch setting on clean digits, 4 seeds x 3
    training-set sizes, 200 Adam steps, logged every 20. Per cell the ratio is noisy at this
    budget (0.70-3.5 over the 144 cells of 12 experiment seeds), the median over a run's 12
    cells much less. Stability (experiment seeds 0-11): median ratio 1.09-1.31, above 1 in all
    12 (seed 0: 1.14)."""
    cfg = ds.Config(seeds=4, steps=200, log_every=20, weights=(0.0, 0.1),
                    digits_sizes=(100, 200, 500), noise=(0.0,), datasets=("digits",))  # fmt: skip
    _, dots, _ = ds.train_grid(ds.digits_problem(cfg, seed=0), cfg, seed=0, progress=False)
    dots = dots[:, 0]  # [seeds, sizes, weights, logs]
    ratio = dots[:, :, 1].mean(-1) / dots[:, :, 0].mean(-1)
    assert np.median(ratio) > 1.0, ratio


# -- Meta DotProd fine-tuning: the paper's weight diverges -------------------------------------


def test_dotprod_papers_weight_diverges_when_fine_tuning():
    """In the fine-tuning setting (MLP pretrained on digits 0-4, fine-tuned on 5-9 with Adam
    3e-4) the paper's weight 0.1 diverged in every seed and cell of the sweep. Here (2 seeds x
    25 and 100 images, 100 steps): test accuracy at chance (5 classes) and the dot product,
    averaged over training, > 10x weight 0's. Stability (seeds 0-4, 20 cells): accuracy
    0.195-0.205 (weight 0: 0.43-0.82), ratio 30-323."""
    cfg = ds.Config(seeds=2, steps=100, log_every=25, weights=(0.0, 0.1), digits_sizes=(25, 100),
                    noise=(0.0,), datasets=("digits",), setting="finetune")  # fmt: skip
    metrics, dots, _ = ds.train_grid(ft.digits_problem(cfg, seed=0), cfg, seed=0, progress=False)
    acc, dots = metrics["test_acc"][:, 0], dots[:, 0]  # [seeds, sizes, weights(, logs)]
    assert np.all(acc[..., 0] > 0.35), acc  # weight 0 learns (observed 0.43-0.82)
    assert np.all(acc[..., 1] < 0.25), acc
    assert np.all(dots[:, :, 1].mean(-1) > 10 * dots[:, :, 0].mean(-1)), dots
