"""Save and load an embedding model *with its run config* (a teacher for
``loss.regularizers.relational_distillation``, an ooDML encoder).

:func:`load_embedding_model` also reads trainer checkpoints (``sweeper train --checkpoint``):
the config comes from the checkpoint's ``config`` entry if it has one, else from
``config=``, else from a ``config.yaml`` (or ``<checkpoint stem>.yaml``) next to the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..config import ConfigError, RunConfig, from_dict, load_config

MODEL_FORMAT = "dmlcore-embedding-model-1"

__all__ = ["MODEL_FORMAT", "load_embedding_model", "save_model_checkpoint"]


def save_model_checkpoint(model: nn.Module, cfg: RunConfig, path: str | Path) -> Path:
    """Write ``{"format", "config", "fingerprint", "model"}``; loadable with ``weights_only=True``."""
    from ..train import save_checkpoint

    state = {
        "format": MODEL_FORMAT,
        "config": cfg.to_dict(),
        "fingerprint": cfg.fingerprint(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    return save_checkpoint(state, path)


def _config_for(path: Path, state: Mapping[str, Any], config: Any) -> RunConfig:
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, Mapping):
        return from_dict(config, f"{path} (config)")
    if config is not None:
        return load_config(config)
    if isinstance(state.get("config"), Mapping):
        return from_dict(state["config"], f"{path} (embedded config)")
    base = path.parent if path.is_file() else path
    for cand in (base / "config.yaml", path.with_suffix(".yaml"), base / "params.yaml"):
        if cand.is_file():
            return load_config(cand)
    raise ConfigError(
        f"{path}: the checkpoint carries no config and no config.yaml lies beside it; "
        "save it with dmlcore.guided.save_model_checkpoint or pass its run config"
    )


def load_embedding_model(path: str | Path, config: Any = None, device: str | torch.device = "cpu") -> nn.Module:
    """The trained EmbeddingModel stored at ``path`` (a model or trainer checkpoint, or its run
    directory), in eval mode. Read with ``weights_only=True``."""
    from ..models.embedding import build_model
    from ..train import load_checkpoint

    p = Path(path).expanduser()
    state = load_checkpoint(p)
    cfg = _config_for(p, state, config)
    if "model" not in state:
        raise ConfigError(f"{p}: no 'model' weights in this checkpoint")
    fp = state.get("fingerprint")
    if fp is not None and config is None and isinstance(state.get("config"), Mapping) and fp != cfg.fingerprint():
        raise ConfigError(f"{p}: embedded config does not match the checkpoint's fingerprint")
    model = build_model(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ConfigError(f"{p}: weights do not fit the model its config describes ({first})") from None
    return model.to(device).eval()
