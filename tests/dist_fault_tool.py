"""enhance_a_video.py with a fault injected on one process, for the multi-process tests.

    VENHANCER_TEST_FAULT="RANK:KIND:ARG" python -m torch.distributed.run ... tests/dist_fault_tool.py ARGS

KIND, on process RANK only:
  read:NAME    reading the video file NAME raises VideoError (a bad input seen by that process alone)
  network:N    the N-th network call raises RuntimeError
  merge:N      the N-th window merge (after a solver step's network evaluations) runs out of memory
Without VENHANCER_TEST_FAULT it is enhance_a_video.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import venhancer.diffusion.guidance as guidance  # noqa: E402
import venhancer.pipeline as pipeline  # noqa: E402
from venhancer import cli  # noqa: E402
from venhancer.runtime.branches import FastVEnhancerUNet  # noqa: E402  (the pipeline runs the optimized network)
from venhancer.video_io import VideoError  # noqa: E402


def _nth(n: int, fault):
    calls = [0]

    def hook():
        calls[0] += 1
        if calls[0] == n:
            fault()

    return hook


def install(spec: str, rank: int) -> None:
    where, kind, arg = spec.split(":", 2)
    if int(where) != rank:
        return
    if kind == "read":
        real_read = pipeline.probe_video

        def probe_video(path, *args, **kwargs):
            if Path(path).name == arg:
                raise VideoError(f"{Path(path).name}: injected read failure on process {rank}")
            return real_read(path, *args, **kwargs)

        pipeline.probe_video = probe_video
    elif kind == "network":
        real_forward = FastVEnhancerUNet.forward
        real_branches = FastVEnhancerUNet.forward_branches

        def fail():
            raise RuntimeError(f"injected network failure on process {rank}")

        hook = _nth(int(arg), fail)  # counts both entry points: a window's branches alone or together

        def forward(self, *args, **kwargs):
            hook()
            return real_forward(self, *args, **kwargs)

        def forward_branches(self, *args, **kwargs):
            hook()
            return real_branches(self, *args, **kwargs)

        FastVEnhancerUNet.forward = forward
        FastVEnhancerUNet.forward_branches = forward_branches
    elif kind == "merge":
        real_merge = guidance.merge_windows

        def oom():
            raise torch.OutOfMemoryError(f"injected out of memory on process {rank}")

        hook = _nth(int(arg), oom)

        def merge_windows(*args, **kwargs):
            hook()
            return real_merge(*args, **kwargs)

        guidance.merge_windows = merge_windows
    else:
        raise ValueError(f"unknown fault {spec!r}")


if __name__ == "__main__":
    spec = os.environ.get("VENHANCER_TEST_FAULT", "")
    if spec:
        install(spec, int(os.environ.get("RANK", "0")))
    sys.exit(cli.main())
