import json

import plotly.graph_objects as go
import pytest

from nc_lib import figures


def test_save_figure_writes_html_png_and_manifest(figures_tmp):
    fig = go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))
    rec = figures.save_figure(fig, "zhu2021_fig1", scale="quick", params={"C": 3}, note="test")
    assert (figures_tmp / "zhu2021_fig1.html").exists()
    if figures.chromium_path():
        assert (figures_tmp / "zhu2021_fig1.png").stat().st_size > 1000
        assert "zhu2021_fig1.png" in rec["files"]
    manifest = json.loads((figures_tmp / "manifest.json").read_text())
    entry = manifest["zhu2021_fig1"]
    assert entry["paper"] == "zhu2021" and entry["scale"] == "quick"
    assert entry["parameters"] == {"C": 3} and entry["notebook"] == "00_simplex_etf"
    assert entry["commit"] and entry["time"]


def test_animation_png_is_its_last_frame(figures_tmp):
    frames = [go.Frame(data=[go.Scatter(x=[0, 1], y=[k, k])], name=str(k)) for k in range(3)]
    fig = go.Figure(data=[go.Scatter(x=[0, 1], y=[0, 0])], frames=frames)
    figures.save_figure(fig, "papyan2020_fig1", scale="quick")
    text = (figures_tmp / "papyan2020_fig1.html").read_text()
    assert text.count('"name":"2"') + text.count('"name": "2"') >= 1  # frames kept in the HTML


def test_save_table_writes_csv_and_html(figures_tmp):
    rows = [{"variant": "learned W, d=512", "parameters": 11.17e6}, {"variant": "fixed W, d=C", "parameters": 8.87e6}]
    figures.save_table(rows, "zhu2021_table1", scale="quick")
    csv_text = (figures_tmp / "zhu2021_table1.csv").read_text().splitlines()
    assert csv_text[0] == "variant,parameters" and len(csv_text) == 3
    assert "fixed W, d=C" in (figures_tmp / "zhu2021_table1.html").read_text()
    assert figures.read_manifest()["zhu2021_table1"]["kind"] == "table"


def test_unknown_id_and_scale_are_refused(figures_tmp):
    fig = go.Figure()
    with pytest.raises(ValueError, match="not in the catalogue"):
        figures.save_figure(fig, "zhu2021_fig99", scale="quick")
    with pytest.raises(ValueError, match=r"scale='huge' is not valid; choose one of \['quick', 'paper'\]"):
        figures.save_figure(fig, "zhu2021_fig1", scale="huge")
    with pytest.raises(ValueError, match="matches no figure id"):
        figures.select_notebooks("nonsense_fig1")


def test_catalogue_covers_reference_ids():
    ids = set(figures.CATALOGUE)
    for k in range(1, 9):
        assert f"papyan2020_fig{k}" in ids
    for k in range(1, 7):
        assert f"zhu2021_fig{k}" in ids
    for k in range(1, 6):
        assert f"markou2024_fig{k}" in ids
    assert {"papyan2020_table1", "zhu2021_table1", "markou2024_table1", "markou2024_table2", "markou2024_table3"} <= ids
    assert any(k.startswith("markou2024_appendix_") for k in ids)


def test_only_selects_the_owning_notebooks():
    assert [p.stem for p in figures.select_notebooks("zhu2021_fig1")] == ["00_simplex_etf"]


def test_gallery_lists_saved_figures(figures_tmp):
    figures.save_figure(go.Figure(go.Bar(y=[1, 2])), "zhu2021_fig1", scale="paper", note="made at paper scale")
    figures.write_gallery(timings={"00_simplex_etf": 1.5})
    md = (figures_tmp / "README.md").read_text()
    assert "zhu2021_fig1" in md and "made at paper scale" in md and "`paper`" in md
    assert "zhu2021_fig1" in (figures_tmp / "index.html").read_text()


def test_cli_reports_bad_scale(capsys):
    assert figures.main(["--scale", "huge"]) == 2
    assert "SCALE='huge' is not valid" in capsys.readouterr().err
