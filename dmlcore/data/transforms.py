"""Augmentations (registry ``augmentation``) and the deterministic eval transform.

Every transform works on **batches of uint8 images on any device**: a plain
``B x 3 x H x W`` tensor (in-memory sources) or an :class:`~dmlcore.data.images.ImageBatch`
(whole file images of different sizes, padded, with each image's extent), and returns
float32 ``B x 3 x S x S`` normalised with the ImageNet mean/std. The trainer applies them
on the training device (the GPU when there is one) to whole batches: per-sample crop
boxes of any aspect ratio, flips and rotations are one ``affine_grid`` + ``grid_sample``
call (:mod:`dmlcore.data.crops`), colour ops a few tensor ops (:mod:`dmlcore.data.color`).
Calling a transform on a single image ``3 x H x W`` works too (a batch of one), which is
what the per-item dataset path uses.

Inputs are what the data layer hands over: in-memory images at their stored size, file
images **whole**, their shorter side resized to ``data.store_side`` (default 1.5 x the
eval resize side, 384 px at 224) and their aspect ratio kept, so a training crop can come
from anywhere in the image, as the reference's ``RandomResizedCrop`` on the whole PIL
image (``R: datasets/basic_dataset_scaffold.py:37-38``).

Randomness comes from ``generator`` when given (the trainer passes one seeded per
epoch), else from torch's global generator.

The reference's levels (``R: datasets/basic_dataset_scaffold.py:28-47``, ``R: parameters.py:12``),
all ending in ToTensor + ImageNet normalisation:

=========  ===========================================================  ===========================
level      train                                                         test
=========  ===========================================================  ===========================
``base``   RandomResizedCrop(224) [scale 0.08-1, ratio 3/4-4/3], flip    Resize(256), CenterCrop(224)
``big``    RandomResizedCrop(256), flip                                  Resize(256), CenterCrop(256)
``adv``    RandomResizedCrop(224), RandomGrayscale(0.2),                 as base
           ColorJitter(0.2, 0.2, 0.2, 0.2), flip
``red``    Resize(256), RandomCrop(224), flip (no scale jitter)          as base
=========  ===========================================================  ===========================

``224``/``256`` scale with ``data.image_size`` (``256 = round(image_size * 256 / 224)``).
``standard``, ``strong`` and ``none`` are the platform's own levels, not the reference's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmlcore.registry import register

from .color import color_jitter, random_grayscale
from .crops import box_grid, center_crop_offsets, random_resized_boxes, resize_random_crop_boxes, resized_long_side
from .images import ImageBatch, batch_sizes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.299, 0.587, 0.114)

AUGMENTATION_CONTEXT = ("image_size", "flip_ok")


def eval_short_side(image_size: int) -> int:
    return int(round(image_size * 256 / 224))


class BatchTransform(nn.Module):
    """Base: uint8 ``[B x] 3 x H x W`` (or an ImageBatch) -> normalised float ``[B x] 3 x S x S``."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: "Tensor | ImageBatch", generator: torch.Generator | None = None) -> Tensor:
        single = isinstance(x, Tensor) and x.dim() == 3
        xb, h, w = batch_sizes(x)
        if xb.dtype == torch.uint8:
            xb = xb.float().div_(255.0)
        out = self.apply_batch(xb, h, w, generator)
        out = (out - self.mean.to(out.device)) / self.std.to(out.device)
        return out[0] if single else out

    def apply_batch(self, x: Tensor, h: Tensor, w: Tensor, generator: torch.Generator | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class EvalTransform(BatchTransform):
    """Deterministic ``Resize(resize) + CenterCrop(crop)`` (``R: datasets/basic_dataset_scaffold.py:45``):
    the shorter side of each image becomes ``resize`` (default ``round(image_size * 256 / 224)``,
    the longer ``int(resize * long / short)`` as torchvision's Resize) and the centre
    ``crop`` square (default ``image_size``) is kept. A batch that is already ``crop``
    square passes as is (in-memory images stored at ``image_size``)."""

    def __init__(self, image_size: int, crop: int | None = None, resize: int | None = None) -> None:
        super().__init__(image_size)
        self.crop = int(crop or image_size)
        self.resize = int(resize or eval_short_side(image_size))

    def apply_batch(self, x: Tensor, h: Tensor, w: Tensor, generator: torch.Generator | None = None) -> Tensor:
        s = self.crop
        hc, wc = x.shape[-2:]
        if hc == wc == s and bool((h == s).all() and (w == s).all()):
            return x
        short = torch.minimum(h, w)
        if bool((short != short[0]).any()):  # shorter sides differ (never from the data layer): one by one
            return torch.cat([self.apply_batch(x[k : k + 1, :, : int(h[k]), : int(w[k])], h[k : k + 1], w[k : k + 1])
                              for k in range(x.shape[0])])
        k = self.resize / float(short[0])
        if k != 1.0:
            size = (max(1, math.floor(hc * k + 1e-6)), max(1, math.floor(wc * k + 1e-6)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        rh = torch.where(h <= w, torch.full_like(h, self.resize), resized_long_side(self.resize, h, short))
        rw = torch.where(w < h, torch.full_like(w, self.resize), resized_long_side(self.resize, w, short))
        if bool((rh < s).any() or (rw < s).any()):  # smaller than the crop: upsample first (never at 256/224)
            return center_crop(F.interpolate(x, size=(max(s, x.shape[-2]), max(s, x.shape[-1])), mode="bilinear",
                                             align_corners=False), s)
        top, left = center_crop_offsets(rh, rw, s)
        dev = x.device
        ar = torch.arange(s, device=dev)
        rows = (top.to(dev).view(-1, 1) + ar).clamp(max=x.shape[-2] - 1)
        cols = (left.to(dev).view(-1, 1) + ar).clamp(max=x.shape[-1] - 1)
        bidx = torch.arange(x.shape[0], device=dev).view(-1, 1, 1)
        out = x[bidx, :, rows[:, :, None], cols[:, None, :]]  # B x s x s x 3
        return out.permute(0, 3, 1, 2).contiguous()


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
    """Per-sample crop box, optional horizontal flip and rotation, in one resampling pass of
    each image's own pixels, then colour ops.

    ``crop="resized"``: torchvision's RandomResizedCrop(``scale`` of the area, aspect
    ``ratio`` log-uniform, 10 tries, then its centre-crop fallback; :mod:`dmlcore.data.crops`).
    ``crop="resize_random"``: Resize(``resize``) + RandomCrop(output size), no scale jitter.
    ``grayscale``: RandomGrayscale probability; ``color_jitter``: torchvision ColorJitter
    ``(brightness, contrast, saturation, hue)`` in a random order per sample;
    ``jitter``: the platform's older brightness/contrast/saturation jitter (``strong``).
    ``out_size`` (default ``image_size``) is the output side, ``eval_crop`` the centre crop
    of the matching test transform (``big``: both 256).
    """

    def __init__(
        self,
        image_size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        rotation: float = 0.0,
        jitter: float = 0.0,
        crop: str = "resized",
        grayscale: float = 0.0,
        color_jitter: tuple[float, float, float, float] | None = None,
        out_size: int | None = None,
        eval_crop: int | None = None,
    ) -> None:
        super().__init__(image_size)
        if crop not in ("resized", "resize_random"):
            raise ValueError(f"crop must be 'resized' or 'resize_random', got {crop!r}")
        self.scale, self.ratio, self.flip = tuple(scale), tuple(ratio), bool(flip)
        self.rotation, self.jitter = float(rotation), float(jitter)
        self.crop, self.grayscale = crop, float(grayscale)
        self.color_jitter = tuple(color_jitter) if color_jitter else None
        self.out_size = int(out_size or image_size)
        self.eval_crop = int(eval_crop or image_size)

    def boxes(self, h: Tensor, w: Tensor, g: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Crop boxes ``(top, left, height, width)`` in each image's pixels."""
        if self.crop == "resize_random":
            return resize_random_crop_boxes(h, w, eval_short_side(self.image_size), self.out_size, g)
        return random_resized_boxes(h, w, self.scale, self.ratio, g)

    def apply_batch(self, x: Tensor, h: Tensor, w: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b, g, dev = x.shape[0], generator, x.device
        boxes = self.boxes(h, w, g)
        flip = torch.rand(b, generator=g) < 0.5 if self.flip else None
        ang = _uniform(b, -self.rotation, self.rotation, g) * (math.pi / 180) if self.rotation else None
        if self.jitter:
            j = self.jitter
            bright, contrast, sat = (_uniform(b, 1 - j, 1 + j, g).view(b, 1, 1, 1).to(dev) for _ in range(3))
        s = self.out_size
        hc, wc = x.shape[-2:]
        if float(torch.minimum(h, w).min()) > 2 * s:  # big downscale: pre-shrink so bilinear sampling does not alias
            f = 2 * s / float(torch.minimum(h, w).min())
            x = F.interpolate(x, scale_factor=f, mode="bilinear", antialias=True, align_corners=False)
            fy, fx = x.shape[-2] / hc, x.shape[-1] / wc
            boxes = (boxes[0] * fy, boxes[1] * fx, boxes[2] * fy, boxes[3] * fx)
            h, w, (hc, wc) = h * fy, w * fx, x.shape[-2:]
        grid = box_grid(boxes, h, w, (hc, wc), (s, s), flip, ang)
        out = F.grid_sample(x, grid.to(dev, x.dtype), mode="bilinear", padding_mode="border", align_corners=False)
        if self.grayscale:
            out = random_grayscale(out, self.grayscale, g)
        if self.color_jitter:
            out = color_jitter(out, *self.color_jitter, g)
        if self.jitter:
            gray_w = torch.tensor(_GRAY, device=dev, dtype=out.dtype).view(1, 3, 1, 1)
            out = out * bright
            mean = (out * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
            out = (out - mean) * contrast + mean
            gray = (out * gray_w).sum(1, keepdim=True)
            out = ((out - gray) * sat + gray).clamp_(0, 1)
        return out


def eval_transform(image_size: int, crop: int | None = None) -> EvalTransform:
    """The deterministic eval transform (see :class:`EvalTransform`)."""
    return EvalTransform(image_size, crop)


REFERENCE_SCALE = (0.08, 1.0)
REFERENCE_RATIO = (3 / 4, 4 / 3)
"""torchvision's RandomResizedCrop defaults, used by every reference level (``R: datasets/basic_dataset_scaffold.py:38``)."""


@register("augmentation", "base", context=AUGMENTATION_CONTEXT)
def base(image_size: int, flip_ok: bool = True) -> RandomAugment:
    """Reference 'base' (every published run): RandomResizedCrop(image_size, scale 0.08-1, ratio 3/4-4/3) + flip p 0.5 (R: datasets/basic_dataset_scaffold.py:37-38)."""
    return RandomAugment(image_size, scale=REFERENCE_SCALE, ratio=REFERENCE_RATIO, flip=flip_ok)


@register("augmentation", "big", context=AUGMENTATION_CONTEXT)
def big(image_size: int, flip_ok: bool = True) -> RandomAugment:
    """Reference 'big': RandomResizedCrop(256) + flip; test Resize(256) + CenterCrop(256) (R: datasets/basic_dataset_scaffold.py:31-32,45); 256 = round(image_size*256/224)."""
    side = eval_short_side(image_size)
    return RandomAugment(image_size, scale=REFERENCE_SCALE, ratio=REFERENCE_RATIO, flip=flip_ok, out_size=side, eval_crop=side)


@register("augmentation", "adv", context=AUGMENTATION_CONTEXT)
def adv(image_size: int, flip_ok: bool = True) -> RandomAugment:
    """Reference 'adv': RandomResizedCrop(image_size) + RandomGrayscale(p 0.2) + ColorJitter(0.2, 0.2, 0.2, 0.2) + flip (R: datasets/basic_dataset_scaffold.py:39-41)."""
    return RandomAugment(image_size, scale=REFERENCE_SCALE, ratio=REFERENCE_RATIO, flip=flip_ok,
                         grayscale=0.2, color_jitter=(0.2, 0.2, 0.2, 0.2))


@register("augmentation", "red", context=AUGMENTATION_CONTEXT)
def red(image_size: int, flip_ok: bool = True) -> RandomAugment:
    """Reference 'red': Resize(256) + RandomCrop(image_size) + flip, no scale jitter (R: datasets/basic_dataset_scaffold.py:42-43)."""
    return RandomAugment(image_size, crop="resize_random", flip=flip_ok)


@register("augmentation", "none", context=AUGMENTATION_CONTEXT)
def none(image_size: int, flip_ok: bool = True) -> EvalTransform:
    """Not a reference level: no augmentation, the eval transform (resize + centre crop)."""
    return EvalTransform(image_size)


@register("augmentation", "standard", context=AUGMENTATION_CONTEXT)
def standard(image_size: int, flip_ok: bool = True, scale_min: float = 0.2) -> RandomAugment:
    """Not a reference level (its default scale_min 0.2 is the platform's): RandomResizedCrop(image_size, scale=(scale_min, 1)) + flip where flip_ok; scale_min 0.08 equals 'base'."""
    return RandomAugment(image_size, scale=(scale_min, 1.0), flip=flip_ok)


@register("augmentation", "strong", context=AUGMENTATION_CONTEXT)
def strong(image_size: int, flip_ok: bool = True, scale_min: float = 0.2) -> RandomAugment:
    """Not a reference level: standard + rotation (+-15 deg) + brightness/contrast/saturation jitter (0.4), no hue or grayscale."""
    return RandomAugment(image_size, scale=(scale_min, 1.0), flip=flip_ok, rotation=15.0, jitter=0.4)
