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


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_at_quick_scale(notebook: Path, tmp_path, monkeypatch):
    out = tmp_path / "figures"
    monkeypatch.setenv("NC_FIGURES_DIR", str(out))
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "runs"))
    figures.run_notebook(notebook, "quick", tmp_path / "executed", timeout=900)
    owned = [k for k, v in figures.CATALOGUE.items() if v["notebook"] == notebook.stem]
    manifest = figures.read_manifest(out)
    for fig_id in owned:
        assert fig_id in manifest, f"{notebook.stem} did not make {fig_id}"
        assert manifest[fig_id]["scale"] == "quick"
        for name in manifest[fig_id]["files"]:
            assert (out / name).stat().st_size > 0
        if figures.chromium_path() and figures.CATALOGUE[fig_id]["kind"] == "figure":
            assert f"{fig_id}.png" in manifest[fig_id]["files"]
