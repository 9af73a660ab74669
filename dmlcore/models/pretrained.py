"""Loading backbone weights from a local file (nothing is ever downloaded).

:func:`load_pretrained` accepts

* a torchvision-style state dict (``torch.save(net.state_dict(), path)``),
* a checkpoint dict holding one under ``"model"`` or ``"state_dict"`` (e.g. a
  checkpoint written by :class:`dmlcore.train.Trainer`),
* keys prefixed by ``module.`` (DataParallel) or ``backbone.`` (a whole
  :class:`~dmlcore.models.embedding.EmbeddingModel`: only its backbone is taken).

Classifier keys (``fc.*`` and friends, given per backbone) are ignored. Anything
else that does not fit is a one-line :class:`PretrainedError` naming the path and
the first offending keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn


class ModelError(ValueError):
    """A model that cannot be built. ``str(err)`` is one line meant for the user."""


class PretrainedError(ModelError):
    """Pretrained weights that cannot be read or do not fit the backbone."""


def _one_line(text: Any) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _first(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensor state dict stored in ``path`` (unwrapped, prefixes stripped)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PretrainedError(f"pretrained weights '{path}' not found (nothing is downloaded; give a local file)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files, non-tensor payloads ...
        raise PretrainedError(
            f"cannot read pretrained weights '{path}': {type(err).__name__}: {_one_line(err)}"
        ) from None
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise PretrainedError(f"pretrained weights '{path}' hold no state dict (got {type(obj).__name__})")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise PretrainedError(f"pretrained weights '{path}' are not a state dict of tensors: {_first(bad)}")
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def load_pretrained(
    module: nn.Module,
    path: str | Path,
    ignore: Iterable[str] = ("fc.",),
    name: str = "backbone",
) -> nn.Module:
    """Load ``path`` into ``module`` (strict apart from the ``ignore`` key prefixes).

    Missing ``num_batches_tracked`` buffers are tolerated (older state dicts lack them).
    """
    state = read_state_dict(path)
    ignore = tuple(ignore)
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} (file {list(state[k].shape)} vs model {list(own[k].shape)})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    first = next(
        (f"'{k}' (missing from the file)" if k not in state else f"'{k}' (file {list(state[k].shape)} vs model {list(own[k].shape)})"
         for k in own
         if (k not in state and not k.endswith("num_batches_tracked")) or (k in state and state[k].shape != own[k].shape)),
        f"'{unexpected[0]}' (not in the model)" if unexpected else None,
    )
    if first:
        problems.append(f"first mismatching tensor {first}")
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_first(shapes, 2)}")
    if problems:
        raise PretrainedError(f"pretrained weights '{path}' do not fit the {name} backbone: " + "; ".join(problems))
    module.load_state_dict(state, strict=False)
    return module
