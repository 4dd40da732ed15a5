"""Tests of nc_lib.plots (animation, metric curves, live figure, diagram) and nc_lib.widgets (UFM explorer)."""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from nc_lib import plots
from nc_lib.ufm import UFMConfig, train_ufm


@pytest.fixture(autouse=True)
def one_thread(tmp_path, monkeypatch):
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("NC_FIGURES_DIR", str(tmp_path / "figures"))
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "runs"))
    yield
    torch.set_num_threads(saved)


def run(C: int, d: int = 8, steps: int = 300, every: int = 20, **kw):
    cfg = UFMConfig(num_classes=C, n_per_class=6, feature_dim=d, init_scale=0.5, **kw)
    return train_ufm(cfg, steps=steps, measure_every=every, progress=False)


@pytest.fixture(scope="module")
def run3():
    torch.set_num_threads(1)
    return train_ufm(UFMConfig(num_classes=3, n_per_class=6, feature_dim=8, init_scale=0.5), 300, 20, progress=False)


# --------------------------------------------------------------------------- animation
def test_animation_structure_2d(run3):
    fig = plots.collapse_animation(run3)
    assert len(fig.frames) == len(run3.snapshots) == 16
    # ETF edges (static) + features, means, classifier segments, classifier tips, heatmap
    assert len(fig.data) == 6
    assert isinstance(fig.data[0], go.Scatter) and fig.data[0].name.startswith("simplex ETF")
    assert isinstance(fig.data[-1], go.Heatmap)
    assert all(len(f.data) == 5 and list(f.traces) == [1, 2, 3, 4, 5] for f in fig.frames)
    slider = fig.layout.sliders[0]
    assert len(slider.steps) == len(fig.frames)
    assert [s.label for s in slider.steps] == [str(s["step"]) for s in run3.snapshots]
    labels = [b.label for b in fig.layout.updatemenus[0].buttons]
    assert any("play" in x for x in labels) and any("pause" in x for x in labels)
    # the last frame has collapsed: means on the unit ETF (their projected norms are 1 and
    # the cosine Gram is the ETF Gram)
    last = fig.frames[-1]
    means = np.stack([last.data[1].x, last.data[1].y], 1)
    assert np.allclose(np.linalg.norm(means, axis=1), 1.0, atol=1e-2)
    G = np.array(last.data[4].z)
    assert np.allclose(G, 1.5 * np.eye(3) - 0.5, atol=1e-2)
    # ETF target edges: 3 edges, unit vertices, lined up with the final means
    edges = np.stack([fig.data[0].x, fig.data[0].y], 1)
    verts = edges[~np.isnan(edges).any(1)]
    assert len(verts) == 6 and np.allclose(np.linalg.norm(verts, axis=1), 1.0)
    assert min(np.linalg.norm(verts - means[0], axis=1)) < 0.05


def test_animation_3d_and_projection_and_subsampling():
    h4 = run(4, steps=200, every=10)
    fig = plots.collapse_animation(h4, max_frames=8)
    assert len(fig.frames) == 8 and isinstance(fig.data[1], go.Scatter3d)
    assert fig.frames[0].name == "0" and fig.frames[-1].name == "200"
    h7 = run(7, d=12, steps=100, every=50)
    fig7 = plots.collapse_animation(h7, show_features=False)
    assert isinstance(fig7.data[1], go.Scatter3d) and len(fig7.data) == 5  # no feature trace
    assert "3-D view of 6-dim" in fig7.layout.annotations[0].text
    # no ETF when d < C-1
    low = run(6, d=2, steps=40, every=20)
    figl = plots.collapse_animation(low)
    assert not any((t.name or "").startswith("simplex ETF") for t in figl.data)
    assert isinstance(figl.data[0], go.Scatter)  # d = 2: drawn in its own plane
    with pytest.raises(ValueError, match="snapshots"):
        plots.collapse_animation([])


def test_projection_basis_is_fixed_by_final_means():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(5, 9, generator=g, dtype=torch.float64)
    B = plots.projection_basis(M, 3)
    assert torch.allclose(B.T @ B, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.equal(B, plots.projection_basis(M.clone(), 3))
    E = plots.nearest_etf_rows(torch.nn.functional.normalize(M, dim=1), 5)
    from nc_lib.etf import gram_distance_to_etf
    assert gram_distance_to_etf(E) < 1e-12
    assert plots.nearest_etf_rows(M[:, :2], 5) is None


def test_animation_saves_through_pipeline(run3, tmp_path):
    from nc_lib.figures import save_figure
    fig = plots.collapse_animation(run3)
    save_figure(fig, "papyan2020_fig1", scale="quick", params={"C": 3})
    html = (tmp_path / "figures" / "papyan2020_fig1.html").read_text()
    assert "frames" in html or "addFrames" in html


# --------------------------------------------------------------------------- metric curves
def test_metric_curves_structure():
    a, b = run(3, steps=60, every=20), run(3, steps=60, every=20, seed=1)
    c = run(3, steps=60, every=20, seed=2)
    keys = ["objective", "within_class_variability", "accuracy"]
    fig = plots.plot_metric_curves({"one": a, "seeds": [b.records, c.records]}, keys,
                                   log_y=["within_class_variability"], vline={"one": 20}, hline={"objective": 0.1})
    # per key: 1 curve for "one" + (upper, lower band, median) for "seeds"
    assert len(fig.data) == 3 * 4
    medians = [t for t in fig.data if t.name == "seeds (median of 2)"]
    assert len(medians) == 3
    band = [t for t in fig.data if t.fill == "tonexty"]
    assert len(band) == 3
    obj_b = [r["objective"] for r in b.records]
    obj_c = [r["objective"] for r in c.records]
    assert np.allclose(medians[0].y, np.median([obj_b, obj_c], axis=0))
    assert fig.layout.yaxis2.type == "log" and fig.layout.yaxis.type != "log"
    shapes = fig.layout.shapes
    assert sum(s.type == "line" and s.x0 == 20 for s in shapes) == 3  # the vertical marker on each subplot
    assert sum(s.type == "line" and s.y0 == 0.1 for s in shapes) == 1  # hline only on the objective
    # x key selectable, no band
    fig2 = plots.plot_metric_curves({"seeds": [b, c]}, ["objective"], x="time", band=False)
    assert len(fig2.data) == 1 and fig2.layout.xaxis.title.text == "time"
    with pytest.raises(ValueError, match="keys"):
        plots.plot_metric_curves({"one": a}, [])
    with pytest.raises(ValueError, match="none of keys"):
        plots.plot_metric_curves({"one": a}, ["no_such_key"])


def test_live_figure_updates():
    fig = plots.live_metrics_figure(["objective", "accuracy"])
    h = run(3, steps=40, every=10, )
    plots.update_live_figure(fig, h.records, ["objective", "accuracy"])
    assert list(fig.data[0].x) == [0, 10, 20, 30, 40]
    assert fig.data[1].y[-1] == h.last["accuracy"]
    # and through the trainer
    live = plots.live_metrics_figure(["objective"])
    h2 = train_ufm(UFMConfig(num_classes=3, n_per_class=4, feature_dim=4), 30, 10, progress=False,
                   live=live, live_keys=["objective"])
    assert len(live.data[0].y) == 4 and live.data[0].y[-1] == h2.last["objective"]


def test_ufm_diagram():
    fig = plots.ufm_diagram()
    assert len(fig.layout.shapes) > 10
    texts = " ".join(a.text for a in fig.layout.annotations)
    assert "free H" in texts and "λ<sub>H</sub>" in texts


# --------------------------------------------------------------------------- widgets
def test_explorer_runs_on_click():
    from nc_lib.widgets import UFMExplorer
    ex = UFMExplorer(C=3, d=6, n=5, steps=100, measure_every=10, live=True)
    ex.button.click()
    assert ex.error is None and ex.runs == 1
    assert set(ex.figures) == {"metrics", "animation"}
    assert len(ex.figures["animation"].frames) == 11
    assert "Done" in ex.message
    assert len(ex.live_figure.data[0].y) == 11
    ex.optimizer.value = "adam"
    ex.button.click()
    assert ex.runs == 2 and ex.history.config.optimizer == "adam"


@pytest.mark.parametrize("change, words", [
    (dict(head="fixed_etf", d=3), "feature_dim >= num_classes"),
    (dict(lr=80.0, loss="mse"), "lower lr"),
    (dict(lambda_W=-1.0), "lambda_W"),
])
def test_explorer_shows_clear_messages(change, words):
    from nc_lib.widgets import UFMExplorer
    ex = UFMExplorer(C=4, d=6, n=5, steps=60, measure_every=10, live=False)
    for name, value in change.items():
        getattr(ex, name).value = value
    ex.button.click()
    assert ex.figures == {} and words in ex.error
    assert "Invalid settings" in ex.message or "Training stopped" in ex.message
    assert not ex.button.disabled


def test_ufm_explorer_headless_runs_once():
    from nc_lib.widgets import ufm_explorer
    ex = ufm_explorer(display=False, steps=50, measure_every=10, C=4, d=5, n=4)
    assert ex.runs == 1 and isinstance(ex.figures["animation"], go.Figure)
    assert ex.history.step == 50 and math.isfinite(ex.history.last["objective"])
