"""The one typed description of a run.

A run is a :class:`RunConfig`: nested sections (``data``, ``model``, ``loss``,
``miner``, ``batch``, ``optim``, ``train``, ``eval``), every section a frozen
pydantic model that rejects unknown keys. Its flattened dotted keys
(``model.embed_dim``, ``loss.params.margin``) are the only names used anywhere:
Ray Tune's param_space, MLflow params, ``--set`` overrides and study axes.

Errors are :class:`ConfigError`: one line naming the file and the dotted key.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config that cannot be used. ``str(err)`` is one line meant for the user."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


ParamDict = dict[str, Any]


class DataConfig(_Section):
    dataset: str = "digits"
    """Registry name of the dataset (``sweeper list datasets``)."""
    root: str | None = None
    """Local directory of a real dataset in its published layout."""
    split: str = "standard"
    """``standard`` (the dataset's published class split), ``FILE.json#INDEX`` (an ooDML split) or
    ``closed`` (a closed-set split: the same classes on both sides, disjoint samples; e.g. CIFAR-10's
    data_batch_1-5 / test_batch; needs ``eval.protocol: closed_set``)."""
    params: ParamDict = Field(default_factory=dict)
    """Dataset-specific parameters (e.g. ``n_classes`` for glyphs)."""
    image_size: int = Field(32, ge=8)
    """Side of the square images the network sees."""
    augmentation: str = "standard"
    """Registry name of the train-time augmentation: the reference's ``base``, ``big``, ``adv``,
    ``red``, or the platform's ``standard``, ``strong``, ``none``."""
    augmentation_params: ParamDict = Field(default_factory=dict)
    """Augmentation parameters (e.g. ``scale_min`` of the random resized crop)."""
    val_classes: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of train classes held out as a class-disjoint validation split (checkpoint selection)."""
    num_workers: int = Field(-1, ge=-1)
    """DataLoader workers for file datasets: 0 = load in the training process, -1 = auto
    (the run's CPU share minus one: ``DMLCORE_NUM_CPUS`` set by the sweeper, else the
    CPUs this process may use). In-memory datasets need none."""
    cache_dir: str | None = None
    """Node-local cache of decoded images; ``None`` disables the cache."""
    store_side: int | None = Field(None, ge=8)
    """Shorter side (px) that file images are kept at, whole and with their aspect ratio
    (the crops are cut from it); default 1.5 x round(image_size * 256 / 224), 384 at 224."""
    on_corrupt: Literal["error", "skip"] = "error"
    """What to do with an unreadable image file."""


class ModelConfig(_Section):
    backbone: str = "small_cnn"
    pretrained: str | None = None
    """Backbone weights: ``imagenet`` (torchvision's original ImageNet V1 file, found in the
    torch hub cache; ``sweeper weights fetch BACKBONE`` downloads it once) or a local path
    to a state dict. Nothing is downloaded at run time."""
    backbone_params: ParamDict = Field(default_factory=dict)
    freeze_bn: bool = False
    """Frozen BatchNorm statistics: backbone BN layers normalise with their pretrained running
    statistics and never update them; gamma/beta still train (needs ``pretrained``)."""
    embed_dim: int = Field(128, ge=1)
    head: str = "linear"
    head_params: ParamDict = Field(default_factory=dict)
    normalize: bool = True
    """L2-normalise the embedding."""

    @model_validator(mode="after")
    def _frozen_bn_needs_weights(self) -> "ModelConfig":
        if self.freeze_bn and not self.pretrained:
            raise ValueError(
                "freeze_bn: true needs model.pretrained (frozen statistics of an untrained network are "
                "mean 0 / variance 1: every BatchNorm would be an identity); set model.pretrained=imagenet "
                "or a weight file, or freeze_bn: false"
            )
        return self


class LossConfig(_Section):
    name: str = "margin"
    params: ParamDict = Field(default_factory=dict)
    lr: float | None = Field(None, gt=0)
    """Learning rate of the loss's own parameters (proxies, class weights); default: optim.lr * optim.loss_lr_mult."""
    regularizers: ParamDict = Field(default_factory=dict)
    """Extra loss terms by registry name, e.g. ``{guided: {weight: 1.0, master: path}}``."""


class MinerConfig(_Section):
    name: str = "none"
    params: ParamDict = Field(default_factory=dict)


class BatchConfig(_Section):
    size: int = Field(112, ge=2)
    samples_per_class: int = Field(2, ge=0)
    """Batch composition: m samples of each of size/m classes. 0 = fully random batches."""
    sampler: str = "class_balanced"
    """Registry name of the batch sampler (``sweeper list samplers``)."""
    sampler_params: ParamDict = Field(default_factory=dict)
    """Sampler parameters (e.g. ``small_classes: replace``)."""
    iterations_per_epoch: int | None = Field(None, ge=1)
    """Batches per epoch; default: one pass over the train set."""

    @model_validator(mode="after")
    def _composition(self) -> "BatchConfig":
        m = self.samples_per_class
        if self.sampler == "class_balanced" and m > 0 and self.size % m:
            raise ValueError(f"size {self.size} is not a multiple of samples_per_class {m}")
        return self


class OptimConfig(_Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(4e-4, ge=0)
    momentum: float = Field(0.9, ge=0)
    loss_lr_mult: float = Field(100.0, gt=0)
    """Default learning-rate multiplier for the loss's own parameters (proxies)."""
    scheduler: Literal["none", "step", "multistep", "cosine", "plateau"] = "none"
    """``plateau``: ReduceLROnPlateau stepped on the epoch's mean train loss (``factor``, ``patience``)."""
    scheduler_params: ParamDict = Field(default_factory=dict)
    grad_clip: float | None = Field(None, gt=0)
    """Clip the gradients' global L2 norm."""
    clip_value: float | None = Field(None, gt=0)
    """Clip every gradient element to ``[-clip_value, clip_value]`` (``clip_grad_value_``)."""


class TrainConfig(_Section):
    epochs: int = Field(150, ge=1)
    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``."""
    amp: bool = True
    """Mixed precision; only takes effect on CUDA."""
    channels_last: bool = True
    """channels_last memory format on CUDA."""
    compile: bool = False
    """torch.compile the model."""
    deterministic: bool = True
    """Seeded, deterministic kernels (same seed, same metrics on CPU)."""
    checkpoint_every: int = Field(1, ge=0)
    """Report a checkpoint every N epochs (0 = never)."""
    sync_bn: bool = False
    """Data-parallel trials (several workers): SyncBatchNorm, i.e. training BatchNorm layers
    normalise with the statistics of the global batch (CUDA only). False: each worker
    normalises its own slice (frozen BN, ``model.freeze_bn``, needs neither). No effect with
    one worker (:mod:`dmlcore.distributed`)."""


class FewShotConfig(_Section):
    """Few-shot DML (Milbich et al. 2021): adapt the selected checkpoint on k labelled samples
    per test class. Defaults are the paper's (CompVis/Characterizing_Generalization_in_DML
    ``OOD-Study_FewShot.sh``: ``--finetune_shots 2|5 --finetune_iter 1000|1500
    --finetune_lr_multi 10 --finetune_only_last --finetune_criterion margin``)."""

    shots: list[int] = Field(default_factory=lambda: [2, 5])
    episodes: int = Field(10, ge=1)
    """Random episodes per shot count (published episodes: all of the split file's, 10 in the authors' files)."""
    steps: int | dict[int, int] = Field(default_factory=lambda: {2: 1000, 5: 1500})
    """Adaptation iterations: one count for every shot count, or ``{shots: iterations}``."""
    whole_net: bool = False
    """Fine-tune the whole network instead of the embedding head only."""
    lr_mult: float = Field(10.0, gt=0)
    episode_source: Literal["auto", "published", "random"] = "auto"
    """``auto``: the split file's published episodes when it has them for a shot count, else
    seeded random ones; ``published``: require them; ``random``: always draw."""

    @field_validator("shots")
    @classmethod
    def _shots(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError("shots must be a non-empty list of positive integers")
        return v

    @model_validator(mode="after")
    def _steps_cover_shots(self) -> "FewShotConfig":
        if isinstance(self.steps, dict):
            missing = [k for k in self.shots if k not in self.steps]
            if missing:
                raise ValueError(f"steps has no iteration count for {missing} shots; give steps as one number or add them")
            if any(n < 1 for n in self.steps.values()):
                raise ValueError("steps must be >= 1")
        elif self.steps < 1:
            raise ValueError("steps must be >= 1")
        return self

    def steps_for(self, k: int) -> int:
        return int(self.steps[k] if isinstance(self.steps, dict) else self.steps)


class EvalConfig(_Section):
    protocol: Literal["zero_shot", "closed_set"] = "zero_shot"
    """``zero_shot``: every test sample queries the other test samples (unseen classes).
    ``closed_set``: the test samples query all train images (same classes, no self-exclusion);
    needs ``data.split: closed`` (:mod:`dmlcore.metrics.closed_set`)."""
    every: int = Field(1, ge=1)
    """Evaluate every N epochs (and always after the last)."""
    recall_k: list[int] = Field(default_factory=lambda: [1, 2, 4, 8])
    distance: Literal["cosine", "euclidean"] = "cosine"
    clustering: bool = True
    """NMI and F1 from one k-means over the test embeddings."""
    embedding_metrics: bool = True
    """pi_intra, pi_inter, pi_ratio, rho spectral decay and uniformity on the train embeddings."""
    rho_m: int = 2
    """Spectral decay drops the first |m|-1 singular values (the paper's rho is m=2)."""
    max_train_embed: int | None = Field(None, ge=10)
    """Train samples embedded for the embedding-space metrics: None = all of them (as the
    reference), else at most this many, drawn as whole classes (seeded; no class is cut,
    so no class becomes a singleton). Sets too large for memory are cut the same way."""
    batch_size: int = Field(256, ge=1)
    select_on: Literal["val", "test", "last"] = "last"
    """Which evaluation picks the best epoch; ``val`` needs data.val_classes > 0."""
    select_metric: str = "recall_at_1"
    on_init: bool = False
    """Also evaluate the untrained model (epoch 0)."""
    few_shot: FewShotConfig | None = None
    """After training, few-shot episodes on the test classes (``fewshot/{k}shot/...`` metrics)."""
    pictures: bool = True
    """Pictures of the selected epoch (retrieval grid, embedding map, spectrum, similarity
    histograms, learning curves; :mod:`dmlcore.pictures`), logged as artifacts of the run."""
    log_model: bool = True
    """Log the selected epoch's weights as the run's MLflow LoggedModel (``sweeper/models.py``;
    ``sweeper embed``/``retrieve`` load it). Off for sweeps of thousands of throw-away trials,
    where it is most of a tiny trial's cost (docs/models.md)."""

    @field_validator("recall_k")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError("recall_k must be a non-empty list of positive integers")
        return sorted(set(v))


class MasterConfig(_Section):
    """The Guided DML master (Gonzalez-Zapata et al. 2022; :mod:`dmlcore.guided`): one conv branch
    per class and a shared head, trained on class-pair triplets before the student."""

    branches: int | None = Field(None, ge=2)
    """Number of class branches; default the dataset's class count (anything else is an error)."""
    channels: list[int] = Field(default_factory=lambda: [32, 64])
    """Output channels of the branch's two Conv5x5-PReLU-MaxPool2 blocks."""
    hidden: int = Field(256, ge=1)
    """Width of the shared head's two hidden layers."""
    triplets_per_pair: int = Field(64, ge=1)
    """T cap: T = min(this, smallest class size // 2) triplets per ordered class pair (= batch size)."""
    margin: float = Field(3.0, gt=0)
    beta: float = Field(0.003, ge=0, le=1)
    """Weight of the local term: (1-beta) triplet + beta mean ||local_a - local_p||."""
    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(12, ge=1)


class GuidedConfig(_Section):
    """Guided DML's master stage; used by ``loss.name: gdml_regression``."""

    master: MasterConfig = Field(default_factory=MasterConfig)
    cache_dir: str | None = None
    """Where trained masters and their targets are kept, keyed by a hash of what they depend on
    (default ``~/.cache/dmlcore/guided``)."""


class RunConfig(_Section):
    name: str = "run"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    miner: MinerConfig = Field(default_factory=MinerConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    guided: GuidedConfig = Field(default_factory=GuidedConfig)

    @model_validator(mode="after")
    def _cross(self) -> "RunConfig":
        if self.eval.select_on == "val" and self.data.val_classes <= 0:
            raise ValueError("eval.select_on=val needs data.val_classes > 0")
        closed_split, closed_eval = self.data.split == "closed", self.eval.protocol == "closed_set"
        if closed_eval and not closed_split:
            raise ValueError(f"eval.protocol=closed_set needs data.split=closed (got data.split={self.data.split!r}, a zero-shot split)")
        if closed_split and not closed_eval:
            raise ValueError(f"data.split=closed needs eval.protocol=closed_set (got eval.protocol={self.eval.protocol!r})")
        if closed_split and self.data.val_classes > 0:
            raise ValueError("data.val_classes: a closed-set split (data.split=closed) has no held-out classes; set it to 0")
        if self.loss.name == "gdml_regression" and self.model.normalize:
            raise ValueError("model.normalize: gdml_regression regresses unnormalised master targets; set model.normalize=false")
        if self.loss.name == "gdml_regression" and self.data.augmentation != "none":
            raise ValueError(
                f"data.augmentation={self.data.augmentation!r}: gdml_regression regresses master targets stored once "
                "per train image, so the images must not be augmented (set data.augmentation=none)"
            )
        return self

    # ---- dotted keys -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_flat(self) -> dict[str, Any]:
        """``{"model.embed_dim": 128, "loss.params.margin": 0.2, ...}``."""
        return flatten(self.to_dict())

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], source: str = "<flat>") -> "RunConfig":
        return from_dict(unflatten(flat), source)

    def with_overrides(self, overrides: Mapping[str, Any], source: str = "--set") -> "RunConfig":
        """A new config with dotted keys replaced (values are taken as typed)."""
        return from_dict(merge(self.to_dict(), unflatten(overrides)), source)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self) -> str:
        """Stable hash of everything that changes the trained weights (not ``name``)."""
        import hashlib

        d = self.to_dict()
        d.pop("name", None)
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


SECTIONS = ("data", "model", "loss", "miner", "batch", "optim", "train", "eval", "guided")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        parts = str(key).split(".")
        cur = out
        for p in parts[:-1]:
            nxt = cur.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"key '{key}' goes inside '{p}', which already has the value {nxt!r}")
            cur = nxt
        leaf = parts[-1]
        if isinstance(v, Mapping):
            cur[leaf] = merge(cur.get(leaf, {}) if isinstance(cur.get(leaf), dict) else {}, unflatten(v))
        else:
            cur[leaf] = v
    return out


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge; ``over`` wins. Free-form dicts merge key by key too."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def all_keys() -> list[str]:
    """Every dotted key a RunConfig accepts (free-form dicts as ``section.params``)."""
    keys: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            else:
                keys.append(f"{prefix}{name}")

    walk(RunConfig, "")
    return keys


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, each naming the source and the dotted key."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p != "__root__")
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{loc}'{_did_you_mean(loc)}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
            msg = e["msg"].removeprefix("Value error, ")
            where = f"'{loc}'" if loc else "config"
            lines.append(f"{source}: {where}: {msg}{got_s}")
    return "; ".join(lines)


def from_dict(d: Mapping[str, Any], source: str = "<dict>") -> RunConfig:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: a run config must be a mapping of sections, got {type(d).__name__}")
    try:
        return RunConfig.model_validate(dict(d))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def read_yaml(path: str | Path) -> Any:
    """``yaml.safe_load`` with one-line errors naming the file and the line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{p}:{where}: malformed YAML: {problem}") from None


def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalars/lists/dicts (``1e-4``, ``true``, ``[1,2]``)."""
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "1e-4" as a string; accept it as a float.
    if isinstance(v, str):
        try:
            return float(v) if any(c in v for c in "eE.") else v
        except ValueError:
            return v
    return v


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_value(v)
    return out


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Load a YAML run config (or the defaults) and apply dotted ``overrides``."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        raw = read_yaml(path)
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: a run config must be a mapping of sections, got {type(raw).__name__}")
        data = dict(raw)
    cfg = from_dict(data, source)
    if overrides:
        cfg = cfg.with_overrides(overrides, "--set")
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(cfg.to_yaml())
