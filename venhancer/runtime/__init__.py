"""What makes a loaded VEnhancer network fast without changing what it computes. `ops`: the
Triton kernels, one op family per module."""
