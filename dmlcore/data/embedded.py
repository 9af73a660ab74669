"""Datasets that need no download: ``glyphs`` (letters rendered from matplotlib's fonts)
and ``digits`` (scikit-learn's bundled 8x8 digits).

``glyphs``
    Classes are Latin, Greek and Cyrillic upper/lower-case letters (with their
    accented forms) and the digits 0-9, each rendered from the 16 TrueType faces
    that ship with matplotlib (DejaVu Sans / Serif / Sans Mono and STIX General, each
    regular / bold / italic / bold italic). A character is kept only when every face
    has a glyph for it (font cmaps). Look-alike code points are collapsed: two
    characters whose canonical 32 px renderings (binarised) differ in at most 2 pixels
    in at least a quarter of the faces (Latin ``A`` / Greek ``Alpha`` / Cyrillic ``A``)
    are one class (the lowest code point is kept); where they coincide in fewer faces
    (italic Cyrillic ``te`` looks like ``m``) the later character never uses those faces.
    A class id is the character's code point.

    Sample ``i`` of a class is its glyph in one face (faces cycle through a seeded
    permutation per class) under a random affine map (rotation, scale, shear,
    translation), stroke thickening/thinning, contrast and pixel-noise jitter, all
    drawn from an RNG seeded with ``(render_seed, code point, i)``: the dataset is
    identical in every process and a class's samples do not depend on which other
    classes are chosen.
"""

from __future__ import annotations

import functools
import os
import unicodedata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dmlcore.data.base import DATASET_CONTEXT, ArraySource, ClassSplit, DataError, stable_seed, stratified_sample_split
from dmlcore.registry import register

FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
)

# Unicode ranges scanned for letters/digits: Basic Latin, Latin-1, Latin Extended-A/B,
# Greek, Cyrillic.
_RANGES = ((0x30, 0x3A), (0x41, 0x5B), (0x61, 0x7B), (0xC0, 0x250), (0x370, 0x400), (0x400, 0x530))
_SCRIPTS = ("LATIN", "GREEK", "CYRILLIC")

_DEDUP_RES = 32  # canonical rendering used for the look-alike test
_DEDUP_DIFF = 64  # binarisation level of the canonical rendering
_DEDUP_PIXELS = 2  # glyphs are identical in a face when at most this many pixels differ
_MAX_TEMPLATE = 128  # template side cap (memory: 16 faces x classes x side^2 bytes)
_POPCOUNT = np.array([bin(v).count("1") for v in range(256)], dtype=np.int32)


def font_dir() -> str:
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


def _font_paths() -> list[str]:
    d = font_dir()
    paths = [os.path.join(d, f) for f in FONT_FILES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"glyphs: matplotlib's font {missing[0]} is missing (reinstall matplotlib)")
    return paths


def _candidates() -> list[int]:
    out = []
    for lo, hi in _RANGES:
        for cp in range(lo, hi):
            ch = chr(cp)
            cat = unicodedata.category(ch)
            name = unicodedata.name(ch, "")
            if (cat == "Nd" and cp < 0x80) or (cat in ("Lu", "Ll") and name.split(" ")[0] in _SCRIPTS):
                out.append(cp)
    return sorted(set(out))


def _render(font_path: str, chars: list[int], res: int) -> np.ndarray:
    """Canonical white-on-black renderings ``len(chars) x res x res`` (uint8): every glyph
    at the same size with its baseline at the same height, centred on its advance."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, max(4, int(round(res / 1.4))))
    out = np.zeros((len(chars), res, res), dtype=np.uint8)
    canvas = Image.new("L", (res, res), 0)
    draw = ImageDraw.Draw(canvas)
    for k, cp in enumerate(chars):
        draw.rectangle((0, 0, res, res), fill=0)
        draw.text((res / 2, res * 0.75), chr(cp), fill=255, font=font, anchor="ms")
        out[k] = np.asarray(canvas)
    return out


@functools.lru_cache(maxsize=1)
def _covered() -> tuple[int, ...]:
    """Candidate characters that every face really has a glyph for (font cmaps)."""
    from matplotlib import ft2font

    chars = set(_candidates())
    for p in _font_paths():
        cmap = ft2font.FT2Font(p).get_charmap()
        chars &= {cp for cp, gid in cmap.items() if gid}
    return tuple(sorted(chars))


@functools.lru_cache(maxsize=1)
def _templates(res: int) -> np.ndarray:
    """``n_fonts x len(_covered()) x res x res`` uint8 canonical renderings."""
    return np.stack([_render(p, list(_covered()), res) for p in _font_paths()])


@functools.lru_cache(maxsize=2)
def _class_templates(res: int, chars: tuple[int, ...]) -> np.ndarray:
    """``n_fonts x len(chars) x res x res`` uint8 canonical renderings of ``chars`` only."""
    return np.stack([_render(p, list(chars), res) for p in _font_paths()])


@functools.lru_cache(maxsize=1)
def glyph_charset() -> tuple[tuple[int, ...], dict[int, tuple[int, ...]]]:
    """``(code points, {code point: usable font indices})`` after the cmap and look-alike filters.

    Two characters look identical in a face when their canonical 32 px renderings,
    binarised at grey level 64, differ in at most 2 pixels (an accent or a dot is 4+).
    """
    cand = _covered()
    templates = _templates(2 * _DEDUP_RES)
    nf, C = templates.shape[:2]
    same = np.zeros((nf, C, C), dtype=bool)  # face f: i and j look identical
    for f in range(nf):
        t = templates[f].astype(np.uint16)
        canon = t[:, ::2, ::2] + t[:, 1::2, ::2] + t[:, ::2, 1::2] + t[:, 1::2, 1::2]  # 4 x the 32 px mean
        packed = np.packbits((canon > 4 * _DEDUP_DIFF).reshape(C, -1), axis=1)
        n = _POPCOUNT[packed].sum(1)
        # |n_i - n_j| bounds the xor count from below: compare only near-equal ink counts
        ii, jj = np.nonzero(np.abs(n[:, None] - n[None, :]) <= _DEDUP_PIXELS)
        ii, jj = ii[ii != jj], jj[ii != jj]
        hit = _POPCOUNT[packed[ii] ^ packed[jj]].sum(1) <= _DEDUP_PIXELS
        same[f, ii[hit], jj[hit]] = True
    count = np.triu(same.sum(0), k=1)  # pairs i < j: faces where they coincide
    merge_at = max(1, nf // 4)
    parent = list(range(C))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j in zip(*np.nonzero(count >= merge_at)):
        ri, rj = find(int(i)), find(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)  # the lowest code point represents the group
    keep = [k for k in range(C) if find(k) == k]
    fonts = {k: set(range(nf)) for k in keep}
    for i, j in zip(*np.nonzero((count > 0) & (count < merge_at))):
        i, j = int(i), int(j)
        if find(i) == i and find(j) == j:  # both stay classes: the later one avoids those faces
            fonts[j] -= set(np.flatnonzero(same[:, i, j]).tolist())
    keep = [k for k in keep if fonts[k]]
    return tuple(cand[k] for k in keep), {cand[k]: tuple(sorted(fonts[k])) for k in keep}


def glyph_class_order() -> tuple[int, ...]:
    """Every glyph class (code point) in the fixed shuffled order used by ``n_classes``."""
    chars, _ = glyph_charset()
    rng = np.random.default_rng(stable_seed("glyphs", "class-order"))
    return tuple(int(c) for c in rng.permutation(np.asarray(chars, dtype=np.int64)))


def _sample_params(render_seed: int, cp: int, n: int, n_fonts: int, jitter: float) -> dict[str, np.ndarray]:
    """Jitter of the ``n`` samples of class ``cp``. Row ``i`` depends only on
    ``(render_seed, cp, i)``: the streams are consumed row by row, so asking for more
    samples appends rows and never changes the earlier ones."""
    u = np.random.default_rng([render_seed, cp, 0]).random((n, 9))
    cycles = (n + n_fonts - 1) // n_fonts
    font_pos = np.concatenate(
        [np.random.default_rng([render_seed, cp, 1, c]).permutation(n_fonts) for c in range(cycles)]
    )[:n]
    j = float(jitter)
    return {
        "font": font_pos,
        "rot": np.deg2rad((u[:, 0] * 2 - 1) * 12.0 * j),
        "scale": np.exp((u[:, 1] * 2 - 1) * 0.15 * j),
        "shear": (u[:, 2] * 2 - 1) * 0.25 * j,
        "tx": (u[:, 3] * 2 - 1) * 0.12 * j,
        "ty": (u[:, 4] * 2 - 1) * 0.12 * j,
        "thick": np.where(u[:, 5] < min(1.0, 0.6 * j), (u[:, 6] * 2 - 1), 0.0),
        "fg": 1.0 - 0.3 * j * u[:, 7],
        "bg": np.minimum(0.25 * j * u[:, 8], 0.45),
    }


def _dilate(g: torch.Tensor) -> torch.Tensor:
    """3x3 grey dilation (separable max over shifted views)."""
    p = F.pad(g, (1, 1, 1, 1))
    r = torch.maximum(torch.maximum(p[..., :, :-2], p[..., :, 1:-1]), p[..., :, 2:])
    return torch.maximum(torch.maximum(r[..., :-2, :], r[..., 1:-1, :]), r[..., 2:, :])


@functools.lru_cache(maxsize=8)
def render_glyphs(
    n_classes: int | None, samples_per_class: int, jitter: float, image_size: int, render_seed: int
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """``(images N x 3 x S x S uint8, labels (code points), classes)``; cached per process."""
    order = glyph_class_order()
    if n_classes is None:
        n_classes = len(order)
    if not 2 <= n_classes <= len(order):
        raise DataError(f"data.params.n_classes: glyphs has {len(order)} classes; got {n_classes} (need 2..{len(order)})")
    if samples_per_class < 1:
        raise DataError(f"data.params.samples_per_class must be >= 1, got {samples_per_class}")
    if jitter < 0:
        raise DataError(f"data.params.jitter must be >= 0, got {jitter}")
    classes = order[:n_classes]
    _, usable = glyph_charset()
    seed = int(render_seed) & 0xFFFF_FFFF_FFFF_FFFF
    S = int(image_size)
    R = min(2 * S, _MAX_TEMPLATE)  # templates at 2x (capped); bilinear sampling straight to S x S
    if R == 2 * _DEDUP_RES:  # the renderings the look-alike test made anyway
        templates, col = torch.from_numpy(_templates(R)), {cp: k for k, cp in enumerate(_covered())}
    else:
        chars = tuple(sorted(classes))
        templates, col = torch.from_numpy(_class_templates(R, chars)), {cp: k for k, cp in enumerate(chars)}

    n = samples_per_class
    keys = ("rot", "scale", "shear", "tx", "ty", "thick", "fg", "bg")
    fi, ci, rows = [], [], {k: [] for k in keys}
    noise = np.empty((len(classes) * n, S, S), dtype=np.float32) if jitter > 0 else None
    for k, cp in enumerate(classes):
        faces = usable[cp]
        p = _sample_params(seed, cp, n, len(faces), jitter)
        fi.append(np.asarray(faces)[p["font"]])
        ci.append(np.full(n, col[cp]))
        for key in keys:
            rows[key].append(p[key])
        if noise is not None:
            np.random.default_rng([seed, cp, 2]).standard_normal((n, S, S), dtype=np.float32, out=noise[k * n : (k + 1) * n])
    fi_t = torch.from_numpy(np.concatenate(fi))
    ci_t = torch.from_numpy(np.concatenate(ci))
    P = {key: torch.from_numpy(np.concatenate(v)).float() for key, v in rows.items()}
    N = len(fi_t)

    # affine: output coords -> input coords (affine_grid wants the inverse map)
    cos, sin, s, sh = P["rot"].cos(), P["rot"].sin(), P["scale"], P["shear"]
    fwd = torch.zeros(N, 3, 3)
    fwd[:, 0, 0], fwd[:, 0, 1] = s * cos, s * (-sin + sh * cos)
    fwd[:, 1, 0], fwd[:, 1, 1] = s * sin, s * (cos + sh * sin)
    fwd[:, 0, 2], fwd[:, 1, 2], fwd[:, 2, 2] = P["tx"], P["ty"], 1.0
    theta = torch.linalg.inv(fwd)[:, :2]

    out = torch.empty(N, S, S, dtype=torch.uint8)
    noise_sigma = 0.06 * float(jitter)
    chunk = max(16, (1 << 22) // (S * S))
    for a in range(0, N, chunk):
        b = min(N, a + chunk)
        g = templates[fi_t[a:b], ci_t[a:b]].unsqueeze(1).float().div_(255)
        grid = F.affine_grid(theta[a:b], [b - a, 1, S, S], align_corners=False)
        g = F.grid_sample(g, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(1)
        t = P["thick"][a:b]
        for sel, sign, amount in ((t > 0, 1.0, 0.5 * t), (t < 0, -1.0, -0.35 * t)):
            idx = torch.nonzero(sel).flatten()
            if len(idx):  # stroke thickness: blend towards a 3x3 dilation / erosion
                gi = g[idx]
                moved = _dilate(gi) if sign > 0 else -_dilate(-gi)
                g[idx] = gi + amount[idx].view(-1, 1, 1) * (moved - gi)
        fg, bg = P["fg"][a:b].view(-1, 1, 1), P["bg"][a:b].view(-1, 1, 1)
        img = bg + (fg - bg) * g
        if noise is not None:
            img = img + noise_sigma * torch.from_numpy(noise[a:b])
        out[a:b] = img.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    images = out.unsqueeze(1).expand(N, 3, S, S).contiguous().numpy()
    images.setflags(write=False)
    labels = np.repeat(np.asarray(classes, dtype=np.int64), n)
    labels.setflags(write=False)
    return images, labels, classes


def glyph_name(cp: int) -> str:
    return f"{chr(cp)} {unicodedata.name(chr(cp), f'U+{cp:04X}')}"


@register("dataset", "glyphs", context=DATASET_CONTEXT)
def glyphs(
    n_classes: int | None = None,
    samples_per_class: int = 24,
    jitter: float = 1.0,
    render_seed: int = 0,
    image_size: int = 32,
) -> ArraySource:
    """Letters and digits rendered from matplotlib's fonts with random affine/stroke/noise jitter (hundreds of classes, no download).

    ``n_classes``: the first n classes of a fixed shuffled order (default: all);
    ``samples_per_class``; ``jitter``: strength of the per-sample distortion;
    ``render_seed``: which rendering (fixed by default, independent of train.seed, so
    every seed of a study sees the same data).
    """
    images, labels, classes = render_glyphs(
        None if n_classes is None else int(n_classes), int(samples_per_class), float(jitter), int(image_size), int(render_seed)
    )
    half = len(classes) // 2
    split = ClassSplit(tuple(sorted(classes[:half])), tuple(sorted(classes[half:])), "standard")
    names = {cp: glyph_name(cp) for cp in classes}
    return ArraySource("glyphs", images, labels, names, split, flip_ok=False)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images N x 8 x 8 float64 in 0..16, targets) of scikit-learn's bundled digits: the
    file ``load_digits`` reads (``sklearn/datasets/data/digits.csv.gz``), read the way it
    reads it, without importing ``sklearn.datasets`` (0.6 s, scipy.stats included, in every
    fresh trial worker; issue 20). Falls back to ``load_digits`` when the file is elsewhere."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package, imports nothing
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, mode="rt", encoding="utf-8") as fh:
                data = np.loadtxt(fh, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int, copy=False)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


@functools.lru_cache(maxsize=4)
def _digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    images, target = digits_arrays()
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)  # N x 1 x 8 x 8 in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp_(0, 1).mul_(255).round_().to(torch.uint8).expand(-1, 3, -1, -1).contiguous().numpy()
    x.setflags(write=False)
    y = target.astype(np.int64)
    y.setflags(write=False)
    return x, y


@register("dataset", "digits", context=DATASET_CONTEXT)
def digits(image_size: int = 32) -> ArraySource:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes) upscaled; classes 0-4 train, 5-9 test;
    closed split: a fixed stratified 70/30 of every class."""
    x, y = _digits(int(image_size))
    split = ClassSplit((0, 1, 2, 3, 4), (5, 6, 7, 8, 9), "standard")
    closed = stratified_sample_split(y, 0.3, stable_seed("digits-closed"))
    return ArraySource("digits", x, y, {k: str(k) for k in range(10)}, split, flip_ok=False, closed=closed)
