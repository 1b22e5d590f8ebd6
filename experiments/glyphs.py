"""Glyphs: an Omniglot-like few-shot character set rendered from matplotlib's fonts.

Omniglot (Lake et al., 2015) has 1,623 handwritten characters from 50 alphabets, each drawn
once by 20 people. It cannot be downloaded on the project's machines, so this module builds a
stand-in from what every matplotlib install ships (``matplotlib.get_data_path()/fonts/ttf``),
with no network, deterministically from a seed, in a few seconds:

- **Characters** (classes): every Unicode letter (categories Lu, Ll, Lt, Lo; no modifier
  letters, no precomposed letters, i.e. no character with a Unicode decomposition such as
  "e with acute") that DejaVu Sans maps in its character map, so no class is a missing-glyph
  (.notdef) box.
- **Alphabets**: characters grouped by Unicode script, read from the character's name
  (``unicodedata.name``: "GREEK SMALL LETTER ALPHA" -> GREEK; OLD ITALIC and CANADIAN
  SYLLABICS take two words). Scripts with fewer than `MIN_CLASSES` characters are dropped.
- **Instances** (Omniglot's 20 drawers): each class gets `instances` images (default 20). An
  instance is the character in one of the fonts whose character map has it (DejaVu Sans,
  Sans Mono and Serif in regular, bold, oblique/italic and bold oblique; STIX General in four
  styles; Computer Modern cmr10, cmb10, cmss10, cmti10, cmtt10, cmmi10; the fonts are cycled in
  a seeded random order per class), a stroke width (thinned, as drawn, or thickened by one or
  two pixels of the 2x render), and a random affine distortion: rotation (normal, 8 degrees
  s.d., clipped at 20), horizontal shear (+-0.25), scale (0.85-1.15) with a width factor
  (0.8-1.1; matplotlib ships no condensed fonts, the width factor stands in for them) and a
  translation of up to about 1 pixel.
- **Images**: 28x28 greyscale, ink 1 on background 0 (stored as uint8, served as float32 in
  [0, 1]). A character is rendered at 40 px on a 112 px canvas, the 56 px square window around
  its ink centre is kept (a larger window, resized down, when the ink does not fit), so letters
  keep their relative size ("o" is smaller than "O"); the distortion samples that window on a
  56x56 grid that is averaged 2x2 to 28x28.
- **Clean-up**: a character whose DejaVu Sans rendering is blank is dropped, and so is one whose
  undistorted 28x28 DejaVu Sans image is identical to an earlier character's (the homoglyphs:
  Greek and Cyrillic capitals drawn exactly like Latin ones); a font whose rendering of a
  character is blank is not used for it.
- **Splits** by alphabet, as in Omniglot: `EVALUATION_SCRIPTS` are the evaluation alphabets
  (meta-test), the others the background alphabets (meta-train).

How it differs from Omniglot: printed glyphs, not handwriting (the variation between instances
is font design plus a random affine map and stroke width, not 20 people's strokes); fewer and
larger alphabets (about 15 scripts, Latin and Canadian syllabics with 300-400 letters each);
scripts such as Arabic, N'Ko, Tifinagh and Ogham exist only in DejaVu Sans and its bold, so
their instances differ by distortion more than by font; white ink on black as in MNIST.
Counts (seed 0, 20 instances) are in `describe`'s output and the README.

`load` caches the arrays as .npz (default ``~/.cache/metagrad/glyphs``, or ``$METAGRAD_CACHE``/
glyphs, or an explicit directory), keyed by the build settings and the Pillow, FreeType and
matplotlib versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import unicodedata
from collections.abc import Sequence

import numpy as np

VERSION = 1  # bump when the rendering changes (part of the cache key)
SIZE = 28  # output side
_RENDER = 56  # side of the kept window (2x the output)
_FONT_PX = 40
_CANVAS = 112
MIN_CLASSES = 10
INK_MIN = 4.0  # minimum total ink (in units of full pixels, 28x28) for a visible glyph

# DejaVu Sans first: its character map defines the classes and its rendering the dedupe.
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmti10.ttf",
    "cmtt10.ttf",
    "cmmi10.ttf",
)

# The evaluation (meta-test) alphabets; about 35% of the classes.
EVALUATION_SCRIPTS = (
    "GREEK",
    "ARMENIAN",
    "GEORGIAN",
    "HEBREW",
    "ARABIC",
    "TIFINAGH",
    "NKO",
    "OGHAM",
    "COPTIC",
)

_LETTERS = ("Lu", "Ll", "Lt", "Lo")
_TWO_WORD = ("OLD", "CANADIAN")


def script_of(char: str) -> str | None:
    """The script ("alphabet") a character belongs to, from its Unicode name."""
    words = unicodedata.name(char, "").split()
    if not words:
        return None
    return " ".join(words[:2]) if words[0] in _TWO_WORD else words[0]


def font_dir() -> pathlib.Path:
    import matplotlib

    return pathlib.Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _charmaps() -> list[set[int]]:
    from matplotlib import ft2font

    return [set(ft2font.FT2Font(str(font_dir() / f)).get_charmap()) for f in FONT_FILES]


def candidate_characters() -> list[tuple[int, str]]:
    """(code point, script) of every letter DejaVu Sans maps, in code point order."""
    out = []
    for cp in sorted(_charmaps()[0]):
        ch = chr(cp)
        if unicodedata.category(ch) in _LETTERS and not unicodedata.decomposition(ch):
            script = script_of(ch)
            if script is not None:
                out.append((cp, script))
    return out


# -- rendering -------------------------------------------------------------------------------


def _render(font, char: str) -> np.ndarray:
    """The character's 56x56 window (float32, ink in [0, 1]) or zeros when blank."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
    ImageDraw.Draw(canvas).text(
        (_CANVAS // 2, _CANVAS // 2), char, font=font, fill=255, anchor="mm"
    )
    a = np.asarray(canvas)
    rows, cols = np.nonzero(a.any(1))[0], np.nonzero(a.any(0))[0]
    if len(rows) == 0:
        return np.zeros((_RENDER, _RENDER), np.float32)
    cy, cx = (rows[0] + rows[-1] + 1) // 2, (cols[0] + cols[-1] + 1) // 2
    extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 5
    side = max(_RENDER, extent + extent % 2)
    # The side x side window centred on the ink, zeros outside the canvas.
    window = np.zeros((side, side), a.dtype)
    y0, x0 = cy - side // 2, cx - side // 2
    ys, xs = slice(max(y0, 0), min(y0 + side, _CANVAS)), slice(max(x0, 0), min(x0 + side, _CANVAS))
    window[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = a[ys, xs]
    if side != _RENDER:
        window = np.asarray(Image.fromarray(window).resize((_RENDER, _RENDER), Image.BOX))
    return window.astype(np.float32) / 255.0


def _filter3(x: np.ndarray, op) -> np.ndarray:
    """3x3 max or min filter over the last two axes (zero padding)."""
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    h, w = x.shape[1:]
    rows = op(op(p[:, :-2], p[:, 1:-1]), p[:, 2:])
    return op(op(rows[:, :, :-2], rows[:, :, 1:-1]), rows[:, :, 2:])[:, :h, :w]


def _stroke(x: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Per-image stroke change: -1 thinner (half an erosion), 0, +1 / +2 dilations."""
    out = x.copy()
    thin = width < 0
    out[thin] = 0.5 * (x[thin] + _filter3(x[thin], np.minimum))
    grow = width > 0
    dil = _filter3(x[grow], np.maximum)
    twice = width[grow] == 2
    dil[twice] = _filter3(dil[twice], np.maximum)
    out[grow] = dil
    return out


def _affine(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random forward affine maps [n, 2, 3] in normalized coordinates ([-1, 1])."""
    angle = np.deg2rad(np.clip(rng.normal(0.0, 8.0, n), -20.0, 20.0))
    shear = rng.uniform(-0.25, 0.25, n)
    scale = rng.uniform(0.85, 1.15, n)
    width = rng.uniform(0.8, 1.1, n)
    shift = rng.uniform(-0.08, 0.08, (n, 2))
    c, s = np.cos(angle), np.sin(angle)
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    shr = np.zeros((n, 2, 2))
    shr[:, 0, 0] = shr[:, 1, 1] = 1.0
    shr[:, 0, 1] = shear
    diag = np.zeros((n, 2, 2))
    diag[:, 0, 0], diag[:, 1, 1] = scale * width, scale
    lin = rot @ shr @ diag  # acts on (x, y)
    return np.concatenate([lin, shift[:, :, None]], -1)


def _warp(windows: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Samples each 56x56 window through its affine map onto 56x56, then 2x2-averages to 28."""
    n, p = windows.shape[0], _RENDER
    grid = (np.arange(p) + 0.5) / p * 2.0 - 1.0
    gx, gy = np.meshgrid(grid, grid)  # output coordinates
    lin_inv = np.linalg.inv(maps[:, :, :2])
    d = np.stack([gx.ravel(), gy.ravel()])[None] - maps[:, :, 2:]  # [n, 2, p*p]
    src = lin_inv @ d
    sx = (src[:, 0] + 1.0) * p / 2.0 - 0.5 + 1.0  # +1: the zero border below
    sy = (src[:, 1] + 1.0) * p / 2.0 - 0.5 + 1.0
    padded = np.pad(windows, ((0, 0), (1, 1), (1, 1))).reshape(-1)
    q = p + 2
    sx, sy = np.clip(sx, 0.0, q - 1.001), np.clip(sy, 0.0, q - 1.001)
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = (sx - x0).astype(np.float32), (sy - y0).astype(np.float32)
    base = y0 * q + x0 + (np.arange(n) * q * q)[:, None]  # flat indices into `padded`
    take = lambda off: padded[base + off]  # noqa: E731
    out = (take(0) * (1 - fx) + take(1) * fx) * (1 - fy) + (
        take(q) * (1 - fx) + take(q + 1) * fx
    ) * fy
    out = out.reshape(n, p // 2, 2, p // 2, 2).mean((2, 4))
    return np.clip(out, 0.0, 1.0)


# -- the dataset -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Glyphs:
    """The rendered set: images, class labels, and each class's character and alphabet."""

    images: np.ndarray  # uint8 [n, 28, 28], ink 255
    labels: np.ndarray  # int64 [n], class ids 0..C-1, `instances` consecutive per class
    codepoints: np.ndarray  # int64 [C]
    class_alphabet: np.ndarray  # int64 [C], index into `alphabets`
    alphabets: tuple[str, ...]
    evaluation: tuple[str, ...] = EVALUATION_SCRIPTS

    @property
    def num_classes(self) -> int:
        return len(self.codepoints)

    def split_classes(self, split: str) -> np.ndarray:
        """Class ids of the "background" (meta-train) or "evaluation" (meta-test) alphabets."""
        if split not in ("background", "evaluation"):
            raise ValueError(f"split must be 'background' or 'evaluation', got {split!r}")
        is_eval = np.array([a in self.evaluation for a in self.alphabets])[self.class_alphabet]
        return np.nonzero(is_eval if split == "evaluation" else ~is_eval)[0]

    def source(self, split: str) -> GlyphSource:
        keep = np.isin(self.labels, self.split_classes(split))
        return GlyphSource(self.images[keep], self.labels[keep])

    def describe(self) -> dict:
        """Counts per split and per alphabet."""
        per = np.bincount(self.class_alphabet, minlength=len(self.alphabets))
        inst = np.bincount(self.labels, minlength=self.num_classes)
        out = {"classes": self.num_classes, "images": len(self.labels), "alphabets": {}}
        out["instances_per_class"] = [int(inst.min()), int(inst.max())]
        for split in ("background", "evaluation"):
            cls = self.split_classes(split)
            out[split] = {
                "classes": len(cls),
                "alphabets": len(np.unique(self.class_alphabet[cls])),
            }
        for name, count in zip(self.alphabets, per, strict=True):
            out["alphabets"][name] = int(count)
        return out


class GlyphSource(Sequence):
    """Records ``{"image": uint8 [28, 28, 1], "label": int}``, like a `tfds.data_source`.

    Also exposes the whole arrays (`images`, `labels`), which the episode sampler gathers
    from directly instead of record by record.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        if not isinstance(i, int | np.integer):
            raise TypeError(f"index must be an integer, got {type(i).__name__}")
        return {"image": self.images[i][..., None], "label": self.labels[i]}


def build(
    seed: int = 0,
    *,
    instances: int = 20,
    classes_per_alphabet: int | None = None,
    chunk: int = 256,
) -> Glyphs:
    """Renders the set (no cache; see `load`).

    Args:
      seed: seeds the font order, stroke widths and distortions (same seed, same arrays).
      instances: images per class (>= 1).
      classes_per_alphabet: keep only the first N characters (code point order) of each
        alphabet, for a small set (tests); None keeps all.
      chunk: images distorted per vectorized batch (speed only: 256 keeps the arrays in
        cache, 5x faster than 2048 on our CPU).
    """
    from PIL import ImageFont

    if not isinstance(instances, int) or instances < 1:
        raise ValueError(f"instances must be an integer >= 1, got {instances!r}")
    if classes_per_alphabet is not None and (
        not isinstance(classes_per_alphabet, int) or classes_per_alphabet < 1
    ):
        raise ValueError(
            f"classes_per_alphabet must be None or an integer >= 1, got {classes_per_alphabet!r}"
        )
    charmaps = _charmaps()
    fonts = [ImageFont.truetype(str(font_dir() / f), _FONT_PX) for f in FONT_FILES]

    # Classes: letters of DejaVu Sans, blank and duplicate renderings dropped.
    by_script: dict[str, list[int]] = {}
    seen, protos = set(), {}
    for cp, script in candidate_characters():
        if (
            classes_per_alphabet is not None
            and len(by_script.get(script, ())) >= classes_per_alphabet
        ):
            continue
        window = _render(fonts[0], chr(cp))
        small = window.reshape(SIZE, 2, SIZE, 2).mean((1, 3))
        if small.sum() < INK_MIN:
            continue
        key = np.round(small * 255).astype(np.uint8).tobytes()
        if key in seen:
            continue
        seen.add(key)
        protos[(cp, 0)] = window
        by_script.setdefault(script, []).append(cp)
    alphabets = tuple(
        sorted(
            s
            for s, cps in by_script.items()
            if len(cps) >= min(MIN_CLASSES, classes_per_alphabet or MIN_CLASSES)
        )
    )
    classes = [(cp, a) for a, s in enumerate(alphabets) for cp in by_script[s]]

    # Instances: a seeded font cycle per class, stroke widths and affine maps.
    rng = np.random.default_rng(seed)
    plan = []  # (class id, font index) per image
    for c, (cp, _) in enumerate(classes):
        usable = [f for f in range(len(FONT_FILES)) if cp in charmaps[f]]
        order = list(rng.permutation(usable))
        picked = []
        while len(picked) < instances and order:
            f = int(order.pop(0))
            if (cp, f) not in protos:
                protos[(cp, f)] = _render(fonts[f], chr(cp))
            if protos[(cp, f)].sum() * 0.25 >= INK_MIN:
                picked.append(f)
            if not order and picked and len(picked) < instances:
                order = list(rng.permutation(picked))
        plan.extend((c, f) for f in picked[:instances])
    labels = np.array([c for c, _ in plan], np.int64)
    widths = rng.choice([-1, 0, 1, 2], size=len(plan), p=[0.3, 0.35, 0.3, 0.05])
    maps = _affine(rng, len(plan))
    images = np.empty((len(plan), SIZE, SIZE), np.uint8)
    for lo in range(0, len(plan), chunk):
        hi = min(lo + chunk, len(plan))
        windows = np.stack([protos[(classes[c][0], f)] for c, f in plan[lo:hi]])
        out = _warp(_stroke(windows, widths[lo:hi]), maps[lo:hi])
        images[lo:hi] = np.round(out * 255).astype(np.uint8)
    return Glyphs(
        images=images,
        labels=labels,
        codepoints=np.array([cp for cp, _ in classes], np.int64),
        class_alphabet=np.array([a for _, a in classes], np.int64),
        alphabets=alphabets,
    )


def default_cache_dir() -> pathlib.Path:
    root = os.environ.get("METAGRAD_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "metagrad"
    )
    return pathlib.Path(root) / "glyphs"


def _cache_key(settings: dict) -> str:
    import matplotlib
    import PIL
    from PIL import features

    versions = {
        "version": VERSION,
        "pillow": PIL.__version__,
        "freetype": features.version("freetype2"),
        "matplotlib": matplotlib.__version__,
    }
    text = json.dumps(settings | versions, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def load(
    seed: int = 0,
    *,
    instances: int = 20,
    classes_per_alphabet: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> Glyphs:
    """`build`, cached on disk as .npz (see the module docstring for the default directory)."""
    settings = dict(seed=seed, instances=instances, classes_per_alphabet=classes_per_alphabet)
    path = pathlib.Path(cache_dir or default_cache_dir()) / f"glyphs_{_cache_key(settings)}.npz"
    if use_cache and path.exists():
        with np.load(path) as z:
            return Glyphs(
                images=z["images"],
                labels=z["labels"],
                codepoints=z["codepoints"],
                class_alphabet=z["class_alphabet"],
                alphabets=tuple(str(a) for a in z["alphabets"]),
            )
    data = build(seed, instances=instances, classes_per_alphabet=classes_per_alphabet)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(
            tmp,
            images=data.images,
            labels=data.labels,
            codepoints=data.codepoints,
            class_alphabet=data.class_alphabet,
            alphabets=np.array(data.alphabets),
        )
        os.replace(tmp, path)
    return data


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m experiments.glyphs [--seed S] [--out sheet.png]``: counts and a sample sheet."""
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="python -m experiments.glyphs", description=main.__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--cache", default=None, help="cache directory")
    parser.add_argument("--no-cache", action="store_true", help="render even if cached")
    parser.add_argument("--out", default=None, help="save a PNG sheet of sample classes")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    data = load(
        args.seed, instances=args.instances, cache_dir=args.cache, use_cache=not args.no_cache
    )
    print(f"loaded in {time.perf_counter() - start:.1f} s")
    print(json.dumps(data.describe(), indent=1))
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pick = np.random.default_rng(0).choice(data.num_classes, 12, replace=False)
        fig, axes = plt.subplots(12, 10, figsize=(10, 12))
        for row, c in zip(axes, pick, strict=True):
            imgs = data.images[data.labels == c]
            for ax, img in zip(row, imgs, strict=False):
                ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            for ax in row:
                ax.axis("off")
            row[0].set_title(
                f"U+{data.codepoints[c]:04X} {data.alphabets[data.class_alphabet[c]]}",
                fontsize=6,
                loc="left",
            )
        fig.tight_layout()
        fig.savefig(args.out, dpi=80)


if __name__ == "__main__":
    main()
