"""The embedding network: backbone (feature map) + head (+ L2 normalisation).

``build_model(cfg.model)`` builds it through the ``backbone`` and ``head`` registries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import registry
from ..config import ModelConfig
from .heads import global_pool
from .pretrained import ModelError, PretrainedError

__all__ = ["EmbeddingModel", "ModelError", "PretrainedError", "build_model"]


class EmbeddingModel(nn.Module):
    """``forward(x) -> B x embed_dim`` (unit length when ``normalize``).

    ``freeze_bn``: every BatchNorm layer of the *backbone* stays in eval mode even after
    ``model.train()``: it normalises with its (pretrained) running statistics and never
    updates them. Its affine parameters gamma/beta still train, as in the reference's
    ``resnet50_frozen`` (``architectures/resnet50.py:21-24`` of
    Confusezius/Revisiting_Deep_Metric_Learning_PyTorch: ``module.eval()`` and a no-op
    ``module.train``, while ``model.parameters()`` with gamma/beta goes to the optimiser,
    ``main.py:105-106``). Head BatchNorm layers, if any, train normally.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        normalize: bool = True,
        freeze_bn: bool = False,
        feature_dim: int | None = None,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.normalize = bool(normalize)
        self.freeze_bn = bool(freeze_bn)
        self.feature_dim = feature_dim
        self.embed_dim = embed_dim
        self.train(self.training)

    def _backbone_bns(self) -> list[nn.Module]:
        return [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> "EmbeddingModel":
        super().train(mode)
        if self.freeze_bn:
            for m in self._backbone_bns():
                m.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        emb = self.head(self.backbone(x))
        if self.normalize:
            emb = F.normalize(emb, p=2, dim=1)
        return emb

    @torch.no_grad()
    def pooled_features(self, x: Tensor) -> Tensor:
        """Globally average-pooled backbone features ``B x feature_dim`` (e.g. for ooDML's FID)."""
        return global_pool(self.backbone(x), "avg")

    def head_loss(self) -> Tensor | None:
        """The head's extra loss term from its last forward (e.g. CRT consistency), else None."""
        fn = getattr(self.head, "extra_loss", None)
        return fn() if callable(fn) else None

    def head_embeddings(self) -> dict[str, tuple[Tensor, float]]:
        """The head's extra embeddings of its last training forward for the criterion,
        ``{name: (embedding, weight)}`` (L2-normalised like the output when ``normalize``)."""
        fn = getattr(self.head, "extra_embeddings", None)
        out = fn() if callable(fn) else {}
        if self.normalize:
            out = {k: (F.normalize(e, p=2, dim=1), w) for k, (e, w) in out.items()}
        return out

    def extra_embedding_dims(self) -> dict[str, int]:
        """``{name: width}`` of the extra embeddings the head hands to the criterion (:meth:`head_embeddings`)."""
        return dict(getattr(self.head, "supervised_extras", {}))


def _build(kind: str, name: str, params: dict, name_key: str, params_key: str, **context):
    registry.get(kind, name, key=name_key)  # unknown name: "did you mean" error naming name_key
    try:
        return registry.build(kind, name, params, key=params_key, **context)
    except PretrainedError as err:
        raise PretrainedError(f"model.pretrained: {err}") from None
    except ModelError as err:
        raise ModelError(f"{params_key}: {kind} '{name}': {err}") from None


def build_model(model_cfg: ModelConfig) -> EmbeddingModel:
    """Backbone + head from the registries, as ``model_cfg`` describes."""
    out = _build(
        "backbone",
        model_cfg.backbone,
        model_cfg.backbone_params,
        "model.backbone",
        "model.backbone_params",
        pretrained=model_cfg.pretrained,
    )
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ModelError(f"model.backbone: backbone '{model_cfg.backbone}' must return (module, feature_dim)")
    backbone, feature_dim = out
    head = _build(
        "head",
        model_cfg.head,
        model_cfg.head_params,
        "model.head",
        "model.head_params",
        in_dim=int(feature_dim),
        embed_dim=model_cfg.embed_dim,
    )
    return EmbeddingModel(
        backbone,
        head,
        normalize=model_cfg.normalize,
        freeze_bn=model_cfg.freeze_bn,
        feature_dim=int(feature_dim),
        embed_dim=model_cfg.embed_dim,
    )
