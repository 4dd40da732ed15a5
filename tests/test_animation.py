"""Animations for slides: plots.save_animation writes a GIF (and an MP4) frame by frame through kaleido,
and save_figure writes <id>.gif for an animated id, lists it in the manifest and shows it in the gallery."""
from __future__ import annotations

import json

import pytest

from nc_lib import animation, figures, plots
from nc_lib.ufm import UFMConfig, train_ufm

needs_chromium = pytest.mark.skipif(figures.chromium_path() is None,
                                    reason="no Chromium: kaleido cannot render frames (apt-get install chromium)")
#: "A few MB" for a slide, as the issue puts it.
SLIDE_BYTES = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def anim():
    """A C = 3 collapse animation of 7 frames (steps 0, 10, ..., 60)."""
    h = train_ufm(UFMConfig(num_classes=3, n_per_class=6, feature_dim=8, init_scale=1.0), 60, 10, progress=False)
    fig = plots.collapse_animation(h)
    assert len(fig.frames) == 7
    return fig


def _gif_frames(path):
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        frames = [f.convert("RGB").copy() for f in ImageSequence.Iterator(im)]
        durations = []
        for k in range(im.n_frames):
            im.seek(k)
            durations.append(im.info["duration"])
        return frames, durations


def test_frame_indices():
    assert animation.frame_indices(7, None) == list(range(7))
    assert animation.frame_indices(7, 3) == [0, 3, 6]
    assert animation.frame_indices(61, 24)[0] == 0 and animation.frame_indices(61, 24)[-1] == 60
    assert len(set(animation.frame_indices(61, 24))) == 24
    assert animation.frame_indices(7, [6, 0]) == [6, 0]
    with pytest.raises(ValueError, match="frames"):
        animation.frame_indices(7, 8)
    with pytest.raises(ValueError, match="frames"):
        animation.frame_indices(7, [7])
    with pytest.raises(ValueError, match="no frames"):
        animation.frame_indices(0, None)


def test_frame_figure_applies_the_frame_and_labels_it(anim):
    spec = anim.to_plotly_json()  # plotly's JSON, arrays encoded as {dtype, bdata}
    frame = spec["frames"][6]
    first_animated = frame["traces"][0]
    last = animation.frame_figure(anim, 6)
    assert last["data"][first_animated]["x"] == frame["data"][0]["x"]
    assert "sliders" not in last["layout"] and "updatemenus" not in last["layout"]
    assert last["layout"]["annotations"][-1]["text"] == "step 60"
    first = animation.frame_figure(anim, 0)
    assert first["data"][first_animated]["x"] == spec["frames"][0]["data"][0]["x"] != frame["data"][0]["x"]
    assert first["layout"]["annotations"][-1]["text"] == "step 0"
    assert first["data"][0] == spec["data"][0]  # a trace no frame touches (the target ETF) is kept


@needs_chromium
def test_save_animation_gif_and_mp4(anim, tmp_path):
    from PIL import ImageChops

    out = plots.save_animation(anim, tmp_path / "collapse.gif", duration_ms=150, hold_last_ms=600)
    gif = tmp_path / "collapse.gif"
    assert out[0] == gif
    frames, durations = _gif_frames(gif)
    assert len(frames) == len(anim.frames) == 7
    assert durations == [150] * 6 + [750]
    width, height = frames[0].size
    assert width == anim.layout.width <= animation.MAX_WIDTH and height == anim.layout.height
    assert 0 < gif.stat().st_size <= SLIDE_BYTES
    assert ImageChops.difference(frames[0], frames[-1]).getbbox() is not None, "first and last frames are the same"
    if animation.ffmpeg_available():
        import imageio_ffmpeg

        mp4 = tmp_path / "collapse.mp4"
        assert out[1] == mp4 and 0 < mp4.stat().st_size <= SLIDE_BYTES
        n, seconds = imageio_ffmpeg.count_frames_and_secs(str(mp4))
        assert n == 7 + 4  # the last frame held 600 ms at 150 ms a frame
    # fewer, smaller frames; no MP4 asked
    out = plots.save_animation(anim, tmp_path / "small.gif", frames=3, width=640, mp4=False)
    assert out == [tmp_path / "small.gif"]
    frames, _ = _gif_frames(tmp_path / "small.gif")
    assert len(frames) == 3 and frames[0].size[0] == 640


def test_save_animation_rejects_bad_input(anim, tmp_path):
    with pytest.raises(ValueError, match="width"):
        plots.save_animation(anim, tmp_path / "a.gif", width=1920)
    with pytest.raises(ValueError, match=r"\.gif"):
        plots.save_animation(anim, tmp_path / "a.png")
    with pytest.raises(ValueError, match="duration_ms"):
        plots.save_animation(anim, tmp_path / "a.gif", duration_ms=0)
    import plotly.graph_objects as go
    with pytest.raises(ValueError, match="no frames"):
        plots.save_animation(go.Figure(), tmp_path / "a.gif")
    assert not list(tmp_path.iterdir())


@needs_chromium
def test_save_figure_writes_the_gif_and_the_gallery_shows_it(anim, figures_tmp):
    rec = figures.save_figure(anim, "papyan2020_fig1", scale="quick")
    assert "papyan2020_fig1.gif" in rec["files"]
    manifest = json.loads((figures_tmp / "manifest.json").read_text())
    assert "papyan2020_fig1.gif" in manifest["papyan2020_fig1"]["files"]
    frames, _ = _gif_frames(figures_tmp / "papyan2020_fig1.gif")
    assert len(frames) == min(figures.GIF_FRAMES, len(anim.frames))
    figures.write_gallery(figures_tmp)
    assert "<img src='papyan2020_fig1.gif'" in (figures_tmp / "index.html").read_text()
    assert "(papyan2020_fig1.gif)" in (figures_tmp / "README.md").read_text()
    # a still figure gets no GIF
    rec = figures.save_figure(plots.etf_figure(3), "zhu2021_fig1", scale="quick")
    assert not any(f.endswith(".gif") for f in rec["files"])
