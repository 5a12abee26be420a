"""Multi-GPU correctness check: the tiny random model set enhances a small synthetic clip once in
one process and once under torchrun with N processes (the network evaluations of each solver
step shared out, NCCL on GPUs, gloo on the CPU); the two outputs must be identical.

    python benchmarks/multigpu_check.py [--device cuda] [--nproc 2]

Prints each run's exit code and time, the MD5 of both MP4 files and whether the decoded frames
are equal; exits 1 if a run fails or the outputs differ. Logs go to $OUT (or the temp folder).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from make_tiny_models import make_clip, make_tiny_models  # noqa: E402

from venhancer.video_io import read_video  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="venhancer-multigpu-"))
    logs = Path(os.environ.get("OUT", work))
    config = make_tiny_models(work / "models")
    clip = make_clip(work / "clip.mp4")  # 9 frames -> 25 at 24 fps: 7 windows x 2 branches per step
    common = [str(ROOT / "enhance_a_video.py"), "--input_path", str(clip), "--config", str(config),
              "--up_scale", "2", "--target_fps", "24", "--solver_mode", "normal", "--steps", "2",
              "--device", args.device]
    runs = {
        "single": [sys.executable, *common, "--save_dir", str(work / "single")],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), *common,
                     "--save_dir", str(work / "torchrun")],
    }
    for name, cmd in runs.items():
        start = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        (logs / f"multigpu_check_{name}.log").write_text(proc.stderr)
        print(f"{name}: exit {proc.returncode} in {time.time() - start:.1f} s")
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
    frames = {}
    for name in runs:
        video = work / name / "clip.mp4"
        frames[name] = read_video(video).frames
        print(f"{name}: {frames[name].shape} md5 {hashlib.md5(video.read_bytes()).hexdigest()}")
    print("sharing:", json.loads((work / "torchrun" / "clip.json").read_text())["distributed"])
    same = frames["single"].shape == frames["torchrun"].shape and bool((frames["single"] == frames["torchrun"]).all())
    print("decoded frames identical:", same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
