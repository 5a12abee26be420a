"""Multi-process (multi-GPU, multi-node) inference on torch.distributed (issue 7).

Started by ``torchrun`` (any number of processes, one node or several)::

    torchrun --nproc_per_node 4 enhance_a_video.py --input_path clip.mp4 ...

Each process reads WORLD_SIZE, RANK and LOCAL_RANK from its environment (:meth:`DistContext.from_env`)
and uses ``cuda:LOCAL_RANK`` on a GPU machine. Without torchrun (or with WORLD_SIZE=1) there is one
process, no process group, and every collective here is a no-op: a single run works as before.

The work is shared out in one of two ways (the command line picks one per run):

* **videos**: a folder with at least as many videos to enhance as processes. The videos go round-robin
  in sorted order (:func:`shard_videos`); each process enhances and writes its own videos with no
  communication while denoising; rank 0 prints the summary of all of them.
* **windows**: a single video, or fewer videos than processes. All processes enhance the same video in
  lockstep. At every solver step the (temporal window, guidance branch) network evaluations are shared
  out (:func:`assign_jobs`, balanced by frame count; a window's two branches stay together, sharing
  their first layers, while there are at least as many windows as processes), each process evaluates
  its own, and the outputs are gathered to every process (:class:`WindowSharding`); the cross-fade and
  solver update then run identically everywhere. Every process reads, encodes and draws noise with the
  same seed in the same order, so all hold the same values; rank 0 additionally broadcasts the
  denoiser's inputs, and it alone decodes and writes the output. The numbers do not depend on the
  number of processes: each network evaluation is the same call, with the same batch, as in a single
  process.

Two process groups: the *control* group (the default group, gloo, CPU, long timeout) carries agreements
between processes (arguments, the list of videos, model loading, per-video failures, results), where a
process may legitimately wait a long time (rank 0 decoding a video, another process finishing its
videos); the *data* group (NCCL on GPUs, gloo on CPU, shorter timeout) carries the per-step traffic.

Failures never leave the others waiting: in window sharding every process learns of an exception on any
other (an error flag reduced before each step's gather; an exchange of outcomes before and after
denoising), so all of them stop that video together and report it; a failed collective raises
:class:`CommunicationError` and ends the run. Timeouts (seconds) can be set with the environment
variables ``VENHANCER_DIST_TIMEOUT`` (per-step traffic, default 1800) and
``VENHANCER_DIST_WAIT_TIMEOUT`` (agreements, default 86400).
"""

from __future__ import annotations

import datetime
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Hashable, Iterator, Mapping, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from venhancer.diffusion.chunking import Evaluator, Job, ModelFn, evaluate_sequential

__all__ = [
    "STEP_TIMEOUT_S",
    "WAIT_TIMEOUT_S",
    "CommunicationError",
    "PeerFailure",
    "PeerOutOfMemory",
    "Agreement",
    "DistContext",
    "WindowSharding",
    "assign_jobs",
    "shard_videos",
    "solo",
]

logger = logging.getLogger(__name__)

STEP_TIMEOUT_S = 30 * 60  # data group: one solver step's imbalance is seconds, a stuck process is not
WAIT_TIMEOUT_S = 24 * 3600  # control group: waits for another process's whole videos
_ENV_STEP_TIMEOUT = "VENHANCER_DIST_TIMEOUT"
_ENV_WAIT_TIMEOUT = "VENHANCER_DIST_WAIT_TIMEOUT"

T = TypeVar("T")


class CommunicationError(RuntimeError):
    """A collective operation failed: a process died, the network broke or a timeout passed."""


class PeerFailure(RuntimeError):
    """Another process (``rank``) failed on the video that all processes enhance together."""

    def __init__(self, message: str, rank: Optional[int] = None):
        super().__init__(message)
        self.rank = rank


class PeerOutOfMemory(PeerFailure, torch.OutOfMemoryError):
    """Another process ran out of device memory; handled like running out of memory here."""


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _timeout(env: str, default: float) -> datetime.timedelta:
    value = os.environ.get(env, "").strip()
    try:
        seconds = float(value) if value else default
    except ValueError:
        raise ValueError(f"{env}={value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise ValueError(f"{env} must be > 0 seconds, got {value!r}")
    return datetime.timedelta(seconds=seconds)


@contextmanager
def _communicating(what: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        raise CommunicationError(f"communication between processes failed while {what}: {_first_line(exc)}") from exc


def assign_jobs(weights: Sequence[float], world_size: int, groups: Optional[Sequence[Hashable]] = None) -> list[int]:
    """The process (rank) that evaluates each job: greedy longest-first onto the least loaded process.

    Jobs are taken by decreasing weight (a job's frame count), ties by job index; each goes to the
    process with the smallest total weight so far, ties to the lowest rank. `groups` (a key per
    job, e.g. its temporal window): jobs with one key go to one process together, as one job of
    their summed weight, when there are at least as many groups as processes (a window's guidance
    branches then share their first layers); with fewer groups the jobs are assigned one by one.
    A pure function of its arguments, so every process computes the same assignment. Returns one
    rank per job, in job order.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if groups is not None:
        if len(groups) != len(weights):
            raise ValueError(f"{len(groups)} group keys for {len(weights)} jobs")
        keys = list(dict.fromkeys(groups))  # in order of first appearance
        if len(keys) >= world_size:
            totals = dict.fromkeys(keys, 0.0)
            for weight, key in zip(weights, groups):
                totals[key] += weight
            owner_of = dict(zip(keys, assign_jobs([totals[key] for key in keys], world_size)))
            return [owner_of[key] for key in groups]
    loads = [0.0] * world_size
    owners = [0] * len(weights)
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += weights[i]
    return owners


def shard_videos(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Round-robin share of `items` (in their given, sorted order) for process `rank`."""
    return list(items[rank::world_size])


@dataclass
class Agreement:
    """What a :meth:`WindowSharding.together` block agrees on: after the block, ``value`` is rank 0's."""

    value: Any = None


@contextmanager
def solo() -> Iterator[Agreement]:
    """The single-process stand-in for :meth:`WindowSharding.together`: a plain block."""
    yield Agreement()


class DistContext:
    """This process's place in a torchrun launch. ``world_size == 1``: no process group, all no-ops."""

    def __init__(self, world_size: int = 1, rank: int = 0, local_rank: int = 0):
        if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
            raise ValueError(f"bad process placement: WORLD_SIZE={world_size}, RANK={rank}, LOCAL_RANK={local_rank}")
        self.world_size = world_size
        self.rank = rank
        self.local_rank = local_rank
        self.started = False

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "DistContext":
        """WORLD_SIZE, RANK and LOCAL_RANK as torchrun sets them; absent: a single process."""
        env = os.environ if environ is None else environ

        def number(name: str, default: int) -> int:
            value = env.get(name, "").strip()
            try:
                return int(value) if value else default
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None

        world_size = number("WORLD_SIZE", 1)
        rank = number("RANK", 0)
        return cls(world_size, rank, number("LOCAL_RANK", rank if world_size > 1 else 0))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device_name(self, requested: Optional[str]) -> Optional[str]:
        """The device for ``--device requested`` in this process: under torchrun, ``cuda:LOCAL_RANK``."""
        if not self.enabled:
            return requested
        if requested in (None, "", "auto"):
            return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        if requested == "cuda":
            return f"cuda:{self.local_rank}"
        if requested.startswith("cuda:"):
            raise ValueError(f"--device {requested} cannot be used with torchrun: each process uses "
                             "cuda:LOCAL_RANK; use --device cuda (or auto)")
        return requested

    def start(self) -> None:
        """Join the process group (the control group: gloo). No-op for a single process."""
        if not self.enabled or self.started:
            return
        timeout = _timeout(_ENV_WAIT_TIMEOUT, WAIT_TIMEOUT_S)
        _timeout(_ENV_STEP_TIMEOUT, STEP_TIMEOUT_S)  # a bad value fails here, not in the middle of a run
        dist.init_process_group("gloo", timeout=timeout)
        self.started = True

    def bind(self, device: torch.device) -> None:
        """Make ``device`` this process's current CUDA device (for NCCL and any implicit "cuda")."""
        if device.type == "cuda":
            torch.cuda.set_device(device)

    def barrier(self) -> None:
        """Wait for every process (collective; no-op without a process group). Before exiting: torchrun
        stops all processes when one exits with an error, so none may leave while another still logs."""
        if self.started:
            with _communicating("waiting for the other processes"):
                dist.barrier()

    def close(self) -> None:
        if self.started and dist.is_initialized():
            dist.destroy_process_group()
        self.started = False

    def new_data_group(self, device: torch.device) -> Any:
        """A group for per-step traffic on ``device``: NCCL on CUDA, gloo otherwise (collective)."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        with _communicating("creating the data process group"):
            return dist.new_group(backend=backend, timeout=_timeout(_ENV_STEP_TIMEOUT, STEP_TIMEOUT_S))

    # Control plane: small Python objects over the default (gloo) group.

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, by rank (collective)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with _communicating("exchanging state"):
            dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every process (collective)."""
        if not self.enabled:
            return obj
        box = [obj if self.rank == src else None]
        with _communicating("receiving the work list"):
            dist.broadcast_object_list(box, src=src)
        return box[0]

    def first_error(self, message: Optional[str]) -> Optional[str]:
        """Collective: the error message of the lowest rank that has one, or None when none has.

        Another process's message is prefixed with ``process N: ``.
        """
        for rank, msg in enumerate(self.all_gather_object(message)):
            if msg is not None:
                return msg if rank == self.rank else f"process {rank}: {msg}"
        return None


class WindowSharding:
    """Window/branch sharding of one video over all processes: the hooks :class:`~venhancer.pipeline.Enhancer` calls.

    Every process must call :meth:`Enhancer.run` for the same videos in the same order. ``evaluate``
    is an evaluator for :func:`venhancer.diffusion.sample`; ``together`` and ``begin``/``finish``
    make a failure on one process stop all of them; ``share`` broadcasts rank 0's tensors.

    ``local`` evaluates this process's jobs: one network call per job by default; the CLI passes
    the pipeline's own evaluator (``Enhancer.local_evaluator``: the two branches of a window, when
    both land on this process, share their text-free first layers). Both give every job the same
    output, so the numbers do not depend on how jobs are shared out.
    """

    def __init__(self, ctx: DistContext, device: torch.device, local: Evaluator = evaluate_sequential):
        if not ctx.enabled or not ctx.started:
            raise ValueError("window sharding needs a started process group with more than one process")
        self.ctx = ctx
        self.device = torch.device(device)
        self.local = local
        self.is_writer = ctx.is_main
        self.group = ctx.new_data_group(self.device)
        self._calls = 0
        self._total = 0
        self._agreed: Optional[BaseException] = None
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            kinds = ctx.all_gather_object((props.name, props.multi_processor_count))
            if len(set(kinds)) > 1 and ctx.is_main:
                logger.warning("the processes use different GPU models (%s); random numbers drawn on a GPU depend "
                               "on its model, so they differ between processes and the result differs from a "
                               "single-GPU run", ", ".join(sorted({name for name, _ in kinds})))

    def describe(self) -> dict[str, Any]:
        return {"processes": self.ctx.world_size, "sharding": "windows"}

    # Agreements over the control group.

    def _exchange(self, error: Optional[BaseException], value: Any = None) -> Any:
        """Collective: every process's outcome. Own error: returns (the caller re-raises it). A peer's
        error: raises PeerFailure (PeerOutOfMemory for out of memory). Else returns rank 0's ``value``."""
        info = None if error is None else (_first_line(error), isinstance(error, torch.OutOfMemoryError))
        gathered = self.ctx.all_gather_object((info, value))
        if error is not None:
            self._agreed = error
            return None
        for rank, (peer, _) in enumerate(gathered):
            if peer is not None:
                message, oom = peer
                exc = (PeerOutOfMemory if oom else PeerFailure)(f"process {rank} failed: {message}", rank)
                self._agreed = exc
                raise exc
        return gathered[0][1]

    @contextmanager
    def together(self) -> Iterator[Agreement]:
        """A block that all processes finish the same way: an exception in it on any process raises on
        all (the own exception where it happened, PeerFailure elsewhere). After the block,
        ``agreement.value`` is the value rank 0 set."""
        agreement = Agreement()
        try:
            yield agreement
        except Exception as exc:
            self._exchange(exc)
            raise
        agreement.value = self._exchange(None, agreement.value)

    # Per-video traffic over the data group.

    def share(self, *tensors: Tensor) -> list[Tensor]:
        """Rank 0's values of ``tensors`` on every process (collective, in place where contiguous)."""
        out = [t.contiguous() for t in tensors]
        with _communicating("sharing the denoiser inputs"):
            for t in out:
                dist.broadcast(t, src=0, group=self.group)
        return out

    def begin(self, total_calls: int) -> None:
        """Before sampling: the sampler will call :meth:`evaluate` ``total_calls`` times."""
        self._calls = 0
        self._total = total_calls
        self._agreed = None

    def finish(self, error: Optional[BaseException] = None) -> None:
        """After sampling, on every process, with the exception that stopped it (if any).

        An exception outside the network evaluation (e.g. out of memory in the solver update) is
        passed on: to the others' next error-flag reduction when they still have steps to run, else
        to the closing exchange. Without an own exception, raises PeerFailure for a peer's failure.
        """
        if error is not None and (error is self._agreed or isinstance(error, (PeerFailure, CommunicationError))):
            return
        if error is not None and self._calls < self._total:
            self._flag(True)
            self._exchange(error)
            return
        self._exchange(error)

    def _flag(self, failed: bool) -> bool:
        flag = torch.tensor([1 if failed else 0], dtype=torch.int32, device=self.device)
        with _communicating("exchanging the step's error flags"):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def _all_gather(self, out: Tensor, inp: Tensor) -> None:
        with _communicating("gathering the network outputs"):
            if inp.device.type == "cuda":
                gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
                gather(out, inp, group=self.group)
            else:
                dist.all_gather(list(out.chunk(self.ctx.world_size)), inp, group=self.group)

    def evaluate(self, model: ModelFn, jobs: Sequence[Job]) -> list[Tensor]:
        """Evaluator: this process's share of ``jobs`` through ``local``, then everyone's outputs.

        Outputs must have their job's ``x`` shape and dtype (the v-prediction does). Every process
        passes the same jobs (the same shapes) and gets the outputs of all jobs, in job order.
        """
        self._calls += 1
        if not jobs:
            return []
        world, rank = self.ctx.world_size, self.ctx.rank
        owners = assign_jobs([job.x.shape[2] for job in jobs], world, groups=[job.window for job in jobs])
        mine = [i for i, owner in enumerate(owners) if owner == rank]
        error: Optional[BaseException] = None
        outs: list[Tensor] = []
        try:
            outs = list(self.local(model, [jobs[i] for i in mine]))
            if len(outs) != len(mine):
                raise RuntimeError(f"evaluator returned {len(outs)} outputs for {len(mine)} jobs")
            for i, out in zip(mine, outs):
                if out.shape != jobs[i].x.shape or out.dtype != jobs[i].x.dtype:
                    raise RuntimeError(f"network output {tuple(out.shape)} {out.dtype} does not match its input "
                                       f"{tuple(jobs[i].x.shape)} {jobs[i].x.dtype}")
        except Exception as exc:
            error = exc
        if self._flag(error is not None):
            self._exchange(error)  # raises PeerFailure unless the error is ours
            raise error if error is not None else PeerFailure("another process failed")

        sizes = [job.x.numel() for job in jobs]
        loads = [0] * world
        for i, owner in enumerate(owners):
            loads[owner] += sizes[i]
        width = max(loads)
        ref = jobs[0].x
        send = torch.zeros(width, dtype=ref.dtype, device=ref.device)
        offset = 0
        for i, out in zip(mine, outs):
            send[offset:offset + sizes[i]].copy_(out.reshape(-1))
            offset += sizes[i]
        recv = torch.empty(world * width, dtype=ref.dtype, device=ref.device)
        self._all_gather(recv, send)
        own = dict(zip(mine, outs))
        offsets = [r * width for r in range(world)]
        outputs = []
        for i, job in enumerate(jobs):
            owner = owners[i]
            if owner == rank:
                outputs.append(own[i])
            else:
                outputs.append(recv[offsets[owner]:offsets[owner] + sizes[i]].view(job.x.shape))
            offsets[owner] += sizes[i]
        return outputs
