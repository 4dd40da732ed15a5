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
    with pytest.raises(ValueError, match=r"scale='huge' is not valid; choose one of \['quick', 'medium', 'paper'\]"):
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


# --------------------------------------------------------------------------- atomic writes (issue 13)
import os  # noqa: E402
import pathlib  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections import defaultdict  # noqa: E402

_REAL_WRITE_BYTES = pathlib.Path.write_bytes


class _Disk:
    """Every file write of the process, recorded; ``fail_in = k`` lets k more writes through and makes the next
    one stop halfway with an OSError, as a full disk or a killed process would."""

    def __init__(self, monkeypatch):
        self.whole: dict[str, set[bytes]] = defaultdict(set)  # file name -> every complete content written
        self.fail_in: int | None = None
        self.fired = False
        monkeypatch.setattr(pathlib.Path, "write_bytes", lambda path, data: self.write_bytes(path, data))
        monkeypatch.setattr(pathlib.Path, "write_text", lambda path, text, encoding=None, errors=None, newline=None:
                            self.write_bytes(path, text.encode(encoding or "utf-8")))

    def write_bytes(self, path, data):
        if self.fail_in == 0:
            self.fail_in, self.fired = None, True
            _REAL_WRITE_BYTES(path, bytes(data[: len(data) // 2]))
            raise OSError(f"injected fault while writing {path.name}")
        if self.fail_in is not None:
            self.fail_in -= 1
        self.whole[path.name.split(".tmp")[0]].add(bytes(data))
        return _REAL_WRITE_BYTES(path, data)

    def assert_whole(self, folder):
        """No temporary left, every file byte-equal to one complete write of it, every listed file present."""
        for f in folder.iterdir():
            assert ".tmp" not in f.name, f"temporary left behind: {f.name}"
            assert f.read_bytes() in self.whole[f.name], f"{f.name} is not a complete write"
        manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").exists() else {}
        for record in manifest.values():
            for name in record["files"]:
                assert (folder / name).stat().st_size > 0, name


def _fake_png(monkeypatch):
    """PNG export without a browser: kaleido's rendering returns bytes that name the figure's title."""
    import plotly.io._kaleido as kaleido_io

    monkeypatch.setattr(figures, "chromium_path", lambda: "/usr/bin/chromium")
    monkeypatch.setattr(figures, "_KALEIDO_SERVER", True)
    monkeypatch.setattr(kaleido_io, "to_image", lambda fig, **kw: b"\x89PNG " + fig.layout.title.text.encode())


def _save_all(folder, version):
    figures.save_figure(go.Figure(go.Bar(y=[1, version]), layout={"title": f"version {version}"}), "zhu2021_fig1",
                        scale="quick", out_dir=folder)
    figures.save_table([{"version": version, "value": 0.5 * version}], "zhu2021_table1", scale="quick", out_dir=folder)
    figures.write_gallery(folder)


@pytest.mark.parametrize("start", ["empty folder", "previous version saved"])
def test_a_write_failing_at_any_point_leaves_every_file_whole(tmp_path, monkeypatch, start):
    _fake_png(monkeypatch)
    disk = _Disk(monkeypatch)
    for k in range(40):
        folder = tmp_path / f"fault{k}"
        if start == "previous version saved":
            _save_all(folder, 1)
        disk.fail_in, disk.fired = k, False
        try:
            _save_all(folder, 2)
        except OSError:
            assert disk.fired
        disk.fail_in = None
        if folder.exists():
            disk.assert_whole(folder)
        if not disk.fired:  # every write of the run got through: all write points were tried
            assert k > 5
            break
    else:
        raise AssertionError("more writes than expected")


def test_an_incomplete_plotlyjs_is_replaced(figures_tmp):
    from plotly.offline import get_plotlyjs

    figures_tmp.mkdir(parents=True)
    (figures_tmp / "plotly.min.js").write_text("/* cut short")
    figures.save_figure(go.Figure(go.Bar(y=[1, 2])), "zhu2021_fig1", scale="quick")
    assert (figures_tmp / "plotly.min.js").read_bytes() == get_plotlyjs().encode()


_KILLED_WRITER = r'''
import os, pathlib, signal, sys
import plotly.graph_objects as go
from nc_lib import figures

figures.chromium_path = lambda: None  # HTML only
out = pathlib.Path(sys.argv[1])
small = go.Figure(go.Scatter(x=[0, 1], y=[0, 1]), frames=[go.Frame(data=[go.Scatter(x=[0, 1], y=[1, 0])])],
                  layout={"title": "small animation"})
figures.save_figure(small, "papyan2020_fig1", scale="quick", out_dir=out)
real = pathlib.Path.write_bytes

def killed_halfway(path, data):
    real(path, data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)

pathlib.Path.write_bytes = killed_halfway
pathlib.Path.write_text = lambda path, text, *a, **k: killed_halfway(path, text.encode())
frames = [go.Frame(data=[go.Scatter(x=list(range(2000)), y=[k * i for i in range(2000)])]) for k in range(50)]
large = go.Figure(frames[0].data, frames=frames, layout={"title": "large animation"})
figures.save_figure(large, "papyan2020_fig1", scale="quick", out_dir=out)
'''


def test_a_writer_killed_halfway_leaves_the_previous_figure(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(figures.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    html_text = (tmp_path / "papyan2020_fig1.html").read_text()
    assert "small animation" in html_text and html_text.rstrip().endswith("</html>")
    for name in figures.read_manifest(tmp_path)["papyan2020_fig1"]["files"]:
        assert (tmp_path / name).stat().st_size > 0
    assert list(tmp_path.glob("*.tmp*"))  # the killed writer's temporary ...
    figures.write_gallery(tmp_path)
    assert not list(tmp_path.glob("*.tmp*"))  # ... is removed by the next gallery run


def _tiny_notebook(path, body: str, parameters: str = "scale = 'quick'\nlog = ''") -> None:
    """A notebook of a ``parameters`` cell and one cell of ``body``, written to ``path``."""
    import nbformat

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"}})
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)


def test_an_executed_notebook_is_replaced_only_when_its_run_ends(tmp_path):
    import papermill

    source = tmp_path / "tiny.ipynb"
    _tiny_notebook(source, "import json, pathlib\n"
                   "if run == 2:\n"
                   "    cells = json.loads(pathlib.Path(out).read_text())['cells']\n"
                   "    previous = 'run = %d' % (run - 1)  # the parameters papermill injected into the previous run\n"
                   "    assert any(previous in ''.join(c['source']) for c in cells), 'previous output replaced mid-run'\n"
                   "    raise RuntimeError('deliberate failure')\n", parameters="run = 0\nout = ''")
    build, out = tmp_path / "build", tmp_path / "build" / "tiny.ipynb"
    figures.run_notebook(source, "quick", build, extra={"run": 1, "out": str(out)}, timeout=120)
    with pytest.raises(papermill.PapermillExecutionError) as failed:
        figures.run_notebook(source, "quick", build, extra={"run": 2, "out": str(out)}, timeout=120)
    assert (failed.value.ename, failed.value.evalue) == ("RuntimeError", "deliberate failure")
    assert "deliberate failure" in out.read_text()  # a failed run's notebook shows its error
    assert [p.name for p in build.iterdir()] == ["tiny.ipynb"]


def test_a_relative_runs_dir_means_the_callers_folder_inside_the_notebook_too(tmp_path, monkeypatch):
    """`NC_RUNS_DIR=runs make figures`: the kernel runs in the notebook's folder, yet reads and writes the runs/ of
    the directory the command was typed in (it once trained everything again in notebooks/runs)."""
    (tmp_path / "notebooks").mkdir()
    source = tmp_path / "notebooks" / "where.ipynb"
    _tiny_notebook(source, "import pathlib\nfrom nc_lib.paths import runs_dir, figures_dir\n"
                   "pathlib.Path(out).write_text(str(runs_dir().resolve()) + '\\n' + str(figures_dir().resolve()))",
                   parameters="out = ''")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NC_RUNS_DIR", "my_runs")
    monkeypatch.setenv("NC_FIGURES_DIR", "my_figures")
    out = tmp_path / "where.txt"
    figures.run_notebook(source, "quick", tmp_path / "build", extra={"out": str(out)}, timeout=120)
    assert out.read_text().split("\n") == [str(tmp_path.resolve() / "my_runs"), str(tmp_path.resolve() / "my_figures")]


# --------------------------------------------------------------------------- notebooks side by side (--jobs)
def test_notebooks_run_side_by_side_and_a_failure_is_raised_after_the_others(tmp_path, monkeypatch):
    """--jobs 2: both notebooks are running at the same time (each logs its start and end; the spans overlap);
    a failing notebook does not stop the other, and its error comes out at the end."""
    import papermill

    body = ("import json, pathlib, time, os\n"
            "t0 = time.time(); time.sleep(4)\n"
            "with open(log, 'a') as f: f.write(json.dumps([os.environ['NC_NOTEBOOK'], t0, time.time()]) + '\\n')\n")
    books = [tmp_path / "a.ipynb", tmp_path / "b.ipynb"]
    for nb in books:
        _tiny_notebook(nb, body)
    log = tmp_path / "log.jsonl"
    timings = figures.run_notebooks(books, "quick", tmp_path / "build", jobs=2, extra={"log": str(log)})
    assert set(timings) == {"a", "b"}
    spans = {name: (t0, t1) for name, t0, t1 in map(json.loads, log.read_text().splitlines())}
    (a0, a1), (b0, b1) = spans["a"], spans["b"]
    assert a0 < b1 and b0 < a1, spans  # the two ran at the same time
    _tiny_notebook(books[0], "raise RuntimeError('deliberate failure')")
    log.unlink()
    with pytest.raises(papermill.PapermillExecutionError, match="deliberate failure"):
        figures.run_notebooks(books, "quick", tmp_path / "build", jobs=2, extra={"log": str(log)})
    assert [json.loads(line)[0] for line in log.read_text().splitlines()] == ["b"]  # b ran to its end


def test_figure_jobs_default_and_bad_values(monkeypatch):
    monkeypatch.setattr(figures.os, "cpu_count", lambda: 2)
    assert figures.figure_jobs("auto", "quick") == 2 and figures.figure_jobs("auto", "medium") == 1
    monkeypatch.setattr(figures.os, "cpu_count", lambda: 1)
    assert figures.figure_jobs("auto", "quick") == 1 and figures.figure_jobs("3", "paper") == 3
    for bad in ("0", "two"):
        with pytest.raises(ValueError, match="jobs"):
            figures.figure_jobs(bad, "quick")
    assert figures.main(["--jobs", "0"]) == 2


def _save_one_table(fig_id: str, out: str) -> None:
    from pathlib import Path

    figures.save_table([{"a": 1}], fig_id, scale="quick", out_dir=Path(out))


def test_the_manifest_is_updated_under_a_lock(tmp_path):
    """A second process saving a figure waits while the manifest is locked, then adds its record to the
    others: no record is lost between reading the manifest and writing it back."""
    import multiprocessing

    figures.save_table([{"a": 1}], "zhu2021_table1", scale="quick", out_dir=tmp_path)
    proc = multiprocessing.get_context("spawn").Process(target=_save_one_table, args=("markou2024_table1", str(tmp_path)))
    with figures._manifest_lock(tmp_path):
        proc.start()
        proc.join(timeout=8)
        assert proc.is_alive()  # blocked on the lock
        assert set(figures.read_manifest(tmp_path)) == {"zhu2021_table1"}
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert set(figures.read_manifest(tmp_path)) == {"zhu2021_table1", "markou2024_table1"}
