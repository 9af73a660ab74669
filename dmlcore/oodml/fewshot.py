"""Few-shot DML (Milbich et al. 2021, ooDML): adapt a trained model on k labelled samples
per *test* class, evaluate retrieval on the remaining test samples.

Per shot count k and episode e (the split file's published episodes when given, else
seeded by ``(seed, k, e)``):

* support = the published support samples, or k samples of every test class (at most
  ``n_c - 1``, so every class keeps a query); query = the rest of the test split;
* zero-shot: metrics of the unadapted model on the query;
* adapted: a copy of the model is fine-tuned for ``steps`` (one count or ``{k: steps}``)
  Adam steps at ``lr_mult x optim.lr`` (default 10x, as the reference) on the support with
  the margin loss + distance-weighted miner (built through the registries), only the
  embedding head by default (``whole_net=True``: every parameter), then evaluated on the
  query. Support images get the run's train augmentation; with k=1 each step shows two
  augmented views of every support image so that positives exist.

Results over episodes: mean and half-width of the 95% Student-t interval for both,
``fewshot/{k}shot/{metric}``, ``fewshot/{k}shot/{metric}_ci95``,
``fewshot/{k}shot/zero_shot_{metric}`` (+ ``_ci95``), ``fewshot/{k}shot/gain_recall_at_1``
(+ ``_ci95``), ``fewshot/{k}shot/episodes``, ``fewshot/{k}shot/steps``,
``fewshot/{k}shot/published_episodes`` (1 published, 0 seeded random) and
``fewshot/num_classes``. The trainer hook (:func:`run_after_training`) adapts the
*selected* checkpoint and adds ``fewshot/selected_epoch``.

The split is the one the test dataset was built from (``data.split``): the episodes are
drawn from ``test_dataset``'s own labels or come from that split's file, nothing else.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import registry

__all__ = ["Episode", "few_shot_eval", "make_episode", "mean_ci95", "run_after_training"]

CACHE_LIMIT_BYTES = 1 << 30


class Episode:
    def __init__(self, support: np.ndarray, query: np.ndarray) -> None:
        self.support, self.query = support, query


def make_episode(labels: np.ndarray, k: int, seed: int, episode: int) -> Episode:
    """Support / query positions (into ``labels``) of one seeded episode."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([int(seed) & 0x7FFFFFFF, int(k), int(episode)])
    support = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = min(int(k), len(members) - 1)
        if take > 0:
            support.append(np.sort(rng.choice(members, take, replace=False)))
    sup = np.sort(np.concatenate(support)) if support else np.zeros(0, dtype=np.int64)
    query = np.setdiff1d(np.arange(len(labels)), sup)
    return Episode(sup, query)


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the two-sided 95% Student-t interval (nan for one value)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return math.nan, math.nan
    if len(v) < 2:
        return float(v.mean()), math.nan
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(half)


def _unpack(obj: Any) -> tuple[nn.Module, Any, Any, Any]:
    """(model, test dataset, cfg, device) from a Trainer, a TrainResult or a model."""
    if hasattr(obj, "model") and hasattr(obj, "data") and hasattr(obj, "cfg"):  # Trainer
        return obj.model, obj.data.test, obj.cfg, getattr(obj, "device", None)
    if hasattr(obj, "model") and hasattr(obj, "config") and isinstance(getattr(obj, "model"), nn.Module):  # TrainResult
        return obj.model, None, obj.config, None
    if isinstance(obj, nn.Module):
        return obj, None, None, None
    raise TypeError(f"few_shot_eval needs a Trainer, TrainResult or nn.Module, got {type(obj).__name__}")


def _head(model: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
    e = model.head(fmap)
    return F.normalize(e, dim=1) if getattr(model, "normalize", False) else e


class _Embedder:
    """Embeds items of the test dataset with a (possibly fine-tuned) model."""

    def __init__(self, ds: Any, device: torch.device, batch_size: int, cache_backbone: bool, base: nn.Module) -> None:
        self.ds, self.device, self.bs = ds, device, batch_size
        self.feats: torch.Tensor | None = None
        if cache_backbone and hasattr(base, "backbone"):
            self.feats = self._backbone_cache(base)

    def _images(self, idx: np.ndarray):
        for a in range(0, len(idx), self.bs):
            yield torch.stack([self.ds[int(j)][0] for j in idx[a : a + self.bs]]).to(self.device)

    @torch.no_grad()
    def _backbone_cache(self, model: nn.Module) -> torch.Tensor | None:
        model.eval()
        out, size = [], 0
        for x in self._images(np.arange(len(self.ds))):
            f = model.backbone(x).float().cpu()
            size += f.numel() * 4
            if size > CACHE_LIMIT_BYTES:
                return None
            out.append(f)
        return torch.cat(out) if out else None

    @torch.no_grad()
    def embed(self, model: nn.Module, idx: np.ndarray) -> torch.Tensor:
        model.eval()
        outs = []
        if self.feats is not None:
            for a in range(0, len(idx), self.bs):
                outs.append(_head(model, self.feats[torch.as_tensor(idx[a : a + self.bs])].to(self.device)))
        else:
            outs = [model(x) for x in self._images(idx)]
        return torch.cat(outs).float().cpu() if outs else torch.zeros(0)


def _finetune(
    model: nn.Module, ds: Any, support: np.ndarray, k: int, steps: int, lr: float, whole_net: bool,
    augment: Any, loss: nn.Module, miner: nn.Module | None, batch_size: int, device: torch.device, seed: int,
    feats: torch.Tensor | None = None,
) -> float:  # fmt: skip
    """Fine-tune ``model`` in place on the support; returns the mean loss of the last 10 steps.

    Head-only: the frozen backbone runs under ``no_grad``; without augmentation its cached
    feature maps (``feats``) are used directly."""
    if whole_net:
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()
    else:
        if not hasattr(model, "head"):
            raise TypeError("head-only few-shot adaptation needs an EmbeddingModel (with .head); use whole_net=True")
        for p in model.parameters():
            p.requires_grad_(False)
        params = list(model.head.parameters())
        for p in params:
            p.requires_grad_(True)
        model.eval()
        model.head.train()
    opt = torch.optim.Adam(params, lr=lr)
    labels = np.asarray(ds.labels)[support]
    classes = np.unique(labels)
    views = 2 if k == 1 else 1
    per_class = max(1, min(k, len(support)) * views)
    n_cls = int(min(len(classes), max(2, batch_size // per_class)))
    rng = np.random.default_rng([int(seed) & 0x7FFFFFFF, 7, int(k)])
    raw = {int(j): ds.get_uint8(int(j)) if (augment is not None and hasattr(ds, "get_uint8")) else None for j in support}
    last: list[float] = []
    for step in range(int(steps)):
        pick = classes if n_cls >= len(classes) else np.sort(rng.choice(classes, n_cls, replace=False))
        idx = support[np.isin(labels, pick)]
        y = torch.as_tensor(np.tile(np.asarray(ds.labels)[idx], views), device=device)
        if not whole_net and augment is None and feats is not None:
            emb = _head(model, feats[torch.as_tensor(np.tile(idx, views))].to(device))
        else:
            xs = []
            for _ in range(views):
                for j in idx:
                    img = raw[int(j)]
                    xs.append(augment(img) if (augment is not None and img is not None) else ds[int(j)][0])
            x = torch.stack(xs).to(device)
            if whole_net:
                emb = model(x)
            else:
                with torch.no_grad():
                    fmap = model.backbone(x)
                emb = _head(model, fmap)
        tuples = miner(emb, y) if miner is not None else None
        value = loss(emb, y, tuples)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        last.append(float(value.detach()))
        last = last[-10:]
    for p in model.parameters():
        p.requires_grad_(False)
    return float(np.mean(last)) if last else math.nan


def few_shot_eval(
    trainer_or_model: Any,
    test_dataset: Any = None,
    cfg: Any = None,
    shots: Sequence[int] = (2, 5),
    episodes: int = 10,
    steps: int | Mapping[int, int] = 100,
    *,
    whole_net: bool = False,
    lr_mult: float = 10.0,
    lr: float | None = None,
    loss: str = "margin",
    loss_params: Mapping[str, Any] | None = None,
    miner: str = "distance_weighted",
    miner_params: Mapping[str, Any] | None = None,
    augment: bool = True,
    flip_ok: bool | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    device: Any = None,
    clustering: bool = False,
    published: Mapping[int, Sequence[np.ndarray]] | None = None,
    episode_source: str = "auto",
) -> dict[str, float]:
    """Few-shot adaptation on the test split; ``{"fewshot/{k}shot/...": float}``.

    ``published``: ``{k: [support positions into the test dataset, per episode]}`` (an
    imported ooDML split's episodes); with ``episode_source='auto'`` they are used for the
    shot counts they cover and seeded random episodes for the others, ``'published'``
    requires them, ``'random'`` ignores them. ``steps``: one count or ``{k: steps}``.

    ``trainer_or_model``: a built/fitted Trainer (its model, ``data.test``, config and
    device are used unless given) or an EmbeddingModel (then ``test_dataset`` and ``cfg``
    are required). The model itself is never modified (each episode adapts a copy).
    """
    from ..metrics import evaluate_embeddings

    model, ds0, cfg0, dev0 = _unpack(trainer_or_model)
    ds = test_dataset if test_dataset is not None else ds0
    cfg = cfg if cfg is not None else cfg0
    if ds is None or cfg is None:
        raise ValueError("few_shot_eval needs the test dataset and the run config")
    if flip_ok is None:
        data = getattr(trainer_or_model, "data", None)
        flip_ok = bool(getattr(data, "info", {}).get("flip_ok", False)) if data is not None else False
    device = torch.device(device) if device is not None else (dev0 or next(model.parameters()).device)
    seed = int(cfg.train.seed if seed is None else seed)
    bs = int(batch_size or cfg.batch.size)
    base_lr = float(lr if lr is not None else cfg.optim.lr * lr_mult)
    labels = np.asarray(ds.labels)
    aug = None
    if augment and cfg.data.augmentation != "none":
        aug = registry.build("augmentation", cfg.data.augmentation, None, key="data.augmentation",
                             image_size=cfg.data.image_size, flip_ok=flip_ok)  # fmt: skip
    lp = {"learn_beta": False} if loss == "margin" and loss_params is None else dict(loss_params or {})

    with torch.random.fork_rng(devices=[]):
        embedder = _Embedder(ds, device, int(cfg.eval.batch_size), not whole_net, model)
        zero_all = embedder.embed(model, np.arange(len(ds)))
        out: dict[str, float] = {}
        for k in shots:
            per_zero: dict[str, list[float]] = {}
            per_ft: dict[str, list[float]] = {}
            fixed = (published or {}).get(int(k)) if episode_source != "random" else None
            if fixed is None and episode_source == "published":
                have = sorted((published or {}).keys())
                raise ValueError(f"eval.few_shot.episode_source=published: the split has no published {k}-shot episodes (it has {have or 'none'})")
            n_steps = int(steps[int(k)] if isinstance(steps, Mapping) else steps)
            all_pos = np.arange(len(labels))
            for e in range(len(fixed) if fixed is not None else int(episodes)):
                if fixed is not None:
                    sup = np.asarray(fixed[e], dtype=np.int64)
                    ep = Episode(sup, np.setdiff1d(all_pos, sup))
                else:
                    ep = make_episode(labels, int(k), seed, e)
                if len(ep.support) == 0 or len(ep.query) < 2:
                    continue
                q_labels = labels[ep.query]
                metrics0 = evaluate_embeddings(zero_all[ep.query], q_labels, recall_k=cfg.eval.recall_k,
                                               distance=cfg.eval.distance, clustering=clustering, seed=seed)  # fmt: skip
                ep_seed = (seed * 1_000_003 + int(k) * 7919 + e) % 2**31
                torch.manual_seed(ep_seed)
                adapted = copy.deepcopy(model).to(device)
                n_cls = len(np.unique(labels[ep.support]))
                loss_fn = registry.build("loss", loss, lp, key="fewshot.loss", num_classes=n_cls,
                                         embed_dim=cfg.model.embed_dim).to(device)  # fmt: skip
                miner_fn = registry.build("miner", miner, miner_params, key="fewshot.miner",
                                          embed_dim=cfg.model.embed_dim, train_seed=ep_seed)  # fmt: skip
                _finetune(adapted, ds, ep.support, int(k), n_steps, base_lr, whole_net, aug, loss_fn,
                          miner_fn, bs, device, ep_seed, embedder.feats)  # fmt: skip
                metrics1 = evaluate_embeddings(embedder.embed(adapted, ep.query), q_labels, recall_k=cfg.eval.recall_k,
                                               distance=cfg.eval.distance, clustering=clustering, seed=seed)  # fmt: skip
                del adapted
                for name, v in metrics0.items():
                    per_zero.setdefault(name, []).append(float(v))
                for name, v in metrics1.items():
                    per_ft.setdefault(name, []).append(float(v))
            pre = f"fewshot/{int(k)}shot/"
            for name, vals in per_ft.items():
                out[pre + name], out[pre + name + "_ci95"] = mean_ci95(vals)
            for name, vals in per_zero.items():
                out[pre + "zero_shot_" + name], out[pre + "zero_shot_" + name + "_ci95"] = mean_ci95(vals)
            if "recall_at_1" in per_ft:
                gain = np.asarray(per_ft["recall_at_1"]) - np.asarray(per_zero["recall_at_1"])
                out[pre + "gain_recall_at_1"], out[pre + "gain_recall_at_1_ci95"] = mean_ci95(gain)
            out[pre + "episodes"] = float(len(next(iter(per_ft.values()), [])))
            out[pre + "published_episodes"] = 1.0 if fixed is not None else 0.0  # 0: seeded random episodes
            out[pre + "steps"] = float(n_steps)
        out["fewshot/num_classes"] = float(len(np.unique(labels)))
    return out


def run_after_training(trainer: Any, result: Any = None) -> dict[str, float]:
    """The trainer's hook for ``eval.few_shot`` (:class:`dmlcore.config.FewShotConfig`).

    Adapts and evaluates the *selected* checkpoint, the one ``best/...`` reports
    (``eval.select_on``): the weights the trainer kept at ``best_epoch``
    (``trainer.best_state``), else ``result.model`` / ``trainer.model``. Returns ``{}`` when
    the config has no ``eval.few_shot``. The metrics are plain floats the trainer reports
    with the final epoch; ``fewshot/selected_epoch`` names the epoch whose weights were adapted.
    """
    spec = getattr(trainer.cfg.eval, "few_shot", None)
    if spec is None:
        return {}
    if not hasattr(spec, "model_dump"):  # a plain mapping (tests, notebooks)
        from ..config import FewShotConfig

        spec = FewShotConfig.model_validate(dict(spec))
    model = getattr(result, "model", None) or trainer.model
    state = getattr(trainer, "best_state", None)
    # without a kept state (e.g. resumed after the selected epoch) the last epoch's weights are used
    selected = float(getattr(trainer, "best_state_epoch", trainer.cfg.train.epochs) if state is not None else trainer.cfg.train.epochs)
    if state is not None:
        model = copy.deepcopy(model)
        model.load_state_dict(state)
    steps = spec.steps if isinstance(spec.steps, int) else {int(k): int(v) for k, v in spec.steps.items()}
    data = trainer.data
    out = few_shot_eval(
        model, data.test, trainer.cfg, shots=tuple(spec.shots), episodes=spec.episodes, steps=steps,
        whole_net=spec.whole_net, lr_mult=spec.lr_mult, device=trainer.device,
        flip_ok=bool(data.info.get("flip_ok", False)), published=getattr(data, "episodes", None),
        episode_source=spec.episode_source,
    )  # fmt: skip
    out["fewshot/selected_epoch"] = selected
    return out
