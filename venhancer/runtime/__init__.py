"""What makes a loaded VEnhancer network fast without changing what it computes.

- `ops`: the Triton kernels, one op family per module, each with its `*_supported` check
  (`ops.SUPPORTED`);
- `settings.RuntimeSettings`: how an optimized model runs (held by the model, read at call time);
- `optimize.optimize_for_inference`: swaps the plain layers of `venhancer.models` for their fast
  twins (`layers`, `transformer`, `branches`: same parameters and state-dict keys);
- `branches`: the guidance branches' shared evaluation (`FastVEnhancerUNet.forward_branches`);
- `quant`: the FP8 (e4m3) scales and roundings of the opt-in FP8 path (`RuntimeSettings.fp8`),
  and `fp8_supported`, whether a device runs it.
"""

from .optimize import make_fast, optimize_for_inference, set_conv_weight_layout
from .quant import fp8_supported
from .settings import InferenceOptions, RuntimeSettings

__all__ = ["InferenceOptions", "RuntimeSettings", "fp8_supported", "make_fast", "optimize_for_inference",
           "set_conv_weight_layout"]
