"""Tests of nc_lib.models: the feature hook, parameter counts, heads, input shapes, errors."""
from __future__ import annotations

import pytest
import torch

from nc_lib.heads import FixedETFHead, LinearHead
from nc_lib.models import MODELS, Classifier, build_model, count_parameters, register_head

torch.set_num_threads(1)


def _tiny(name: str, **kw) -> Classifier:
    if name == "mlp":
        return build_model(name, num_classes=10, input_shape=(1, 8, 8), width=0.1, **kw)
    return build_model(name, num_classes=10, in_channels=1, width=0.125, **kw)


def _head_input(model: Classifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen = {}
    def hook(module, inputs, output):
        seen["h"] = inputs[0].detach()  # returns None: the output is left alone

    handle = model.head.register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    return seen["h"], logits


@pytest.mark.parametrize("name", MODELS)
def test_features_are_the_head_input(name):
    torch.manual_seed(0)
    model = _tiny(name).eval()
    x = torch.randn(3, 1, 8, 8)  # 8x8 digits-sized inputs work for every network
    h_hook, logits = _head_input(model, x)
    with torch.no_grad():
        h = model.features(x)
    assert h.shape == (3, model.feature_dim)
    assert torch.allclose(h, h_hook, atol=1e-6)
    assert logits.shape == (3, 10)
    assert torch.allclose(model.head(h), logits, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "vgg11", "resnet18", "densenet40"])
def test_one_dimensional_signals(name):
    """MNIST-1D signals (B x 1 x 40) go through the MLP and, as 1 x 40 images, the conv nets."""
    if name == "mlp":
        model = build_model(name, num_classes=10, input_shape=(1, 40), width=0.1)
    else:
        model = build_model(name, num_classes=10, in_channels=1, width=0.125)
    model.eval()
    assert model(torch.randn(4, 1, 40)).shape == (4, 10)


@pytest.mark.parametrize("name", ["mlp", "vgg13", "resnet50", "densenet40"])
def test_feature_dim_narrows_the_last_layer(name):
    model = _tiny(name, feature_dim=7).eval()
    assert model.feature_dim == 7 and model.head.feature_dim == 7
    assert model.features(torch.randn(2, 1, 8, 8)).shape == (2, 7)


def test_resnet18_parameter_counts_match_zhu():
    """REFERENCE section 3: ResNet18 (CIFAR stem, 10 classes) 11.17M; last block narrowed to d = C: -20.7%."""
    full = count_parameters(build_model("resnet18", num_classes=10))
    narrow_model = build_model("resnet18", num_classes=10, feature_dim=10)
    narrow = count_parameters(narrow_model)
    assert round(full / 1e6, 2) == 11.17
    assert 8.85e6 <= narrow <= 8.88e6
    assert round(100 * (1 - narrow / full), 1) == 20.7
    last = narrow_model.body[7][-1]  # layer4's last block (body: As2d, conv, bn, relu, layer1..4, pool, flatten)
    assert isinstance(last.shortcut[0], torch.nn.Conv2d) and last.shortcut[0].kernel_size == (1, 1)
    assert last.conv2.out_channels == 10


def test_classic_and_bc_densenet_sizes():
    """DenseNet-40 (k = 12, non-BC) has about 1.0M parameters, DenseNet-BC-250 (k = 24) about 15.3M."""
    d40 = build_model("densenet40", num_classes=10)
    assert d40.feature_dim == 16 + 36 * 12
    assert abs(count_parameters(d40) / 1e6 - 1.02) < 0.01
    assert abs(count_parameters(build_model("densenet250", num_classes=10)) / 1e6 - 15.3) < 0.1


def test_width_multiplier_shrinks():
    assert count_parameters(build_model("vgg11", num_classes=10, width=0.25)) < count_parameters(
        build_model("vgg11", num_classes=10)) / 10
    assert build_model("resnet18", num_classes=10, width=0.5).feature_dim == 256


def test_imagenet_stem_and_cifar_stem():
    cifar = build_model("resnet18", num_classes=10, width=0.125, stem="cifar")
    imnet = build_model("resnet18", num_classes=10, width=0.125, stem="imagenet")
    assert cifar.body[1].kernel_size == (3, 3) and cifar.body[1].stride == (1, 1)
    assert imnet.body[1].kernel_size == (7, 7) and isinstance(imnet.body[4], torch.nn.MaxPool2d)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in cifar.modules())
    assert not any(isinstance(m, torch.nn.Dropout) for name in MODELS for m in _tiny(name).modules())


def test_heads_plug_in():
    m = _tiny("resnet18", head="fixed_etf")
    assert isinstance(m.head, FixedETFHead)
    assert not any(p is m.head.weight for p in m.parameters())
    m2 = _tiny("vgg11", head=lambda d, C: LinearHead(d, C, bias=False))
    assert m2.head.bias is None
    register_head("test_nobias", lambda d, C: LinearHead(d, C, bias=False))
    assert _tiny("mlp", head="test_nobias").head.bias is None
    from nc_lib.heads import ImplicitETFHead
    nograd = _tiny("mlp", head="implicit_etf_nograd").head  # Markou's ablation, by name without importing the paper
    assert isinstance(nograd, ImplicitETFHead) and not nograd.backprop_through_node
    with pytest.raises(ValueError, match="fixed_etf"):
        _tiny("mlp", head="nope")
    with pytest.raises(ValueError, match="feature_dim"):
        _tiny("mlp", head=LinearHead(5, 10))


def test_errors_list_valid_names():
    with pytest.raises(ValueError, match="resnet18"):
        build_model("resnet19", num_classes=10)
    with pytest.raises(ValueError, match="input_shape"):
        build_model("mlp", num_classes=10)
    with pytest.raises(ValueError, match="stem"):
        build_model("resnet18", num_classes=10, stem="tiny")
    with pytest.raises(ValueError, match="valid options"):
        build_model("vgg11", num_classes=10, stem="cifar")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("vgg11", num_classes=1)
