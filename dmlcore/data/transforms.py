"""Train-time augmentations (registry ``augmentation``) and the deterministic eval transform.

Every transform maps a uint8 tensor ``3 x H x W`` to a float32 tensor
``3 x image_size x image_size`` normalised with the ImageNet mean/std. Inputs are
what the data layer hands over: in-memory images at their stored size, file images
with their shorter side already resized to ``round(image_size * 256 / 224)``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.transforms import v2

from dmlcore.registry import register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AUGMENTATION_CONTEXT = ("image_size", "flip_ok")


class ResizeForEval(nn.Module):
    """The DML eval protocol's resize: leave an ``image_size`` square alone (in-memory
    data already at its size), otherwise resize the shorter side to
    ``round(image_size * 256 / 224)`` (a no-op for file images, which arrive at that size)."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.short_side = int(round(image_size * 256 / 224))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        if (h == w == self.image_size) or min(h, w) == self.short_side:
            return img
        return v2.functional.resize(img, self.short_side, antialias=True)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, short_side={self.short_side}"


def _finish() -> list[nn.Module]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def eval_transform(image_size: int) -> v2.Compose:
    """Deterministic: resize (see :class:`ResizeForEval`), center crop, normalise."""
    return v2.Compose([ResizeForEval(image_size), v2.CenterCrop(image_size), *_finish()])


def _standard_ops(image_size: int, flip_ok: bool) -> list[nn.Module]:
    ops: list[nn.Module] = [v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True)]
    if flip_ok:
        ops.append(v2.RandomHorizontalFlip())
    return ops


@register("augmentation", "none", context=AUGMENTATION_CONTEXT)
def none(image_size: int, flip_ok: bool = True) -> v2.Compose:
    """No augmentation: the eval transform (resize + center crop)."""
    return eval_transform(image_size)


@register("augmentation", "standard", context=AUGMENTATION_CONTEXT)
def standard(image_size: int, flip_ok: bool = True) -> v2.Compose:
    """RandomResizedCrop(image_size, scale=(0.2, 1)) + horizontal flip where flip_ok (Roth et al. 2020)."""
    return v2.Compose([*_standard_ops(image_size, flip_ok), *_finish()])


@register("augmentation", "strong", context=AUGMENTATION_CONTEXT)
def strong(image_size: int, flip_ok: bool = True) -> v2.Compose:
    """standard + rotation (+-15 deg) + ColorJitter(brightness, contrast, saturation 0.4)."""
    return v2.Compose(
        [
            *_standard_ops(image_size, flip_ok),
            v2.RandomRotation(15),
            v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
            *_finish(),
        ]
    )
