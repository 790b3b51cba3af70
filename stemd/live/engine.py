"""The compute side of the daemon: the resident `Denoiser` on its device, no sockets.

All model work runs on ONE dedicated worker thread, so the asyncio loop never blocks and
the model is never used from two threads. A batch is `submit`ted (host staging and device
work enqueued) and later `collect`ed (results copied back). On CUDA, submit only enqueues:
copy-in on one stream, compute on a second, copy-out on a third, chained by events, with
pinned host buffers; so while batch k computes, batch k+1 is already uploading. On CPU,
submit computes directly and collect just returns the result.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch

from stemd.pipeline import Denoiser
from stemd.compute.normalize import denormalize, normalize

log = logging.getLogger(__name__)
T = TypeVar("T")

SLOTS = 2  # staging buffers per batch shape: one batch in flight while the next uploads


@dataclass
class Pending:
    """A submitted batch: its result on CPU, or the CUDA work still in flight."""

    n: int
    result: list[np.ndarray] | None = None
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    done: Any = None  # torch.cuda.Event recorded after copy-out
    host_out: torch.Tensor | None = None
    keep: list[Any] = field(default_factory=list)  # device tensors alive until collected


@dataclass
class _Slot:
    host_in: torch.Tensor
    host_out: torch.Tensor
    dev_in: torch.Tensor
    done: Any = None  # the event of the last batch that used this slot


class Engine:
    """A `Denoiser` plus one worker thread; batches of same-shape frames in, float32 frames out."""

    def __init__(self, denoiser: Denoiser) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stemd-engine")
        self._set(denoiser)
        log.info("engine: %s", self.describe())

    @classmethod
    def load(cls, path: Path | str | None = None, **options: Any) -> "Engine":
        """Load a checkpoint (None: the shipped model) onto a device and start the worker; `options` are
        `Denoiser.load`'s (device, step, precision, sampling, lattice_period_m, flips)."""
        return cls(Denoiser.load(path, **options))

    def _set(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
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
        periods = "unrecorded periods" if d.period_range is None else f"periods {d.period_range[0]:g}-{d.period_range[1]:g} px"
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

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the engine's worker thread without blocking the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def plan(self, shape: tuple[int, int], pixel_size_m: float | None = None) -> float:
        """The resident model's resampling factor for such frames (`Denoiser.plan`), or SamplingError."""
        return self.denoiser.plan(shape, pixel_size_m)

    def denoise(self, frames: Sequence[np.ndarray], pixel_size_m: float | None = None) -> list[np.ndarray]:
        """Synchronous submit + collect (tests, offline use). Frames must share one shape."""
        return self.collect(self.submit(frames, pixel_size_m))

    def submit(self, frames: Sequence[np.ndarray], pixel_size_m: float | None = None) -> Pending:
        """Start denoising a batch of same-shape 2D frames of one pixel size (metres; None: unknown).

        Worker thread only. A frame the sampling plan refuses raises SamplingError before any work.
        Collect batches in the order submitted; on CUDA, submit k+1 before collecting k to overlap them.
        """
        if not frames:
            return Pending(n=0, result=[])
        shape = frames[0].shape
        if any(f.shape != shape for f in frames):
            raise ValueError("a batch must hold frames of one shape")
        self.denoiser.plan(shape, pixel_size_m)
        x, lo, hi = normalize(np.stack(frames), reference=self.denoiser.reference)
        if not self.cuda:
            with torch.inference_mode():
                y = self.denoiser.denoise_tensor(torch.from_numpy(x).unsqueeze(1), pixel_size_m)
            return Pending(n=len(frames), result=list(denormalize(y[:, 0].numpy(), lo, hi)))
        return self._submit_cuda(x, lo, hi, pixel_size_m)

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
        return slots[self._turn]

    def _submit_cuda(self, x: np.ndarray, lo: np.ndarray, hi: np.ndarray, pixel_size_m: float | None) -> Pending:
        copy_in, compute, copy_out = self._streams
        slot = self._slot(x.shape)
        if slot.done is not None:
            slot.done.synchronize()  # normally long finished: its batch was collected
        slot.host_in.numpy()[...] = x
        with torch.cuda.stream(copy_in):
            slot.dev_in.copy_(slot.host_in, non_blocking=True)
            uploaded = torch.cuda.Event()
            uploaded.record(copy_in)
        with torch.cuda.stream(compute), torch.inference_mode():
            compute.wait_event(uploaded)
            y = self.denoiser.denoise_tensor(slot.dev_in.unsqueeze(1), pixel_size_m)
            computed = torch.cuda.Event()
            computed.record(compute)
        with torch.cuda.stream(copy_out):
            copy_out.wait_event(computed)
            y.record_stream(copy_out)
            slot.host_out.copy_(y[:, 0], non_blocking=True)
            done = slot.done = torch.cuda.Event()
            done.record(copy_out)
        return Pending(n=len(x), lo=lo, hi=hi, done=done, host_out=slot.host_out, keep=[y, slot.dev_in])

    def collect(self, pending: Pending) -> list[np.ndarray]:
        """Wait for a submitted batch and return its denoised frames (float32, input scale)."""
        if pending.result is not None:
            return pending.result
        pending.done.synchronize()
        out = denormalize(pending.host_out.numpy(), pending.lo, pending.hi)  # a new array
        pending.keep.clear()
        return list(out)

    def close(self) -> None:
        """Finish queued work and stop the worker thread."""
        self._executor.shutdown(wait=True)
