"""Real data: split-dose evaluation of stemd and its peers on experimental HAADF frames, which have no clean truth.

    python -m bench.real                                   # tk_r_em's experimental frames, 512² crops, 3 splits
    python -m bench.real --no-bm3d --splits 1              # faster
    python -m bench.real --quick --sim-only --out /tmp/r   # smoke run: simulated frames only, no download

Method. A detector frame is `raw = gain * counts + offset` with Poisson `counts`; gain and offset are
fitted from the frame itself (local noise variance against local mean, `fit_gain_offset`). Binomial
thinning of the counts, y1 ~ Binomial(y, 1/2), y2 = y - y1, gives two independent Poisson half-dose
frames, so E|f(y1) - y2|^2 = E|f(y1) - x/2|^2 + E|y2 - x/2|^2: the held-out error of a method on half
A against half B ranks methods as their true error at half dose does. Reported per method: the
held-out gain 10 log10(MSE(y1, y2) / MSE(f(y1), y2)) in dB (ceiling ~3.01 dB, a perfect denoiser),
plain and line-registered (each output line, along the scan axis the frame shows, shifted and levelled
onto the target's line first, so scan jitter and stripes that both halves share are not counted as
signal). The thinning argument needs independent pixel
noise: frames whose raw noise is correlated (drift-corrected, resampled, processed) are flagged and
their split is not a valid ranking. A validation on simulated frames with a known truth and a known
gain/offset checks that the split ranking matches the true-error ranking.

Data: the experimental test images of tk_r_em 1.0.4 (GPL-3.0, from its PyPI sdist), fetched at bench
time into $STEMD_BENCH_CACHE (default ~/.cache/stemd-bench); never committed.
Writes the "## Real data (bench/real.py)" section of OUT/benchmarks.md and OUT/real_<frame>.png.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: no backend or global state needed to write a PNG

from bench import classical
from bench._report import BENCHMARKS, machine_line, write_section
from bench.peers import tk_r_em_bridge
from stemd.compute.fidelity import (
    CEILING_DB,
    FLAT_LIMITS,
    HF_BAND,
    MF_BAND,
    REFERENCE_SIGMAS,
    GainFit,
    correlated,
    dilate,
    fit_gain_offset,
    gain_db,
    gaussian_held_out,
    mse,
    noise_flatness,
    saturated_mask,
    thin,
    to_counts,
)
from stemd.compute.scanlines import scan_lines
from stemd.compute.selfcheck import BLENDS, MAX_SHIFT, registered_mse
from stemd.pipeline import Denoiser
from stemd.sim.scenes import named_frame

TITLE = "Real data (bench/real.py)"
CALIBRATION_FRAME = "exp_hrstem_4"  # low dose, a ~26 px lattice, no pixel size: shown as is and self-calibrated
SDIST = "tk_r_em-1.0.4.tar.gz"
REQUIREMENT = "tk-r-em==1.0.4"
MEMBERS = ("exp_hrstem.h5", "sgl_exp_hrstem.h5")  # under tk_r_em-1.0.4/tk_r_em/test_data/
SATURATION = 65535  # uint16 detector maximum: excluded from fits and scores
SIM_KINDS = ("perovskite_rp", "interface", "vacuum_edge")
SIM_JITTERED = ("interface",)  # ... also recorded with line jitter (SIM_JITTER_PX rms): the truth is the scene without
SIM_JITTER_PX = 0.2
SIM_GAIN, SIM_OFFSET, SIM_READ = 40.0, 500.0, 8.0  # raw units per count, raw offset, raw read noise (std)
SIM_DOSE = 60.0  # counts per unit of the clean scene (column peak 1): half-dose frames at 30
SEED = 20_260_501
KNOBS_TITLE = "Real data: pipeline knobs (bench/real.py --knobs)"
KNOBS: dict[str, dict[str, object]] = {  # Denoiser settings per row of the knob sweep
    "as shipped": {}, "self_check on": {"self_check": True}, "dejitter 0": {"dejitter": 0},
    "planar off": {"planar": False}, "destripe off": {"destripe": False}, "outliers off": {"outliers": False},
    "recover off": {"recover": False},
    "flips (4 passes)": {"flips": True}, "adapt 300 (fine-tune on the frame)": {"adapt": 300}}
ADAPT_STEPS = 300  # the main table's 'stemd adapt' (model.adapt)
FACTORS = (0.7, 0.85, 1.2, 1.4)  # the knob sweep's resampling factors, times the planned one


# ---------------------------------------------------------------- data


def cache_dir() -> Path:
    """Where fetched data live: $STEMD_BENCH_CACHE or ~/.cache/stemd-bench."""
    return Path(os.environ.get("STEMD_BENCH_CACHE") or Path.home() / ".cache" / "stemd-bench")


def fetch_sdist(cache: Path, sdist: Path | None = None) -> Path:
    """The tk_r_em 1.0.4 sdist: `sdist` if given, else the cached copy, else `pip download` into the cache."""
    if sdist is not None:
        return sdist
    path = cache / SDIST
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", REQUIREMENT, "--no-deps", "--no-binary", ":all:",
               "-d", str(cache)]
        print("fetching", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return path


def load_real_frames(cache: Path, sdist: Path | None = None) -> dict[str, np.ndarray]:
    """tk_r_em's experimental HRSTEM frames by name (exp_hrstem_0..4, sgl_exp_hrstem), uint16 2D arrays."""
    folder = cache / "tk_r_em_test_data"
    if not all((folder / m).is_file() for m in MEMBERS):
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fetch_sdist(cache, sdist)) as tar:
            for m in MEMBERS:
                member = tar.getmember(f"tk_r_em-1.0.4/tk_r_em/test_data/{m}")
                src = tar.extractfile(member)
                if src is None:
                    raise RuntimeError(f"{m}: not a file in the sdist")
                (folder / m).write_bytes(src.read())
    frames: dict[str, np.ndarray] = {}
    for m in MEMBERS:
        with h5py.File(folder / m, "r") as h5:
            data = np.asarray(h5["x"][()])
        stem = m.removesuffix(".h5")
        stack = data.reshape(-1, *data.shape[-2:])
        for i, frame in enumerate(stack):
            frames[stem if len(stack) == 1 else f"{stem}_{i}"] = frame
    return frames


def central_crop(image: np.ndarray, size: int | None) -> np.ndarray:
    """The central size x size crop (the whole frame when it is smaller or size is None)."""
    if size is None:
        return image
    h, w = image.shape
    top, left = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return image[top:top + size, left:left + size]


# ---------------------------------------------------------------- detector model and splitting


# ---------------------------------------------------------------- scores


# ---------------------------------------------------------------- methods


Method = Callable[[np.ndarray], np.ndarray]  # half A in counts -> the estimate of its mean, in counts


def make_methods(denoisers: dict[str, Denoiser], bm3d: bool, tk_r_em: bool,
                 blends: dict[str, list[float]] | None = None,
                 verdicts: dict[str, list[str]] | None = None) -> dict[str, Method]:
    """The methods that need only half A (Gaussian is chosen with half B and handled apart): each labelled
    stemd configuration (the blend its plan's self-check chose appended to `blends[label]`, its fine-tune's
    verdict to `verdicts[label]`), then the peers."""
    def stemd(label: str, den: Denoiser) -> Method:
        def run(y: np.ndarray) -> np.ndarray:
            x = y.astype(np.float32)
            plan = den.plan(x.shape, None, x)
            if blends is not None:
                blends.setdefault(label, []).append(plan.blend)
            if verdicts is not None and plan.adapted != "no":
                verdicts.setdefault(label, []).append(plan.adapted)
            out: np.ndarray = den(x, plan=plan)
            return out
        return run

    methods: dict[str, Method] = {label: stemd(label, den) for label, den in denoisers.items()}
    if bm3d:
        methods["Anscombe+BM3D"] = lambda y: classical.bm3d_denoise(y.astype(np.float64))
    if tk_r_em:
        methods["tk_r_em"] = lambda y: tk_r_em_bridge.restore(y[None].astype(np.float32))[0][0]
    return methods


# ---------------------------------------------------------------- one frame


@dataclass
class FrameResult:
    """One frame's gain/offset fit, noise flag and per-method held-out gains (one entry per split)."""

    name: str
    shape: tuple[int, int]
    fit: GainFit
    flatness: tuple[float, float]
    mean_counts: float
    lines: str = "rows"  # the scan-line axis the frame shows (stemd.compute.scanlines), registered along
    plain: dict[str, list[float]] = field(default_factory=dict)  # dB
    registered: dict[str, list[float]] = field(default_factory=dict)  # dB
    true: dict[str, list[float]] = field(default_factory=dict)  # dB against the truth (simulated frames)
    sigmas: list[float] = field(default_factory=list)  # the Gaussian's chosen sigma per split
    blends: dict[str, list[float]] = field(default_factory=dict)  # stemd's self-check blend per split, by label
    verdicts: dict[str, list[str]] = field(default_factory=dict)  # stemd's fine-tune verdict per split, by label
    shown: dict[str, np.ndarray] = field(default_factory=dict)  # split 0: half A, outputs, half B

    @property
    def flagged(self) -> bool:
        return correlated(self.flatness)


def evaluate(name: str, raw: np.ndarray, methods: dict[str, Method], splits: int,
             seed: int, truth_raw: np.ndarray | None = None, saturation: float | None = SATURATION) -> FrameResult:
    """Fit gain/offset, split `splits` times, run every method on half A, score against half B.

    With `truth_raw` (the noise-free frame in raw units, simulated frames) the true half-dose error
    is scored too, against the truth in the fitted count units, halved."""
    fit = fit_gain_offset(raw, saturation)
    counts = to_counts(raw, fit)
    mask = ~dilate(saturated_mask(raw, saturation), 3)
    flatness = noise_flatness(np.where(mask, raw, np.median(raw)))
    filled = np.where(mask, raw, np.median(raw)).astype(np.float32)
    lines = scan_lines(torch.as_tensor(filled))[0]
    res = FrameResult(name, raw.shape, fit, flatness, float(counts[mask].mean()), lines)
    for split in range(splits):
        rng = np.random.default_rng([seed, split])
        y1i, y2i = thin(counts, rng)
        y1, y2 = y1i.astype(np.float64), y2i.astype(np.float64)
        outs: dict[str, np.ndarray] = {"half A": y1}
        gauss, sigma = gaussian_held_out(y1, y2, mask)
        res.sigmas.append(sigma)
        outs["Gaussian"] = gauss
        for label, method in methods.items():
            t0 = time.perf_counter()
            outs[label] = np.asarray(method(y1), np.float64)
            print(f"  {name} split {split}: {label} {time.perf_counter() - t0:.1f} s", flush=True)
        ref, ref_reg = mse(y1, y2, mask), registered_mse(y1, y2, mask, lines)
        if truth_raw is not None:
            half_truth = 0.5 * (truth_raw - fit.offset) / fit.gain
            ref_true = mse(y1, half_truth, mask)
        for label, out in outs.items():
            if label == "half A":
                continue
            res.plain.setdefault(label, []).append(gain_db(ref, mse(out, y2, mask)))
            res.registered.setdefault(label, []).append(gain_db(ref_reg, registered_mse(out, y2, mask, lines)))
            if truth_raw is not None:
                res.true.setdefault(label, []).append(gain_db(ref_true, mse(out, half_truth, mask)))
        if split == 0:
            res.shown = {**outs, "half B": y2}
    return res


# ---------------------------------------------------------------- simulated validation


def simulated_frame(kind: str, size: int, seed: int, gain: float = SIM_GAIN, offset: float = SIM_OFFSET,
                    read: float = SIM_READ, dose: float = SIM_DOSE, jitter_px: float = 0.0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(raw uint16 frame, its noise-free mean in raw units): a named scene counted as Poisson at `dose` (no line
    artefacts but line jitter of `jitter_px` rms), through a detector with `gain` (raw units per count), `offset`
    and Gaussian read noise `read`; the mean is the scene's without jitter."""
    noisy, scene, _ = named_frame(kind, (size, size), seed=seed, dose=dose, gain_cv=0.0, read_sigma=0.0,
                                  line_jitter_px=jitter_px, line_gain=0.0, line_offset=0.0)
    counts = np.rint(noisy.astype(np.float64) * dose)
    rng = np.random.default_rng([seed, 7])
    raw = gain * counts + offset + read * rng.standard_normal(counts.shape)
    mean = gain * scene.clean.astype(np.float64) * dose + offset
    return np.clip(np.rint(raw), 0, SATURATION).astype(np.uint16), mean


def ranking(scores: dict[str, list[float]]) -> list[str]:
    """Methods from best to worst by mean gain."""
    return sorted(scores, key=lambda k: -float(np.mean(scores[k])))


def pair_agreement(split: dict[str, list[float]], true: dict[str, list[float]],
                   tie_db: float = 0.05) -> tuple[int, int]:
    """(agreeing, compared) method pairs: the split orders a pair as the truth does; pairs within
    `tie_db` of each other in true gain are ties and not compared."""
    names = list(true)
    agree = total = 0
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            dt = float(np.mean(true[a]) - np.mean(true[b]))
            if abs(dt) <= tie_db:
                continue
            total += 1
            agree += int(np.sign(np.mean(split[a]) - np.mean(split[b])) == np.sign(dt))
    return agree, total


# ---------------------------------------------------------------- report


def pm(values: list[float]) -> str:
    """mean ± spread (half the range over splits)."""
    v = np.asarray(values)
    return f"{v.mean():.2f} ± {(v.max() - v.min()) / 2:.2f}"


def frame_table(results: list[FrameResult], labels: list[str]) -> str:
    """Per frame: the fit, the flag, and each method's held-out gain (plain / line-registered)."""
    head = ("| frame | px | gain (raw/count) | offset (raw) | mean counts | noise HF/MF rows, cols | scan lines | "
            "split valid | " + " | ".join(labels) + " |")
    lines = [head, "|" + "---|" * (8 + len(labels))]
    for r in results:
        cells = [f"{pm(r.plain[k])} / {pm(r.registered[k])}" if k in r.plain else "—" for k in labels]
        valid = "**no: correlated noise**" if r.flagged else "yes"
        lines.append(f"| {r.name} | {r.shape[0]}² | {r.fit.gain:.1f} | {r.fit.offset:.0f} | {r.mean_counts:.1f} | "
                     f"{r.flatness[0]:.2f}, {r.flatness[1]:.2f} | {r.lines} | {valid} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def validation_table(results: list[FrameResult], labels: list[str]) -> str:
    """Simulated frames: the fit against the known detector, and split vs true gains and rankings."""
    lines = ["| frame | gain fit (true) | offset fit (true eff.) | method | split gain dB | registered dB "
             "| true gain dB |",
             "|---|---|---|---|---|---|---|"]
    eff = SIM_OFFSET - SIM_READ**2 / SIM_GAIN
    for r in results:
        for i, k in enumerate(k for k in labels if k in r.plain):
            fit = (f"{r.fit.gain:.2f} ({SIM_GAIN:g})", f"{r.fit.offset:.1f} ({eff:.1f})") if i == 0 else ("", "")
            lines.append(f"| {r.name if i == 0 else ''} | {fit[0]} | {fit[1]} | {k} | {pm(r.plain[k])} | "
                         f"{pm(r.registered[k])} | {pm(r.true[k])} |")
    lines += ["", "| frame | ranking by split | ranking by truth | pairs agreeing (plain / registered) |",
              "|---|---|---|---|"]
    for r in results:
        (agree, total), (agree_reg, _) = pair_agreement(r.plain, r.true), pair_agreement(r.registered, r.true)
        lines.append(f"| {r.name} | {' > '.join(ranking(r.plain))} | {' > '.join(ranking(r.true))} | "
                     f"{agree}/{total} / {agree_reg}/{total} |")
    return "\n".join(lines)


def montage(res: FrameResult, path: Path, crop: int = 160) -> None:
    """half A | stemd | tk_r_em (or —) | half B, central crop, one grey scale (half B's 1-99.5 %)."""
    panels = ["half A", "stemd", "tk_r_em", "half B"]
    shown = {k: central_crop(v, crop) for k, v in res.shown.items()}
    lo, hi = np.percentile(shown["half B"], [1, 99.5])
    fig = Figure(figsize=(8, 2.3))
    axes = fig.subplots(1, 4)
    for ax, key in zip(axes, panels):
        ax.set_axis_off()
        ax.set_title(key, fontsize=9)
        if key in shown:
            ax.imshow(shown[key], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        else:
            ax.text(0.5, 0.5, "—", ha="center", va="center", fontsize=20, transform=ax.transAxes)
    fig.suptitle(f"{res.name} ({min(crop, res.shape[0])}² of {res.shape[0]}², half dose, counts)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


# ---------------------------------------------------------------- knob sweep


def knob_sweep(frames: dict[str, np.ndarray], crop: int, seed: int) -> dict[str, dict[str, tuple[float, float]]]:
    """{row: {frame: (plain, registered) held-out gain dB}} on split 0 of each frame with a valid split (the same
    split `evaluate` draws first): stemd with one setting changed (KNOBS), its resampling factor scaled (FACTORS,
    self-check off), and, as an upper bound no pipeline reaches, the blend with the input chosen on half B."""
    dens = {label: Denoiser.load(**opts) for label, opts in KNOBS.items()}  # type: ignore[arg-type]
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    for i, (name, frame) in enumerate(frames.items()):
        for label, cells in knob_rows(central_crop(frame, crop), seed + i, dens).items():
            rows.setdefault(label, {})[name] = cells
        print(f"  knobs {name} done", flush=True)
    return rows


def knob_rows(raw: np.ndarray, seed: int, dens: dict[str, Denoiser]) -> dict[str, tuple[float, float]]:
    """One frame's knob sweep (`knob_sweep`); empty when its split is not valid (correlated noise)."""
    fit = fit_gain_offset(raw, SATURATION)
    mask = ~dilate(saturated_mask(raw, SATURATION), 3)
    filled = np.where(mask, raw, np.median(raw))
    if correlated(noise_flatness(filled)):
        return {}
    lines = scan_lines(torch.as_tensor(filled.astype(np.float32)))[0]
    y1i, y2i = thin(to_counts(raw, fit), np.random.default_rng([seed, 0]))
    y1, y2 = y1i.astype(np.float64), y2i.astype(np.float64)
    ref, ref_reg = mse(y1, y2, mask), registered_mse(y1, y2, mask, lines)

    def score(out: np.ndarray) -> tuple[float, float]:
        return gain_db(ref, mse(out, y2, mask)), gain_db(ref_reg, registered_mse(out, y2, mask, lines))

    x = y1.astype(np.float32)
    rows = {label: score(den(x).astype(np.float64)) for label, den in dens.items()}
    alone = dens["as shipped"]
    plan = alone.plan(x.shape, None, x)
    for f in FACTORS:
        rows[f"resampling x{f:g} (self-check off)"] = score(
            alone(x, plan=replace(plan, factor=plan.factor * f)).astype(np.float64))
    model = alone(x, plan=plan).astype(np.float64)
    blends = {w: score(w * model + (1 - w) * y1) for w in BLENDS}
    w = max(blends, key=lambda k: blends[k][0])
    rows["blend with the input, weight chosen on half B (bound)"] = blends[w]
    rows["its weight"] = (w, w)
    return rows


def knob_table(rows: dict[str, dict[str, tuple[float, float]]]) -> str:
    """The knob sweep's rows by frame, plain / registered dB (the weight row: the model's weight)."""
    names = list(next(iter(rows.values()), {}))
    lines = ["| stemd, split 0 | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, cells in rows.items():
        fmt = (lambda v: f"{v[0]:g}") if label.strip() == "its weight" else (lambda v: f"{v[0]:.2f} / {v[1]:.2f}")
        lines.append(f"| {label} | " + " | ".join(fmt(cells[n]) for n in names) + " |")
    return "\n".join(lines)


def knobs_main(args: argparse.Namespace, command: str) -> int:
    """--knobs: the knob sweep on the experimental frames, written as its own section."""
    start = time.perf_counter()
    doc = args.out / "benchmarks.md" if args.out else BENCHMARKS
    frames = load_real_frames(args.cache or cache_dir(), args.sdist)
    rows = knob_sweep(frames, args.crop, args.seed)
    body = "\n".join([
        f"Machine: {machine_line()}. Command: `{command}` ({(time.perf_counter() - start) / 60:.1f} min).", "",
        "What the pipeline's own settings do on the experimental frames (valid splits only, central "
        f"{args.crop}² crops, split 0 of `python -m bench.real`): held-out gain in dB, plain / line-registered, of "
        "stemd with one setting changed; its resampling factor scaled around the planned one (self-check off); and "
        "the blend of the model's output with its input whose weight is chosen on half B itself (an upper bound: "
        "the self-check chooses it on a further split of half A).", "", knob_table(rows)])
    print(body)
    write_section(doc, KNOBS_TITLE, body)
    print(f"wrote {doc}")
    return 0


# ---------------------------------------------------------------- main


def calibration_figure(raw: np.ndarray, path: Path, side: int = 256) -> None:
    """raw | stemd as is (`calibrate` off) | stemd measuring the frame's lattice (the default): the low-dose
    frame x[4], whose ~26 px lattice lies outside the model's range and which carries no pixel size."""
    panels = {"raw (no pixel size)": raw.astype(np.float64),
              "stemd, run as is": Denoiser.load(calibrate=False)(raw),
              "stemd, lattice measured in the frame": Denoiser.load()(raw)}
    fig = Figure(figsize=(12, 4.3))
    for i, (title, image) in enumerate(panels.items()):
        ax = fig.add_subplot(1, 3, i + 1)
        part = image[:side, :side]
        ax.imshow(part, cmap="gray", vmin=np.percentile(part, 1), vmax=np.percentile(part, 99.5))
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.real", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: one frame, 128² crop, one split, no BM3D")
    p.add_argument("--sim-only", action="store_true", help="simulated frames only (no download)")
    p.add_argument("--crop", type=int, default=512, help="central crop side of each frame (px)")
    p.add_argument("--splits", type=int, default=3, help="random binomial splits per frame")
    p.add_argument("--no-bm3d", action="store_true", help="leave out Anscombe+BM3D (slow on few cores)")
    p.add_argument("--sdist", type=Path, default=None, help=f"a local {SDIST} (default: cache, else pip download)")
    p.add_argument("--cache", type=Path, default=None,
                   help="data cache (default $STEMD_BENCH_CACHE or ~/.cache/stemd-bench)")
    p.add_argument("--sim-size", type=int, default=256, help="side of the simulated validation frames (px)")
    p.add_argument("--out", type=Path, default=None, help="write OUT/benchmarks.md and OUT/real_*.png (default: docs/)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--adapt-steps", type=int, default=ADAPT_STEPS,
                   help=f"steps of the 'stemd adapt' method's fine-tune (model.adapt; default {ADAPT_STEPS}, quick 10)")
    p.add_argument("--knobs", action="store_true",
                   help="instead: stemd's settings swept on the experimental frames (its own section)")
    args = p.parse_args(argv)
    if args.quick:
        args.crop, args.splits, args.no_bm3d, args.sim_size, args.adapt_steps = 128, 1, True, 128, 10
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    command = " ".join(["python -m bench.real", *(sys.argv[1:] if argv is None else argv)])
    if args.knobs:
        return knobs_main(args, command)
    out_dir = args.out or BENCHMARKS.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = out_dir / "benchmarks.md" if args.out else BENCHMARKS
    tk = tk_r_em_bridge.available()
    blends: dict[str, list[float]] = {}
    verdicts: dict[str, list[str]] = {}
    methods = make_methods({"stemd": Denoiser.load(), "stemd self_check": Denoiser.load(self_check=True),
                            "stemd dejitter=0": Denoiser.load(dejitter=0),
                            "stemd recover=0": Denoiser.load(recover=False),
                            "stemd adapt": Denoiser.load(adapt=args.adapt_steps)}, not args.no_bm3d, tk, blends,
                           verdicts)
    labels = ["stemd", "stemd self_check", "stemd dejitter=0", "stemd recover=0", "stemd adapt", "Gaussian"] + [
        k for k in ("Anscombe+BM3D", "tk_r_em") if k in methods]

    real: list[FrameResult] = []
    if not args.sim_only:
        frames = load_real_frames(args.cache or cache_dir(), args.sdist)
        if args.quick:
            frames = dict(list(frames.items())[:1])
        for i, (name, frame) in enumerate(frames.items()):
            res = evaluate(name, central_crop(frame, args.crop), methods, args.splits, args.seed + i)
            res.blends, res.verdicts = dict(blends), dict(verdicts)
            blends.clear()
            verdicts.clear()
            real.append(res)
            montage(res, out_dir / f"real_{name}.png")
            print(frame_table([res], labels), flush=True)
        if CALIBRATION_FRAME in frames:
            calibration_figure(central_crop(frames[CALIBRATION_FRAME], args.crop), out_dir / "real_x4_calibration.png")

    sims: list[FrameResult] = []
    cases = [(kind, 0.0) for kind in SIM_KINDS] + [(kind, SIM_JITTER_PX) for kind in SIM_JITTERED]
    for i, (kind, jitter) in enumerate(cases[:1] if args.quick else cases):
        raw, truth = simulated_frame(kind, args.sim_size, args.seed + 100 + i, jitter_px=jitter)
        name = f"sim {kind}" + (f", {jitter:g} px line jitter" if jitter else "")
        sims.append(evaluate(name, raw, methods, args.splits, args.seed + 200 + i, truth_raw=truth))
        sims[-1].blends = dict(blends)
        blends.clear()
        print(validation_table(sims[-1:], labels), flush=True)
    if args.sim_only:
        montage(sims[0], out_dir / "real_sim.png")

    body = report(real, sims, labels, command, tk, args, time.perf_counter() - start)
    print(body)
    write_section(doc, TITLE, body)
    print(f"wrote {doc}")
    return 0


def report(real: list[FrameResult], sims: list[FrameResult], labels: list[str], command: str, tk: bool,
           args: argparse.Namespace, seconds: float) -> str:
    """The section's markdown."""
    parts = [
        f"Machine: {machine_line()}. Command: `{command}` ({seconds / 60:.1f} min).",
        "",
        "Split-dose evaluation (no clean truth needed): the counts y of each frame, from a gain/offset fitted "
        "to the frame itself, are thinned into two independent half-dose frames (y1 ~ Binomial(y, ½), "
        "y2 = y − y1); each method denoises half A and is scored against half B. Cells: held-out gain "
        "10·log10(MSE(y1, y2) / MSE(f(y1), y2)) in dB, mean ± half-range over "
        f"{args.splits} split(s), plain / line-registered (each output line, along the frame's scan lines, shifted "
        f"by ≤ {MAX_SHIFT} px and given the offset that fits it onto the target's line first: jitter and stripes "
        f"that both halves share are not signal). A perfect denoiser scores {CEILING_DB:.2f} dB. Gaussian: σ from "
        f"{REFERENCE_SIGMAS} with the lowest held-out error. Saturated pixels (≥ {SATURATION}) are "
        "left out of fits and scores. tk_r_em: " + ("run." if tk else "its venv is absent here, not run (—)."),
        "",
        f"Noise HF/MF: median noise power at {HF_BAND} over {MF_BAND} cycles/px along rows and along "
        f"columns; independent pixel noise gives ≈ 1. A frame outside {FLAT_LIMITS} has correlated noise "
        "(drift-corrected, resampled or processed data): the thinned halves are then not independent, its "
        "split is **not a valid ranking**, and its numbers are shown for the record only.",
    ]
    if real:
        parts += ["", f"### Experimental frames (tk_r_em 1.0.4 test data, central {args.crop}² crops)", "",
                  frame_table(real, labels), "",
                  "Gaussian σ chosen: " + ", ".join(f"{r.name} {'/'.join(f'{s:g}' for s in r.sigmas)}" for r in real)
                  + ".",
                  "The self-check's blend (`model.self_check`, off by default; the model output's weight, the rest "
                  "its input; one per split): "
                  + ", ".join(f"{r.name} {'/'.join(f'{b:g}' for b in r.blends.get('stemd self_check', []))}"
                              for r in real) + ".",
                  f"`stemd adapt`: the fine-tune on the frame (`model.adapt {args.adapt_steps}`, off by default), its "
                  "verdict per split: " + "; ".join(f"{r.name} {', '.join(r.verdicts.get('stemd adapt', []))}"
                                                   for r in real) + ".",
                  "Montages: " + ", ".join(f"`real_{r.name}.png`" for r in real)
                  + " (half A | stemd | tk_r_em | half B)."]
    parts += ["", f"### Validation on simulated frames ({args.sim_size}², truth known)", "",
              f"Named scenes at {SIM_DOSE:g} counts per unit (half dose {SIM_DOSE / 2:g}), no line artefacts, "
              f"through a detector with gain {SIM_GAIN:g}, offset {SIM_OFFSET:g} and read noise σ {SIM_READ:g} "
              "(raw units; the effective offset folds the read noise in: offset − σ²/gain). True gain: "
              "10·log10(MSE(y1, x/2) / MSE(f(y1), x/2)) against the clean frame x in counts. The split should "
              "rank methods as the truth does (pairs closer than 0.05 dB in truth are ties). "
              f"{', '.join(SIM_JITTERED)} is also recorded with {SIM_JITTER_PX:g} px rms line jitter, the truth the "
              "scene without it: both halves share the jitter, so the plain split counts it as signal and ranks a "
              "method that undoes it too low; the registered score neither rewards nor penalises undoing it.", "",
              validation_table(sims, labels)]
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
