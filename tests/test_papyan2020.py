"""Papyan, Han & Donoho 2020: the experiment grid, TPT onset, figure builders and Table 1."""
import json
import math

import pytest
import torch

from nc_lib.papers import papyan2020 as P
from nc_lib.config import PAPYAN_EPOCHS, PAPYAN_LRS, papyan_measure_epochs
from nc_lib.runs import RunResult, run_dir
from nc_lib.train import train


# ---------------------------------------------------------------------------------------------- grid
def test_paper_grid_has_the_21_runs_with_papyans_settings():
    g = P.grid("paper")
    assert len(g) == 21
    assert set(ds for ds, _ in g) == {"mnist", "fashionmnist", "cifar10", "cifar100", "svhn", "stl10", "imagenet"}
    for ds, nets in P.PAPER_NETWORKS.items():
        assert sorted(net for d, net in g if d == ds) == sorted(nets)
        assert sorted(P.family(n) for n in nets) == ["densenet", "resnet", "vgg"]
    assert [n for d, n in g if d == "cifar100"] == ["vgg13", "resnet50", "densenet250"]
    assert [n for d, n in g if d == "imagenet"] == ["vgg13", "resnet50", "densenet201"]
    for (ds, net), c in g.items():
        assert c.dataset == ds and c.model == net
        assert c.optimizer == "sgd" and c.momentum == 0.9 and c.batch_size == 128
        assert c.augment is False and c.random_labels is False and c.width == 1.0 and c.head == "linear"
        assert c.lr == P.DEFAULT_LR == 0.0679
        assert c.schedule == "multistep" and c.gamma == 0.1
        if ds == "imagenet":
            assert c.epochs == 300 and c.weight_decay == 1e-4 and c.milestones == (100, 200)
            assert c.per_class == 600 and c.model_kwargs.get("stem", "imagenet") == "imagenet"
            assert c.measure_epochs == papyan_measure_epochs(300)
        else:
            assert c.epochs == 350 and c.weight_decay == 5e-4 and c.milestones == (116, 233)
            assert c.measure_epochs == PAPYAN_EPOCHS and len(c.measure_epochs) == 50
    assert g[("mnist", "vgg11")].per_class == 5000
    assert g[("svhn", "resnet18")].per_class == 4600
    assert g[("cifar10", "vgg13")].per_class is None
    assert g[("mnist", "resnet18")].model_kwargs == {"stem": "cifar"}
    # one run directory per run
    assert len({c.config_hash() for c in g.values()}) == 21


def test_paper_grid_takes_swept_learning_rates_and_overrides():
    lr = PAPYAN_LRS[17]
    g = P.grid("paper", lrs={("cifar10", "resnet18"): lr}, datasets=["cifar10"], device="cpu")
    assert len(g) == 3
    assert g[("cifar10", "resnet18")].lr == lr and g[("cifar10", "vgg13")].lr == P.DEFAULT_LR
    assert all(c.device == "cpu" for c in g.values())


def test_quick_grid_is_papyans_protocol_on_fashion_mnist():
    g = P.grid("quick")
    assert list(g) == [("fashionmnist", "vgg11"), ("fashionmnist", "resnet18"), ("fashionmnist", "densenet40")]
    assert {P.family(n) for _, n in g} == {"vgg", "resnet", "densenet"}
    for c in g.values():
        assert c.epochs == P.QUICK_EPOCHS == 350 and c.milestones == (116, 233) and c.measure_epochs == PAPYAN_EPOCHS
        assert c.momentum == 0.9 and c.batch_size == 128 and c.augment is False and c.optimizer == "sgd"
        assert c.weight_decay == P.QUICK_WEIGHT_DECAY and (c.per_class, c.test_per_class) == (20, 50)
        assert c.snapshot_per_class > 0 and c.precise_bn is True and c.lr == 0.04
    assert all(c.precise_bn is True for c in P.grid("medium").values())  # 24 steps per epoch: running averages lag
    assert all(c.precise_bn is False for c in P.grid("paper").values())  # Papyan's running averages (469 steps/epoch)
    assert "batch-norm statistics recomputed" in P.scale_note("medium")
    short = P.grid("quick", epochs=6)
    assert len(short) == 3 and all(c.epochs == 6 and c.milestones == (2, 4) for c in short.values())
    assert all(c.measure_epochs == papyan_measure_epochs(6) for c in short.values())
    note = P.scale_note("quick")
    for fact in ("20 training and 50 test images per class", "VGG11 at width 1/8", "ResNet18 at width 1/4",
                 "weight decay 0.01 instead of 5e-4", "lr 0.04", "350 epochs",
                 "batch-norm statistics recomputed from the training set"):
        assert fact in note, fact


def test_bad_input_names_the_parameter():
    with pytest.raises(ValueError, match="scale"):
        P.grid("huge")
    with pytest.raises(ValueError, match="datasets"):
        P.grid("paper", datasets=["digits"])
    with pytest.raises(ValueError, match="fashionmnist"):
        P.grid("quick", datasets=["digits"])
    with pytest.raises(ValueError, match="fig2"):
        P.figure(_fake_results(), [])
    with pytest.raises(ValueError, match="family"):
        P.family("transformer")


# ---------------------------------------------------------------------------------------------- TPT onset
def test_terminal_phase_onset():
    h = [{"epoch": 1, "train_accuracy": 0.5}, {"epoch": 3, "train_accuracy": 0.997},
         {"epoch": 7, "train_accuracy": 1.0}, {"epoch": 9, "train_accuracy": 1.0}]
    assert P.terminal_phase_onset(h, "cifar10") == 7
    assert P.terminal_phase_onset(h, "imagenet") == 3  # 99.6% counts on ImageNet
    assert P.terminal_phase_onset(h[:2], "mnist") is None
    assert P.tpt_threshold("ImageNet") == 0.996 and P.tpt_threshold("svhn") == 1.0


# ---------------------------------------------------------------------------------------------- builders
def _history(epochs, onset, seed):
    g = torch.Generator().manual_seed(seed)
    recs = []
    for e in epochs:
        decay = math.exp(-e / 5)
        rec = {"epoch": e, "train_accuracy": 1.0 if e >= onset else 0.9, "test_accuracy": 0.8 + 0.01 * e / max(epochs)}
        for k in ("equinorm_means", "equinorm_classifiers", "equiangularity_means", "equiangularity_classifiers",
                  "max_angle_means", "max_angle_classifiers", "self_duality", "within_class_variability",
                  "ncc_mismatch_test"):
            rec[k] = decay * (1 + 0.1 * float(torch.rand(1, generator=g)))
        rec["train_error"] = 1 - rec["train_accuracy"]
        rec["test_error"] = 1 - rec["test_accuracy"]
        recs.append(rec)
    return recs


def _fake_results(tmp_path=None):
    """Fake runs on two datasets (the paper grid's MNIST and Fashion-MNIST rows, 12 epochs); DenseNet never
    reaches zero training error."""
    cfgs = P.grid("paper", epochs=12, datasets=["mnist", "fashionmnist"])
    onsets = {"vgg": 5, "resnet": 4, "densenet": 99}
    out = {}
    for i, ((ds, net), c) in enumerate(cfgs.items()):
        path = (tmp_path / f"{ds}-{net}") if tmp_path is not None else run_dir(c)
        if tmp_path is not None:
            path.mkdir()
            (path / P.ROBUSTNESS_FILE).write_text("".join(
                json.dumps({"epoch": e, "robustness": 0.1 * e}) + "\n" for e in (1, 6, 12)))
        out[(ds, net)] = RunResult(c, path, _history(c.measurement_epochs(), onsets[P.family(net)], i), True)
    return out


def _curves(fig, label):
    return [t for t in fig.data if t.name == label and t.x is not None and len(t.x) and t.x[0] is not None]


@pytest.mark.parametrize("fig_id", ["fig2", "fig3", "fig4", "fig5", "fig6", "fig7", "fig8"])
def test_figure_layout_panel_per_dataset_curve_per_network(fig_id, tmp_path):
    results = _fake_results(tmp_path)
    fig = P.figure(results, fig_id)
    rows = len(P.FIGURES[fig_id]["keys"])
    # a panel per (measurement, dataset): 2 datasets
    titles = [a.text for a in fig.layout.annotations if a.text]
    assert any(t.startswith("MNIST<") for t in titles) and any(t.startswith("FashionMNIST") for t in titles)
    xaxes = [k for k in fig.layout.to_plotly_json() if k.startswith("xaxis")]
    assert len(xaxes) == 2 * rows
    for label in ("VGG", "ResNet", "DenseNet"):
        assert len(_curves(fig, label)) == 2 * rows, (fig_id, label)
    # TPT onsets: dashed vertical lines at the onsets of the networks that reached zero train error
    xs = sorted({s.x0 for s in fig.layout.shapes})
    assert xs == [4, 5]
    assert len(fig.layout.shapes) == 2 * 2 * rows
    if fig_id == "fig6":
        assert fig.layout.yaxis.type == "log"
    if fig_id == "fig8":
        curve = _curves(fig, "VGG")[0]
        assert list(curve.x) == [1, 6, 12] and list(curve.y) == pytest.approx([0.1, 0.6, 1.2])


def test_figure_of_any_keys_and_rows(tmp_path):
    fig = P.figure(_fake_results(tmp_path), ["train_error", "test_error"], mark_tpt=False)
    assert len(_curves(fig, "ResNet")) == 4 and not fig.layout.shapes


def test_table1_rows(tmp_path):
    results = _fake_results(tmp_path)
    rows = P.table1(results)
    assert len(rows) == 6
    assert set(rows[0]) == {"dataset", "network", "tpt_onset_epoch", "test_accuracy_at_zero_train_error",
                            "last_epoch", "test_accuracy_at_last_epoch"}
    by = {(r["dataset"], r["network"]): r for r in rows}
    r = by[("MNIST", "VGG11")]
    hist = results[("mnist", "vgg11")].history
    assert r["tpt_onset_epoch"] == 5 and r["last_epoch"] == 12
    assert r["test_accuracy_at_zero_train_error"] == next(h["test_accuracy"] for h in hist if h["epoch"] == 5)
    assert r["test_accuracy_at_last_epoch"] == hist[-1]["test_accuracy"]
    nd = by[("FashionMNIST", "DenseNet250")]
    assert nd["tpt_onset_epoch"] is None and nd["test_accuracy_at_zero_train_error"] is None


def test_robustness_epochs():
    c = P.grid("quick", epochs=30)[("fashionmnist", "vgg11")]
    eps = c.measurement_epochs()
    assert P.robustness_epochs(c) == eps
    few = P.robustness_epochs(c, 4)
    assert len(few) == 4 and few[0] == eps[0] and few[-1] == 30 and set(few) <= set(eps)


# ---------------------------------------------------------------------------------------------- a real tiny run
def test_tiny_real_run_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "runs"))
    g = P.grid("quick", epochs=3, device="cpu")
    g = {k: c for k, c in g.items() if k[1] == "vgg11"}
    results = P.run_grid(g, progress=False, robustness_points=2, n_images=20)
    res = results[("fashionmnist", "vgg11")]
    assert res.finished and [r["epoch"] for r in res.history] == [1, 2, 3]
    rob = P.read_robustness(res)
    assert [r["epoch"] for r in rob] == [1, 3] and all(r["robustness"] > 0 for r in rob)
    # the run is loaded, not retrained; the robustness file is reused
    again = P.run_grid(g, progress=False, robustness_points=2, n_images=20)
    assert again[("fashionmnist", "vgg11")].history == res.history
    fig = P.figure(results, "fig8")
    assert len(_curves(fig, "VGG")) == 1
    anim = P.collapse_animation(res)
    assert len(anim.frames) == 3 and [f.name for f in anim.frames] == ["1", "2", "3"]
    rows = P.table1(results)
    assert rows[0]["last_epoch"] == 3 and 0 <= rows[0]["test_accuracy_at_last_epoch"] <= 1


def test_measure_robustness_from_kept_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "runs"))
    c = P.grid("quick", epochs=2, device="cpu")[("fashionmnist", "vgg11")]
    res = train(c.replace(keep_all_checkpoints=True), progress=False)
    assert P.read_robustness(res) == []
    recs = P.measure_robustness(res, n_images=10)
    assert [r["epoch"] for r in recs] == [1, 2]


def exec_last(block, ns):
    """Run a solution block and return the value of its last expression, as the notebook would show it."""
    import ast
    tree = ast.parse(block)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "<solution>", "exec"), ns)
    return None if last is None else eval(compile(ast.Expression(last.value), "<solution>", "eval"), ns)


def test_notebook_exercise_solutions_run(tmp_path, monkeypatch):
    """The solutions in the notebook's collapsed <details> block run and give what they say."""
    import re
    from pathlib import Path

    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "runs"))
    nb = json.loads((Path(__file__).parents[1] / "notebooks" / "03_terminal_phase.ipynb").read_text())
    text = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown" and "<details>" in "".join(c["source"]))
    blocks = [re.sub(r"^ {3}", "", b, flags=re.M) for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)]
    assert len(blocks) == 4
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    ns = {"papyan2020": P, "scale": "quick", "epochs": 2, "results": _fake_results(fake_dir)}
    out = exec_last(blocks[0], ns)
    assert list(ns["res0"]) == [("fashionmnist", "vgg11")]
    assert ns["res0"][("fashionmnist", "vgg11")].config.weight_decay == 0.0
    assert ns["res0"][("fashionmnist", "vgg11")].final["epoch"] == 2
    assert len(out) == 1 and out[0]["run"] == "vgg11" and out[0]["NC1 no wd"] > 0
    exec(blocks[1], ns)
    h = ns["h"]
    assert (P.terminal_phase_onset(h, "imagenet"), P.terminal_phase_onset(h, "cifar10")) == (2, None)
    exec(blocks[2], ns)
    assert ns["better"] + ns["worse"] <= len(ns["changes"]) == 4
    dense = {k: c for k, c in P.grid("quick", epochs=2).items() if k[1] == "densenet40"}
    ns["results"] = P.run_grid(dense, progress=False, robustness=False)
    rows, same_training = exec_last(blocks[3], ns)
    assert ns["res1"][("fashionmnist", "densenet40")].config.precise_bn is False
    assert [r["statistics"] for r in rows] == ["recomputed", "running averages"] and same_training is True
    # the same weights, other batch-norm statistics: the measurements differ
    new, old = ns["results"][("fashionmnist", "densenet40")], ns["res1"][("fashionmnist", "densenet40")]
    assert new.final["within_class_variability"] != old.final["within_class_variability"]


# ---------------------------------------------------------------------------------------------- fidelity checks
def _run(tmp_path, name, history, epochs=12):
    c = P.grid("quick", epochs=epochs)[("fashionmnist", name)]
    return RunResult(c, tmp_path / name, history, True)


def _tpt_history(epochs, onset, nc1_fall, rising=None):
    """Train accuracy 1 from ``onset``; NC1 falls by ``nc1_fall`` from the onset to the end; the measurement
    named ``rising`` ends above its onset value, every other one below."""
    recs = []
    for e in epochs:
        t = 0.0 if e <= onset else (e - onset) / (epochs[-1] - onset)
        rec = {"epoch": e, "train_accuracy": 1.0 if e >= onset else 0.8, "test_accuracy": 0.7 + 0.01 * t,
               "within_class_variability": 1.0 / nc1_fall ** t}
        for k in P.TPT_FALLING:
            rec[k] = (1 + t) if k == rising else 0.5 * (1 - 0.5 * t)
        recs.append(rec)
    return recs


def test_terminal_phase_report_and_fidelity(tmp_path):
    eps = list(range(1, 13))
    good = {("fashionmnist", "vgg11"): _run(tmp_path, "vgg11", _tpt_history(eps, 3, 20.0))}
    row, = P.terminal_phase_report(good)
    assert row["tpt_onset"] == 3 and row["last_epoch"] == 12 and row["epochs"] == 12
    assert row["nc1_at_onset"] == pytest.approx(1.0) and row["nc1_at_end"] == pytest.approx(1 / 20)
    assert row["nc1_fall"] == pytest.approx(20.0)
    assert row["test_accuracy_at_onset"] == pytest.approx(0.7) and row["test_accuracy_at_end"] == pytest.approx(0.71)
    assert P.fidelity_failures(good, "quick") == []
    # the same runs do not meet the medium scale's 100x
    fails = P.fidelity_failures(good, "medium")
    assert len(fails) == 1 and "NC1 fell 20x" in fails[0] and "100x" in fails[0]
    bad = {("fashionmnist", "vgg11"): _run(tmp_path, "vgg11", _tpt_history(eps, 7, 20.0)),
           ("fashionmnist", "resnet18"): _run(tmp_path, "resnet18", _tpt_history(eps, 2, 5.0, rising="self_duality")),
           ("fashionmnist", "densenet40"): _run(tmp_path, "densenet40", _tpt_history(eps, 99, 20.0))}
    fails = P.fidelity_failures(bad, "quick")
    assert any("vgg11: zero training error only at epoch 7" in f for f in fails)
    assert any("resnet18: NC1 fell 5x" in f for f in fails)
    assert any("resnet18: self_duality ended at" in f for f in fails)
    assert any("densenet40: never reached zero training error" in f for f in fails)
    assert len(fails) == 4
    with pytest.raises(ValueError, match="scale"):
        P.fidelity_failures(good, "huge")
