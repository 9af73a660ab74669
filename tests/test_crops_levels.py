"""Whole-image crops (torchvision's RandomResizedCrop, resampled, never clamped) and the
reference's augmentation levels, each against numbers written out here."""

import math

import torch

from dmlcore import registry
from dmlcore.data.crops import TRIES, boxes_from_uniforms
from dmlcore.data.images import ImageBatch
from dmlcore.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, RandomAugment


def _denorm(x):
    return x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


def _torchvision_get_params(height, width, scale, ratio, u):
    """RandomResizedCrop.get_params written out (torchvision transforms.py), fed the uniforms u[t] = (area, log-ratio, i, j)."""
    area = height * width
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    for t in range(10):
        target_area = area * (scale[0] + float(u[t, 0]) * (scale[1] - scale[0]))
        aspect = math.exp(lr[0] + float(u[t, 1]) * (lr[1] - lr[0]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(float(u[t, 2]) * (height - h + 1)), int(float(u[t, 3]) * (width - w + 1)), h, w, False
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, True


def test_boxes_replay_torchvision_and_are_never_clamped():
    g = torch.Generator().manual_seed(0)
    # a 2:1 image, a square and a 10:1 strip (where most tries fail and the fallback shows)
    sizes = [(100, 200)] * 300 + [(64, 64)] * 100 + [(20, 200)] * 200
    h = torch.tensor([s[0] for s in sizes], dtype=torch.float32)
    w = torch.tensor([s[1] for s in sizes], dtype=torch.float32)
    u = torch.rand(len(sizes), TRIES, 4, generator=g, dtype=torch.float64)
    top, left, bh, bw = boxes_from_uniforms(h, w, (0.08, 1.0), (3 / 4, 4 / 3), u)
    fallbacks = 0
    for k, (H, W) in enumerate(sizes):
        i, j, eh, ew, fb = _torchvision_get_params(H, W, (0.08, 1.0), (3 / 4, 4 / 3), u[k])
        assert (int(top[k]), int(left[k]), int(bh[k]), int(bw[k])) == (i, j, eh, ew), k
        assert 0 <= i and i + eh <= H and 0 <= j and j + ew <= W  # inside the image, never clamped
        if fb:
            fallbacks += 1
            assert (eh, ew) == ((H, round(H * 4 / 3)) if W / H > 4 / 3 else (H, W))
        else:  # area and ratio of a drawn box, up to the rounding of its sides
            assert 0.08 * H * W * 0.85 <= eh * ew <= H * W and 3 / 4 * 0.9 <= ew / eh <= 4 / 3 * 1.1
    assert fallbacks > 20  # the 10:1 strip falls back often; the fallback is exercised


def test_training_crops_of_a_2to1_image_reach_both_edges():
    H, W = 40, 80
    col = torch.arange(W, dtype=torch.float32).view(1, 1, 1, W).expand(1, 3, H, W)
    img = (col * 3).round().to(torch.uint8)  # column index encoded in the pixel value (0..237)
    aug = registry.build("augmentation", "base", None, image_size=16, flip_ok=False)
    out = _denorm(aug(img.expand(400, 3, H, W).contiguous(), torch.Generator().manual_seed(1))) * 255 / 3
    lo, hi = out[:, 0].amin((1, 2)), out[:, 0].amax((1, 2))
    assert float(lo.min()) < 1.0  # some crop touches x = 0
    assert float(hi.max()) > W - 2.0  # and some x = W - 1 (a central square would stop at 60)


def test_padded_batch_crops_only_its_own_image():
    a = torch.full((3, 20, 40), 200, dtype=torch.uint8)
    b = torch.full((3, 30, 20), 100, dtype=torch.uint8)
    canvas = torch.zeros(2, 3, 30, 40, dtype=torch.uint8)
    canvas[0, :, :20, :40], canvas[1, :, :30, :20] = a, b
    batch = ImageBatch(canvas, torch.tensor([[20, 40], [30, 20]]))
    out = _denorm(RandomAugment(12, scale=(0.08, 1.0))(batch, torch.Generator().manual_seed(0))) * 255
    torch.testing.assert_close(out[0], torch.full_like(out[0], 200.0), atol=1e-3, rtol=0)  # no zero padding sampled
    torch.testing.assert_close(out[1], torch.full_like(out[1], 100.0), atol=1e-3, rtol=0)
    ev = _denorm(EvalTransform(12)(batch)) * 255  # resize short side to round(12*256/224)=14, centre crop 12
    assert ev.shape == (2, 3, 12, 12)
    torch.testing.assert_close(ev[1], torch.full_like(ev[1], 100.0), atol=1e-3, rtol=0)


def test_reference_levels_have_the_reference_numbers():
    """R: datasets/basic_dataset_scaffold.py:28-45; torchvision defaults scale (0.08, 1), ratio (3/4, 4/3)."""
    mk = lambda name: registry.build("augmentation", name, None, image_size=224, flip_ok=True)  # noqa: E731
    base, big, adv, red = mk("base"), mk("big"), mk("adv"), mk("red")
    for t in (base, big, adv):
        assert t.crop == "resized" and t.scale == (0.08, 1.0) and t.flip
        assert abs(t.ratio[0] - 0.75) < 1e-12 and abs(t.ratio[1] - 4 / 3) < 1e-12
    assert (base.out_size, base.eval_crop, base.grayscale, base.color_jitter) == (224, 224, 0.0, None)
    assert (big.out_size, big.eval_crop) == (256, 256)  # RandomResizedCrop(256), CenterCrop(256)
    assert adv.grayscale == 0.2 and adv.color_jitter == (0.2, 0.2, 0.2, 0.2) and adv.out_size == 224
    assert red.crop == "resize_random" and red.out_size == 224 and red.flip and red.color_jitter is None
    # red: Resize(256) + RandomCrop(224): every crop is 224/256 of the shorter side, no scale jitter
    h = torch.full((500,), 300.0)
    w = torch.full((500,), 450.0)
    top, left, bh, bw = red.boxes(h, w, torch.Generator().manual_seed(0))
    torch.testing.assert_close(bh, torch.full_like(bh, 224 * 300 / 256))
    torch.testing.assert_close(bw, torch.full_like(bw, 224 * 450 / int(256 * 450 / 300)))
    assert float((top + bh).max()) <= 300 + 1e-3 and float((left + bw).max()) <= 450 + 1e-3
    # adv's jitter: grayscale p 0.2 over many samples; hue moves a coloured image's channels
    x = torch.zeros(2000, 3, 8, 8, dtype=torch.uint8)
    x[:, 0] = 200
    x[:, 1] = 40
    out = _denorm(registry.build("augmentation", "adv", None, image_size=8, flip_ok=True)(x, torch.Generator().manual_seed(3)))
    gray = (out.amax(1) - out.amin(1)).flatten(1).amax(1) < 1e-4
    assert 0.17 < float(gray.float().mean()) < 0.23
    # on a uniform gray image only brightness acts (contrast, saturation, hue leave it alone): factor ~ U(0.8, 1.2)
    g = torch.full((2000, 3, 8, 8), 100, dtype=torch.uint8)
    out = _denorm(registry.build("augmentation", "adv", None, image_size=8, flip_ok=True)(g, torch.Generator().manual_seed(4)))
    f = out.mean((1, 2, 3)) / (100 / 255)
    assert float(f.min()) > 0.8 - 1e-4 and float(f.max()) < 1.2 + 1e-4
    assert float(f.min()) < 0.82 and float(f.max()) > 1.18
