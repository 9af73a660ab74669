"""Backbones, heads, EmbeddingModel (freeze_bn, normalisation, head_loss) and pretrained loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dmlcore import registry
from dmlcore.config import ModelConfig
from dmlcore.models.embedding import EmbeddingModel, ModelError, build_model
from dmlcore.models.heads import Head, global_pool
from dmlcore.models.pretrained import PretrainedError, load_pretrained
from dmlcore.registry import RegistryError


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # tiny tensors: one intra-op thread is faster than many on a shared CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _bns(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# ---- backbones -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,params,size,dim",
    [
        ("small_cnn", {}, 16, 128),
        ("small_cnn", {}, 64, 128),
        ("small_cnn", {"width": 8, "depth": 2}, 32, 16),
        ("resnet18", {}, 32, 512),
        ("resnet50", {}, 32, 2048),
        ("googlenet", {}, 32, 1024),
    ],
)
def test_backbone_feature_map_shape(name, params, size, dim):
    module, feature_dim = registry.build("backbone", name, params, pretrained=None)
    assert feature_dim == dim
    module.train()
    out = module(torch.randn(2, 3, size, size))
    assert out.dim() == 4 and out.shape[:2] == (2, dim)
    assert torch.isfinite(out).all()


def test_torchvision_backbones_have_no_classifier():
    for name in ("resnet18", "googlenet"):
        module, _ = registry.build("backbone", name, {})
        keys = module.state_dict().keys()
        assert not any(k.startswith(("fc.", "aux1.", "aux2.", "avgpool")) for k in keys), name


def test_small_cnn_rejects_bad_width():
    with pytest.raises(ModelError, match="width"):
        build_model(ModelConfig(backbone="small_cnn", backbone_params={"width": 0}))


# ---- heads and the embedding model ----------------------------------------------------


@pytest.mark.parametrize("head,params", [("linear", {}), ("linear", {"pool": "max"}), ("linear", {"pool": "avgmax"}), ("mlp", {"hidden": 16})])
def test_build_model_embedding_shape_and_norm(head, params):
    cfg = ModelConfig(backbone="small_cnn", backbone_params={"width": 8}, embed_dim=12, head=head, head_params=params)
    model = build_model(cfg)
    emb = model(torch.randn(4, 3, 24, 24))
    assert emb.shape == (4, 12)
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    assert model.head_loss() is None


def test_unnormalized_model_and_pooling():
    model = build_model(ModelConfig(backbone="small_cnn", backbone_params={"width": 8}, embed_dim=6, normalize=False))
    emb = model(torch.randn(3, 3, 16, 16))
    assert not torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-3)
    x = torch.arange(8.0).view(1, 2, 2, 2)
    assert torch.equal(global_pool(x, "avg"), torch.tensor([[1.5, 5.5]]))
    assert torch.equal(global_pool(x, "max"), torch.tensor([[3.0, 7.0]]))
    assert torch.equal(global_pool(x, "avgmax"), torch.tensor([[4.5, 12.5]]))
    assert model.pooled_features(torch.randn(2, 3, 16, 16)).shape == (2, model.feature_dim)


def test_bad_head_param_value_names_key():
    with pytest.raises(ModelError) as err:
        build_model(ModelConfig(head="linear", head_params={"pool": "mean"}))
    assert str(err.value).startswith("model.head_params:") and "pool" in str(err.value)


def test_unknown_backbone_and_param_did_you_mean():
    with pytest.raises(RegistryError) as err:
        build_model(ModelConfig(backbone="resnet5"))
    msg = str(err.value)
    assert msg.startswith("model.backbone:") and "did you mean 'resnet50'" in msg
    with pytest.raises(RegistryError) as err:
        build_model(ModelConfig(backbone="small_cnn", backbone_params={"widht": 8}))
    assert "model.backbone_params.widht" in str(err.value) and "did you mean 'width'" in str(err.value)


def test_head_extra_loss_reaches_model():
    class ConsistencyHead(Head):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 4)
            self._extra = None

        def forward(self, x):
            z = self.fc(global_pool(x))
            self._extra = z.pow(2).mean()
            return z

        def extra_loss(self):
            return self._extra

    backbone, dim = registry.build("backbone", "small_cnn", {"width": 8, "depth": 2})
    model = EmbeddingModel(backbone, ConsistencyHead(), feature_dim=dim, embed_dim=4)
    assert model.head_loss() is None
    model(torch.randn(2, 3, 16, 16))
    extra = model.head_loss()
    assert isinstance(extra, torch.Tensor) and extra.requires_grad


def test_freeze_bn_keeps_running_stats_and_trains_affine(tmp_path):
    # frozen BN statistics need weights to freeze (model.pretrained); here a saved small_cnn
    src, _ = registry.build("backbone", "small_cnn", {"width": 8})
    weights = tmp_path / "small.pth"
    torch.save(src.state_dict(), weights)
    cfg = ModelConfig(backbone="small_cnn", backbone_params={"width": 8}, head="mlp", head_params={"hidden": 8},
                      freeze_bn=True, pretrained=str(weights))
    model = build_model(cfg).train()
    bns = _bns(model.backbone)
    assert bns
    before = [(b.running_mean.clone(), b.running_var.clone()) for b in bns]
    out = model(torch.randn(4, 3, 16, 16) * 3 + 1)
    out.sum().backward()
    for b, (mean, var) in zip(bns, before):
        assert not b.training
        assert torch.equal(b.running_mean, mean) and torch.equal(b.running_var, var)
        # gamma/beta still train, as the reference's resnet50_frozen (only the statistics are frozen)
        assert b.weight.requires_grad and b.bias.requires_grad and b.weight.grad is not None
    # everything else still trains
    assert model.training and model.head.training
    assert all(p.requires_grad for p in model.head.parameters())
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.grad is not None for c in convs)
    # control: without freeze_bn the same forward moves the running statistics
    free = build_model(ModelConfig(**{**cfg.model_dump(), "freeze_bn": False})).train()
    b0 = _bns(free.backbone)[0]
    m0 = b0.running_mean.clone()
    free(torch.randn(4, 3, 16, 16) * 3 + 1)
    assert not torch.equal(b0.running_mean, m0) and b0.weight.requires_grad


# ---- pretrained weights ---------------------------------------------------------------


def test_pretrained_torchvision_roundtrip(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    for p in net.parameters():
        nn.init.normal_(p)  # distinct from a fresh init
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)  # includes fc.*, which is ignored
    trunk, dim = registry.build("backbone", "resnet18", {}, pretrained=str(path))
    ref = net.state_dict()
    for k, v in trunk.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert dim == 512


def test_pretrained_from_checkpoint_dict(tmp_path):
    cfg = ModelConfig(backbone="small_cnn", backbone_params={"width": 8}, embed_dim=8)
    src = build_model(cfg)
    for p in src.parameters():
        nn.init.normal_(p)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": src.state_dict(), "epoch": torch.tensor(3)}, path)
    dst = build_model(cfg.model_copy(update={"pretrained": str(path)}))
    for k, v in dst.backbone.state_dict().items():
        assert torch.equal(v, src.backbone.state_dict()[k]), k
    # the head is not taken from the file
    assert not torch.equal(dst.head.fc.weight, src.head.fc.weight)


def test_pretrained_mismatch_is_one_line_error(tmp_path):
    small, _ = registry.build("backbone", "small_cnn", {"width": 8})
    path = tmp_path / "w8.pt"
    torch.save(small.state_dict(), path)
    with pytest.raises(PretrainedError) as err:
        build_model(ModelConfig(backbone="small_cnn", backbone_params={"width": 16}, pretrained=str(path)))
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and msg.startswith("model.pretrained:")
    assert "shape mismatch: features.0.weight" in msg
    # keys of another architecture
    with pytest.raises(PretrainedError) as err:
        registry.build("backbone", "resnet18", {}, pretrained=str(path))
    msg = str(err.value)
    assert "\n" not in msg and "missing keys: conv1.weight" in msg and "unexpected keys: features.0.weight" in msg
    assert isinstance(err.value, ModelError) and isinstance(err.value, ValueError)


def test_pretrained_missing_or_unreadable_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ModelError) as err:
        build_model(ModelConfig(pretrained=str(missing)))
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    small, _ = registry.build("backbone", "small_cnn", {})
    with pytest.raises(PretrainedError) as err:
        load_pretrained(small, junk)
    assert str(junk) in str(err.value) and "\n" not in str(err.value)
