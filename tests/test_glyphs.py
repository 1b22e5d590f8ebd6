"""The rendered glyph set (experiments.glyphs) and its episodes through the few-shot sampler.

A small set (the first 2 characters of each alphabet, 5 instances) keeps these fast; the
checks of the class list itself (counts, scripts, character maps) need no rendering.
"""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
from matplotlib import ft2font

from experiments import fewshot, glyphs

SMALL = dict(instances=5, classes_per_alphabet=2)


@pytest.fixture(scope="module")
def small():
    return glyphs.build(0, **SMALL)


def test_same_seed_same_arrays_other_seed_differs(small):
    again = glyphs.build(0, **SMALL)
    for field in ("images", "labels", "codepoints", "class_alphabet"):
        np.testing.assert_array_equal(getattr(small, field), getattr(again, field))
    assert small.alphabets == again.alphabets
    other = glyphs.build(1, **SMALL)
    np.testing.assert_array_equal(other.codepoints, small.codepoints)  # same classes ...
    assert not np.array_equal(other.images, small.images)  # ... drawn differently


def test_classes_instances_and_images(small):
    n_alpha = len(small.alphabets)
    assert n_alpha >= 10
    assert small.num_classes == 2 * n_alpha
    assert small.images.shape == (small.num_classes * 5, 28, 28)
    assert small.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(small.labels), np.full(small.num_classes, 5))
    # Every class is a letter of its alphabet's script, mapped by DejaVu Sans (no .notdef box).
    charmap = ft2font.FT2Font(str(glyphs.font_dir() / "DejaVuSans.ttf")).get_charmap()
    for cp, a in zip(small.codepoints, small.class_alphabet, strict=True):
        char = chr(int(cp))
        assert int(cp) in charmap
        assert unicodedata.category(char).startswith("L")
        assert unicodedata.name(char).startswith(small.alphabets[a])
    # No blank image, and the instances of a class differ from each other.
    ink = small.images.reshape(len(small.images), -1).sum(1) / 255.0
    assert ink.min() >= glyphs.INK_MIN / 2
    for c in range(small.num_classes):
        imgs = small.images[small.labels == c].reshape(5, -1)
        assert len({x.tobytes() for x in imgs}) == 5


def test_splits_are_disjoint_by_alphabet(small):
    back, evaluation = small.split_classes("background"), small.split_classes("evaluation")
    assert len(back) and len(evaluation)
    assert sorted(np.concatenate([back, evaluation]).tolist()) == list(range(small.num_classes))
    back_alpha = {small.alphabets[a] for a in small.class_alphabet[back]}
    eval_alpha = {small.alphabets[a] for a in small.class_alphabet[evaluation]}
    assert not back_alpha & eval_alpha
    assert eval_alpha <= set(glyphs.EVALUATION_SCRIPTS)
    src = small.source("evaluation")
    assert set(np.unique(src.labels).tolist()) == set(evaluation.tolist())
    record = src[0]
    assert record["image"].shape == (28, 28, 1) and int(record["label"]) == src.labels[0]
    with pytest.raises(ValueError, match="split"):
        small.split_classes("train")


def test_full_class_list_has_enough_letters_and_alphabets():
    # No rendering: the candidate letters of DejaVu Sans, by script.
    cands = glyphs.candidate_characters()
    scripts = {}
    for _, s in cands:
        scripts[s] = scripts.get(s, 0) + 1
    assert len(cands) >= 1500
    big = {s for s, n in scripts.items() if n >= glyphs.MIN_CLASSES}
    assert {"LATIN", "GREEK", "CYRILLIC", "ARMENIAN", "GEORGIAN", "HEBREW", "ARABIC"} <= big
    assert set(glyphs.EVALUATION_SCRIPTS) <= big
    assert sum(scripts[s] for s in glyphs.EVALUATION_SCRIPTS) >= 400


def test_load_caches_and_rejects_bad_input(small, tmp_path):
    first = glyphs.load(0, cache_dir=tmp_path, **SMALL)
    (path,) = tmp_path.glob("*.npz")
    np.testing.assert_array_equal(first.images, small.images)
    mtime = path.stat().st_mtime_ns
    again = glyphs.load(0, cache_dir=tmp_path, **SMALL)
    assert path.stat().st_mtime_ns == mtime  # read, not rewritten
    np.testing.assert_array_equal(again.images, small.images)
    assert again.alphabets == small.alphabets
    with pytest.raises(ValueError, match="instances"):
        glyphs.build(0, instances=0)
    with pytest.raises(ValueError, match="classes_per_alphabet"):
        glyphs.build(0, classes_per_alphabet=0)


def test_sampler_episodes_from_glyphs(small):
    src = small.source("background")
    sampler = fewshot.EpisodeSampler(
        [src], ways=5, shots=1, queries=3, image_size=28, grayscale=True, index=[src.labels]
    )
    rng = np.random.default_rng(0)
    (sx, sy), (qx, qy) = sampler.episode(rng)
    assert sx.shape == (5, 28, 28, 1) and qx.shape == (15, 28, 28, 1)
    assert sx.dtype == np.float32 and 0.0 <= sx.min() and sx.max() <= 1.0
    np.testing.assert_array_equal(qy, np.repeat(np.arange(5), 3))
    # Each way's support and query images are instances of one class, a different one per way.
    lookup = {img.tobytes(): int(c) for img, c in zip(src.images, src.labels, strict=True)}
    to_class = lambda x: [lookup[np.round(i[..., 0] * 255).astype(np.uint8).tobytes()] for i in x]  # noqa: E731
    s_cls, q_cls = np.array(to_class(sx)), np.array(to_class(qx))
    assert len(set(s_cls)) == 5
    for way in range(5):
        assert set(q_cls[qy == way]) == {s_cls[sy == way][0]}
    # The array fast path gives what reading record by record gives.
    refs = np.stack([np.zeros(6, int), np.arange(0, 60, 10)], 1)
    slow = np.stack([sampler._image(r) for r in refs])
    np.testing.assert_array_equal(sampler._images(refs), slow)
    (bx, _), (bq, _) = sampler.meta_batch(rng, 3)
    assert bx.shape == (3, 5, 28, 28, 1) and bq.shape == (3, 15, 28, 28, 1)
    # Held-out episodes are drawn again, identically, for every method.
    held = fewshot.held_out_episodes(sampler, 4, seed=0)
    first, again, head = list(held), list(held), list(held.head(2))
    assert len(first) == len(held) == 4 and len(head) == 2
    for x, y in zip(first, again, strict=True):
        np.testing.assert_array_equal(x[0][0], y[0][0])
        np.testing.assert_array_equal(x[1][0], y[1][0])
    np.testing.assert_array_equal(head[1][1][0], first[1][1][0])
    assert not np.array_equal(first[0][0][0], first[1][0][0])


def test_fewshot_section_runs_on_glyphs_by_default(tmp_path):
    """The default dataset of `python -m experiments`: glyph episodes through Conv-4 (ANIL),
    and the same command again with the same --out resumes from the checkpoint."""
    import json
    import pickle

    from experiments import cli

    out = tmp_path / "out"
    argv = ["--only", "fewshot", "--budget", "tiny", "--no-progress", "--out", str(out)]
    argv += ["--fewshot-glyphs-cache", str(tmp_path / "cache")]
    argv += ["--fewshot-glyphs-classes-per-alphabet", "2", "--fewshot-methods", "anil"]
    argv += ["--fewshot-shots", "1"]  # one compiled meta-step and evaluator
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [(r["method"], r["shots"], r["dataset"]) for r in rows] == [("anil", 1, "glyphs")]
    for row in rows:
        assert 0.0 <= row["test_acc"] <= 1.0 and row["episodes"] >= 2
    assert rows[0]["paper_omniglot"] == "nan"  # no paper figure for ANIL
    table = (out / "fewshot" / "fewshot_table.md").read_text()
    assert "| anil | 1 |" in table and "98.7" not in table and "not comparable" in table
    assert (out / "fewshot" / "fewshot_training.png").stat().st_size > 1000
    # The same command again resumes from the checkpoint: nothing left to train (the
    # learning curve is the checkpoint's, marked here), the same accuracy.
    ckpt = out / "fewshot" / "checkpoints" / "anil_1-shot.pkl"
    saved = pickle.loads(ckpt.read_bytes())
    assert saved["iteration"] == rows[0]["iterations"]
    saved["keep"]["curve"] = [[99, 0.5]]
    ckpt.write_bytes(pickle.dumps(saved))
    assert cli.main(argv) == 0
    again = json.loads((out / "results.json").read_text())["rows"]
    assert again[0]["test_acc"] == rows[0]["test_acc"]
    progress = json.loads((out / "fewshot" / "fewshot_progress.json").read_text())
    assert progress["curves"]["anil 1-shot"] == [[99, 0.5]]
