"""Per-sample colour augmentations on float batches in [0, 1] (``B x 3 x H x W``).

They follow torchvision's tensor implementations (``transforms/_functional_tensor.py``),
which the reference's ``adv`` level uses through ``RandomGrayscale(p=0.2)`` and
``ColorJitter(0.2, 0.2, 0.2, 0.2)`` (``R: datasets/basic_dataset_scaffold.py:40-41``):

* grayscale: ``0.299 R + 0.587 G + 0.114 B`` copied to the three channels, with
  probability ``p`` per sample;
* colour jitter: brightness, contrast, saturation factors ~ U(1 - j, 1 + j) and a hue
  shift ~ U(-j_h, j_h), applied **in a random order per sample** (``fn_idx =
  torch.randperm(4)`` in ``ColorJitter.get_params``), each op clamping to [0, 1];
  brightness blends with black, contrast with the mean of the grayscale image,
  saturation with the grayscale image, hue rotates H in HSV.

Random numbers are drawn on the CPU from ``generator`` and moved to the batch's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def grayscale(x: Tensor) -> Tensor:
    """``B x 1 x H x W`` luma (ITU-R 601-2, as PIL's ``convert('L')`` and torchvision)."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def random_grayscale(x: Tensor, p: float, g: torch.Generator | None) -> Tensor:
    pick = (torch.rand(x.shape[0], generator=g) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(pick, grayscale(x).expand_as(x), x)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def _rgb2hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def _hsv2rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int32) % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    mask = i.unsqueeze(1) == torch.arange(6, device=i.device).view(1, -1, 1, 1)
    a1 = torch.stack((v, q, p, p, t, v), 1)
    a2 = torch.stack((t, v, v, q, p, p), 1)
    a3 = torch.stack((p, p, t, v, v, q), 1)
    a4 = torch.stack((a1, a2, a3), 1)  # B x 3 x 6 x H x W
    return torch.einsum("bjhw,bijhw->bihw", mask.to(x.dtype), a4)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of each sample by ``shift`` (fractions of a turn, ``B``)."""
    hsv = _rgb2hsv(x)
    h = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return _hsv2rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), 1))


def color_jitter(
    x: Tensor, brightness: float, contrast: float, saturation: float, hue: float, g: torch.Generator | None
) -> Tensor:
    """torchvision ``ColorJitter(brightness, contrast, saturation, hue)`` per sample."""
    b, dev = x.shape[0], x.device
    order = torch.argsort(torch.rand(b, 4, generator=g), dim=1)  # a uniform random permutation per sample
    fac = [1 + (torch.rand(b, generator=g) * 2 - 1) * j for j in (brightness, contrast, saturation)]
    shift = (torch.rand(b, generator=g) * 2 - 1) * hue
    order = order.to(dev)
    fac = [f.to(dev).view(b, 1, 1, 1) for f in fac]
    shift = shift.to(dev)
    one = torch.ones_like(fac[0])
    for k in range(4):
        op = order[:, k].view(b, 1, 1, 1)
        if brightness:
            x = _blend(x, torch.zeros_like(x), torch.where(op == 0, fac[0], one))
        if contrast:
            mean = grayscale(x).mean((1, 2, 3), keepdim=True)
            x = _blend(x, mean, torch.where(op == 1, fac[1], one))
        if saturation:
            x = _blend(x, grayscale(x), torch.where(op == 2, fac[2], one))
        if hue:
            sel = torch.nonzero(order[:, k] == 3).flatten()
            if sel.numel():
                x = x.clone()
                x[sel] = adjust_hue(x[sel], shift[sel])
    return x
