"""Batch transforms on the device: per-sample randomness, exact geometry, determinism."""

import torch

from dmlcore import registry
from dmlcore.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomAugment, eval_transform


def _denorm(x):
    return x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


def _ramp(b=64, s=16):
    """A horizontal ramp image (asymmetric, so a flip is visible), uint8."""
    row = torch.linspace(0, 255, s).round().to(torch.uint8)
    return row.view(1, 1, 1, s).expand(b, 3, s, s).contiguous()


def test_full_crop_is_identity_and_flip_follows_flip_ok():
    x = _ramp()
    keep = RandomAugment(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    out = _denorm(keep(x, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(out, x.float() / 255, atol=1e-5, rtol=0)
    flip = RandomAugment(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True)
    out = _denorm(flip(x, torch.Generator().manual_seed(0)))
    flipped = torch.isclose(out, x.flip(-1).float() / 255, atol=1e-5).flatten(1).all(1)
    same = torch.isclose(out, x.float() / 255, atol=1e-5).flatten(1).all(1)
    assert bool((flipped | same).all())
    assert 10 < int(flipped.sum()) < 54  # about half of 64, per sample
    no_flip = registry.build("augmentation", "standard", {"scale_min": 1.0}, image_size=16, flip_ok=False)
    # flip_ok=False (glyphs, digits): left edge stays darker than the right edge
    out = _denorm(no_flip(x, torch.Generator().manual_seed(1)))
    assert bool((out[..., 0] < out[..., -1]).all())


def test_per_sample_crops_and_seeded_determinism():
    x = torch.randint(0, 256, (32, 3, 40, 40), dtype=torch.uint8)
    x[:] = x[0]  # the same image 32 times: outputs differ only through per-sample crops
    aug = registry.build("augmentation", "strong", None, image_size=24, flip_ok=True)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert a.shape == (32, 3, 24, 24) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert len({tuple(v.flatten()[:20].tolist()) for v in a}) == 32  # every sample its own crop


def test_eval_is_center_crop_batch_and_single():
    img = torch.randint(0, 256, (4, 3, 37, 37), dtype=torch.uint8)  # file image at load size for 32
    ev = eval_transform(32)
    out = _denorm(ev(img))
    torch.testing.assert_close(out, img[:, :, 2:34, 2:34].float() / 255, atol=1e-5, rtol=0)
    torch.testing.assert_close(ev(img[1]), ev(img)[1])
