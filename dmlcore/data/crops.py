"""Per-sample crop boxes for a batch of whole images, and the affine grid that cuts them.

A box is ``(top, left, height, width)`` in pixels of one image (float tensors, one
entry per sample). The box samplers reproduce torchvision's parameter draws, which the
reference uses on the whole PIL image (``R: datasets/basic_dataset_scaffold.py:37-45``):

* :func:`random_resized_boxes` is ``RandomResizedCrop.get_params`` (torchvision
  ``transforms.py``): up to 10 tries of (area ~ U(scale) x image area, log-aspect ~
  U(log ratio)), ``w = round(sqrt(area * aspect))``, ``h = round(sqrt(area / aspect))``;
  the first try that fits (``0 < w <= W``, ``0 < h <= H``) is placed uniformly at an
  integer position; if none fits, the centre crop of the largest box with an aspect inside
  ``ratio``. A box that does not fit is drawn again, never clamped.
* :func:`resize_random_crop_boxes` is ``Resize(short) + RandomCrop(size)`` (the ``red``
  level) expressed in the stored image's pixels.
* :func:`center_crop_offsets` is ``Resize(short) + CenterCrop(size)`` (the test transform).

:func:`box_grid` turns boxes into one ``affine_grid`` for ``grid_sample``: each output
pixel centre maps into its own image's box, clamped to the image's extent (so a padded
batch never samples its padding); a horizontal flip and a rotation are folded in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

TRIES = 10
"""torchvision's RandomResizedCrop tries (``transforms.py``, ``for _ in range(10)``)."""


def resized_long_side(short_target: int, long: Tensor, short: Tensor) -> Tensor:
    """torchvision ``Resize(int)``: the longer side becomes ``int(short_target * long / short)``."""
    return torch.floor(short_target * long / short + 1e-6)


def random_resized_boxes(
    h: Tensor, w: Tensor, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Boxes drawn as torchvision's ``RandomResizedCrop.get_params`` on images of ``h x w``."""
    b = h.shape[0]
    u = torch.rand(b, TRIES, 4, generator=g, dtype=torch.float64)
    return boxes_from_uniforms(h, w, scale, ratio, u)


def boxes_from_uniforms(
    h: Tensor, w: Tensor, scale: tuple[float, float], ratio: tuple[float, float], u: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`random_resized_boxes` for given uniforms ``u`` (``B x TRIES x 4``: area, log-aspect,
    row, column), so that a test can replay the same draws through the algorithm written out."""
    hh = h.to(torch.float64).view(-1, 1)
    ww = w.to(torch.float64).view(-1, 1)
    area = hh * ww
    target = area * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + u[..., 1] * (hi - lo))
    bw = torch.round(torch.sqrt(target * aspect))  # round half to even, as Python's round()
    bh = torch.round(torch.sqrt(target / aspect))
    ok = (bw > 0) & (bw <= ww) & (bh > 0) & (bh <= hh)
    top = torch.floor(u[..., 2] * (hh - bh + 1))  # torch.randint(0, H - h + 1)
    left = torch.floor(u[..., 3] * (ww - bw + 1))
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)  # the first try that fits
    found = ok.any(dim=1)
    pick = lambda t: t.gather(1, first).squeeze(1)  # noqa: E731
    bh_t, bw_t, top_t, left_t = pick(bh), pick(bw), pick(top), pick(left)
    # fallback: torchvision's centre crop of the largest box with an aspect inside ``ratio``
    hh1, ww1 = hh.squeeze(1), ww.squeeze(1)
    in_ratio = ww1 / hh1
    fb_w = torch.where(in_ratio > max(ratio), torch.round(hh1 * max(ratio)), ww1)
    fb_h = torch.where(in_ratio < min(ratio), torch.round(ww1 / min(ratio)), hh1)
    fb_top = torch.floor((hh1 - fb_h) / 2)
    fb_left = torch.floor((ww1 - fb_w) / 2)
    out = (
        torch.where(found, top_t, fb_top),
        torch.where(found, left_t, fb_left),
        torch.where(found, bh_t, fb_h),
        torch.where(found, bw_t, fb_w),
    )
    return tuple(t.to(torch.float32) for t in out)  # type: ignore[return-value]


def resize_random_crop_boxes(
    h: Tensor, w: Tensor, short_target: int, size: int, g: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``Resize(short_target) + RandomCrop(size)`` as a box in the image's own pixels."""
    h64, w64 = h.to(torch.float64), w.to(torch.float64)
    short = torch.minimum(h64, w64)
    rh = torch.where(h64 <= w64, torch.full_like(h64, short_target), resized_long_side(short_target, h64, short))
    rw = torch.where(w64 < h64, torch.full_like(w64, short_target), resized_long_side(short_target, w64, short))
    u = torch.rand(h.shape[0], 2, generator=g, dtype=torch.float64)
    i = torch.floor(u[:, 0] * (rh - size + 1).clamp(min=1))
    j = torch.floor(u[:, 1] * (rw - size + 1).clamp(min=1))
    kh, kw = h64 / rh, w64 / rw  # resized pixel -> stored pixel
    out = (i * kh, j * kw, size * kh, size * kw)
    return tuple(t.to(torch.float32) for t in out)  # type: ignore[return-value]


def center_crop_offsets(rh: Tensor, rw: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """torchvision ``CenterCrop``: ``top = int(round((H - size) / 2))`` (likewise ``left``)."""
    return torch.round((rh - size) / 2).to(torch.int64), torch.round((rw - size) / 2).to(torch.int64)


def box_grid(
    boxes: tuple[Tensor, Tensor, Tensor, Tensor],
    h: Tensor,
    w: Tensor,
    canvas: tuple[int, int],
    out: tuple[int, int],
    flip: Tensor | None = None,
    angle: Tensor | None = None,
) -> Tensor:
    """``B x oh x ow x 2`` sampling grid (``align_corners=False``) that cuts ``boxes`` out of a
    ``canvas``-sized batch and resizes them to ``out``; sampling stays inside each image."""
    top, left, bh, bw = boxes
    hc, wc = canvas
    cx, cy = left + bw / 2, top + bh / 2  # box centre, in pixel-edge coordinates
    if angle is None:
        cos, sin = torch.ones_like(bw), torch.zeros_like(bw)
    else:
        cos, sin = torch.cos(angle), torch.sin(angle)
    sx = torch.where(flip, -bw, bw) if flip is not None else bw
    theta = torch.stack(
        [
            torch.stack([cos * sx / wc, -sin * bh / wc, 2 * cx / wc - 1], 1),
            torch.stack([sin * sx / hc, cos * bh / hc, 2 * cy / hc - 1], 1),
        ],
        1,
    )
    b = top.shape[0]
    grid = F.affine_grid(theta, [b, 1, out[0], out[1]], align_corners=False)
    # clamp to the centres of each image's first and last pixel: its own 'border' padding
    lo_x, hi_x = 1 / wc - 1, (2 * w - 1) / wc - 1
    lo_y, hi_y = 1 / hc - 1, (2 * h - 1) / hc - 1
    gx = torch.maximum(torch.minimum(grid[..., 0], hi_x.view(b, 1, 1)), torch.full_like(grid[..., 0], lo_x))
    gy = torch.maximum(torch.minimum(grid[..., 1], hi_y.view(b, 1, 1)), torch.full_like(grid[..., 1], lo_y))
    return torch.stack([gx, gy], -1)
