"""The fine-tune on the frame (`model.adapt`) on simulated frames, where the truth is known.

    python -m bench.adapt                  # perovskite_rp 512², doses 2/20/80/200, with and without line artefacts
    python -m bench.adapt --quick          # 256², dose 20, 20 steps: a smoke run
    python -m bench.adapt --out /tmp/benchmarks.md

On real frames the fine-tune is scored by split dose (`python -m bench.real --knobs`). Here each frame is
denoised by the shipped pipeline and by the same with `adapt` steps: the plan's verdict (kept, rejected by its
held-out split, skipped) and the true PSNR of both. The frames carry the named instrument (`scenes.NAMED_NOISE`:
line jitter, line gain and offset flicker, which both halves of a split share), then the same without line jitter,
and without any line artefact. Writes the "Fine-tune on the frame, simulated" section of OUT (default
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench._report import BENCHMARKS, machine_line, publish
from bench.faithfulness import FRAME_SEED
from stemd.compute.metrics import psnr
from stemd.pipeline import Denoiser
from stemd.sim import scenes

TITLE = "Fine-tune on the frame, simulated (bench/adapt.py)"
DOSES = (2.0, 20.0, 80.0, 200.0)
STEPS = 300
INSTRUMENTS = {"named (line artefacts)": {}, "no line jitter": {"line_jitter_px": 0.0},
               "no line artefacts": {"line_jitter_px": 0.0, "line_gain": 0.0, "line_offset": 0.0}}


def measure(args: argparse.Namespace) -> str:
    """The section's markdown: one row per frame."""
    start = time.perf_counter()
    shipped, tuned = Denoiser.load(device="cpu"), Denoiser.load(device="cpu", adapt=args.steps)
    rows = ["| instrument | dose | verdict (held-out split) | PSNR shipped | PSNR adapt | true gain (dB) | plan (s) |",
            "|---|---:|---|---:|---:|---:|---:|"]
    for label, noise in INSTRUMENTS.items():
        for dose in args.doses:
            noisy, scene, _ = scenes.named_frame("perovskite_rp", (args.size, args.size), seed=FRAME_SEED,
                                                 dose=dose, **noise)
            t0 = time.perf_counter()
            plan = tuned.plan(noisy.shape, None, noisy)
            seconds = time.perf_counter() - t0
            a, b = psnr(shipped(noisy), scene.clean, 1.0), psnr(tuned(noisy, plan=plan), scene.clean, 1.0)
            rows.append(f"| {label} | {dose:g} | {plan.adapted} | {a:.2f} | {b:.2f} | {b - a:+.2f} | {seconds:.0f} |")
            print(rows[-1], flush=True)
    command = "python -m bench.adapt" + (" --quick" if args.quick else "")
    return "\n".join([
        f"Command: `{command}`; {machine_line()}; {(time.perf_counter() - start) / 60:.1f} min.", "",
        f"perovskite_rp {args.size}², the shipped pipeline and the same with `adapt {args.steps}`: the plan's verdict "
        "and the true PSNR (dB, peak 1) of each. Both halves of a split share the frame's line jitter, which the "
        "split cannot tell from signal: where it keeps the fine-tune on a jittered frame, the truth may disagree.",
        "", *rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="256², dose 20, 20 steps")
    p.add_argument("--doses", type=lambda s: [float(v) for v in s.split(",")], default=None)
    p.add_argument("--size", type=int, default=None, help="frame side in px (default 512; quick 256)")
    p.add_argument("--steps", type=int, default=None, help=f"fine-tune steps (default {STEPS}; quick 20)")
    p.add_argument("--out", type=Path, default=BENCHMARKS, help="markdown file whose section is written")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    args.doses = args.doses or ([20.0] if args.quick else list(DOSES))
    args.size = args.size or (256 if args.quick else 512)
    args.steps = args.steps or (20 if args.quick else STEPS)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    publish(measure(args), args.out, TITLE, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
