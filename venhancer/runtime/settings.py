"""How an optimized network runs: one immutable settings object, held by the optimized model and
read by its fast modules at each call (never process-wide state). Changing a field changes
speed and peak memory only, never the result beyond float rounding, except for the opt-in `fp8`
(8-bit operands for the heaviest products)."""

from __future__ import annotations

from dataclasses import dataclass

_CHUNK_FIELDS = ("ff_chunk_tokens", "spatial_chunk_tokens", "temporal_chunk_tokens", "conv_frame_chunk", "concat_frame_chunk")


def check_chunk(name: str, value) -> None:
    """A piece size: a positive integer, or None (no pieces); else ValueError naming it."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


@dataclass(frozen=True)
class RuntimeSettings:
    # Convolution weights (hence activations) channels-last: cuDNN's native NHWC layout, free
    # token views in the transformers, frame-major tokens in the temporal ones.
    channels_last: bool = True
    # The Triton ops of `venhancer.runtime.ops` and the bias folds that feed them.
    fused_kernels: bool = True
    # On CUDA, the SDPA kernel order picked per sequence length (cuDNN for long sequences, the
    # memory-efficient kernel for the short temporal ones).
    tuned_attention: bool = True
    # Self-attention's q, k and v from one matmul (the three weights become views of one).
    fused_projections: bool = True
    # With fused_kernels, the temporal attention as one Triton kernel over frame-major tokens
    # (`ops.frame_attention`) instead of SDPA on strided views plus a copy of its output.
    frame_attention_kernel: bool = True
    # With fused_kernels, on Hopper-class GPUs, the long spatial self-attentions in one Triton
    # flash-attention kernel (`ops.flash_attention`) instead of cuDNN's through SDPA.
    flash_attention_kernel: bool = True
    # With fused_kernels, on Hopper-class GPUs, Linear + residual on the persistent matmul kernel
    # for the large shapes where it beats cuBLAS (`ops.persistent_linear_add_wins`).
    persistent_linear_add: bool = True
    # Tokens per feed-forward chunk; at level 0 of a 31-frame 162x240 window one chunk of
    # 2**18 tokens has a 2.7 GB GEGLU intermediate in fp16 instead of 12 GB unchunked.
    ff_chunk_tokens: int | None = 2**18
    # Tokens per spatial-transformer pass, in whole frames (at least one): bounds its q/k/v and
    # MLP transients (~1 GB per 320-channel tensor at 31 frames of 162x240). At the seed clip's
    # size: 8 frames per pass at level 0, all 31 frames at once at the deeper levels.
    spatial_chunk_tokens: int | None = 320_000
    # Tokens (frames x pixels) per temporal-transformer pass in the channels-last layout: at
    # level 0 of a 40-frame window (1.6M tokens) its ~7 full-size transients held ~7 GB at once.
    temporal_chunk_tokens: int | None = 2**19
    # Frames per pass of the per-frame convolution stages (None: all at once): the ResBlocks'
    # first part, the decoder's skip concatenation included, and the upsampling. Bounds the
    # largest transients of the network (a 40-frame level-0 ResBlock input is 3 GB in fp16).
    conv_frame_chunk: int | None = None
    # Frames per pass of just the decoder ResBlocks that concatenate a skip (the smaller of this
    # and conv_frame_chunk applies there): the 3 GB concatenations and their normed copies
    # fragmented the allocator's cache.
    concat_frame_chunk: int | None = 8
    # `forward_branches` also computes the first spatial transformer's self-attention (UNet and
    # ControlNet) once for all guidance branches, its tokens held meanwhile (two more level-0
    # activations, ~2 GB at 40 frames).
    share_self_attention: bool = True
    # The UNet's skips and the ControlNet's residuals wait in host memory between their
    # production and their use (`venhancer.runtime.parking`): ~5 GB less GPU memory at 40 frames
    # of latent 162x240, for ~20 GB of copies per evaluation that overlap the computation.
    park_activations: bool = False
    # The decoder's upsampling (nearest x2, crop, 3x3 conv) as one transposed convolution: same
    # sums with the taps that meet one input pixel pre-added, 4/9 of the multiply-adds.
    transposed_upsample: bool = True
    # Opt-in, with fused_kernels, on GPUs with FP8 tensor cores (`fp8_supported`: compute
    # capability 8.9+) and only there: the long spatial self-attentions with q and k in 8 bits
    # (`fp8_qk`; `ops.fp8_attention`, Hopper-class GPUs) and, with fp8_linear, the Linears of
    # `ops.fp8_linear_wins` on e4m3 operands (`ops.fp8_linear`). Unlike the other fields it
    # changes the result beyond fp16 rounding.
    fp8: bool = False
    # With fp8: which of the two op families take it. The FP8 Linears are off by default: on an
    # H200 each was slower than fp16 or even with it once its activations are quantised (0.58-1.03x
    # at the network's shapes) and they moved a window's output 3.5e-2 (relative L2) from the
    # fp16 path (docs/performance.md, "The 8-bit path").
    fp8_attention: bool = True
    fp8_linear: bool = False
    # With fp8 and fp8_attention: the attention's second product (probabilities x values) in e4m3
    # too, instead of fp16.
    fp8_pv: bool = False
    # With fp8 and fp8_attention: the format of the attention's q and k, "int8" (one scale per
    # 128 rows, SageAttention's choice: 1.4e-2 relative L2 for one randn attention at 38,880
    # tokens in a float64 emulation) or "e4m3" (4.2e-2 there). Hopper runs both at the same rate.
    fp8_qk: str = "int8"

    @classmethod
    def low_vram(cls) -> "RuntimeSettings":
        """Smaller passes everywhere, for cards of ~16 GB: same result, lower peak memory, a
        little slower (see the README's measurements)."""
        return cls(ff_chunk_tokens=2**16, spatial_chunk_tokens=80_000, temporal_chunk_tokens=2**17, conv_frame_chunk=4)

    def __post_init__(self):
        for name in _CHUNK_FIELDS:
            check_chunk(name, getattr(self, name))
        if self.fp8_qk not in ("int8", "e4m3"):
            raise ValueError(f"fp8_qk must be 'int8' or 'e4m3', got {self.fp8_qk!r}")

    @property
    def frame_attention(self) -> bool:
        return self.fused_kernels and self.frame_attention_kernel

    @property
    def flash_attention(self) -> bool:
        return self.fused_kernels and self.flash_attention_kernel

    @property
    def fp8_attention_kernel(self) -> bool:
        return self.fused_kernels and self.fp8 and self.fp8_attention

    @property
    def fp8_linears(self) -> bool:
        return self.fused_kernels and self.fp8 and self.fp8_linear


# The name the pipeline, the benchmarks and the tests have always used.
InferenceOptions = RuntimeSettings
