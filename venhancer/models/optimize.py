"""Moved to `venhancer.runtime`; these names stay importable from here for existing callers."""

from venhancer.runtime.optimize import optimize_for_inference, set_conv_weight_layout
from venhancer.runtime.settings import InferenceOptions, RuntimeSettings

__all__ = ["InferenceOptions", "RuntimeSettings", "optimize_for_inference", "set_conv_weight_layout"]
