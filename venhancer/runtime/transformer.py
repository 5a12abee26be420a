"""Fast twins of the attention layers of `venhancer.models.attention`: the same parameters and
state-dict keys, forwards that run the Triton ops (LayerNorm, the GEGLU projection, Linear +
residual, frame and flash attention), q/k/v from one stacked weight, the tuned SDPA order, the
residual sums in place, channels-last (frame-major) token layouts and bounded token passes.
Each twin reads its `settings` (a `RuntimeSettings`) at call time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from venhancer.models.attention import (
    GEGLU,
    Attention,
    FeedForward,
    SpatialTransformer,
    TemporalTransformer,
    TransformerBlock,
    attention,
)

from . import ops
from .attention import (
    attention_over_frames,
    fp8_product,
    fp8_weights,
    linear_plus,
    takes_flash_kernel,
    takes_fp8_attention,
    tuned_sdpa,
)
from .settings import RuntimeSettings


class FastLayerNorm(nn.LayerNorm):
    """nn.LayerNorm on the Triton kernel where it takes the input."""

    settings: RuntimeSettings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.settings.fused_kernels and ops.runs_on(x) and ops.layer_norm_supported(x):
            return ops.layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


class FastAttention(Attention):
    """Attention with the output projection's residual sum fused, self-attention's q/k/v from one
    stacked weight (`fuse_projections`; its Linears' weights become views of it), and the
    Triton frame and flash attention kernels where they take the inputs; with FP8 on
    (`RuntimeSettings.fp8`) the FP8 flash attention and the q/k/v and output projections on the
    FP8 tensor cores where those win."""

    settings: RuntimeSettings

    def setup(self) -> None:
        # (3*inner, query_dim) with to_q/to_k/to_v's weights as its row blocks; not persistent:
        # the checkpoint keys stay to_q/to_k/to_v.
        if "qkv_weight" not in self._buffers:
            self.register_buffer("qkv_weight", None, persistent=False)
        if not hasattr(self, "fp8_weights"):
            self.fp8_weights = fp8_weights("qkv", "to_out")

    def fuse_projections(self) -> None:
        """Self-attention only: q, k and v from one matmul against the three weights stacked;
        the Linears' weights become views of that tensor (same names, values and memory)."""
        if not self.self_attention:
            raise ValueError("only a self-attention layer can project q, k and v together")
        inner = self.to_q.out_features
        stacked = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]).detach()
        for i, linear in enumerate((self.to_q, self.to_k, self.to_v)):
            linear.weight = nn.Parameter(stacked[i * inner : (i + 1) * inner], requires_grad=False)
        self.qkv_weight = stacked

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, context_repeats: int = 1,
                frames: int | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, query_dim). context: (B / context_repeats, M, context_dim) or None for
        self-attention; each context row serves `context_repeats` consecutive rows of x (one
        text context per video serves all its frames), so k/v are projected once per video.
        `frames`: x holds frame-major tokens and self-attention runs along the frame axis
        (`attention_over_frames`). `residual` (x's shape), if given, is added to the output."""
        settings = self.settings
        fp8 = self.fp8_weights if settings.fp8_linears else {}
        if context is None and self.qkv_weight is not None:
            qkv = fp8_product(x, self.qkv_weight, None, fp8.get("qkv"))
            # (B, N, 3*inner) -> three (B, N, inner) views with row stride 3*inner
            q, k, v = (F.linear(x, self.qkv_weight) if qkv is None else qkv).chunk(3, dim=-1)
        else:
            q, k, v = self.project(x, context, context_repeats)
        sdpa = tuned_sdpa if settings.tuned_attention else None
        if (frames is not None and settings.frame_attention and ops.runs_on(q)
                and ops.frame_attention_supported(q, k, v, self.heads, frames)):
            out = ops.frame_attention(q, k, v, self.heads, frames)
        elif frames is not None:
            out = attention_over_frames(q, k, v, self.heads, frames, sdpa=sdpa)
        elif settings.fp8_attention_kernel and takes_fp8_attention(q, k, v, self.heads):
            out = ops.fp8_attention(q, k, v, self.heads, fp8_pv=settings.fp8_pv, qk=settings.fp8_qk)
        elif settings.flash_attention and takes_flash_kernel(q, k, v, self.heads):
            out = ops.flash_attention(q, k, v, self.heads)
        else:
            out = attention(q, k, v, self.heads, sdpa=sdpa)
        if residual is None:
            return self.to_out[0](out)
        return linear_plus(out, self.to_out[0].weight, self.to_out[0].bias, residual, settings.fused_kernels,
                           persistent=settings.persistent_linear_add, fp8_weight=fp8.get("to_out"))



class FastGEGLU(GEGLU):
    """GEGLU with the gate in the projection's epilogue (`ops.geglu_matmul`) or in one Triton
    pass after it (`ops.geglu`, also after an FP8 projection where that wins)."""

    settings: RuntimeSettings

    def setup(self) -> None:
        if not hasattr(self, "fp8_weights"):
            self.fp8_weights = fp8_weights("proj")

    def forward(self, x: torch.Tensor, bias_column: bool = False) -> torch.Tensor:
        """value * gelu(gate); `bias_column` (fused, on a device the kernels take): with the
        columns of `ops.geglu(..., bias_column=True)` appended."""
        if self.settings.fp8_linears:
            proj = fp8_product(x, self.proj.weight, self.proj.bias, self.fp8_weights["proj"], geglu=True)
            if proj is not None:
                return ops.geglu(proj, bias_column=bias_column)
        if self.settings.fused_kernels and ops.runs_on(x) and ops.geglu_matmul_supported(x, self.proj.weight):
            # Up to 1280-wide inputs: the gate in the projection's epilogue (the 2*hidden-wide
            # projection never goes to memory); wider ones may run faster on cuBLAS.
            return ops.geglu_matmul(x, self.proj.weight, self.proj.bias, bias_column=bias_column)
        proj = self.proj(x)
        if bias_column or (self.settings.fused_kernels and ops.runs_on(proj)):
            return ops.geglu(proj, bias_column=bias_column)
        value, gate = proj.chunk(2, dim=-1)
        return value * F.gelu(gate)



class FastFeedForward(FeedForward):
    """FeedForward that adds the residual itself: through `linear_plus`, or with the down
    projection's bias joined to its weight (`join_down_bias`) as one in-place cuBLAS matmul
    that accumulates into the residual."""

    settings: RuntimeSettings

    def setup(self) -> None:
        # (dim, 4*dim + ops.BIAS_COLUMNS) = [W | b | 0] of the down-projection, whose weight and
        # bias are views of it (`join_down_bias`); not persistent: the checkpoint keys stay.
        if "down_with_bias" not in self._buffers:
            self.register_buffer("down_with_bias", None, persistent=False)
        if not hasattr(self, "fp8_weights"):
            self.fp8_weights = fp8_weights("down")

    def join_down_bias(self) -> None:
        """The down-projection's weight and bias become views of one matrix [W | b | 0] (same
        names, values and memory), so that with the GEGLU output's ones column one cuBLAS matmul
        adds the bias, and with the residual as its accumulator the residual too."""
        down = self.net[2]
        joined = ops.with_bias_column(down.weight, down.bias)
        down.weight = nn.Parameter(joined[:, : down.in_features], requires_grad=False)
        down.bias = nn.Parameter(joined[:, down.in_features], requires_grad=False)
        self.down_with_bias = joined

    def _joined_down_bias(self) -> torch.Tensor | None:
        """`down_with_bias` while the Linear's weight and bias are still its views."""
        joined, down = self.down_with_bias, self.net[2]
        if (joined is None or down.weight.data_ptr() != joined.data_ptr()
                or down.bias.data_ptr() != joined[:, down.in_features].data_ptr()):
            return None
        return joined

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """FF(x), or residual + FF(x) (into `out` if given; `out=residual` adds in place)."""
        geglu, down = self.net[0], self.net[2]
        fused = self.settings.fused_kernels
        joined = self._joined_down_bias() if fused and ops.runs_on(x) else None
        # With FP8 on, the down-projection on the FP8 tensor cores where that wins at its shape
        # (then the add), instead of the in-place cuBLAS matmul
        fp8_down = None
        if self.settings.fp8_linears and ops.fp8_linear_wins(x.numel() // x.shape[-1], down.weight):
            fp8_down = self.fp8_weights["down"]
        if (fp8_down is None and residual is not None and out is residual and residual.is_contiguous()
                and joined is not None):
            # The bias as one more input column and the residual as cuBLAS's accumulator: both
            # sums in the matmul's epilogue, in place.
            hidden = geglu(x, bias_column=True)
            residual.view(-1, residual.shape[-1]).addmm_(hidden.view(-1, hidden.shape[-1]), joined.T)
            return residual
        hidden = geglu(x)
        if residual is None:
            return down(hidden)
        return linear_plus(hidden, down.weight, down.bias, residual, fused, out=out,
                           persistent=self.settings.persistent_linear_add, fp8_weight=fp8_down)



class FastTransformerBlock(TransformerBlock):
    """TransformerBlock whose sums go into the attentions' and feed-forward's epilogues (the
    feed-forward's in place), over frame-major tokens (`frames`) for the temporal transformers,
    with the feed-forward over at most `ff_chunk_tokens` tokens at a time (bounding the 8x-wide
    GEGLU intermediate)."""

    settings: RuntimeSettings

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, context_repeats: int = 1,
                frames: int | None = None) -> torch.Tensor:
        """`frames`: x is frame-major and both attentions run along the frames (temporal)."""
        x = self.attn1(self.norm1(x), frames=frames, residual=x)
        return self.after_self_attention(x, context, context_repeats, frames)

    def after_self_attention(self, x: torch.Tensor, context: torch.Tensor | None = None, context_repeats: int = 1,
                             frames: int | None = None) -> torch.Tensor:
        """The block from its second attention on, x being `x + attn1(norm1(x))`: a spatial
        block's text-free start can then serve several text contexts."""
        x = self.attn2(self.norm2(x), context, context_repeats, frames=frames, residual=x)
        return self._feed_forward(x)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        # x is attn2's fresh output, so the feed-forward's sum goes into it in place.
        tokens = x.contiguous().view(-1, x.shape[-1])  # (all tokens, dim)
        chunk = self.settings.ff_chunk_tokens or max(tokens.shape[0], 1)
        for start in range(0, tokens.shape[0], chunk):
            part = tokens[start : start + chunk]
            self.ff(self.norm3(part), residual=part, out=part)
        return tokens.view(x.shape)



class FastSpatialTransformer(SpatialTransformer):
    """SpatialTransformer over whole frames of one video at a time, at most `spatial_chunk_tokens`
    tokens (at least one frame): every step is per frame, so the result is the same with a
    fraction of the transient memory. `text_free_start` and `finish` split it around the
    cross-attention, so that guidance branches can share the start. With FP8 on, proj_in and
    proj_out on the FP8 tensor cores where that wins."""

    settings: RuntimeSettings

    def setup(self) -> None:
        if not hasattr(self, "fp8_weights"):
            self.fp8_weights = fp8_weights("proj_in", "proj_out")

    def forward(self, x: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: ((b f), c, h, w); context: (b, M, context_dim), shared by the f frames of a video."""
        return self.finish(x, None, context, num_frames)

    def text_free_start(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """The layers before the cross-attention (norm, proj_in, self-attention), which every
        text context shares: their tokens ((b f), h*w, inner) for `finish`."""
        passes = self._frame_passes(x, num_frames)
        if len(passes) == 1:
            return self._start_frames(x)
        tokens = None
        for _, first, count in passes:
            part = self._start_frames(x[first : first + count])
            if tokens is None:
                tokens = part.new_empty((x.shape[0], *part.shape[1:]))
            tokens[first : first + count] = part
        return tokens

    def finish(self, x: torch.Tensor, tokens: torch.Tensor | None, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        """`forward(x, context, num_frames)` from the tokens of `text_free_start(x, num_frames)`
        (left unchanged, for the next context), or with tokens=None computing them pass by pass."""

        def run(frames: slice, context: torch.Tensor, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
            # No local name for the start tokens: `_finish_frames` drops them once it has used them.
            return self._finish_frames(x[frames], self._start_frames(x[frames]) if tokens is None else tokens[frames],
                                       context, count, out=out)

        passes = self._frame_passes(x, num_frames)
        if len(passes) == 1:
            return run(slice(None), context, num_frames)
        out = torch.empty_like(x)
        for item, first, count in passes:
            frames = slice(first, first + count)
            run(frames, context[item : item + 1], count, out=out[frames])
        return out

    def _frame_passes(self, x: torch.Tensor, num_frames: int) -> list[tuple[int, int, int]]:
        """(video, first frame, frame count) of each pass: whole frames of one video, at most
        `spatial_chunk_tokens` tokens (at least one frame); one pass over everything when unchunked."""
        pixels = x.shape[2] * x.shape[3]
        chunk_tokens = self.settings.spatial_chunk_tokens
        step = num_frames if chunk_tokens is None else max(1, chunk_tokens // pixels)
        if step >= num_frames:
            return [(0, 0, x.shape[0])]
        return [(item, item * num_frames + start, min(step, num_frames - start))
                for item in range(x.shape[0] // num_frames) for start in range(0, num_frames, step)]

    def _start_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Norm, proj_in and the self-attention on frames x ((b f), c, h, w) -> ((b f), h*w, inner)."""
        bf, c, h, w = x.shape
        tokens = self.norm(x)
        tokens = tokens.permute(0, 2, 3, 1).reshape(bf, h * w, c)  # ((b f), h*w, c)
        projected = fp8_product(tokens, self.proj_in.weight, self.proj_in.bias,
                                self.fp8_weights["proj_in"] if self.settings.fp8_linears else None)
        tokens = self.proj_in(tokens) if projected is None else projected
        block = self.transformer_blocks[0]
        return block.attn1(block.norm1(tokens), residual=tokens)

    def _finish_frames(self, x: torch.Tensor, tokens: torch.Tensor, context: torch.Tensor, num_frames: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """The rest of the block on frames x with their `_start_frames` tokens; the result is
        written into `out` (x's shape and layout) if given."""
        bf, c, h, w = x.shape
        tokens = self.transformer_blocks[0].after_self_attention(tokens, context, context_repeats=num_frames)
        if x.is_contiguous(memory_format=torch.channels_last):
            # Channels-last frames are token-major in memory: ((b f), c, h, w) -> ((b f), h*w, c) views
            residual = x.permute(0, 2, 3, 1).view(bf, h * w, c)
            target = None if out is None else out.permute(0, 2, 3, 1).view(bf, h * w, c)
            fp8_weight = self.fp8_weights["proj_out"] if self.settings.fp8_linears else None
            y = linear_plus(tokens, self.proj_out.weight, self.proj_out.bias, residual, self.settings.fused_kernels,
                            out=target, persistent=self.settings.persistent_linear_add, fp8_weight=fp8_weight)
            return y.view(bf, h, w, c).permute(0, 3, 1, 2)
        tokens = self.proj_out(tokens)
        # ((b f), h*w, c) -> ((b f), c, h, w) as a strided view; the add writes a contiguous result
        if out is None:
            return x + tokens.view(bf, h, w, c).permute(0, 3, 1, 2)
        return torch.add(x, tokens.view(bf, h, w, c).permute(0, 3, 1, 2), out=out)



class FastTemporalTransformer(TemporalTransformer):
    """TemporalTransformer that keeps channels-last frames in their memory order (frame-major
    tokens) instead of transposing to one sequence per pixel and back (two full copies)."""

    settings: RuntimeSettings

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: ((b f), c, h, w) -> same shape."""
        bf, c, h, w = x.shape
        b, f = bf // num_frames, num_frames
        frame_major = self.settings.channels_last and x.permute(0, 2, 3, 1).is_contiguous()
        # ((b f), c, h, w) -> (b, c, f, h, w) view: GroupNorm statistics span all frames of a clip
        video = x.reshape(b, f, c, h, w).transpose(1, 2)
        if frame_major:
            table = self.norm.fused_table(video)
            if table is not None:
                # Each pixel range is normalised as it is gathered: no full-size normalised copy
                return self._frame_major(x, None, num_frames, table)
            normed = self.norm(video)
            if normed.permute(0, 2, 3, 4, 1).is_contiguous():
                return self._frame_major(x, normed, num_frames)
            return self.attend_per_pixel(x, normed, num_frames)
        return self.attend_per_pixel(x, self.norm(video), num_frames)

    def _frame_major(self, x: torch.Tensor, normed: torch.Tensor | None, num_frames: int,
                     table: torch.Tensor | None = None) -> torch.Tensor:
        """forward for channels-last frames, in their memory order: tokens stay frame-major (the
        attention reads each pixel's frames by stride) and run in pixel ranges of at most
        `temporal_chunk_tokens` tokens (all frames of each pixel together), which bounds the ~7 full-size
        transients of the block (q, k, v, ...) at the same result. The normalised input is
        `normed`, or (normed=None) x normalised per pixel range with the GroupNorm factors
        `table` (`GroupNorm32.fused_table`)."""
        bf, c, h, w = x.shape
        b, f = bf // num_frames, num_frames
        pixels = h * w
        chunk_tokens = self.settings.temporal_chunk_tokens
        step = pixels if chunk_tokens is None else max(1, min(pixels, chunk_tokens // f))
        # memory (b, f, h, w, c) -> (b, f, h*w, c) views of the input, the normed input and the output
        x_tokens = x.permute(0, 2, 3, 1).view(b, f, pixels, c)
        normed_tokens = None if normed is None else normed.permute(0, 2, 3, 4, 1).reshape(b, f, pixels, c)
        out = torch.empty_like(x)
        out_tokens = out.permute(0, 2, 3, 1).view(b, f, pixels, c)
        for item in range(b):
            for start in range(0, pixels, step):
                cols = slice(start, min(start + step, pixels))
                count = cols.stop - cols.start
                # (f, count, c) strided view -> (1, f*count, c) frame-major tokens (gathered by
                # the normalisation, or by the Linear)
                if normed_tokens is None:
                    gathered = ops.group_norm_rows(x_tokens[item, :, cols], table[item])
                else:
                    gathered = normed_tokens[item, :, cols]
                tokens = self.proj_in(gathered.reshape(1, f * count, c))
                tokens = self.transformer_blocks[0](tokens, frames=f)
                linear_plus(tokens, self.proj_out.weight[:, :, 0], self.proj_out.bias, x_tokens[item, :, cols],
                            self.settings.fused_kernels, out=out_tokens[item, :, cols],
                            persistent=self.settings.persistent_linear_add)
        return out

