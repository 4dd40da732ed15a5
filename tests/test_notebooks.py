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
