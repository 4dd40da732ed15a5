"""`make book`: the course as a static site, opened page by page in headless Chromium with no network.

What it runs: to stay within its CI budget (site build plus browser test under 3 minutes on 2 cores) the
test executes two notebooks itself, at quick scale and with shorter runs, exactly as `make figures` does
(nc_lib.figures.run_notebook, so with widgets off) into a temporary folder: 00_simplex_etf (math, the ETF
explorer) and 01_unconstrained_features (live training, the UFM explorer, the papyan2020_fig1 animation and
its GIF). It does not reuse the notebook test's executions: that test runs later in the suite and keeps
its folder to itself. The site is built from those executions with nc_lib.book.build_book; the course pages
of the other notebooks are then absent, and the landing page says so without linking them.

Each page (landing page, the two notebooks, the gallery page, the standalone gallery, one figure page) is
served from the built folder on 127.0.0.1 and opened with Debian's Chromium through Playwright; every request
to any other host is blocked and counted as a failure (the site must work offline). On each page: no
console error, no failed request; every plotly figure rendered; every formula typeset by the bundled
MathJax; every link and image within the site resolves (anchors included). A full-page screenshot of each
page is saved in the test's temporary folder (printed at the end).
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urldefrag, urlparse

import pytest

from nc_lib import book, figures

#: The notebooks the browser test executes, with shorter runs than the quick preset (same code paths).
SUBSET = {
    "00_simplex_etf": {},
    "01_unconstrained_features": {"steps": 600, "anim_steps": 300, "theorem_steps": 100, "sweep_steps": 60,
                                  "explorer_steps": 100},
}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _needs_book_tools():
    for module in ("sphinx", "myst_nb", "sphinx_book_theme", "mathjax"):
        pytest.importorskip(module, reason=f"{module} is missing: pip install -e '.[book]'")


# --------------------------------------------------------------------------- without a browser
def _output(data, output_type="display_data"):
    return {"output_type": output_type, "data": data, "metadata": {}}


def test_prepare_notebook_makes_every_output_showable():
    plotly_fig = {"data": [{"type": "scatter", "x": [0, 1], "y": [1, 0]}], "layout": {"width": 900, "height": 300}}
    nb = {"metadata": {"widgets": {"state": {}}}, "nbformat": 4, "nbformat_minor": 5, "cells": [
        {"cell_type": "markdown", "metadata": {"tags": [book.OPEN_IN_TAG]}, "source": ["Run it: `make lab`."]},
        {"cell_type": "markdown", "metadata": {}, "source": ["# 00 · Title"]},
        {"cell_type": "code", "metadata": {}, "execution_count": 1, "source": ["fig"], "outputs": [
            _output({book.PLOTLY_MIME: plotly_fig, "text/plain": ["Figure(...)"]}),
            _output({book.WIDGET_MIME: {"model_id": "a"}, "text/plain": ["VBox(children=(IntSlider(value=4),))"]}),
            _output({book.WIDGET_MIME: {"model_id": "b"}, "text/plain": ["  0%|          | 0/600 [00:00<?, ?it/s]"]}),
            {"output_type": "stream", "name": "stdout", "text": ["hello\n"]},
        ]},
    ]}
    out, counts = book.prepare_notebook(nb, "00_x")
    assert counts == {"plotly": 1, "controls": 1, "widgets": 2}
    assert "widgets" not in out["metadata"] and "widgets" in nb["metadata"]  # the input is left alone
    assert [c["source"][0][:4] for c in out["cells"][:2]] == ["# 00", "Run "]  # the run-it cell under the title
    fig_out, note, stream = out["cells"][2]["outputs"]
    html = fig_out["data"]["text/html"]
    assert book.PLOTLY_MIME not in fig_out["data"] and "Plotly.newPlot" in html and 'id="nc-plot-00_x-1"' in html
    assert "<script src" not in html and '"width":900' not in html.replace(" ", "")  # the site's plotly.js; fits the page
    assert "JupyterLab" in note["data"]["text/html"]
    assert stream["text"] == ["hello\n"]


def test_landing_page_links_built_notebooks_and_marks_the_rest(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Kit\n\n## Teach with this kit\n\n| step | notebook |\n|---|---|\n| 1 | `00_simplex_etf` |\n"
                      "| 2 | `01_unconstrained_features` |\n\n## Next\n\nnot this\n")
    page = book.landing_page(["00_simplex_etf"], "quick", readme=readme)
    assert "[00_simplex_etf](00_simplex_etf.ipynb)" in page
    assert "`01_unconstrained_features` (not built" in page and "01_unconstrained_features.ipynb" not in page
    assert "not this" not in page and "gallery.md" in page and "JupyterLab" in page


def test_gallery_page_shows_the_gif_of_an_animation():
    manifest = {"papyan2020_fig1": {"files": ["papyan2020_fig1.html", "papyan2020_fig1.png", "papyan2020_fig1.gif"],
                                    "scale": "quick", "notebook": "01_unconstrained_features", "note": ""},
                "zhu2021_fig1": {"files": ["zhu2021_fig1.html", "zhu2021_fig1.png"], "scale": "quick",
                                 "notebook": "00_simplex_etf", "note": "a drawing"}}
    page = book.gallery_page(manifest, ["00_simplex_etf"])
    assert '<img src="figures/papyan2020_fig1.gif"' in page and '<img src="figures/zhu2021_fig1.png"' in page
    assert "[00_simplex_etf](00_simplex_etf.ipynb)" in page and "`01_unconstrained_features`" in page
    assert 'href="figures/index.html"' in page


def test_build_book_says_what_to_run_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="make figures"):
        book.build_book(tmp_path / "nothing", tmp_path / "site", figures=tmp_path, scale="quick")
    with pytest.raises(ValueError, match="scale"):
        book.build_book(tmp_path, tmp_path / "site", scale="huge")
    (tmp_path / "executed").mkdir()
    (tmp_path / "executed" / "00_simplex_etf.ipynb").write_text("{}")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="not empty"):  # never deletes a folder that is not a previous build
        book.build_book(tmp_path / "executed", tmp_path / "mine", figures=tmp_path, scale="quick")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


# --------------------------------------------------------------------------- the site
@pytest.fixture(scope="module")
def site(tmp_path_factory):
    _needs_book_tools()
    root = tmp_path_factory.mktemp("book")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NC_FIGURES_DIR", str(root / "figures"))
        mp.setenv("NC_RUNS_DIR", str(root / "runs"))
        t0 = time.perf_counter()
        for stem, extra in SUBSET.items():
            figures.run_notebook(figures.NOTEBOOK_DIR / f"{stem}.ipynb", "quick", root / "executed", extra=extra,
                                 timeout=600)
        executed_s = time.perf_counter() - t0
        figures.write_gallery(root / "figures")
        summary = book.build_book(root / "executed", root / "site", figures=root / "figures", scale="quick")
    print(f"\nbook test: notebooks executed in {executed_s:.1f} s, site built in {summary['seconds']} s")
    return {"root": root, "out": root / "site", "summary": summary}


def test_site_is_built_from_the_executed_notebooks(site):
    summary, out = site["summary"], site["out"]
    assert summary["pages"] == ["index", "gallery", *SUBSET]
    assert set(summary["missing"]) == {p.stem for p in figures.notebooks()} - set(SUBSET)
    for stem in SUBSET:
        assert (out / f"{stem}.html").exists() and summary["plotly"][stem] >= 2
        assert summary["controls"][stem] == 0  # executed with widgets off: figures, not widget views
    for asset in ("_static/plotly.min.js", "_static/mathjax/tex-mml-chtml.js", "figures/index.html",
                  "figures/papyan2020_fig1.html", "figures/papyan2020_fig1.gif", "gallery.html"):
        assert (out / asset).stat().st_size > 0, asset
    # the live figure of a training cell is redrawn in place (one output, at its final state), not appended
    nb = json.loads((site["root"] / "executed" / "01_unconstrained_features.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "live=live" in "".join(c["source"]))
    live = [o["data"][book.PLOTLY_MIME] for o in cell["outputs"] if book.PLOTLY_MIME in o.get("data", {})]
    assert len(live) == 1, f"{len(live)} plotly outputs in the live training cell"
    steps = SUBSET["01_unconstrained_features"]["steps"]
    assert live[0]["data"][0]["x"] and len(_decoded(live[0]["data"][0]["x"])) == steps // 20 + 1
    manifest = json.loads((site["root"] / "figures" / "manifest.json").read_text())
    assert "papyan2020_fig1.gif" in manifest["papyan2020_fig1"]["files"]


def _decoded(values):
    """A plotly JSON array: a list, or {dtype, bdata} (base64)."""
    if isinstance(values, dict):
        import base64

        import numpy as np
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"])
    return values


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # noqa: D401 - keep pytest's output clean
        pass


@pytest.fixture(scope="module")
def browser_page(site):
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    if figures.chromium_path() is None:
        pytest.skip("no Chromium found: install Debian's chromium (apt-get install chromium) to run the browser test")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site["out"])))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}/"
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=figures.chromium_path(), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})

        def route(r):  # offline: only the site's own server answers
            if r.request.url.startswith(base) or r.request.url.startswith("data:"):
                r.continue_()
            else:
                problems.append(f"request outside the site: {r.request.url}")
                r.abort()

        context.route("**/*", route)
        page = context.new_page()
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url}"))
        page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
        yield {"page": page, "base": base, "problems": problems, "shots": site["root"] / "screenshots"}
        browser.close()
    server.shutdown()
    print(f"\nbook screenshots: {site['root'] / 'screenshots'}")


def _fetch(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = resp.read()
        return resp.status, body.decode("utf-8", "replace") if "html" in resp.headers.get("Content-Type", "") else ""


PLOTLY_DONE = ("() => [...document.querySelectorAll('.plotly-graph-div')].every("
               "g => g._fullLayout && g.querySelector('.main-svg'))")  # a diagram of shapes has no traces
MATH_DONE = ("() => { const m = [...document.querySelectorAll('.math')]; return m.length === 0 || ("
             "window.MathJax && MathJax.startup && m.every(e => e.querySelector('mjx-container'))); }")


def _visit(ctx, path: str) -> dict:
    """Open one page, wait for figures and math, check links, save a screenshot; returns what was found."""
    page, base, problems = ctx["page"], ctx["base"], ctx["problems"]
    problems.clear()
    page.goto(base + path, wait_until="load")
    page.wait_for_function(PLOTLY_DONE, timeout=60_000)
    page.wait_for_function(MATH_DONE, timeout=60_000)
    page.wait_for_timeout(300)  # late console messages
    found = page.evaluate("""() => ({
        plots: document.querySelectorAll('.plotly-graph-div').length,
        math: document.querySelectorAll('.math').length,
        typeset: document.querySelectorAll('.math mjx-container').length,
        mathErrors: document.querySelectorAll('mjx-merror').length,
        links: [...document.querySelectorAll('a[href]')].map(a => a.href),
        images: [...document.querySelectorAll('img[src]')].map(i => i.src),
        text: document.body.innerText })""")
    ctx["shots"].mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ctx["shots"] / (path.replace("/", "_") + ".png")), full_page=True)
    assert not problems, f"{path}: {problems}"
    assert found["mathErrors"] == 0, f"{path}: MathJax could not typeset {found['mathErrors']} formula(s)"
    for url in sorted({u for u in found["links"] + found["images"] if u.startswith(base)}):
        target, anchor = urldefrag(url)
        status, body = _fetch(target)
        assert status == 200, f"{path}: {url} answered {status}"
        if anchor and body:
            assert f'id="{anchor}"' in body, f"{path}: {url} has no anchor #{anchor}"
    found["internal"] = {urlparse(u).path.lstrip("/") for u in found["links"] if u.startswith(base)}
    return found


def test_every_page_renders_offline(site, browser_page):
    summary = site["summary"]
    t0 = time.perf_counter()
    home = _visit(browser_page, "index.html")
    assert {f"{s}.html" for s in SUBSET} | {"gallery.html"} <= home["internal"]
    assert "Teach with this kit" not in home["text"] and "course path" in home["text"].lower()
    for stem in SUBSET:
        page = _visit(browser_page, f"{stem}.html")
        assert page["plots"] == summary["plotly"][stem]
        assert page["math"] > 0 and page["typeset"] == page["math"], f"{stem}: formulas left untypeset"
        assert "The controls work in JupyterLab" in page["text"], f"{stem}: no line about the widgets"
        assert "index.html" in page["internal"] and "gallery.html" in page["internal"]
    gallery = _visit(browser_page, "gallery.html")
    assert "figures/index.html" in gallery["internal"] and "figures/papyan2020_fig1.html" in gallery["internal"]
    assert any(i.endswith("figures/papyan2020_fig1.gif") for i in gallery["images"])
    standalone = _visit(browser_page, "figures/index.html")
    assert any(i.endswith("papyan2020_fig1.gif") for i in standalone["images"])
    figure = _visit(browser_page, "figures/papyan2020_fig1.html")
    assert figure["plots"] == 1
    print(f"\nbook test: {6} pages checked in the browser in {time.perf_counter() - t0:.1f} s")
    assert os.listdir(browser_page["shots"])
