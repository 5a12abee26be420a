"""enhance_a_video.py with PyTorch's allocator capped for the whole run, to emulate a smaller GPU.

    VENHANCER_MEMORY_CAP_GB=15 python benchmarks/capped_cli.py --input_path ... (the CLI's flags)

The cap (GB = 1e9 bytes) goes to torch.cuda.set_per_process_memory_fraction before anything else
touches the GPU; the tool then plans for it as for a card of that size (its default budget is the
free memory or this cap, whichever is lower). Without CUDA (the benchmark's CPU smoke run) the cap
becomes --max_vram_gb, which picks the same plan. Used by `bench.py pipeline --cap_gb`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    # As the CLI does, before CUDA starts (it would be too late inside cli.main).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch

    from venhancer import cli

    argv = sys.argv[1:]
    cap = float(os.environ["VENHANCER_MEMORY_CAP_GB"])
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 1e9 / total))
        if not hasattr(torch.cuda, "get_per_process_memory_fraction"):
            argv += ["--max_vram_gb", str(cap)]  # the tool cannot read the cap on this PyTorch
    else:
        argv += ["--max_vram_gb", str(cap)]
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
