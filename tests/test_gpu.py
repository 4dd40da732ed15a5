"""GPU paths: the same numbers on CUDA as on the CPU, AMP training, the node and the UFM on a GPU.

Skipped where torch sees no CUDA device (CI has none); run them on a GPU machine with
``pytest tests/test_gpu.py``. Each compares against the CPU result, so it can fail.
"""
from __future__ import annotations

import math

import pytest
import torch

from nc_lib import metrics
from nc_lib.heads import ImplicitETFHead
from nc_lib.nearest_etf import kkt_backward_dense, nearest_etf_node
from nc_lib.ufm import train_ufm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _tmp_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("NC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NC_FIGURES_DIR", str(tmp_path / "figures"))


def _features(N=600, p=32, C=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(C).repeat(N // C)
    H = (torch.randn(C, p, generator=g)[y] + 0.3 * torch.randn(N, p, generator=g)).to(dtype)
    W = torch.randn(C, p, generator=g, dtype=dtype)
    return H, y, W, torch.randn(C, generator=g, dtype=dtype)


def test_measurements_on_cuda_equal_cpu():
    H, y, W, b = _features()
    cpu = metrics.measure_collapse(H, y, 6, W, b, H[:60], y[:60])
    gpu = metrics.measure_collapse(H.cuda(), y.cuda(), 6, W.cuda(), b.cuda(), H[:60].cuda(), y[:60].cuda())
    assert cpu.keys() == gpu.keys()
    for k in cpu:
        assert gpu[k] == pytest.approx(cpu[k], rel=1e-9, abs=1e-12), k


def test_streaming_accumulator_on_cuda():
    H, y, W, b = _features(p=300)  # p >= 128: the blocked symmetric scatter
    acc = metrics.CollapseAccumulator(6)
    for s in range(0, H.shape[0], 100):
        acc.update(H[s:s + 100].cuda(), y[s:s + 100].cuda())
    ref = metrics.measure_collapse(H, y, 6, W, b)
    got = acc.result(W.cuda(), b.cuda())
    assert got["within_class_variability"] == pytest.approx(ref["within_class_variability"], rel=1e-10)


def test_node_backward_on_cuda_matches_dense_kkt_and_gradcheck():
    g = torch.Generator().manual_seed(1)
    d, C = 12, 5
    Hbar = torch.randn(d, C, generator=g, dtype=torch.float64).cuda()
    Hbar = Hbar - Hbar.mean(1, keepdim=True)
    Hbar = (Hbar / Hbar.norm()).requires_grad_()
    U_prox = torch.linalg.qr(torch.randn(d, C, generator=g, dtype=torch.float64))[0].cuda()
    U, _ = nearest_etf_node(Hbar, U_prox)
    grad_U = torch.randn(d, C, generator=g, dtype=torch.float64).cuda()
    (gH,) = torch.autograd.grad(U, Hbar, grad_U)
    ref = kkt_backward_dense(Hbar.detach().cpu(), U_prox.cpu(), U.detach().cpu(), grad_U.cpu())
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert torch.allclose(gH.cpu(), ref, atol=1e-8)
    assert torch.autograd.gradcheck(lambda h: nearest_etf_node(h, U_prox)[0], (Hbar,))


def test_implicit_head_trains_on_cuda():
    head = ImplicitETFHead(64, 10).cuda()
    h = torch.randn(200, 64, device="cuda", requires_grad=True)
    y = torch.arange(10, device="cuda").repeat(20)
    loss = torch.nn.functional.cross_entropy(head(h, y), y)
    loss.backward()
    assert h.grad is not None and bool(torch.isfinite(h.grad).all())
    head.eval()
    assert head(h).shape == (200, 10)


def test_ufm_on_cuda_follows_the_cpu_run():
    cfg = dict(num_classes=4, n_per_class=5, feature_dim=8, lr=0.5, momentum=0.9, dtype="float64", seed=3)
    cpu = train_ufm(cfg, steps=40, measure_every=20, progress=False)
    gpu = train_ufm(cfg, steps=40, measure_every=20, progress=False, device="cuda")
    assert gpu.model.H.device.type == "cuda"
    for a, b in zip(cpu.records, gpu.records):
        assert b["objective"] == pytest.approx(a["objective"], rel=1e-8)
        assert b["within_class_variability"] == pytest.approx(a["within_class_variability"], rel=1e-6)
    assert gpu.snapshots[-1]["means"].device.type == "cpu"


def test_markou_ufm_run_on_cuda():
    from nc_lib.papers import markou2024 as mk

    s = mk.UFMSetting("t", 10, 32, n_per_class=4, iterations=30, seeds=(0,), measure_every=10)
    r = mk.run_ufm(s, "implicit_etf", 0, device="cuda")
    assert r["device"].startswith("cuda")
    assert math.isfinite(r["records"][-1]["within_class_variability"])


@pytest.mark.parametrize("amp,optimizer", [(False, "sgd"), (True, "sgd"), (False, "agd")])
def test_training_engine_on_cuda(amp, optimizer):
    from nc_lib.config import TrainConfig
    from nc_lib.train import train

    extra = dict(weight_decay=0.0, schedule="none", stratified_batches=True) if optimizer == "agd" else {}
    cfg = TrainConfig(dataset="fake", model="resnet18", width=0.25, epochs=2, lr=0.01, batch_size=20,
                      device="cuda", amp=amp, optimizer=optimizer, dataset_kwargs={"image_size": (3, 16, 16), "size": 60},
                      snapshot_per_class=1, eval_batch_size=30, **extra)
    run = train(cfg, progress=False)
    assert run.finished and run.final["epoch"] == 2
    assert math.isfinite(run.final["within_class_variability"])
    assert run.model("cuda") is not None


def _fake_conv(**kw):
    from nc_lib.config import TrainConfig

    base = dict(dataset="fake", model="resnet18", width=0.25, epochs=2, lr=0.01, batch_size=20, device="cuda",
                augment=True, dataset_kwargs={"image_size": (3, 16, 16), "size": 60}, snapshot_per_class=1,
                eval_batch_size=30)
    base.update(kw)
    return TrainConfig(**base)


def test_device_resident_data_gives_the_numbers_of_host_batches(tmp_path, monkeypatch):
    """data_placement='auto' holds the fake set on the GPU; 'host' copies each batch: same crops, same run."""
    from nc_lib.config import load_run_data, place_run_data
    from nc_lib.train import train

    cfg = _fake_conv()
    placed = place_run_data(cfg, load_run_data(cfg), torch.device("cuda"))
    assert all(d.device.type == "cuda" for d in placed)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    on_device = train(cfg, progress=False).history
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "host"))
    on_host = train(cfg.replace(data_placement="host"), progress=False).history
    for a, b in zip(on_device, on_host, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["within_class_variability"] == pytest.approx(b["within_class_variability"], rel=1e-4)


def test_an_amp_run_is_measured_in_float32():
    from nc_lib import features
    from nc_lib.config import load_run_data
    from nc_lib.data import make_loader, without_augmentation
    from nc_lib.train import train

    cfg = _fake_conv(amp=True, channels_last=True)
    run = train(cfg, progress=False)
    train_set, test_set = load_run_data(cfg)
    loaders = [make_loader(without_augmentation(d), 30) for d in (train_set, test_set)]
    rec = features.measure(run.model("cuda"), *loaders, train_set.num_classes, torch.device("cuda"))[0]
    assert rec["within_class_variability"] == pytest.approx(run.final["within_class_variability"], rel=1e-4)


def test_an_inductor_compiled_body_trains_like_the_plain_one(tmp_path, monkeypatch):
    from nc_lib.train import train

    plain = train(_fake_conv(augment=False), progress=False).history
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "compiled"))
    compiled = train(_fake_conv(augment=False, compile=True), progress=False).history
    for a, b in zip(plain, compiled, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-2)
