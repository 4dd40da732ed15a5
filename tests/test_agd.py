"""Tests of nc_lib.agd (automatic gradient descent, Bernstein et al. 2023) and of optimizer="agd" in the engine."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from nc_lib.agd import AGD, agd_eta, agd_parameters, reset_frozen_parameters, singular_value
from nc_lib.config import TrainConfig
from nc_lib.train import train

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _tmp_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("NC_DATA_DIR", str(tmp_path / "data"))


def _mlp2() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False)).double()


def _grads(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    net.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(net(x), y).backward()


def test_step_matches_a_hand_computation_on_a_two_layer_mlp():
    net = _mlp2()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    _grads(net, x, y)
    W1, W2 = net[0].weight.detach().clone(), net[2].weight.detach().clone()
    g1, g2 = net[0].weight.grad.clone(), net[2].weight.grad.clone()
    gain, L = 0.7, 2
    s1, s2 = math.sqrt(5 / 6), math.sqrt(3 / 5)  # sqrt(d_out / d_in)
    n1, n2 = float(g1.norm()), float(g2.norm())
    G = (s1 * n1 + s2 * n2) / L
    eta = math.log((1 + math.sqrt(1 + 4 * G)) / 2)
    opt = AGD(net.parameters(), gain=gain)
    assert opt.num_layers == 2
    opt.step()
    assert float(opt.last_eta) == pytest.approx(eta, rel=1e-12)
    torch.testing.assert_close(net[0].weight.detach(), W1 - gain * eta / L * s1 * g1 / n1, rtol=0, atol=1e-14)
    torch.testing.assert_close(net[2].weight.detach(), W2 - gain * eta / L * s2 * g2 / n2, rtol=0, atol=1e-14)
    # every layer moves by gain * eta / L * s_l in Frobenius norm
    assert float((net[0].weight.detach() - W1).norm()) == pytest.approx(gain * eta / L * s1, rel=1e-12)


def test_kernels_are_normalised_per_kernel_position():
    """Conv kernels: s = sqrt(d_out/d_in)/sqrt(kh kw); the norm is taken per kernel position (released code)."""
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 4, 3, bias=False).double()
    lin = nn.Linear(4, 3, bias=False).double()
    net = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin)
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    _grads(net, x, y)
    K, Wl, gk, gl = conv.weight.detach().clone(), lin.weight.detach().clone(), conv.weight.grad.clone(), lin.weight.grad.clone()
    sk, sl = math.sqrt(4 / 2) / 3, math.sqrt(3 / 4)
    assert singular_value(K.shape) == pytest.approx(sk) and singular_value(Wl.shape) == pytest.approx(sl)
    pos_norms = torch.stack([gk[:, :, i, j].norm() for i in range(3) for j in range(3)]).reshape(3, 3)
    G = (sk * float(pos_norms.sum()) + sl * float(gl.norm())) / 2
    eta = math.log((1 + math.sqrt(1 + 4 * G)) / 2)
    AGD(net.parameters()).step()
    expected = K.clone()
    for i in range(3):
        for j in range(3):
            expected[:, :, i, j] -= eta / 2 * sk * gk[:, :, i, j] / pos_norms[i, j]
    torch.testing.assert_close(conv.weight.detach(), expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(lin.weight.detach(), Wl - eta / 2 * sl * gl / gl.norm(), rtol=0, atol=1e-14)


def test_init_gives_the_singular_values_and_is_seeded():
    shapes = {"wide": (7, 20), "tall": (20, 7), "conv": (8, 3, 3, 3), "conv1x1": (4, 8, 1, 1), "conv_rect": (6, 6, 1, 3)}
    params = {k: nn.Parameter(torch.zeros(s)) for k, s in shapes.items()}
    torch.manual_seed(0)
    AGD(params.values()).init_weights()
    for name, p in params.items():
        s = singular_value(p.shape)
        k = math.prod(p.shape[2:])
        assert s == pytest.approx(math.sqrt(p.shape[0] / p.shape[1]) / math.sqrt(k))
        slices = [p.detach()] if p.dim() == 2 else [p.detach()[:, :, i, j] for i in range(p.shape[2])
                                                     for j in range(p.shape[3])]
        for M in slices:
            sv = torch.linalg.svdvals(M)
            assert len(sv) == min(p.shape[0], p.shape[1])
            torch.testing.assert_close(sv, torch.full_like(sv, s), rtol=1e-5, atol=0), name
        if p.dim() == 4 and p.shape[2] * p.shape[3] > 1:  # an independent matrix at each kernel position
            assert not torch.allclose(slices[0], slices[1])
    again = {k: nn.Parameter(torch.zeros(s)) for k, s in shapes.items()}
    torch.manual_seed(0)
    AGD(again.values()).init_weights()
    assert all(torch.equal(params[k], again[k]) for k in shapes)


def test_eta_for_known_G():
    assert agd_eta(0.0) == 0.0
    assert agd_eta(2.0) == pytest.approx(math.log(2.0))  # sqrt(9) = 3: log(4/2)
    assert agd_eta(6.0) == pytest.approx(math.log(3.0))  # sqrt(25) = 5: log(6/2)
    assert float(agd_eta(torch.tensor(2.0, dtype=torch.float64))) == pytest.approx(math.log(2.0), rel=1e-15)
    # near 0 eta ~ G (the update is then gradient descent with a normalised step)
    assert agd_eta(1e-6) == pytest.approx(1e-6, rel=1e-5)


def test_zero_and_missing_gradients_do_not_move_a_layer():
    a, b, c = (nn.Parameter(torch.randn(3, 4, dtype=torch.float64)) for _ in range(3))
    a.grad = torch.zeros_like(a)
    b.grad = torch.ones_like(b)  # c has no gradient: counts in L but is not moved
    a0, c0 = a.detach().clone(), c.detach().clone()
    opt = AGD([a, b, c])
    opt.step()
    assert torch.equal(a.detach(), a0) and torch.equal(c.detach(), c0)
    G = math.sqrt(3 / 4) * math.sqrt(12) / 3
    assert float(opt.last_eta) == pytest.approx(math.log((1 + math.sqrt(1 + 4 * G)) / 2))


def test_state_dict_round_trip_and_closure():
    net = _mlp2()
    opt = AGD([{"params": [net[0].weight]}, {"params": [net[2].weight], "gain": 0.5}], gain=2.0)
    state = opt.state_dict()
    assert [g["gain"] for g in state["param_groups"]] == [2.0, 0.5]
    net2 = _mlp2()
    other = AGD([{"params": [net2[0].weight]}, {"params": [net2[2].weight]}])
    assert [g["gain"] for g in other.param_groups] == [1.0, 1.0]
    other.load_state_dict(state)
    assert [g["gain"] for g in other.param_groups] == [2.0, 0.5]
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])

    def closure():
        net.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and opt.last_eta is not None and float(opt.last_eta) > 0


def test_agd_parameters_freezes_the_1d_parameters():
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        net[1].weight.fill_(3.0)
        net[1].bias.fill_(2.0)
    weights = agd_parameters(net)
    assert [tuple(p.shape) for p in weights] == [(5, 4), (3, 5)]
    assert all(not p.requires_grad for p in net.parameters() if p.dim() == 1)
    reset_frozen_parameters(net)
    assert torch.equal(net[0].bias, torch.zeros(5)) and torch.equal(net[3].bias, torch.zeros(3))
    assert torch.equal(net[1].weight, torch.ones(5)) and torch.equal(net[1].bias, torch.zeros(5))
    # the frozen network computes what a network without biases and with BatchNorm(affine=False) computes
    plain = nn.Sequential(nn.Linear(4, 5, bias=False), nn.BatchNorm1d(5, affine=False), nn.ReLU(), nn.Linear(5, 3, bias=False))
    with torch.no_grad():
        plain[0].weight.copy_(net[0].weight)
        plain[3].weight.copy_(net[3].weight)
    x = torch.randn(6, 4)
    torch.testing.assert_close(net(x), plain(x))


def _agd_config(**kw) -> TrainConfig:
    base = dict(dataset="digits", model="mlp", width=0.1, per_class=40, optimizer="agd", weight_decay=0.0,
                schedule="none", batch_size=50, epochs=6, device="cpu", snapshot_per_class=2)
    base.update(kw)
    return TrainConfig(**base)


def test_training_with_agd_on_digits_lowers_the_loss():
    cfg = _agd_config()
    run = train(cfg, progress=False)
    losses = [r["train_loss"] for r in run.history]
    assert losses[-1] < 0.5 * losses[0] and losses == sorted(losses, reverse=True)
    assert run.final["train_accuracy"] > 0.8
    # the recorded lr is the epoch's mean automatic step size: positive and below log((1 + sqrt 5)/2) for G < 1 ...
    assert all(0 < r["lr"] < 1 for r in run.history)
    model = run.model()
    # ... the 1-D parameters stayed at the values of a network without them
    for name, p in model.named_parameters():
        if p.dim() == 1:
            expected = 1.0 if name.endswith("weight") else 0.0
            assert torch.equal(p, torch.full_like(p, expected)), name
    # the checkpoint holds AGD's state dict
    ckpt = torch.load(next((run.path / "checkpoints").iterdir()), weights_only=False)
    assert ckpt["optimizer"]["param_groups"][0]["gain"] == 1.0 and ckpt["scheduler"] == {}


def test_agd_init_is_applied_on_a_fresh_run_and_is_deterministic(monkeypatch):
    from nc_lib import train as T

    seen = []
    real = T._fresh_start

    def spy(model, opt):
        real(model, opt)
        W = [p.detach().clone() for p in model.parameters() if p.dim() >= 2]
        seen.append(W)

    monkeypatch.setattr(T, "_fresh_start", spy)
    cfg = _agd_config(epochs=1, model_kwargs={"depth": 2})
    train(cfg, progress=False)
    first = seen[-1][0]
    assert torch.allclose(torch.linalg.svdvals(first), torch.full((min(first.shape),), singular_value(first.shape)),
                          rtol=1e-5)
    train(cfg, progress=False, retrain=True)
    assert all(torch.equal(a, b) for a, b in zip(seen[0], seen[1]))


def test_agd_run_resumes_exactly(tmp_path, monkeypatch):
    cfg = _agd_config(epochs=5, measure_epochs=(1, 2, 4), augment=False, feature_decay=1e-3,
                      stratified_batches=True)
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "a"))
    full = train(cfg, progress=False)
    expected = (full.path / "metrics.jsonl").read_text()
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "b"))
    part = train(cfg, progress=False, stop_after_epochs=3)  # last checkpoint at epoch 2
    assert not part.finished and [r["epoch"] for r in part.history] == [1, 2]
    resumed = train(cfg, progress=False)
    assert resumed.finished and (resumed.path / "metrics.jsonl").read_text() == expected
    for (name, a), b in zip(full.model().state_dict().items(), resumed.model().state_dict().values()):
        assert torch.equal(a, b), name


def test_agd_with_a_conv_net_and_the_cosine_head():
    cfg = _agd_config(model="resnet18", width=0.0625, per_class=10, epochs=2, head="cosine", batch_size=50)
    run = train(cfg, progress=False)
    assert run.finished and math.isfinite(run.final["train_loss"])
    W, _ = run.model().head.classifier()
    assert torch.allclose(W.norm(dim=1), torch.ones(10), atol=1e-5)  # rows renormalised after every step


def test_bad_inputs_are_named():
    w = nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match="params"):
        AGD([w, nn.Parameter(torch.zeros(3))])
    for gain in (0.0, -1.0, float("inf"), float("nan"), "x"):
        with pytest.raises(ValueError, match="gain"):
            AGD([w], gain=gain)
    with pytest.raises(ValueError, match="gain"):
        AGD([{"params": [w], "gain": -2.0}])
    with pytest.raises(ValueError, match="singular|dim"):
        singular_value((5,))
    with pytest.raises(ValueError, match="weight_decay"):
        TrainConfig(optimizer="agd")  # the default weight decay 5e-4 does not apply to AGD
    with pytest.raises(ValueError, match="head_weight_decay"):
        TrainConfig(optimizer="agd", weight_decay=0, schedule="none", head_weight_decay=1e-4)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(optimizer="agd", weight_decay=0, schedule="step")
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(optimizer="agd", weight_decay=0, schedule="multistep", milestones=(3,))
    with pytest.raises(ValueError, match="agd_gain"):
        TrainConfig(optimizer="agd", weight_decay=0, schedule="none", agd_gain=0)
    with pytest.raises(ValueError, match="agd_gain"):
        TrainConfig(agd_gain=float("inf"))
    # a constant schedule is accepted: multistep without milestones never changes anything
    assert TrainConfig(optimizer="agd", weight_decay=0).optimizer == "agd"


def test_agd_gain_enters_the_hash_only_when_changed():
    a = _agd_config()
    assert a.config_hash() != _agd_config(agd_gain=0.5).config_hash()
    assert "agd_gain" in json.loads(json.dumps(a.to_dict()))
    assert TrainConfig.from_dict(_agd_config(agd_gain=0.5).to_dict()).agd_gain == 0.5
