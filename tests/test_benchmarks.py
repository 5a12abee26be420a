"""The benchmark scripts run end to end in their CPU smoke mode (tiny models), so they do not rot
between GPU sessions. The numbers are meaningless here; the flow and the JSON are checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, BENCH_SMOKE="1", OUT=str(tmp_path))
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)


def test_forward_benchmark_smoke(tmp_path):
    proc = _bench(tmp_path, "forward", "--frames", "5", "--reps", "1", "--out", str(tmp_path / "f.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "f.json").read_text())["windows"]["5"]
    for path in ("plain", "optimized_shared_prefix", "optimized_sequential", "optimized_low_vram"):
        assert f"{path}_s" in row, path
    # The shared prefix performs fewer operations than two full branches, but most of them.
    assert 0.8 * 2 * row["flops_per_branch"] < row["optimized_shared_prefix_flops"] < 2 * row["flops_per_branch"]
    assert "optimized_shared_prefix" in proc.stdout


@pytest.mark.parametrize("mode", [["--steps", "1"], ["--startup_only"]])
def test_pipeline_benchmark_smoke(tmp_path, mode):
    proc = _bench(tmp_path, "pipeline", *mode)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if mode == ["--startup_only"]:
        result = json.loads((tmp_path / "bench_startup.json").read_text())
        warm = result["warm_to_denoise_s"]
        assert len(warm) >= 2 and min(warm) <= result["warm_median_s"] <= max(warm)
        assert "import time:" in (tmp_path / "import_times.log").read_text()
        # Started with `python -S` and only the requirements' distributions: they are complete.
        only = result["requirements_only_warm_s"]
        assert len(only) >= 2 and min(only) <= result["requirements_only_median_s"] <= max(only)
        assert "denoising:" in (tmp_path / "requirements_only_timeline.log").read_text()
    else:
        result = json.loads((tmp_path / "bench_pipeline.json").read_text())
        assert result["steps_run"] == 1 and len(result["solver_steps_s"]) == 1
    assert "denoising:" in (tmp_path / "warm_start_timeline.log").read_text()


def test_pipeline_scaling_benchmark_smoke(tmp_path):
    # One plain process, then torchrun with 2 (gloo on the CPU): the same video, and the sharing
    # recorded in the second run's sidecar.
    proc = _bench(tmp_path, "pipeline", "--steps", "2", "--nproc", "1", "2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs = json.loads((tmp_path / "bench_pipeline_scaling.json").read_text())["runs"]
    assert [run["processes"] for run in runs] == [1, 2]
    assert runs[0]["distributed"] is None
    assert runs[1]["distributed"] == {"processes": 2, "sharding": "windows"}
    assert all(run["output_identical_to_first"] and len(run["solver_steps_s"]) == 2 for run in runs)
    assert runs[0]["denoise_step_speedup"] == 1.0
    assert "same video" in proc.stdout


def test_pipeline_memory_cap_benchmark_smoke(tmp_path):
    # On the CPU the cap becomes --max_vram_gb: an uncapped run, then the streamed plan (same
    # passes: the same MP4 bytes) and the smallest one.
    proc = _bench(tmp_path, "pipeline", "--steps", "1", "--cap_gb", "23", "7")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs = json.loads((tmp_path / "bench_pipeline_caps.json").read_text())["runs"]
    assert [run["cap_gb"] for run in runs] == [None, 23, 7]
    assert [run["plan"] for run in runs] == ["full", "streamed", "parked_streamed"]
    assert all(run["finished"] and run["peak_host_ram_GB"] > 0 for run in runs)
    assert runs[1]["output_identical"] and runs[0]["ratio_wall"] == 1.0
    assert "max_level_difference" in runs[2] and runs[2]["max_level_difference_before_encoding"] <= 1
    assert "same video" in proc.stdout
