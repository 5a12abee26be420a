"""The GPU warm-up thread: never started without a GPU or when switched off, never fails a run."""

import logging

import torch

from venhancer import warmup


def test_no_thread_without_a_gpu_or_when_switched_off(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert warmup.start_cuda_warmup("auto") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert warmup.start_cuda_warmup("cpu") is None
    assert warmup.start_cuda_warmup("cuda:3") is None  # no such device: the run itself reports it
    monkeypatch.setenv(warmup.ENV_SWITCH, "0")
    assert warmup.start_cuda_warmup("cuda") is None


def test_a_failing_warmup_is_only_logged(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    seen = []

    def broken(device, kernels):
        seen.append((device, kernels.__name__))
        raise RuntimeError("driver too old")

    monkeypatch.setattr(warmup, "_warm", broken)
    with caplog.at_level(logging.DEBUG, logger="venhancer.warmup"):
        thread = warmup.start_cuda_warmup("auto")
        thread.join(timeout=30)
    assert seen == [(torch.device("cuda"), "venhancer.runtime.ops")]
    assert "GPU warm-up skipped: driver too old" in caplog.text


def test_cli_waits_for_the_warmup_before_exiting(monkeypatch, tmp_path):
    """A run that stops early (here: the only input is not a video, found after the warm-up
    started) still joins the warm-up thread first; a mistyped path stops before it starts."""
    from venhancer import cli

    joined = []

    class Thread:
        def join(self, timeout=None):
            joined.append(timeout)

    monkeypatch.setattr(warmup, "start_cuda_warmup", lambda device: Thread())
    code = cli.main(["--input_path", str(tmp_path / "missing.mp4"), "--save_dir", str(tmp_path / "out")])
    assert code == cli.EXIT_USAGE and joined == []
    (tmp_path / "not_a_video.mp4").write_bytes(b"not a video")
    code = cli.main(["--input_path", str(tmp_path / "not_a_video.mp4"), "--save_dir", str(tmp_path / "out"),
                     "--device", "cpu"])
    assert code == cli.EXIT_FAILED and len(joined) == 1
