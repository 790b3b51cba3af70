"""The compute side of the daemon: the resident `Denoiser` on its device, no sockets.

All model work runs on ONE dedicated worker thread, so the asyncio loop never blocks and
the model is never used from two threads. A batch is `submit`ted (host staging and device
work enqueued) and later `collect`ed (results copied back). On CUDA, submit only enqueues:
copy-in on one stream, compute on a second, copy-out on a third, chained by events, with
pinned host buffers; so while batch k computes, batch k+1 is already uploading. A staging slot
whose batch is still uncollected is read out before it is reused, so any number of batches may be
pending. Waiting for a batch sleeps (blocking events), it does not spin a core. On CPU, submit
computes directly and collect just returns the result.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from stemd.config import ModelSettings, model_settings
from stemd.pipeline import Denoiser, Plan

log = logging.getLogger(__name__)
T = TypeVar("T")

SLOTS = 2  # staging buffers per batch shape: one batch in flight while the next uploads
# Peak memory a batch costs per pixel, the shipped conv model on CPU, with a margin (python -m bench.reliability
# measures it: 252-322 B/px at 512² and 1024², 194 at 2048²; assumed on CUDA too, not yet measured there); the
# default cap on a batch's pixels (and so on a frame's) is half the free memory over it.
PIXEL_COST_BYTES = 400
MEMORY_SHARE = 0.5
MIN_BATCH_PIXELS = 512 * 512


@dataclass
class Pending:
    """A submitted batch: its result on CPU, or the CUDA work still in flight."""

    n: int
    result: list[np.ndarray] | None = None
    done: Any = None  # torch.cuda.Event recorded after copy-out
    host_out: torch.Tensor | None = None
    keep: list[Any] = field(default_factory=list)  # device tensors alive until collected


@dataclass
class _Slot:
    host_in: torch.Tensor
    host_out: torch.Tensor
    dev_in: torch.Tensor
    pending: Pending | None = None  # the last batch that used this slot


class Engine:
    """A `Denoiser` plus one worker thread; batches of same-shape frames in, float32 frames out."""

    def __init__(self, denoiser: Denoiser) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stemd-engine")
        self._set(denoiser)
        log.info("engine: %s", self.describe())

    @classmethod
    def load(cls, settings: ModelSettings | None = None, **fields: Any) -> Engine:
        """Load the model `settings` name onto its device and start the worker (`Denoiser.load`'s arguments)."""
        return cls(Denoiser.load(settings=model_settings(settings, **fields)))

    def _set(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self.generation = getattr(self, "generation", -1) + 1  # plans made by an earlier model are stale
        self.cuda = denoiser.device.type == "cuda"
        self._slots: dict[tuple[int, int, int], list[_Slot]] = {}
        self._turn = 0
        if self.cuda:
            torch.cuda.synchronize(denoiser.device)  # weights uploaded on the default stream are in place
            with torch.cuda.device(denoiser.device):
                self._streams = [torch.cuda.Stream() for _ in range(3)]  # copy-in, compute, copy-out

    def replace(self, denoiser: Denoiser) -> None:
        """Swap in a new model; call through `run` so it happens between batches."""
        self._set(denoiser)
        log.info("engine: model replaced, %s", self.describe())

    @property
    def precision(self) -> str:
        return self.denoiser.precision

    @property
    def window(self) -> int:
        return int(self.denoiser.window)

    @property
    def model_id(self) -> str:
        return str(self.denoiser.model_id)

    @property
    def model_version(self) -> str:
        md = self.denoiser.metadata or {}
        for key in ("model_version", "version", "created_at", "created"):
            if md.get(key) is not None:
                return str(md[key])
        return "unknown"

    @property
    def device_name(self) -> str:
        dev = self.denoiser.device
        if dev.type == "cuda":
            return f"{dev} ({torch.cuda.get_device_name(dev)})"
        return str(dev)

    def describe(self) -> str:
        """One line for the start-up log: model, device, whether a GPU is used."""
        dev = self.denoiser.device
        if dev.type == "cuda":
            total = torch.cuda.get_device_properties(dev).total_memory
            where = f"GPU {self.device_name}, {total / 2**30:.1f} GiB"
        else:
            where = f"no GPU, CPU with {torch.get_num_threads()} threads"
        where += f", precision {self.precision}"
        d = self.denoiser
        periods = (
            "unrecorded periods"
            if d.period_range is None
            else f"periods {d.period_range[0]:g}-{d.period_range[1]:g} px"
        )
        return f"model {self.model_id} (step {d.step}, {periods}, sampling {d.sampling}) on {where}"

    def memory_bytes(self) -> int:
        """Accelerator memory allocated (CUDA) or this process's resident memory (CPU)."""
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.denoiser.device))
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def free_memory_bytes(self) -> int:
        """Memory a batch can use: the GPU's free memory, or the host's available memory within this cgroup's limit."""
        if self.cuda:
            return int(torch.cuda.mem_get_info(self.denoiser.device)[0])
        free = []
        try:
            with open("/proc/meminfo") as f:
                free += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
            limit, used = (Path("/sys/fs/cgroup", n).read_text().strip() for n in ("memory.max", "memory.current"))
            if limit != "max":
                free.append(int(limit) - int(used))
        except (OSError, ValueError):
            pass
        return min(free) if free else int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))

    def batch_pixels(self) -> int:
        """The most pixels one batch may hold by default: MEMORY_SHARE of the free memory at PIXEL_COST_BYTES each."""
        return max(MIN_BATCH_PIXELS, int(self.free_memory_bytes() * MEMORY_SHARE / PIXEL_COST_BYTES))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the engine's worker thread without blocking the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def plan(self, shape: tuple[int, int], pixel_size_m: float | None = None, frame: np.ndarray | None = None,
             previous: Plan | None = None) -> Plan:
        """How the resident model runs such frames (`Denoiser.plan`: from `frame`'s own lattice when given; a
        recalibration passes the series' `previous` plan), or SamplingError."""
        return self.denoiser.plan(shape, pixel_size_m, frame, previous)

    def denoise(self, frames: Sequence[np.ndarray], pixel_size_m: float | None = None) -> list[np.ndarray]:
        """Synchronous submit + collect (tests, offline use). Frames must share one shape."""
        if not frames:
            return []
        return self.collect(self.submit(frames, self.plan(frames[0].shape, pixel_size_m, frames[0])))

    def submit(self, frames: Sequence[np.ndarray], plan: Plan) -> Pending:
        """Start denoising a batch of same-shape 2D frames run by `plan` (`Engine.plan`, made when they arrived).

        Worker thread only. The frames are checked and stacked on the host, everything else is `Denoiser.run`
        on the device. Collect batches in the order submitted; on CUDA, submit k+1 before collecting k.
        """
        if not frames:
            return Pending(n=0, result=[])
        stack = self.denoiser.stack(frames)
        if not self.cuda:
            with torch.inference_mode():
                y = self.denoiser.run(torch.from_numpy(stack), plan)
            return Pending(n=len(frames), result=list(y.numpy()))
        return self._submit_cuda(stack, plan)

    def _slot(self, shape: tuple[int, int, int]) -> _Slot:
        slots = self._slots.get(shape)
        if slots is None:
            if len(self._slots) >= 4:
                self._slots.clear()
            slots = self._slots[shape] = [
                _Slot(
                    host_in=torch.empty(shape, dtype=torch.float32).pin_memory(),
                    host_out=torch.empty(shape, dtype=torch.float32).pin_memory(),
                    dev_in=torch.empty(shape, dtype=torch.float32, device=self.denoiser.device),
                )
                for _ in range(SLOTS)
            ]
        self._turn = (self._turn + 1) % SLOTS
        slot = slots[self._turn]
        if slot.pending is not None and slot.pending.result is None:
            slot.pending.result = self._read(slot.pending)  # still uncollected: read it before its buffer is reused
        return slot

    def _submit_cuda(self, stack: np.ndarray, plan: Plan) -> Pending:
        copy_in, compute, copy_out = self._streams
        slot = self._slot(stack.shape)
        slot.host_in.numpy()[...] = stack
        with torch.cuda.stream(copy_in):
            slot.dev_in.copy_(slot.host_in, non_blocking=True)
            uploaded = torch.cuda.Event()  # waited on by a stream, on the GPU
            uploaded.record(copy_in)
        with torch.cuda.stream(compute), torch.inference_mode():
            compute.wait_event(uploaded)
            y = self.denoiser.run(slot.dev_in, plan)
            computed = torch.cuda.Event()
            computed.record(compute)
        with torch.cuda.stream(copy_out):
            copy_out.wait_event(computed)
            y.record_stream(copy_out)
            slot.host_out.copy_(y, non_blocking=True)
            done = torch.cuda.Event(blocking=True)  # the host waits on it: sleep, not spin
            done.record(copy_out)
        slot.pending = Pending(n=len(stack), done=done, host_out=slot.host_out, keep=[y, slot.dev_in])
        return slot.pending

    @staticmethod
    def _read(pending: Pending) -> list[np.ndarray]:
        pending.done.synchronize()
        assert pending.host_out is not None  # set by the CUDA path, the only one that leaves `result` None
        out = pending.host_out.numpy().copy()  # the pinned buffer is reused by a later batch
        pending.keep.clear()
        return list(out)

    def collect(self, pending: Pending) -> list[np.ndarray]:
        """Wait for a submitted batch and return its denoised frames (float32, input scale). A frame may hold
        NaN or inf if the model failed on it: check it (`pipeline.check_finite`) before publishing."""
        if pending.result is None:
            pending.result = self._read(pending)
        return pending.result

    def close(self, wait: bool = True) -> None:
        """Finish queued work and stop the worker thread; with `wait` False, cancel queued work and return at once
        (a batch already running finishes on its own: the process may exit without it)."""
        self._executor.shutdown(wait=wait, cancel_futures=not wait)
