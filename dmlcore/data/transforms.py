"""Augmentations (registry ``augmentation``) and the deterministic eval transform.

Every transform works on **batches of uint8 images on any device** (``B x 3 x H x W``)
and returns float32 ``B x 3 x image_size x image_size`` normalised with the ImageNet
mean/std. The trainer applies them on the training device (the GPU when there is one)
to whole batches: per-sample random crops, flips and rotations are one
``affine_grid`` + ``grid_sample`` call, colour jitter a few tensor ops. Calling a
transform on a single image ``3 x H x W`` works too (a batch of one), which is what
the per-item dataset path uses.

Inputs are what the data layer hands over: in-memory images at their stored size, file
images resized so that their shorter side is ``round(image_size * 256 / 224)`` and
centre-cropped to a square (the batch path needs one size per batch; the train crop is
therefore taken from the central square of a file image).

Randomness comes from ``generator`` when given (the trainer passes one seeded per
epoch), else from torch's global generator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmlcore.registry import register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.299, 0.587, 0.114)

AUGMENTATION_CONTEXT = ("image_size", "flip_ok")


def eval_short_side(image_size: int) -> int:
    return int(round(image_size * 256 / 224))


class BatchTransform(nn.Module):
    """Base: uint8 ``[B x] 3 x H x W`` -> normalised float ``[B x] 3 x S x S``."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        single = x.dim() == 3
        xb = x.unsqueeze(0) if single else x
        if xb.dtype == torch.uint8:
            xb = xb.float().div_(255.0)
        out = self.apply_batch(xb, generator)
        out = (out - self.mean.to(out.device)) / self.std.to(out.device)
        return out[0] if single else out

    def apply_batch(self, x: Tensor, generator: torch.Generator | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class EvalTransform(BatchTransform):
    """Deterministic: an ``image_size`` square passes as is; otherwise the shorter side is
    resized to ``round(image_size * 256 / 224)`` and the centre ``image_size`` square kept
    (resize 256 / centre crop 224 at ``image_size`` 224)."""

    def apply_batch(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        s = self.image_size
        h, w = x.shape[-2:]
        if h == w == s:
            return x
        short = eval_short_side(s)
        if min(h, w) != short:
            scale = short / min(h, w)
            size = (max(short, round(h * scale)), max(short, round(w * scale)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return center_crop(x, s)


def center_crop(x: Tensor, s: int) -> Tensor:
    h, w = x.shape[-2:]
    if h < s or w < s:
        x = F.interpolate(x, size=(max(h, s), max(w, s)), mode="bilinear", align_corners=False)
        h, w = x.shape[-2:]
    top, left = (h - s) // 2, (w - s) // 2
    return x[..., top : top + s, left : left + s]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


class RandomAugment(BatchTransform):
    """Per-sample RandomResizedCrop (``scale`` of the area, aspect ``ratio``), optional
    horizontal flip and rotation, and colour jitter, in one resampling pass."""

    def __init__(
        self,
        image_size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        rotation: float = 0.0,
        jitter: float = 0.0,
    ) -> None:
        super().__init__(image_size)
        self.scale, self.ratio, self.flip = tuple(scale), tuple(ratio), bool(flip)
        self.rotation, self.jitter = float(rotation), float(jitter)

    def apply_batch(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b, g, dev = x.shape[0], generator, x.device
        # crop box as fractions of the (square or not) input: area fraction a, aspect r
        area = _uniform(b, *self.scale, g)
        log_r = _uniform(b, math.log(self.ratio[0]), math.log(self.ratio[1]), g)
        r = torch.exp(log_r)
        cw = torch.sqrt(area * r).clamp(max=1.0)  # width fraction
        ch = torch.sqrt(area / r).clamp(max=1.0)  # height fraction
        cx = (torch.rand(b, generator=g) * 2 - 1) * (1 - cw)  # centre in [-1, 1] coords
        cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - ch)
        sx = cw.clone()
        if self.flip:
            sx = torch.where(torch.rand(b, generator=g) < 0.5, -sx, sx)
        ang = _uniform(b, -self.rotation, self.rotation, g) * (math.pi / 180) if self.rotation else torch.zeros(b)
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.stack(
            [torch.stack([sx * cos, -ch * sin, cx], 1), torch.stack([sx * sin, ch * cos, cy], 1)], 1
        )
        if self.jitter:
            j = self.jitter
            bright, contrast, sat = (_uniform(b, 1 - j, 1 + j, g).view(b, 1, 1, 1).to(dev) for _ in range(3))
        s = self.image_size
        grid = F.affine_grid(theta.to(dev, x.dtype), [b, 3, s, s], align_corners=False)
        h, w = x.shape[-2:]
        if min(h, w) > 2 * s:  # big downscale: pre-shrink so bilinear sampling does not alias
            x = F.interpolate(x, scale_factor=2 * s / min(h, w), mode="bilinear", antialias=True, align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if self.jitter:
            gray_w = torch.tensor(_GRAY, device=dev, dtype=out.dtype).view(1, 3, 1, 1)
            out = out * bright
            mean = (out * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
            out = (out - mean) * contrast + mean
            gray = (out * gray_w).sum(1, keepdim=True)
            out = ((out - gray) * sat + gray).clamp_(0, 1)
        return out


def eval_transform(image_size: int) -> EvalTransform:
    """The deterministic eval transform (see :class:`EvalTransform`)."""
    return EvalTransform(image_size)


@register("augmentation", "none", context=AUGMENTATION_CONTEXT)
def none(image_size: int, flip_ok: bool = True) -> EvalTransform:
    """No augmentation: the eval transform (resize + centre crop)."""
    return EvalTransform(image_size)


@register("augmentation", "standard", context=AUGMENTATION_CONTEXT)
def standard(image_size: int, flip_ok: bool = True, scale_min: float = 0.2) -> RandomAugment:
    """RandomResizedCrop(image_size, scale=(scale_min, 1)) + horizontal flip where flip_ok (Roth et al. 2020)."""
    return RandomAugment(image_size, scale=(scale_min, 1.0), flip=flip_ok)


@register("augmentation", "strong", context=AUGMENTATION_CONTEXT)
def strong(image_size: int, flip_ok: bool = True, scale_min: float = 0.2) -> RandomAugment:
    """standard + rotation (+-15 deg) + brightness/contrast/saturation jitter (0.4)."""
    return RandomAugment(image_size, scale=(scale_min, 1.0), flip=flip_ok, rotation=15.0, jitter=0.4)
