"""tk_r_em on simulated Poisson frames: time per frame and PSNR/SSIM of raw vs restored.

    python -m bench.peers.tk_r_em_measure [--size 512] [--dose 20] [--frames 3]

Runs in stemd's venv; tk_r_em runs in its own venv through tk_r_em_bridge (set it up first with
bench/peers/tk_r_em_setup.sh). Each frame is an independent Poisson draw of one clean lattice;
it is passed to tk_r_em in counts. Time is wall clock per frame (batch 1, after one warm-up) and
process CPU time over all TensorFlow threads. PSNR/SSIM are taken against the clean frame after the
least-squares gain/offset fit (stemd.compute.metrics.fit_scale) that every method gets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np

from bench.peers import tk_r_em_bridge
from stemd.compute import metrics
from stemd.sim import lattice as synthetic


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--dose", type=float, default=20.0)
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not tk_r_em_bridge.available():
        print("tk_r_em venv not found: run bench/peers/tk_r_em_setup.sh", file=sys.stderr)
        return 1
    rng = np.random.default_rng(args.seed)
    clean = synthetic.simulate_frame((args.size, args.size), rng).clean
    noise = synthetic.NoiseSpec(kind="poisson", dose=args.dose)
    noisy = np.stack([synthetic.corrupt(clean, noise, rng) for _ in range(args.frames)])
    restored, info = tk_r_em_bridge.restore_with_info(noisy * args.dose)
    seconds, cpu_seconds = info["frame_s"], info["frame_cpu_s"]

    def scores(x: np.ndarray) -> dict[str, float]:
        fitted = metrics.fit_scale(x, clean)
        return {"psnr_db": metrics.psnr(fitted, clean), "ssim": metrics.ssim(fitted, clean)}

    raw = [scores(x) for x in noisy]
    out = [scores(x) for x in restored]
    report = {
        "size": args.size,
        "dose": args.dose,
        "frame_s": seconds,
        "median_frame_s": statistics.median(seconds),
        "frame_cpu_s": cpu_seconds,
        "threads": info["threads"],
        "raw_psnr_db": statistics.mean(s["psnr_db"] for s in raw),
        "tk_r_em_psnr_db": statistics.mean(s["psnr_db"] for s in out),
        "raw_ssim": statistics.mean(s["ssim"] for s in raw),
        "tk_r_em_ssim": statistics.mean(s["ssim"] for s in out),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
