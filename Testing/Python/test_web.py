"""`msis view` in a real browser: headless Chromium (Debian's, driven by Playwright) does what a user does on a
2 mm demo phantom: Segment, pick a lesion in the table and by a click in the axial view, Explain, look at the
overlay, Score all, Remove below a threshold, Cancel a long Explain, open a corrupt file and a path outside
--data, download the results; and a server on a non-loopback address serves nothing without its token.

Never skipped: setup_env.sh --test installs trame-slicer, Playwright and Chromium. MSIS_WEB_SCREENSHOTS=DIR keeps
the screenshots (docs/screenshots/ is made that way).
"""

import csv
import io
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from playwright.sync_api import sync_playwright
from test_volumes import _write_dicom_series

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("MSIS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
URL_LINE = re.compile(r"msis view: serving on \S+; open (http://\S+)")
STEP_TIMEOUT_MS = 240_000  # a step on 2 shared cores while other tests run


def _start_view(args, env=None, timeout=120):
    """`msis view ...` as a user starts it; returns (process, URL it printed)."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), MSIS_PHANTOM_VOXEL_SIZE="2", **(env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "MSInstanceSaliencyLib", "view", "--port", "0", *map(str, args)], env=full_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        match = URL_LINE.search(line)
        if match:
            return proc, match.group(1)
    proc.kill()
    raise AssertionError("msis view did not print its URL:\n" + "".join(lines))


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def data(small_phantom, tmp_path_factory):
    """The folder the page may open from: the phantom's scans, a corrupt scan, and a link that leads outside."""
    root = tmp_path_factory.mktemp("web")
    d = root / "data"
    d.mkdir()
    small_phantom.save(d)
    (d / "corrupt_flair.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI file")
    (root / "outside.nii.gz").write_bytes((d / "flair.nii.gz").read_bytes())
    (d / "link_out.nii.gz").symlink_to(root / "outside.nii.gz")
    _write_dicom_series(small_phantom.flair, d / "flair_dicom", "1.2.826.0.1.3680043.2.1125.7")  # a FLAIR as a scanner's series
    return d


@pytest.fixture(scope="module")
def server(data):
    proc, url = _start_view(["--data", data, "--device", "cpu"])
    yield url
    _stop(proc)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def _open(browser, url):
    page = browser.new_context(viewport={"width": 1400, "height": 800}).new_page()
    page.goto(url)
    # the page fills over the websocket after load: wait until the three views have a frame
    page.wait_for_function("() => { const imgs = document.querySelectorAll('img.image-display-area');"
                           " return imgs.length === 3 && [...imgs].every(i => i.complete && i.naturalWidth > 0); }", timeout=60000)
    return page


@pytest.fixture(scope="module")
def page(browser, server):
    return _open(browser, server)


def state(page, name):
    return page.evaluate(f"() => window.trame.state.get({name!r})")


def set_state(page, **values):
    """As the page's controls do; flushed to the server now, so that a click right after sees the values."""
    for k, v in values.items():
        page.evaluate("async ([k, v]) => { window.trame.state.set(k, v); await window.trame.state.flush(); }", [k, v])


def wait_idle(page, timeout=STEP_TIMEOUT_MS):
    page.wait_for_function("() => !window.trame.state.get('busy')", timeout=timeout)


def press(page, selector, timeout=STEP_TIMEOUT_MS):
    """Click a button that runs a step and wait for the step to end."""
    page.click(selector)
    page.wait_for_function("() => window.trame.state.get('busy')", timeout=5000) if selector in ("#segment", "#explain", "#score-all") else None
    wait_idle(page, timeout)


def wait_message(page, fragment, timeout=30000):
    """Wait until the page's message contains `fragment`; on timeout say what it shows."""
    try:
        page.wait_for_function(f"() => window.trame.state.get('message').includes({fragment!r})", timeout=timeout)
    except Exception:
        raise AssertionError(f"the page says {state(page, 'message')!r}, not {fragment!r}") from None


def axial(page):
    return page.query_selector_all("img.image-display-area")[0].bounding_box()


def shot(page, name, tmp_path):
    folder = Path(os.environ.get("MSIS_WEB_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(float)


def crop(rgb, box, fx0, fx1, fy0, fy1):
    return rgb[int(box["y"] + fy0 * box["height"]):int(box["y"] + fy1 * box["height"]),
               int(box["x"] + fx0 * box["width"]):int(box["x"] + fx1 * box["width"])]


def labels_from_download(page, server, tmp_path):
    """The label map as the user downloads it, read with SimpleITK (independent of the app's lookups)."""
    page.click("#downloads")
    page.wait_for_function("() => window.trame.state.get('downloads').length >= 2", timeout=30000)
    links = {d["name"]: d["url"] for d in state(page, "downloads")}
    path = tmp_path / "lesion_labels.nii.gz"
    path.write_bytes(page.request.get(server + links["lesion_labels.nii.gz"]).body())
    table = list(csv.DictReader(io.StringIO(page.request.get(server + links["lesions.csv"]).text())))
    return sitk.ReadImage(str(path)), table


def label_at(labels, ras):
    idx = labels.TransformPhysicalPointToIndex((-ras[0], -ras[1], ras[2]))
    return labels[idx] if all(0 <= i < n for i, n in zip(idx, labels.GetSize())) else 0


def test_segment_fills_the_sortable_lesion_table(page, tmp_path):
    assert state(page, "inputs_text").startswith("FLAIR ")
    set_state(page, minLesionVolume=30)  # the larger lesions only: Score all stays short
    press(page, "#segment")
    assert not state(page, "message_error"), state(page, "message")
    rows = state(page, "lesion_rows")
    assert len(rows) >= 3
    assert page.locator("tr.lesion-row").count() == len(rows)
    assert state(page, "worker_text").startswith("torch ")  # what the worker sees
    page.click("#lesion-table th:nth-child(2)")  # Volume: ascending, then descending
    page.click("#lesion-table th:nth-child(2)")
    page.wait_for_function("() => window.trame.state.get('sort_desc') && window.trame.state.get('sort_key') === 'volume'")
    volumes = [r["volume"] for r in state(page, "lesion_rows")]
    assert volumes == sorted(volumes, reverse=True)
    shot(page, "web_segmented", tmp_path)


def test_a_row_moves_the_views_and_a_click_on_the_lesion_picks_it(page, server, tmp_path):
    largest = state(page, "lesion_rows")[0]["id"]
    page.click(f"tr.lesion-row[data-lesion='{largest}']")
    page.wait_for_function(f"() => window.trame.state.get('selected_lesion') === {largest}")
    labels, table = labels_from_download(page, server, tmp_path)
    assert sorted(int(r["Lesion"]) for r in table) == sorted(r["id"] for r in state(page, "lesion_rows"))

    # another lesion by its row, then the largest by a click: the row moved the axial view to its centre
    other = state(page, "lesion_rows")[1]["id"]
    page.click(f"tr.lesion-row[data-lesion='{other}']")
    page.wait_for_function(f"() => window.trame.state.get('selected_lesion') === {other}")
    page.click(f"tr.lesion-row[data-lesion='{largest}']")
    page.wait_for_function(f"() => window.trame.state.get('selected_lesion') === {largest}")
    set_state(page, selected_lesion=0)  # the page forgets; the click must find the lesion again
    box = axial(page)
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_function("() => window.trame.state.get('last_pick')", timeout=20000)
    pick = state(page, "last_pick")
    assert pick["view"] == "Red" and pick["lesion"] == largest == label_at(labels, pick["ras"])
    page.wait_for_function(f"() => window.trame.state.get('selected_lesion') === {largest}")

    # far from it: no lesion there (SimpleITK agrees), the selection stays
    page.mouse.click(box["x"] + 0.12 * box["width"], box["y"] + 0.5 * box["height"])
    page.wait_for_function(f"() => window.trame.state.get('last_pick').ras[0] !== {pick['ras'][0]}", timeout=20000)
    far = state(page, "last_pick")
    assert far["ras"][0] - pick["ras"][0] > 20  # screen left is patient right
    assert far["lesion"] == label_at(labels, far["ras"]) == 0 and "No lesion" in state(page, "message")
    assert state(page, "selected_lesion") == largest


def test_explain_shows_the_map_over_the_lesion_with_legend_and_tp_probability(page, tmp_path):
    box = axial(page)
    before = shot(page, "web_before_explain", tmp_path)
    # the bundled classifier's settings, so that the TP probability comes with the map
    set_state(page, nSamples=10, method="SmoothGrad max", displayChannel="FLAIR", sigma=0.05, context="patch", maxOmegaVoxels=256)
    press(page, "#explain")
    assert not state(page, "message_error"), state(page, "message")
    legend = state(page, "legend")
    assert legend and legend["title"].startswith(f"Lesion {state(page, 'selected_lesion')} SmoothGrad FLAIR")
    assert re.search(r"TP probability \d\.\d\d \((likely true lesion|possible false positive)\)", state(page, "tp_text"))
    page.wait_for_timeout(1500)  # the next frame
    after = shot(page, "web_explained", tmp_path)
    # the map's red at half opacity over grey: R - G up to about 80; the selected segment's pale fill: at most about 40
    red = lambda x: int(((x[..., 0] - x[..., 1]) > 50).sum())  # noqa: E731
    centre = lambda x: crop(x, box, 0.4, 0.6, 0.4, 0.6)  # noqa: E731  (the row moved the view's centre to the lesion)
    assert red(centre(after)) > max(50, 3 * red(centre(before)))  # the map is red over the lesion
    corner_before, corner_after = (crop(x, box, 0.0, 0.15, 0.2, 0.35) for x in (before, after))
    assert np.abs(corner_after - corner_before).mean() < 2  # and transparent far from it
    # the opacity slider: 0 hides the map
    set_state(page, overlayOpacity=0.0)
    page.wait_for_timeout(1500)
    hidden = shot(page, "web_opacity0", tmp_path)
    assert red(centre(hidden)) < red(centre(after)) / 10
    set_state(page, overlayOpacity=0.5)


def test_score_all_then_remove_below_a_threshold(page):
    n = len(state(page, "lesion_rows"))
    press(page, "#score-all")
    assert not state(page, "message_error"), state(page, "message")
    probs = [r["tp"] for r in state(page, "lesion_rows")]
    assert all(p is not None and 0 <= p <= 1 for p in probs)
    threshold = sorted(probs)[len(probs) // 2]
    set_state(page, pruneBelow=threshold)
    page.click("#remove-below")
    page.wait_for_function(f"() => window.trame.state.get('lesion_rows').length < {n}", timeout=20000)
    assert all(r["tp"] >= threshold for r in state(page, "lesion_rows"))
    assert page.locator("tr.lesion-row").count() == len(state(page, "lesion_rows"))


def test_cancel_stops_a_long_explain_and_the_page_stays_usable(page):
    lesion = state(page, "lesion_rows")[0]["id"]
    page.click(f"tr.lesion-row[data-lesion='{lesion}']")
    set_state(page, nSamples=1000)
    page.click("#explain")
    page.wait_for_function("() => window.trame.state.get('busy') === 'Explain'", timeout=10000)  # its counters are reset now
    # the map so far is shown while the copies arrive (the first after about 2 s), then the user cancels
    page.wait_for_function("() => window.trame.state.get('partial_maps') > 0", timeout=STEP_TIMEOUT_MS)
    assert re.search(r"\(\d+/1000 copies\)$", state(page, "legend")["title"])
    t0 = time.monotonic()
    page.click("#cancel")
    wait_idle(page, timeout=60000)
    assert time.monotonic() - t0 < 30
    assert "cancelled" in state(page, "message")
    set_state(page, nSamples=4)
    press(page, "#explain")  # usable again
    assert not state(page, "message_error"), state(page, "message")


def test_a_corrupt_file_and_a_path_outside_data_are_refused_on_the_page(page, small_phantom):
    files = state(page, "volume_files")
    assert "flair.nii.gz" in files and "link_out.nii.gz" not in files  # the link out of --data is not offered
    for chosen, expected in (("corrupt_flair.nii.gz", "cannot read"), ("../outside.nii.gz", "outside the data folder"),
                             ("link_out.nii.gz", "outside the data folder")):
        set_state(page, flair_file=chosen, mprage_file=None, message="")  # two cases give the same message: not the last one's
        page.click("#load")
        wait_message(page, expected)
        assert state(page, "message_error")
    assert "flair_dicom/" in files
    set_state(page, flair_file="flair_dicom/", mprage_file="mprage.nii.gz", message="")  # the server still works, DICOM too
    page.click("#load")
    wait_message(page, "Volumes loaded")
    size = "×".join(map(str, small_phantom.flair.GetSize()))
    assert state(page, "inputs_text").startswith(f"FLAIR {size}") and state(page, "lesion_rows") == []


def test_a_second_page_is_told_that_one_user_is_served(browser, server, page):
    other = _open(browser, server)
    other.wait_for_function("() => window.trame.state.get('second_client')", timeout=20000)
    assert "one user" in other.inner_text("#second-client")
    other.context.close()


def test_off_loopback_nothing_is_served_without_the_token(data):
    proc, url = _start_view([data / "flair.nii.gz", data / "mprage.nii.gz", "--host", "0.0.0.0"])
    try:
        assert "?token=" in url
        bare = url.split("?")[0]
        for path in ("", "index.html", "ws"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(bare + path, timeout=20)
            assert refused.value.code == 403 and b"access token" in refused.value.read()
        with urllib.request.urlopen(url, timeout=20) as ok:
            assert ok.status == 200 and "msis_view_token=" in ok.headers.get("Set-Cookie", "")
    finally:
        _stop(proc)


def test_bad_view_arguments_end_with_one_line_before_anything_loads(data, tmp_path):
    import socket

    def view(*args):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        return subprocess.run([sys.executable, "-m", "MSInstanceSaliencyLib", "view", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=60)

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for args, fragment in (((data / "flair.nii.gz", data / "flair.nii.gz"), "are the same volume"),
                               ((data / "corrupt_flair.nii.gz",), "cannot read FLAIR"),
                               ((tmp_path / "none.nii.gz",), "does not exist"),
                               (("--data", data / "flair.nii.gz"), "not a folder"),
                               (("--port", port), f"cannot listen on 127.0.0.1:{port}")):
            res = view(*args)
            lines = [line for line in res.stderr.splitlines() if line.startswith("msis:")]
            assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
            assert len(lines) == 1 and fragment in lines[0], res.stderr
