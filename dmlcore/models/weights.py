"""ImageNet weights of the backbones: where they live, which file is which, is it intact.

``model.pretrained: imagenet`` means torchvision's *original* ImageNet weights of the
backbone (the ones the Roth et al. 2020 reference code loads through ``pretrainedmodels``:
``pretrainedmodels/models/torchvision_models.py:40`` of Cadene/pretrained-models.pytorch
names ``resnet50-19c8e357.pth``). Torchvision re-saved those old files in the zip
serialisation in 2020 (pytorch/vision#2068: same tensors, new sha256, new name) and calls
them ``IMAGENET1K_V1`` (``resnet50-0676ba61.pth``, top-1 76.13%); its later ``V2`` weights
(``resnet50-11ad3fa6.pth``, 80.86%, a different training recipe) are *not* accepted.

Nothing here downloads anything: :func:`find` looks in the torch hub cache
(``torch.hub.get_dir()/checkpoints``, i.e. ``$TORCH_HOME/hub/checkpoints``) for the file
names of :data:`CATALOGUE`; ``sweeper weights fetch NAME`` is the one command that
downloads (on a machine with internet). Every error is one line naming the backbone, the
places looked in and the command that fixes it.

Checks: :func:`verify` compares the sha256 of the file with the prefix torchvision encodes
in its name (``resnet50-0676ba61.pth`` -> ``0676ba61``) and the file's tensors with the
backbone's (key set and shapes, naming the first tensor that does not fit).
``DMLCORE_WEIGHTS_CHECKSUM=0`` skips the checksum (stand-in files in tests and benchmarks,
which have the right names and shapes but not the real bytes).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .pretrained import PretrainedError

IMAGENET = "imagenet"
"""The ``model.pretrained`` value naming the catalogue's ImageNet weights of the backbone."""

FETCH_HINT = "sweeper weights fetch {backbone}"


@dataclass(frozen=True)
class WeightFile:
    """One published weight file: its name (``<arch>-<sha256 prefix>.pth``) and URL."""

    filename: str
    url: str
    note: str = ""

    @property
    def sha256_prefix(self) -> str:
        stem = self.filename.rsplit(".", 1)[0]
        return stem.rsplit("-", 1)[-1]


_TV = "https://download.pytorch.org/models/"

CATALOGUE: dict[str, tuple[WeightFile, ...]] = {
    # First entry = what `sweeper weights fetch` downloads; later entries are accepted too.
    "resnet50": (
        WeightFile("resnet50-0676ba61.pth", _TV + "resnet50-0676ba61.pth",
                   "torchvision ResNet50_Weights.IMAGENET1K_V1 (top-1 76.13%)"),
        WeightFile("resnet50-19c8e357.pth", _TV + "resnet50-19c8e357.pth",
                   "the same V1 weights in the legacy file the reference code loads"),
    ),
    "resnet18": (
        WeightFile("resnet18-f37072fd.pth", _TV + "resnet18-f37072fd.pth",
                   "torchvision ResNet18_Weights.IMAGENET1K_V1 (top-1 69.76%)"),
        WeightFile("resnet18-5c106cde.pth", _TV + "resnet18-5c106cde.pth",
                   "the same V1 weights in the legacy file"),
    ),
    "googlenet": (
        WeightFile("googlenet-1378be20.pth", _TV + "googlenet-1378be20.pth",
                   "torchvision GoogLeNet_Weights.IMAGENET1K_V1 (top-1 69.78%)"),
    ),
}
"""Backbone name -> its ImageNet V1 files. BN-Inception is not here: torchvision has none
(the reference uses Cadene's ``bninception-52deb4733.pth``, a Caffe port with BGR 0-255
input, see docs/revisiting.md)."""


class WeightsMissing(PretrainedError):
    """No ImageNet weight file of a backbone where we looked. One line, with the fix."""


def checkpoint_dir() -> Path:
    """The torch hub cache's ``checkpoints`` folder (``$TORCH_HOME/hub/checkpoints``)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def search_dirs() -> list[Path]:
    return [checkpoint_dir()]


def is_imagenet(value: str | None) -> bool:
    return isinstance(value, str) and value.strip().lower() == IMAGENET


def files_of(backbone: str) -> tuple[WeightFile, ...]:
    if backbone not in CATALOGUE:
        known = ", ".join(sorted(CATALOGUE))
        raise PretrainedError(
            f"model.pretrained=imagenet: no ImageNet weights are known for backbone '{backbone}' "
            f"(known: {known}); give a local file path instead"
        )
    return CATALOGUE[backbone]


def find(backbone: str) -> Path | None:
    """The first catalogue file of ``backbone`` present in :func:`search_dirs`, else None."""
    for d in search_dirs():
        for wf in files_of(backbone):
            p = d / wf.filename
            if p.is_file():
                return p
    return None


def missing_message(backbone: str) -> str:
    names = ", ".join(wf.filename for wf in files_of(backbone))
    where = ", ".join(str(d) for d in search_dirs())
    return (
        f"model.pretrained=imagenet: no ImageNet weights for backbone '{backbone}': looked for {names} "
        f"in {where} (TORCH_HOME); fix: {FETCH_HINT.format(backbone=backbone)} "
        "(on a machine with internet; copy the file there on offline nodes)"
    )


def resolve(backbone: str, value: str | None) -> str | None:
    """``model.pretrained`` as a file path: ``imagenet`` looked up, a path kept, None kept."""
    if not is_imagenet(value):
        return value
    path = find(backbone)
    if path is None:
        raise WeightsMissing(missing_message(backbone))
    return str(path)


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file (memoised by path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def checksum_enabled() -> bool:
    return os.environ.get("DMLCORE_WEIGHTS_CHECKSUM", "1").strip().lower() not in ("0", "false", "no", "off")


def verify(backbone: str, path: str | Path, checksum: bool | None = None) -> None:
    """Raise :class:`PretrainedError` (one line naming the file) unless ``path`` fits ``backbone``.

    The checksum is compared when the file name is one of the catalogue's; the tensors are
    always checked against a freshly built backbone (key set and shapes).
    """
    from .. import registry

    p = Path(path)
    if checksum is None:
        checksum = checksum_enabled()
    known = {wf.filename: wf for wf in CATALOGUE.get(backbone, ())}
    if checksum and p.name in known:
        want = known[p.name].sha256_prefix
        got = sha256(p)
        if not got.startswith(want):
            raise PretrainedError(
                f"pretrained weights '{p}' are corrupt or not the published file: sha256 {got[:12]}... "
                f"does not start with {want}; delete it and run {FETCH_HINT.format(backbone=backbone)}"
            )
    registry.build("backbone", backbone, {}, pretrained=str(p))  # loads strictly: first mismatching tensor


def status(backbones: list[str] | tuple[str, ...] | None = None, checksum: bool | None = None) -> list[dict]:
    """One row per catalogue backbone: ``{backbone, path, state, detail}`` (``weights list``)."""
    rows = []
    for b in backbones or sorted(CATALOGUE):
        path = find(b)
        if path is None:
            rows.append({"backbone": b, "path": None, "state": "missing", "detail": missing_message(b)})
            continue
        try:
            verify(b, path, checksum)
        except PretrainedError as err:
            rows.append({"backbone": b, "path": str(path), "state": "bad", "detail": str(err)})
        else:
            rows.append({"backbone": b, "path": str(path), "state": "ok", "detail": ""})
    return rows


def write_stand_in(backbone: str, directory: str | Path | None = None, seed: int = 0) -> Path:
    """A stand-in for the real file (tests, benchmarks): a random state dict with the published
    file's name, keys (classifier included) and shapes, in ``directory`` (default: the hub cache).

    Its checksum is not the published one: use it with ``DMLCORE_WEIGHTS_CHECKSUM=0``.
    """
    import torch
    import torchvision

    wf = files_of(backbone)[0]
    torch.manual_seed(seed)
    if backbone == "googlenet":
        net = torchvision.models.GoogLeNet(aux_logits=True, init_weights=True, transform_input=False)
    else:
        net = getattr(torchvision.models, backbone)(weights=None)
    d = Path(directory) if directory is not None else checkpoint_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / wf.filename
    torch.save(net.state_dict(), path)
    return path
