"""venhancer-web end to end: the server started on a free local port with the tiny model set on CPU
(tests/make_tiny_models.py), driven through its JSON API and in a headless Chromium (Playwright).

The browser tests are skipped where Playwright or Chromium is missing (.ci/run installs both).
VENHANCER_WEB_SCREENSHOT=docs/web.png saves the page after the finished run (the README's picture).
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from make_tiny_models import make_clip, make_tiny_models

from venhancer.config import load_config
from venhancer.pipeline import EnhanceOptions, _ReportingBar, plan_video
from venhancer.video_io import VideoError, VideoInfo, probe_video
from venhancer.web.server import Job, Runner, Source, safe_name

ROOT = Path(__file__).resolve().parents[1]
# 9 frames at 8 fps, up_scale 2, target 16 fps: 17 frames of 112x72 at 16 fps (as in test_cli.py).
FAST = {"solver_mode": "normal", "steps": 2, "up_scale": 2, "target_fps": 16}
OUT_FRAMES, OUT_FPS = 17, 16
CHROMIUM = os.environ.get("VENHANCER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUN_TIMEOUT_S = 900  # one tiny run takes 30-60 s on two busy CPU cores


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("web_inputs")
    make_clip(folder / "pattern.mp4")
    make_clip(folder / "with_audio.mp4", audio=True)
    (folder / "not_video.mp4").write_text("plain text, not a video\n" * 10)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, clips):
    """The server as a user starts it; yields its base URL, work folder and stderr lines."""
    config = make_tiny_models(tmp_path_factory.mktemp("tiny_models"))
    work = tmp_path_factory.mktemp("web_work")
    cmd = [sys.executable, "-m", "venhancer.web", "--config", str(config), "--device", "cpu", "--port", "0",
           "--work_dir", str(work), "--input_dir", str(clips), "--max_upload_mb", "5"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    first = queue.Queue()
    threading.Thread(target=lambda: first.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = first.get(timeout=120)
    except queue.Empty:
        proc.kill()
        pytest.fail("the server printed no address within 120 s:\n" + "".join(log))
    assert line.startswith("VEnhancer web page: http://127.0.0.1:"), line + "".join(log)
    url = line.split(": ", 1)[1].strip().rstrip("/")
    yield {"url": url, "work": work, "log": log, "config": config}
    proc.terminate()
    proc.wait(timeout=30)


def request(server, method, path, body=None, headers=None):
    """(status, decoded JSON or raw bytes) of one request, errors included."""
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    headers = {"Content-Type": "application/json", **(headers or {})} if isinstance(body, (dict, list)) \
        else (headers or {})
    req = urllib.request.Request(server["url"] + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            status, raw, kind = response.status, response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        status, raw, kind = exc.code, exc.read(), exc.headers.get_content_type()
    return status, json.loads(raw) if kind == "application/json" else raw


def upload(server, path, name=None):
    return request(server, "POST", "/api/upload", Path(path).read_bytes(),
                   {"Content-Type": "application/octet-stream",
                    "X-File-Name": urllib.request.quote(name or Path(path).name)})


def wait_for(server, job_id, timeout=RUN_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, job = request(server, "GET", f"/api/jobs/{job_id}")
        assert status == 200, job
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.5)
    pytest.fail(f"job {job_id} not finished after {timeout} s:\n" + "".join(server["log"][-30:]))


def cli_message(folder: Path, name: str) -> str:
    """What the command line prints for `--input_path NAME` run in `folder`."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        probe_video(Path(name))
    except VideoError as exc:
        return str(exc)
    finally:
        os.chdir(cwd)
    raise AssertionError(f"{name} was readable")


def test_progress_callback_follows_the_bars():
    calls = []
    with _ReportingBar(__import__("tqdm").tqdm(total=3, disable=True), "denoise", 3,
                       lambda *a: calls.append(a)) as bar:
        bar.update(1)
        bar.update(2)
    assert calls == [("denoise", 0, 3), ("denoise", 1, 3), ("denoise", 3, 3)]


def test_upload_names_are_sanitised():
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("..\\..\\x.mp4") == "x.mp4"
    assert safe_name("..") == "upload" and safe_name("") == "upload"
    assert safe_name(".hidden.mp4") == "hidden.mp4"
    assert safe_name("my clip (1).mp4") == "my_clip_1_.mp4"
    assert len(safe_name("a" * 500 + ".mp4")) <= 100 and safe_name("a" * 500 + ".mp4").endswith(".mp4")


def test_models_that_fail_to_load_fail_the_jobs(tmp_path):
    info = VideoInfo(tmp_path / "x.mp4", 56, 36, 8.0, 9, "h264", None)
    plan = plan_video(info, EnhanceOptions(), load_config(None).planning)
    jobs = [Job(f"{i:016x}", Source(info.path, "x.mp4", info), "p", EnhanceOptions(), plan, tmp_path / str(i))
            for i in range(2)]
    gate = threading.Event()

    def load(progress):
        gate.wait(30)
        raise OSError("weights missing")

    runner = Runner(load)
    runner.start()
    runner.submit(jobs[0])
    assert runner.status(jobs[0].id)["models"] == "loading"
    gate.set()
    runner._thread.join(30)
    status = runner.status(jobs[0].id)
    assert (status["state"], status["error"]) == ("failed", "could not load the models: weights missing")
    with pytest.raises(RuntimeError, match="^could not load the models: weights missing$"):
        runner.submit(jobs[1])


def test_bad_device_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "venhancer.web", "--device", "cuda:99", "--work_dir",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: device 'cuda:99' requested but") and proc.stderr.count("\n") == 1
    assert proc.stdout == ""


def test_fp8_on_the_cpu_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "venhancer.web", "--device", "cpu", "--precision", "fp8",
                           "--work_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --precision fp8 needs a GPU") and proc.stderr.count("\n") == 1
    assert proc.stdout == ""


def test_api_plan_and_refusals(server, clips):
    status, body = request(server, "GET", "/api/status")
    assert status == 200 and body["inputs"] == ["not_video.mp4", "pattern.mp4", "with_audio.mp4"]
    defaults = {s["name"]: s["default"] for s in body["settings"]}
    assert defaults == {"up_scale": 4, "target_fps": 24, "noise_aug": 200, "solver_mode": "fast", "steps": 15,
                        "cfg": 7.5, "s_cond": 8, "seed": 666}
    assert body["default_prompt"] == "a good video"

    # A corrupt upload: the CLI's message, and nothing kept.
    status, body = upload(server, clips / "not_video.mp4")
    assert (status, body) == (400, {"error": cli_message(clips, "not_video.mp4")})
    assert list((server["work"] / "uploads").iterdir()) == []

    # Path traversal in the name: stored inside the work folder under the plain name.
    status, body = upload(server, clips / "pattern.mp4", name="../../../escape.mp4")
    assert status == 200 and body["name"] == "escape.mp4", body
    stored = server["work"] / "uploads" / body["upload"] / "escape.mp4"
    assert stored.read_bytes() == (clips / "pattern.mp4").read_bytes()
    video = {"upload": body["upload"]}

    status, plan = request(server, "POST", "/api/plan", {"video": video, "options": FAST})
    expected = plan_video(probe_video(clips / "pattern.mp4"), EnhanceOptions(**FAST),
                          load_config(server["config"]).planning)
    assert status == 200 and plan["describe"] == expected.describe()
    assert (plan["frames"], plan["fps"], plan["width"], plan["height"]) == (OUT_FRAMES, OUT_FPS, 112, 72)
    assert plan["network_evals"] == expected.network_evals == 12

    # Bad settings: EnhanceOptions' messages.
    for options, message in [({"up_scale": 9}, "up_scale must be in (0, 8], got 9"),
                             ({"cfg": 0.5}, "cfg (guidance scale) must be >= 1, got 0.5"),
                             ({"steps": None}, "steps must be an integer, got None"),
                             ({"solver": "x"}, "unknown settings: solver")]:
        assert request(server, "POST", "/api/jobs", {"video": video, "options": options}) \
            == (400, {"error": message})
    # An input folder video with planning's error; a name outside the listing.
    assert request(server, "POST", "/api/plan", {"video": {"input": "not_video.mp4"}, "options": {}}) \
        == (400, {"error": cli_message(clips, "not_video.mp4")})
    assert request(server, "POST", "/api/plan", {"video": {"input": "../pattern.mp4"}, "options": {}})[0] == 404

    # Too large: refused from the header, before any byte is read.
    host = server["url"].removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=30)
    conn.putrequest("POST", "/api/upload")
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Content-Length", str(6_000_000))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "over the limit of 5 MB" in json.loads(response.read())["error"]
    conn.close()

    # Other sites: a form post (simple content type), another Origin, another Host name (DNS rebinding).
    assert request(server, "POST", "/api/plan", b"{}", {"Content-Type": "text/plain"})[0] == 415
    assert request(server, "POST", "/api/plan", {"video": video}, {"Origin": "http://evil.example"})[0] == 403
    assert request(server, "GET", "/api/status", headers={"Host": "evil.example"})[0] == 403
    # Files only by job id.
    assert request(server, "GET", "/api/jobs/0123456789abcdef/video")[0] == 404
    assert request(server, "GET", "/static/../server.py")[0] == 404
    assert request(server, "GET", "/api/jobs/..%2F..%2Fetc%2Fpasswd")[0] == 404


def browser_or_skip():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    if CHROMIUM is None:
        pytest.skip("no Chromium executable (apt-get install chromium, or set VENHANCER_CHROMIUM)")
    return sync_api


@pytest.fixture(scope="module")
def page(server):
    sync_api = browser_or_skip()
    with sync_api.sync_playwright() as playwright:
        # Playwright gives the browser a fresh temporary profile (--user-data-dir) of its own.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 860, "height": 800})
        yield page
        browser.close()


def test_page_shows_a_corrupt_upload_error(server, clips, page):
    page.goto(server["url"] + "/")
    page.set_input_files("#file", str(clips / "not_video.mp4"))
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error") == cli_message(clips, "not_video.mp4")
    assert page.is_disabled("#run")


def test_page_queues_runs_and_plays_the_result(server, clips, page):
    page.goto(server["url"] + "/")
    page.wait_for_function("document.querySelector('#opt-up_scale') !== null")
    assert page.input_value("#opt-steps") == "15" and page.is_disabled("#opt-steps")  # the fast solver
    page.set_input_files("#file", str(clips / "pattern.mp4"))
    page.select_option("#opt-solver_mode", "normal")
    for name in ("steps", "up_scale", "target_fps"):
        page.fill(f"#opt-{name}", str(FAST[name]))
    page.fill("#prompt", "a test pattern")
    # The dry-run plan, before anything runs.
    page.wait_for_function("document.querySelector('#plan-text').textContent.includes('= 12')")
    assert "output 112x72 @ 16 fps, 17 frames" in page.text_content("#plan-text")
    assert "112x72 @ 16 fps, 17 frames" in page.text_content("#plan")

    # Another job occupies the runner (a cheaper one: 1 step, no guidance branch): the page's job
    # waits in the queue and says so.
    cheap = {**FAST, "steps": 1, "cfg": 1}
    status, ahead = request(server, "POST", "/api/jobs", {"video": {"input": "with_audio.mp4"}, "options": cheap})
    assert status == 202 and ahead["position"] == 0 and ahead["plan"]["network_evals"] == 3, ahead
    # Every text the job line shows, kept for the checks below (polling could miss a short state).
    page.evaluate("""window.seen = [];
        new MutationObserver(() => window.seen.push(document.querySelector('#job-state').textContent))
            .observe(document.querySelector('#job-state'), {childList: true, characterData: true, subtree: true})""")
    with page.expect_response("**/api/jobs") as submitted:
        page.click("#run")
    assert submitted.value.json()["position"] == 1
    job_id = submitted.value.json()["id"]
    page.wait_for_function("document.querySelector('#job-state').textContent.includes('place 1 in the queue')"
                           " || window.seen.some((text) => text.includes('place 1 in the queue'))")
    assert page.evaluate("location.hash") == f"#job={job_id}"
    assert wait_for(server, ahead["id"])["state"] == "done"
    job = wait_for(server, job_id)
    assert job["state"] == "done", job["error"]
    page.wait_for_selector("#result-box:not([hidden])", timeout=60_000)
    assert "done in" in page.text_content("#job-state")
    # It ran with a progress bar and an ETA (a number once a step has been timed; a tiny run can
    # finish between two polls, so the line may only ever show the placeholder).
    seen = page.evaluate("window.seen")
    assert any(re.search(r"(denoise|decode) \d+/\d+ · \d+% · about (\d+ (min \d+ )?s|…) left", text)
               for text in seen), seen
    assert page.evaluate("document.querySelector('#job-bar > div').style.width") == "100%"
    page.wait_for_function("document.querySelector('#result').readyState >= 1")
    duration = page.evaluate("document.querySelector('#result').duration")
    assert abs(duration - OUT_FRAMES / OUT_FPS) < 0.5 / OUT_FPS, duration
    page.evaluate("document.querySelector('#result').play()")
    page.wait_for_function("document.querySelector('#result').currentTime > 0", timeout=30_000)
    page.evaluate("const v = document.querySelector('#result'); v.pause(); v.currentTime = 0.5")

    # The download link serves the output; the sidecar's figures are on the page.
    href = page.get_attribute("#download", "href")
    assert page.get_attribute("#download", "download") == "pattern.mp4"
    status, data = request(server, "GET", href)
    served = server["work"] / "served.mp4"
    served.write_bytes(data)
    info = probe_video(served)
    assert (info.num_frames, info.fps, info.width, info.height) == (OUT_FRAMES, OUT_FPS, 112, 72)
    figures = page.text_content("#figures")
    assert "112x72 @ 16 fps, 17 frames" in figures and "a test pattern" in figures and "v1 on cpu" in figures
    sidecar = json.loads((server["work"] / "results" / job_id / "pattern.json").read_text())
    assert sidecar["output"]["frames"] == OUT_FRAMES and sidecar["settings"]["steps"] == 2
    if os.environ.get("VENHANCER_WEB_SCREENSHOT"):
        page.wait_for_function("document.querySelector('#result').readyState >= 2")
        page.screenshot(path=str(ROOT / os.environ["VENHANCER_WEB_SCREENSHOT"]), full_page=True)
