"""The `mtl` experiment section's pieces: the method registry, the toy, the MultiDigits data.

The tiny end-to-end run is in `test_experiments.py`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

import metagrad as mg
from experiments import mtl_digits, mtl_methods, mtl_toy


def test_registry_skips_absent_names_and_builds_the_rest(monkeypatch):
    present, skipped = mtl_methods.available()
    names = {s.name for s in present}
    assert {"mtl_sum", "pcgrad", "gradnorm", "famo", "db_mtl"} <= names
    assert all(hasattr(mg, n) and n in mg.__all__ for n in names)
    assert all(not (hasattr(mg, n) and n in mg.__all__) for n in skipped)
    assert names | set(skipped) == {s.name for s in mtl_methods.REGISTRY}
    # A name the library lacks is skipped, not an error.
    monkeypatch.setattr(mg, "__all__", [n for n in mg.__all__ if n != "famo"])
    present, skipped = mtl_methods.available(["famo", "mtl_sum"])
    assert [s.name for s in present] == ["mtl_sum"] and skipped == ["famo"]


def test_registry_covers_every_public_aggregator():
    assert mtl_methods.unlisted() == []


def test_build_passes_num_tasks_only_where_the_signature_takes_it():
    g = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    for spec in mtl_methods.available()[0]:
        tx, dropped = mtl_methods.build(spec, 2)
        assert dropped == []
        extra = {"losses": jnp.array([1.0, 2.0])} if spec.losses else {}
        out, _ = tx.update(g, tx.init(jnp.zeros(2)), **extra)
        assert out.shape == (2,) and bool(jnp.all(jnp.isfinite(out))), spec.name
    # A keyword the constructor does not take is dropped and reported.
    spec = mtl_methods.Spec("famo", "FAMO", {"weight_decay": 0.0, "no_such": 1}, losses=True)
    assert mtl_methods.build(spec, 2)[1] == ["no_such"]


def _toy_numpy(x1, x2):
    # The CAGrad authors' toy, term by term.
    lower = 0.000005
    f1 = math.log(max(abs(0.5 * (-x1 - 7) - math.tanh(-x2)), lower)) + 6
    f2 = math.log(max(abs(0.5 * (-x1 + 3) + math.tanh(-x2) + 2), lower)) + 6
    c1 = max(math.tanh(x2 * 0.5), 0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c2 = max(math.tanh(-x2 * 0.5), 0)
    return f1 * c1 + f1_sq * c2, f2 * c1 + f2_sq * c2


@pytest.mark.parametrize("x", [(-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0), (0.3, -8.3552), (2.0, 1.0)])
def test_toy_losses_match_the_papers_toy(x):
    np.testing.assert_allclose(mtl_toy.losses(jnp.array(x, jnp.float32)), _toy_numpy(*x),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_pareto_gap_small_on_the_front_large_off_it():
    assert float(mtl_toy.pareto_gap(jnp.array([0.0, mtl_toy.FRONT_X2]))) < 1e-3
    assert float(mtl_toy.pareto_gap(jnp.array([9.0, mtl_toy.FRONT_X2]))) > 0.3  # beyond an end
    assert float(mtl_toy.pareto_gap(jnp.array([0.0, -4.0]))) > 0.01  # above the valley floor
    assert mtl_toy.front_distance(np.array([8.0, mtl_toy.FRONT_X2])) == pytest.approx(1.0)


def test_multidigits_pairs():
    (x, y), (xt, yt) = mtl_digits.make_data(0, 50, 40)
    assert x.shape == (50, 96) and y.shape == (50, 2) and xt.shape == (40, 96)
    assert x.min() >= 0 and x.max() <= 1 and set(np.unique(y)) <= set(range(10))
    img = x.reshape(50, 8, 12)
    # Left digit alone in columns 0-3, right alone in 8-11, overlapped in 4-7.
    assert np.any(img[:, :, :4] > 0) and np.any(img[:, :, 8:] > 0)
    again = mtl_digits.make_data(0, 50, 40)
    np.testing.assert_array_equal(again[0][0], x)


def test_delta_m_formula():
    stl = np.array([[0.9, 0.8], [0.9, 0.8]])
    acc = np.array([[0.99, 0.8], [0.9, 0.72]])
    # -(1/2) [(0.99-0.9)/0.9 + 0] * 100 = -5; -(1/2) [0 + (0.72-0.8)/0.8] * 100 = +5.
    np.testing.assert_allclose(mtl_digits.delta_m(acc, stl), [-5.0, 5.0])
