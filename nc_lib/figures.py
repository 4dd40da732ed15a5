"""The figure pipeline: every figure under its catalogue id, a manifest, a gallery, one command.

* :func:`save_figure` writes a plotly figure as ``figures/<id>.html`` (interactive, frames kept)
  and ``figures/<id>.png`` (static, through kaleido and a Chromium; skipped with a one-line
  message where none is installed), and, for an animation, ``figures/<id>.gif`` (and ``<id>.mp4``
  where imageio-ffmpeg is installed) for slides; it records them in ``figures/manifest.json`` with
  its paper, title, notebook, scale, parameters, commit and time.
* :func:`save_table` does the same for tables: ``<id>.html`` and ``<id>.csv``.
* Every file is written through :mod:`nc_lib.atomic_io` (a temporary file in the same folder, renamed
  into place): a writer killed halfway leaves the previous file and a manifest that lists only
  complete files; :func:`write_gallery` removes the temporaries such a writer left behind.
* ``python -m nc_lib.figures --scale quick [--only ID_OR_PREFIX] [--jobs auto|N]`` (what ``make figures`` runs)
  executes the notebooks that own the requested ids with papermill, using the parameter preset
  ``notebooks/presets/<notebook>.<scale>.yaml``, writes the executed notebooks to
  ``build/notebooks/<scale>/``, reports each notebook's time, and regenerates the gallery
  (``figures/index.html`` and ``figures/README.md``). ``--jobs`` notebooks run side by side, each in its own
  process (auto: 2 at quick scale, whose presets train on one thread per notebook); the manifest is
  updated under a lock.

The catalogue (:data:`CATALOGUE`) is REFERENCE.md section 5: every id, its paper, its caption in
our words, and the notebook that makes it.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import functools
import html
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from .atomic_io import atomic_write_bytes, atomic_write_with, remove_stale_temporaries, temporary_path
from .paths import REPO_ROOT, figures_dir, pin_env_dirs
from .validation import SCALES, check_choice, check_int

PAPERS = {
    "papyan2020": "Papyan, Han, Donoho (2020), Prevalence of neural collapse during the terminal phase of deep learning training",
    "zhu2021": "Zhu et al. (2021), A geometric analysis of neural collapse with unconstrained features",
    "markou2024": "Markou, Ajanthan, Gould (2024), Guiding neural collapse: optimising towards the nearest simplex ETF",
}


def _entry(title: str, caption: str, notebook: str, kind: str = "figure") -> dict[str, str]:
    return {"title": title, "caption": caption, "notebook": notebook, "kind": kind}


_NB00, _NB01, _NB03, _NB04, _NB05 = ("00_simplex_etf", "01_unconstrained_features", "03_terminal_phase",
                                     "04_fixed_etf_classifier", "05_nearest_etf")
_PAPYAN_PANELS = {
    "fig2": ("Equinorm", "Class means and classifier rows become equal in length: the coefficient of variation of their norms falls toward zero during the terminal phase."),
    "fig3": ("Equiangularity", "The spread of the pairwise cosines between centred class means (and between classifier rows) shrinks toward zero."),
    "fig4": ("Maximal angle", "The pairwise cosines approach -1/(C-1), the largest angle C equal vectors can share."),
    "fig5": ("Self-duality", "The normalised classifier and the normalised centred class means converge to each other."),
    "fig6": ("Within-class variability", "Tr(Sigma_W Sigma_B^+)/C, on a log scale: features collapse to their class means."),
    "fig7": ("NCC mismatch", "On test data, the network's decision agrees more and more with the nearest class-centre rule."),
    "fig8": ("Robustness", "DeepFool's average relative perturbation needed to change the decision grows during the terminal phase."),
}

CATALOGUE: dict[str, dict[str, str]] = {
    "papyan2020_fig1": _entry("Neural collapse, animated", "Features, class means and classifier rows of a C = 3 (or 4) problem converging to the simplex ETF during training; here on the unconstrained features model.", _NB01),
    "papyan2020_fig1_network": _entry("Neural collapse in a trained network, animated", "The same picture as papyan2020_fig1 for a real network trained into the terminal phase: a feature sample, the class means and the classifier rows at each measurement epoch.", _NB03),
    **{f"papyan2020_{k}": _entry(t, c + " One panel per dataset, one curve per network; the dashed line marks the onset of the terminal phase (first epoch with zero training error).", _NB03)
       for k, (t, c) in _PAPYAN_PANELS.items()},
    "papyan2020_table1": _entry("Test accuracy at zero training error and at the end", "Test accuracy at the first epoch of zero training error and at the last epoch, per dataset and network: training into the terminal phase does not hurt, and usually helps.", _NB03, "table"),
    "zhu2021_fig1": _entry("Classifiers and class means form a simplex ETF", "At collapse, the classifier rows and the class means are the same simplex ETF up to scale: equal norms, equal pairwise angles of arccos(-1/(C-1)).", _NB00),
    "zhu2021_fig2": _entry("The unconstrained features model", "The network body is replaced by free feature variables H, optimised jointly with the classifier (W, b) under cross-entropy and weight decay.", _NB01),
    "zhu2021_fig3": _entry("Collapse under different optimisers", "NC1-NC4 and train/test accuracy across epochs for SGD, Adam and LBFGS: all reach collapse.", _NB04),
    "zhu2021_fig3_mnist": _entry("Collapse under different optimisers (MNIST, appendix)", "The optimiser comparison on MNIST.", _NB04),
    "zhu2021_fig4": _entry("Validity of the unconstrained features model", "Random labels: wider and deeper networks collapse more fully, as if their features were free variables.", _NB04),
    "zhu2021_fig5": _entry("Weight decay on the features versus on the network", "Penalising the raw penultimate features gives the same collapse as penalising the network's weights.", _NB04),
    "zhu2021_fig6": _entry("Fixed ETF classifier and feature dimension", "Learned versus fixed ETF classifier, feature dimension 512 versus C: the same collapse and accuracy with fewer parameters.", _NB04),
    "zhu2021_fig6_resnet50": _entry("Fixed ETF classifier, ResNet50 (appendix)", "The fixed-classifier experiment with ResNet50, d = 2048 versus d = C.", _NB04),
    "zhu2021_table1": _entry("Parameters and memory of the four variants", "Trainable parameters, measured peak training memory and test accuracy for learned/fixed W and d = 512/C.", _NB04, "table"),
    "markou2024_fig1": _entry("The implicit ETF classifier", "Features are normalised and averaged per class; a declarative node finds the nearest simplex ETF U*; the classifier is W = U* M; gradients flow through the features and through the node.", _NB05),
    "markou2024_fig2": _entry("UFM-10: standard, fixed ETF and implicit ETF classifiers", "Loss, average cosine margin, per-sample cosine margins at the end, NC1, NC3 and WH-equinorm; median and range over seeds.", _NB05),
    "markou2024_fig3": _entry("UFM accuracy as the number of classes grows", "Top-1 training accuracy of the UFM over iterations for C = 10, 100, 200, 1000.", _NB05),
    "markou2024_fig4": _entry("ImageNet, ResNet50", "The same panels on ImageNet with ResNet50, plus train and test top-1.", _NB05),
    "markou2024_fig5": _entry("Cost of the implicit ETF classifier", "(a) forward time per method, the implicit head's mean and median; (b) forward and backward time per method.", _NB05),
    **{f"markou2024_appendix_{k}": _entry(t, c, _NB05) for k, (t, c) in {
        "cifar10_resnet18": ("CIFAR10, ResNet18 (appendix)", "The panel set of Fig. 2 on CIFAR10 with ResNet18."),
        "cifar100_resnet50": ("CIFAR100, ResNet50 (appendix)", "The panel set of Fig. 2 on CIFAR100 with ResNet50."),
        "stl10": ("STL10 (appendix)", "The panel set of Fig. 2 on STL10."),
        "vgg13": ("VGG13 (appendix)", "The panel set of Fig. 2 with VGG13."),
        "ufm100": ("UFM-100 (appendix)", "The panel set of Fig. 2 on the UFM with C = 100."),
        "ufm200": ("UFM-200 (appendix)", "The panel set of Fig. 2 on the UFM with C = 200."),
        "ufm1000": ("UFM-1000 (appendix)", "The panel set of Fig. 2 on the UFM with C = 1000."),
        "node_gradient": ("With and without the node's gradient (appendix)", "The implicit ETF classifier trained with and without backpropagation through the declarative node."),
        "standard_normalisation": ("Standard classifier with and without normalisation (appendix)", "The learned classifier with and without feature and row normalisation."),
        "cost": ("Cost on other settings (appendix)", "Forward and backward time of each method on other datasets and networks."),
    }.items()},
    "markou2024_table1": _entry("Train top-1 at epochs 50 and 200", "Median [range] over seeds of train top-1 accuracy, per dataset, network and method.", _NB05, "table"),
    "markou2024_table2": _entry("Test top-1 at epochs 50 and 200", "Median [range] over seeds of test top-1 accuracy, per dataset, network and method.", _NB05, "table"),
    "markou2024_table3": _entry("Memory per method", "Peak memory per method, the implicit ETF head with and without the node's backward.", _NB05, "table"),
    # the course's own figures (notebook 06: a network the kit did not build), beyond the three papers
    **{f"ownnet_{k}": _entry(t, c, "06_your_own_network") for k, (t, c) in {
        "monitor": ("Collapse in your own training loop", "A torchvision ResNet18 trained on Fashion-MNIST by a hand-written loop, measured by CollapseMonitor: training error, NC1, equiangularity, self-duality and test NCC mismatch against the epoch."),
        "collapse_by_depth": ("Collapse by depth", "NC1 of the globally average-pooled output of every block of the trained ResNet18 (measure_model with layers='all'): within-class variability falls block by block."),
        "ce_vs_mse": ("Cross-entropy against the squared loss", "The same ResNet18, data and optimiser trained with cross-entropy and with MSE on one-hot targets (Papyan's Colab; Han et al. 2022): both collapse."),
        "minority_collapse": ("Minority collapse", "Cosines between the classifier rows of a balanced and of an imbalanced run (5 majority, 5 minority classes, step profile), by kind of pair, against the simplex ETF's -1/(C-1) (Fang et al. 2021)."),
    }.items()},
}
for _id, _e in CATALOGUE.items():
    _e["paper"] = _id.split("_")[0]


# --------------------------------------------------------------------------- saving
def _check_id(fig_id: str) -> dict[str, str]:
    if fig_id not in CATALOGUE:
        close = [k for k in CATALOGUE if k.split("_")[0] == fig_id.split("_")[0]] or list(CATALOGUE)
        raise ValueError(f"fig_id={fig_id!r} is not in the catalogue; valid ids include {close}.")
    return CATALOGUE[fig_id]


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _jsonable(params: dict[str, Any] | None) -> dict[str, Any]:
    return json.loads(json.dumps(params or {}, default=str))


def read_manifest(out_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """The manifest, id -> record ({} when none has been written)."""
    path = (out_dir or figures_dir()) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _record(fig_id: str, files: list[str], scale: str, params: dict[str, Any] | None, notebook: str | None,
            note: str, out_dir: Path, seconds: float | None) -> dict[str, Any]:
    entry = _check_id(fig_id)
    record = {
        "id": fig_id, "paper": entry["paper"], "title": entry["title"], "kind": entry["kind"],
        "notebook": notebook or os.environ.get("NC_NOTEBOOK") or entry["notebook"],
        "scale": scale, "parameters": _jsonable(params), "note": note, "files": files,
        "commit": _commit(), "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if seconds is not None:
        record["seconds"] = round(float(seconds), 2)
    with _manifest_lock(out_dir):  # notebooks run side by side (``--jobs``): no record lost between read and write
        manifest = read_manifest(out_dir)
        manifest[fig_id] = record
        atomic_write_bytes(out_dir / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
    return record


@contextlib.contextmanager
def _manifest_lock(out_dir: Path) -> Iterator[None]:
    """An exclusive lock (``fcntl.flock`` on the figures folder itself: no lock file among the figures) around a
    read-modify-write of the manifest; the operating system drops it when its holder dies."""
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


_CHROME_WARNED = False
_KALEIDO_SERVER = False


def chromium_path() -> str | None:
    """A Chromium or Chrome executable for static export, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return os.environ.get("BROWSER_PATH") if os.environ.get("BROWSER_PATH") and Path(os.environ["BROWSER_PATH"]).exists() else None


def _write_png(fig: Any, path: Path) -> bool:
    global _CHROME_WARNED, _KALEIDO_SERVER
    if chromium_path() is None:
        if not _CHROME_WARNED:
            print("PNG export skipped: no Chromium found (install one with `apt-get install chromium`, "
                  "or run `make setup` as root); HTML figures are written regardless.", file=sys.stderr)
            _CHROME_WARNED = True
        return False
    import warnings

    import kaleido
    if not _KALEIDO_SERVER and hasattr(kaleido, "start_sync_server"):
        try:  # keep one browser alive across figures: ~0.2 s a PNG instead of ~4 s
            kaleido.start_sync_server(silence_warnings=True)
            _KALEIDO_SERVER = True
        except Exception:  # noqa: BLE001 - fall back to one browser per figure
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atomic_write_with(path, lambda tmp: fig.write_image(
            str(tmp), format="png", width=fig.layout.width or 1100, height=fig.layout.height or 650))
    return True


def write_png(fig: Any, path: str | Path) -> bool:
    """Write ``fig`` as a static PNG at ``path`` (atomically, through kaleido and a Chromium); False, with a one-line
    message, where there is no Chromium."""
    return _write_png(fig, Path(path))


@functools.lru_cache(maxsize=1)
def _plotlyjs_bundle() -> bytes:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs().encode()


def _write_plotlyjs(out: Path) -> None:
    """``plotly.min.js`` beside the figures (what ``include_plotlyjs="directory"`` pages load), written when
    missing or incomplete."""
    path = out / "plotly.min.js"
    bundle = _plotlyjs_bundle()
    if not path.exists() or path.stat().st_size != len(bundle):
        atomic_write_bytes(path, bundle)


#: Frames and time per frame of the GIF (and MP4) that :func:`save_figure` writes for an animation.
GIF_FRAMES = 20
GIF_FRAME_MS = 200


def _write_animation(fig: Any, path: Path) -> list[str]:
    """``<id>.gif`` (and ``<id>.mp4``) of an animated figure; none without a Chromium (as for the PNG)."""
    if chromium_path() is None:
        return []
    from .animation import save_animation

    written = save_animation(fig, path, frames=min(GIF_FRAMES, len(fig.frames)), duration_ms=GIF_FRAME_MS)
    return [p.name for p in written]


def save_figure(fig: Any, fig_id: str, *, scale: str, params: dict[str, Any] | None = None,
                notebook: str | None = None, note: str = "", png_frame: int | None = None,
                seconds: float | None = None, out_dir: Path | None = None) -> dict[str, Any]:
    """Save a plotly figure as ``<id>.html`` and ``<id>.png`` and record it in the manifest.

    ``scale`` is "quick" or "paper"; ``params`` the parameters that made it; ``note`` says what
    differs from the paper at this scale (shown in the gallery). For an animation the HTML keeps
    the frames, the PNG shows frame ``png_frame`` (default: the last frame), and ``<id>.gif`` (plus
    ``<id>.mp4`` where an encoder is installed) plays :data:`GIF_FRAMES` of them for slides.
    """
    _check_id(fig_id)
    check_choice("scale", scale, SCALES)
    out = Path(out_dir or figures_dir())
    out.mkdir(parents=True, exist_ok=True)
    if not fig.layout.title.text:
        fig.update_layout(title=CATALOGUE[fig_id]["title"])
    html_path = out / f"{fig_id}.html"
    # plotly.js is written once beside the figures ("directory"): the pages work offline and stay small
    _write_plotlyjs(out)
    atomic_write_bytes(html_path, fig.to_html(include_plotlyjs="directory", auto_play=False))
    files = [html_path.name]
    static = fig
    if fig.frames:
        import plotly.graph_objects as go
        k = len(fig.frames) - 1 if png_frame is None else png_frame
        static = go.Figure(fig)
        frame = fig.frames[k]
        for i, tr in zip(frame.traces or range(len(frame.data)), frame.data):
            static.data[i].update(tr)
        static.frames = ()
        static.layout.updatemenus = ()
        static.layout.sliders = ()
    if _write_png(static, out / f"{fig_id}.png"):
        files.append(f"{fig_id}.png")
    if fig.frames:
        files += _write_animation(fig, out / f"{fig_id}.gif")
    return _record(fig_id, files, scale, params, notebook, note, out, seconds)


def save_table(rows: list[dict[str, Any]], table_id: str, *, scale: str, params: dict[str, Any] | None = None,
               notebook: str | None = None, note: str = "", out_dir: Path | None = None) -> dict[str, Any]:
    """Save a table (a list of row dicts, same keys) as ``<id>.csv`` and ``<id>.html``, recorded in the manifest."""
    _check_id(table_id)
    check_choice("scale", scale, SCALES)
    if not rows:
        raise ValueError(f"table {table_id!r} has no rows.")
    out = Path(out_dir or figures_dir())
    out.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / f"{table_id}.csv", buf.getvalue())

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(c, '')))}</td>" for c in columns) + "</tr>" for r in rows)
    title = html.escape(CATALOGUE[table_id]["title"])
    page = (f"<!doctype html><meta charset='utf-8'><title>{title}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}th{background:#f3f3f3}</style>"
            f"<h2>{title}</h2><p>{html.escape(CATALOGUE[table_id]['caption'])}</p>"
            f"<table><tr>{head}</tr>{body}</table><p>scale: {scale}. {html.escape(note)}</p>")
    atomic_write_bytes(out / f"{table_id}.html", page)
    return _record(table_id, [f"{table_id}.html", f"{table_id}.csv"], scale, params, notebook, note, out, None)


# --------------------------------------------------------------------------- gallery
def write_gallery(out_dir: Path | None = None, timings: dict[str, float] | None = None) -> Path:
    """Regenerate ``index.html`` and ``README.md`` listing every figure of the manifest with its caption, and
    remove the temporary files of writers that were killed."""
    out = Path(out_dir or figures_dir())
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out, recursive=False)
    manifest = read_manifest(out)
    missing = [k for k in CATALOGUE if k not in manifest]
    md = ["# Figure gallery", "", "Generated by `make figures`; do not edit. Each entry: the paper's figure in our words, "
          "the scale it was made at and what differs from the paper there.", ""]
    cards = []
    for fig_id in CATALOGUE:
        if fig_id not in manifest:
            continue
        rec, entry = manifest[fig_id], CATALOGUE[fig_id]
        img = next((f"{fig_id}.{ext}" for ext in ("gif", "png") if f"{fig_id}.{ext}" in rec["files"]), None)
        link = f"{fig_id}.html"
        md += [f"## {fig_id}: {entry['title']}", "", entry["caption"], "",
               f"*Scale*: `{rec['scale']}` · *notebook*: `{rec['notebook']}` · *commit*: `{rec['commit']}`"
               + (f" · *made in*: {rec['seconds']} s" if "seconds" in rec else ""), ""]
        if rec.get("note"):
            md += [f"*At this scale*: {rec['note']}", ""]
        md += [f"[![{fig_id}]({img})]({link})" if img else f"[{link}]({link})", ""]
        cards.append(
            f"<div class='card'><h3>{html.escape(fig_id)}: {html.escape(entry['title'])}</h3>"
            + (f"<a href='{link}'><img src='{img}' loading='lazy'></a>" if img else f"<a href='{link}'>open</a>")
            + (f"<p class='meta'>animation: <a href='{fig_id}.gif'>GIF</a>"
               + (f", <a href='{fig_id}.mp4'>MP4</a>" if f"{fig_id}.mp4" in rec["files"] else "") + " (for slides)</p>"
               if f"{fig_id}.gif" in rec["files"] else "")
            + f"<p>{html.escape(entry['caption'])}</p><p class='meta'>scale <b>{rec['scale']}</b>, notebook "
            f"{html.escape(rec['notebook'])}, commit {rec['commit']}</p>"
            + (f"<p class='note'>At this scale: {html.escape(rec['note'])}</p>" if rec.get("note") else "") + "</div>")
    if missing:
        md += ["## Not yet generated", "", ", ".join(f"`{m}`" for m in missing), ""]
    if timings:
        md += ["## Time per notebook", "", "| notebook | seconds |", "|---|---|"]
        md += [f"| {k} | {v:.1f} |" for k, v in timings.items()] + [f"| total | {sum(timings.values()):.1f} |", ""]
    atomic_write_bytes(out / "README.md", "\n".join(md))
    page = ("<!doctype html><meta charset='utf-8'><title>Neural collapse: figure gallery</title><style>"
            "body{font-family:sans-serif;margin:2em;background:#fafafa}.grid{display:grid;grid-template-columns:"
            "repeat(auto-fill,minmax(420px,1fr));gap:1em}.card{background:white;padding:1em;border:1px solid #ddd}"
            "img{width:100%}.meta{color:#666;font-size:90%}.note{color:#a50}</style>"
            "<h1>Neural collapse: figure gallery</h1><div class='grid'>" + "".join(cards) + "</div>"
            + (f"<p>Not yet generated: {html.escape(', '.join(missing))}</p>" if missing else ""))
    atomic_write_bytes(out / "index.html", page)
    return out / "index.html"


# --------------------------------------------------------------------------- running notebooks
NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def notebooks() -> list[Path]:
    """Every notebook of the course, in order."""
    return sorted(p for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def preset(notebook: Path, scale: str) -> dict[str, Any]:
    """The papermill parameters of ``notebook`` at ``scale`` (``notebooks/presets/<stem>.<scale>.yaml``)."""
    import yaml

    check_choice("scale", scale, SCALES)
    path = notebook.parent / "presets" / f"{notebook.stem}.{scale}.yaml"
    params = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    params["scale"] = scale
    return params


def select_notebooks(only: str | None) -> list[Path]:
    """The notebooks that make the ids matching ``only`` (an id, a prefix such as ``zhu2021``, or a notebook name)."""
    books = notebooks()
    if not only:
        return books
    stems = {CATALOGUE[k]["notebook"] for k in CATALOGUE if k == only or k.startswith(only)}
    chosen = [b for b in books if b.stem in stems or b.stem == only or b.name == only]
    if not chosen:
        raise ValueError(f"ONLY={only!r} matches no figure id, paper prefix or notebook; choose an id such as "
                         f"'zhu2021_fig1', a prefix among {sorted(PAPERS)}, or a notebook among {[b.stem for b in books]}.")
    return chosen


def run_notebook(notebook: Path, scale: str, build_dir: Path, extra: dict[str, Any] | None = None,
                 timeout: int | None = None) -> float:
    """Execute one notebook with papermill at ``scale``; returns seconds taken."""
    import warnings

    import papermill as pm

    build_dir.mkdir(parents=True, exist_ok=True)
    params = {**preset(notebook, scale), **(extra or {})}
    pin_env_dirs()  # the kernel runs in notebooks/: a relative NC_RUNS_DIR=runs means the caller's runs/
    os.environ["NC_NOTEBOOK"] = notebook.stem
    # papermill has no widget manager: the kernel draws plain figures (nc_lib.frontend), unless NC_WIDGETS says
    widgets_env = os.environ.get("NC_WIDGETS")
    os.environ["NC_WIDGETS"] = widgets_env or "0"
    # papermill rewrites its output as the cells run: into a temporary file, renamed into place at the end
    # (also when a cell failed, so that the notebook shows the error)
    out, tmp = build_dir / notebook.name, temporary_path(build_dir / notebook.name)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():  # papermill warns that the temporary's name does not end in .ipynb
            warnings.filterwarnings("ignore", message=r"The specified file .* does not end in")
            pm.execute_notebook(str(notebook), str(tmp), parameters=params, cwd=str(notebook.parent),
                                kernel_name="python3", progress_bar=False, execution_timeout=timeout)
    finally:
        if tmp.exists():
            os.replace(tmp, out)
        os.environ.pop("NC_NOTEBOOK", None)
        if widgets_env is None:
            os.environ.pop("NC_WIDGETS", None)
        else:
            os.environ["NC_WIDGETS"] = widgets_env
    return time.perf_counter() - t0


def figure_jobs(jobs: str | int, scale: str) -> int:
    """How many notebooks ``make figures`` runs side by side: ``jobs`` (an int >= 1), or "auto": 2 at quick scale
    (its presets train on one thread per notebook) on a machine with at least 2 cores, else 1."""
    if str(jobs) == "auto":
        return 2 if scale == "quick" and (os.cpu_count() or 1) >= 2 else 1
    text = str(jobs).strip()
    try:
        return check_int("jobs", int(text) if text.lstrip("-").isdigit() else jobs, 1)
    except ValueError as err:
        raise ValueError(f"{err} Give a number of notebooks >= 1 or 'auto'.") from None


def execute_notebooks(books: list[Path], scale: str, build_dir: Path, jobs: int = 1,
                      extra: dict[str, Any] | None = None, timeout: int | None = None) -> dict[str, float | BaseException]:
    """Execute every one of ``books`` with papermill at ``scale`` (:func:`run_notebook`, with the ``extra``
    parameters and the per-cell ``timeout``), ``jobs`` at a time, each side-by-side notebook in a process of its
    own. Returns {notebook stem: seconds, or the exception it failed with}: one failure stops no other notebook."""
    def attempt(run: Any) -> float | BaseException:
        try:
            return run()
        except Exception as err:  # noqa: BLE001 -- the caller decides
            return err

    def report(nb: Path, outcome: float | BaseException) -> None:
        if isinstance(outcome, BaseException):
            print(f"[figures] {nb.name} failed: {type(outcome).__name__}: {str(outcome)[:300]}", flush=True)
        else:
            print(f"[figures] {nb.name}: {outcome:.1f} s", flush=True)

    outcomes: dict[str, float | BaseException] = {}
    if jobs == 1 or len(books) < 2:
        for nb in books:
            print(f"[figures] {nb.name} at scale {scale} ...", flush=True)
            outcomes[nb.stem] = attempt(functools.partial(run_notebook, nb, scale, build_dir, extra, timeout))
            report(nb, outcomes[nb.stem])
        return outcomes
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        print(f"[figures] {len(books)} notebooks at scale {scale}, {jobs} at a time ...", flush=True)
        futures = {nb: pool.submit(run_notebook, nb, scale, build_dir, extra, timeout) for nb in books}
        for nb, fut in futures.items():
            outcomes[nb.stem] = attempt(fut.result)
            report(nb, outcomes[nb.stem])
    return outcomes


def run_notebooks(books: list[Path], scale: str, build_dir: Path, jobs: int = 1,
                  extra: dict[str, Any] | None = None) -> dict[str, float]:
    """:func:`execute_notebooks`, then the first failure raised (after every notebook ran); returns
    {notebook stem: seconds}."""
    outcomes = execute_notebooks(books, scale, build_dir, jobs, extra)
    errors = [o for o in outcomes.values() if isinstance(o, BaseException)]
    if errors:
        raise errors[0]
    return {k: float(v) for k, v in outcomes.items()}  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the figures of the kit by running its notebooks.")
    parser.add_argument("--scale", default="quick", help=f"one of {SCALES} (default quick)")
    parser.add_argument("--only", default="", help="a figure id, a paper prefix or a notebook name")
    parser.add_argument("--build", default=str(REPO_ROOT / "build" / "notebooks"))
    parser.add_argument("--jobs", default="auto",
                        help="notebooks run side by side: a number >= 1, or auto (2 at quick scale, whose notebooks "
                             "train on one thread each, where the machine has 2 cores or more; else 1)")
    args = parser.parse_args(argv)
    try:
        check_choice("SCALE", args.scale, SCALES)
        jobs = figure_jobs(args.jobs, args.scale)
        if Path(args.build).exists() and not Path(args.build).is_dir():
            raise ValueError(f"--build={args.build!r} is a file, not a folder; give the folder the executed "
                             "notebooks go to (default build/notebooks).")
        books = select_notebooks(args.only or None)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    timings = run_notebooks(books, args.scale, Path(args.build) / args.scale, jobs)
    wall = time.perf_counter() - t0
    gallery = write_gallery(timings=timings)
    manifest = read_manifest()
    print(f"[figures] {len(manifest)} of {len(CATALOGUE)} catalogue ids in {figures_dir() / 'manifest.json'}; "
          f"{sum(timings.values()):.1f} s of notebooks in {wall:.1f} s ({jobs} at a time); gallery: {gallery}")
    print(f"[figures] executed notebooks in {Path(args.build) / args.scale}; `make book SCALE={args.scale}` builds "
          f"the course as a static site from them in {REPO_ROOT / 'build' / 'book'} (open index.html there).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
