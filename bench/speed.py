"""Model speed against the compute floor: time per frame, batched fps, peak memory, FLOPs.

    python bench/speed.py                      # CPU (and CUDA when present), writes docs/benchmarks.md
    python bench/speed.py --quick --no-write   # a smoke run

For each frame size and step: median time per frame after warm-up (batch 1), frames/s with a batch,
peak memory, the model's FLOPs per frame, the device's matmul rate measured in the same run, and the
ratio measured time / (FLOPs / matmul rate): 1.0 would be the floor. Side by side on the same frames:
non-local means and BM3D (time and PSNR), the classical peers a microscopist would otherwise use.
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

from stemd.denoiser import Denoiser, resolve_device

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import classical  # noqa: E402  (the classical peers, one definition for every bench)
from _report import machine_line, publish  # noqa: E402


def matmul_rate(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul FLOP/s on `device` (median of `repeats`)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    times = _timed(lambda: a @ b, device, repeats, warmup=2)
    return 2 * n**3 / statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def window_count(h: int, w: int, window: int, step: int) -> int:
    """Windows the floating-window reconstruction evaluates for an h×w frame (see stemd.window)."""

    def along(n: int) -> int:
        padded = n + 2 * (window - step)
        padded += (-(padded - window)) % step
        return (padded - window) // step + 1

    return along(h) * along(w)


def flops_per_window(model: torch.nn.Module) -> int:
    """Multiply-adds ×2 of every Linear layer of the AE for one window."""
    return sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


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


def bench_model(den: Denoiser, sizes: list[int], steps: list[int], batch: int, repeats: int, rate: float) -> list[dict]:
    rows = []
    fpw = flops_per_window(den.model)
    dev = den.device
    for size in sizes:
        for step in steps:
            den.step = step
            reps = max(1, repeats if size <= 1024 else repeats // 3)
            x1 = torch.rand(1, 1, size, size, device=dev)
            xb = torch.rand(batch, 1, size, size, device=dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            peak_rss_reset()
            with torch.inference_mode():
                single = _timed(lambda: den.denoise_tensor(x1), dev, reps)
                batched = _timed(lambda: den.denoise_tensor(xb), dev, max(1, reps // 2))
            peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else peak_rss_mb()
            flops = fpw * window_count(size, size, den.window, step)
            t = statistics.median(single)
            rows.append(
                dict(
                    device=dev.type,
                    size=size,
                    step=step,
                    ms=1e3 * t,
                    fps_batched=batch / statistics.median(batched),
                    gflop=flops / 1e9,
                    floor_ms=1e3 * flops / rate,
                    ratio=t / (flops / rate),
                    peak_mb=peak,
                )
            )
            r = rows[-1]
            print(
                f"{r['device']:>4} {size:>5}² step {step}: {r['ms']:9.1f} ms/frame  "
                f"{r['fps_batched']:8.2f} fps (batch {batch})  {r['gflop']:7.1f} GFLOP  "
                f"floor {r['floor_ms']:8.1f} ms  ratio {r['ratio']:5.2f}  peak {r['peak_mb']:7.0f} MB",
                flush=True,
            )
    return rows


def bench_peers(den: Denoiser, size: int, dose: float, seed: int) -> list[dict]:
    """Shipped model vs NLM vs BM3D on the same Poisson frame: time and PSNR (side by side)."""
    from stemd import metrics, synthetic

    rng = np.random.default_rng(seed)
    truth = synthetic.simulate_frame((size, size), rng, defect="rp")
    noisy = synthetic.corrupt(truth.clean, synthetic.NoiseSpec(kind="poisson", dose=dose), rng)
    counts = (noisy * dose).astype(np.float32)
    out = []

    def run(name, fn, repeats):
        times, result = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = fn(counts)
            times.append(time.perf_counter() - t0)
        est = metrics.fit_scale(result, truth.clean)
        out.append(dict(method=name, ms=1e3 * statistics.median(times), psnr=metrics.psnr(est, truth.clean)))
        print(f"  {name:<22} {out[-1]['ms']:10.1f} ms   PSNR {out[-1]['psnr']:6.2f} dB", flush=True)

    den.step = den.metadata.get("step", 2)
    run("none", lambda c: c, 1)
    run(f"stemd (step {den.step})", den, 3)
    try:
        run("non-local means (Anscombe)", classical.nlm, 1)
    except ImportError:
        print("  scikit-image not installed: NLM skipped (pip install -e .[bench])")
    try:
        run("BM3D (Anscombe)", classical.bm3d_denoise, 1)
    except ImportError:
        print("  bm3d not installed: BM3D skipped (pip install -e .[bench])")
    return out


def to_markdown(rows: list[dict], peers: list[dict], rates: dict[str, float], args) -> str:
    lines = [
        f"Machine: {machine_line()}. Measured {datetime.date.today()}, torch {torch.__version__}.",
        f"Command: `python bench/speed.py{' --quick' if args.quick else ''}`.",
        "",
        "Measured matmul rate (float32, 2048², same run): "
        + ", ".join(f"{d}: {r / 1e9:.0f} GFLOP/s" for d, r in rates.items())
        + ". The floor is the model's FLOPs at that rate; ratio = measured / floor.",
        "",
        f"| device | frame | step | ms/frame (median, batch 1) | frames/s (batch {args.batch}) | GFLOP/frame | floor ms | ratio | peak MB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r['size']}² | {r['step']} | {r['ms']:.1f} | {r['fps_batched']:.2f} | "
            f"{r['gflop']:.1f} | {r['floor_ms']:.1f} | {r['ratio']:.2f} | {r['peak_mb']:.0f} |"
        )
    if peers:
        base = next(p for p in peers if p["method"].startswith("stemd"))
        lines += [
            "",
            f"Side by side on one {args.peer_size}² Poisson frame (dose {args.dose} counts at the brightest column), CPU:",
            "",
            "| method | ms/frame | PSNR (dB) | time ÷ stemd |",
            "| --- | ---: | ---: | ---: |",
        ]
        for p in peers:
            lines.append(f"| {p['method']} | {p['ms']:.1f} | {p['psnr']:.2f} | {p['ms'] / base['ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke test)")
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=None)
    p.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=[2, 3])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--peer-size", type=int, default=512)
    p.add_argument("--dose", type=float, default=20.0)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--no-write", action="store_true", help="print only; do not touch docs/benchmarks.md")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes or ([64, 128] if args.quick else [256, 512, 1024, 2048])
    repeats = 2 if args.quick else args.repeats
    if args.quick:
        args.peer_size = min(args.peer_size, 128)

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(resolve_device("cuda"))
    rows, rates = [], {}
    for dev in devices:
        rates[dev.type] = matmul_rate(dev, n=512 if args.quick else 2048)
        den = Denoiser.load(args.model, device=dev.type)
        rows += bench_model(den, sizes, args.steps, args.batch, repeats, rates[dev.type])
    peers = [] if args.no_peers else bench_peers(Denoiser.load(args.model, device="cpu"), args.peer_size, args.dose, seed=1)
    text = to_markdown(rows, peers, rates, args)
    publish(text, args.out, "Speed (bench/speed.py)", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
