"""Tests for experiments/synthetic.py: the problem, the outputs, and the outcome at its settings."""

import csv
import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import synthetic

METHODS = [synthetic.LABELS[m] for m in synthetic.METHODS]


def test_task_gradients_match_closed_form():
    # ∇L_i(φ) = 40·exp(−0.2 r)·(φ − x_i)/r: norm 40·e^(−0.2 r), pointing away from x_i.
    phi = jnp.array([3.0, 4.0])
    grads = np.asarray(synthetic.task_grads(phi))
    for g, x in zip(grads, synthetic.OPTIMA, strict=True):
        d = np.asarray(phi) - x
        r = np.linalg.norm(d)
        np.testing.assert_allclose(g, 40 * np.exp(-0.2 * r) * d / r, rtol=1e-5)


def test_mtl_local_minima_are_the_task_optima():
    minima = synthetic.mtl_minima()
    assert minima.shape == (3, 2)
    order = np.lexsort((synthetic.OPTIMA[:, 1], synthetic.OPTIMA[:, 0]))
    np.testing.assert_allclose(minima, synthetic.OPTIMA[order], atol=1e-3)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    """One run at the experiment's real ("quick") settings, shared by the tests below."""
    out = tmp_path_factory.mktemp("synthetic")
    rows = synthetic.run(out, budget="quick", seed=0, progress=False)
    return out, rows


def test_outputs_exist_and_are_sane(outcome):
    out, rows = outcome
    for name in ("synthetic.png", "synthetic_cosine.png", "synthetic.json", "synthetic.csv"):
        assert (out / name).stat().st_size > 0, name
    assert not any("error" in r for r in rows), [r for r in rows if "error" in r]
    assert [r["method"] for r in rows] == [m for m in METHODS for _ in synthetic.STARTS]
    for r in rows:
        assert r["experiment"] == "synthetic"
        for key in ("final_x", "final_y", "mtl_loss", "cos_final", "cos_mean"):
            assert np.isfinite(r[key]), (r["method"], key)
        assert -1.0 <= r["cos_final"] <= 1.0
        # The MTL loss lies between its global minimum (about -254) and 0.
        assert -255.0 < r["mtl_loss"] < 0.0
    saved = json.loads((out / "synthetic.json").read_text())
    assert len(saved["rows"]) == len(rows)
    with open(out / "synthetic.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def _by_method(rows):
    table = {}
    for r in rows:
        table.setdefault(r["method"], []).append(r)
    return table


def test_mtl_descends_into_the_nearest_basin(outcome):
    # From the paper's start (20, 5) plain MTL rolls into x3's basin, the nearest.
    _, rows = outcome
    mtl = _by_method(rows)["MTL"][0]
    assert mtl["start"] == "(20, 5)" and mtl["nearest_optimum"] == "x3=(10,0)"
    assert mtl["in_mtl_minimum"]


def test_outcome_at_the_chosen_settings(outcome):
    """What happens at the documented settings (Adam 0.1, 1000 updates, K = 10, η = 0.1).

    The paper: every baseline but Reptile and Seq. Reptile ends in an MTL local minimum, and
    Seq. Reptile ends with the highest average cosine. Here (reported, not tuned):
    - MTL, PCGrad, GradVac, RecAdam end in (within 1 of) an MTL local minimum: as the paper.
    - GradNorm does not: its learned weights balance the weighted gradients at an interior
      point near (3.5, 3), unlike the paper's figure.
    - Reptile ends at (0.4, 0.4), 0.56 from x2: inside our radius of 1, so it does not avoid
      the minimum's neighbourhood (it stops short of the cusp, with cosine -0.48).
    - Seq. Reptile ends in a minimum (x3 from (20, 5), x2 from the others): unlike the paper.
    - Seq. Reptile's average cosine is not the highest: unlike the paper.
    """
    _, rows = outcome
    table = _by_method(rows)
    in_minimum = {m: [r["in_mtl_minimum"] for r in rs] for m, rs in table.items()}
    for method in ("MTL", "PCGrad", "GradVac", "RecAdam", "Reptile", "Seq. Reptile"):
        assert all(in_minimum[method]), (method, in_minimum[method])
    assert not any(in_minimum["GradNorm"])
    for r in table["GradNorm"]:
        assert r["dist_nearest_optimum"] > 3.0
    for r in table["Reptile"]:
        assert 0.3 < r["dist_nearest_optimum"] < 1.0
    for s in range(len(synthetic.STARTS)):
        cos = {m: rs[s]["cos_final"] for m, rs in table.items()}
        assert max(cos, key=cos.get) != "Seq. Reptile", cos


def test_at_larger_k_lr_reptile_reaches_the_centroid_and_seq_reptile_stays_in_minima():
    """K·lr = 10 (Adam lr 0.1, K = 100 inner steps, η = 0.1), 100 outer steps.

    Reptile's inner trajectories now reach their task optima, and its outer step averages
    them: it ends at the centroid (10/3, 10/3), the interior point the paper describes.
    Sequential Reptile, with the paper's i.i.d. task ids and with a fixed round-robin order
    (`mg.uniform_tasks(order=...)`, via the experiment's `seq_order`), still ends in an MTL
    local minimum (a task optimum) from every start: neither order gives it the interior.
    """
    centroid = synthetic.OPTIMA.mean(0)
    ends = {}
    for method, order in (("reptile", "iid"), ("seq_reptile", "iid"),
                          ("seq_reptile", "round_robin")):  # fmt: skip
        cfg = synthetic.Config(steps=100, optimizer="adam", inner_steps=100, seq_order=order)
        assert cfg.inner_steps * cfg.lr == pytest.approx(10.0)
        ends[method, order] = synthetic.run_method(method, cfg, seed=0)[0][:, -1]
    to_centroid = {m: np.linalg.norm(e - centroid, axis=1) for m, e in ends.items()}
    to_optimum = {
        m: np.linalg.norm(e[:, None] - synthetic.OPTIMA[None], axis=2).min(1)
        for m, e in ends.items()
    }
    assert np.all(to_centroid["reptile", "iid"] < 0.05), to_centroid
    for order in ("iid", "round_robin"):
        assert np.all(to_optimum["seq_reptile", order] < 0.2), (order, to_optimum)
        assert np.all(to_centroid["seq_reptile", order] > 4.0), (order, to_centroid)
