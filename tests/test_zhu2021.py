"""Zhu et al. 2021's deep-network experiments: fixed ETF head, feature decay, d = C ResNet18, grids."""
import math

import pytest
import torch

from nc_lib.data import load_train_test
from nc_lib.etf import equiangularity, equinorm, gram_distance_to_etf
from nc_lib.metrics import PAPER_NAMES
from nc_lib.models import build_model, count_parameters
from nc_lib.papers import zhu2021
from nc_lib.papers.zhu2021.grid import (MEDIUM_LBFGS_EPOCHS, MEDIUM_MEASURE_EVERY, MEDIUM_PER_CLASS,
                                       MEDIUM_RESNET50_WIDTH, MEDIUM_RL_PER_CLASS, MEDIUM_STEM)
from nc_lib.config import TrainConfig
from nc_lib.train import train


@pytest.fixture(autouse=True)
def _tmp_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("NC_FIGURES_DIR", str(tmp_path / "figures"))


# ---------------------------------------------------------------- the fixed ETF classifier
def test_fixed_head_rows_form_an_etf_and_get_no_gradient():
    C, d = 6, 20
    model = build_model("mlp", num_classes=C, input_shape=(12,), hidden=d, depth=2, head="fixed_etf")
    W, _ = model.head.classifier()
    assert W.shape == (C, d)
    assert torch.all(W[:, C:] == 0)  # the canonical ETF lives in the first C coordinates
    G = W.double() @ W.double().T
    assert torch.allclose(torch.diag(G), torch.ones(C, dtype=torch.float64), atol=1e-6)
    off = G[~torch.eye(C, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / (C - 1)), atol=1e-6)
    assert gram_distance_to_etf(W) < 1e-6 and equinorm(W) < 1e-6 and equiangularity(W) < 1e-6
    # frozen: not a parameter, no gradient, unchanged by a training step
    names = [n for n, p in model.head.named_parameters()]
    assert names == ["bias"]
    before = model.head.weight.clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(32, 12), torch.randint(0, C, (32,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert model.head.weight.grad is None and not model.head.weight.requires_grad
    assert model.head.bias.grad is not None
    opt.step()
    assert torch.equal(model.head.weight, before)
    # the Zhu NC2 on this classifier is zero
    from nc_lib.metrics import measure_collapse

    feats = torch.randn(60, d)
    labels = torch.arange(C).repeat(10)
    res = measure_collapse(feats, labels, C, W=W, b=model.head.bias.detach())
    assert res[PAPER_NAMES["zhu2021"]["NC2"]] < 1e-6


# ---------------------------------------------------------------- feature decay
def test_feature_decay_adds_exactly_lambda_h_to_the_feature_gradient():
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=4, input_shape=(10,), hidden=16, depth=2)
    x, y = torch.randn(24, 10), torch.randint(0, 4, (24,))
    lam = 0.3

    def grad_h(decay: float) -> tuple[torch.Tensor, torch.Tensor]:
        h = model.body(x).detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model.head(h), y)
        if decay:
            loss = loss + 0.5 * decay * h.pow(2).sum(1).mean()
        (g,) = torch.autograd.grad(loss, h)
        return g, h.detach()

    g0, h = grad_h(0.0)
    g1, _ = grad_h(lam)
    # per-sample objective CE_i + lam/2 ||h_i||^2: its gradient changes by lam h_i (the batch mean gives 1/B)
    assert torch.allclose((g1 - g0) * len(x), lam * h, atol=1e-6)
    assert (g1 - g0).abs().max() > 1e-3

    # zhu2021.training_loss (the engine's formula) gives the same change on h = body(x)
    grads = []
    for decay in (0.0, lam):
        model.zero_grad()
        loss, hh = zhu2021.training_loss(model, x, y, decay)
        hh.retain_grad()
        loss.backward()
        grads.append(hh.grad.clone())
    assert torch.allclose(grads[1] - grads[0], lam * hh.detach() / len(x), atol=1e-6)

    # the trap: the authors penalised normalised features, whose norm is 1 -> zero gradient
    hn = h.clone().requires_grad_(True)
    pen = 0.5 * lam * torch.nn.functional.normalize(hn, dim=1).pow(2).sum(1).mean()
    (g_trap,) = torch.autograd.grad(pen, hn)
    assert g_trap.abs().max() < 1e-7


def test_engine_step_with_feature_decay_matches_hand_computed_update():
    """One full-batch SGD step of the engine (momentum 0, no weight decay) equals
    p - lr * grad(CE + lambda_H/2 mean ||h||^2) computed here."""
    lam, lr = 0.5, 0.1
    tr, _ = load_train_test("digits")
    cfg = TrainConfig(dataset="digits", model="mlp", model_kwargs={"hidden": 32, "depth": 2}, optimizer="sgd",
                      lr=lr, momentum=0.0, weight_decay=0.0, feature_decay=lam, batch_size=len(tr), epochs=1,
                      schedule="none", device="cpu", snapshot_per_class=0, seed=3)
    run = train(cfg, progress=False)
    run0 = train(cfg.replace(feature_decay=0.0), progress=False)
    trained, trained0 = run.model().state_dict(), run0.model().state_dict()

    torch.manual_seed(cfg.seed)
    model = build_model("mlp", num_classes=10, input_shape=tr.input_shape, hidden=32, depth=2)
    model.train()
    x, y = tr.get_batch(torch.arange(len(tr)))
    loss, _ = zhu2021.training_loss(model, x, y, lam)
    loss.backward()
    diff_from_no_decay = 0.0
    for name, p in model.named_parameters():
        expected = p.detach() - lr * p.grad
        assert torch.allclose(trained[name], expected, atol=2e-5), name
        diff_from_no_decay = max(diff_from_no_decay, float((trained[name] - trained0[name]).abs().max()))
    assert diff_from_no_decay > 1e-4  # the decay really changed the step


# ---------------------------------------------------------------- d = C parameter count
def test_resnet18_d_equals_C_parameter_count_by_hand():
    C = 10
    conv = lambda cin, cout, k: cin * cout * k * k  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    stem = conv(3, 64, 3) + bn(64)                                           # 1,728 + 128
    layer1 = 2 * (2 * (conv(64, 64, 3) + bn(64)))                              # 147,968
    def stage(cin, c):  # first block with a strided 1x1 shortcut, second plain
        b1 = conv(cin, c, 3) + bn(c) + conv(c, c, 3) + bn(c) + conv(cin, c, 1) + bn(c)
        b2 = 2 * (conv(c, c, 3) + bn(c))
        return b1, b2
    l2 = sum(stage(64, 128))                                                  # 525,568
    l3 = sum(stage(128, 256))                                                 # 2,099,712
    l4_b1, l4_b2 = stage(256, 512)
    # d = C: the last block's second conv outputs C channels, with a 1x1-conv shortcut to C
    l4_b2_dC = conv(512, 512, 3) + bn(512) + conv(512, C, 3) + bn(C) + conv(512, C, 1) + bn(C)  # 2,411,560
    head_512, head_C = 512 * C + C, C * C + C
    full = stem + layer1 + l2 + l3 + l4_b1 + l4_b2 + head_512
    narrow = stem + layer1 + l2 + l3 + l4_b1 + l4_b2_dC + head_C
    assert full == 11_173_962 and narrow == 8_859_862  # the paper: 11.17M -> 8.87M (-20.7%)
    m512 = build_model("resnet18", num_classes=C, in_channels=3, stem="cifar")
    mC = build_model("resnet18", num_classes=C, in_channels=3, stem="cifar", feature_dim=C)
    assert count_parameters(m512) == full
    assert count_parameters(mC) == narrow and mC.feature_dim == C
    # fixed ETF head: only its C biases are trained
    mCf = build_model("resnet18", num_classes=C, in_channels=3, stem="cifar", feature_dim=C, head="fixed_etf")
    assert count_parameters(mCf) == narrow - C * C
    assert math.isclose(1 - narrow / full, 0.207, abs_tol=0.001)


# ---------------------------------------------------------------- grids
def test_paper_grid_has_the_papers_settings():
    g = zhu2021.grid("paper")
    assert set(g) == set(zhu2021.EXPERIMENTS)
    sgd, adam, lbfgs = g["fig3"]["SGD"], g["fig3"]["Adam"], g["fig3"]["LBFGS"]
    for c in (sgd, adam, lbfgs):
        assert c.dataset == "cifar10" and c.model == "resnet18" and c.model_kwargs["stem"] == "imagenet"
        assert c.epochs == 200 and c.weight_decay == 5e-4 and not c.augment and c.head == "linear"
    assert (sgd.optimizer, sgd.lr, sgd.momentum, sgd.batch_size) == ("sgd", 0.05, 0.9, 128)
    assert (sgd.schedule, sgd.step_size, sgd.gamma) == ("step", 40, 0.1)
    assert (adam.optimizer, adam.lr, adam.schedule, adam.step_size) == ("adam", 1e-3, "step", 40)
    assert 64 <= adam.batch_size <= 128
    assert (lbfgs.optimizer, lbfgs.lr, lbfgs.lbfgs_history, lbfgs.batch_size) == ("lbfgs", 0.1, 10, 2048)
    assert g["fig3_mnist"]["Adam"].lr == 1e-4 and g["fig3_mnist"]["SGD"].dataset == "mnist"
    for c in g["fig4"].values():
        assert c.random_labels and c.dataset == "cifar10"
        assert (c.optimizer, c.lr, c.batch_size, c.weight_decay) == ("sgd", 0.01, 64, 1e-4)
    models = {c.model for c in g["fig4"].values()}
    assert models == {"mlp", "resnet18"}
    assert len({c.width for c in g["fig4"].values() if c.model == "resnet18"}) >= 3
    assert len({c.model_kwargs["depth"] for c in g["fig4"].values() if c.model == "mlp"}) >= 3
    net, feat = g["fig5"]["weight decay on the network"], g["fig5"]["weight decay on the features"]
    assert net.weight_decay == 5e-4 and net.feature_decay == 0
    assert feat.weight_decay == 0 and feat.feature_decay > 0 and feat.head_weight_decay == 5e-4
    f6 = g["fig6"]
    assert [c.head for c in f6.values()] == ["linear", "fixed_etf", "linear", "fixed_etf"]
    assert [c.feature_dim for c in f6.values()] == [512, 512, 10, 10]
    for c in f6.values():
        assert c.model == "resnet18" and c.model_kwargs["stem"] == "cifar" and c.augment and c.epochs == 200
        assert (c.optimizer, c.lr, c.momentum, c.weight_decay, c.batch_size) == ("sgd", 0.05, 0.9, 5e-4, 128)
    assert [c.feature_dim for c in g["fig6_resnet50"].values()] == [2048, 2048, 10, 10]
    assert {c.model for c in g["fig6_resnet50"].values()} == {"resnet50"}


def test_quick_grid_is_fashion_mnist_on_conv_nets_and_small():
    g = zhu2021.grid("quick")
    assert set(g) == set(zhu2021.EXPERIMENTS)
    for exp, configs in g.items():
        for c in configs.values():
            assert c.dataset == "fashionmnist" and c.epochs <= 30 and c.device == "cpu", exp
            assert c.per_class is not None and c.per_class <= 100, exp
    assert all(c.random_labels for c in g["fig4"].values())
    assert {c.model for c in g["fig4"].values()} == {"mlp", "resnet18"}
    # the paper's convolutional networks where the paper uses them
    for exp in ("fig3", "fig3_mnist", "fig5", "fig6"):
        assert {c.model for c in g[exp].values()} == {"resnet18"}, exp
    assert {c.model for c in g["fig6_resnet50"].values()} == {"resnet50"}
    assert [c.feature_dim for c in g["fig6"].values()] == [512, 512, 10, 10]
    assert [c.feature_dim for c in g["fig6_resnet50"].values()] == [2048, 2048, 10, 10]
    assert g["fig5"]["weight decay on the features"].feature_decay > 0
    # Fashion-MNIST stands for CIFAR10 and MNIST: only Adam's lr tells fig3 and fig3_mnist apart
    assert g["fig3"]["SGD"] == g["fig3_mnist"]["SGD"] and g["fig3"]["Adam"].lr != g["fig3_mnist"]["Adam"].lr
    for exp in zhu2021.EXPERIMENTS + ("table1",):
        for scale in ("quick", "medium", "paper"):
            assert zhu2021.note(exp, scale)
    note = zhu2021.note("fig6", "quick")
    for fact in (f"{g['fig6']['fixed W, d = C'].per_class} training", f"{g['fig6']['fixed W, d = C'].epochs} epochs",
                 "width 0.125", "lr 0.05"):
        assert fact in note, fact


def test_medium_grid_is_the_papers_protocol_on_fashion_mnist():
    """medium = paper with only the declared sizes changed: dataset, per-class count, widths, stem, measurement
    epochs and LBFGS's epochs; every note names each of them."""
    paper, medium = zhu2021.grid("paper", amp=False), zhu2021.grid("medium")  # the paper grid in float32, as medium
    assert set(medium) == set(paper)
    for exp in paper:
        assert len(medium[exp]) == len(paper[exp]), exp
        for p, m in zip(paper[exp].values(), medium[exp].values()):
            assert m.dataset == "fashionmnist"
            assert m.per_class == (MEDIUM_RL_PER_CLASS if p.random_labels else MEDIUM_PER_CLASS) < 6000
            same = {k: v for k, v in p.to_dict().items()
                    if k not in ("dataset", "per_class", "width", "model_kwargs", "tag", "epochs", "measure_epochs",
                                 "augment", "precise_bn")}
            assert {k: m.to_dict()[k] for k in same} == same, (exp, p.model)
            # LBFGS's line search pollutes batch norm's running averages: recomputed before each measurement
            assert m.precise_bn is (p.optimizer == "lbfgs") and p.precise_bn is False
            assert m.epochs == (MEDIUM_LBFGS_EPOCHS if p.optimizer == "lbfgs" else 200)
            assert m.measure_epochs[0] == MEDIUM_MEASURE_EVERY and m.measurement_epochs()[-1] == m.epochs
            assert m.feature_dim == p.feature_dim and m.augment is False
            if p.model == "mlp":
                assert m.model_kwargs["hidden"] < p.model_kwargs["hidden"]
                assert m.model_kwargs["depth"] == p.model_kwargs["depth"]
            else:
                assert m.width < p.width and m.model_kwargs == {**p.model_kwargs, "stem": MEDIUM_STEM}
    for exp in zhu2021.EXPERIMENTS + ("table1",):
        note = zhu2021.note(exp, "medium")
        assert "Fashion-MNIST" in note and "200 epochs" in note and "ImageNet stem" in note, exp
        assert ("batch-norm statistics recomputed" in note) is (exp in ("fig3", "fig3_mnist")), exp
        assert f"measured every {MEDIUM_MEASURE_EVERY} epochs" in note, exp
    assert f"LBFGS {MEDIUM_LBFGS_EPOCHS} epochs" in zhu2021.note("fig3", "medium")
    assert "no augmentation" in zhu2021.note("fig6", "medium") and "augmentation" not in zhu2021.note("fig5", "medium")
    assert f"ResNet50 at width x{MEDIUM_RESNET50_WIDTH:g}" in zhu2021.note("fig6_resnet50", "medium")
    assert f"{MEDIUM_RL_PER_CLASS} images per class" in zhu2021.note("fig4", "medium")


def test_bad_inputs_name_the_parameter():
    with pytest.raises(ValueError, match=r"scale.*'quick', 'medium', 'paper'"):
        zhu2021.grid("huge")
    with pytest.raises(ValueError, match=r"'quick', 'medium', 'paper'"):
        zhu2021.note("fig6", "huge")
    with pytest.raises(ValueError, match="experiment"):
        zhu2021.run_experiment("fig9")
    with pytest.raises(ValueError, match="results"):
        zhu2021.figure({})


# ---------------------------------------------------------------- figures and memory
def test_figure_has_six_panels_and_a_curve_per_variant():
    recs = [{"epoch": e, "within_class_variability": 1 / e, "classifier_etf_distance": 0.5 / e,
             "means_etf_distance": 0.4 / e, "classifier_means_alignment": 0.3 / e, "bias_offset_norm": 0.1,
             "train_accuracy": 1 - 1 / (e + 1), "test_accuracy": 0.9} for e in range(1, 6)]
    fig = zhu2021.figure({"a": recs, "b": recs})
    assert len(fig.data) == 12 and len(fig.layout.annotations) == 6
    titles = [a.text for a in fig.layout.annotations]
    assert titles[0].startswith("NC1") and titles[1].startswith("NC2") and "test" in titles[5]
    fig6 = zhu2021.figure_fig6({"a": recs})
    assert "means" in fig6.layout.annotations[1].text


def test_state_bytes_and_memory_measurement_show_the_d_equals_C_saving():
    torch.set_num_threads(1)
    cfg = TrainConfig(dataset="digits", model="mlp", model_kwargs={"hidden": 512, "depth": 2}, feature_dim=512,
                      optimizer="sgd", momentum=0.9, batch_size=128, device="cpu")
    wide = zhu2021.measure_training_memory_inprocess(cfg, steps=2)
    n = wide["trainable_parameters"]
    assert wide["param_bytes"] == 4 * n and wide["grad_bytes"] == 4 * n and wide["optimizer_state_bytes"] == 4 * n
    assert wide["device"] == "cpu"
    # fresh processes (the way table1 measures): a real, measured difference between d = 512 and d = C
    cfg = cfg.replace(model_kwargs={"hidden": 1024, "depth": 2})
    wide = zhu2021.measure_training_memory(cfg, steps=2)
    narrow = zhu2021.measure_training_memory(cfg.replace(feature_dim=10, head="fixed_etf"), steps=2)
    assert narrow["trainable_parameters"] < wide["trainable_parameters"]
    assert narrow["param_grad_state_bytes"] < wide["param_grad_state_bytes"]
    saved = wide["param_grad_state_bytes"] - narrow["param_grad_state_bytes"]
    assert wide["peak_bytes"] - narrow["peak_bytes"] > 0.5 * saved > 0
    rows = zhu2021.table1({"w": cfg, "n": cfg.replace(feature_dim=10)}, memory={"w": wide, "n": narrow})
    assert rows[1]["parameter saving vs first"] > 0.3
    assert "20%" in zhu2021.compare_with_paper(rows)


def test_medium_report_on_an_empty_store_lists_every_experiment_as_not_run(tmp_path, monkeypatch):
    """tools/medium_report.py only reads the store: with no finished medium run it trains nothing and says so."""
    import importlib.util
    from pathlib import Path
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "runs"))
    spec = importlib.util.spec_from_file_location("medium_report", Path(__file__).parents[1] / "tools" / "medium_report.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    zhu = "\n".join(tool.zhu_report(tmp_path))
    for exp in zhu2021.EXPERIMENTS:
        assert f"- {exp} (0 of " in zhu, exp
    markou = "\n".join(tool.markou_report(tmp_path))
    assert "- cifar10_resnet18 (0 of 6 runs finished)" in markou
    with pytest.raises(SystemExit, match="no finished medium run"):
        tool.papyan_report(tmp_path)
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "runs").exists()
    # rewriting a committed report keeps its hand-written section
    (tmp_path / "zhu2021_medium.md").write_text("# old\n\nold table\n\n## What it shows\n\nwritten by hand\n")
    monkeypatch.setattr("sys.argv", ["medium_report.py", "--paper", "zhu2021", "--out", str(tmp_path)])
    tool.main()
    text = (tmp_path / "zhu2021_medium.md").read_text()
    assert "old table" not in text and text.endswith("## What it shows\n\nwritten by hand\n")
    assert "- fig3 (0 of 3 runs finished)" in text
