"""Frame borders: the shipped AE with reflect padding (the former geometry) against windows inside the frame only.

    python -m bench.borders                  # the shipped paper AE; ~1 min on one thread
    python -m bench.borders --model PATH     # any window_ae checkpoint
    python -m bench.borders --quick          # smoke run: 128² frames, dose 20, step 3, one timing run

Prints the tables of docs/training.md, "Frame borders".

Simulated 512×512 lattice frames (three rotations, no defect) under Poisson counts at doses 5, 20
and 80 over a 0.1 background, in detector counts, normalised as `Denoiser` does. Each output is
mapped onto the clean frame's scale by `metrics.fit_scale` (one fit per whole frame) and scored by
PSNR (data range 1) over the outer 28 px band and over the interior, the squared error pooled over
the three frames. "before" reconstructs the reflect-padded frame (`pad_frames`) and
crops it, which is exactly what `reconstruct` did before it kept to windows inside the frame.
Times: `reconstruct` of one frame, median of 5, torch on one thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench._report import ROOT
from stemd.compute import metrics
from stemd.compute.normalize import denormalize, normalize
from stemd.compute.window import reconstruct
from stemd.pipeline import Denoiser
from stemd.sim import lattice as synthetic

SIZE = 512
BAND = 28  # px: the outer band scored apart from the interior
DOSES = (5.0, 20.0, 80.0)
STEPS = (2, 3)
ROTATIONS = (-12.0, 8.0, 61.0)
BACKGROUND = 0.1
SEED = 20_261_125  # not a training or validation stream


def pad_amounts(size: int, window: int, step: int) -> tuple[int, int]:
    """(before, after) reflect padding of one axis in the former geometry (see `pad_frames`)."""
    before = window - step
    padded = size + 2 * before
    return before, before + (window - padded) % step


def pad_frames(frames: torch.Tensor, window: int, step: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, 1, H, W) -> (padded frames, (top, left) offset of the input inside them): the former geometry.

    `stemd.compute.window.reconstruct` no longer pads; reconstructing the padded frame and cropping it reproduces the
    former reflect-padded result (bench/borders.py compares the two).
    """
    h, w = frames.shape[-2:]
    top, bottom = pad_amounts(h, window, step)
    left, right = pad_amounts(w, window, step)
    mode = "reflect" if max(top, bottom) < h and max(left, right) < w else "replicate"
    return F.pad(frames, (left, right, top, bottom), mode=mode), (top, left)


def padded(model: torch.nn.Module, frames: torch.Tensor, step: int) -> torch.Tensor:
    """The former geometry: reflect-pad by window - step, reconstruct, crop."""
    x, (top, left) = pad_frames(frames, model.window, step)
    h, w = frames.shape[-2:]
    return reconstruct(model, x, step)[:, :, top : top + h, left : left + w]


GEOMETRIES = {"before": padded, "after": reconstruct}


RINGS = ((0, 2), (2, 4), (4, 8), (8, 14), (14, 28))  # px from the edge, for the profile at step 2


def edge_distance(shape: tuple[int, int]) -> np.ndarray:
    """Pixels' distance (px) from the nearest edge, 0 on the outermost ring."""
    yy, xx = np.indices(shape)
    return np.minimum(np.minimum(yy, shape[0] - 1 - yy), np.minimum(xx, shape[1] - 1 - xx))


def psnr_where(errors: list[np.ndarray], *masks: np.ndarray) -> tuple[float, ...]:
    """PSNR in dB of the squared errors pooled over the frames, per mask, data range 1."""
    sq = np.stack(errors)
    return tuple(float(-10 * np.log10(sq[:, where].mean())) for where in masks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "stemd/models/paper_ae.pt", help="a window_ae checkpoint")
    p.add_argument("--quick", action="store_true", help="smoke run: 128² frames, dose 20, step 3, one timing run")
    args = p.parse_args(argv)
    size, doses, steps, repeats = (128, (20.0,), (3,), 1) if args.quick else (SIZE, DOSES, STEPS, 5)
    torch.set_num_threads(1)
    den = Denoiser.load(args.model, device="cpu")
    model = den.model
    if not hasattr(model, "linear_layers"):
        print(f"{args.model} is a {model.arch()['name']} model; the floating window needs a window_ae", file=sys.stderr)
        return 2
    rng = np.random.default_rng(SEED)
    sims = [synthetic.simulate_frame((size, size), rng, rotation_deg=r, offset_px=(3.3, 1.7)).clean for r in ROTATIONS]
    dist = edge_distance((size, size))
    regions = (dist < BAND, dist >= BAND, *((dist >= a) & (dist < b) for a, b in RINGS))
    rows = []
    with torch.inference_mode():
        for dose in doses:
            noise = synthetic.NoiseSpec(kind="poisson", dose=dose, background=BACKGROUND)
            counts = np.stack([
                (synthetic.corrupt(clean, noise, np.random.default_rng([SEED, i, int(dose)])) + BACKGROUND) * dose
                for i, clean in enumerate(sims)
            ])
            x, lo, hi = normalize(counts, reference=den.reference)
            frames = torch.from_numpy(x)[:, None]
            noisy = psnr_where([(metrics.fit_scale(c, s) - s) ** 2 for c, s in zip(counts, sims)], *regions)
            for step in steps:
                row = {"dose": dose, "step": step, "noisy": noisy}
                for name, geometry in GEOMETRIES.items():
                    out = denormalize(geometry(model, frames, step)[:, 0].numpy(), lo, hi)
                    row[name] = psnr_where([(metrics.fit_scale(o, s) - s) ** 2 for o, s in zip(out, sims)], *regions)
                rows.append(row)
        times = {}
        one = frames[:1]
        for step in steps:
            for name, geometry in GEOMETRIES.items():
                geometry(model, one, step)  # warm-up: count/bias maps cached
                runs = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    geometry(model, one, step)
                    runs.append(time.perf_counter() - t0)
                times[name, step] = statistics.median(runs)

    print("| dose | step | noisy border / interior | before: border / interior | after: border / interior |")
    print("|---:|---:|---|---|---|")
    for r in rows:
        cells = " | ".join(f"{r[k][0]:.2f} / {r[k][1]:.2f}" for k in ("noisy", "before", "after"))
        print(f"| {r['dose']:g} | {r['step']} | {cells} |")
    print()
    print("| dose | " + " | ".join(f"{a}-{b} px" for a, b in RINGS) + f" | interior (>= {BAND} px) |")
    print("|---:|" + "---|" * (len(RINGS) + 1))
    for r in (r for r in rows if r["step"] == steps[0]):
        cells = [f"{r['before'][i]:.1f} → {r['after'][i]:.1f}" for i in (*range(2, 2 + len(RINGS)), 1)]
        print(f"| {r['dose']:g} | " + " | ".join(cells) + " |")
    print()
    print("| step | before s/frame | after s/frame |")
    print("|---:|---:|---:|")
    for step in steps:
        print(f"| {step} | {times['before', step]:.3f} | {times['after', step]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
