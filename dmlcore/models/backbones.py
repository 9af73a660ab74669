"""Backbones: ``B x 3 x H x W`` images to a ``B x C x h x w`` feature map.

Each factory returns ``(module, feature_dim)``. Torchvision networks are built with
``weights=None``; pretrained weights come from the local file ``model.pretrained`` (a
torchvision state dict; see :mod:`dmlcore.models.pretrained`) or, for
``model.pretrained: imagenet``, from torchvision's original ImageNet (V1) file in the torch
hub cache (see :mod:`dmlcore.models.weights`; nothing is downloaded here).
The trunks keep torchvision's attribute names, so torchvision state dicts load as is
(minus the classifier).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import register
from . import weights
from .pretrained import ModelError, load_pretrained


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without ``avgpool`` and ``fc``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _resnet(arch: str, pretrained: str | None) -> tuple[nn.Module, int]:
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    dim = net.fc.in_features
    trunk = ResNetTrunk(net)
    pretrained = weights.resolve(arch, pretrained)
    if pretrained:
        load_pretrained(trunk, pretrained, ignore=("fc.",), name=arch)
    return trunk, dim


@register("backbone", "resnet18", context=("pretrained",))
def resnet18(pretrained: str | None = None) -> tuple[nn.Module, int]:
    """Torchvision ResNet-18 trunk (512-d feature map)."""
    return _resnet("resnet18", pretrained)


@register("backbone", "resnet50", context=("pretrained",))
def resnet50(pretrained: str | None = None) -> tuple[nn.Module, int]:
    """Torchvision ResNet-50 trunk (2048-d feature map), the Roth et al. 2020 backbone."""
    return _resnet("resnet50", pretrained)


_GOOGLENET_BLOCKS = (
    "conv1", "maxpool1", "conv2", "conv3", "maxpool2",
    "inception3a", "inception3b", "maxpool3",
    "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
    "inception5a", "inception5b",
)  # fmt: skip


class GoogLeNetTrunk(nn.Module):
    """Torchvision GoogLeNet (Inception v1) up to ``inception5b``; no aux heads, no classifier."""

    def __init__(self, net: nn.Module, transform_input: bool) -> None:
        super().__init__()
        for name in _GOOGLENET_BLOCKS:
            setattr(self, name, getattr(net, name))
        self.transform_input = transform_input
        # Torchvision's ImageNet weights expect inputs re-scaled from ImageNet mean/std
        # normalisation to (x - 0.5) / 0.5 per channel.
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        self.register_buffer("_in_scale", std / 0.5, persistent=False)
        self.register_buffer("_in_shift", (mean - 0.5) / 0.5, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.transform_input:
            x = x * self._in_scale.to(x.dtype) + self._in_shift.to(x.dtype)
        for name in _GOOGLENET_BLOCKS:
            x = getattr(self, name)(x)
        return x


@register("backbone", "googlenet", context=("pretrained",))
def googlenet(transform_input: bool | None = None, pretrained: str | None = None) -> tuple[nn.Module, int]:
    """Torchvision GoogLeNet / Inception v1 trunk (1024-d feature map; images >= 32 px).

    ``transform_input``: re-scale ImageNet-normalised inputs as torchvision's pretrained
    GoogLeNet expects; default: on when ``model.pretrained`` is given.
    """
    import torchvision

    net = torchvision.models.GoogLeNet(aux_logits=False, init_weights=True, transform_input=False)
    pretrained = weights.resolve("googlenet", pretrained)
    if transform_input is None:
        transform_input = bool(pretrained)
    trunk = GoogLeNetTrunk(net, bool(transform_input))
    if pretrained:
        load_pretrained(trunk, pretrained, ignore=("fc.", "aux1.", "aux2."), name="googlenet")
    return trunk, 1024


class SmallCNN(nn.Module):
    """``depth`` blocks of stride-2 conv3x3-BN-ReLU; channels double per block from ``width``."""

    def __init__(self, width: int = 32, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(depth):
            c_out = width * 2 ** min(i, 4)
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.out_dim = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


@register("backbone", "small_cnn", context=("pretrained",))
def small_cnn(width: int = 32, depth: int = 3, pretrained: str | None = None) -> tuple[nn.Module, int]:
    """A fast CNN for CPU runs on 16-64 px images (feature dim ``width * 2**min(depth-1, 4)``)."""
    if int(width) != width or width < 1:
        raise ModelError(f"small_cnn: width must be a positive integer, got {width!r}")
    if int(depth) != depth or depth < 1:
        raise ModelError(f"small_cnn: depth must be a positive integer, got {depth!r}")
    net = SmallCNN(int(width), int(depth))
    pretrained = weights.resolve("small_cnn", pretrained)
    if pretrained:
        load_pretrained(net, pretrained, ignore=(), name="small_cnn")
    return net, net.out_dim
