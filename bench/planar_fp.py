"""Planar guide false positives: the share of pixels it switches on fault-free frames; it still fires on RP faults.

    python -m bench.planar_fp                # periods 8-14, rotations 0-0.5 rad, doses 2/20/200, 2 seeds (~5 min)
    python -m bench.planar_fp --quick        # one period, rotation and seed per dose (< 1 min)
    python -m bench.planar_fp --out /tmp/benchmarks.md

Fault-free frames: one crystal (perovskite, dumbbell, hexagonal by seed) from `stemd.sim.scenes.build_scene`,
512², the named frames' widths, blur, drift and instrument (`scenes.NAMED_NOISE`). RP frames:
`scenes.named_frame("perovskite_rp")`. Per frame: the share of pixels where the planar guide takes a plane
average (`stemd.compute.planar.switch_mask`, on the frame as the pipeline normalises and de-jitters it), the
PSNR of the shipped model with the planar guide and with `planar=False`, and on RP frames the share of the
fault's band (within 5 px of the fault's columns) switched. Writes the "Planar guide false positives"
section of OUT (default docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from bench._report import BENCHMARKS, machine_line, publish
from bench.faithfulness import FRAME_SEED
from stemd.compute.dejitter import dejitter
from stemd.compute.metrics import psnr
from stemd.compute.normalize import normalize
from stemd.compute.planar import switch_mask
from stemd.pipeline import Denoiser
from stemd.sim import scenes

TITLE = "Planar guide false positives"
SIZE = 512
PERIODS = (8.0, 10.0, 12.0, 14.0)
ROTATIONS = (0.0, 0.1, 0.25, 0.5)  # rad
DOSES = (2.0, 20.0, 200.0)
BAND_PX = 5.0  # an RP frame's fault band: pixels this close to a near-fault column


def fault_free(
    period: float, rotation: float, dose: float, seed: int, size: int = SIZE
) -> tuple[np.ndarray, scenes.Scene]:
    """A perfect crystal (structure by seed) with the named frames' widths, drift and instrument: (noisy, scene)."""
    rng = np.random.default_rng([FRAME_SEED, seed, round(period * 10), round(rotation * 100), round(dose)])
    kind = scenes.STRUCTURES[seed % len(scenes.STRUCTURES)]
    origin = (float(rng.uniform(0, period)), float(rng.uniform(0, period)))
    phase = scenes.Phase(kind, period, math.degrees(rotation), origin)
    scene = scenes.build_scene((size, size), [phase], [], rng, sigma_px=0.13 * period, blur_px=0.6,
                               drift_px=(0.006 * size, 0.004 * size), intensity_cv=0.04, layout="perfect")
    return scenes.apply_instrument(scene.clean, rng, {**scenes.NAMED_NOISE, "dose": dose}), scene


def switched(noisy: np.ndarray, den: Denoiser) -> np.ndarray:
    """Where the planar guide takes a plane average, on the frame as `Denoiser` hands it to the guide."""
    x, _, _ = normalize(torch.from_numpy(np.ascontiguousarray(noisy, np.float32))[None], reference=den.reference)
    x = x[:, None]
    if den.dejitter:
        x = dejitter(x, den.dejitter)
    return switch_mask(x)[0, 0].numpy()


def fault_band(scene: scenes.Scene) -> np.ndarray:
    """Pixels within BAND_PX of the fault's columns (the near-defect columns), by their distance to the fault line."""
    near = scene.columns[scene.near_defect]
    centre = near.mean(0)
    _, _, vt = np.linalg.svd(near - centre)
    normal = vt[1]  # the fault line's normal: the columns' least spread
    yy, xx = np.mgrid[0:scene.clean.shape[0], 0:scene.clean.shape[1]]
    distance = np.abs((yy - centre[0]) * normal[0] + (xx - centre[1]) * normal[1])
    spread = np.abs((near - centre) @ normal).max()
    return distance <= spread + BAND_PX


def measure(args: argparse.Namespace) -> str:
    """Every frame's row: what it is, share switched, PSNR with / without the planar guide (dB), band share."""
    planar, plain = Denoiser.load(device="cpu"), Denoiser.load(device="cpu", planar=False)
    periods, rotations = (PERIODS[1:2], ROTATIONS[2:3]) if args.quick else (PERIODS, ROTATIONS)
    rows, shares = [], {}
    for dose in args.doses:
        for seed in range(args.seeds):
            for period in periods:
                for rotation in rotations:
                    noisy, scene = fault_free(period, rotation, dose, seed, args.size)
                    share = float(switched(noisy, planar).mean())
                    shares.setdefault(dose, []).append(share)
                    a, b = psnr(planar(noisy), scene.clean), psnr(plain(noisy), scene.clean)
                    kind = scene.params["phases"][0]["kind"]
                    rows.append(f"| fault-free {kind} | {dose:g} | {period:g} | {rotation:g} "
                                f"| {seed} | {100 * share:.2f} % | {a:.2f} / {b:.2f} ({a - b:+.2f}) | – |")
        for seed in range(args.rp_seeds):
            noisy, scene, _ = scenes.named_frame(
                "perovskite_rp", (args.size, args.size), seed=FRAME_SEED + seed, dose=dose
            )
            mask = switched(noisy, planar)
            a, b = psnr(planar(noisy), scene.clean), psnr(plain(noisy), scene.clean)
            rows.append(f"| perovskite_rp | {dose:g} | 10 | 0.05 | {seed} | {100 * float(mask.mean()):.2f} % "
                        f"| {a:.2f} / {b:.2f} ({a - b:+.2f}) | {100 * float(mask[fault_band(scene)].mean()):.0f} % |")
            print(rows[-1], flush=True)
    summary = "\n".join(
        f"| {d:g} | {len(s)} | {sum(v > 0 for v in s)} | {100 * max(s):.2f} % |" for d, s in shares.items()
    )
    return "\n".join([
        f"Command: `python -m bench.planar_fp{' --quick' if args.quick else ''}`; {machine_line()}.",
        "",
        f"Fault-free frames ({args.size}², one crystal, the named frames' instrument) and the faithfulness bench's RP "
        "frame: share of pixels where the planar guide takes a plane average (`stemd.compute.planar.switch_mask`), "
        "PSNR of the shipped conv model with / without it, and the share of the RP fault's band switched.",
        "",
        "| dose | fault-free frames | frames switching any pixel | largest share switched |",
        "|---:|---:|---:|---:|",
        summary,
        "",
        "| frame | dose | period px | rotation rad | seed | switched | PSNR planar / plain (dB) "
        "| fault band switched |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
        *rows,
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one period and rotation per dose, one seed")
    p.add_argument("--seeds", type=int, default=None, help="fault-free seeds per geometry (default 2; quick 1)")
    p.add_argument("--rp-seeds", type=int, default=None, help="RP frames per dose (default 2; quick 1)")
    p.add_argument("--doses", type=lambda s: [float(v) for v in s.split(",")], default=list(DOSES))
    p.add_argument("--size", type=int, default=SIZE, help="frame side in px")
    p.add_argument("--out", type=Path, default=BENCHMARKS, help="markdown file whose section is written")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    args.seeds = args.seeds if args.seeds is not None else (1 if args.quick else 2)
    args.rp_seeds = args.rp_seeds if args.rp_seeds is not None else (1 if args.quick else 2)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    publish(measure(args), args.out, TITLE, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
