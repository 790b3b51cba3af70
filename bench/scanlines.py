"""Scan lines: which way a frame was scanned, told by the frame, and the line offset flicker (stripes) left.

    python -m bench.scanlines               # tk_r_em's experimental frames + simulated validation, 512² crops
    python -m bench.scanlines --quick       # smoke run: one frame, 128² crops, simulated frames at 128²

Several of tk_r_em's experimental frames are stored with their scan lines as columns: their stripes run
down the frame, where the model never saw any, and the line-jitter correction took rows for lines.
`model.scan_lines: auto` (stemd.compute.scanlines) measures the line-to-line excess of the line means
along both axes; the axis that stands out is the scan axis (dejitter runs along it) and, with
`model.destripe`, its offset flicker is taken out before the model. Reported per frame: the excess both
ways, the axis chosen, and per method the split-dose held-out gain (bench/real.py's method), plain and
line-levelled (each output line first given the offset that fits it to the target's line along the scan
axis, so flicker that both halves share is not counted as signal: the plain score rewards a method for
keeping half A's stripes, since half B has the same ones), then the stripe power left (the line-to-line
part of the output's line means over half A's). "stemd (before)" is stemd as it was: lines taken as rows,
no destripe. Simulated validation: scenes with strong line flicker shown as they are and turned by 90°,
true PSNR gain against the noise-free frame.

Data: tk_r_em 1.0.4's test images (GPL-3.0), fetched at bench time into the cache of bench/real.py.
Writes the "## Scan lines (bench/scanlines.py)" section of docs/benchmarks.md and docs/scanlines.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy.ndimage import binary_dilation

from bench._report import BENCHMARKS, machine_line, write_section
from bench.peers import tk_r_em_bridge
from bench.real import SATURATION, cache_dir, central_crop, load_real_frames, make_methods, pm
from stemd.compute.fidelity import (
    fit_gain_offset,
    gain_db,
    gaussian_held_out,
    levelled,
    mse,
    saturated_mask,
    thin,
    to_counts,
)
from stemd.compute.metrics import psnr
from stemd.compute.scanlines import DOMINANCE, MIN_EXCESS, line_excess, line_flicker, scan_lines
from stemd.pipeline import Denoiser
from stemd.sim.scenes import named_frame

TITLE = "Scan lines (bench/scanlines.py)"
SIM_KINDS = ("perovskite_rp", "interface", "vacuum_edge")
SIM_DOSE, SIM_LINE_OFFSET, SIM_LINE_GAIN = 20.0, 0.05, 0.05
SEED = 20_261_203


def levelled_mse(out: np.ndarray, target: np.ndarray, mask: np.ndarray, lines: str) -> float:
    """MSE after each scan line of `out` gets the offset that fits it to `target`'s line (`fidelity.levelled`)."""
    return mse(levelled(out, target, mask, lines), target, mask)


def stripe_left(out: np.ndarray, ref: np.ndarray, lines: str) -> float:
    """The line flicker power of `out` over that of `ref`, scan lines along `lines` (rows or columns)."""
    def power(a: np.ndarray) -> float:
        t = torch.as_tensor(np.asarray(a, np.float32))[None]
        return float(line_flicker(t if lines == "rows" else t.transpose(-2, -1)).square().mean())
    return power(out) / power(ref)


def real_frame(name: str, raw: np.ndarray, ms: dict, splits: int, seed: int) -> dict:
    fit = fit_gain_offset(raw, SATURATION)
    counts = to_counts(raw, fit)
    mask = ~binary_dilation(saturated_mask(raw, SATURATION), np.ones((3, 3), bool))
    filled = torch.as_tensor(np.where(mask, raw, np.median(raw)).astype(np.float32))
    excess = line_excess(filled[None])[0].tolist()
    lines = scan_lines(filled)[0]
    res: dict = {"name": name, "excess": excess, "lines": lines, "plain": {}, "level": {}, "stripe": {}, "shown": {}}
    for split in range(splits):
        y1i, y2i = thin(counts, np.random.default_rng([seed, split]))
        y1, y2 = y1i.astype(np.float64), y2i.astype(np.float64)
        outs = {"Gaussian": gaussian_held_out(y1, y2, mask)[0]}
        for label, f in ms.items():
            t0 = time.perf_counter()
            outs[label] = np.asarray(f(y1), np.float64)
            print(f"  {name} split {split}: {label} {time.perf_counter() - t0:.1f} s", flush=True)
        ref, ref_lev = mse(y1, y2, mask), levelled_mse(y1, y2, mask, lines)
        for label, out in outs.items():
            res["plain"].setdefault(label, []).append(gain_db(ref, mse(out, y2, mask)))
            res["level"].setdefault(label, []).append(gain_db(ref_lev, levelled_mse(out, y2, mask, lines)))
            res["stripe"].setdefault(label, []).append(stripe_left(out, y1, lines))
        if split == 0:
            res["shown"] = {"half A": y1, **outs}
    return res


def simulated(now: Denoiser, before: Denoiser, size: int, seed: int) -> list[dict]:
    """True PSNR gains of stemd `now` and `before` on scenes with line flicker (and on the same scenes without), as
    they are and turned."""
    out = []
    for i, kind in enumerate(SIM_KINDS):
        for flicker in (True, False):
            noisy, scene, _ = named_frame(kind, (size, size), seed=seed + i, dose=SIM_DOSE, line_jitter_px=0.0,
                                          line_gain=SIM_LINE_GAIN * flicker, line_offset=SIM_LINE_OFFSET * flicker)
            clean = scene.clean.astype(np.float32)
            for turned in (False, True):
                x, c = (noisy.T.copy(), clean.T.copy()) if turned else (noisy, clean)
                span = float(c.max() - c.min())
                raw_psnr = psnr(x, c, data_range=span)
                plan = now.plan(x.shape, None, x)
                out.append({
                    "name": f"{kind}{'' if flicker else ', no flicker'}{', turned' if turned else ''}",
                    "lines": plan.lines + (", stripes" if plan.stripes else ""),
                    "now": psnr(now(x), c, data_range=span) - raw_psnr,
                    "before": psnr(before(x), c, data_range=span) - raw_psnr,
                })
    return out


def figure(res: dict, path: Path, crop: int = 160) -> None:
    """Half A and the outputs, a central crop, shared grey scale; the line-mean profiles below."""
    shown = res["shown"]
    labels = [k for k in ("half A", "stemd (before)", "stemd", "tk_r_em") if k in shown]
    axis = 1 if res["lines"] == "columns" else 0
    fig = Figure(figsize=(3.2 * len(labels), 6.4))
    h, w = shown["half A"].shape
    sl = np.s_[(h - crop) // 2:(h + crop) // 2, (w - crop) // 2:(w + crop) // 2]
    lo, hi = np.percentile(shown["half A"][sl], [1, 99])
    for i, label in enumerate(labels):
        ax = fig.add_subplot(2, len(labels), i + 1)
        ax.imshow(shown[label][sl], cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(2, 1, 2)
    for label in labels:
        ax.plot(shown[label][sl].mean(axis=1 - axis), label=label, lw=1)
    ax.set_xlabel(f"scan line ({res['lines']})")
    ax.set_ylabel("line mean (counts)")
    ax.legend(fontsize=8)
    fig.suptitle(f"{res['name']}: scan lines are {res['lines']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def report(real: list[dict], sims: list[dict], labels: list[str], command: str, seconds: float, tk: bool) -> str:
    head = "| frame | excess rows, cols | lines | " + " | ".join(labels) + " |"
    rows = [head, "|" + "---|" * (3 + len(labels))]
    for r in real:
        cells = [f"{pm(r['plain'][k])} / {pm(r['level'][k])} / {pm(r['stripe'][k])}" for k in labels]
        rows.append(f"| {r['name']} | {r['excess'][0]:.1f}, {r['excess'][1]:.1f} | {r['lines']} | "
                    + " | ".join(cells) + " |")
    sim_rows = ["| scene | found | stemd (dB) | stemd (before) (dB) |", "|---|---|---|---|"]
    sim_rows += [f"| {s['name']} | {s['lines']} | {s['now']:+.2f} | {s['before']:+.2f} |" for s in sims]
    return "\n".join([
        f"Machine: {machine_line()}. Command: `{command}` ({seconds / 60:.1f} min). tk_r_em: "
        + ("run." if tk else "its venv is absent here, not run."),
        "",
        "Cells: split-dose held-out gain, plain / line-levelled (dB, mean ± half-range over splits), then the "
        "stripe power left (the line-to-line part of the output's line means over half A's, along the chosen "
        "scan axis). Excess: the line flicker's variance (common to the segments of a line) over what pixel "
        f"noise gives a line mean (≈ 0: no line artefacts); `columns` is chosen when its excess is ≥ {MIN_EXCESS:g} "
        f"and ≥ {DOMINANCE:g}× the rows', and stripes are taken out when the chosen axis' excess is ≥ {MIN_EXCESS:g}. "
        "stemd plans on half A, whose excess is half the frame's.",
        "",
        *rows,
        "",
        f"Simulated validation: true PSNR gain over the raw frame at dose {SIM_DOSE:g}, scenes with row line "
        f"offset flicker ({SIM_LINE_OFFSET:.0%} of the column peak) and gain flicker ({SIM_LINE_GAIN:.0%}), "
        "or none, as they are and turned by 90°:",
        "",
        *sim_rows,
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scanlines", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: one frame, 128² crops, one split, no BM3D")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--splits", type=int, default=2)
    p.add_argument("--no-bm3d", action="store_true", help="leave out Anscombe+BM3D (slow on few cores)")
    p.add_argument("--sim-size", type=int, default=256)
    p.add_argument("--out", type=Path, default=None, help="write OUT/benchmarks.md and OUT/scanlines.png")
    args = p.parse_args(argv)
    if args.quick:
        args.crop, args.splits, args.no_bm3d, args.sim_size = 128, 1, True, 128
    start = time.perf_counter()
    command = " ".join(["python -m bench.scanlines", *(sys.argv[1:] if argv is None else argv)])
    out_dir = args.out or BENCHMARKS.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    tk = tk_r_em_bridge.available()
    now, before = Denoiser.load(), Denoiser.load(scan_lines="rows", destripe=False)
    ms = make_methods({"stemd": now, "stemd (before)": before}, not args.no_bm3d, tk)
    frames = load_real_frames(cache_dir())
    if args.quick:
        frames = dict(list(frames.items())[2:3])
    real = [real_frame(name, central_crop(f, args.crop), ms, args.splits, SEED + i)
            for i, (name, f) in enumerate(frames.items())]
    figure(next((r for r in real if r["name"] == "exp_hrstem_2"), real[0]), out_dir / "scanlines.png")
    sims = simulated(now, before, args.sim_size, SEED)
    labels = ["Gaussian", *ms]
    body = report(real, sims, labels, command, time.perf_counter() - start, tk)
    print(body)
    doc = out_dir / "benchmarks.md" if args.out else BENCHMARKS
    write_section(doc, TITLE, body)
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
