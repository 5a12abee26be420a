"""Window sharding's protocol on a toy network, under torchrun (gloo on CPU); see test_distributed.py.

    python -m torch.distributed.run --nproc_per_node 3 tests/dist_protocol_worker.py OUTDIR

Runs a list of scenarios in one launch (so that a desynchronised collective would show in the
scenarios after it) and writes what each process saw to OUTDIR/rank<N>.json.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import venhancer.diffusion.guidance as guidance  # noqa: E402
from venhancer.diffusion import sample  # noqa: E402
from venhancer.distributed import DistContext, PeerFailure, PeerOutOfMemory, WindowSharding  # noqa: E402
from venhancer.planning import chunk_windows  # noqa: E402


class ToyNet(torch.nn.Module):
    """A v-predicting stand-in: mixes frames and channels, depends on t and on the text embedding."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv3d(4, 4, 3, padding=1)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
        self.calls = 0
        self.fail_at = None  # (call number, exception) to raise on

    def forward(self, x, t, y, hint, mask_cond, s_cond, t_hint):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at[0]:
            raise self.fail_at[1]
        return torch.tanh(self.conv(x)) * (t.float()[:, None, None, None, None] / 1000) + y.mean() * 0.1


def inputs(frames: int):
    generator = torch.Generator().manual_seed(1)
    x_T = torch.randn(1, 4, frames, 6, 8, generator=generator)
    cond = {"y": torch.randn(1, 5, 8, generator=generator), "hint": torch.zeros(1), "mask_cond": torch.zeros(1, frames),
            "s_cond": torch.ones(1), "t_hint": torch.zeros(1, dtype=torch.long)}
    uncond = {**cond, "y": torch.zeros(1, 5, 8)}
    return x_T, cond, uncond


def run_sample(model, shard, frames, windows, guide_scale, steps=3):
    """Sampling as Enhancer._denoise does it: begin, sample with the sharded evaluator, finish."""
    x_T, cond, uncond = inputs(frames)
    generator = torch.Generator().manual_seed(7)
    kwargs = dict(solver_mode="normal", steps=steps, guide_scale=guide_scale, windows=windows, generator=generator)
    if shard is None:
        return sample(model, x_T, cond, uncond, **kwargs)
    shard.begin(steps)
    try:
        x0 = sample(model, x_T, cond, uncond, evaluate=shard.evaluate, **kwargs)
    except Exception as exc:
        shard.finish(exc)
        raise
    shard.finish()
    return x0


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def outcome(fn):
    try:
        return {"ok": fn()}
    except PeerOutOfMemory as exc:
        return {"error": "PeerOutOfMemory", "message": str(exc)}
    except PeerFailure as exc:
        return {"error": "PeerFailure", "message": str(exc)}
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc)}


def main(outdir: Path) -> None:
    ctx = DistContext.from_env()
    ctx.start()
    shard = WindowSharding(ctx, torch.device("cpu"))
    model = ToyNet()
    frames = 33
    windows = chunk_windows(frames, 1, max_len=8, overlap=4)  # 7 windows, the last 9 frames long
    seen: dict = {"rank": ctx.rank, "windows": windows}

    def equal(windows_=windows, guide_scale=7.5):
        model.calls = 0
        alone = run_sample(model, None, frames, windows_, guide_scale)
        alone_calls = model.calls
        model.calls = 0
        shared = run_sample(model, shard, frames, windows_, guide_scale)
        return {"same": bool(torch.equal(alone, shared)), "digest": digest(shared), "calls": model.calls,
                "alone_calls": alone_calls}

    seen["equal"] = outcome(equal)

    original_merge = guidance.merge_windows

    def fail_network():
        model.calls = 0
        if ctx.rank == 1:
            model.fail_at = (2, RuntimeError("toy network failure"))
        try:
            return run_sample(model, shard, frames, windows, 7.5).sum().item()
        finally:
            model.fail_at = None

    seen["network"] = outcome(fail_network)

    def fail_merge(at):
        def run():
            calls = [0]

            def merge(*args, **kwargs):
                calls[0] += 1
                if ctx.rank == 2 and calls[0] == at:
                    raise torch.OutOfMemoryError("toy out of memory")
                return original_merge(*args, **kwargs)

            guidance.merge_windows = merge
            try:
                return run_sample(model, shard, frames, windows, 7.5).sum().item()
            finally:
                guidance.merge_windows = original_merge
        return run

    seen["merge_mid"] = outcome(fail_merge(1))  # the others still have steps to run
    seen["merge_last"] = outcome(fail_merge(3))  # the others have finished sampling

    def together(fail_rank):
        def run():
            with shard.together() as agreement:
                agreement.value = f"value of {ctx.rank}"
                if ctx.rank == fail_rank:
                    raise ValueError(f"bad input on {ctx.rank}")
            return agreement.value
        return run

    seen["together_ok"] = outcome(together(-1))
    seen["together_fail"] = outcome(together(1))
    # Still in step after the failures; one job for three processes (two have nothing to do).
    seen["equal_after"] = outcome(equal)
    seen["single_job"] = outcome(lambda: equal(None, 1.0))
    (outdir / f"rank{ctx.rank}.json").write_text(json.dumps(seen))
    ctx.barrier()
    ctx.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
