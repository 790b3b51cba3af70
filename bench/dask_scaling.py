"""Dask throughput: `stemd denoise --scheduler local` with 1 and 2 workers, against one process, and what N give.

    python -m bench.dask_scaling                    # 24 frames of 512² (~3 min on 2 cores)
    python -m bench.dask_scaling --quick --out /tmp # 4 frames of 192² (under a minute), a test's smoke run

Each run writes a TIFF stack of simulated frames, then times the denoising of it: one process
(`stemd denoise`, torch on every core) and a LocalCluster of 1 and 2 single-threaded worker processes (the
cluster's start-up and each worker's model load are timed apart, as a long-running facility cluster pays them
once). From the measured per-frame time t and the data a frame moves (raw uint16 in, float32 out), the expected
throughput of N workers is N / t until the client's link carries it: N_max = t x bandwidth / bytes per frame.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tifffile
from distributed import Client, LocalCluster

from bench._report import BENCHMARKS, machine_line, write_section
from stemd.apps.distributed import denoise_block, ordered_results
from stemd.apps.offline import denoise_file
from stemd.apps.tiffio import read_tiff
from stemd.config import ModelSettings
from stemd.pipeline import Denoiser
from stemd.sim import scenes

TITLE = "Dask scaling (bench/dask_scaling.py)"
LINK_BYTES_PER_S = 117e6  # 1 Gbit/s Ethernet, payload: the link a client streams frames over


def write_stack(path: Path, frames: int, size: int) -> None:
    """`frames` simulated uint16 frames of one perfect perovskite at dose 20."""
    rng = np.random.default_rng(0)
    scene = scenes.random_scene((size, size), rng, period_px=10.0, structures=("perovskite",), layouts=("perfect",))
    stack = np.stack([scenes.apply_instrument(scene.clean, rng, scenes.draw_noise(rng, dose=20.0), dose=20.0)
                      for _ in range(frames)])
    tifffile.imwrite(path, np.clip(stack * 20.0, 0, 65535).astype(np.uint16), photometric="minisblack")


def time_cluster(inp: Path, settings: ModelSettings, workers: int) -> tuple[float, float]:
    """(start-up and model load s, denoising s) on a LocalCluster of `workers` single-threaded processes."""
    image = read_tiff(inp)
    local = Denoiser.load(settings=settings)
    first = next(image.frames())
    plan = local.plan(image.shape[-2:], None, local.stack(first))
    t0 = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.run(lambda: None)
        warm = [client.submit(denoise_block, first, settings.model_dump_json(), plan, pure=False,
                              workers=[w]) for w in client.scheduler_info()["workers"]]
        client.gather(warm)  # every worker has loaded the model
        t1 = time.perf_counter()
        for _ in ordered_results(client, image, settings.model_dump_json(), plan, progress=False):
            pass
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dask_scaling", description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="4 frames of 192²")
    p.add_argument("--out", type=Path, default=None, help="write OUT/benchmarks.md (default docs/)")
    args = p.parse_args(argv)
    if args.quick:
        args.frames, args.size = 4, 192
    work = (args.out or Path("/tmp")) / "dask_scaling"
    work.mkdir(parents=True, exist_ok=True)
    inp = work / "stack.tif"
    write_stack(inp, args.frames, args.size)
    settings = ModelSettings(device="cpu")

    t0 = time.perf_counter()
    denoise_file(inp, work / "one.tif", settings, overwrite=True, progress=False)
    single = time.perf_counter() - t0
    rows = [("one process (all cores; model load included)", 0.0, single)]
    for workers in (1, 2):
        startup, run = time_cluster(inp, settings, workers)
        rows.append((f"LocalCluster, {workers} worker{'s' if workers > 1 else ''}", startup, run))

    per_frame = rows[1][2] / args.frames  # one single-threaded worker: the cost a worker pays per frame
    frame_bytes = args.size**2 * (2 + 4)
    n_max = per_frame * LINK_BYTES_PER_S / frame_bytes
    table = "\n".join(f"| {name} | {startup:.1f} | {run:.1f} | {args.frames / run:.2f} |"
                      for name, startup, run in rows)
    body = "\n".join([
        f"Machine: {machine_line()}. Command: `python -m bench.dask_scaling"
        f"{' --quick' if args.quick else f' --frames {args.frames} --size {args.size}'}`.",
        "",
        f"{args.frames} simulated uint16 frames of {args.size}², the shipped model on the CPU, float32. Start-up: "
        "the cluster's processes and each worker's model load, paid once by a running cluster.",
        "",
        "| run | start-up s | denoising s | frames / s |",
        "|---|---:|---:|---:|",
        table,
        "",
        f"Expected on N workers of this kind: N / {per_frame:.2f} s frames/s (one single-threaded worker's time per "
        f"frame), until the client's link carries it: a frame moves {frame_bytes / 1e6:.1f} MB (uint16 in, float32 "
        f"out), so a 1 Gbit/s link feeds about {n_max:.0f} such workers; beyond that, workers should read the "
        "archive from shared storage (a lazy Dask array, `stemd.apps.distributed.denoise_array`) instead of the "
        "client streaming it.",
    ])
    print(body)
    write_section((args.out / "benchmarks.md") if args.out else BENCHMARKS, TITLE, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
