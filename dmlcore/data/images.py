"""Whole images of different sizes in one batch: :class:`ImageBatch`.

File images are kept whole, with their own aspect ratio (the reference crops
``RandomResizedCrop`` from the whole image, ``R: datasets/basic_dataset_scaffold.py:37-38``),
so the images of a batch differ in size. An :class:`ImageBatch` holds them top-left
aligned in one zero-padded uint8 tensor ``B x 3 x H x W`` (``H``, ``W`` the batch's
largest extents) with each image's own ``(h, w)`` in :attr:`sizes`. The batch
transforms (:mod:`dmlcore.data.transforms`) read only inside each image's extent, so
the padding never reaches a training crop or an evaluation crop.

``ImageBatch`` moves like a tensor (``.to(device, non_blocking=True)``,
``.pin_memory()``), so the trainer handles it exactly as a plain uint8 batch. A batch
whose images all have one size is a plain tensor (:func:`stack_images`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

MAX_ASPECT = 3.0
"""Stored images are at most 3:1 (or 1:3); a longer side is centre-cropped to 3x the
shorter one (a deliberate deviation: one panorama would otherwise widen the padded
canvas of its whole batch)."""


def stored_size(w: int, h: int, short_side: int) -> tuple[int, int]:
    """``(w, h)`` of an image of original size ``w x h`` once stored: shorter side resized to
    ``short_side``, aspect kept (PIL rounding, as :func:`dmlcore.data.base.decode_image`),
    the longer side then cut to at most :data:`MAX_ASPECT` x ``short_side``."""
    s = short_side / min(w, h)
    sw, sh = max(short_side, round(w * s)), max(short_side, round(h * s))
    cap = int(MAX_ASPECT * short_side)
    return min(sw, cap), min(sh, cap)


def cut_long_side(arr: np.ndarray, short_side: int) -> np.ndarray:
    """Centre-crop the longer side of ``H x W x 3`` ``arr`` to :data:`MAX_ASPECT` x ``short_side``."""
    cap = int(MAX_ASPECT * short_side)
    h, w = arr.shape[:2]
    if h > cap:
        top = (h - cap) // 2
        arr = arr[top : top + cap]
    if w > cap:
        left = (w - cap) // 2
        arr = arr[:, left : left + cap]
    return arr


@dataclass
class ImageBatch:
    """Images of different sizes: ``pixels`` (uint8 ``B x 3 x H x W``, zero-padded, images
    top-left aligned) and ``sizes`` (int64 ``B x 2``, each image's ``(h, w)``)."""

    pixels: torch.Tensor
    sizes: torch.Tensor

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def __getitem__(self, k: int) -> torch.Tensor:
        """Image ``k`` without its padding (``3 x h x w``)."""
        h, w = (int(v) for v in self.sizes[k])
        return self.pixels[k, :, :h, :w]

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pixels.dtype

    def to(self, *args: Any, **kwargs: Any) -> "ImageBatch":
        return ImageBatch(self.pixels.to(*args, **kwargs), self.sizes)

    def pin_memory(self) -> "ImageBatch":
        return ImageBatch(self.pixels.pin_memory(), self.sizes)


def batch_sizes(x: "torch.Tensor | ImageBatch") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pixels B x 3 x H x W, h, w)`` of a plain batch, a single image or an ImageBatch
    (``h``, ``w``: float tensors of each image's extent)."""
    if isinstance(x, ImageBatch):
        s = x.sizes.to(torch.float32)
        return x.pixels, s[:, 0], s[:, 1]
    xb = x.unsqueeze(0) if x.dim() == 3 else x
    b, _, h, w = xb.shape
    return xb, torch.full((b,), float(h)), torch.full((b,), float(w))


def stack_images(images: Sequence[torch.Tensor]) -> "torch.Tensor | ImageBatch":
    """One batch of uint8 ``3 x h x w`` images: a plain stacked tensor when they share one
    size, else an :class:`ImageBatch`."""
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) == 1:
        return torch.stack(list(images))
    hs = [int(im.shape[1]) for im in images]
    ws = [int(im.shape[2]) for im in images]
    out = torch.zeros((len(images), 3, max(hs), max(ws)), dtype=images[0].dtype)
    for k, im in enumerate(images):
        out[k, :, : hs[k], : ws[k]] = im
    return ImageBatch(out, torch.tensor(list(zip(hs, ws)), dtype=torch.int64))


def collate_images(items: Sequence[tuple[torch.Tensor, int]]) -> tuple["torch.Tensor | ImageBatch", torch.Tensor]:
    """DataLoader ``collate_fn`` for ``(uint8 image, label)`` items of any sizes."""
    return stack_images([im for im, _ in items]), torch.as_tensor([int(y) for _, y in items], dtype=torch.int64)
