"""Denoising on a Dask cluster: archives of many frames, several machines (`stemd denoise --scheduler`).

The engine is Dask's, the one LiberTEM and HyperSpy's lazy signals already run on. `denoise_array` maps a lazy
(N, H, W) Dask array (a HyperSpy lazy signal's `.data`) through the denoiser, one frame per chunk; each worker
process loads the model once (`worker_denoiser`, cached by its settings) and every frame runs by one `Plan`, made
once from the first frame. `denoise_file_on_cluster` streams a TIFF's frames to the workers, keeps a bounded
number in flight, and writes the results in order as they come back (`stemd.apps.tiffio.write_tiff_atomic`: the
output appears only when every frame succeeded; a failed chunk is named in a one-line error).
"""

from __future__ import annotations

import contextlib
import functools
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from stemd.apps.filejob import prepare
from stemd.apps.tiffio import TiffImage, write_tiff_atomic
from stemd.config import ModelSettings
from stemd.errors import ConfigError, InputError
from stemd.pipeline import Denoiser, Plan

try:  # the optional `dask` extra
    from distributed import Client, Future, LocalCluster

    HAVE_DASK = True
except ImportError:  # pragma: no cover - exercised where the extra is missing
    HAVE_DASK = False

IN_FLIGHT_PER_WORKER = 2  # frames submitted ahead per worker: keeps workers busy, bounds memory


def require_dask() -> None:
    """ConfigError naming the extra when dask/distributed are not installed."""
    if not HAVE_DASK:
        raise ConfigError("--scheduler needs the dask extra: pip install 'stemd[dask]'")


@functools.lru_cache(maxsize=2)
def worker_denoiser(settings_json: str) -> Denoiser:
    """The model the settings name, loaded once per worker process (and per distinct settings)."""
    return Denoiser.load(settings=ModelSettings.model_validate_json(settings_json))


def denoise_block(block: np.ndarray, settings_json: str, plan: Plan) -> np.ndarray:
    """One chunk of whole frames, (n, H, W) or (H, W), denoised on a worker by `plan`; float32."""
    return worker_denoiser(settings_json)(np.asarray(block), plan=plan)


def denoise_array(frames: Any, settings: ModelSettings | None = None, pixel_size_m: float | None = None,
                  plan: Plan | None = None) -> Any:
    """A lazy (N, H, W) or (H, W) Dask array -> the lazy denoised array, float32, one frame per chunk; computed on
    whatever scheduler is active (a `distributed.Client`, or Dask's default). `plan` defaults to one made here
    from the first frame (its own lattice, else `pixel_size_m`)."""
    require_dask()
    settings = settings or ModelSettings()
    stack = frames if frames.ndim == 3 else frames[None]
    stack = stack.rechunk((1, -1, -1))
    if plan is None:
        plan = Denoiser.load(settings=settings).plan(stack.shape, pixel_size_m, np.asarray(stack[0].compute()))
    out = stack.map_blocks(denoise_block, settings.model_dump_json(), plan, dtype=np.float32)
    return out if frames.ndim == 3 else out[0]


@contextlib.contextmanager
def connect(scheduler: str, workers: int) -> Iterator[Any]:
    """A Client, closed after use: "local" starts (and then stops) a LocalCluster of `workers` single-threaded
    processes, else the address of a running scheduler (tcp://host:8786)."""
    require_dask()
    with contextlib.ExitStack() as stack:
        if scheduler == "local":
            cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                       dashboard_address=None))
            client = stack.enter_context(Client(cluster))
        else:
            try:
                client = stack.enter_context(Client(scheduler, timeout=10))
            except (OSError, TimeoutError) as exc:
                raise ConfigError(f"--scheduler: cannot reach a Dask scheduler at {scheduler!r}: {exc}") from None
        yield client


def ordered_results(client: Any, image: TiffImage, settings_json: str, plan: Plan, progress: bool
                     ) -> Iterator[np.ndarray]:
    """The denoised frames in order, submitted ahead to the workers a bounded window at a time."""
    n = image.shape[0] if image.ndim == 3 else 1
    window = IN_FLIGHT_PER_WORKER * max(1, len(client.scheduler_info()["workers"]))
    pending: deque[tuple[int, Future]] = deque()
    bar = tqdm(total=n, unit="frame", desc="denoise", dynamic_ncols=True, disable=not progress or n < 2)
    frames = image.frames()
    try:
        for i, frame in enumerate(frames):
            pending.append((i, client.submit(denoise_block, np.array(frame), settings_json, plan, pure=False)))
            if len(pending) >= window:
                yield _result(image, *pending.popleft(), n)
                bar.update()
        while pending:
            yield _result(image, *pending.popleft(), n)
            bar.update()
    finally:
        frames.close()
        bar.close()
        for _, future in pending:
            future.cancel()


def _result(image: TiffImage, index: int, future: Any, n: int) -> np.ndarray:
    try:
        return np.ascontiguousarray(future.result(), dtype=np.float32)
    except Exception as exc:  # a worker's failure, whatever its type, is this frame's
        where = f"frame {index + 1} of {n}" if n > 1 else "the frame"
        raise InputError(f"{image.path}: {where} failed on the cluster: {type(exc).__name__}: {exc}") from None


def denoise_file_on_cluster(inp: Path, out: Path, settings: ModelSettings, scheduler: str, workers: int = 2, *,
                            overwrite: bool = False, progress: bool = True, pixel_size_m: float | None = None
                            ) -> tuple[TiffImage, dict[str, Any]]:
    """`stemd denoise` on a Dask cluster: the same output and metadata as offline, the frames denoised by the
    workers; returns (input, note)."""
    require_dask()
    job = prepare(inp, out, settings, overwrite=overwrite, pixel_size_m=pixel_size_m)
    image, plan = job.image, job.plan
    note = {**job.note, "scheduler": "local" if scheduler == "local" else "distributed"}
    with connect(scheduler, workers) as client:
        write_tiff_atomic(out, image, ordered_results(client, image, settings.model_dump_json(), plan, progress),
                          note)
    return image, note
