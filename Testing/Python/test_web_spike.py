"""The `msis view` spike in a real browser: the trame-slicer app (MSInstanceSaliency/MSInstanceSaliencyWeb) serves
the phantom's FLAIR and MPRAGE with an instance label map; headless Chromium, driven by Playwright, waits for the
three streamed slice views, clicks in the axial view and the button, and takes a screenshot.

Needs trame-slicer (its slicer-core 5.11, see docs/WEB_SPIKE.md), Playwright for Python and a Chromium binary
(Debian's /usr/bin/chromium, or MSIS_CHROMIUM); skipped otherwise. MSIS_WEB_SCREENSHOT=path keeps the screenshot
(docs/screenshots/web_spike.png is made that way).
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("MSIS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
LESION_ID = 7

pytest.importorskip("trame_slicer", reason="trame-slicer is not installed (pip install 'trame-slicer[standalone]==2.0.0')")
playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MSIS_CHROMIUM)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 40.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited ({proc.returncode}):\n{proc.stdout.read()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"the app did not listen on port {port} within {timeout} s")


@pytest.fixture(scope="module")
def case(small_phantom, tmp_path_factory):
    """Phantom FLAIR/MPRAGE, and a label map with one box lesion around the centre voxel (the axial view's
    centre after the views are fitted to the volume)."""
    d = tmp_path_factory.mktemp("web")
    files = small_phantom.save(d)
    flair = small_phantom.flair
    zyx = np.zeros(flair.GetSize()[::-1], np.int16)
    cz, cy, cx = (n // 2 for n in zyx.shape)
    zyx[cz - 3:cz + 4, cy - 4:cy + 5, cx - 4:cx + 5] = LESION_ID
    labels = sitk.GetImageFromArray(zyx)
    labels.CopyInformation(flair)
    sitk.WriteImage(labels, str(d / "labels.nii.gz"))
    return {"flair": files["flair"], "mprage": files["mprage"], "labels": d / "labels.nii.gz", "label_image": labels}


@pytest.fixture(scope="module")
def server(case):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "MSInstanceSaliency")])}
    proc = subprocess.Popen([sys.executable, "-m", "MSInstanceSaliencyWeb.app", str(case["flair"]), str(case["mprage"]),
                             "--labels", str(case["labels"]), "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1280, "height": 720})
        page = context.new_page()
        page.goto(server)
        # The page fills over the websocket after load: wait until the three views have received a frame
        page.wait_for_function("() => { const imgs = document.querySelectorAll('img.image-display-area');"
                               " return imgs.length === 3 && [...imgs].every(i => i.complete && i.naturalWidth > 0); }",
                               timeout=30000)
        yield page
        browser.close()


def _ras_to_label(label_image: sitk.Image, ras) -> int:
    """Independent of the app: SimpleITK's own index lookup (LPS), nearest voxel."""
    lps = (-ras[0], -ras[1], ras[2])
    idx = label_image.TransformPhysicalPointToIndex(lps)
    return label_image[idx] if all(0 <= i < n for i, n in zip(idx, label_image.GetSize())) else 0


def _click_axial(page, fx: float, fy: float) -> dict:
    """Click at a fraction of the axial view's image; return the pick the server published."""
    before = page.evaluate("() => window.trame.state.get('click_count')")
    box = page.query_selector_all("img.image-display-area")[0].bounding_box()
    page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
    page.wait_for_function(f"() => window.trame.state.get('click_count') > {before}", timeout=10000)
    return page.evaluate("() => window.trame.state.get('click')")


def test_views_render_the_brain_and_the_screenshot_shows_it(page, tmp_path):
    shot = Path(os.environ.get("MSIS_WEB_SCREENSHOT") or tmp_path / "web_spike.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot))
    from PIL import Image

    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    for img in page.query_selector_all("img.image-display-area"):
        b = img.bounding_box()
        view = rgb[int(b["y"]):int(b["y"] + b["height"]), int(b["x"]):int(b["x"] + b["width"])]
        centre = view[view.shape[0] // 3:2 * view.shape[0] // 3, view.shape[1] // 3:2 * view.shape[1] // 3]
        assert centre.mean() > 40 and centre.std() > 15  # brain tissue with structure, not a black or flat view
    # the lesion's label colour (the generic table's label 7 is cyan: blue and green well above red)
    cyan = (rgb[..., 1] - rgb[..., 0] > 60) & (rgb[..., 2] - rgb[..., 0] > 60)
    assert cyan.sum() > 300


def test_a_click_in_the_axial_view_arrives_as_its_ras_position_and_label(page, case):
    labels = case["label_image"]
    size = np.array(labels.GetSize())
    centre_lps = labels.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist())
    centre_ras = np.array([-centre_lps[0], -centre_lps[1], centre_lps[2]])
    spacing = np.array(labels.GetSpacing())

    pick = _click_axial(page, 0.5, 0.5)
    ras = np.array(pick["ras"])
    assert pick["view"] == "Red"
    np.testing.assert_allclose(ras, centre_ras, atol=1.5 * spacing.max())  # the fitted view's centre is the volume's
    assert pick["label"] == LESION_ID == _ras_to_label(labels, ras)
    assert page.inner_text("#click-text").startswith("Red: R ")

    # left of the centre is patient right (R grows), higher up is anterior (A grows); both outside the lesion
    left = _click_axial(page, 0.25, 0.5)
    assert left["ras"][0] - ras[0] > 20 and abs(left["ras"][1] - ras[1]) < spacing[1] and left["ras"][2] == pick["ras"][2]
    assert left["label"] is None and _ras_to_label(labels, left["ras"]) == 0
    up = _click_axial(page, 0.5, 0.2)
    assert up["ras"][1] - ras[1] > 20 and abs(up["ras"][0] - ras[0]) < spacing[0]
    assert up["label"] is None


def test_the_button_fills_the_text_area_from_python(page, case):
    assert page.input_value("#message").startswith("Loaded: FLAIR, MPRAGE")
    page.click("#describe")
    size = "{} x {} x {}".format(*case["label_image"].GetSize())
    page.wait_for_function("() => document.querySelector('#message').value.includes('voxels')", timeout=10000)
    text = page.input_value("#message")
    assert f"FLAIR: {size} voxels" in text and "MPRAGE:" in text and "Clicks so far:" in text
