"""Execution plans for a GPU memory budget (`--max_vram_gb`), and network weights streamed to the
GPU block by block.

A `MemoryPlan` changes only where tensors live and in what pieces they are processed, never the
arithmetic: the same video comes out of every plan (up to the float rounding of ops that run in
other pieces, see `InferenceOptions`). `PLANS` is the ladder, fastest first; `choose_plan` takes
the fastest whose budget fits, and `next_plan` the one to fall back to after an out-of-memory.

On the CPU there is no VRAM to measure: the plan follows the `--max_vram_gb` number alone, so
tests run every plan (weight streaming included, with "host" and "device" both the CPU).

`WeightStreamer` keeps the network's large blocks ("units": encoder, middle and decoder blocks of
the UNet and the ControlNet) in one page-locked host buffer. A unit is copied to the GPU when one
of its methods is called (instance-level wrappers, so nothing in the network changes), on a side
stream, and the units the network will need next are copied ahead while the current one runs: the
order is recorded during the first solver call (`wrap_evaluator`) and replayed afterwards. A unit
out of use points its tensors at NaN placeholders of the right shape (no memory), so a weight read
outside a wrapped method fails loudly instead of silently using stale memory.
"""

from __future__ import annotations

import inspect
import logging
import resource
import sys
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from venhancer.runtime import InferenceOptions

logger = logging.getLogger(__name__)

# --low_vram is this budget (a 16 GB card less the CUDA context and the display).
LOW_VRAM_BUDGET_GB = 15.0
# The smallest plan is meant for this much; below it, it is still tried (with a warning).
MIN_PLAN_BUDGET_GB = 6.5
_ALIGN = 512  # bytes: the CUDA caching allocator's alignment


# The RuntimeSettings fields a plan sets: pass sizes and where activations wait.
_PLACEMENT_FIELDS = ("ff_chunk_tokens", "spatial_chunk_tokens", "temporal_chunk_tokens", "conv_frame_chunk",
                     "concat_frame_chunk", "park_activations")


@dataclass(frozen=True)
class MemoryPlan:
    """One way of running a video. `min_budget_gb`: the smallest budget it is chosen for.
    `est_peak_gb` / `est_host_gb`: estimated peak GPU memory reserved and peak host RAM (pinned
    copies included) for the seed clip (145 frames, latent 162x240, windows of 31 and 40 frames)."""

    name: str
    min_budget_gb: float
    est_peak_gb: float
    est_host_gb: float
    inference: InferenceOptions = field(default_factory=InferenceOptions)
    shared_branch_prefix: bool = True  # guidance branches through `evaluate_shared_prefix`
    vae_offload: bool = False  # the VAE in host memory while denoising
    stream_weights: bool = False  # `WeightStreamer`
    prefetch_units: int = 2  # units copied ahead of use when streaming
    # The VAE decoder's spatial resnet blocks this many frames at a time (None: the whole window;
    # `runtime.vae.set_decoder_frame_chunk`).
    decode_frame_chunk: Optional[int] = None

    @property
    def small_passes(self) -> bool:
        return self.inference != InferenceOptions()

    def describe(self) -> str:
        knobs = [f"{name}={getattr(self.inference, name)}" for name in _PLACEMENT_FIELDS]
        return (f"memory plan {self.name!r} (for >= {self.min_budget_gb:g} GB; seed clip est. "
                f"{self.est_peak_gb:g} GB GPU, {self.est_host_gb:g} GB host): "
                f"branches {'shared prefix' if self.shared_branch_prefix else 'sequential'}, "
                f"weights {'streamed' if self.stream_weights else 'resident'}, "
                f"VAE {'offloaded' if self.vae_offload else 'resident'} while denoising, {', '.join(knobs)}"
                + (f", decoder frames {self.decode_frame_chunk} at a time" if self.decode_frame_chunk else ""))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "min_budget_gb": self.min_budget_gb, "est_peak_gb": self.est_peak_gb,
                "est_host_gb": self.est_host_gb, "shared_branch_prefix": self.shared_branch_prefix,
                "vae_offload": self.vae_offload, "stream_weights": self.stream_weights,
                "decode_frame_chunk": self.decode_frame_chunk,
                "inference": {name: getattr(self.inference, name) for name in
                              (*_PLACEMENT_FIELDS, "share_self_attention")}}


_SMALLEST = InferenceOptions(ff_chunk_tokens=2**15, spatial_chunk_tokens=40_000, temporal_chunk_tokens=2**16,
                             conv_frame_chunk=2, concat_frame_chunk=2, park_activations=True)

# Peaks of the seed clip end to end through the CLI (bench.py pipeline --cap_gb, H200,
# 2026-12-02; benchmarks/results/pipeline_caps_h200_2026-12-02b.json), GPU memory reserved / host:
#   full, uncapped:                         22.6 / 5.6 GB
#   streamed, 23 GB cap:                    21.3 / 8.0 GB
#   small_passes_streamed, 15 GB cap:       13.6 / 8.0 GB (it ran out of memory under an 11 GB cap)
#   parked_streamed, 11 GB cap:             11.0 / 16.9 GB (the allocator fills what the cap allows;
#                                           one 40-frame window allocates 5.9 GB at most, stream_check.py)
#   parked_streamed, 7 GB cap:              7.0 / 17.0 GB (2026-12-03, pipeline_caps_h200_2026-12-03.json),
#                                           after its decode took one frame per spatial resnet pass: the
#                                           last 7-frame window of a tile ran out of memory before
# "streamed_sequential" is unmeasured end to end: the sequential branches' peak less the weights.
# Parking cost no time on one window (40 frames: 6.03 s parked, 6.04 s resident, same bits), so no
# plan runs the smallest passes without it.
PLANS: tuple[MemoryPlan, ...] = (
    MemoryPlan("full", 26.0, 22.6, 5.6),
    MemoryPlan("streamed", 21.0, 21.3, 8.0, vae_offload=True, stream_weights=True),
    MemoryPlan("streamed_sequential", 18.0, 16.5, 8.0, shared_branch_prefix=False, vae_offload=True,
               stream_weights=True),
    MemoryPlan("small_passes_streamed", 14.0, 13.6, 8.0, InferenceOptions.low_vram(), shared_branch_prefix=False,
               vae_offload=True, stream_weights=True),
    MemoryPlan("parked_streamed", MIN_PLAN_BUDGET_GB, 7.0, 17.0, _SMALLEST, shared_branch_prefix=False,
               vae_offload=True, stream_weights=True, decode_frame_chunk=1),
)
PLAN_NAMES = tuple(plan.name for plan in PLANS)


def check_budget(value: Any) -> Optional[float]:
    """--max_vram_gb as a number of GB (None: not given); ValueError with a one-line message."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value == value or value <= 0 \
            or value == float("inf"):
        raise ValueError(f"max_vram_gb must be a positive number of GB, got {value!r}")
    return float(value)


def budget_gb(max_vram_gb: Optional[float], low_vram: Optional[bool], free_gb: Optional[float]) -> Optional[float]:
    """The budget a run plans for. An explicit --max_vram_gb wins; --low_vram is
    `LOW_VRAM_BUDGET_GB`; --no-low_vram plans for at least the sequential-branch budget; otherwise
    the GPU's free memory at start. None (CPU, nothing asked): the fastest plan."""
    budget = check_budget(max_vram_gb)
    if budget is not None:
        return budget
    if low_vram:
        return LOW_VRAM_BUDGET_GB
    if low_vram is False:
        return None if free_gb is None else max(free_gb, PLANS[1].min_budget_gb)
    return free_gb


def choose_plan(budget: Optional[float]) -> MemoryPlan:
    """The fastest plan for `budget` GB (None: no limit); the smallest when none is meant for it."""
    if budget is None:
        return PLANS[0]
    for plan in PLANS:
        if budget >= plan.min_budget_gb:
            return plan
    logger.warning("%.1f GB is below the smallest memory plan's %g GB: trying it anyway", budget, PLANS[-1].min_budget_gb)
    return PLANS[-1]


def next_plan(plan: MemoryPlan) -> Optional[MemoryPlan]:
    """The plan to fall back to after `plan` ran out of memory (None: it was the smallest)."""
    index = PLAN_NAMES.index(plan.name)
    return PLANS[index + 1] if index + 1 < len(PLANS) else None


def peak_host_gb() -> float:
    """Peak resident host memory of this process so far (page-locked buffers included)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


# ---------------------------------------------------------------------------------------------
# Weight streaming
# ---------------------------------------------------------------------------------------------

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)
# Methods nn.Module itself defines (state_dict, to, ...) are not wrapped: only the network's own.
_MODULE_METHODS = frozenset(dir(nn.Module)) - {"forward"}


def _tensors_of(module: nn.Module) -> list[torch.Tensor]:
    """Every tensor a unit's modules hold: parameters, buffers, and plain tensor attributes (such
    as fused weights whose parameters are views of them)."""
    found: dict[int, torch.Tensor] = {}
    for m in module.modules():
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is not None:
                found.setdefault(id(t), t)
        for value in vars(m).values():
            if isinstance(value, torch.Tensor):
                found.setdefault(id(value), value)
    return list(found.values())


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) bytes of t's storage that t can reach."""
    size = t.element_size()
    first = t.storage_offset() * size
    if t.numel() == 0:
        return first, first
    extent = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return first, first + extent * size


def _nbytes(module: nn.Module) -> int:
    return sum(hi - lo for lo, hi in map(_byte_span, _tensors_of(module)))


def find_units(model: nn.Module, min_bytes: int, max_bytes: int) -> list[nn.Module]:
    """The model's streamed blocks: from the root down, the first composite (non-container)
    module of at most `max_bytes` and at least `min_bytes`. Smaller modules (embeddings, the
    ControlNet's 1x1 zero convolutions, the output conv), which the network also reads outside
    their own calls, stay resident; so do leaves directly under a container."""
    units: list[nn.Module] = []

    def visit(module: nn.Module, is_root: bool) -> None:
        children = list(module.children())
        if not is_root and type(module) not in _CONTAINERS and children:
            size = _nbytes(module)
            if size < min_bytes:
                return
            if size <= max_bytes:
                units.append(module)
                return
        for child in children:
            visit(child, False)

    visit(model, True)
    return units


@dataclass
class _Unit:
    index: int
    module: nn.Module
    tensors: list[torch.Tensor]
    # per tensor: (dtype, size, stride, element offset into the flat buffer viewed as dtype)
    layout: list[tuple[torch.dtype, torch.Size, tuple[int, ...], int]]
    start: int  # byte range in the host buffer
    nbytes: int
    parked: list[torch.Tensor]


class WeightStreamer:
    """Streams `model`'s units between one host buffer (page-locked on CUDA) and `device`.

    Attach after the model is loaded and optimized (its weights may be on the CPU or the GPU; they
    are copied once into the host buffer and their device memory freed). `prefetch` units are
    copied ahead of use. Works with device = CPU too (copies between two CPU buffers), which the
    tests use to check that streaming changes no result and that no weight is read while parked."""

    def __init__(self, model: nn.Module, device: torch.device | str, prefetch: int = 2,
                 max_unit_bytes: int = 512 * 2**20):
        self.model = model
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.prefetch = max(0, prefetch)
        total = _nbytes(model)
        # Relative bounds keep a small model's units at the same places as the real one's (blocks).
        units = find_units(model, min_bytes=min(4 * 2**20, total // 200), max_bytes=min(max_unit_bytes, total // 8))
        self.units: list[_Unit] = []
        self._resident: OrderedDict[int, torch.Tensor] = OrderedDict()  # unit index -> device buffer
        self._pending: dict[int, tuple[torch.Tensor, Any]] = {}  # prefetched: buffer, copy-done event
        self._current: int | None = None
        self._trace: list[int] = []
        self._recording = True
        self._cursor = 0
        self.loads = 0  # copies to the device (tests and the log)
        self.prefetch_hits = 0
        self._side = torch.cuda.Stream(self.device) if self.cuda else None
        self._nan: dict[torch.dtype, torch.Tensor] = {}
        with torch.inference_mode(False), torch.no_grad():
            self.host = self._pack(units)
        self._wrapped: list[tuple[nn.Module, str]] = []
        for unit in self.units:
            for module in unit.module.modules():
                self._wrap_methods(module, unit)
        logger.info("streaming %d network blocks (%.2f GB, largest %.0f MB) from %s host memory, %d ahead",
                    len(self.units), self.host.numel() / 1e9, max((u.nbytes for u in self.units), default=0) / 1e6,
                    "page-locked" if self.pinned else "pageable", self.prefetch)

    def place_resident(self) -> None:
        """Move the tensors outside the streamed blocks (embeddings, the ControlNet's 1x1
        convolutions, the output layers: ~1% of the weights) to the device, for a model that was
        loaded into host memory."""
        with torch.inference_mode(False), torch.no_grad():
            for t in self.resident_tensors():
                if t.device != self.device:
                    t.data = t.data.to(self.device)

    def resident_tensors(self) -> list[torch.Tensor]:
        """The model's tensors that are in no streamed block."""
        streamed = {id(t) for unit in self.units for t in unit.tensors}
        return [t for t in _tensors_of(self.model) if id(t) not in streamed]

    # -- packing ------------------------------------------------------------------------------

    def _placeholder(self, t: torch.Tensor) -> torch.Tensor:
        """A NaN of t's dtype and shape that holds no memory (stride 0), on the host."""
        nan = self._nan.get(t.dtype)
        if nan is None:
            fill = float("nan") if t.dtype.is_floating_point else 0
            nan = self._nan[t.dtype] = torch.full((1,), fill, dtype=t.dtype)
        return nan.expand(t.shape) if t.dim() else nan[0]

    def _pack(self, units: list[nn.Module]) -> torch.Tensor:
        # Per unit and storage, only the byte span its tensors use (a loader may have put many
        # weights in one storage), each span aligned in the host buffer.
        plan: list[tuple[nn.Module, list[torch.Tensor], dict[tuple[int, int], tuple[int, int]], int, int]] = []
        offset = 0
        for module in units:
            tensors = _tensors_of(module)
            # Tensors that overlap in one storage (views such as fused weights) share a span.
            by_storage: dict[int, list[tuple[int, int]]] = {}
            for t in tensors:
                by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(_byte_span(t))
            start = offset
            placed: dict[tuple[int, int], tuple[int, int]] = {}  # (storage, span lo) -> (host offset, span hi)
            for key, spans in by_storage.items():
                spans.sort()
                merged: list[list[int]] = []
                for lo, hi in spans:
                    if merged and lo < merged[-1][1]:
                        merged[-1][1] = max(merged[-1][1], hi)
                    else:
                        merged.append([lo, hi])
                for lo, hi in merged:
                    # The same address modulo _ALIGN as before: kernels (cuBLAS, MKL) choose their
                    # code path by alignment, and a different one could change the last bits.
                    offset += (key + lo - offset + start) % _ALIGN
                    placed[(key, lo)] = (offset, hi)
                    offset += hi - lo
            offset += -offset % _ALIGN  # every unit's buffer starts aligned
            plan.append((module, tensors, placed, start, offset - start))
        host = torch.empty(offset, dtype=torch.uint8)
        self.pinned = self.cuda and _register_host_memory(host)
        for module, tensors, placed, start, nbytes in plan:
            layout = []
            copied: set[tuple[int, int]] = set()
            spans = sorted(placed)
            for t in tensors:
                storage = t.untyped_storage()
                first = _byte_span(t)[0]
                key = max(k for k in spans if k[0] == storage.data_ptr() and k[1] <= first)
                at, hi = placed[key]
                lo = key[1]
                if key not in copied:
                    copied.add(key)
                    raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
                    host[at:at + hi - lo].copy_(raw[lo:hi])
                size = t.element_size()
                layout.append((t.dtype, t.shape, t.stride(), (at - start - lo) // size + t.storage_offset()))
            unit = _Unit(len(self.units), module, tensors, layout, start, nbytes,
                         [self._placeholder(t) for t in tensors])
            self.units.append(unit)
            self._park(unit)  # frees the tensors' original memory
        return host

    # -- residency ----------------------------------------------------------------------------

    def _bind(self, unit: _Unit, buffer: torch.Tensor) -> None:
        with torch.inference_mode(False), torch.no_grad():
            typed: dict[torch.dtype, torch.Tensor] = {}
            for t, (dtype, size, stride, offset) in zip(unit.tensors, unit.layout):
                if dtype not in typed:
                    typed[dtype] = buffer.view(dtype)
                t.data = typed[dtype].as_strided(size, stride, offset)

    def _park(self, unit: _Unit) -> None:
        with torch.inference_mode(False), torch.no_grad():
            for t, placeholder in zip(unit.tensors, unit.parked):
                t.data = placeholder

    def _copy(self, unit: _Unit) -> tuple[torch.Tensor, Any]:
        """Start copying `unit` to the device: its buffer and an event marking the copy's end."""
        source = self.host[unit.start:unit.start + unit.nbytes]
        with torch.inference_mode(False), torch.no_grad():
            self.loads += 1
            if not self.cuda:
                return source.clone(), None
            with torch.cuda.stream(self._side):
                buffer = torch.empty(unit.nbytes, dtype=torch.uint8, device=self.device)
                buffer.copy_(source, non_blocking=self.pinned)
                done = torch.cuda.Event()
                done.record(self._side)
        return buffer, done

    def _make_resident(self, unit: _Unit) -> None:
        if unit.index in self._resident:
            self._resident.move_to_end(unit.index)
            return
        if unit.index in self._pending:
            buffer, done = self._pending.pop(unit.index)
            self.prefetch_hits += 1
        else:
            buffer, done = self._copy(unit)
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            # Allocated on the side stream, read on this one: not reused before this stream's
            # work queued so far (the unit's kernels) is done.
            buffer.record_stream(compute)
        self._bind(unit, buffer)
        self._resident[unit.index] = buffer

    def _evict(self, keep: set[int]) -> None:
        limit = self.prefetch + 1
        for index in list(self._resident):
            if len(self._resident) <= limit:
                break
            if index not in keep:
                self._park(self.units[index])
                del self._resident[index]

    def _upcoming(self) -> list[int]:
        if self._recording or not self._trace:
            return []
        n = len(self._trace)
        return [self._trace[(self._cursor + i) % n] for i in range(min(self.prefetch, n))]

    def ensure(self, unit: _Unit) -> None:
        """`unit`'s weights on the device before one of its methods runs; the next ones on the way."""
        if self._current == unit.index:
            return
        self._current = unit.index
        if self._recording:
            self._trace.append(unit.index)
        elif self._trace:
            n = len(self._trace)
            # Follow the recorded order; an unexpected unit resynchronises on its next occurrence.
            for step in range(n):
                if self._trace[(self._cursor + step) % n] == unit.index:
                    self._cursor = (self._cursor + step + 1) % n
                    break
        self._make_resident(unit)
        upcoming = self._upcoming()
        for index in upcoming:
            if index != unit.index and index not in self._resident and index not in self._pending:
                try:
                    self._pending[index] = self._copy(self.units[index])
                except torch.OutOfMemoryError:
                    break  # it will be copied when needed, after older units have gone
        self._evict(keep={unit.index, *upcoming})

    def end_of_pass(self) -> None:
        """One solver call's evaluations are done: the order seen so far is the one to replay."""
        if self._recording and self._trace:
            self._recording = False
            self._cursor = 0

    def wrap_evaluator(self, evaluate: Callable) -> Callable:
        def evaluate_streamed(model, jobs):
            outputs = evaluate(model, jobs)
            self.end_of_pass()
            return outputs
        return evaluate_streamed

    def _wrap_methods(self, module: nn.Module, unit: _Unit) -> None:
        for name in _public_methods(type(module)):
            if name not in vars(module):
                setattr(module, name, self._ensuring(unit, getattr(module, name)))
                self._wrapped.append((module, name))

    def _ensuring(self, unit: _Unit, method: Callable) -> Callable:
        def call(*args, **kwargs):
            self.ensure(unit)
            return method(*args, **kwargs)
        return call

    def release(self) -> None:
        """Every unit parked, device buffers and prefetches dropped (between videos, on fallback)."""
        for index in list(self._resident):
            self._park(self.units[index])
        self._resident.clear()
        self._pending.clear()
        self._current = None

    def reconfigure(self, change: Callable[[nn.Module], Any]) -> None:
        """Run `change(model)` (pass sizes: `optimize_for_inference` with other InferenceOptions)
        with every unit's weights readable in host memory, then park them again and learn the
        block order anew. `change` must not change the weights' layout."""
        self.release()
        for unit in self.units:
            self._bind(unit, self.host[unit.start:unit.start + unit.nbytes])
        try:
            change(self.model)
        finally:
            for unit in self.units:
                self._park(unit)
            self._resident.clear()
            self._current = None
            self._trace, self._recording, self._cursor = [], True, 0

    def detach(self) -> nn.Module:
        """Weights back on the device for good, methods unwrapped; returns the model."""
        for unit in self.units:
            buffer, _ = self._copy(unit)
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_stream(self._side)
            self._bind(unit, buffer)
        self._resident.clear()
        self._pending.clear()
        for module, name in self._wrapped:
            module.__dict__.pop(name, None)
        self._wrapped.clear()
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()  # the copies out of the host buffer
        self.host = torch.empty(0, dtype=torch.uint8)
        return self.model


def _public_methods(cls: type) -> list[str]:
    names = []
    for klass in inspect.getmro(cls):
        if klass in (nn.Module, object) or klass.__module__.startswith("torch.nn.modules.container"):
            continue
        for name, value in vars(klass).items():
            if inspect.isfunction(value) and not name.startswith("_") and name not in _MODULE_METHODS \
                    and name not in names:
                names.append(name)
    return names


def _register_host_memory(host: torch.Tensor) -> bool:
    """Page-lock `host` in place (cudaHostRegister) until it is freed: copies from it run
    asynchronously at full speed. Pinning through torch's host allocator would round the 4.1 GB
    up to 8 GB."""
    if host.numel() == 0:
        return False
    try:
        cudart = torch.cuda.cudart()
        error = cudart.cudaHostRegister(host.data_ptr(), host.numel(), 0)
    except (AttributeError, RuntimeError) as exc:
        logger.warning("could not page-lock the streamed weights (%s): copies will be slower", exc)
        return False
    if int(error) != 0:
        # Not left pending: the next kernel launch check would report it as its own.
        getattr(cudart, "cudaGetLastError", lambda: None)()
        logger.warning("could not page-lock the streamed weights (cudaHostRegister error %d): copies will be slower",
                       int(error))
        return False
    # Unregistered before the memory goes back to the heap, where a later buffer at the same
    # addresses could not be registered again.
    weakref.finalize(host, cudart.cudaHostUnregister, host.data_ptr())
    return True

