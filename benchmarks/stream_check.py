"""Weight streaming on the GPU with the full-size random-weight network: the same outputs as the
resident network (bit for bit), the time per evaluation with and without streaming, and the peak
memory, for windows of the seed clip's latent size, per memory plan's pass sizes.

    python benchmarks/stream_check.py [frames ...] [--peaks] [PLAN_NAME ...]
    # default 16 frames, every streamed plan; --peaks: streamed runs only (no resident reference)"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench import build_model, window_inputs  # noqa: E402

from venhancer.diffusion.chunking import Job, evaluate_sequential, evaluate_shared_prefix  # noqa: E402
from venhancer.memory import PLAN_NAMES, PLANS, WeightStreamer  # noqa: E402
from venhancer.runtime import optimize_for_inference  # noqa: E402


def main() -> int:
    peaks_only = "--peaks" in sys.argv
    counts = [int(a) for a in sys.argv[1:] if a.isdigit()] or [16]
    chosen = {a for a in sys.argv[1:] if a in PLAN_NAMES}
    model = build_model(torch.float16)
    configs = [(p.name, p.inference, evaluate_shared_prefix if p.shared_branch_prefix else evaluate_sequential)
               for p in PLANS if p.stream_weights and (p.name in chosen or not chosen and p.name != "streamed_sequential")]
    for frames in counts:
        x, t, y_c, y_u, common = window_inputs(frames)
        jobs = [Job((0, frames), "cond", x, t, {"y": y_c, **common}),
                Job((0, frames), "uncond", x, t, {"y": y_u, **common})]
        for name, options, evaluate in configs:
            optimize_for_inference(model, options)
            reference, resident_s = None, float("nan")
            if not peaks_only:
                with torch.inference_mode():
                    evaluate(model, jobs)
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    reference = evaluate(model, jobs)
                    torch.cuda.synchronize()
                    resident_s = time.perf_counter() - start
            streamer = WeightStreamer(model, "cuda", prefetch=2)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            run = streamer.wrap_evaluator(evaluate)
            with torch.inference_mode():
                for _ in range(2 if peaks_only else 3):  # records the order, then replays it
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    outputs = run(model, jobs)
                    torch.cuda.synchronize()
                    took = time.perf_counter() - start
                    same = reference is None or all(torch.equal(a, b) for a, b in zip(outputs, reference))
                    del outputs
                    print(f"{frames} frames, {name}: streamed evaluation {took:.3f} s (resident {resident_s:.3f} s), "
                          f"identical: {'-' if reference is None else same}, loads {streamer.loads}, prefetch hits "
                          f"{streamer.prefetch_hits}, pinned {streamer.pinned}, peak allocated "
                          f"{torch.cuda.max_memory_allocated() / 1e9:.2f} GB, reserved "
                          f"{torch.cuda.max_memory_reserved() / 1e9:.2f} GB", flush=True)
                    if not same:
                        return 1
            reference = None
            streamer.detach()
            torch.cuda.empty_cache()
    return 0

if __name__ == "__main__":
    sys.exit(main())
