"""Plotly animations as an animated GIF (and an MP4) for slides, rendered frame by frame through kaleido.

A plotly animation is a base figure plus ``fig.frames``; a frame replaces the data of the traces it names
(``frame.traces``, or the first ``len(frame.data)`` traces when it names none) and may update the layout.
:func:`frame_figure` builds the static figure of one frame (no play button, no slider, and a label
such as "step 300" in the corner, taken from the slider's prefix and the frame's name, so a slide shows
where the animation is). :func:`save_animation` renders the chosen frames to PNG through kaleido (it needs a
Chromium), assembles them with Pillow into a looping GIF (an adaptive palette per frame, no dithering:
plots are flat colours) and, where ``imageio-ffmpeg`` is installed, with its ffmpeg into an H.264 MP4.
Every file is written atomically (:mod:`nc_lib.atomic_io`).
"""
from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any, Sequence

from .atomic_io import atomic_write_with
from .validation import check_int

#: Slides: no frame wider than this many pixels.
MAX_WIDTH = 1280
#: Per-frame time when neither the caller nor the figure's play button says.
DEFAULT_FRAME_MS = 120
#: How long the last frame stays before the GIF loops, so the end state can be seen.
DEFAULT_HOLD_LAST_MS = 1500

_FFMPEG_WARNED = False


def frame_indices(n_frames: int, frames: int | Sequence[int] | None) -> list[int]:
    """Which frames to render: all (None), ``frames`` evenly spaced ones with the first and the last
    (an int), or the given indices (a sequence, in order)."""
    if n_frames < 1:
        raise ValueError("the figure has no frames (fig.frames is empty): it is not an animation.")
    if frames is None:
        return list(range(n_frames))
    if isinstance(frames, int) and not isinstance(frames, bool):
        k = check_int("frames", frames, 2 if n_frames >= 2 else 1, n_frames)
        return [round(i * (n_frames - 1) / (k - 1)) for i in range(k)] if k > 1 else [0]
    idx = [check_int("frames[i]", i, 0, n_frames - 1) for i in frames]
    if not idx:
        raise ValueError("frames must name at least one frame index.")
    return idx


def _frame_label_prefix(layout: dict[str, Any]) -> str:
    sliders = layout.get("sliders") or []
    if sliders:
        return str((sliders[0].get("currentvalue") or {}).get("prefix", ""))
    return ""


def frame_figure(fig: Any, k: int, *, label: bool = True) -> dict[str, Any]:
    """The static figure (a plotly JSON dict) of frame ``k`` of the animated ``fig``."""
    spec = fig.to_plotly_json() if hasattr(fig, "to_plotly_json") else dict(fig)
    frames = list(spec.get("frames") or [])
    k = check_int("k", k, 0, max(len(frames) - 1, 0))
    if not frames:
        raise ValueError("the figure has no frames (fig.frames is empty): it is not an animation.")
    return _frame_from_spec(spec, frames, k, label)


def _frame_from_spec(spec: dict[str, Any], frames: list[dict[str, Any]], k: int, label: bool) -> dict[str, Any]:
    data = [dict(t) for t in spec.get("data", [])]
    layout = dict(spec.get("layout", {}))
    frame = frames[k]
    fdata = frame.get("data") or []
    for i, tr in zip(frame.get("traces") or range(len(fdata)), fdata):
        data[i] = _merge(data[i], tr)
    layout = _merge(layout, frame.get("layout") or {})
    prefix = _frame_label_prefix(layout)
    layout.pop("updatemenus", None)
    if layout.pop("sliders", None):  # the room left for the slider is not needed in a still
        layout["margin"] = {**(layout.get("margin") or {}), "b": 60}
    if label and frame.get("name") is not None:
        note = dict(text=f"{prefix}{frame['name']}", xref="paper", yref="paper", x=0.0, y=0.0, xanchor="left",
                    yanchor="top", yshift=-20, showarrow=False, font=dict(size=16))
        layout["annotations"] = list(layout.get("annotations") or []) + [note]
    return {"data": data, "layout": layout}


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``update``, nested dicts merged key by key (as plotly.js applies a frame); an
    encoded array (a dict with ``bdata``) is a value, replaced whole."""
    out = dict(base)
    for key, value in update.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict) and "bdata" not in value
        out[key] = _merge(out[key], value) if nested else value
    return out


def _kaleido_ready() -> None:
    """Start kaleido's shared browser once (about 4 s), so that each frame costs a fraction of a second."""
    from .figures import chromium_path

    if chromium_path() is None:
        raise RuntimeError("save_animation renders frames through kaleido, which needs a Chromium: install one "
                           "(`apt-get install chromium`, or `make setup` as root).")
    import kaleido

    if hasattr(kaleido, "start_sync_server"):
        try:
            kaleido.start_sync_server(silence_warnings=True)
        except Exception:  # noqa: BLE001 - one browser per call instead (slower, same result)
            pass


def render_frames(fig: Any, indices: Sequence[int], *, width: int | None = None, label: bool = True) -> list[Any]:
    """Frames ``indices`` of ``fig`` as RGB Pillow images, ``width`` pixels wide (default: the figure's
    width, at most :data:`MAX_WIDTH`), through kaleido."""
    import kaleido
    from PIL import Image

    spec = fig.to_plotly_json() if hasattr(fig, "to_plotly_json") else dict(fig)
    frames = list(spec.get("frames") or [])
    layout = spec.get("layout", {})
    base_w = int(layout.get("width") or 1100)
    base_h = int(layout.get("height") or 650)
    width = check_int("width", width if width is not None else min(base_w, MAX_WIDTH), 64, MAX_WIDTH)
    opts = dict(format="png", width=base_w, height=base_h, scale=width / base_w)
    _kaleido_ready()
    images = []
    for k in indices:
        png = kaleido.calc_fig_sync(_frame_from_spec(spec, frames, k, label), opts=opts)
        images.append(Image.open(io.BytesIO(png)).convert("RGB"))
    return images


def _write_gif(images: list[Any], path: Path, durations: list[int]) -> None:
    from PIL import Image

    paletted = [im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE) for im in images]

    def write(tmp: Path) -> None:
        paletted[0].save(tmp, format="GIF", save_all=True, append_images=paletted[1:], duration=durations,
                         loop=0, optimize=True, disposal=1)

    atomic_write_with(path, write)


def ffmpeg_available() -> bool:
    """Whether an MP4 encoder is installed (imageio-ffmpeg, which ships its own ffmpeg)."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
        return True
    except Exception:  # noqa: BLE001 - not installed, or no binary for this platform
        return False


def _write_mp4(images: list[Any], path: Path, duration_ms: int, hold_last_ms: int) -> None:
    import imageio_ffmpeg
    import numpy as np
    from PIL import Image

    w, h = images[0].size
    W, H = w + w % 2, h + h % 2  # H.264 in yuv420p needs even sides: pad with white

    def even(im: Any) -> bytes:
        if (W, H) == im.size:
            return np.asarray(im).tobytes()
        canvas = Image.new("RGB", (W, H), "white")
        canvas.paste(im, (0, 0))
        return np.asarray(canvas).tobytes()

    repeats = [1] * len(images)
    repeats[-1] += max(0, round(hold_last_ms / duration_ms))

    def write(tmp: Path) -> None:
        writer = imageio_ffmpeg.write_frames(str(tmp), (W, H), fps=1000.0 / duration_ms, codec="libx264",
                                             macro_block_size=1, output_params=["-f", "mp4", "-movflags", "+faststart"])
        writer.send(None)
        try:
            for im, r in zip(images, repeats):
                data = even(im)
                for _ in range(r):
                    writer.send(data)
        finally:
            writer.close()

    atomic_write_with(path, write)


def save_animation(fig: Any, path: str | Path, *, frames: int | Sequence[int] | None = None,
                   duration_ms: int | None = None, width: int | None = None,
                   hold_last_ms: int = DEFAULT_HOLD_LAST_MS, mp4: bool = True, label: bool = True) -> list[Path]:
    """Write the animated plotly ``fig`` as a GIF at ``path`` (and an MP4 beside it, same stem, when ``mp4``
    and imageio-ffmpeg is installed). Returns the paths written.

    ``frames``: all frames (None), that many evenly spaced ones with the first and last (an int), or
    the indices to use. ``duration_ms``: time per frame (default: the play button's, else
    :data:`DEFAULT_FRAME_MS`); the last frame stays ``hold_last_ms`` longer. ``width``: pixels
    (default: the figure's width, at most :data:`MAX_WIDTH`; the layout is scaled, not reflowed).
    ``label``: write the frame's slider label (e.g. "step 300") in the corner.
    """
    global _FFMPEG_WARNED
    path = Path(path)
    if path.suffix.lower() != ".gif":
        raise ValueError(f"path={str(path)!r} must end in .gif (the MP4, if any, is written beside it).")
    n = len(fig.frames) if hasattr(fig, "frames") else len(dict(fig).get("frames") or [])
    idx = frame_indices(n, frames)
    if duration_ms is None:
        duration_ms = _play_duration(fig) or DEFAULT_FRAME_MS
    duration_ms = check_int("duration_ms", duration_ms, 20, 10_000)
    hold_last_ms = check_int("hold_last_ms", hold_last_ms, 0, 60_000)
    images = render_frames(fig, idx, width=width, label=label)
    durations = [duration_ms] * len(images)
    durations[-1] += hold_last_ms
    _write_gif(images, path, durations)
    written = [path]
    if mp4:
        if ffmpeg_available():
            mp4_path = path.with_suffix(".mp4")
            _write_mp4(images, mp4_path, duration_ms, hold_last_ms)
            written.append(mp4_path)
        elif not _FFMPEG_WARNED:
            print("MP4 skipped: no encoder (pip install imageio-ffmpeg, or `pip install -e '.[animation]'`); "
                  "the GIF is written regardless.", file=sys.stderr)
            _FFMPEG_WARNED = True
    return written


def _play_duration(fig: Any) -> int | None:
    """The frame duration of the figure's play button (plotly's ``updatemenus`` animate args), if any."""
    try:
        for menu in fig.layout.updatemenus or ():
            for button in menu.buttons or ():
                args = button.args or []
                if button.method == "animate" and len(args) > 1 and args[0] is None:
                    d = (args[1] or {}).get("frame", {}).get("duration")
                    if d:
                        return int(d)
    except AttributeError:
        return None
    return None
