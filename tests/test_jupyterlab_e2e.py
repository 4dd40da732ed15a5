"""A real JupyterLab in a real browser: the widgets and plotly figures render and respond.

Starts JupyterLab from the kit's environment on localhost (notebooks copied to a temporary folder, so
nothing is written into the working tree), drives it with Playwright and Debian's Chromium, and saves
a screenshot of each step into the test's temporary folder (printed at the end). Without Playwright or a
Chromium it skips with the reason.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from nc_lib.figures import NOTEBOOK_DIR, chromium_path

pytestmark = pytest.mark.e2e

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    if chromium_path() is None:
        pytest.skip("no Chromium found: install Debian's chromium (apt-get install chromium) to run the browser test")
    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(NOTEBOOK_DIR, root / "notebooks")
    port = _free_port()
    env = {**os.environ, "NC_FIGURES_DIR": str(root / "figures"), "NC_RUNS_DIR": str(root / "runs"),
           "JUPYTER_CONFIG_DIR": str(root / "jupyter-config"), "JUPYTERLAB_WORKSPACES_DIR": str(root / "ws")}
    log = open(root / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
         "--allow-root", "--IdentityProvider.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
         f"--ServerApp.root_dir={root / 'notebooks'}", "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/status", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited early; see {root / 'jupyterlab.log'}")
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail("JupyterLab did not start within 90 s")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield {"url": url, "page": page, "shots": root / "screenshots"}
        browser.close()
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    print(f"\nJupyterLab screenshots: {root / 'screenshots'}")


ACTIVE = "document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)')"


def _open_and_run_all(page, url: str, name: str, timeout_s: float = 300) -> None:
    page.goto(f"{url}/lab/tree/{name}", wait_until="domcontentloaded")
    page.wait_for_selector(".jp-NotebookPanel", timeout=60_000)
    try:  # JupyterLab may ask which kernel to start: accept the kit's (the default python3)
        page.wait_for_selector(".jp-Dialog .jp-mod-accept", timeout=15_000)
        page.click(".jp-Dialog .jp-mod-accept")
    except Exception:  # noqa: BLE001 - no dialog this time
        pass
    # the kernel is ready when the status bar says so
    page.wait_for_function(
        "() => [...document.querySelectorAll('.jp-StatusBar-TextItem')].some(e => /\\| Idle/.test(e.textContent))",
        timeout=120_000)
    page.click("text=Run", timeout=10_000)
    page.click("text=Run All Cells", timeout=10_000)
    # done when every code cell of the visible notebook shows an execution count
    page.wait_for_function(
        f"() => {{ const p = {ACTIVE}; if (!p) return false;"
        " const prompts = [...p.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];"
        " return prompts.length > 0 && prompts.every(e => /\\[\\d+\\]/.test(e.textContent)); }",
        timeout=int(timeout_s * 1000), polling=1000)


def _shot(lab, name: str) -> Path:
    lab["shots"].mkdir(parents=True, exist_ok=True)
    path = lab["shots"] / f"{name}.png"
    lab["page"].screenshot(path=str(path), full_page=False)
    return path


@pytest.fixture
def shoot_on_failure(lab, request):
    yield
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(f"failure screenshot: {_shot(lab, request.node.name + '_failure')}")


def test_simplex_etf_notebook_slider_redraws_the_plot(lab, shoot_on_failure):
    page = lab["page"]
    _open_and_run_all(page, lab["url"], "00_simplex_etf.ipynb")
    slider = page.locator(".widget-slider").first
    slider.scroll_into_view_if_needed()
    page.wait_for_selector(".js-plotly-plot .gtitle", timeout=60_000)
    explorer = slider.locator("xpath=ancestor::div[contains(@class,'jp-OutputArea-output')][1]")
    title = explorer.locator(".gtitle").first
    before = title.text_content()
    assert "C = 4" in before
    _shot(lab, "00_before_slider")
    slider.locator(".noUi-handle").first.focus()
    page.keyboard.press("ArrowRight")
    from playwright.sync_api import expect

    # the explorer clears its output and draws a new figure: wait for the new title
    expect(explorer.locator(".gtitle").first).to_contain_text("C = 5", timeout=60_000)
    after = explorer.locator(".gtitle").first.text_content()
    assert after != before
    _shot(lab, "00_after_slider")


def test_ufm_explorer_trains_live_and_the_animation_plays(lab, shoot_on_failure):
    from playwright.sync_api import expect

    page = lab["page"]
    _open_and_run_all(page, lab["url"], "01_unconstrained_features.ipynb", timeout_s=600)
    train = page.locator("button:has-text('Train')").last
    train.scroll_into_view_if_needed()
    explorer = train.locator("xpath=ancestor::div[contains(@class,'jp-OutputArea-output')][1]")
    live = explorer.locator(".js-plotly-plot").first
    expect(live).to_be_visible(timeout=60_000)
    _shot(lab, "01_explorer_before_train")

    def line_points() -> int:  # points drawn in the live figure's curves
        return int(live.evaluate("el => (el.data || []).reduce((n, t) => n + ((t.x && t.x.length) || 0), 0)"))

    # a longer run than the headless default (0.4 s), so the live updates can be watched
    steps = explorer.locator(".widget-inline-hbox:has(label:text-is('steps')) input").first
    steps.fill("8000")
    steps.press("Tab")
    seen = {line_points()}
    train.click()
    done = explorer.locator("text=Done in")
    deadline = time.time() + 300
    while time.time() < deadline:  # watch the live figure while it trains: it is cleared, then grows
        seen.add(line_points())
        if done.count() and done.first.is_visible():
            break
        page.wait_for_timeout(150)
    expect(done).to_be_visible(timeout=10_000)
    seen.add(line_points())
    assert len(seen) >= 2, f"the live figure did not change while training (point counts seen: {sorted(seen)})"
    _shot(lab, "01_explorer_after_train")
    animation = explorer.locator(".js-plotly-plot").last
    animation.scroll_into_view_if_needed()
    frame_of = "el => el._fullLayout.sliders && el._fullLayout.sliders.length ? el._fullLayout.sliders[0].active : -1"
    start = animation.evaluate(frame_of)
    animation.locator(".updatemenu-button").first.click()  # Play
    page.wait_for_timeout(3000)
    assert animation.evaluate(frame_of) != start, "pressing Play did not advance the animation"
    _shot(lab, "01_animation_playing")
