"""Run settings and their validation, shared by the command line and the Python API.

Pure Python on purpose: the command line validates its flags (and takes its defaults from
`EnhanceOptions`) before torch is imported, so a mistyped value is reported at once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Any

logger = logging.getLogger(__name__)

SOLVER_MODES = ("fast", "normal")
MAX_UP_SCALE = 8.0
#: Upper clamp of the key-frame noise augmentation strength (SPEC 1.9).
NOISE_AUG_MAX = 300
#: The schedule has 1000 timesteps and normal mode spreads `steps` over 900 of them: more steps
#: only repeat timesteps (and a huge count would build a timestep table of that length).
MAX_STEPS = 1000
#: The network's precision (`--precision`); fp8 keeps fp16 weights and runs the optimized
#: runtime's FP8 kernels, on GPUs with FP8 tensor cores only.
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "fp8")
#: The values of `--dtype`, the flag's deprecated old name, as precisions.
DTYPE_ALIASES = {"auto": "auto", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def precision_name(precision: str | None = None, dtype: str | None = None) -> str:
    """The precision asked for by `precision` and by `dtype`, its deprecated old name (None: not
    given): "auto" when neither is. ValueError for an unknown value, or for the two disagreeing."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if dtype is None:
        return precision or "auto"
    if dtype not in DTYPE_ALIASES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPE_ALIASES)}, got {dtype!r}")
    if precision is not None and precision != DTYPE_ALIASES[dtype]:
        raise ValueError(f"--precision {precision} and --dtype {dtype} disagree; "
                         "give --precision alone (--dtype is its deprecated old name)")
    return DTYPE_ALIASES[dtype]


def finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def integer(name: str, value: Any) -> int:
    """An int, or a float with an integral value (7.0); anything else is a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def in_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")


@dataclass(frozen=True)
class EnhanceOptions:
    """Per-video settings; defaults are the reference's. Invalid values raise ValueError.

    steps: normal mode only. Its timesteps follow the reference's rule
    `arange(899, -1, -900 / (steps + 1))`, whose float rounding adds one step for some counts
    (94, 108, 189, 194, 198, 200, ...: `num_model_evals` gives the exact number).
    s_cond: an integer, as in the reference (which passes it as a LongTensor).
    """

    up_scale: float = 4.0
    target_fps: float = 24.0
    noise_aug: int = 200
    solver_mode: str = "fast"
    steps: int = 15
    cfg: float = 7.5
    s_cond: int = 8
    seed: int = 666

    def __post_init__(self) -> None:
        up_scale = finite("up_scale", self.up_scale)
        if not 0 < up_scale <= MAX_UP_SCALE:
            raise ValueError(f"up_scale must be in (0, {MAX_UP_SCALE:g}], got {self.up_scale!r}")
        target_fps = finite("target_fps", self.target_fps)
        if target_fps <= 0:
            raise ValueError(f"target_fps must be > 0, got {self.target_fps!r}")
        noise_aug = integer("noise_aug", self.noise_aug)
        if not 0 <= noise_aug <= NOISE_AUG_MAX:
            clamped = min(max(noise_aug, 0), NOISE_AUG_MAX)
            logger.warning("noise_aug %d is outside [0, %d]; using %d", noise_aug, NOISE_AUG_MAX, clamped)
            noise_aug = clamped
        if self.solver_mode not in SOLVER_MODES:
            raise ValueError(f"solver_mode must be one of {SOLVER_MODES}, got {self.solver_mode!r}")
        steps = integer("steps", self.steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps!r}")
        in_range("steps", steps, 1, MAX_STEPS)
        cfg = finite("cfg", self.cfg)
        if cfg < 1:
            raise ValueError(f"cfg (guidance scale) must be >= 1, got {self.cfg!r}")
        s_cond = integer("s_cond", self.s_cond)
        if s_cond < 0:
            raise ValueError(f"s_cond must be >= 0, got {self.s_cond!r}")
        seed = integer("seed", self.seed)
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed!r}")
        for name, value in (("up_scale", up_scale), ("target_fps", target_fps), ("noise_aug", noise_aug),
                            ("steps", steps), ("cfg", cfg), ("s_cond", s_cond), ("seed", seed)):
            object.__setattr__(self, name, value)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Field name -> default value (the command line's flag defaults)."""
        return {f.name: f.default for f in fields(cls)}
