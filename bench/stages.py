"""Per-stage cost of the denoising pipeline, 1 thread: where `Denoiser.run`'s time goes, and how each stage scales.

    python -m bench.stages                          # a 512² RP frame at dose 20, 7 interleaved rounds
    python -m bench.stages --sizes 256 512 1024 2048 4096 --repeats 3 --write   # exponents; docs/benchmarks.md
    python -m bench.stages --size 128 --repeats 1   # smoke run

Each stage of `stemd.pipeline.Denoiser.run` is timed alone on the same frame, in interleaved rounds (each round
times every stage once, so a change in the machine's load falls on all of them alike), beside the whole `run` with
its plan given, and the lattice measurement that makes a plan (once per series live, once per file offline): wall
and CPU time, medians. The run's share beyond the model and its ratio to the model are medians over the rounds of
the two measured in the same round. The frame is the perovskite_rp named frame in detector counts (uint16). With
several sizes each stage's exponent b of CPU time ~ pixels^b is fitted (least squares on logs; CPU time, as wall
time on a shared machine also counts other processes' turns); rounds shrink with the pixels (at least 1).
`--keep-freed-memory` first tells glibc's malloc to keep freed memory for reuse (no trimming, no mmap): the
difference is the time the pipeline spends having the kernel map and zero fresh pages for its temporaries.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from bench._report import BENCHMARKS, machine_line, publish
from stemd.compute import columns, dejitter, fourier, planar, residual
from stemd.compute.normalize import normalize
from stemd.pipeline import Denoiser
from stemd.sim.scenes import named_frame

TITLE = "Per-stage cost"
MODEL = "model alone"
RUN = "whole Denoiser.run, plan given"
DOSE = 20.0
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse; False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 62))
    except (OSError, AttributeError):
        return False


def stages(den: Denoiser, size: int) -> dict[str, Callable[[], object]]:
    """The timed calls on a size² RP frame at dose 20 in counts, as `Denoiser.run` makes them."""
    noisy = named_frame("perovskite_rp", (size, size), dose=DOSE)[0]
    raw = np.clip(np.round(noisy * DOSE), 0, np.iinfo(np.uint16).max).astype(np.uint16)
    frames = torch.from_numpy(raw)[None]
    x = normalize(den.repaired(frames))[0][:, None]
    plan = den.plan(raw.shape, None, raw)
    guide, level = fourier.bragg_filter(x), fourier.noise_level(x)

    def guide_from_plan() -> torch.Tensor:
        spectrum = fourier.bragg_spectrum(x)
        return planar.planar_guide(x, fourier.bragg_filter(x, spectrum=spectrum), plan.vectors, spectrum,
                                   plan.faults)

    return {
        "outliers (find and fill)": lambda: den.repaired(frames),
        "normalisation": lambda: normalize(frames),
        "line-jitter correction": lambda: dejitter.dejitter(x, den.dejitter),
        "Bragg guide alone": lambda: fourier.bragg_filter(x),
        "planar guide, lattice measured in the frame": lambda: planar.planar_guide(x),
        "planar guide with its Bragg guide, the plan's lattice (the pipeline's)": guide_from_plan,
        "point-defect guide (keep_columns)": lambda: columns.keep_columns(x, guide, plan.scale_px or 10.0),
        MODEL: lambda: den.model.denoise_frames(x, den.step, guide=guide, level=level),
        "residual recovery (recover)": lambda: residual.recover(x, guide, lines=plan.lines),
        RUN: lambda: den.run(frames, plan),
        "lattice measurement (a plan: once per series)": lambda: den.plan(raw.shape, None, raw),
    }


def rounds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Per stage (wall ms, CPU ms) of each of `repeats` interleaved rounds, after one warm-up call of each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            times[name].append((1e3 * (time.perf_counter() - w0), 1e3 * (time.process_time() - c0)))
    return times


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
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds at 512² (fewer on larger frames)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep-freed-memory", action="store_true", help="malloc keeps freed memory (see above)")
    p.add_argument("--write", action="store_true", help=f"write the table to docs/benchmarks.md ({TITLE})")
    args = p.parse_args(argv)
    sizes = args.sizes or [args.size or 512]
    torch.set_num_threads(args.threads)
    kept = args.keep_freed_memory and keep_freed_memory()
    den = Denoiser.load(device="cpu")
    results: dict[str, list[list[tuple[float, float]]]] = {}
    started = time.perf_counter()
    with torch.inference_mode():
        for size in sizes:
            n = max(1, min(args.repeats, round(args.repeats * (512 / size) ** 2)))
            for name, times in rounds(stages(den, size), n).items():
                results.setdefault(name, []).append(times)
    med = lambda times, i: statistics.median(t[i] for t in times)  # noqa: E731
    head = " | ".join(f"{s}² wall ms (CPU)" for s in sizes)
    memory = "; malloc keeping freed memory" if kept else ""
    lines = [f"{machine_line()}; {args.threads} thread(s){memory}; RP frame in counts, dose {DOSE:g}; medians of "
             f"{args.repeats} interleaved rounds at 512² (fewer on larger frames); the run took "
             f"{time.perf_counter() - started:.0f} s (`python -m bench.stages`)\n",
             f"| stage | {head} |" + (" exponent |" if len(sizes) > 1 else ""),
             "|---|" + "---:|" * (len(sizes) + (len(sizes) > 1))]
    for name, cells in results.items():
        row = " | ".join(f"{med(times, 0):.0f} ({med(times, 1):.0f})" for times in cells)
        fit = f" {exponent(sizes, [med(times, 1) for times in cells]):.2f} |" if len(sizes) > 1 else ""
        lines.append(f"| {name} | {row} |{fit}")
    lines.append("")
    for size, model, run in zip(sizes, results[MODEL], results[RUN]):
        share = statistics.median(max(r[1] - m[1], 0) / max(r[1], 1e-9) for m, r in zip(model, run))
        ratio = [r[1] / max(m[1], 1e-9) for m, r in zip(model, run)]
        wall = [r[0] / max(m[0], 1e-9) for m, r in zip(model, run)]
        lines.append(f"- {size}²: everything but the model {max(med(run, 1) - med(model, 1), 0):.0f} ms CPU, "
                     f"{100 * share:.0f}% of the run; the run is {statistics.median(ratio):.2f}x the model alone "
                     f"(CPU; wall {statistics.median(wall):.2f}x), medians over {len(run)} round(s)")
    publish("\n".join(lines), BENCHMARKS, TITLE, write=args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
