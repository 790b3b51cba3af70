"""Per-stage cost of the denoising pipeline, 1 thread: where `Denoiser.run`'s time goes, and how each stage scales.

    python -m bench.stages                          # a 512² RP frame at dose 20, medians of 5
    python -m bench.stages --sizes 256 512 1024 2048 --repeats 3 --write   # exponents; docs/benchmarks.md
    python -m bench.stages --size 128 --repeats 1   # smoke run

Each stage of `stemd.pipeline.Denoiser.run` is timed alone on the same frame, side by side in one run (wall and
CPU time, medians), beside the whole `run` with its plan given, and the lattice measurement that makes a plan
(once per series live, once per file offline). With several sizes each stage's exponent b of CPU time ~ pixels^b
is fitted (least squares on logs; CPU time, as wall time on a shared machine also counts other processes' turns).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from bench._report import BENCHMARKS, machine_line, publish
from stemd.compute import dejitter, fourier, planar
from stemd.compute.normalize import normalize
from stemd.pipeline import Denoiser
from stemd.sim.scenes import named_frame

TITLE = "Per-stage cost"
MODEL = "model alone"
RUN = "whole Denoiser.run, plan given"


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


def stages(den: Denoiser, size: int) -> dict[str, Callable[[], object]]:
    """The timed calls on a size² RP frame at dose 20, as `Denoiser.run` makes them."""
    raw = named_frame("perovskite_rp", (size, size), dose=20.0)[0].astype(np.uint16)
    frames = torch.from_numpy(raw)[None]
    x = normalize(den.repaired(frames))[0][:, None]
    plan = den.plan(raw.shape, None, raw)
    guide, level = fourier.bragg_filter(x), fourier.noise_level(x)

    def guide_from_plan() -> torch.Tensor:
        spectrum = fourier.bragg_spectrum(x)
        return planar.planar_guide(x, fourier.bragg_filter(x, spectrum=spectrum), plan.vectors, spectrum)

    return {
        "outliers (find and fill)": lambda: den.repaired(frames),
        "normalisation": lambda: normalize(frames),
        "line-jitter correction": lambda: dejitter.dejitter(x, den.dejitter),
        "Bragg guide alone": lambda: fourier.bragg_filter(x),
        "planar guide, lattice measured in the frame": lambda: planar.planar_guide(x),
        "planar guide with its Bragg guide, the plan's lattice (the pipeline's)": guide_from_plan,
        MODEL: lambda: den.model.denoise_frames(x, den.step, guide=guide, level=level),
        RUN: lambda: den.run(frames, plan),
        "lattice measurement (a plan: once per series)": lambda: den.plan(raw.shape, None, raw),
    }


def exponent(sizes: list[int], values: list[float]) -> float:
    """b of values ~ pixels^b, least squares on logs."""
    xs = [math.log(s * s) for s in sizes]
    ys = [math.log(max(v, 1e-3)) for v in values]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, help="one frame side (default 512); --sizes for several")
    p.add_argument("--sizes", type=int, nargs="+", help="frame sides: a column each and the fitted exponents")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", action="store_true", help=f"write the table to docs/benchmarks.md ({TITLE})")
    args = p.parse_args(argv)
    sizes = args.sizes or [args.size or 512]
    torch.set_num_threads(args.threads)
    den = Denoiser.load(device="cpu")
    results: dict[str, list[tuple[float, float]]] = {}
    with torch.inference_mode():
        for size in sizes:
            for name, fn in stages(den, size).items():
                results.setdefault(name, []).append(timed(fn, args.repeats))
    head = " | ".join(f"{s}² wall ms (CPU)" for s in sizes)
    lines = [f"{machine_line()}; {args.threads} thread(s); RP frame, dose 20; medians of {args.repeats}",
             "(`python -m bench.stages`)\n", f"| stage | {head} |" + (" exponent |" if len(sizes) > 1 else ""),
             "|---|" + "---:|" * (len(sizes) + (len(sizes) > 1))]
    for name, cells in results.items():
        row = " | ".join(f"{wall:.0f} ({cpu:.0f})" for wall, cpu in cells)
        fit = f" {exponent(sizes, [cpu for _, cpu in cells]):.2f} |" if len(sizes) > 1 else ""
        lines.append(f"| {name} | {row} |{fit}")
    lines.append("")
    for size, (_, model), (_, run) in zip(sizes, results[MODEL], results[RUN]):
        lines.append(f"- {size}²: everything but the model {max(run - model, 0):.0f} ms CPU, "
                     f"{100 * max(run - model, 0) / max(run, 1e-9):.0f}% of the run; the run is "
                     f"{run / max(model, 1e-9):.2f}x the model alone")
    publish("\n".join(lines), BENCHMARKS, TITLE, write=args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
