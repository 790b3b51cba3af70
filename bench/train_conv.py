"""The fully convolutional model (stemd.models.conv_unet): train it, time it, check it (issue 5).

    python -m bench.train_conv train [stemd train options]   # = stemd train --config config/train_conv.yaml ...
    python -m bench.train_conv speed [--threads N]           # seconds per 512^2 frame of candidate widths
    python -m bench.train_conv check NAME=CKPT ... [--threads N]  # PSNR and time on RP-defect frames

Training is `stemd train` (stemd.apps.training, `model: conv_unet`); this file only adds the two
measurements recorded in docs/training.md, "Fully convolutional model".
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench._report import ROOT
from stemd.apps.cli import main as stemd
from stemd.compute.metrics import fit_scale
from stemd.models.checkpoint import DEFAULT_MODEL_PATH, PAPER_AE_PATH, load_checkpoint
from stemd.models.conv_unet import ConvDenoiser
from stemd.pipeline import Denoiser
from stemd.sim.lattice import NoiseSpec, corrupt, simulate_frame

CANDIDATES = [((16, 32, 48), 2, "none"), ((16, 32, 48, 64), 2, "none"), ((32, 48, 64, 96), 2, "none"),
              ((48, 64, 96, 128), 2, "none"), ((48, 64, 96, 128), 2, "bragg"), ((16, 24, 32, 48), 1, "none")]


def _time(fn, frame: np.ndarray, reps: int = 5) -> float:
    fn(frame)
    return min(_elapsed(fn, frame) for _ in range(reps))


def _elapsed(fn, frame: np.ndarray) -> float:
    t = time.perf_counter()
    fn(frame)
    return time.perf_counter() - t


def quick_check(models: dict[str, Path | None], doses=(5.0, 20.0, 80.0), threads: int = 2) -> None:
    """PSNR (dB, after metrics.fit_scale over the frame) on 512^2 simulate_frame RP-defect frames at
    Poisson doses: whole frame, its outer 32 px band, the interior, and the interior within 8 px of
    the fault's columns; and seconds per frame through `Denoiser`."""
    torch.set_num_threads(threads)
    dens = {name: Denoiser.load(path, device="cpu") for name, path in models.items()}
    print("| dose | model | whole | outer 32 px | interior | interior near the fault |\n|---|---|---|---|---|---|")
    times: dict[str, float] = {}
    rows, cols = np.mgrid[0:512, 0:512]
    interior = np.zeros((512, 512), bool)
    interior[32:-32, 32:-32] = True
    for dose in doses:
        rng = np.random.default_rng(int(dose))
        sim = simulate_frame((512, 512), rng, rotation_deg=7.0, offset_px=(3.3, 1.7), defect="rp")
        clean = sim.clean
        near = np.zeros(clean.shape, bool)
        for y, x in sim.columns[sim.near_defect]:
            near |= (rows - y) ** 2 + (cols - x) ** 2 <= 64
        near &= interior
        span = float(clean.max() - clean.min())
        noisy = corrupt(clean, NoiseSpec(kind="poisson", dose=dose), rng)
        for name, out in [("raw", noisy)] + [(k, den(noisy)) for k, den in dens.items()]:
            err = (fit_scale(out, clean) - clean) ** 2
            db = [
                10 * math.log10(span**2 / float(err[m].mean())) for m in (np.ones_like(near), ~interior, interior, near)
            ]
            print(f"| {dose:g} | {name} | " + " | ".join(f"{v:.2f}" for v in db) + " |")
            if name in dens:
                times[name] = min(times.get(name, math.inf), _time(dens[name], noisy))
    print(f"seconds per 512^2 frame ({threads} threads): " + ", ".join(f"{k} {v:.3f}" for k, v in times.items()))


def shipped_label(model: torch.nn.Module, meta: dict) -> tuple[str, int]:
    """(row label, step) of a shipped checkpoint, from its arch: the window AE has `window`, `hidden` and a
    step; the conv model (the default since stemd/models/conv.pt) has channels, unshuffle and guide, no step."""
    arch = model.arch()
    if arch["name"] == "window_ae":
        step = meta.get("step", 2)
        return f"shipped AE {arch['window']} px {tuple(arch['hidden'])}, step {step}", step
    return f"shipped conv_unet {list(arch['channels'])}, unshuffle {arch['unshuffle']}, guide {arch['guide']}", 0


def speed_table(configs: list[tuple[tuple[int, ...], int, str]], threads: int, reps: int = 8,
                shipped: tuple[Path, ...] = (PAPER_AE_PATH, DEFAULT_MODEL_PATH)) -> None:
    """Markdown rows: model, parameters, receptive field (px), GFLOP (convolutions and matmuls; the
    Bragg guide's FFTs are not counted) and min seconds per 512^2 frame, all models interleaved.
    The shipped checkpoints (the paper AE and the default conv model) are the references to beat."""
    torch.set_num_threads(threads)
    x = torch.randn(1, 1, 512, 512)
    rows = {}
    for path in shipped:
        model, meta = load_checkpoint(path)
        label, step = shipped_label(model, meta)
        rows[label] = (model.eval(), step)
    for ch, u, guide in configs:
        rows[f"conv_unet {list(ch)}, unshuffle {u}, guide {guide}"] = (ConvDenoiser(ch, u, guide).eval(), 0)
    best = {k: math.inf for k in rows}
    with torch.inference_mode():
        for _ in range(reps):  # interleaved, so a busy moment on a shared machine hits every model
            for k, (m, step) in rows.items():
                t = time.perf_counter()
                m.denoise_frames(x, step)
                best[k] = min(best[k], time.perf_counter() - t)
        for k, (m, step) in rows.items():
            with FlopCounterMode(display=False) as fc:
                m.denoise_frames(x, step)
            rf = f"{2 * m.reach + 1}" if isinstance(m, ConvDenoiser) else "28"
            params = sum(p.numel() for p in m.parameters())
            print(f"| {k} | {params:,} | {rf} | {fc.get_total_flops() / 1e9:.1f} | {best[k]:.3f} |")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        return stemd(["train", "--config", str(ROOT / "config" / "train_conv.yaml"), *argv[1:]])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("speed", "check"))
    p.add_argument("models", nargs="*", metavar="NAME=CKPT", help="check: the checkpoints to compare")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="speed: one repetition of the first candidate (a smoke run)")
    a = p.parse_args(argv)
    if a.what == "speed":
        speed_table(CANDIDATES[:1], a.threads, reps=1) if a.quick else speed_table(CANDIDATES, a.threads)
    else:
        quick_check({k: Path(v) for k, v in (m.split("=", 1) for m in a.models)}, threads=a.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
