"""The web page in a real browser: `generate.py --web --demo` in a subprocess, driven by Playwright through the
system's Chromium (Debian's `chromium` package; Playwright's own browser download is never used).

One session as a user would have it: submit a job and watch its progress, see the finished video load in the page
and report its duration, cancel a second job mid-denoise and resume it to the end, reuse a video's settings; and
one image to video (upload, motion slider, the first image beside the video, reused with its settings). A
screenshot of the page is saved under the folder printed at the end (LOWVRAM_STEPVIDEO_ARTIFACTS, else
test-artifacts/ at the repository root).

Needs: the `web` and `webtest` extras and /usr/bin/chromium (or LOWVRAM_STEPVIDEO_CHROMIUM). Missing pieces skip
the test on a developer machine and fail it in CI (CI=true), where .ci/run installs them.
"""
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cli_support import subprocess_env
from conftest import ROOT

pytestmark = pytest.mark.slow
CHROMIUM = os.environ.get("LOWVRAM_STEPVIDEO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FIRST_STEPS = 6
CANCEL_WINDOW_S = 8  # the second job denoises this long: its progress is seen and the cancel lands mid-denoise
JOB_S = 240   # one demo job on a busy 2-core machine (about 20 s when idle)


def _missing() -> str | None:
    for module, extra in (("gradio", "web"), ("playwright", "webtest")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e \".[{extra}]\")"
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).is_file()):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set LOWVRAM_STEPVIDEO_CHROMIUM)"
    return None


@pytest.fixture(scope="module")
def browser():
    problem = _missing()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {problem}")
        pytest.skip(problem)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def server(tmp_path, demo_cache):
    """`generate.py --web --demo` on a free port, run from tmp_path (its results/ folder is there)."""
    port = _free_port()
    env = {**subprocess_env(demo_cache), "PYTHONPATH": str(ROOT), "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    env.pop("LOWVRAM_STEPVIDEO_WEB_CONFIG", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--web", "--demo", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while not any(url in ln for ln in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "the page did not start:\n" + "".join(lines)
        time.sleep(0.2)
    yield url, tmp_path, lines
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(180) == 0, "".join(lines)   # a busy machine (a whole test run beside it) is slow to stop
    finally:
        if proc.poll() is None:
            proc.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Every distinct state of every queue row, recorded in the page as the table changes (the page redraws it once a
# second; polling from here could miss a short phase).
RECORD_ROWS = """() => {
  window.lvsRows = [];
  const record = () => document.querySelectorAll('#lvs-queue tr[data-job]').forEach(r => {
    const row = {job: r.dataset.job, state: r.dataset.state, phase: r.cells[3].innerText.trim(),
                 done: +r.dataset.done, total: +r.dataset.total};
    const key = JSON.stringify(row);
    if (!window.lvsRows.some(x => JSON.stringify(x) === key)) window.lvsRows.push(row);
  });
  // the whole document: Gradio may replace the table's element itself when it redraws it
  new MutationObserver(record).observe(document.body,
                                       {subtree: true, childList: true, attributes: true, characterData: true});
}"""


def _watch(page, job_id: str, until, timeout: float = JOB_S, progressed: bool = False) -> list[dict]:
    """The distinct states a job's queue row went through, once the last one satisfies `until` (and, with
    `progressed`, once the row has shown two different step counts while denoising)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = [r for r in page.evaluate("window.lvsRows") if r["job"] == job_id]
        assert not seen or seen[-1]["state"] != "failed", page.locator("#lvs-queue").inner_text()
        steps = {r["done"] for r in seen if r["state"] == "running" and r["phase"] == "denoise"}
        if seen and until(seen[-1]) and (len(steps) >= 2 or not progressed):
            return seen
        time.sleep(0.2)
    raise AssertionError(f"{job_id} timed out; seen {seen}")


def _submit(page, job_id: str) -> str:
    """Press Generate; the queue numbers jobs job-1, job-2, ... in order."""
    page.locator("#lvs-generate").click()
    page.locator("#lvs-message").filter(has_text=f"queued {job_id}").wait_for(timeout=30_000)
    return job_id


def _pick(page, elem_id: str, label_part: str) -> None:
    """Choose the option of a Gradio dropdown whose label contains label_part."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option").filter(has_text=label_part).first.click()


def _video_duration(page) -> float:
    page.wait_for_function("() => { const v = document.querySelector('#lvs-player video');"
                           " return v && v.readyState >= 1 && v.duration > 0; }", timeout=60_000)
    return page.evaluate("document.querySelector('#lvs-player video').duration")


def _steps_lasting(seconds: float, results: Path) -> int:
    """Denoising steps that take about `seconds` here, from the first video's sidecar (its timings per phase)."""
    (sidecar,) = results.glob("*.mp4.json")
    per_step = json.loads(sidecar.read_text())["timings_s"]["denoise"] / FIRST_STEPS
    return max(10, min(400, math.ceil(seconds / max(per_step, 1e-3))))


def _artifacts() -> Path:
    folder = Path(os.environ.get("LOWVRAM_STEPVIDEO_ARTIFACTS", ROOT / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_page_runs_cancels_resumes_and_replays_the_demo(browser, server):
    url, cwd, server_log = server
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(url) else None)
    try:
        page.goto(url, wait_until="load")
        page.locator("#lvs-prompt textarea").wait_for(timeout=60_000)
        assert page.locator("#lvs-profile-note").inner_text().startswith("auto: ")   # which profile, and why
        go, prompt = page.locator("#lvs-generate").bounding_box(), page.locator("#lvs-prompt").bounding_box()
        assert go["y"] + go["height"] <= 1000 and go["x"] > prompt["x"] + prompt["width"] / 2, (go, prompt)
        assert prompt["y"] <= go["y"] + go["height"] / 2 <= prompt["y"] + prompt["height"]   # beside the prompt
        page.evaluate(RECORD_ROWS)

        page.locator("#lvs-prompt textarea").fill("a red fox running through snow")
        page.locator("#lvs-steps input, #lvs-steps textarea").first.fill(str(FIRST_STEPS))
        first = _submit(page, "job-1")
        _watch(page, first, lambda r: r["state"] == "done")
        duration = _video_duration(page)
        assert abs(duration - 34 / 25) < 0.1, duration   # the demo's 34 frames at 25 fps
        assert "a red fox running through snow" in page.locator("#lvs-settings").inner_text()

        second_steps = _steps_lasting(CANCEL_WINDOW_S, cwd / "results")
        page.locator("#lvs-prompt textarea").fill("a lighthouse in a storm")
        page.locator("#lvs-steps input, #lvs-steps textarea").first.fill(str(second_steps))
        second = _submit(page, "job-2")
        # progress within the phase (the page redraws once a second; the first job may denoise faster than that)
        _watch(page, second, lambda r: r["state"] == "running", progressed=True)
        _pick(page, "lvs-job", f"#{second} ")
        page.locator("#lvs-cancel").click()
        cancelled = _watch(page, second, lambda r: r["state"] == "cancelled", timeout=60)[-1]
        assert list((cwd / "results").glob("*.resume.safetensors")), "cancel did not leave the resume checkpoint"
        page.locator("#lvs-resume").click()
        third = "job-3"
        page.locator("#lvs-message").filter(has_text=f"resuming {second} as {third}").wait_for(timeout=30_000)
        _watch(page, third, lambda r: r["state"] == "done")
        resumed_at = re.findall(rf"resuming at step (\d+) of {second_steps}", "".join(server_log))
        assert resumed_at and 1 <= int(resumed_at[0]) < second_steps, "".join(server_log)
        assert _video_duration(page) > 0
        assert "a lighthouse in a storm" in page.locator("#lvs-settings").inner_text()
        assert len(list((cwd / "results").glob("*.mp4"))) == 2
        assert not list((cwd / "results").glob("*.resume.safetensors"))

        _pick(page, "lvs-video-pick", "a red fox")
        page.locator("#lvs-settings").filter(has_text="a red fox running").wait_for(timeout=30_000)
        page.locator("#lvs-reuse").click()
        page.locator("#lvs-message").filter(has_text="settings of").wait_for(timeout=30_000)
        assert page.locator("#lvs-prompt textarea").input_value() == "a red fox running through snow"
        assert page.locator("#lvs-steps input, #lvs-steps textarea").first.input_value() == str(FIRST_STEPS)

        page.locator("#lvs-check-fit").click()
        page.locator("#lvs-fit textarea").wait_for(timeout=60_000)
        page.wait_for_function("() => document.querySelector('#lvs-fit textarea').value.includes('verdict: fits')",
                               timeout=120_000)
    finally:
        shot = _artifacts() / "web-page.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"\nscreenshot of the page: {shot}")
        page.close()
    assert not outside, f"the page fetched from outside this machine: {outside}"


def test_page_makes_a_video_from_an_uploaded_image_and_reuses_it(browser, server):
    """Image to video: the TI2V demo shows the image upload and the motion slider; the finished video is shown
    beside its first image; "Reuse these settings" puts the image back into the form."""
    from conftest import ti2v_fixture
    url, cwd, _ = server
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(url, wait_until="load")
        page.locator("#lvs-prompt textarea").wait_for(timeout=60_000)
        page.evaluate(RECORD_ROWS)
        assert not page.locator("#lvs-image").is_visible()            # the first model is text to video
        _pick(page, "lvs-model", "image to video")
        page.locator("#lvs-image").wait_for(state="visible", timeout=30_000)
        page.locator("#lvs-motion").wait_for(state="visible", timeout=30_000)
        page.locator("#lvs-image input[type=file]").set_input_files(str(ti2v_fixture() / "first_image.png"))
        page.locator("#lvs-image img").first.wait_for(timeout=30_000)
        page.locator("#lvs-prompt textarea").fill("the fox turns its head")
        page.locator("#lvs-steps input, #lvs-steps textarea").first.fill("2")
        job = _submit(page, "job-1")
        _watch(page, job, lambda r: r["state"] == "done")
        assert _video_duration(page) > 0
        page.locator("#lvs-first-image img").first.wait_for(timeout=30_000)
        assert '"ti2v"' in page.locator("#lvs-settings").inner_text()
        (kept,) = (cwd / "results" / "first-images").iterdir()
        assert kept.read_bytes() == (ti2v_fixture() / "first_image.png").read_bytes()

        _pick(page, "lvs-model", "tiny random model (CPU, colourful")   # back to text to video: no image field
        page.locator("#lvs-image").wait_for(state="hidden", timeout=30_000)
        page.locator("#lvs-reuse").click()
        page.locator("#lvs-message").filter(has_text="settings of").wait_for(timeout=30_000)
        page.locator("#lvs-image img").first.wait_for(timeout=30_000)   # the image is back, with its model
        assert page.locator("#lvs-prompt textarea").input_value() == "the fox turns its head"
    finally:
        shot = _artifacts() / "web-page-ti2v.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"\nscreenshot of the page: {shot}")
        page.close()
