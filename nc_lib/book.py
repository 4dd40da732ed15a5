"""``make book``: the course as a static site, built by Sphinx with MyST-NB from the notebooks ``make figures`` executed.

``python -m nc_lib.book [--scale quick] [--executed DIR] [--figures DIR] [--out DIR]`` reads the executed
notebooks (``build/notebooks/<scale>/``, written by :func:`nc_lib.figures.run_notebook`) and the figure
folder, and writes the site to ``build/book/`` (open ``index.html``; any static host serves it). Nothing
is re-run: MyST-NB's execution is off. The steps:

1. each executed notebook is copied into a Sphinx source folder (``build/book-src/``) with the outputs a
   static page cannot show made showable: a plotly figure (``application/vnd.plotly.v1+json``, which
   MyST-NB does not render) becomes HTML that draws it with the plotly.js bundled into the site; a
   widget view (it needs a live kernel) is dropped, with a line saying the controls work in JupyterLab
   where it was a control rather than a progress bar; the notebook's saved widget state is dropped
   (MyST-NB would otherwise load a widget manager from a CDN);
2. a landing page with the course path of the README's "Teach with this kit" section (each notebook
   linked to its page), and a gallery page made from ``figures/manifest.json`` (the GIF of each
   animation, else the PNG, linking to the interactive figure; the figure files and the standalone
   gallery ``figures/index.html`` are copied into the site);
3. plotly.js (shipped with the plotly package) and MathJax 3 (shipped with the ``django-static-mathjax``
   package) are copied into ``_static/``: the site needs no network;
4. Sphinx builds it with the sphinx-book-theme.

Notebooks executed with widgets off (``make figures`` sets ``NC_WIDGETS=0``) already hold, for every
interactive cell, the figure it drew at its defaults and the line saying the controls work in JupyterLab.
The tools come with the ``book`` extra: ``pip install -e '.[book]'`` (``make book`` installs it).
"""
from __future__ import annotations

import argparse
import copy
import html
import json
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .atomic_io import atomic_write_bytes, atomic_write_with
from .figures import CATALOGUE, NOTEBOOK_DIR, SCALES, notebooks, read_manifest, write_gallery
from .paths import REPO_ROOT, figures_dir
from .validation import check_choice

PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
#: The tag of the "run this notebook" cell: the site shows it under the notebook's title, not above.
OPEN_IN_TAG = "nc-open-in"
WIDGET_NOTE = ("An interactive widget was here: its controls need a running kernel, so they work in JupyterLab "
               "(<code>make lab</code>), not on this page.")
#: The MathJax files the site needs: the TeX+MathML to CommonHTML component, what it may load on demand
#: (TeX extensions, the menu and its accessibility parts) and its fonts. Not the 24 MB of everything.
MATHJAX_PARTS = ("tex-mml-chtml.js", "input/tex/extensions", "input/mml", "output/chtml", "ui", "a11y", "adaptors",
                 "sre/mathmaps/base.json", "sre/mathmaps/en.json")

CONF_PY = '''# Written by nc_lib.book for one build; do not edit (edit nc_lib/book.py).
project = "Neural collapse: a course"
author = "the neural collapse kit"
copyright = "the neural collapse kit authors"
extensions = ["myst_nb", "sphinx.ext.githubpages"]  # githubpages: a .nojekyll, so that _static/ is served
html_theme = "sphinx_book_theme"
html_title = "Neural collapse: a course"
html_theme_options = {{"show_toc_level": 2, "home_page_in_toc": True, "use_download_button": False,
                      "use_fullscreen_button": False}}
html_context = {{"default_mode": "light"}}
html_favicon = "_static/favicon.ico"
html_static_path = ["_static"]
html_extra_path = ["_extra"]
html_js_files = ["plotly.min.js", "nc-plotly-fit.js"]
html_css_files = ["nc-book.css"]
html_copy_source = False
html_show_sourcelink = False
html_last_updated_fmt = None
mathjax_path = "mathjax/tex-mml-chtml.js"
exclude_patterns = ["_extra", "_static", "_doctrees"]
nb_execution_mode = "off"
nb_ipywidgets_js = {{}}
nb_output_stderr = "show"
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
suppress_warnings = ["mystnb.unknown_mime_type", "misc.highlighting_failure"]
'''

CSS = """/* Written by nc_lib.book. Wide pages: the course's figures are up to 1250 px wide. */
.bd-page-width { max-width: 100%; }
.bd-main .bd-content .bd-article-container { max-width: 1320px; }
.cell_output .output.text_html { overflow-x: auto; }
.nc-note { color: #555; font-style: italic; }
.nc-gallery img { max-width: 100%; border: 1px solid #ddd; }
"""

FIT_JS = """// Written by nc_lib.book. Fit each plotly figure to its column: the figures are drawn while the page is
// parsed, before the theme has settled its columns, and plotly's own resizing follows only the window.
window.addEventListener("load", function () {
  if (!window.Plotly) { return; }
  var observer = new ResizeObserver(function (entries) {
    entries.forEach(function (entry) {
      var graph = entry.target.querySelector(".plotly-graph-div");
      if (graph && graph._fullLayout) { Plotly.Plots.resize(graph); }
    });
  });
  document.querySelectorAll(".plotly-graph-div").forEach(function (graph) {
    Plotly.Plots.resize(graph);
    observer.observe(graph.parentElement);
  });
});
"""


# --------------------------------------------------------------------------- notebooks
def _plotly_html(spec: dict[str, Any], div_id: str) -> str:
    """The HTML that draws one plotly figure with the site's plotly.js (no script of its own). The
    figure's fixed width gives way to the page's (it resizes with the window); its height is kept."""
    import plotly.io as pio

    spec = {**spec, "layout": {**spec.get("layout", {}), "autosize": True}}
    spec["layout"].pop("width", None)
    return pio.to_html(spec, include_plotlyjs=False, full_html=False, auto_play=False, validate=False,
                       div_id=div_id, default_width="100%", config={"responsive": True, "displaylogo": False})


def _is_control(output: dict[str, Any]) -> bool:
    """A widget view of a control (``VBox(...)``, ``IntSlider(...)``) rather than a progress bar."""
    text = "".join(output.get("data", {}).get("text/plain", ""))
    return bool(re.match(r"[A-Z]\w*\(", text.strip()))


def prepare_notebook(nb: dict[str, Any], stem: str) -> tuple[dict[str, Any], dict[str, int]]:
    """A copy of an executed notebook with outputs a static page can show (see the module docstring),
    and counts of what was converted: ``plotly``, ``controls`` (noted) and ``widgets`` (all dropped)."""
    nb = copy.deepcopy(nb)
    nb.get("metadata", {}).pop("widgets", None)
    counts = {"plotly": 0, "controls": 0, "widgets": 0}
    cells = nb["cells"]
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        outputs = []
        for out in cell.get("outputs", []):
            data = out.get("data")
            if data and PLOTLY_MIME in data:
                counts["plotly"] += 1
                spec = data.pop(PLOTLY_MIME)
                data["text/html"] = _plotly_html(spec, f"nc-plot-{stem}-{counts['plotly']}")
                data.pop("text/plain", None)
            if data and WIDGET_MIME in data:
                counts["widgets"] += 1
                if _is_control(out):
                    counts["controls"] += 1
                    outputs.append({"output_type": "display_data", "metadata": {},
                                    "data": {"text/html": f"<p class='nc-note'>{WIDGET_NOTE}</p>"}})
                continue
            outputs.append(out)
        cell["outputs"] = outputs
    # the "run this notebook" cell goes under the title
    for i, cell in enumerate(cells[:-1]):
        if OPEN_IN_TAG in cell.get("metadata", {}).get("tags", []) and "".join(cells[i + 1]["source"]).startswith("# "):
            cells[i], cells[i + 1] = cells[i + 1], cells[i]
            break
    return nb, counts


# --------------------------------------------------------------------------- pages
def _readme_section(title: str, readme: Path) -> str | None:
    """The body of the README section ``## <title>`` (None if the README has none)."""
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    m = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S | re.I)
    return m.group(1).strip() if m else None


def _link_notebooks(markdown: str, built: list[str]) -> str:
    """Each `` `NN_name` `` of a built notebook becomes a link to its page; unbuilt ones say so."""
    stems = {p.stem for p in notebooks()}

    def sub(m: re.Match[str]) -> str:
        stem = m.group(1)
        if stem in built:
            return f"[{stem}]({stem}.ipynb)"
        return f"`{stem}` (not built: not executed at this scale)" if stem in stems else m.group(0)

    return re.sub(r"`(\d\d_[a-z0-9_]+)`", sub, markdown)


def landing_page(built: list[str], scale: str, readme: Path = REPO_ROOT / "README.md") -> str:
    """The site's index.md: the course path from the README, links to every page and the gallery."""
    course = _readme_section("Teach with this kit", readme)
    if course is None:
        course = "\n".join(f"1. `{s}`" for s in built)
    intro = _readme_section("The notebooks", readme)
    lines = [
        "# Neural collapse: a course", "",
        "Every notebook of the kit with its outputs, as executed by `make figures` at the "
        f"**{scale}** scale: read it, look at the figures, then run it yourself. Interactive cells show "
        "the figure they drew at their defaults; their controls work in JupyterLab "
        "(from a clone of the kit: `make lab`, or `pip install -e .` then `jupyter lab notebooks/`).", "",
        "## The course path", "", _link_notebooks(course, built), "",
    ]
    if intro:
        lines += ["## What each notebook teaches", "", _link_notebooks(intro, built), ""]
    lines += ["## Figures", "",
              "[The figure gallery](gallery.md): every figure of the three papers that the notebooks regenerated, "
              "with its caption, the scale it was made at, and an animated GIF of each animation (for slides).", "",
              "```{toctree}", ":hidden:", ":maxdepth: 1", ""] + [f"{s}.ipynb" for s in built] + ["gallery.md", "```", ""]
    return "\n".join(lines)


def gallery_page(manifest: dict[str, dict[str, Any]], built: list[str]) -> str:
    """gallery.md: one card per figure of the manifest (catalogue order), the GIF or PNG linking to the interactive figure."""
    lines = ["# Figure gallery", "",
             "Each figure as its notebook saved it (click it for the interactive version). "
             "<a href=\"figures/index.html\">The same gallery as a standalone page</a>.", ""]
    for fig_id, entry in CATALOGUE.items():
        rec = manifest.get(fig_id)
        if rec is None:
            continue
        files = rec["files"]
        img = next((f for f in (f"{fig_id}.gif", f"{fig_id}.png") if f in files), None)
        page = f"{fig_id}.html"
        nb = rec.get("notebook", "")
        nb_link = f"[{nb}]({nb}.ipynb)" if nb in built else f"`{nb}`"
        lines += [f"## {fig_id}: {entry['title']}", "", entry["caption"], "",
                  f"*Scale* `{rec['scale']}` · *notebook* {nb_link}" + (f" · *at this scale*: {rec['note']}" if rec.get("note") else ""), ""]
        body = (f'<a href="figures/{page}"><img src="figures/{img}" alt="{html.escape(fig_id)}" loading="lazy"></a>'
                if img else f'<a href="figures/{page}">open {html.escape(fig_id)}</a>')
        if f"{fig_id}.gif" in files:
            body += f'<br><a href="figures/{fig_id}.gif">GIF</a>' + (
                f' · <a href="figures/{fig_id}.mp4">MP4</a>' if f"{fig_id}.mp4" in files else "") + " (for slides)"
        lines += [f'<div class="nc-gallery">{body}</div>', ""]
    if not any(k in manifest for k in CATALOGUE):
        lines += ["No figure has been made yet: run `make figures`.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- offline assets
def plotly_js() -> Path:
    """plotly.min.js as shipped inside the plotly Python package."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.exists():
        raise RuntimeError(f"plotly.min.js not found at {path}: reinstall plotly.")
    return path


def mathjax_dir() -> Path:
    """MathJax 3's ``es5`` folder as shipped by the ``django-static-mathjax`` package (the ``book`` extra)."""
    try:
        import mathjax
    except ImportError:
        raise RuntimeError("MathJax is missing: pip install -e '.[book]' (make book does it).") from None
    path = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (path / "tex-mml-chtml.js").exists():
        raise RuntimeError(f"MathJax's tex-mml-chtml.js not found under {path}: reinstall django-static-mathjax.")
    return path


def write_favicon(path: Path) -> None:
    """A 32 px icon (three class means at the corners of a simplex), so browsers find one and log no 404."""
    from PIL import Image, ImageDraw

    im = Image.new("RGBA", (32, 32), (255, 255, 255, 0))
    draw = ImageDraw.Draw(im)
    corners = [(16, 3), (3, 27), (29, 27)]
    draw.polygon(corners, outline=(90, 90, 90, 255), width=2)
    for (x, y), colour in zip(corners, [(31, 119, 180), (214, 39, 40), (44, 160, 44)]):
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour + (255,))

    def write(tmp: Path) -> None:
        im.save(tmp, format="ICO")

    atomic_write_with(path, write, fsync=False)


def _copy(src: Path, dst: Path) -> None:
    """Copy a file, or a folder's files, each written atomically (a missing ``src`` copies nothing)."""
    files = [(f, dst / f.relative_to(src)) for f in src.rglob("*") if f.is_file()] if src.is_dir() else \
        [(src, dst)] if src.exists() else []
    for a, b in files:
        atomic_write_with(b, lambda tmp, a=a: shutil.copyfile(a, tmp), fsync=False)


def _clear(folder: Path, marker: str) -> None:
    """Delete a previous build in ``folder``; refuse a non-empty folder that lacks ``marker`` (not one of ours)."""
    if folder.exists() and any(folder.iterdir()) and not (folder / marker).exists():
        raise ValueError(f"{folder} is not empty and holds no previous book build ({marker} is missing): "
                         "choose a new or empty folder for --out.")
    shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- build
def build_book(executed: Path, out: Path, *, figures: Path | None = None, scale: str = "quick",
               src: Path | None = None, quiet: bool = True) -> dict[str, Any]:
    """Build the site from the executed notebooks in ``executed`` into ``out``; returns a summary
    (``pages``, ``plotly`` figures per page, ``controls`` noted, ``missing`` notebooks, ``seconds``)."""
    t0 = time.perf_counter()
    check_choice("scale", scale, SCALES)
    executed, out = Path(executed), Path(out)
    figures = Path(figures or figures_dir())
    src = Path(src or out.parent / (out.name + "-src"))
    course = [p.stem for p in notebooks()]
    built = [s for s in course if (executed / f"{s}.ipynb").exists()]
    if not built:
        raise FileNotFoundError(f"no executed notebook in {executed}: run `make figures SCALE={scale}` first "
                                f"(it executes the notebooks of {NOTEBOOK_DIR} into build/notebooks/{scale}/).")
    _clear(src, "conf.py")
    _clear(out, ".buildinfo")
    (src / "_static").mkdir(parents=True)
    summary: dict[str, Any] = {"pages": ["index", "gallery"] + built, "plotly": {}, "controls": {},
                               "missing": [s for s in course if s not in built]}
    for stem in built:
        nb, counts = prepare_notebook(json.loads((executed / f"{stem}.ipynb").read_text(encoding="utf-8")), stem)
        atomic_write_bytes(src / f"{stem}.ipynb", json.dumps(nb), fsync=False)
        summary["plotly"][stem] = counts["plotly"]
        summary["controls"][stem] = counts["controls"]
    manifest = read_manifest(figures)
    atomic_write_bytes(src / "index.md", landing_page(built, scale), fsync=False)
    atomic_write_bytes(src / "gallery.md", gallery_page(manifest, built), fsync=False)
    atomic_write_bytes(src / "conf.py", CONF_PY.format(), fsync=False)
    atomic_write_bytes(src / "_static" / "nc-book.css", CSS, fsync=False)
    atomic_write_bytes(src / "_static" / "nc-plotly-fit.js", FIT_JS, fsync=False)
    _copy(plotly_js(), src / "_static" / "plotly.min.js")
    mj = mathjax_dir()
    for part in MATHJAX_PARTS:
        _copy(mj / part, src / "_static" / "mathjax" / part)
    fig_out = src / "_extra" / "figures"
    fig_out.mkdir(parents=True)
    for rec in manifest.values():
        for name in rec["files"]:
            _copy(figures / name, fig_out / name)
    _copy(figures / "manifest.json", fig_out / "manifest.json")
    if manifest:
        write_gallery(fig_out)  # the standalone gallery of exactly the files copied
        (fig_out / "README.md").unlink(missing_ok=True)
        _copy(figures / "plotly.min.js", fig_out / "plotly.min.js")
    write_favicon(src / "_static" / "favicon.ico")
    _copy(src / "_static" / "favicon.ico", src / "_extra" / "favicon.ico")  # for the standalone pages
    from sphinx.application import Sphinx

    status = None if quiet else sys.stdout
    with warnings.catch_warnings():  # Sphinx's notices to extension authors are not the reader's business
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        app = Sphinx(str(src), str(src), str(out), str(src / "_doctrees"), "html", status=status,
                     warning=sys.stderr, freshenv=True, verbosity=0)
        app.build()
    if app.statuscode:
        raise RuntimeError(f"Sphinx failed (status {app.statuscode}); see the messages above.")
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["index"] = out / "index.html"
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the course as a static site from the executed notebooks.")
    parser.add_argument("--scale", default="quick", help=f"one of {SCALES} (default quick)")
    parser.add_argument("--executed", default=None, help="executed notebooks (default build/notebooks/<scale>)")
    parser.add_argument("--figures", default=None, help="figure folder (default figures/, or $NC_FIGURES_DIR)")
    parser.add_argument("--out", default=str(REPO_ROOT / "build" / "book"))
    args = parser.parse_args(argv)
    try:
        check_choice("SCALE", args.scale, SCALES)
        executed = Path(args.executed or REPO_ROOT / "build" / "notebooks" / args.scale)
        summary = build_book(executed, Path(args.out), figures=Path(args.figures) if args.figures else None,
                             scale=args.scale)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if summary["missing"]:
        print(f"[book] not executed at scale {args.scale}, so not in the site: {', '.join(summary['missing'])}")
    print(f"[book] {len(summary['pages'])} pages, {sum(summary['plotly'].values())} plotly figures, in "
          f"{summary['seconds']} s: {summary['index']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
