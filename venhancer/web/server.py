"""`venhancer-web`: enhance videos from a browser, on this machine (issue #30).

Standard library only: a `ThreadingHTTPServer`, a small JSON API and one static page (static/).
One runner thread owns the `Enhancer`: it loads the models once, at start, while the page is
already served, then runs one job at a time; the others wait in a queue and see their place.
Uploads and results live under --work_dir; files are served by upload or job id, never by a path
taken from the request.

API (JSON unless said otherwise):
    GET  /api/status              models, settings (defaults, limits, help), input folder, queue
    POST /api/upload              raw video body, file name in the X-File-Name header -> video info
    POST /api/plan                {"video", "options"} -> the dry-run plan
    POST /api/jobs                {"video", "prompt", "options"} -> the queued job
    GET  /api/jobs/<id>           state, place in the queue, progress, ETA, error
    GET  /api/jobs/<id>/video     the result (mp4, byte ranges); /sidecar: its JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional
from urllib.parse import unquote, urlsplit

from venhancer.cli import build_parser as build_cli_parser
from venhancer.cli import setup_logging

if TYPE_CHECKING:
    from venhancer.config import PlanningConfig
    from venhancer.pipeline import EnhanceOptions, Enhancer, VideoPlan
    from venhancer.video_io import VideoInfo

logger = logging.getLogger("venhancer.web")

EXIT_USAGE = 2  # as the command line's
STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
# The command line's options that choose the models, copied so that they read and mean the same.
MODEL_OPTIONS = ("version", "model_path", "config", "device", "precision", "dtype", "low_vram", "max_vram_gb",
                 "log_level")
MAX_JSON_BYTES = 1 << 20
_COPY_CHUNK = 1 << 20
_ID = re.compile(r"[0-9a-f]{16}")
# Rough shares of a run's time per phase, for the ETA of the first job; later jobs use the
# shares measured on the previous one.
_FIRST_SHARES = {"encode": 0.05, "denoise": 0.85, "decode": 0.10}
_PHASE_TIMINGS = {"encode": "encode", "denoise": "sample", "decode": "decode_write"}


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def safe_name(raw: str) -> str:
    """A plain file name from an uploaded one: no folders, no leading dots, only [A-Za-z0-9._-]."""
    base = re.split(r"[\\/]", raw)[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip("._-")
    stem, dot, suffix = base.rpartition(".")
    if dot and len(base) > 100:
        base = f"{stem[:90]}.{suffix[:9]}"
    return base[:100] or "upload"


@functools.cache
def settings_spec() -> list[dict[str, Any]]:
    """The page's settings: the CLI's defaults (EnhanceOptions), limits and help texts."""
    from venhancer.diffusion import NOISE_AUG_MAX
    from venhancer.pipeline import MAX_UP_SCALE, SOLVER_MODES, EnhanceOptions

    helps = {action.dest: action.help for action in build_cli_parser()._actions}
    defaults = {f.name: f.default for f in dataclasses.fields(EnhanceOptions)}
    # min_exclusive: the value must be above min (HTML's min is inclusive).
    limits: dict[str, dict[str, Any]] = {
        "up_scale": {"min": 0, "min_exclusive": True, "max": MAX_UP_SCALE, "step": 0.5},
        "target_fps": {"min": 0, "min_exclusive": True, "step": 1},
        "noise_aug": {"min": 0, "max": NOISE_AUG_MAX, "step": 10, "integer": True},
        "solver_mode": {"choices": list(SOLVER_MODES)},
        "steps": {"min": 1, "step": 1, "integer": True},
        "cfg": {"min": 1, "step": 0.5},
        "s_cond": {"min": 0, "step": 1, "integer": True},
        "seed": {"min": 0, "max": 2**63 - 1, "step": 1, "integer": True},
    }
    return [{"name": name, "default": defaults[name], "help": helps.get(name, ""), **limit}
            for name, limit in limits.items()]


def plan_fields(plan: "VideoPlan") -> dict[str, Any]:
    return {"describe": plan.describe(), "width": plan.width, "height": plan.height, "fps": plan.out_fps,
            "frames": plan.out_frames, "inserted_per_pair": plan.k, "windows": [list(w) for w in plan.windows],
            "network_evals": plan.network_evals, "denoise_steps": plan.denoise_steps, "branches": plan.branches}


def info_fields(info: "VideoInfo") -> dict[str, Any]:
    return {"width": info.width, "height": info.height, "fps": info.fps, "frames": info.num_frames,
            "codec": info.codec, "audio": info.audio_codec}


def _named(exc: BaseException, path: Path, name: str) -> str:
    """The CLI's one-line message, naming the video as the user does rather than by our path."""
    return _one_line(exc).replace(str(path), name)


@dataclass
class Source:
    """A video the page may enhance: an upload or a file of the input folder."""

    path: Path
    name: str  # what the user knows it as: the uploaded file's (sanitised) name, or the folder's entry
    info: "VideoInfo"
    upload_id: Optional[str] = None

    def message(self, exc: BaseException) -> str:
        return _named(exc, self.path, self.name)


@dataclass
class Job:
    id: str
    source: Source
    prompt: str
    options: "EnhanceOptions"
    plan: "VideoPlan"
    out_dir: Path
    state: str = "queued"  # queued, running, done, failed
    phase: str = ""  # encode, denoise, decode: the progress callback's phases
    done: int = 0
    total: int = 0
    submitted: float = field(default_factory=time.time)
    started: Optional[float] = None
    progress_started: Optional[float] = None  # first progress report: loading and reading excluded
    finished: Optional[float] = None
    error: Optional[str] = None
    output: Optional[Path] = None
    sidecar: Optional[Path] = None


class Runner:
    """One thread owning the Enhancer: loads the models, then runs the queued jobs in order."""

    def __init__(self, load: Callable[[Callable[[str, int, int], None]], "Enhancer"]):
        self._load = load
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._jobs: dict[str, Job] = {}
        self._waiting: deque[str] = deque()
        self._current: Optional[Job] = None
        self._shares = dict(_FIRST_SHARES)
        self.models_state = "loading"  # loading, ready, failed
        self.models_error: Optional[str] = None
        self.models_detail = ""
        self._thread = threading.Thread(target=self._loop, name="venhancer-web-runner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._wake:
            if self.models_state == "failed":
                raise RuntimeError(f"could not load the models: {self.models_error}")
            self._jobs[job.id] = job
            self._waiting.append(job.id)
            self._wake.notify()

    def queue_length(self) -> int:
        with self._lock:
            return len(self._waiting) + (self._current is not None)

    def status(self, job_id: str) -> Optional[dict[str, Any]]:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            position = 0  # jobs ahead of this one, the running one included
            if job.state == "queued":
                position = list(self._waiting).index(job.id) + (self._current is not None)
            return self._describe(job, position)

    def job(self, job_id: str) -> Optional[Job]:
        with self._lock:
            return self._jobs.get(job_id)

    def _describe(self, job: Job, position: int) -> dict[str, Any]:
        now = time.time()
        fraction, eta = self._estimate(job, now)
        result = None
        if job.state == "done" and job.output is not None:
            result = {"video_url": f"/api/jobs/{job.id}/video", "sidecar_url": f"/api/jobs/{job.id}/sidecar",
                      "file_name": job.output.name}
        return {"id": job.id, "name": job.source.name, "state": job.state, "position": position,
                "models": self.models_state, "phase": job.phase, "done": job.done, "total": job.total,
                "fraction": fraction, "eta_s": eta,
                "elapsed_s": None if job.started is None else (job.finished or now) - job.started,
                "error": job.error, "plan": plan_fields(job.plan), "result": result}

    def _estimate(self, job: Job, now: float) -> tuple[float, Optional[float]]:
        """Share of the run done and seconds left, from the phases' shares and the time so far."""
        if job.state == "done":
            return 1.0, 0.0
        if job.state != "running" or not job.phase or job.total <= 0:
            return 0.0, None
        before = 0.0
        for phase in ("encode", "denoise", "decode"):
            if phase == job.phase:
                break
            before += self._shares[phase]
        fraction = min(before + self._shares[job.phase] * job.done / job.total, 1.0)
        # Until the phase has advanced once, its pace is unknown (a first step also compiles).
        if job.done == 0 or job.progress_started is None:
            return fraction, None
        return fraction, (now - job.progress_started) * (1 - fraction) / fraction

    def _progress(self, phase: str, done: int, total: int) -> None:
        with self._lock:
            job = self._current
            if job is not None:
                if job.progress_started is None:
                    job.progress_started = time.time()
                job.phase, job.done, job.total = phase, done, total

    def _loop(self) -> None:
        start = time.perf_counter()
        try:
            enhancer = self._load(self._progress)
        except Exception as exc:  # whatever it is, the page must say it
            with self._lock:
                self.models_state, self.models_error = "failed", _one_line(exc)
                failed = [self._jobs[i] for i in self._waiting]
                self._waiting.clear()
                for job in failed:
                    job.state, job.error = "failed", f"could not load the models: {self.models_error}"
            logger.error("could not load the models: %s", self.models_error,
                         exc_info=logger.isEnabledFor(logging.DEBUG))
            return
        with self._lock:
            self.models_state = "ready"
            self.models_detail = f"{enhancer.version} on {enhancer.device}"
        logger.info("models loaded in %.1f s (%s)", time.perf_counter() - start, self.models_detail)
        while True:
            with self._wake:
                while not self._waiting:
                    self._wake.wait()
                job = self._jobs[self._waiting.popleft()]
                self._current = job
                job.state, job.started = "running", time.time()
            self._run(enhancer, job)
            with self._lock:
                self._current = None

    def _run(self, enhancer: "Enhancer", job: Job) -> None:
        from venhancer.pipeline import EnhanceError, ModelLoadError
        from venhancer.video_io import VideoError

        logger.info("job %s: %s, %s", job.id, job.source.name, job.plan.describe())
        try:
            result = enhancer.run(job.source.path, job.prompt, job.options, job.out_dir, overwrite=True)
        except ModelLoadError as exc:
            error = f"could not load the models: {_one_line(exc.__cause__ or exc)}"
        except (VideoError, EnhanceError, ValueError, OSError) as exc:
            error = job.source.message(exc)
        except Exception as exc:  # the server goes on with the next job; details at --log_level debug
            error = f"{job.source.name}: unexpected error: {type(exc).__name__}: {_one_line(exc)}"
            logger.debug("job %s failed", job.id, exc_info=True)
        else:
            with self._lock:
                job.state, job.finished = "done", time.time()
                job.output, job.sidecar = result.output_path, result.sidecar_path
                seconds = {p: result.timings.get(t, 0.0) for p, t in _PHASE_TIMINGS.items()}
                if sum(seconds.values()) > 0:
                    self._shares = {p: s / sum(seconds.values()) for p, s in seconds.items()}
            logger.info("job %s: wrote %s in %.1f s", job.id, result.output_path, job.finished - job.started)
            return
        with self._lock:
            job.state, job.error, job.finished = "failed", error, time.time()
        logger.error("job %s: %s", job.id, error)


@dataclass
class App:
    """What the request handlers share."""

    work_dir: Path
    input_dir: Optional[Path]
    planning: "PlanningConfig"
    runner: Runner
    max_upload_bytes: int
    allowed_hosts: Optional[frozenset[str]]  # None: any Host header (bound to a public address)
    uploads: dict[str, Source] = field(default_factory=dict)
    # Input folder videos by (path, size, mtime): probing decodes the whole file.
    probed: dict[tuple[Path, int, int], Source] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def input_videos(self) -> list[Path]:
        from venhancer.video_io import list_videos

        return list_videos(self.input_dir) if self.input_dir is not None else []

    def source(self, spec: Any) -> Source:
        """{"upload": id} or {"input": file name in the input folder}."""
        from venhancer.video_io import VideoError, probe_video

        if isinstance(spec, dict) and isinstance(spec.get("upload"), str):
            with self.lock:
                source = self.uploads.get(spec["upload"])
            if source is None:
                raise LookupError("unknown upload; upload the video again")
            return source
        if isinstance(spec, dict) and isinstance(spec.get("input"), str):
            # Only a name that the listing gives: nothing outside the folder can be named.
            for path in self.input_videos():
                if path.name == spec["input"]:
                    stat = path.stat()
                    key = (path, stat.st_size, stat.st_mtime_ns)
                    with self.lock:
                        source = self.probed.get(key)
                    if source is None:
                        try:
                            source = Source(path, path.name, probe_video(path))
                        except VideoError as exc:
                            raise VideoError(_named(exc, path, path.name)) from exc
                        with self.lock:
                            self.probed[key] = source
                    return source
            raise LookupError(f"no video {spec['input']!r} in the input folder")
        raise LookupError("choose a video first (upload one or pick one from the folder)")

    def add_upload(self, name: str, read: Callable[[int], bytes], length: int) -> Source:
        from venhancer.video_io import VideoError, probe_video

        upload_id = secrets.token_hex(8)
        folder = self.work_dir / "uploads" / upload_id
        folder.mkdir(parents=True)
        path = folder / safe_name(name)
        try:
            with open(path, "wb") as f:
                left = length
                while left > 0:
                    chunk = read(min(left, _COPY_CHUNK))
                    if not chunk:
                        raise ConnectionError(f"{path.name}: upload ended after {length - left} of {length} bytes")
                    f.write(chunk)
                    left -= len(chunk)
            try:
                source = Source(path, path.name, probe_video(path), upload_id)
            except VideoError as exc:
                raise VideoError(_named(exc, path, path.name)) from exc
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # a rejected upload leaves nothing behind
            raise
        with self.lock:
            self.uploads[upload_id] = source
        logger.info("upload %s: %s (%d bytes)", upload_id, path.name, length)
        return source


class Handler(BaseHTTPRequestHandler):
    server_version = "venhancer-web"
    protocol_version = "HTTP/1.1"
    app: App  # set on the subclass made by `make_server`

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        logger.debug("%s %s", self.address_string(), format % args)

    # Replies

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def _file(self, path: Path, content_type: str) -> None:
        """`path` whole, or the single byte range asked for (video elements seek with ranges)."""
        size = path.stat().st_size
        start, end, status = 0, size - 1, HTTPStatus.OK
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match and (match[1] or match[2]):
            if match[1]:
                start, end = int(match[1]), min(int(match[2]) if match[2] else size - 1, size - 1)
            else:
                start = max(size - int(match[2]), 0)
            if start > end:
                self._send(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"", "text/plain",
                           {"Content-Range": f"bytes */{size}"})
                return
            status = HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = f.read(min(left, _COPY_CHUNK))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)

    # Checks

    def _host_allowed(self) -> bool:
        """Against DNS rebinding: a page of another site must not reach this server by a name
        that resolves to 127.0.0.1."""
        allowed = self.app.allowed_hosts
        if allowed is None:
            return True
        host = urlsplit("//" + self.headers.get("Host", "")).hostname or ""
        return host in allowed

    def _cross_site(self) -> bool:
        """A write from a page of another origin (a browser sends Origin with every POST)."""
        origin = self.headers.get("Origin")
        return origin is not None and urlsplit(origin).netloc != self.headers.get("Host", "")

    def _read_json(self) -> Any:
        if self.headers.get_content_type() != "application/json":
            # Another site's form can post only simple content types; JSON needs CORS, never granted.
            raise PermissionError("expected Content-Type: application/json")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_JSON_BYTES:
            raise ValueError("request too large")
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"request is not JSON: {exc}") from exc

    # Routes

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        try:
            self._get()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser stopped reading (a video element does this when it seeks)

    def do_POST(self) -> None:
        try:
            self._post()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _get(self) -> None:
        if not self._host_allowed():
            self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
            return
        path = urlsplit(self.path).path
        if path == "/":
            path = "/static/index.html"
        if path.startswith("/static/") and path[len("/static/"):] in STATIC_FILES:
            name = path[len("/static/"):]
            self._send(HTTPStatus.OK, (STATIC_DIR / name).read_bytes(), STATIC_FILES[name])
            return
        if path == "/api/status":
            self._json(self._status())
            return
        parts = path.split("/")
        if len(parts) in (4, 5) and parts[1:3] == ["api", "jobs"] and _ID.fullmatch(parts[3]):
            self._job_get(parts[3], parts[4] if len(parts) == 5 else "")
            return
        self._error(HTTPStatus.NOT_FOUND, f"not found: {path}")

    def _status(self) -> dict[str, Any]:
        app, runner = self.app, self.app.runner
        return {"models": {"state": runner.models_state, "error": runner.models_error,
                           "detail": runner.models_detail},
                "queue": runner.queue_length(), "settings": settings_spec(),
                "default_prompt": build_cli_parser().get_default("prompt"),
                "inputs": [p.name for p in app.input_videos()], "max_upload_bytes": app.max_upload_bytes}

    def _job_get(self, job_id: str, what: str) -> None:
        runner = self.app.runner
        if what == "":
            status = runner.status(job_id)
            if status is None:
                self._error(HTTPStatus.NOT_FOUND, "unknown job")
            else:
                self._json(status)
            return
        job = runner.job(job_id)
        path = None
        if job is not None and job.state == "done":
            path = {"video": job.output, "sidecar": job.sidecar}.get(what)
        if path is None or not path.is_file():
            self._error(HTTPStatus.NOT_FOUND, "no such file")
            return
        self._file(path, "video/mp4" if what == "video" else "application/json")

    def _post(self) -> None:
        from venhancer.video_io import VideoError

        if not self._host_allowed() or self._cross_site():
            self.close_connection = True
            self._error(HTTPStatus.FORBIDDEN, "requests from other sites are refused")
            return
        path = urlsplit(self.path).path
        try:
            if path == "/api/upload":
                self._upload()
            elif path == "/api/plan":
                body = self._read_json()
                source, options = self._source_and_options(body)
                self._json({"video": source.name, "input": info_fields(source.info),
                            **plan_fields(self._plan(source, options))})
            elif path == "/api/jobs":
                self._submit(self._read_json())
            else:
                self.close_connection = True
                self._error(HTTPStatus.NOT_FOUND, f"not found: {path}")
        except PermissionError as exc:
            self.close_connection = True
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, _one_line(exc))
        except LookupError as exc:
            self._error(HTTPStatus.NOT_FOUND, str(exc.args[0]) if exc.args else "not found")
        except (VideoError, ValueError, TypeError) as exc:  # the CLI's one-line messages
            self._error(HTTPStatus.BAD_REQUEST, _one_line(exc))
        except RuntimeError as exc:  # models that could not be loaded
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, _one_line(exc))

    def _upload(self) -> None:
        if self.headers.get_content_type() != "application/octet-stream":
            raise PermissionError("expected Content-Type: application/octet-stream")
        if self.headers.get("Content-Length") is None:
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "upload without Content-Length")
            return
        length = int(self.headers["Content-Length"])
        limit = self.app.max_upload_bytes
        if length > limit:
            self.close_connection = True  # the body is not read
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"the upload is {length / 1e6:.1f} MB, over the limit of {limit / 1e6:g} MB (--max_upload_mb)")
            return
        name = unquote(self.headers.get("X-File-Name", ""))
        try:
            source = self.app.add_upload(name, self.rfile.read, length)
        except ConnectionError as exc:
            self.close_connection = True
            self._error(HTTPStatus.BAD_REQUEST, _one_line(exc))
            return
        self._json({"upload": source.upload_id, "name": source.name, "input": info_fields(source.info)})

    def _source_and_options(self, body: Any) -> tuple[Source, "EnhanceOptions"]:
        from venhancer.pipeline import EnhanceOptions

        if not isinstance(body, dict):
            raise ValueError("expected a JSON object")
        source = self.app.source(body.get("video"))
        raw = body.get("options") or {}
        names = {f.name for f in dataclasses.fields(EnhanceOptions)}
        unknown = sorted(set(raw) - names) if isinstance(raw, dict) else ["(not an object)"]
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(unknown)}")
        return source, EnhanceOptions(**raw)

    def _plan(self, source: Source, options: "EnhanceOptions") -> "VideoPlan":
        from venhancer.pipeline import plan_video

        try:
            return plan_video(source.info, options, self.app.planning)
        except ValueError as exc:
            raise ValueError(source.message(exc)) from exc

    def _submit(self, body: Any) -> None:
        source, options = self._source_and_options(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            prompt = build_cli_parser().get_default("prompt")
        job_id = secrets.token_hex(8)
        job = Job(job_id, source, prompt.strip(), options, self._plan(source, options),
                  self.app.work_dir / "results" / job_id)
        self.app.runner.submit(job)
        logger.info("job %s queued: %s", job_id, source.name)
        self._json(self.app.runner.status(job_id), HTTPStatus.ACCEPTED)


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(app: App, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"app": app})
    server_class = _Server6 if ":" in host else _Server
    return server_class((host, port), handler)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="venhancer-web",
        description="A local web page for VEnhancer: upload or pick a video, choose the settings, see the "
                    "plan, follow the progress and play or download the result. Nothing leaves this machine.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but a loopback address makes the page (which has "
                        "no login) reachable from other machines")
    p.add_argument("--port", type=int, default=7860, help="port to listen on; 0: any free port")
    p.add_argument("--work_dir", default="web_work", help="folder for uploads (uploads/) and results (results/)")
    p.add_argument("--input_dir", default=None, help="a folder whose videos the page offers besides uploads")
    p.add_argument("--max_upload_mb", type=float, default=2000, help="largest accepted upload")
    cli = build_cli_parser()
    for action in cli._actions:  # noqa: SLF001 (argparse has no public way to share one option)
        if action.dest in MODEL_OPTIONS:
            p._add_action(action)  # noqa: SLF001
    return p


def main(argv: Optional[list[str]] = None) -> int:
    # Before CUDA starts, as in the command line: less fragmentation across windows and tiles.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    from venhancer.config import load_config
    from venhancer.options import precision_name
    from venhancer.pipeline import DeviceError, Enhancer, prepare_save_dir, resolve_device, resolve_precision

    try:
        precision = precision_name(args.precision, args.dtype)
        config = load_config(args.config)
        device = resolve_device(args.device)
        resolve_precision(precision, device)
        work_dir = Path(args.work_dir).resolve()
        for sub in ("uploads", "results"):
            prepare_save_dir(work_dir / sub)
        input_dir = Path(args.input_dir).resolve() if args.input_dir else None
        if input_dir is not None and not input_dir.is_dir():
            raise ValueError(f"input folder not found: {args.input_dir}")
        if args.max_upload_mb <= 0:
            raise ValueError(f"--max_upload_mb must be > 0, got {args.max_upload_mb:g}")
    except (ValueError, OSError, DeviceError) as exc:
        logger.error("%s", _one_line(exc))
        return EXIT_USAGE

    def load(progress: Callable[[str, int, int], None]) -> Enhancer:
        return Enhancer(config, version=args.version, model_path=args.model_path or None, device=str(device),
                        precision=precision, progress=False, low_vram=args.low_vram, progress_callback=progress,
                        max_vram_gb=args.max_vram_gb)

    runner = Runner(load)
    loopback = is_loopback(args.host)
    allowed = frozenset({"127.0.0.1", "localhost", "::1", args.host}) if loopback else None
    app = App(work_dir, input_dir, config.planning, runner, int(args.max_upload_mb * 1e6), allowed)
    try:
        server = make_server(app, args.host, args.port)
    except OSError as exc:
        logger.error("cannot listen on %s port %d: %s", args.host, args.port, exc.strerror or exc)
        return EXIT_USAGE
    if not loopback:
        logger.warning("listening on %s: anyone who can reach this machine can use the page", args.host)
    runner.start()  # the models load while the page is served
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"VEnhancer web page: http://{shown}:{port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("stopped")
    finally:
        server.server_close()
    return 0
