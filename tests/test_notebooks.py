"""Every notebook runs headless through papermill at the quick scale and makes the figures it owns."""
import json
from pathlib import Path

import pytest

from nc_lib import figures

NOTEBOOKS = figures.notebooks()


def test_committed_notebooks_carry_no_outputs():
    assert NOTEBOOKS, "no notebooks found"
    for nb in NOTEBOOKS:
        data = json.loads(nb.read_text())
        for cell in data["cells"]:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs") and cell.get("execution_count") is None, nb.name


def test_every_notebook_has_a_parameters_cell_and_presets():
    for nb in NOTEBOOKS:
        cells = json.loads(nb.read_text())["cells"]
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, nb.name
        assert 'scale = "quick"' in "".join(tagged[0]["source"]), nb.name
        for scale in figures.SCALES:
            assert (nb.parent / "presets" / f"{nb.stem}.{scale}.yaml").exists(), (nb.name, scale)


RAN: set[str] = set()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One figures folder and run store for every notebook, as `make figures` has."""
    return tmp_path_factory.mktemp("make-figures")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_at_quick_scale(notebook: Path, shared, monkeypatch):
    out = shared / "figures"
    monkeypatch.setenv("NC_FIGURES_DIR", str(out))
    monkeypatch.setenv("NC_RUNS_DIR", str(shared / "runs"))
    figures.run_notebook(notebook, "quick", shared / "executed", timeout=900)
    RAN.add(notebook.stem)
    owned = [k for k, v in figures.CATALOGUE.items() if v["notebook"] == notebook.stem]
    manifest = figures.read_manifest(out)
    for fig_id in owned:
        assert fig_id in manifest, f"{notebook.stem} did not make {fig_id}"
        assert manifest[fig_id]["scale"] == "quick"
        for name in manifest[fig_id]["files"]:
            assert (out / name).stat().st_size > 0
        if figures.chromium_path() and figures.CATALOGUE[fig_id]["kind"] == "figure":
            assert f"{fig_id}.png" in manifest[fig_id]["files"]


def test_manifest_covers_the_whole_catalogue(shared):
    """After every notebook has run, every id of REFERENCE.md section 5 is in the manifest."""
    if RAN != {p.stem for p in NOTEBOOKS}:
        pytest.skip("runs only after every notebook ran in this session")
    manifest = figures.read_manifest(shared / "figures")
    missing = sorted(set(figures.CATALOGUE) - set(manifest))
    assert not missing, f"catalogue ids missing from the manifest: {missing}"
    figures.write_gallery(shared / "figures")
    assert (shared / "figures" / "index.html").exists()


# --------------------------------------------------------------------------- parameter checks
CHECK_COMMENT = "# Check every parameter before any work"


def _cells(notebook: Path) -> list[dict]:
    return json.loads(notebook.read_text())["cells"]


def _parameters_index(cells: list[dict]) -> int:
    return next(i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", []))


def _check_cell(notebook: Path) -> dict | None:
    """The cell right after the parameters cell when it is the one that checks them, else None."""
    cells = _cells(notebook)
    cell = cells[_parameters_index(cells) + 1]
    return cell if cell["cell_type"] == "code" and "".join(cell["source"]).startswith(CHECK_COMMENT) else None


CHECKED = [p for p in NOTEBOOKS if _check_cell(p) is not None]


def test_the_check_cells_are_where_they_should_be():
    """Right after the parameters cell, before any work, untagged (papermill puts its injected cell between)."""
    stems = {p.stem for p in CHECKED}
    assert {"00_simplex_etf", "01_unconstrained_features", "02_ufm_landscape", "04_fixed_etf_classifier",
            "05_nearest_etf", "06_your_own_network"} <= stems
    for nb in CHECKED:
        cell = _check_cell(nb)
        assert not cell["metadata"].get("tags"), nb.name
        assert cell["execution_count"] is None and not cell["outputs"], nb.name


@pytest.mark.parametrize("notebook", CHECKED, ids=[p.stem for p in CHECKED])
def test_every_preset_passes_the_parameter_checks(notebook: Path):
    """The parameters cell, overridden by each scale's preset, then the check cell: no error (run in-process)."""
    cells = _cells(notebook)
    params_source = "".join(cells[_parameters_index(cells)]["source"])
    check_source = "".join(_check_cell(notebook)["source"])
    for scale in figures.SCALES:
        namespace: dict = {}
        exec(params_source, namespace)
        namespace.update(figures.preset(notebook, scale))
        exec(check_source, namespace)  # raises a ValueError naming the parameter if the preset is wrong
        assert namespace["scale"] == scale


BAD_PARAMETERS = [  # (notebook, one bad parameter, what the error must say)
    ("00_simplex_etf", {"scale": "bogus"}, "scale='bogus' is not valid; choose one of ['quick', 'medium', 'paper']"),
    ("01_unconstrained_features", {"steps": 0}, "steps must be >= 1, got 0"),
    ("02_ufm_landscape", {"init_scales": [0.5, 0.0]}, "init_scales[1] must be > 0"),
    ("04_fixed_etf_classifier", {"memory_steps": 0}, "memory_steps must be >= 1, got 0"),
    ("05_nearest_etf", {"solver_delta": -1}, "solver_delta must be"),
    ("05_nearest_etf", {"optimizer": "bogus"}, "optimizer='bogus' is not valid; choose one of ['agd', 'sgd']"),
    ("06_your_own_network", {"scale": "bogus"}, "scale='bogus' is not valid; choose one of ['quick', 'medium', "
                                                "'paper']"),
]


@pytest.mark.parametrize("stem,bad,message", BAD_PARAMETERS,
                         ids=[f"{stem[:2]}-{next(iter(bad))}" for stem, bad, _ in BAD_PARAMETERS])
def test_a_bad_parameter_stops_the_notebook_at_the_check_cell(stem, bad, message, tmp_path, monkeypatch):
    """papermill with one bad parameter: a ValueError naming it, raised by the check cell, before any work."""
    from papermill.exceptions import PapermillExecutionError

    notebook = next(p for p in NOTEBOOKS if p.stem == stem)
    monkeypatch.setenv("NC_FIGURES_DIR", str(tmp_path / "figures"))
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "runs"))
    with pytest.raises(PapermillExecutionError) as info:
        figures.run_notebook(notebook, "quick", tmp_path / "executed", extra=bad, timeout=120)
    err = info.value
    assert err.ename == "ValueError", err
    name = next(iter(bad))
    assert name in err.evalue and message in err.evalue, err.evalue
    # the failing cell is the check cell: parameters cell, papermill's injected cell, then the check
    cells = _cells(notebook)
    assert err.cell_index == _parameters_index(cells) + 2
    assert err.source.startswith(CHECK_COMMENT)
    executed = json.loads((tmp_path / "executed" / notebook.name).read_text())["cells"]
    ran = [c for c in executed if c["cell_type"] == "code" and c.get("execution_count") is not None]
    injected = [i for i, c in enumerate(ran) if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected and "".join(ran[injected[0] + 1]["source"]).startswith(CHECK_COMMENT)
    assert "".join(ran[-1]["source"]).startswith(CHECK_COMMENT), "a cell after the check cell ran"
    assert err.exec_count == len(ran)
