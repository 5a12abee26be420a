"""Multi-process inference (venhancer.distributed): job assignment, the failure protocol, and the tool
under torchrun (gloo on CPU) against a single process.

Numbers on a CPU depend on the thread count (a reduction split differently rounds differently), and
torchrun gives each process one thread; every process here, the single-process references included,
runs with OMP_NUM_THREADS=1, so the outputs must match exactly.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from make_tiny_models import make_clip, make_tiny_models

from venhancer.distributed import DistContext, assign_jobs, shard_videos, solo
from venhancer.video_io import read_video

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "enhance_a_video.py"
FAULT_TOOL = ROOT / "tests" / "dist_fault_tool.py"
PROTOCOL = ROOT / "tests" / "dist_protocol_worker.py"
FAST = ["--solver_mode", "normal", "--steps", "2", "--up_scale", "2", "--target_fps", "16"]
TIMEOUT = 240  # seconds; a hang shows as a timeout


# --- job assignment ---------------------------------------------------------------------------------

def seed_clip_weights():
    """Frame counts of the seed clip's jobs: 8 windows (7 of 31 frames, the last 40) x 2 branches."""
    windows = [(0, 31), (15, 46), (30, 61), (45, 76), (60, 91), (75, 106), (90, 121), (105, 145)]
    return [end - start for start, end in windows for _ in range(2)]


def loads(weights, owners, world):
    total = [0] * world
    for w, o in zip(weights, owners):
        total[o] += w
    return total


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8, 16, 20])
def test_assignment_covers_every_job_once_and_balances(world):
    weights = seed_clip_weights()
    owners = assign_jobs(weights, world)
    assert len(owners) == len(weights) and all(0 <= o < world for o in owners)
    per_rank = loads(weights, owners, world)
    assert sum(per_rank) == sum(weights)
    # Longest-first greedy: no process exceeds the mean by more than one job.
    assert max(per_rank) <= sum(weights) / world + max(weights)
    if world <= len(weights):
        assert min(per_rank) > 0  # nobody idles while there is work
    assert assign_jobs(weights, world) == owners  # deterministic


def test_assignment_known_cases():
    weights = seed_clip_weights()
    assert loads(weights, assign_jobs(weights, 2), 2) == [257, 257]
    # The two 40-frame jobs of the last window go to different processes first.
    owners = assign_jobs(weights, 4)
    assert owners[14] != owners[15]
    assert max(loads(weights, owners, 4)) - min(loads(weights, owners, 4)) <= 31
    assert assign_jobs([5, 5, 5], 2) == [0, 1, 0]  # ties: earlier job, lower rank
    assert assign_jobs([], 3) == []
    assert assign_jobs([1, 9], 1) == [0, 0]
    with pytest.raises(ValueError):
        assign_jobs([1], 0)


def test_assignment_keeps_window_branches_together():
    """With at least as many windows as processes a window's branches go to one process (they
    share their first layers there), the windows balanced by their summed frames; with fewer
    windows than processes the branches are shared out one by one."""
    weights = seed_clip_weights()
    windows = [i // 2 for i in range(len(weights))]  # job 2w and 2w+1: window w's two branches
    for world in (1, 2, 3, 4, 8):
        owners = assign_jobs(weights, world, groups=windows)
        assert all(owners[2 * w] == owners[2 * w + 1] for w in range(8))
        assert sorted(set(owners)) == list(range(world))
        pairs = [weights[2 * w] + weights[2 * w + 1] for w in range(8)]
        assert owners[::2] == assign_jobs(pairs, world)
    # 2 processes: the 80-frame window and 3 of 62 on one, 4 of 62 on the other
    assert sorted(loads(weights, assign_jobs(weights, 2, groups=windows), 2)) == [248, 266]
    # 16 processes for 8 windows: one branch each, as without groups
    assert assign_jobs(weights, 16, groups=windows) == assign_jobs(weights, 16)
    assert assign_jobs([3, 4], 1, groups=["a", "a"]) == [0, 0]
    with pytest.raises(ValueError):
        assign_jobs([1, 2], 2, groups=["a"])


def test_assignment_within_greedy_bound_of_optimum():
    """Longest-first is within 4/3 of the best makespan (Graham); checked by brute force."""
    rng = random.Random(3)
    for _ in range(40):
        weights = [rng.choice([7, 9, 31, 40, 41]) for _ in range(rng.randint(1, 8))]
        world = rng.randint(2, 4)
        best = min(max(loads(weights, owners, world)) for owners in product(range(world), repeat=len(weights)))
        assert max(loads(weights, assign_jobs(weights, world), world)) <= best * 4 / 3


def test_shard_videos_round_robin():
    items = ["a", "b", "c", "d", "e"]
    shares = [shard_videos(items, r, 2) for r in range(2)]
    assert shares == [["a", "c", "e"], ["b", "d"]]
    assert sorted(sum((shard_videos(items, r, 3) for r in range(3)), [])) == items


def test_context_from_env_and_devices():
    single = DistContext.from_env({})
    assert (single.world_size, single.rank, single.local_rank, single.enabled, single.is_main) == (1, 0, 0, False, True)
    assert single.device_name("cuda:3") == "cuda:3"  # one process: --device as given
    assert single.all_gather_object("x") == ["x"] and single.broadcast_object(5) == 5
    assert single.first_error(None) is None and single.first_error("bad") == "bad"
    single.start()  # no process group for a single process
    assert not single.started
    single.barrier()
    ctx = DistContext.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (ctx.world_size, ctx.rank, ctx.local_rank, ctx.enabled, ctx.is_main) == (4, 3, 1, True, False)
    assert ctx.device_name("cuda") == "cuda:1" and ctx.device_name("cpu") == "cpu"
    with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
        ctx.device_name("cuda:0")
    with pytest.raises(ValueError):
        DistContext.from_env({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(ValueError):
        DistContext.from_env({"WORLD_SIZE": "two"})
    with solo() as agreement:
        agreement.value = 3
    assert agreement.value == 3


# --- launching ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, nproc=None, fault=None):
    """Run `args` (a script and its arguments) alone or under torchrun with `nproc` processes.

    Returns (exit code, stderr). A run that outlives TIMEOUT is killed (with all its processes) and fails
    the test as a hang.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("VENHANCER_TEST_FAULT", None)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if fault:
        env["VENHANCER_TEST_FAULT"] = fault
    cmd = [sys.executable]
    if nproc:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    cmd += [str(a) for a in args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: the session started above
        proc.communicate()
        pytest.fail(f"hang: {' '.join(cmd)} did not finish in {TIMEOUT} s")
    return proc.returncode, out + err


def lines(log, start):
    return [line for line in log.splitlines() if line.startswith(start)]


def frames(path):
    return read_video(path).frames


def test_protocol_with_three_processes(tmp_path):
    """Sharded sampling equals local sampling bit for bit, and every failure reaches every process."""
    code, log = launch([PROTOCOL, tmp_path], nproc=3)
    assert code == 0, log
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    for name in ("equal", "equal_after", "single_job"):
        results = [s[name]["ok"] for s in seen]
        assert all(r["same"] for r in results), name
        assert len({r["digest"] for r in results}) == 1, name  # every process holds the same result
        assert sum(r["calls"] for r in results) == results[0]["alone_calls"], name  # each job ran once
    # 7 windows (6 of 8 frames, the last 9) x 2 branches x 3 steps; each window's two branches on one
    # process, the windows frame-balanced (longest first): 2, 3 and 2 windows per step.
    assert [s["equal"]["ok"]["calls"] for s in seen] == [12, 18, 12]
    # A network failure on process 1: it raises its own error, the others stop with it.
    assert [s["network"].get("error") for s in seen] == ["PeerFailure", "RuntimeError", "PeerFailure"]
    assert seen[0]["network"]["message"] == "process 1 failed: toy network failure"
    # Out of memory after the evaluations on process 2, with steps left and at the last step.
    for name in ("merge_mid", "merge_last"):
        assert [s[name].get("error") for s in seen] == ["PeerOutOfMemory", "PeerOutOfMemory", "OutOfMemoryError"]
    assert [s["together_ok"]["ok"] for s in seen] == ["value of 0"] * 3
    assert [s["together_fail"].get("error") for s in seen] == ["PeerFailure", "ValueError", "PeerFailure"]


# --- the tool ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny models, a folder of three clips (one long: 33 output frames, 7 windows) and their
    single-process results."""
    base = tmp_path_factory.mktemp("dist")
    config = make_tiny_models(base / "models")
    folder = base / "clips"
    folder.mkdir()
    make_clip(folder / "a.mp4")
    make_clip(folder / "b_long.mp4", frames=17)
    make_clip(folder / "c.mp4", width=40, height=48, frames=7, fps=12, audio=True)
    reference = base / "reference"
    code, log = launch([TOOL, "--config", config, "--input_path", folder, "--save_dir", reference, *FAST])
    assert code == 0, log
    return config, folder, reference


def test_long_clip_two_processes_share_windows(setup, tmp_path):
    config, folder, reference = setup
    save = tmp_path / "out"
    code, log = launch([TOOL, "--config", config, "--input_path", folder / "b_long.mp4", "--save_dir", save, *FAST],
                       nproc=2)
    assert code == 0, log
    assert "temporal windows [(0, 9), (4, 13), (8, 17), (12, 21), (16, 25), (20, 29), (24, 33)]" in log
    assert sorted(p.name for p in save.iterdir()) == ["b_long.json", "b_long.mp4"]
    assert np.array_equal(frames(save / "b_long.mp4"), frames(reference / "b_long.mp4"))
    assert json.loads((save / "b_long.json").read_text())["distributed"] == {"processes": 2, "sharding": "windows"}
    # Rank 0 alone logs at info level.
    assert len(lines(log, "loading network")) == 1 and len(lines(log, "summary:")) == 1
    assert "summary: 1 enhanced, 0 skipped (output exists), 0 failed" in log
    assert not lines(log, "[rank 1]")


def test_folder_two_processes_share_videos(setup, tmp_path):
    config, folder, reference = setup
    save = tmp_path / "out"
    code, log = launch([TOOL, "--config", config, "--input_path", folder, "--save_dir", save, *FAST], nproc=2)
    assert code == 0, log
    names = ["a", "b_long", "c"]
    assert sorted(p.name for p in save.iterdir()) == sorted(f"{n}.{ext}" for n in names for ext in ("json", "mp4"))
    for name in names:
        assert np.array_equal(frames(save / f"{name}.mp4"), frames(reference / f"{name}.mp4")), name
        assert json.loads((save / f"{name}.json").read_text())["distributed"] is None  # one process per video
    assert lines(log, "summary:") == ["summary: 3 enhanced, 0 skipped (output exists), 0 failed"]
    # Round-robin: rank 0 enhanced a and c (it logs them), rank 1 b_long (silently).
    assert [line.split(":")[0] for line in lines(log, "") if ": wrote " in line] == ["a.mp4", "c.mp4"]


def test_bad_input_on_one_process_sharing_videos(setup, tmp_path):
    """Rank 1 cannot read its video: it reports it, rank 0 finishes its own and the summary names it."""
    config, folder, _ = setup
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.mp4", "b_long.mp4"):
        shutil.copy(folder / name, two / name)
    save = tmp_path / "out"
    code, log = launch([FAULT_TOOL, "--config", config, "--input_path", two, "--save_dir", save, *FAST], nproc=2,
                       fault="1:read:b_long.mp4")
    assert code == 1, log
    assert sorted(p.name for p in save.iterdir()) == ["a.json", "a.mp4"]
    assert "[rank 1] error: b_long.mp4: injected read failure on process 1" in log
    assert lines(log, "summary:") == ["summary: 1 enhanced, 0 skipped (output exists), 1 failed"]
    assert "error: failed: b_long.mp4: injected read failure on process 1" in lines(log, "error:")  # named once


@pytest.mark.parametrize("fault,message", [
    ("1:read:b_long.mp4", "error: b_long.mp4: process 1 failed: injected read failure on process 1"),
    ("1:network:3", "error: b_long.mp4: process 1 failed: injected network failure on process 1"),
    ("1:merge:1", "error: b_long.mp4: out of CPU memory on process 1 (112x72, 33 frames): lower --up_scale (e.g. 2), "
                  "lower --target_fps, or enhance a shorter clip"),
])
def test_failure_on_one_process_sharing_windows(setup, tmp_path, fault, message):
    """A bad input, an exception or running out of memory on one process stops all of them: one error
    line, exit code 1."""
    config, folder, _ = setup
    save = tmp_path / "out"
    code, log = launch([FAULT_TOOL, "--config", config, "--input_path", folder / "b_long.mp4", "--save_dir", save,
                        *FAST], nproc=2, fault=fault)
    assert code == 1, log
    assert lines(log, "error:")[0] == message
    assert lines(log, "summary:") == ["summary: 0 enhanced, 0 skipped (output exists), 1 failed"]
    assert list(save.iterdir()) == []
    assert not lines(log, "[rank 1]")  # rank 0 reports for both
