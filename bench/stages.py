"""Per-stage cost of the denoising pipeline on one frame, 1 thread: where `Denoiser.run`'s time goes.

    python -m bench.stages                 # a 512² RP frame at dose 20, medians of 5
    python -m bench.stages --size 128 --repeats 1   # smoke run

Each stage of `stemd.pipeline.Denoiser.run` is timed alone on the same frame, side by side in one run (wall and
CPU time, medians), beside the whole `run` with its plan given, and the lattice measurement that makes a plan
(once per series live, once per file offline). Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from bench._report import machine_line
from stemd.compute import dejitter, fourier, planar
from stemd.compute.normalize import normalize
from stemd.pipeline import Denoiser
from stemd.sim.scenes import named_frame


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median wall ms, median CPU ms) of `repeats` calls after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(1e3 * (time.perf_counter() - w0))
        cpu.append(1e3 * (time.process_time() - c0))
    return statistics.median(wall), statistics.median(cpu)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    raw = named_frame("perovskite_rp", (args.size, args.size), dose=20.0)[0].astype(np.uint16)
    den = Denoiser.load(device="cpu")
    frames = torch.from_numpy(raw)[None]
    x = normalize(den.repaired(frames))[0][:, None]
    plan = den.plan(raw.shape, None, raw)
    stages: dict[str, Callable[[], object]] = {
        "outliers (find and fill)": lambda: den.repaired(frames),
        "normalisation": lambda: normalize(frames),
        "line-jitter correction": lambda: dejitter.dejitter(x, den.dejitter),
        "planar guide (with its Bragg guide)": lambda: planar.planar_guide(x),
        "Bragg guide alone": lambda: fourier.bragg_filter(x),
        "model alone": lambda: den.model.denoise_frames(x, den.step, guide=fourier.bragg_filter(x),
                                                          level=fourier.noise_level(x)),
        "whole Denoiser.run, plan given": lambda: den.run(frames, plan),
        "lattice measurement (a plan: once per series)": lambda: den.plan(raw.shape, None, raw),
    }
    print(f"{machine_line()}; {args.threads} thread(s); {args.size}² RP frame, dose 20; medians of {args.repeats}\n")
    print("| stage | wall ms | CPU ms |\n|---|---:|---:|")
    with torch.inference_mode():
        for name, fn in stages.items():
            wall, cpu = timed(fn, args.repeats)
            print(f"| {name} | {wall:.0f} | {cpu:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
