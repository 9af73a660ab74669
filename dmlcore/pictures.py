"""Pictures of a run at its selected epoch (PNG files, the embedding map also as HTML).

Made from what the trainer already holds after training (``Trainer.best_embeddings``:
the embeddings of the evaluation selected by ``eval.select_on``, and the per-epoch
history), so they cost no extra forward pass. Every picture is one entry of
:data:`PICTURES` (``name -> function(inputs, out_dir) -> [files]``); :func:`render`
draws them all, and a picture that fails logs one warning and is left out (it never
fails the run). The sweeper logs the files as artifacts of the trial's MLflow run
(``pictures/``, :mod:`sweeper.pictures`); ``eval.pictures: false`` turns them off.

* ``retrieval_grid.png``: the worst queries (fewest correct neighbours among their top
  k, then the most confident wrong first neighbour) and some random queries, each with
  its top-k neighbours from the evaluation's own search (:func:`dmlcore.metrics.search.knn`,
  same distance, self excluded by index, ties by ascending gallery index); a green
  border marks a neighbour of the query's class, red one of another class, blue the
  query. The tiles are the split's own images (``LabeledDataset.get_uint8``), or a grey
  tile with the class name when an image cannot be read. The reference draws random
  queries with their neighbours but marks no correctness, and its search keeps the
  query as its own first neighbour (``R: evaluation/__init__.py:82-104``,
  ``recover_closest_standard``, off by default: ``make_recall_plot=False``, ``:8``).
* ``embedding_map.png`` / ``embedding_map.html``: the test embeddings in 2-D coloured by
  class, UMAP (umap-learn, when installed) or else the first two principal components
  (PCA of the centred embeddings); the HTML shows each point's image and class on hover.
* ``spectrum.png``: the singular values of the (uncentred) train embeddings, and the
  normalised spectrum that ``train/rho_spectrum`` (rho, KL(U || s) after dropping the
  first ``|eval.rho_m| - 1`` values) compares with the uniform one.
* ``similarities.png``: histograms of the similarities (cosine, or euclidean distances
  with ``eval.distance: euclidean``) of positive (same class) and negative test pairs.
* ``learning_curves.png``: train loss, Recall@1 (test, val), rho and pi_ratio per
  evaluated epoch, with the selected epoch marked.

Everything is drawn with Pillow (:mod:`dmlcore.charts` for the plots; the retrieval grid
is a mosaic of the images) and written by :func:`dmlcore.charts.save_png`: no matplotlib
import, milliseconds per picture; :func:`render` runs the numerical libraries on one thread
(:func:`single_threaded`: their thread pools cost more than these small arrays). Large splits are
subsampled (seeded) for every picture: :data:`MAX_CANDIDATE_QUERIES`,
:data:`MAX_MAP_POINTS`, :data:`MAX_HTML_POINTS`, :data:`MAX_PAIR_ROWS`.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import html
import io
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .charts import GREY, PALETTE, Canvas, class_colour, font, save_png

log = logging.getLogger(__name__)

TOP_K = 8
"""Neighbours per query in the retrieval grid."""
N_WORST = 5
N_RANDOM = 5
MAX_CANDIDATE_QUERIES = 2000
"""The worst queries are the worst of at most this many (seeded) queries, each searched in the whole gallery."""
MAX_MAP_POINTS = 3000
MAX_HTML_POINTS = 500
MAX_PAIR_ROWS = 600
"""Similarity histograms: all pairs among at most this many (seeded) test samples."""
UMAP_MAX_POINTS = 5000
TILE = 56
"""Retrieval grid tile size in pixels (border included)."""
BORDER = 4
MARGIN, GAP, CAPTION, HEAD = 8, 10, 14, 18
"""Retrieval grid layout: left margin, gap after the query column, caption band under a
tile, section title band (a tile of query row r, column j starts at x = MARGIN + TILE +
GAP + j * TILE and, in the first section, y = HEAD + r * (TILE + CAPTION))."""
COLOURS = {"query": (31, 119, 180), "correct": (44, 160, 44), "wrong": (214, 39, 40)}

ImageFn = Callable[[int], "np.ndarray | None"]


@dataclass
class Split:
    """Embeddings of one split with a way to show its samples."""

    emb: np.ndarray
    labels: np.ndarray
    image: ImageFn = lambda i: None
    """``H x W x 3`` uint8 image of sample ``i`` (None: a placeholder tile)."""
    name: Callable[[int], str] = str
    """Class name of a label."""
    batch: Callable[[np.ndarray], Sequence["np.ndarray | None"]] | None = None
    """Images of many samples at once (one bulk read); default: :attr:`image` one by one."""

    def images(self, idx: Sequence[int]) -> "np.ndarray | list[np.ndarray | None]":
        """``H x W x 3`` uint8 images of samples ``idx`` (None where one cannot be read):
        one ``N x H x W x 3`` array when the split reads them in bulk, else a list."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.batch is not None and len(idx):
            try:
                got = self.batch(idx)
                return got if isinstance(got, np.ndarray) else list(got)
            except Exception:  # e.g. an unreadable file in the batch: one by one below
                pass
        return [_safe_image(self, int(i)) for i in idx]


@dataclass
class PictureInputs:
    """What the pictures are made of (:func:`from_trainer` fills it from a trained Trainer)."""

    test: Split | None
    """Queries of the retrieval grid; the map and the similarity histograms use them too."""
    gallery: Split | None = None
    """The retrieval gallery when it is not the test split itself (``eval.protocol: closed_set``)."""
    train: Split | None = None
    """Train embeddings (the spectrum); None when ``eval.embedding_metrics`` is off."""
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    select_key: str | None = None
    distance: str = "cosine"
    rho_m: int = 2
    seed: int = 0


@dataclass
class Rendered:
    files: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """picture name -> one-line error."""
    skipped: dict[str, str] = field(default_factory=dict)
    """picture name -> why it was not drawn (no such data in this run)."""
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    """picture name -> seconds it took."""


class Skip(Exception):
    """A picture that has nothing to show in this run (not a failure)."""


# ----------------------------------------------------------------------------- retrieval
def top_neighbours(query_emb: np.ndarray, gallery_emb: np.ndarray, k: int, distance: str = "cosine",
                   query_index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, distances)`` of the ``k`` nearest gallery rows of each query, nearest first.

    The evaluation's own exact search (:func:`dmlcore.metrics.search.knn`: ties by
    ascending gallery index). ``query_index[i]`` is query ``i``'s own row in the gallery
    (same split): that row is dropped from its neighbours.
    """
    from .metrics.search import knn

    extra = 0 if query_index is None else 1
    k_eff = min(k, len(gallery_emb) - extra)
    if k_eff < 1:
        raise Skip("the gallery has no other sample")
    D, I = knn(query_emb, k_eff + extra, gallery=gallery_emb, distance=distance, exclude_self=False)
    if query_index is None:
        return I, D
    # drop the query's own row (or the last candidate when it is not among them), keep the order
    own = I == np.asarray(query_index)[:, None]
    own[~own.any(axis=1), -1] = True
    keep = ~own
    return I[keep].reshape(len(I), k_eff), D[keep].reshape(len(I), k_eff)


def neighbour_marks(query_labels: np.ndarray, neighbour_idx: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """``correct[i, j]``: neighbour ``j`` of query ``i`` has the query's class."""
    return np.asarray(gallery_labels)[neighbour_idx] == np.asarray(query_labels)[:, None]


def pick_queries(correct: np.ndarray, first_distance: np.ndarray, n_worst: int, n_random: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the worst queries and of random other ones.

    Worst: fewest correct neighbours, then the nearest (most confident) first
    neighbour, then the row. Random: a seeded draw from the rest, in row order.
    """
    n = len(correct)
    order = np.lexsort((np.arange(n), first_distance, correct.sum(axis=1)))
    worst = order[: min(n_worst, n)]
    rest = np.setdiff1d(np.arange(n), worst)
    rng = np.random.default_rng(seed)
    rand = np.sort(rng.choice(rest, size=min(n_random, len(rest)), replace=False)) if len(rest) else rest
    return worst, rand


def retrieval_table(inputs: PictureInputs, k: int = TOP_K, n_worst: int = N_WORST, n_random: int = N_RANDOM,
                    max_candidates: int = MAX_CANDIDATE_QUERIES) -> dict[str, Any]:
    """What the retrieval grid shows: query rows (into the test split), their neighbours, the marks."""
    q = inputs.test
    g = inputs.gallery or q
    n = len(q.labels)
    rng = np.random.default_rng(inputs.seed)
    cand = np.arange(n) if n <= max_candidates else np.sort(rng.choice(n, max_candidates, replace=False))
    own = cand if inputs.gallery is None else None
    idx, dist = top_neighbours(q.emb[cand], g.emb, k, inputs.distance, own)
    correct = neighbour_marks(q.labels[cand], idx, g.labels)
    worst, rand = pick_queries(correct, dist[:, 0], n_worst, n_random, inputs.seed)
    rows = np.concatenate([worst, rand])
    return {"queries": cand[rows], "neighbours": idx[rows], "distances": dist[rows], "correct": correct[rows],
            "n_worst": len(worst)}


def _fit(img: np.ndarray, size: int) -> np.ndarray:
    """``img`` (``H x W``, ``H x W x 1`` or ``x 3``) as a ``size x size x 3`` uint8 tile:
    a proper downscale for large images, then nearest-neighbour by indexing (fast, crisp
    pixels for small images)."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    a = a[:, :, :3].astype(np.uint8, copy=False)
    if max(a.shape[:2]) > 2 * size:
        from PIL import Image

        t = Image.fromarray(np.ascontiguousarray(a))
        t.thumbnail((2 * size, 2 * size))
        a = np.asarray(t)
    h, w = a.shape[:2]
    return a[(np.arange(size) * h // size)[:, None], (np.arange(size) * w // size)[None, :]]


def _resize_stack(stack: np.ndarray, size: int) -> np.ndarray:
    """``N x h x w x 3`` images as ``N x size x size x 3`` by nearest-neighbour indexing, contiguous."""
    stack = np.asarray(stack, dtype=np.uint8)
    n, h, w = stack.shape[:3]
    if size % h == 0 and size % w == 0:  # whole factors (16 px digits in 48 px tiles): each pixel as a block,
        fy, fx = size // h, size // w  # the same pixels as the indexing below, one plain copy (~4x faster)
        return np.broadcast_to(stack[:, :, None, :, None], (n, h, fy, w, fx, 3)).reshape(n, size, size, 3)
    stack = np.ascontiguousarray(stack)  # e.g. a channels-first batch seen channels-last
    ys, xs = np.arange(size) * h // size, np.arange(size) * w // size
    return np.ascontiguousarray(stack[:, ys][:, :, xs])


def fit_all(images: "np.ndarray | Sequence[np.ndarray | None]", size: int) -> list[np.ndarray | None]:
    """:func:`_fit` of every image; images of one shape are resized together (one indexing;
    an ``N x H x W x 3`` array of small images: all of them at once)."""
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[3] == 3 and max(images.shape[1:3]) <= 2 * size:
        return list(_resize_stack(images, size))
    out: list[np.ndarray | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        if img is not None:
            groups.setdefault(np.shape(img), []).append(i)
    for shape, members in groups.items():
        if len(shape) == 3 and shape[2] == 3 and max(shape[:2]) <= 2 * size:
            tiles = _resize_stack(np.stack([np.asarray(images[i]) for i in members]), size)
            for i, t in zip(members, tiles):
                out[i] = t
        else:
            for i in members:
                out[i] = _fit(images[i], size)
    return out


def _place(canvas: np.ndarray, tile: np.ndarray | None, x: int, y: int, colour: tuple[int, int, int]) -> bool:
    """A bordered tile (already fitted) at ``(x, y)``; False when there is none (a grey placeholder)."""
    canvas[y:y + TILE, x:x + TILE] = colour
    canvas[y + BORDER:y + TILE - BORDER, x + BORDER:x + TILE - BORDER] = (200, 200, 200) if tile is None else tile
    return tile is not None


@functools.lru_cache(maxsize=4096)
def _label(text: str, size: int = 10) -> np.ndarray:
    """Black text on white as a small uint8 array (cached: class names repeat in every grid)."""
    from PIL import Image, ImageDraw

    f = font(size)
    x0, y0, x1, y1 = f.getbbox(text) if text else (0, 0, 1, 1)
    im = Image.new("L", (max(1, x1), max(1, y1)), 255)
    ImageDraw.Draw(im).text((0, 0), text, fill=0, font=f)
    return np.asarray(im)


def _put_label(canvas: np.ndarray, text: str, x: int, y: int, size: int = 10) -> None:
    lab = _label(text, size)
    h, w = lab.shape
    h, w = min(h, canvas.shape[0] - y), min(w, canvas.shape[1] - x)
    region = canvas[y:y + h, x:x + w]
    np.minimum(region, lab[:h, :w, None], out=region)


def _safe_image(split: Split, i: int) -> np.ndarray | None:
    try:
        return split.image(int(i))
    except Exception:  # unreadable image: the placeholder tile says its class
        return None


def retrieval_grid(inputs: PictureInputs, out_dir: Path, k: int = TOP_K, n_worst: int = N_WORST,
                   n_random: int = N_RANDOM) -> list[Path]:
    """``retrieval_grid.png`` (module docstring)."""
    from PIL import Image, ImageDraw

    if inputs.test is None:
        raise Skip("no test embeddings")
    t = retrieval_table(inputs, k, n_worst, n_random)
    q, g = inputs.test, inputs.gallery or inputs.test
    kk = t["neighbours"].shape[1]
    row_h = TILE + CAPTION
    width = MARGIN + TILE + GAP + kk * TILE + MARGIN
    n_rows = len(t["queries"])
    sections = 1 + (0 < t["n_worst"] < n_rows)
    canvas = np.full((sections * HEAD + n_rows * row_h + 8, width, 3), 255, dtype=np.uint8)
    inner = TILE - 2 * BORDER
    q_tiles = fit_all(q.images(t["queries"]), inner)
    g_rows = np.unique(t["neighbours"])
    g_tiles = dict(zip(g_rows.tolist(), fit_all(g.images(g_rows), inner)))
    titles: list[tuple[int, str]] = []
    y = 0
    for r, qi in enumerate(t["queries"]):
        if r == 0 or r == t["n_worst"]:
            titles.append((y + 3, f"worst queries (fewest correct of the top {kk})" if r < t["n_worst"] else "random queries"))
            y += HEAD
        qname = q.name(int(q.labels[qi]))
        if not _place(canvas, q_tiles[r], MARGIN, y, COLOURS["query"]):
            _put_label(canvas, qname[:8], MARGIN + BORDER + 2, y + TILE // 2 - 6)
        _put_label(canvas, qname[:10], MARGIN, y + TILE + 1)
        x = MARGIN + TILE + GAP
        for j in range(kk):
            gi = int(t["neighbours"][r, j])
            gname = g.name(int(g.labels[gi]))
            if not _place(canvas, g_tiles[gi], x, y, COLOURS["correct" if t["correct"][r, j] else "wrong"]):
                _put_label(canvas, gname[:8], x + BORDER + 2, y + TILE // 2 - 6)
            _put_label(canvas, gname[:9], x, y + TILE + 1)
            x += TILE
        y += row_h
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for yy, text in titles:
        draw.text((MARGIN, yy), text, fill=(0, 0, 0), font=font(12))
    path = Path(out_dir) / "retrieval_grid.png"
    return [save_png(image, path)]


# ----------------------------------------------------------------------------- charts
def spectrum_chart(train_emb: np.ndarray, rho_m: int = 2) -> Canvas:
    """Left: the singular values of the train embeddings; right: the normalised spectrum
    ``s`` rho compares with the uniform ``U`` (the first ``|rho_m| - 1`` values dropped)."""
    from .metrics.embedding_space import kl_divergence, singular_values

    sv = singular_values(train_emb)  # one SVD; s and rho from it as dmlcore.metrics.embedding_space does
    m = abs(int(rho_m)) if rho_m else 1
    s = sv[m - 1:] / sv[m - 1:].sum()
    u = np.full(len(s), 1.0 / len(s))
    rho = (kl_divergence(u, s) if rho_m > 0 else kl_divergence(s, u)) if rho_m else float("nan")
    c = Canvas(760, 300, 1, 2, ylog=True, xinteger=True, xlabel="index (descending)")
    left, right = c.panels
    left.title = "singular values of the train embeddings"
    left.line(np.arange(1, len(sv) + 1), sv, PALETTE[0], "singular values")
    right.title = f"rho@{rho_m} = KL(U || s) = {rho:.3g}" + (f", first {m - 1} dropped" if m > 1 else "")
    right.line(np.arange(m, m + len(s)), s, PALETTE[1], "normalised spectrum s")
    right.hline(1.0 / len(s), GREY, "uniform U")
    return c


def spectrum_picture(inputs: PictureInputs, out_dir: Path) -> list[Path]:
    if inputs.train is None:
        raise Skip("no train embeddings (eval.embedding_metrics: false)")
    return [spectrum_chart(inputs.train.emb, inputs.rho_m).save(Path(out_dir) / "spectrum.png")]


def pair_similarities(emb: np.ndarray, labels: np.ndarray, distance: str, max_rows: int, seed: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``(positive, negative)`` pair values (cosine similarity, or euclidean distance) of all
    pairs ``i < j`` among at most ``max_rows`` seeded samples, each in row-major pair order."""
    n = len(labels)
    rows = np.arange(n) if n <= max_rows else np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))
    x = np.asarray(emb, dtype=np.float32)[rows]
    y = np.asarray(labels)[rows]
    if distance == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        v = x @ x.T
    else:
        sq = (x * x).sum(1)
        v = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0))
    upper = np.triu(np.ones((len(rows), len(rows)), dtype=bool), k=1)  # pairs i < j (boolean masks: no index arrays)
    same = y[:, None] == y[None, :]
    return v[upper & same], v[upper & ~same]


def similarity_picture(inputs: PictureInputs, out_dir: Path) -> list[Path]:
    if inputs.test is None:
        raise Skip("no test embeddings")
    pos, neg = pair_similarities(inputs.test.emb, inputs.test.labels, inputs.distance, MAX_PAIR_ROWS, inputs.seed)
    if not len(pos) + len(neg):
        raise Skip("fewer than two test samples")
    lo = min(float(v.min()) for v in (pos, neg) if len(v))
    hi = max(float(v.max()) for v in (pos, neg) if len(v)) + 1e-9
    what = "cosine similarity" if inputs.distance == "cosine" else "euclidean distance"
    c = Canvas(520, 320, xlabel=f"{what} of test pairs (selected epoch {inputs.best_epoch})")
    p = c.panels[0]
    p.title = "positive and negative pairs (density)"
    for vals, name, col in ((pos, "positive (same class)", PALETTE[2]), (neg, "negative", PALETTE[3])):
        if len(vals):
            # 50 equal bins given as (bins, range): numpy's binning by arithmetic, not a sort of the values
            h, edges = np.histogram(vals, 50, range=(lo, hi), density=True)
            p.stairs(h, edges, col, f"{name}: {len(vals)} pairs, mean {vals.mean():.3f}")
    return [c.save(Path(out_dir) / "similarities.png")]


CURVES = (
    ("train loss", ("train/loss",)),
    ("Recall@1", ("test/recall_at_1", "val/recall_at_1")),
    ("rho (train/rho_spectrum)", ("train/rho_spectrum",)),
    ("pi_ratio (train/pi_ratio)", ("train/pi_ratio",)),
)


def learning_curves_chart(history: Sequence[Mapping[str, float]], best_epoch: int = 0) -> Canvas:
    """2 x 2 panels of :data:`CURVES` over the evaluated epochs; the selected epoch dashed."""
    title = f"learning curves (selected epoch {best_epoch}: dashed)" if best_epoch else "learning curves"
    c = Canvas(760, 480, 2, 2, title=title, xinteger=True, xlabel="epoch")
    for p, (name, keys) in zip(c.panels, CURVES):
        p.title = name
        for i, key in enumerate(keys):
            pts = [(h["epoch"], h[key]) for h in history if key in h and "epoch" in h]
            if pts:
                e, v = zip(*pts)
                p.line(e, v, PALETTE[i], key if len(keys) > 1 else "")
        if not p.series:
            p.note("not computed")
        elif best_epoch:
            p.vline(best_epoch)
    return c


def learning_curves_picture(inputs: PictureInputs, out_dir: Path) -> list[Path]:
    if not inputs.history:
        raise Skip("no epoch in the history")
    return [learning_curves_chart(inputs.history, inputs.best_epoch).save(Path(out_dir) / "learning_curves.png")]


# ----------------------------------------------------------------------------- the map
def _pca(x: np.ndarray, seed: int, distance: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0)
    _, vecs = np.linalg.eigh(x.T @ x)  # d x d: cheap for any n
    out = x @ vecs[:, ::-1][:, :2]
    return out if out.shape[1] == 2 else np.column_stack([out, np.zeros(len(out))])


def _umap(x: np.ndarray, seed: int, distance: str) -> np.ndarray:
    if len(x) > UMAP_MAX_POINTS:
        raise Skip(f"more than {UMAP_MAX_POINTS} points")
    import umap  # umap-learn, optional

    metric = "cosine" if distance == "cosine" else "euclidean"
    return np.asarray(umap.UMAP(n_components=2, metric=metric, random_state=seed).fit_transform(x))


MAP_METHODS: dict[str, Callable[[np.ndarray, int, str], np.ndarray]] = {"umap": _umap, "pca": _pca}
"""Tried in this order; the first that works draws the map (PCA always can)."""
_WARNED: set[str] = set()


def map_coordinates(emb: np.ndarray, seed: int = 0, distance: str = "cosine") -> tuple[np.ndarray, str]:
    """2-D coordinates of ``emb`` and the method that made them (:data:`MAP_METHODS` in order)."""
    last: BaseException | None = None
    for name, fn in MAP_METHODS.items():
        try:
            return fn(emb, seed, distance), name
        except Skip:
            continue
        except Exception as err:
            last = err
            why = f"{type(err).__name__}: {err}"
            if name not in _WARNED:  # once per process: every trial of a worker would say the same
                _WARNED.add(name)
                hint = " (pip install umap-learn)" if isinstance(err, ImportError) and name == "umap" else ""
                log.warning("embedding map: %s is not available (%s)%s; using the next method", name, why, hint)
    raise RuntimeError(f"no map method worked: {last}")


def _map_points(inputs: PictureInputs) -> tuple[np.ndarray, np.ndarray, str]:
    q = inputs.test
    n = len(q.labels)
    rng = np.random.default_rng(inputs.seed)
    rows = np.arange(n) if n <= MAX_MAP_POINTS else np.sort(rng.choice(n, MAX_MAP_POINTS, replace=False))
    xy, method = map_coordinates(q.emb[rows], inputs.seed, inputs.distance)
    return rows, xy, method


THUMB = 32
"""Side of a hover thumbnail in the HTML map (all of them in one JPEG sprite sheet)."""


def sprite_sheet(images: Sequence[np.ndarray | None], size: int = THUMB) -> tuple[str, int]:
    """One JPEG (a data URI) holding every image as a ``size x size`` tile, row-major in
    ``cols`` columns (one encode instead of one per point); a missing image is a grey tile."""
    from PIL import Image

    cols = max(1, int(math.ceil(math.sqrt(max(len(images), 1)))))
    rows = max(1, int(math.ceil(len(images) / cols)))
    tiles = np.full((rows * cols, size, size, 3), 200, dtype=np.uint8)
    fitted = fit_all(images, size)
    have = [i for i, t in enumerate(fitted) if t is not None]
    if have:
        tiles[have] = np.stack([fitted[i] for i in have])
    # tile i at row i // cols, column i % cols
    grid = tiles.reshape(rows, cols, size, size, 3).transpose(0, 2, 1, 3, 4).reshape(rows * size, cols * size, 3)
    sheet = Image.fromarray(np.ascontiguousarray(grid))
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=90)  # thumbnails: a JPEG encodes ~10x faster than a PNG
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(), cols


HTML_TEMPLATE = """<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>body{font:13px sans-serif;margin:12px} #tip{position:fixed;display:none;background:#fff;border:1px solid #888;
padding:4px;pointer-events:none} #img{width:96px;height:96px;image-rendering:pixelated;background-repeat:no-repeat}
circle{stroke:#333;stroke-width:.3} circle:hover{stroke-width:2}</style></head>
<body><h3>__TITLE__</h3><p>__SUB__</p><svg id="map" width="720" height="560"></svg>
<div id="tip"><div id="img"></div><span id="txt"></span></div>
<script>
const P = __DATA__, SPRITE = "__SPRITE__", COLS = __COLS__, Z = 96;
const svg = document.getElementById("map"), tip = document.getElementById("tip");
const img = document.getElementById("img"), txt = document.getElementById("txt");
img.style.backgroundImage = "url(" + SPRITE + ")";
img.style.backgroundSize = (COLS * Z) + "px auto";
const W = 720, H = 560, pad = 20, NS = "http://www.w3.org/2000/svg";
const xs = P.map(p => p[0]), ys = P.map(p => p[1]);
const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
const sx = v => pad + (v - x0) / ((x1 - x0) || 1) * (W - 2 * pad), sy = v => H - pad - (v - y0) / ((y1 - y0) || 1) * (H - 2 * pad);
P.forEach((p, i) => {
  const c = document.createElementNS(NS, "circle");
  c.setAttribute("cx", sx(p[0])); c.setAttribute("cy", sy(p[1])); c.setAttribute("r", 4);
  c.setAttribute("fill", p[2]);
  c.addEventListener("mousemove", e => {
    img.style.backgroundPosition = (-(i % COLS) * Z) + "px " + (-Math.floor(i / COLS) * Z) + "px";
    txt.textContent = "class " + p[3] + ", sample " + p[4];
    tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px"; tip.style.display = "block";
  });
  c.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  svg.appendChild(c);
});
</script></body></html>
"""


def embedding_map_html(xy: np.ndarray, colours: Sequence[tuple[int, int, int]], names: Sequence[str],
                       images: Sequence[np.ndarray | None], samples: Sequence[int], title: str, subtitle: str) -> str:
    """A self-contained HTML page (inline SVG, one sprite sheet, a few lines of JS; nothing
    fetched): one dot per point in its class colour; hover shows the sample's image and class."""
    sprite, cols = sprite_sheet(images)
    xy = np.round(np.asarray(xy, dtype=np.float64), 4).tolist()
    data = [[a, b, "rgb(%d,%d,%d)" % tuple(c), nm, int(s)] for (a, b), c, nm, s in zip(xy, colours, names, samples)]
    return (HTML_TEMPLATE.replace("__TITLE__", html.escape(title)).replace("__SUB__", html.escape(subtitle))
            .replace("__SPRITE__", sprite).replace("__COLS__", str(cols))
            .replace("__DATA__", json.dumps(data).replace("</", "<\\/")))


def embedding_map_picture(inputs: PictureInputs, out_dir: Path) -> list[Path]:
    if inputs.test is None:
        raise Skip("no test embeddings")
    q = inputs.test
    rows, xy, method = _map_points(inputs)
    labs = q.labels[rows]
    title = f"test embeddings ({len(rows)} of {len(q.labels)}) by class, {method.upper()}, selected epoch {inputs.best_epoch}"
    classes = np.unique(labs)
    pos = np.searchsorted(classes, labs)
    c = Canvas(560, 470, title=title)
    p = c.panels[0]
    table = [class_colour(i, len(classes)) for i in range(len(classes))]
    names = [q.name(int(cl)) for cl in classes]
    colours = [table[i] for i in pos.tolist()]
    p.dots(xy[:, 0], xy[:, 1], colours)
    if len(classes) <= 10:  # a legend of the classes
        for i in range(len(classes)):
            p.key(names[i][:16], table[i])
    files = [c.save(Path(out_dir) / "embedding_map.png")]
    h = np.arange(len(rows)) if len(rows) <= MAX_HTML_POINTS else np.sort(
        np.random.default_rng(inputs.seed + 1).choice(len(rows), MAX_HTML_POINTS, replace=False))
    sub = rows[h]
    page = embedding_map_html(
        xy[h], [colours[i] for i in h.tolist()], [names[i] for i in pos[h].tolist()], q.images(sub),
        sub.tolist(),
        title, f"{len(h)} points; hover a point for its image and class.",
    )
    path = Path(out_dir) / "embedding_map.html"
    path.write_text(page)
    return files + [path]


# ----------------------------------------------------------------------------- all of them
PICTURES: dict[str, Callable[[PictureInputs, Path], list[Path]]] = {
    "retrieval_grid": retrieval_grid,
    "embedding_map": embedding_map_picture,
    "spectrum": spectrum_picture,
    "similarities": similarity_picture,
    "learning_curves": learning_curves_picture,
}


@functools.lru_cache(maxsize=1)
def _thread_pools() -> Any:
    """threadpoolctl's controller of the loaded BLAS and OpenMP libraries, made once (it
    reads every loaded library: ~5 ms) after faiss is loaded; None without threadpoolctl."""
    try:
        import faiss  # noqa: F401  (its OpenMP pool: the retrieval grid's search)
    except Exception:
        pass
    try:
        from threadpoolctl import ThreadpoolController

        return ThreadpoolController()
    except Exception:  # not installed (it comes with scikit-learn)
        return None


@contextlib.contextmanager
def single_threaded() -> Any:
    """numpy's BLAS, the OpenMP pools (faiss, torch) and torch's intra-op threads limited to
    one thread for the body, then set back.

    The pictures' numerical work is tiny (a 900 x 900 search, a 600 x 600 product, indexing
    a few hundred 16 x 16 images): split over threads, it costs more in waking and
    spinning threads than it computes, most of all on a loaded machine (on the 2 shared
    cores at load 5: 145 ms for all the pictures with the default 2 threads, 60 ms with 1)."""
    with contextlib.ExitStack() as stack:
        controller = _thread_pools()
        if controller is not None:
            try:
                stack.enter_context(controller.limit(limits=1))
            except Exception:  # a pool it cannot set: as it is
                pass
        torch = sys.modules.get("torch")  # only when the process uses it already (the trainer does)
        if torch is not None and torch.get_num_threads() != 1:
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            stack.callback(torch.set_num_threads, before)
        yield


def render(inputs: PictureInputs, out_dir: str | Path, names: Sequence[str] | None = None) -> Rendered:
    """Draw every picture of :data:`PICTURES` (or ``names``) into ``out_dir``, one thread
    for the numerical libraries (:func:`single_threaded`). A picture that fails logs one
    warning and is left out; nothing here raises."""
    with single_threaded():
        return _render(inputs, out_dir, names)


def _render(inputs: PictureInputs, out_dir: str | Path, names: Sequence[str] | None = None) -> Rendered:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = Rendered()
    t0 = time.perf_counter()
    for name in names or list(PICTURES):
        t1 = time.perf_counter()
        try:
            res.files += PICTURES[name](inputs, out)
        except Skip as why:
            res.skipped[name] = str(why)
        except Exception as err:  # a picture never fails the run
            res.failed[name] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            log.warning("picture %s failed and is left out: %s", name, res.failed[name])
        res.timings[name] = time.perf_counter() - t1
    res.seconds = time.perf_counter() - t0
    return res


def _hwc(x: Any) -> np.ndarray:
    return np.asarray(x.permute(1, 2, 0).cpu().numpy()) if hasattr(x, "permute") else np.asarray(x)


def _batch_fn(ds: Any) -> Callable[[np.ndarray], Sequence[np.ndarray]] | None:
    """Bulk reads of only the samples asked for: ``gather`` (the in-memory tensor or the
    decoded cache, one indexing), else the split's in-memory images (made once, when first
    needed); None when the split can do neither. Nothing is read before a picture asks:
    copying a whole split here cost more than all the images the pictures show."""
    if getattr(ds, "can_gather", False):
        def batch(idx: np.ndarray) -> list[np.ndarray]:
            import torch

            b = ds.gather(idx)
            if isinstance(b, torch.Tensor):
                return b.permute(0, 2, 3, 1).cpu().numpy()
            return [_hwc(b[k]) for k in range(len(idx))]  # an ImageBatch: images of different sizes

        return batch
    if not hasattr(ds, "in_memory_images"):
        return None
    held: list[np.ndarray] = []

    def in_memory(idx: np.ndarray) -> np.ndarray:
        if not held:
            images = ds.in_memory_images()
            if images is None:
                raise LookupError("the split holds no images in memory")  # Split.images: one by one
            held.append(images.permute(0, 2, 3, 1).cpu().numpy())
        return held[0][idx]

    return in_memory


def _image_fn(ds: Any) -> ImageFn:
    def image(i: int) -> np.ndarray | None:
        return _hwc(ds.get_uint8(int(i)))

    return image if hasattr(ds, "get_uint8") else (lambda i: None)


def _name_fn(ds: Any, source: Any) -> Callable[[int], str]:
    ids = getattr(ds, "class_ids", None)
    names = getattr(source, "class_names", None) or {}

    def name(label: int) -> str:
        cid = int(ids[label]) if ids is not None else int(label)
        return str(names.get(cid, cid))

    return name


def from_trainer(trainer: Any, result: Any) -> PictureInputs:
    """The inputs from a trained :class:`dmlcore.train.Trainer` and its ``TrainResult``.

    The embeddings are those of the selected epoch (``trainer.best_embeddings``). When the
    run resumed from a checkpoint after its selected epoch, that evaluation is not in
    memory any more: the embedding pictures are skipped (learning curves only)."""
    held = getattr(trainer, "best_embeddings", None) or {}
    data, cfg = trainer.data, trainer.cfg
    source = getattr(data, "source", None)

    def split(key: str, ds: Any) -> Split | None:
        if key not in held or ds is None:
            return None
        emb, labels = held[key]
        emb = emb.numpy() if hasattr(emb, "numpy") else np.asarray(emb)
        return Split(np.asarray(emb, dtype=np.float32), np.asarray(labels), _image_fn(ds), _name_fn(ds, source),
                     _batch_fn(ds))

    ev = cfg.eval
    return PictureInputs(
        test=split("test", data.test),
        gallery=split("gallery", data.train_eval),
        train=split("train", data.train_eval),
        history=list(result.history),
        best_epoch=int(result.best_epoch),
        select_key=None if ev.select_on == "last" else f"{ev.select_on}/{ev.select_metric}",
        distance=ev.distance,
        rho_m=ev.rho_m,
        seed=cfg.train.seed,
    )
