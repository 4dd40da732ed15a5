"""nc_lib.measure_model: any network's collapse measurements equal measure_collapse on hand-extracted features."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import nc_lib
from nc_lib.any_model import block_names, pooled
from nc_lib.metrics import measure_collapse
from nc_lib.models import build_model

torchvision = pytest.importorskip("torchvision")


def _loader(X, Y, bs=16):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=bs)


def _data(n=48, C=4, shape=(1, 28, 28), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.arange(n) % C


def _resnet(C=4):
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None, num_classes=C)
    m.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m.eval()


def _hooked(model, module, X, output=False):
    got = []
    h = module.register_forward_hook(lambda m, i, o: got.append((o if output else i[0]).detach()))
    with torch.no_grad():
        model.eval()
        model(X)
    h.remove()
    return got[0]


def _close(a: dict, b: dict, keys=None, rtol=1e-4):
    keys = keys or [k for k in b if k in a]
    assert keys
    for k in keys:
        assert a[k] == pytest.approx(b[k], rel=rtol, abs=1e-6), k


@pytest.mark.parametrize("which", ["resnet18", "vgg", "kit_mlp"])
def test_default_features_and_classifier_equal_measure_collapse(which):
    C = 4
    if which == "resnet18":
        model, (X, Y) = _resnet(C), _data(C=C)
        lin = model.fc
    elif which == "vgg":
        torch.manual_seed(0)
        model = torchvision.models.vgg11(weights=None, num_classes=C)
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, C))
        X, Y = _data(n=32, C=C, shape=(3, 32, 32))
        lin = model.classifier[2]
    else:
        torch.manual_seed(0)
        model = build_model("mlp", num_classes=C, input_shape=(1, 8, 8))
        X, Y = _data(n=40, C=C, shape=(1, 8, 8))
        lin = model.head
    h = _hooked(model, lin, X)
    W, b = (lin.weight, lin.bias) if isinstance(lin, nn.Linear) else lin.classifier()
    ref = measure_collapse(h, Y, C, W.detach(), b.detach())
    r = nc_lib.measure_model(model, _loader(X, Y), progress=False)
    assert r.num_classes == C
    _close(r.values, ref)
    # without a classifier: the feature measurements only, same values
    r0 = nc_lib.measure_model(model, _loader(X, Y), classifier=None, progress=False)
    ref0 = measure_collapse(h, Y, C)
    _close(r0.values, ref0)
    assert "self_duality" not in r0.values and r0.classifier is None


def test_named_layer_and_every_layer_equal_pooled_features():
    C = 4
    model, (X, Y) = _resnet(C), _data(C=C)
    r = nc_lib.measure_model(model, _loader(X, Y), layer="layer3", classifier=None, layers="all", progress=False)
    h3 = pooled(_hooked(model, model.layer3, X, output=True), "avg")
    _close(r.values, measure_collapse(h3, Y, C))
    names = block_names(model, [model.fc])
    assert names == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert list(r.layers) == names
    for n in ("layer1.0", "layer4.1"):
        mod = dict(model.named_modules())[n]
        ref = measure_collapse(pooled(_hooked(model, mod, X, output=True), "avg"), Y, C)
        _close(r.layers[n], ref, ["within_class_variability", "equinorm_means", "equiangularity_means",
                                  "ncc_accuracy"])
    # flattening on request
    rf = nc_lib.measure_model(model, _loader(X, Y), classifier=None, layers=["layer4.1"], pool="flatten", progress=False)
    hf = _hooked(model, model.layer4[1], X, output=True).flatten(1)
    _close(rf.layers["layer4.1"], measure_collapse(hf, Y, C), ["within_class_variability", "ncc_accuracy"])
    fig = r.figure()
    assert list(fig.data[0].y) == pytest.approx([r.layers[n]["within_class_variability"] for n in names])


def test_result_is_a_table_and_a_dict():
    model, (X, Y) = _resnet(), _data()
    r = nc_lib.measure_model(model, _loader(X, Y), _loader(X, Y), progress=False)
    d = r.to_dict()
    assert d["within_class_variability"] == r["within_class_variability"]
    assert d["paper_names"]["zhu2021"]["NC1"] == r["within_class_variability"]
    assert d["paper_names"]["papyan2020"]["NCC mismatch"] == r["ncc_mismatch_test"]
    assert "within_class_variability" in str(r) and "<table>" in r._repr_html_()
    assert r["test_accuracy"] == pytest.approx(r["train_accuracy"])


def test_bad_input_errors():
    X, Y = _data(n=16)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="no nn.Linear"):
        nc_lib.measure_model(conv, _loader(X, Y), progress=False)
    nc_lib.measure_model(conv, _loader(X, Y), layer="2", num_classes=4, progress=False)  # works with layer=
    model = _resnet()
    with pytest.raises(ValueError, match=r"close names: \[.*'layer4'"):
        nc_lib.measure_model(model, _loader(X, Y), layer="layer_4", progress=False)
    with pytest.raises(ValueError, match="labels of train_loader must lie in"):
        nc_lib.measure_model(model, _loader(X, Y + 3), progress=False)
    bad = [(X[:4], Y[:4], Y[:4])]
    with pytest.raises(ValueError, match=r"\(input, label\) pairs"):
        nc_lib.measure_model(model, bad, progress=False)
    with pytest.raises(ValueError, match=r"\(input, label\) pairs"):
        nc_lib.measure_model(model, [X[:4]], progress=False)
    with pytest.raises(ValueError, match="pool"):
        nc_lib.measure_model(model, _loader(X, Y), pool="max", progress=False)
