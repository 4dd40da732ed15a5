"""Markou 2024 reproduction: grids carry the paper's settings; builders make the expected panels on tiny runs."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from nc_lib.figures import CATALOGUE
from nc_lib.papers import markou2024 as mk

mkg = importlib.import_module("nc_lib.papers.markou2024.grid")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _tmp_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("NC_FIGURES_DIR", str(tmp_path / "figures"))


def tiny(**kw):
    base = dict(name="tiny", num_classes=4, feature_dim=6, n_per_class=3, iterations=12, seeds=(0, 1), measure_every=4,
                methods=mk.METHODS)
    base.update(kw)
    return mk.UFMSetting(**base)


def test_ufm_grid_paper_settings():
    g = mk.ufm_grid("paper")
    assert [s.num_classes for s in g.values()] == [10, 100, 200, 1000]
    for s in g.values():
        assert s.iterations == 2000
        assert s.feature_dim >= s.num_classes
        assert len(s.seeds) == 5
        assert s.tau == 5.0
    assert g["ufm10"].feature_dim == 512
    assert set(g["ufm10"].methods) == set(mk.METHODS)
    q = mk.ufm_grid("quick")
    assert list(q) == list(g)
    assert all(s.feature_dim >= s.num_classes for s in q.values())


def test_real_grid_paper_settings():
    g = mk.real_grid("paper")
    pairs = {(e["dataset"], e["model"]) for e in g.values()}
    assert {("cifar10", "resnet18"), ("cifar100", "resnet50"), ("imagenet", "resnet50"), ("cifar10", "vgg13")} <= pairs
    assert any(e["dataset"] == "stl10" for e in g.values())
    for e in g.values():
        assert e["epochs"] == 200 and e["config"]["batch_size"] == 256
        assert e["report_epochs"] == (50, 200)
        assert len(e["seeds"]) == 5
        cfg = mk.train_config(e, "implicit_etf", 0)
        assert cfg.head == "implicit_etf" and cfg.epochs == 200
        assert cfg.optimizer == "agd" and cfg.weight_decay == 0 and cfg.stratified_batches  # the released scripts
        if e["model"].startswith("resnet"):
            assert cfg.model_kwargs["stem"] == ("imagenet" if e["dataset"] == "imagenet" else "cifar")
    sgd = mk.train_config(mk.real_grid("paper", optimizer="sgd")["fig4"], "standard", 0)
    assert sgd.optimizer == "sgd" and sgd.milestones == (100, 150) and sgd.stratified_batches
    with pytest.raises(ValueError, match="optimizer"):
        mk.real_grid("paper", optimizer="adam")
    q = mk.real_grid("quick")
    assert set(q) == set(g)
    for key, e in q.items():
        assert e["dataset"] == "fashionmnist" and e["model"] == g[key]["model"]  # the paper's networks, narrow
        assert e["config"]["width"] < 1 and e["per_class"] <= 100 and e["epochs"] <= 12
        assert e["report_epochs"][1] == e["epochs"] and e["report_epochs"][0] * 4 == e["epochs"]
        assert e["config"]["test_per_class"] == mk.QUICK_TEST_PER_CLASS
        note = mk.real_note(e)
        assert "Fashion-MNIST" in note and f"{e['per_class']} training and {mk.QUICK_TEST_PER_CLASS} test images per class" in note
    # Fashion-MNIST has 10 classes: the CIFAR100 ResNet50 stand-in is the ImageNet one (the same runs)
    assert mk.grid("quick")["cifar100_resnet50"] == mk.grid("quick")["fig4"]


def test_real_grid_medium_is_the_papers_protocol_on_fashion_mnist():
    paper, medium = mk.grid("paper", amp=False), mk.grid("medium")  # float32 both
    assert set(medium) == set(paper)
    for key in paper:
        labels = [f"{m} seed {s}" for m in mk.MAIN_METHODS for s in mkg.MEDIUM_SEEDS]
        assert list(medium[key]) == labels  # the paper's methods, fewer seeds
        for label, m in medium[key].items():
            p = paper[key][label]
            assert m.dataset == "fashionmnist" and m.per_class is not None and m.width < p.width
            same = {k: v for k, v in p.to_dict().items()
                    if k not in ("dataset", "per_class", "width", "model_kwargs", "augment")}
            assert {k: m.to_dict()[k] for k in same} == same, key  # epochs, batch, AGD, stratified
            assert p.augment and not m.augment
            assert m.model_kwargs == {**p.model_kwargs, **({"stem": mkg.MEDIUM_STEM} if "stem" in p.model_kwargs else {})}
    assert medium["cifar100_resnet50"] == medium["fig4"]  # one stem: the same runs, as at quick
    entries = mk.real_grid("medium")
    for e in entries.values():
        note = mk.real_note(e)
        assert f"{len(mkg.MEDIUM_SEEDS)} seeds instead of 5" in note and f"width {e['config']['width']:g}" in note
        assert "no augmentation" in note
    assert entries["stl10"]["per_class"] < entries["cifar10_resnet18"]["per_class"]  # the small-data setting
    assert all(e["report_epochs"] == (50, 200) for e in entries.values())
    assert "Medium" in mk.real_note(entries["fig4"]) and "AGD" in mk.real_note(entries["fig4"])
    # the UFM grid at medium: the paper's, UFM-1000 with one seed
    um, up = mk.ufm_grid("medium"), mk.ufm_grid("paper")
    for name in up:
        assert um[name].iterations == up[name].iterations
        assert (um[name].feature_dim, um[name].n_per_class, um[name].methods) == \
               (up[name].feature_dim, up[name].n_per_class, up[name].methods)
    assert len(um["ufm1000"].seeds) == 1 and all(len(um[n].seeds) == 5 for n in ("ufm10", "ufm100", "ufm200"))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"scale.*'quick', 'medium', 'paper'"):
        mk.ufm_grid("huge")
    with pytest.raises(ValueError, match=r"'quick', 'medium', 'paper'"):
        mk.real_grid("huge")
    with pytest.raises(ValueError, match="feature_dim"):
        tiny(feature_dim=3)
    with pytest.raises(ValueError, match="method"):
        mk.run_ufm(tiny(), "bogus", 0)
    with pytest.raises(ValueError, match="method"):
        mk.make_head("bogus", 8, 4)


def test_heads_per_method():
    from nc_lib.heads import CosineHead, ImplicitETFHead, LinearHead
    assert isinstance(mk.make_head("standard", 8, 4), CosineHead)
    assert isinstance(mk.make_head("standard_nonorm", 8, 4), LinearHead)
    assert mk.make_head("implicit_etf_nograd", 8, 4).backprop_through_node is False
    assert mk.make_head("implicit_etf", 8, 4).backprop_through_node is True
    assert isinstance(mk.make_head("implicit_etf_riemannian", 8, 4), ImplicitETFHead)
    from nc_lib.models import HEADS
    assert "implicit_etf_nograd" in HEADS


def test_run_ufm_records_and_cache():
    s = tiny()
    r = mk.run_ufm(s, "implicit_etf", 0)
    steps = [rec["step"] for rec in r["records"]]
    assert steps == [1, 2, 3, 4, 8, 12]  # the implicit head's classifier exists after its first step; dense early
    for k in ("loss", "accuracy", "within_class_variability", "classifier_means_alignment", "wh_equinorm",
              "average_cosine_margin"):
        assert np.isfinite(r["records"][-1][k])
    assert len(r["pcm"]) == 12 and np.all(np.diff(r["pcm"]) >= 0)
    assert r["device"] == "cpu"
    again = mk.run_ufm(s, "implicit_etf", 0)  # loaded from the cache
    assert again["records"] == r["records"]


def test_run_ufm_is_the_ufm_engine_with_per_sample_steps():
    s = tiny(num_classes=4, feature_dim=8, n_per_class=3, iterations=5, seeds=(0,), measure_every=5)
    cfg = mk.ufm_config(s, "standard_nonorm", 0)
    N = 12
    assert cfg.lr_H == pytest.approx(s.lr * N) and cfg.lambda_H == pytest.approx(s.lambda_H / N)
    assert cfg.measurement_tau is None and mk.ufm_config(s, "standard", 0).measurement_tau == s.tau
    from nc_lib.ufm import train_ufm
    h = train_ufm(cfg, steps=5, measure_every=5, progress=False)
    r = mk.run_ufm(s, "standard_nonorm", 0, cache=False)
    assert r["records"][-1]["loss"] == pytest.approx(h.records[-1]["loss"], rel=1e-6)


def test_implicit_head_aligns_classifier_faster_than_learned():
    s = tiny(num_classes=5, feature_dim=16, n_per_class=6, iterations=60, seeds=(0,), measure_every=20,
             methods=("standard", "implicit_etf"))
    res = mk.run_ufm_grid({"t": s}, progress=False)["t"]
    nc3 = {m: next(r for r in res[m][0]["records"] if r["step"] == 20)["classifier_means_alignment"] for m in res}
    assert nc3["implicit_etf"] < nc3["standard"]


def _panel_titles(fig):
    return [a.text for a in fig.layout.annotations]


def test_figure_panels_and_fig3():
    s = tiny()
    res = mk.run_ufm_grid({"ufm4": s}, progress=False)
    fig = mk.figure_panels(res["ufm4"], methods=mk.MAIN_METHODS)
    titles = _panel_titles(fig)
    for t in mk.PANELS.values():
        assert t in titles
    names = {tr.name for tr in fig.data if tr.name}
    assert {mk.LABELS[m] for m in mk.MAIN_METHODS} <= names
    assert any(tr.fill == "toself" for tr in fig.data)  # range over seeds
    fig_acc = mk.figure_panels(res["ufm4"], extra_keys=("accuracy", "accuracy_test") if False else ("accuracy",))
    assert "train top-1" in _panel_titles(fig_acc)
    res2 = {"ufm4": res["ufm4"], "ufm5": mk.run_ufm_grid({"ufm5": tiny(name="u5", num_classes=5)}, progress=False)["ufm5"]}
    f3 = mk.figure_accuracy_vs_classes(res2)
    assert _panel_titles(f3) == ["UFM-4", "UFM-5"]


def test_schematic_has_boxes_and_two_gradient_paths():
    fig = mk.figure_schematic()
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    assert len(rects) >= 5
    text = " ".join(a.text or "" for a in fig.layout.annotations)
    assert "nearest-ETF node" in text and "direct path" in text and "through the node" in text


def test_cost_memory_and_tables():
    cost = mk.measure_cost(4, 8, methods=("standard", "implicit_etf", "implicit_etf_riemannian"), steps=2, warmup=1,
                           batch_size=8)
    assert all(len(v["forward_s"]) == 2 and min(v["backward_s"]) > 0 for v in cost.values())
    fig = mk.figure_cost(cost)
    assert _panel_titles(fig)[:2] == ["(a) forward time per step", "(b) forward and backward time"]
    assert any("mean" in (tr.text[0] if tr.text else "") for tr in fig.data if tr.type == "scatter")
    assert len(mk.figure_cost_settings({"a": cost}).data) == 2
    mem = mk.measure_memory(10, 64, methods=("implicit_etf", "implicit_etf_nograd"), batch_size=32)
    assert mem["implicit_etf"]["head_saved_bytes"] > mem["implicit_etf_nograd"]["head_saved_bytes"]
    mem_u = mk.measure_memory(4, 8, methods=("standard",), ufm_n=3)
    assert mem_u["standard"]["saved_bytes"] > 0
    rows = mk.memory_table({"x": mem})
    assert len(rows) == 2 and rows[0]["saved for backward (MiB)"] > 0


def test_accuracy_table_median_range():
    recs = lambda a, b: [{"step": 6, "accuracy": a, "accuracy_test": a}, {"step": 24, "accuracy": b, "accuracy_test": b}]
    res = {"x": {"standard": [{"records": recs(0.5, 0.9)}, {"records": recs(0.7, 1.0)}, {"records": recs(0.6, 0.8)}]}}
    grid = {"x": {"stands_for": "CIFAR10 ResNet18", "dataset": "digits", "model": "mlp", "report_epochs": (6, 24)}}
    rows = mk.accuracy_table(res, grid)
    assert rows[0]["epoch 6"] == "60.00 [50.00, 70.00]"
    assert rows[0]["epoch 24"] == "90.00 [80.00, 100.00]"


def test_solver_converges_to_closed_form():
    conv = mk.solver_convergence(5, 8, delta=1e-3, max_iter=12)
    assert conv["dist"][-1] < 1e-8 < conv["dist"][0]
    assert conv["singular_values_delta0"][-1] < 1e-12
    assert conv["singular_values"][-1] == pytest.approx(5e-4, rel=0.2)
    assert len(mk.figure_solver_convergence(conv).data) == 4


def test_catalogue_ids_owned_by_notebook_are_saved_in_it():
    owned = [k for k, v in CATALOGUE.items() if v["paper"] == "markou2024"]
    import json
    cells = json.loads((ROOT / "notebooks" / "05_nearest_etf.ipynb").read_text())["cells"]
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    for fid in owned:
        key = fid.replace("markou2024_appendix_", "")
        built = "markou2024_appendix_{" in text and f'"{key}"' in text
        assert f'"{fid}"' in text or built, fid


def test_exercise_solution():
    spec = importlib.util.spec_from_file_location("sol05", ROOT / "notebooks" / "solutions" / "05_nearest_etf.py")
    sol = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sol)
    early, late = sol.node_gradient_share(warm_steps=1), sol.node_gradient_share(warm_steps=100)
    assert 0 < late < early
