"""Model speed against the compute floor: time per frame, batched fps, peak memory, FLOPs.

    python -m bench.speed                      # CPU (and CUDA when present), writes docs/benchmarks.md
    python -m bench.speed --quick --no-write   # a smoke run

For each model, precision, frame size (and step, for the window AE): median time per frame after
warm-up (batch 1), wall and CPU (process time over all torch threads), frames/s with a batch, peak memory,
the model's useful FLOPs per frame (torch's FlopCounterMode on the real forward pass of an un-banded
frame: the conv model's row bands recompute their margins, which are not counted), the device's matmul
rate at that precision measured just before and after the row (interleaved, so a machine whose load
changes during the run is compared with itself), and the ratio measured time / (FLOPs / matmul rate):
1.0 would be the floor. On a GPU each precision's accuracy against float32 is in its row (tf32 is
timed there by default), and `--overlap` compares the engine's pipelined batches (copy-in, compute and
copy-out on three streams) with the same batches one at a time, `--trace` writes the profiler timeline.
When a GPU is lent: `python -m bench.speed --sizes 512,1024 --overlap --trace docs/gpu_trace.json`.
The model rows time the model alone (model.dejitter 0, the plain Bragg guide); the line-jitter
correction and the planar-defect guide that run by default are timed on their own (their FFTs are not
matmul FLOPs). Side by side on one Poisson frame: every model and precision as shipped (with the
correction and the guide), non-local means and BM3D (time and PSNR), the classical peers a
microscopist would otherwise use, and each precision's accuracy cost against float32.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import classical  # the classical peers, one definition for every bench
from bench._report import BENCHMARKS, machine_line, model_option, publish
from stemd.compute import metrics
from stemd.compute.dejitter import dejitter
from stemd.compute.planar import planar_guide
from stemd.config import DEJITTER_DEFAULT
from stemd.models.checkpoint import MODELS_DIR
from stemd.pipeline import Denoiser, resolve_device
from stemd.sim import lattice as synthetic

DTYPES = {"float32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_MODELS = {"conv": MODELS_DIR / "conv.pt", "paper AE": MODELS_DIR / "paper_ae.pt"}


def matmul_rate(device: torch.device, precision: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """Measured matmul FLOP/s on `device` at `precision` (median of `repeats`)."""
    a = torch.randn(n, n, device=device, dtype=DTYPES[precision])
    b = torch.randn(n, n, device=device, dtype=DTYPES[precision])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    times = _timed(lambda: a @ b, device, repeats, warmup=2)
    return 2 * n**3 / statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int, warmup: int = 1, cpu: list[float] | None = None) -> list[float]:
    """Wall seconds of `repeats` calls after `warmup`; their CPU seconds appended to `cpu` if given."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.process_time() - c0)
    return out


UNBANDED_PIXELS = 1024 * 1024  # the conv model runs a frame this size whole (conv_unet.DEFAULT_BAND_PIXELS)


def frame_flops(den: Denoiser, size: int) -> float:
    """Useful FLOPs of one size x size frame through the model (convolutions and matmuls): counted on a
    frame the conv model runs whole, scaled by pixels (its convolutions' FLOPs are linear in them), so the
    margins its row bands recompute on a larger frame are not counted; the window AE's as run."""
    counted = size if is_window_model(den) or size * size <= UNBANDED_PIXELS else int(UNBANDED_PIXELS ** 0.5)
    x = torch.rand(1, 1, counted, counted, device=den.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        den.denoise_tensor(x)
    return float(counter.get_total_flops()) * (size / counted) ** 2


def peak_rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def is_window_model(den: Denoiser) -> bool:
    return den.model.arch()["name"] == "window_ae"


def _repeats(size: int, repeats: int) -> int:
    """Timed runs per frame size: a third above 1024² (those take seconds each), at least one."""
    return max(1, repeats if size <= 1024 else repeats // 3)


def bench_model(name: str, den: Denoiser, sizes: list[int], steps: list[int], batch: int, repeats: int,
                rate_n: int, reference: dict[tuple[str, int, int | None], torch.Tensor] | None = None) -> list[dict]:
    """Rows of time, throughput, memory and floor for one model at its current precision; the matmul rate
    (`rate_n`² matmuls) measured before and after each row. On a GPU, with `reference` (outputs of float32 runs
    by (model, size, step), filled by the float32 rows) each row's PSNR against float32 on a fixed frame."""
    rows = []
    dev = den.device
    for size in sizes:
        for step in steps if is_window_model(den) else [None]:
            if step is not None:
                den.step = step
            reps = _repeats(size, repeats)
            x1 = torch.rand(1, 1, size, size, device=dev)
            xb = torch.rand(batch, 1, size, size, device=dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            peak_rss_reset()
            rate_before = matmul_rate(dev, den.precision, n=rate_n)
            cpu: list[float] = []
            with torch.inference_mode():
                single = _timed(lambda x1=x1: den.denoise_tensor(x1), dev, reps, cpu=cpu)
                batched = _timed(lambda xb=xb: den.denoise_tensor(xb), dev, max(1, reps // 2))
            peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else peak_rss_mb()
            rate = statistics.fmean([rate_before, matmul_rate(dev, den.precision, n=rate_n)])
            flops = frame_flops(den, size)
            t = statistics.median(single)
            rows.append(dict(device=dev.type, model=name, precision=den.precision, size=size, step=step, ms=1e3 * t,
                             cpu_ms=1e3 * statistics.median(cpu), fps_batched=batch / statistics.median(batched),
                             gflop=flops / 1e9, rate=rate, floor_ms=1e3 * flops / rate, ratio=t / (flops / rate),
                             peak_mb=peak, vs_float32=None))
            r = rows[-1]
            if reference is not None and dev.type == "cuda" and size <= 1024:
                r["vs_float32"] = _vs_float32(den, (name, size, step), reference)
            print(
                f"{r['device']:>4} {name:<9} {den.precision:<7} {size:>5}² step {step or '-'}: "
                f"{r['ms']:9.1f} ms/frame (CPU {r['cpu_ms']:.1f})  {r['fps_batched']:8.2f} fps (batch {batch})  "
                f"{r['gflop']:7.1f} GFLOP  floor {r['floor_ms']:8.1f} ms  "
                f"ratio {r['ratio']:5.2f}  peak {r['peak_mb']:7.0f} MB",
                flush=True,
            )
    return rows


def _vs_float32(den: Denoiser, key: tuple[str, int, int | None],
                reference: dict[tuple[str, int, int | None], torch.Tensor]) -> float | None:
    """PSNR (dB, the float32 output's range as peak) of this precision's output against float32's on one
    Poisson lattice frame; None for the float32 row itself, which becomes the reference."""
    size = key[1]
    rng = np.random.default_rng(size)
    clean = synthetic.simulate_frame((size, size), rng).clean
    noisy = torch.from_numpy(synthetic.corrupt(clean, synthetic.NoiseSpec(kind="poisson", dose=20.0), rng))
    with torch.inference_mode():
        out = den.denoise_tensor(noisy[None, None].to(den.device)).float().cpu()[0, 0].numpy()
    if den.precision == "float32":
        reference[key] = out
        return None
    if key not in reference:
        return None
    expected = reference[key]
    return metrics.psnr(out, expected, float(np.ptp(expected)))


def bench_overlap(path: Path, size: int, batch: int, batches: int, trace: Path | None) -> dict:
    """The engine's batches pipelined (batch k+1 submitted before k is collected: on a GPU its upload overlaps
    k's compute) against the same batches one at a time: frames/s of each and their ratio; with `trace` the
    pipelined run's profiler timeline (chrome://tracing) is written there."""
    from stemd.live.engine import Engine

    engine = Engine.load(path=path, device="auto")
    rng = np.random.default_rng(0)
    frames = [rng.poisson(synthetic.simulate_frame((size, size), rng).clean * 20).astype(np.uint16)
              for _ in range(batch)]
    plan = engine.plan(frames[0].shape, None, frames[0])

    def pipelined() -> None:
        pending = None
        for _ in range(batches):
            handle = engine.submit(frames, plan)
            if pending is not None:
                engine.collect(pending)
            pending = handle
        engine.collect(pending)

    def serial() -> None:
        for _ in range(batches):
            engine.collect(engine.submit(frames, plan))

    try:
        pipelined()  # warm-up: cuDNN's choice of kernels, the planar guide's geometry
        t0 = time.perf_counter()
        serial()
        t_serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipelined()
        t_pipelined = time.perf_counter() - t0
        if trace is not None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if engine.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                pipelined()
            prof.export_chrome_trace(str(trace))
    finally:
        engine.close()
    n = batches * batch
    out = dict(device=engine.device_name, size=size, batch=batch, fps_serial=n / t_serial,
               fps_pipelined=n / t_pipelined, ratio=t_serial / t_pipelined)
    print(f"overlap {out['device']} {size}² batch {batch}: serial {out['fps_serial']:.1f} fps, pipelined "
          f"{out['fps_pipelined']:.1f} fps ({out['ratio']:.2f}x)", flush=True)
    return out


def bench_stage(label: str, fn, frame, device: torch.device, sizes: list[int], repeats: int) -> list[dict]:
    """Median time of `fn` (a step `Denoiser` runs besides the model) on `frame(size)`, one row per size."""
    rows = []
    for size in sizes:
        x = frame(size).to(device)
        with torch.inference_mode():
            t = statistics.median(_timed(lambda x=x: fn(x), device, _repeats(size, repeats)))
        rows.append(dict(device=device.type, size=size, ms=1e3 * t))
        print(f"{device.type:>4} {label} {size:>5}²: {1e3 * t:9.1f} ms/frame", flush=True)
    return rows


def bench_dejitter(device: torch.device, sizes: list[int], repeats: int) -> list[dict]:
    """The default line-jitter correction on a random frame per size (a lattice-free frame costs the same)."""
    return bench_stage(f"line-jitter correction, {DEJITTER_DEFAULT} rounds,", lambda x: dejitter(x, DEJITTER_DEFAULT),
                       lambda size: torch.rand(1, 1, size, size), device, sizes, repeats)


def bench_planar(device: torch.device, sizes: list[int], repeats: int) -> list[dict]:
    """The planar-defect guide (stemd.compute.planar, Bragg guide included) on a Poisson RP-fault frame per size
    (a frame with a lattice: the costly case)."""
    def frame(size: int) -> torch.Tensor:
        rng = np.random.default_rng(size)
        clean = synthetic.simulate_frame((size, size), rng, defect="rp").clean
        return torch.from_numpy(synthetic.corrupt(clean, synthetic.NoiseSpec(kind="poisson", dose=20.0), rng))[
            None, None
        ]

    return bench_stage("planar-defect guide", planar_guide, frame, device, sizes, repeats)


def bench_peers(models: dict[str, Denoiser], precisions: list[str], size: int, dose: float, seed: int,
                repeats: int = 3) -> list[dict]:
    """Every model and precision vs NLM vs BM3D on the same Poisson frame: time and PSNR, side by side."""
    rng = np.random.default_rng(seed)
    truth = synthetic.simulate_frame((size, size), rng, defect="rp")
    noisy = synthetic.corrupt(truth.clean, synthetic.NoiseSpec(kind="poisson", dose=dose), rng)
    counts = (noisy * dose).astype(np.float32)
    out: list[dict] = []

    def run(name, fn, reps, reference=None):
        fn(counts) if reps > 1 else None  # warm-up
        times, result = [], None
        for _ in range(reps):
            t0 = time.perf_counter()
            result = fn(counts)
            times.append(time.perf_counter() - t0)
        est = metrics.fit_scale(result, truth.clean)
        row = dict(method=name, ms=1e3 * statistics.median(times), psnr=metrics.psnr(est, truth.clean, 1.0),
                   vs_float32=None if reference is None else metrics.psnr(result, reference, float(np.ptp(reference))))
        out.append(row)
        extra = "" if reference is None else f"   vs float32 {row['vs_float32']:.1f} dB"
        print(f"  {name:<26} {row['ms']:10.1f} ms   PSNR {row['psnr']:6.2f} dB{extra}", flush=True)
        return result

    run("none", lambda c: c, 1)
    for name, den in models.items():
        reference = None
        for precision in precisions:
            den.precision = precision
            if is_window_model(den):
                den.step = den.metadata.get("step", 2)
            label = f"stemd {name}, {precision}" + (f", step {den.step}" if is_window_model(den) else "")
            result = run(label, den, repeats, reference)
            reference = result if reference is None else reference
        den.precision = "float32"
        if not is_window_model(den):
            den.dejitter = 0
            run(f"stemd {name}, float32, no line-jitter correction", den, repeats, reference)
            den.dejitter, den.planar = DEJITTER_DEFAULT, False
            run(f"stemd {name}, float32, no planar-defect guide", den, repeats, reference)
            den.planar = True
    for label, fn in (("non-local means (Anscombe)", classical.nlm), ("BM3D (Anscombe)", classical.bm3d_denoise)):
        try:
            run(label, fn, 1)
        except ImportError:
            print(f"  {label}: its package is not installed, skipped (pip install -e .[bench])")
    return out


def to_markdown(rows: list[dict], peers: list[dict], args, jitter: list[dict] = (), planar: list[dict] = (),
                overlap: dict | None = None) -> str:
    lines = [
        f"Machine: {machine_line()}. Measured {datetime.date.today()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads.",
        f"Command: `python -m bench.speed{' --quick' if args.quick else ''}`.",
        "",
        "The floor is the model's useful FLOPs (torch's FlopCounterMode on the real forward pass of a frame run "
        "whole; the conv model's row bands recompute margins, not counted) at the matmul rate of its device and "
        "precision measured just before and after the row (its column); ratio = measured / floor. CPU ms: process "
        "time over all torch threads, beside the wall time. A window-AE row has a step; the conv model has none. "
        "On the CPU the window AE runs slower in bf16 than in float32 (its 28×28 strided convolutions), so its "
        "bf16 rows stop at 512². vs float32: on a GPU, PSNR of the output against float32's (its range as peak).",
        "",
        f"| device | model | precision | frame | step | ms/frame (median, batch 1) | CPU ms | frames/s (batch "
        f"{args.batch}) | GFLOP/frame | matmul GFLOP/s | floor ms | ratio | peak MB | vs float32 dB |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        vs = "–" if r["vs_float32"] is None else f"{r['vs_float32']:.1f}"
        lines.append(
            f"| {r['device']} | {r['model']} | {r['precision']} | {r['size']}² | {r['step'] or '–'} | {r['ms']:.1f} | "
            f"{r['cpu_ms']:.1f} | {r['fps_batched']:.2f} | {r['gflop']:.1f} | {r['rate'] / 1e9:.0f} | "
            f"{r['floor_ms']:.1f} | {r['ratio']:.2f} | {r['peak_mb']:.0f} | {vs} |"
        )
    if overlap:
        lines += ["", f"Copy/compute overlap (`--overlap`, {overlap['device']}, {overlap['size']}², batch "
                  f"{overlap['batch']}): batches one at a time {overlap['fps_serial']:.1f} frames/s, pipelined "
                  f"(the engine's three streams) {overlap['fps_pipelined']:.1f} frames/s: {overlap['ratio']:.2f}x."]
    def timed(what: str, stage: list[dict]) -> list[str]:
        return [
            "",
            what + ", on its own: " + ", ".join(f"{j['device']} {j['size']}² {j['ms']:.1f} ms" for j in stage) + ".",
        ]

    if jitter:
        lines += timed(
            f"Line-jitter correction (`stemd.compute.dejitter`, {DEJITTER_DEFAULT} rounds, the default), which runs "
            "before the model in every `Denoiser` call",
            jitter,
        )
    if planar:
        lines += timed(
            "Planar-defect guide (`stemd.compute.planar`: the Bragg guide, lattice vectors, four plane averages and "
            "their fit profiles), which replaces the model rows' Bragg guide in every `Denoiser` call of a "
            "conv model (Poisson RP-fault frames, dose 20)",
            planar,
        )
    if peers:
        bm3d = next((p for p in peers if p["method"].startswith("BM3D")), None)
        lines += [
            "",
            f"Side by side on one {args.peer_size}² Poisson frame (`synthetic.simulate_frame`, RP fault, dose "
            f"{args.dose:g} "
            "counts at the brightest column), CPU. PSNR after the least-squares gain/offset onto the clean frame; "
            "*vs float32*: PSNR of the output against the same model's float32 output (its range as peak): "
            "the precision's accuracy cost. The stemd rows run as shipped, line-jitter correction and planar-defect "
            "guide included (this frame has no jitter; the rows without them show what each costs).",
            "",
            "| method | ms/frame | PSNR (dB) | vs float32 (dB) | BM3D time ÷ this |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for p in peers:
            speedup = "–" if bm3d is None or p["method"] == "none" else f"{bm3d['ms'] / p['ms']:.1f}"
            vs = "–" if p["vs_float32"] is None else f"{p['vs_float32']:.1f}"
            lines.append(f"| {p['method']} | {p['ms']:.1f} | {p['psnr']:.2f} | {vs} | {speedup} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=model_option, action="append", metavar="NAME=PATH",
                   help="a checkpoint to time (repeatable; default: the shipped conv and paper AE models)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke test)")
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=None)
    p.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=[2, 3])
    p.add_argument("--precisions", type=lambda s: s.split(","), default=["float32", "bf16"],
                   help="float32 first (the reference); on a GPU tf32 is added unless listed")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--peer-size", type=int, default=512)
    p.add_argument("--dose", type=float, default=20.0)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--overlap", action="store_true", help="the engine's pipelined batches against one at a time")
    p.add_argument("--overlap-size", type=int, default=1024)
    p.add_argument("--trace", type=Path, default=None, help="with --overlap: write the profiler timeline here")
    p.add_argument("--no-write", action="store_true", help="print only; do not touch docs/benchmarks.md")
    p.add_argument("--out", type=Path, default=BENCHMARKS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bad = [x for x in args.precisions if x not in DTYPES]
    if bad:
        p.error(f"--precisions: unknown {bad} (allowed: {', '.join(DTYPES)})")
    sizes = args.sizes or ([64, 128] if args.quick else [256, 512, 1024, 2048])
    repeats = 2 if args.quick else args.repeats
    if args.quick:
        args.peer_size = min(args.peer_size, 128)
    if any(options for *_, options in args.model or []):
        p.error("--model: give NAME=PATH without @options; speed times every one of --precisions")
    paths = {name: path for name, path, *_ in args.model} if args.model else dict(DEFAULT_MODELS)

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(resolve_device("cuda"))
    rows, jitter, planar = [], [], []
    reference: dict[tuple[str, int, int | None], torch.Tensor] = {}
    for dev in devices:
        precisions = [x for x in args.precisions if dev.type == "cuda" or x != "tf32"]  # tf32 is a CUDA mode
        if dev.type == "cuda" and "tf32" not in precisions:
            precisions.append("tf32")
        for name, path in paths.items():
            den = Denoiser.load(path, device=dev.type, dejitter=0, planar=False)
            for precision in precisions:
                den.precision = precision
                slow = dev.type == "cpu" and precision == "bf16" and is_window_model(den)
                rows += bench_model(name, den, [x for x in sizes if x <= 512] if slow else sizes, args.steps,
                                    args.batch, repeats, 512 if args.quick else 2048, reference)
        jitter += bench_dejitter(dev, sizes, repeats)
        planar += bench_planar(dev, sizes, repeats)
    peers = [] if args.no_peers else bench_peers(
        {name: Denoiser.load(path, device="cpu") for name, path in paths.items()},
        [x for x in args.precisions if x != "tf32"], args.peer_size, args.dose, seed=1)
    overlap = bench_overlap(paths[next(iter(paths))], 64 if args.quick else args.overlap_size, args.batch,
                            3 if args.quick else 10, args.trace) if args.overlap else None
    text = to_markdown(rows, peers, args, jitter, planar, overlap)
    publish(text, args.out, "Speed (bench/speed.py)", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
