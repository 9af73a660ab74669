"""The toy experiment of Roth et al. (ICML 2020) on rho-regularisation, in 2-D.

    python -m dmlcore.toy                      # 5 seeds, prints the table, writes toy_rho.png
    python -m dmlcore.toy --seeds 10 --p 0.3 --dim 8 --loss triplet --out toy.png

**Data** (:func:`make_data`; all coordinates in the plane):

* *train*: ``n_train_classes`` point groups whose centres lie on the diagonal,
  ``(t_k, t_k)`` with ``t_k`` evenly spaced in ``[-1, 1]``; each class is
  ``train_samples`` points drawn uniformly from the square of half-width
  ``train_halfwidth`` around its centre. The classes differ only along the diagonal:
  the training task is solved by one coordinate (``x``, ``y`` or ``x + y``), and the
  horizontal/vertical variation *within* a class is never needed.
* *test*: new classes arranged vertically and horizontally: around every interior train
  centre ``(a, a)``, small Gaussian groups (std ``test_std``) at ``(a, a + j d)`` (a
  vertical line) and ``(a + j d, a)`` (a horizontal line), ``j = +-1 .. +-test_groups``,
  ``d = test_spacing``. Telling them apart needs exactly the fine horizontal/vertical
  variation that the training objective is free to throw away.

**Model**: a small MLP ``2 -> hidden -> hidden -> embed_dim`` whose output is
L2-normalised (a point on the unit sphere), trained for a fixed number of steps with
Adam on class-balanced batches (every train class, ``samples_per_class`` samples each)
with a loss and a miner from dmlcore's registries (default: triplet loss; the margin loss
works too). Methods compared, each on the same data and initialisation per seed:

* ``distance_weighted`` (no regularisation),
* ``rho_distance`` with ``p = 0`` (a control: the same miner code with the
  regularisation switched off),
* ``rho_distance`` with ``p > 0`` (rho-regularisation: with probability ``p`` an anchor's
  negative is another sample of its own class, so same-class samples are pushed apart).

**Measured**: on the *train* embeddings the spectral decay ``rho_spectrum@m``
(:func:`dmlcore.metrics.embedding_space_metrics`, default ``m = 2``: the largest singular
value dropped, KL(uniform || normalised spectrum); lower = flatter spectrum, more
directions used) and ``pi_ratio``; on the *test* embeddings Recall@1 and mAP@R
(:func:`dmlcore.metrics.evaluate_embeddings`, cosine, query left out).

**Why not a 2-D embedding (the unit circle)?** With ``d = 2`` and ``m = 2`` one
singular value is left after dropping the first, so ``rho_spectrum@2`` is 0 for every
model; ``m = 1`` keeps both values but measures little more than how far the points
spread around the circle (about 0.00-0.01 for every method here). And on the circle the
embedding has one degree of freedom (the angle), so a within-class *2-D* structure cannot
be kept however the network is trained: measured (5 seeds, 150 steps), test R@1 rises
only from 0.43 to 0.51. The default is an 8-D embedding (``embed_dim``), where rho@2 has
seven values to compare; ``--dim 3`` shows the test effect too (R@1 0.69 -> 0.91) with a
noisier rho. docs/revisiting.md has the numbers, including the margin loss (beta 0.6),
where test retrieval improves but rho@2 does not drop in this toy.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

BASELINE = "distance_weighted"
RHO = "rho_distance"


@dataclass(frozen=True)
class ToySetup:
    """Everything that defines one toy run except the seed and the miner."""

    n_train_classes: int = 6
    train_samples: int = 24
    """Points per train class."""
    train_halfwidth: float = 0.15
    """Half-width of the square each train class fills around its diagonal centre."""
    test_groups: int = 2
    """Test groups on each side of a centre, per line (vertical and horizontal)."""
    test_spacing: float = 0.05
    test_std: float = 0.015
    test_samples: int = 12
    """Points per test group (class)."""
    embed_dim: int = 8
    hidden: int = 64
    steps: int = 150
    samples_per_class: int = 4
    """Per batch; every train class is in every batch."""
    lr: float = 3e-3
    loss: str = "triplet"
    loss_params: dict[str, Any] = field(default_factory=dict)
    loss_lr: float = 5e-3
    """Learning rate of the loss's own parameters (the margin loss's beta)."""
    rho_m: int = 2
    """Spectral decay drops the first |m|-1 singular values (the paper's rho: m = 2)."""


@dataclass
class ToyData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    test_kind: np.ndarray
    """Per test point: 0 = vertical group, 1 = horizontal group."""


@dataclass
class ToyRun:
    method: str
    seed: int
    metrics: dict[str, float]
    train_emb: np.ndarray
    test_emb: np.ndarray
    seconds: float


@contextmanager
def _single_thread():
    """Run the tiny model on one intra-op thread: with more, thread start-up and (on a busy
    machine) oversubscription cost far more than the matrix products (measured 25x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_data(setup: ToySetup, seed: int) -> ToyData:
    """Train classes along the diagonal, test groups on vertical/horizontal lines (module docstring)."""
    rng = np.random.default_rng(10_007 + int(seed))
    K = int(setup.n_train_classes)
    if K < 3:
        raise ValueError("n_train_classes must be at least 3 (test groups sit at the interior centres)")
    t = np.linspace(-1.0, 1.0, K)
    w = float(setup.train_halfwidth)
    n = int(setup.train_samples)
    x_train = np.concatenate([t[k] + rng.uniform(-w, w, size=(n, 2)) for k in range(K)])
    y_train = np.repeat(np.arange(K), n)
    xs, ys, kinds = [], [], []
    offsets = [j * setup.test_spacing for j in range(-setup.test_groups, setup.test_groups + 1) if j != 0]
    c = 0
    for a in t[1:-1]:
        for kind in (0, 1):
            for off in offsets:
                centre = np.array([a, a + off]) if kind == 0 else np.array([a + off, a])
                xs.append(centre + setup.test_std * rng.standard_normal((setup.test_samples, 2)))
                ys.append(np.full(setup.test_samples, c))
                kinds.append(np.full(setup.test_samples, kind))
                c += 1
    return ToyData(
        x_train.astype(np.float32),
        y_train,
        np.concatenate(xs).astype(np.float32),
        np.concatenate(ys),
        np.concatenate(kinds),
    )


def make_model(setup: ToySetup) -> nn.Module:
    h = int(setup.hidden)
    return nn.Sequential(
        nn.Linear(2, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, int(setup.embed_dim))
    )


def _embed(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return nn.functional.normalize(model(torch.from_numpy(x)), dim=1).numpy()


def train_toy(setup: ToySetup, miner: str, miner_params: dict[str, Any] | None, seed: int,
              data: ToyData | None = None) -> ToyRun:
    """Train one model (``miner`` from the registry) and measure it."""
    with _single_thread():
        return _train_toy(setup, miner, miner_params, seed, data)


def _train_toy(setup: ToySetup, miner: str, miner_params: dict[str, Any] | None, seed: int,
               data: ToyData | None) -> ToyRun:
    from . import registry
    from .losses.criterion import Criterion
    from .metrics import embedding_space_metrics, evaluate_embeddings

    t0 = time.perf_counter()
    data = data if data is not None else make_data(setup, seed)
    K = int(data.y_train.max()) + 1
    torch.manual_seed(int(seed))
    model = make_model(setup)
    loss = registry.build("loss", setup.loss, dict(setup.loss_params), num_classes=K, embed_dim=setup.embed_dim)
    mine = registry.build("miner", miner, {**(miner_params or {}), "seed": int(seed)},
                          embed_dim=setup.embed_dim, train_seed=int(seed))
    criterion = Criterion(loss, mine)
    groups: list[dict[str, Any]] = [{"params": list(model.parameters()), "lr": setup.lr}]
    own = list(criterion.parameters())
    if own:
        groups.append({"params": own, "lr": setup.loss_lr})
    opt = torch.optim.Adam(groups)
    rng = np.random.default_rng(int(seed))
    X = torch.from_numpy(data.x_train)
    Y = torch.from_numpy(data.y_train)
    members = [np.flatnonzero(data.y_train == k) for k in range(K)]
    m = int(setup.samples_per_class)
    for _ in range(int(setup.steps)):
        idx = torch.from_numpy(np.concatenate([rng.choice(mm, m, replace=False) for mm in members]))
        emb = nn.functional.normalize(model(X[idx]), dim=1)
        value, _ = criterion(emb, Y[idx])
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
    model.eval()
    train_emb, test_emb = _embed(model, data.x_train), _embed(model, data.x_test)
    space = embedding_space_metrics(train_emb, data.y_train, rho_m=setup.rho_m)
    test = evaluate_embeddings(test_emb, data.y_test, recall_k=[1], clustering=False, map_at=None, seed=int(seed))
    train = evaluate_embeddings(train_emb, data.y_train, recall_k=[1], clustering=False, map_at=None, seed=int(seed))
    metrics = {
        "rho_spectrum": space["rho_spectrum"],
        "pi_ratio": space["pi_ratio"],
        "pi_intra": space["pi_intra"],
        "test_recall_at_1": test["recall_at_1"],
        "test_map_at_r": test["map_at_r"],
        "train_recall_at_1": train["recall_at_1"],
    }
    return ToyRun(method_name(miner, miner_params), int(seed), metrics, train_emb, test_emb, time.perf_counter() - t0)


def method_name(miner: str, params: dict[str, Any] | None) -> str:
    if miner == RHO:
        return f"{RHO} p={float((params or {}).get('p', 0.2)):g}"
    return miner


def methods(p: float, control: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """The compared (miner, params): baseline, optional p=0 control, rho-regularised."""
    if not 0 < p <= 1:
        raise ValueError(f"p={p!r}: the regularised run needs 0 < p <= 1")
    out: list[tuple[str, dict[str, Any]]] = [(BASELINE, {})]
    if control:
        out.append((RHO, {"p": 0.0}))
    out.append((RHO, {"p": float(p)}))
    return out


def compare(setup: ToySetup, seeds: Sequence[int], p: float = 0.3, control: bool = True) -> list[ToyRun]:
    """Every method on every seed (same data and initialisation per seed)."""
    runs = []
    for seed in seeds:
        data = make_data(setup, seed)
        for miner, params in methods(p, control):
            runs.append(train_toy(setup, miner, params, seed, data))
    return runs


COLUMNS = ("rho_spectrum", "pi_ratio", "test_recall_at_1", "test_map_at_r", "train_recall_at_1")


def summarize(runs: Sequence[ToyRun]) -> list[dict[str, Any]]:
    """Per method (in first-seen order): n, and mean/std (ddof=1) of each metric."""
    order: list[str] = []
    by: dict[str, list[ToyRun]] = {}
    for r in runs:
        if r.method not in by:
            order.append(r.method)
        by.setdefault(r.method, []).append(r)
    rows = []
    for name in order:
        rs = by[name]
        row: dict[str, Any] = {"method": name, "n": len(rs), "seconds": float(np.mean([r.seconds for r in rs]))}
        for c in COLUMNS:
            v = np.array([r.metrics[c] for r in rs], float)
            row[f"{c}:mean"] = float(v.mean())
            row[f"{c}:std"] = float(v.std(ddof=1)) if len(v) > 1 else math.nan
        rows.append(row)
    return rows


def wins(runs: Sequence[ToyRun], a: str, b: str, metric: str, lower: bool = False) -> tuple[int, int]:
    """(seeds where method ``a`` beats ``b`` on ``metric``, seeds compared)."""
    va = {r.seed: r.metrics[metric] for r in runs if r.method == a}
    vb = {r.seed: r.metrics[metric] for r in runs if r.method == b}
    common = sorted(set(va) & set(vb))
    better = sum((va[s] < vb[s]) if lower else (va[s] > vb[s]) for s in common)
    return better, len(common)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    heads = ["method", "n", "train rho@m (lower=flatter)", "train pi_ratio", "test R@1", "test mAP@R", "train R@1", "s/run"]
    lines = []
    for r in rows:
        cells = [r["method"], str(r["n"])]
        for c in COLUMNS:
            mean, std = r[f"{c}:mean"], r[f"{c}:std"]
            cells.append(f"{mean:.3f}" + (f" ± {std:.3f}" if math.isfinite(std) else ""))
        cells.append(f"{r['seconds']:.2f}")
        lines.append(cells)
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(heads)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(heads), fmt(["-" * w for w in widths]), *(fmt(l) for l in lines)])


def _pca2(x: np.ndarray) -> np.ndarray:
    xc = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return xc @ vt[:2].T


def plot(setup: ToySetup, data: ToyData, runs: Sequence[ToyRun], path: str | Path, anchor: int = 1) -> Path:
    """One seed: the input data, per method the test embeddings of the groups around one
    train centre (PCA to 2-D; that is where the methods differ), and the train spectra."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from .metrics import spectrum

    per_anchor = 4 * setup.test_groups  # groups around one centre (2 lines x 2 sides)
    anchors = int(data.y_test.max()) // per_anchor + 1
    anchor = min(max(int(anchor), 0), anchors - 1)
    local = (data.y_test // per_anchor) == anchor
    n = len(runs)
    fig = Figure(figsize=(3.6 * (n + 2), 3.8), layout="constrained")
    axes = fig.subplots(1, n + 2)
    cmap = colormaps["tab10"]

    def groups(ax, pts, labels, kinds, size):
        for c in np.unique(labels):
            sel = labels == c
            ax.scatter(pts[sel, 0], pts[sel, 1], s=size, color=cmap(c % per_anchor % 10),
                       marker="^" if kinds[sel][0] == 0 else "s", linewidths=0)

    ax = axes[0]
    ax.scatter(data.x_train[:, 0], data.x_train[:, 1], s=8, color="0.75", label="train")
    groups(ax, data.x_test, data.y_test, data.test_kind, 3)
    ax.set_title("input: train classes (grey) along the diagonal;\n"
                 "test groups (▲ vertical, ■ horizontal)", fontsize=8)
    ax.set_aspect("equal")
    for ax, run in zip(axes[1:-1], runs):
        z = _pca2(run.test_emb[local])
        groups(ax, z, data.y_test[local], data.test_kind[local], 8)
        m = run.metrics
        ax.set_title(f"{run.method}\ntest groups around centre {anchor + 1} (PCA); all test: "
                     f"R@1 {m['test_recall_at_1']:.3f}\ntrain rho@{setup.rho_m} {m['rho_spectrum']:.3f}",
                     fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    ax = axes[-1]
    for k, run in enumerate(runs):
        s = spectrum(run.train_emb, 1)
        ax.plot(np.arange(1, len(s) + 1), s, marker="o", ms=3, label=run.method, color=f"C{k}")
    ax.set_yscale("log")
    ax.set_xlabel("singular value index", fontsize=8)
    ax.set_title("train embedding spectrum (normalised)", fontsize=8)
    ax.legend(fontsize=7)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dmlcore.toy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    ap.add_argument("--p", type=float, default=0.3, help="rho_distance probability of the regularised run")
    ap.add_argument("--steps", type=int, default=ToySetup.steps)
    ap.add_argument("--dim", type=int, default=ToySetup.embed_dim, help="embedding dimension (unit sphere)")
    ap.add_argument("--loss", default=ToySetup.loss, help="triplet (default) or margin (beta 0.6)")
    ap.add_argument("--rho-m", type=int, default=ToySetup.rho_m)
    ap.add_argument("--no-control", action="store_true", help="leave out the rho_distance p=0 control")
    ap.add_argument("--out", default="toy_rho.png", help="PNG of seed 0's data and embeddings ('' for none)")
    args = ap.parse_args(argv)
    if not 0 < args.p <= 1:
        ap.error(f"--p {args.p}: the regularised run needs 0 < p <= 1 "
                 "(the p = 0 control is run unless --no-control)")
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    params = {"beta": 0.6} if args.loss == "margin" else {}
    setup = replace(ToySetup(), steps=args.steps, embed_dim=args.dim, loss=args.loss, loss_params=params,
                    rho_m=args.rho_m)
    runs = compare(setup, range(args.seeds), args.p, control=not args.no_control)
    print(f"toy experiment: {setup.loss} loss, {setup.embed_dim}-d unit sphere, {setup.steps} steps, "
          f"seeds 0..{args.seeds - 1}; mean ± std over seeds")
    print(format_table(summarize(runs)))
    reg = method_name(RHO, {"p": args.p})
    for metric, lower in (("rho_spectrum", True), ("test_recall_at_1", False), ("test_map_at_r", False)):
        k, n = wins(runs, reg, BASELINE, metric, lower)
        print(f"{reg} {'lower' if lower else 'higher'} {metric} than {BASELINE} on {k}/{n} seeds")
    if args.out:
        seed0 = [r for r in runs if r.seed == 0]
        path = plot(setup, make_data(setup, 0), seed0, args.out)
        print(f"wrote {path}")
    return 0


__all__ = ["ToySetup", "ToyData", "ToyRun", "make_data", "train_toy", "compare", "summarize", "wins",
           "format_table", "plot", "main"]

if __name__ == "__main__":
    sys.exit(main())
