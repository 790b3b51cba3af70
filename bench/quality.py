"""Measured quality: the paper's Figure 2 protocol, and stemd against classical denoisers on frames.

    python -m bench.quality                             # full run (~10 min on 2 cores)
    python -m bench.quality --quick --out /tmp/quality  # smoke run: fewer windows, one dose, 128² frames

Writes the "## Quality" section of OUT/benchmarks.md (other sections kept), OUT/figure2.png and
OUT/frames.png. Everything is seeded; the test data never share a seed stream with training.

1. Figure 2: independent 28×28 windows at the paper's noise (uniform, SNR 0.33), through the
   model's forward pass directly (windows are on the clean scale, as in training).
2. Frames: one simulated frame with a Ruddlesden–Popper fault, Poisson noise at several doses,
   with and without fast-scan artefacts. Every method sees the same noisy frames, in detector
   counts; each output is mapped onto the clean frame's scale by `metrics.fit_scale` before PSNR,
   SSIM and the column fits.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench._report import ROOT, machine_line, write_section
from bench.classical import GAUSS_SIGMAS, bm3d_denoise, gaussian_best, nlm
from stemd.compute import metrics
from stemd.errors import StemdError
from stemd.models.checkpoint import PAPER_AE_PATH, load_checkpoint
from stemd.pipeline import Denoiser
from stemd.sim import lattice as synthetic

WINDOW_SEED = 20_240_001  # training uses seed streams derived from its own seed (stemd.apps.training)
FRAME_SEED = 20_240_002
BACKGROUND = 0.1  # flat signal under the lattice, fraction of the brightest column
ARTEFACTS = dict(line_jitter_px=0.5, line_gain=0.05, line_offset=0.03)
ROTATION_DEG = 8.0
EDGE_MARGIN = 5  # px: columns closer to the border are not fitted
METHODS = ("raw", "gaussian", "nlm", "bm3d", "stemd")
LABELS = {"raw": "no denoising", "gaussian": "Gaussian (best σ)", "nlm": "NLM", "bm3d": "BM3D", "stemd": "stemd"}


# ---------------------------------------------------------------- the paper's Figure 2 protocol


@dataclass
class WindowResult:
    n: int
    error_noisy: float
    error_model: float
    psnr_noisy: float
    psnr_model: float
    examples: tuple[np.ndarray, np.ndarray, np.ndarray]  # noisy, denoised, clean (8, 28, 28)


@torch.no_grad()
def window_protocol(model: torch.nn.Module, n: int, seed: int, batch: int = 2000) -> WindowResult:
    """Per-pixel error (%) and PSNR of noisy and denoised windows against the clean ones."""
    rng = np.random.default_rng(seed)
    noise = synthetic.NoiseSpec(kind="uniform", snr=0.33)
    window = getattr(model, "window", synthetic.PAPER_WINDOW)
    clean = synthetic.clean_windows(n, rng, size=window)
    noisy = synthetic.corrupt(clean, noise, rng)
    flat = torch.from_numpy(noisy.reshape(n, -1))
    out = np.concatenate([model(flat[i : i + batch]).numpy() for i in range(0, n, batch)]).reshape(clean.shape)
    k = min(8, n)
    return WindowResult(
        n=n,
        error_noisy=metrics.mean_abs_error_percent(noisy, clean, data_range=1.0),
        error_model=metrics.mean_abs_error_percent(out, clean, data_range=1.0),
        psnr_noisy=metrics.psnr(noisy, clean, data_range=1.0),
        psnr_model=metrics.psnr(out, clean, data_range=1.0),
        examples=(noisy[:k], out[:k], clean[:k]),
    )


def timed(fn: Callable[[], np.ndarray], repeats: int) -> tuple[np.ndarray, float]:
    """(output of the last call, median wall time in s over `repeats` calls)."""
    times, out = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


# ---------------------------------------------------------------- simulated frames


@dataclass(frozen=True)
class Truth:
    """The clean frame, which of its columns are fitted, the fit radius and the defect region."""

    sim: synthetic.SimFrame
    cols: np.ndarray  # (N,) bool over sim.columns
    radius: float
    defect: np.ndarray  # (H, W) bool: pixels within one period of a near-defect column


def truth_for(sim: synthetic.SimFrame, period: float, radius_frac: float) -> Truth:
    h, w = sim.clean.shape
    c = sim.columns
    cols = np.all((c >= EDGE_MARGIN) & (c <= np.array([h, w]) - 1 - EDGE_MARGIN), axis=1)
    yy, xx = np.mgrid[:h, :w]
    defect = np.zeros((h, w), bool)
    for y, x in c[sim.near_defect]:
        defect |= (yy - y) ** 2 + (xx - x) ** 2 <= period**2
    return Truth(sim, cols, radius_frac * period, defect)


@dataclass
class Score:
    psnr: float
    psnr_defect: float
    ssim: float
    rms_all: float
    rms_tio: float
    rms_defect: float
    failed: float  # fraction of column fits that failed
    seconds: float | None
    note: str = ""


@dataclass
class FrameSet:
    dose: float
    artefacts: bool
    scores: dict[str, Score] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # on the clean scale

    @property
    def name(self) -> str:
        return f"dose {self.dose:g}" + (", scan artefacts" if self.artefacts else "")


def score(image: np.ndarray, truth: Truth, seconds: float | None, note: str = "") -> Score:
    """PSNR, SSIM and column-position errors of an image already on the clean frame's scale."""
    sim, cols = truth.sim, truth.cols
    fits = metrics.fit_columns(image, sim.columns[cols], radius=truth.radius)
    tio = sim.intensities[cols] < 1.0
    near = sim.near_defect[cols]
    rms = lambda sel: metrics.column_rms_error(fits.centres[sel], sim.columns[cols][sel], fits.ok[sel])  # noqa: E731
    return Score(
        psnr=metrics.psnr(image, sim.clean, data_range=1.0),
        psnr_defect=metrics.psnr(image[truth.defect], sim.clean[truth.defect], data_range=1.0)
        if truth.defect.any()
        else float("nan"),
        ssim=metrics.ssim(image, sim.clean, data_range=1.0),
        rms_all=rms(np.ones(len(tio), bool)),
        rms_tio=rms(tio),
        rms_defect=rms(near),
        failed=float(1.0 - fits.ok.mean()),
        seconds=seconds,
        note=note,
    )


def warm_up(denoiser: Denoiser) -> None:
    """Run every method once on a small frame, so imports and first-call set-up are not timed."""
    from scipy.ndimage import gaussian_filter

    counts = np.random.default_rng(0).poisson(5.0, (64, 64)).astype(np.float64)
    gaussian_filter(counts, 1.0)
    nlm(counts)
    bm3d_denoise(counts)
    denoiser(counts.astype(np.float32))


def frame_set(truth: Truth, dose: float, artefacts: bool, denoiser: Denoiser, seed: int, repeats: int) -> FrameSet:
    """One noisy frame (in counts) through every method; scores on the clean scale."""
    sim = truth.sim
    rng = np.random.default_rng(seed)
    noise = synthetic.NoiseSpec(kind="poisson", dose=dose, background=BACKGROUND, **(ARTEFACTS if artefacts else {}))
    counts = ((synthetic.corrupt(sim.clean, noise, rng) + BACKGROUND) * dose).astype(np.float64)
    result = FrameSet(dose, artefacts)

    def add(name: str, out: np.ndarray, seconds: float | None, note: str = "") -> None:
        scaled = metrics.fit_scale(out, sim.clean)
        result.outputs[name] = scaled
        result.scores[name] = score(scaled, truth, seconds, note)

    add("raw", counts, None)
    _, sigma = gaussian_best(counts, sim.clean)
    from scipy.ndimage import gaussian_filter

    out, t = timed(lambda: gaussian_filter(counts, sigma), repeats)
    add("gaussian", out, t, f"σ = {sigma:g} px")
    out, t = timed(lambda: nlm(counts), repeats)
    add("nlm", out, t)
    out, t = timed(lambda: bm3d_denoise(counts), 1)
    add("bm3d", out, t)
    out, t = timed(lambda: denoiser(counts.astype(np.float32)), repeats)
    add("stemd", out, t, f"step {denoiser.step}")
    return result


# ---------------------------------------------------------------- report


def _f(x: float, digits: int = 2) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    ms = 1000 * seconds
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.2g}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def frames_table(sets: list[FrameSet], floor: Score, bias: Score) -> str:
    head = (
        "| set | method | PSNR (dB) | PSNR near defect (dB) | SSIM | column RMS, all (px) | TiO (px) | near defect "
        "(px) | fits failed | time / frame (ms) | note |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )
    rows = [
        f"| clean frame | (fit floor) | – | – | – | {_f(floor.rms_all, 3)} | {_f(floor.rms_tio, 3)} | "
        f"{_f(floor.rms_defect, 3)} | "
        f"{floor.failed:.1%} | – | the fit's own bias on the noise-free frame |",
        f"| noise-free input | stemd | {_f(bias.psnr)} | {_f(bias.psnr_defect)} | {_f(bias.ssim, 3)} | "
        f"{_f(bias.rms_all, 3)} | "
        f"{_f(bias.rms_tio, 3)} | {_f(bias.rms_defect, 3)} | {bias.failed:.1%} | – | the model's own bias: no noise at "
        "all |",
    ]
    for s in sets:
        best_psnr = max(s.scores, key=lambda m: s.scores[m].psnr)
        for m in METHODS:
            sc = s.scores[m]
            psnr = _f(sc.psnr)
            if m == best_psnr:
                psnr = f"**{psnr}**"
            rows.append(
                f"| {s.name} | {LABELS[m]} | {psnr} | {_f(sc.psnr_defect)} | {_f(sc.ssim, 3)} | {_f(sc.rms_all, 3)} | "
                f"{_f(sc.rms_tio, 3)} | "
                f"{_f(sc.rms_defect, 3)} | {sc.failed:.1%} | {_ms(sc.seconds)} | {sc.note} |"
            )
    return head + "\n".join(rows) + "\n"


def findings(win: WindowResult, sets: list[FrameSet], floor: Score, bias: Score) -> str:
    """The issue's goals checked, and every place where a peer beats stemd, from the numbers above."""
    goal = "meets" if win.error_model < 10.0 else "does NOT meet"
    lines = [
        f"- Figure 2 protocol: {win.error_model:.2f}% per-pixel error, which {goal} the goal of beating the paper's "
        "≈10%."
    ]
    lost = [s.name for s in sets if s.scores["stemd"].psnr <= s.scores["gaussian"].psnr]
    if lost:
        lines.append(f"- stemd's PSNR is NOT above the best-σ Gaussian filter on: {'; '.join(lost)}.")
    else:
        lines.append("- stemd's PSNR is above the best-σ Gaussian filter on every simulated set.")
    worse = [s for s in sets if s.scores["stemd"].rms_defect > s.scores["raw"].rms_defect]
    if worse:
        lines.append(
            f"- Near the defect, stemd's column positions are further from the truth than the raw frame's in "
            f"{len(worse)}/{len(sets)} sets: "
            + "; ".join(
                f"{s.name}: {s.scores['stemd'].rms_defect:.2f} vs {s.scores['raw'].rms_defect:.2f} px" for s in worse
            )
            + f" (clean-frame floor {floor.rms_defect:.3f} px)."
        )
    lines.append(
        f"- On the noise-free frame stemd reaches {bias.psnr:.2f} dB PSNR ({_f(bias.psnr_defect)} dB near the defect) "
        "and "
        f"moves columns by {bias.rms_all:.3f} px RMS ({bias.rms_defect:.3f} px near the defect): its own bias, which "
        "no dose removes."
    )
    checks = (
        ("psnr", "PSNR", 1),
        ("psnr_defect", "PSNR near the defect", 1),
        ("ssim", "SSIM", 1),
        ("rms_all", "column RMS", -1),
        ("rms_defect", "column RMS near the defect", -1),
    )
    for peer in ("bm3d", "nlm", "gaussian"):
        parts = []
        for metric, label, sign in checks:
            wins = [
                s.name
                for s in sets
                if sign * (getattr(s.scores[peer], metric) - getattr(s.scores["stemd"], metric)) > 0
            ]
            if wins:
                parts.append(f"{label} in {len(wins)}/{len(sets)} sets ({'; '.join(wins)})")
        verdict = "beats stemd on " + ", on ".join(parts) if parts else "beats stemd on none of these metrics"
        lines.append(f"- {LABELS[peer]} {verdict}.")
    return "\n".join(lines)


def describe_training_noise(meta: dict) -> str:
    """The checkpoint's training noise in words (its `noise` and any `noise_mix`)."""

    def one(n: dict) -> str:
        if n.get("kind") == "uniform":
            text = f"uniform noise at SNR {n.get('snr')}"
        elif n.get("kind") == "poisson":
            text = f"Poisson noise at dose {n.get('dose'):g}"
        else:
            text = f"{n.get('kind', '?')} noise"
        arts = [f"{k} {n[k]:g}" for k in ("line_jitter_px", "line_gain", "line_offset", "read_sigma") if n.get(k)]
        return text + (f" ({', '.join(arts)})" if arts else "")

    noises = [meta["noise"]] if isinstance(meta.get("noise"), dict) else []
    noises += [n for n in meta.get("noise_mix", []) if isinstance(n, dict)]
    return "; ".join(one(n) for n in noises) if noises else "unrecorded noise"


def report(
    args: argparse.Namespace,
    win: WindowResult,
    sets: list[FrameSet],
    floor: Score,
    bias: Score,
    denoiser: Denoiser,
    n_columns: int,
) -> str:
    """The markdown body of the "## Quality" section."""
    meta, size = denoiser.metadata, args.size
    model_path = "stemd/models/paper_ae.pt (shipped)" if args.model == PAPER_AE_PATH else str(args.model)
    threads = torch.get_num_threads()
    poisson_trained = any(
        isinstance(n, dict) and n.get("kind") == "poisson" for n in [meta.get("noise"), *meta.get("noise_mix", [])]
    )
    parts = [
        ("**Quick smoke run, not the reference numbers.**\n\n" if args.quick else "")
        + f"Measured {datetime.date.today().isoformat()} on {machine_line()} ({threads} torch threads), "
        f"by `{args.command}` (seeded; the run took {_duration(args.elapsed_s)}). "
        f"Model: `{model_path}`, id `{denoiser.model_id}`, hidden {meta.get('hidden', '?')}, trained by "
        f"`{meta.get('command', 'unknown')}` on {describe_training_noise(meta)}. "
        "Metric definitions: `stemd/metrics.py`.",
        "### The paper's Figure 2 protocol\n\n"
        f"{win.n:,} independent 28×28 windows (seed {args.seed + WINDOW_SEED}, a stream training never draws) of the "
        "paper's lattice with its uniform noise at SNR 0.33 (σ_noise = S / 0.33, S the clean lattice's standard "
        "deviation; see docs/noise.md), through the model's forward pass. Per-pixel error = mean |pred − clean| "
        "over all pixels, in % of the clean maximum (1.0); PSNR with peak 1.0 over all pixels.\n\n"
        "| | per-pixel error (%) | PSNR (dB) |\n|---|---:|---:|\n"
        f"| noisy input | {win.error_noisy:.2f} | {win.psnr_noisy:.2f} |\n"
        f"| stemd | {win.error_model:.2f} | {win.psnr_model:.2f} |\n"
        "| paper (Buban & Choi) | ≈ 10 | – |\n\n"
        "![Figure 2: noisy / denoised / clean windows](figure2.png)",
        f"### Simulated {size}×{size} frames\n\n"
        f"One clean frame (`synthetic.simulate_frame`: 10 px lattice rotated {ROTATION_DEG:g}°, Ruddlesden–Popper "
        "fault "
        f"through the centre, {n_columns} columns fitted) with a flat background of {BACKGROUND:g}, Poisson "
        "noise at each dose (expected counts at the brightest column), optionally with fast-scan artefacts "
        f"(line jitter {ARTEFACTS['line_jitter_px']} px rms, line gain flicker {ARTEFACTS['line_gain']:.0%}, "
        f"line offset flicker {ARTEFACTS['line_offset']} of the peak). Every method gets the same frame in counts; "
        "its output is mapped onto the clean frame by a least-squares gain/offset (`fit_scale`, the same oracle "
        "for all) before scoring. PSNR/SSIM with data range 1.0 (the clean peak); PSNR near the defect: over the "
        "pixels within one period of a "
        "column flagged `near_defect`. Column RMS: distance between "
        "the true position and a 2D Gaussian fitted within "
        f"{args.radius_frac:g}·period of it (columns ≥ {EDGE_MARGIN} px from the border; failed fits excluded "
        "and counted). Times: wall time per frame, median of "
        f"{args.repeats} runs after a warm-up, except BM3D (one run); the Gaussian time excludes the σ search; stemd "
        f"on {denoiser.device.type}.\n\n"
        "Methods: **Gaussian** — `scipy.ndimage.gaussian_filter` with the σ from "
        f"{list(GAUSS_SIGMAS)} that maximises PSNR against the clean frame (an oracle advantage no real user has); "
        "**NLM** — `skimage.restoration.denoise_nl_means` (patch 5, distance 6, fast mode, h = 0.8σ) on the "
        "Anscombe-transformed counts with σ from `estimate_sigma`; **BM3D** — `bm3d.bm3d` (both stages) on the "
        "Anscombe-transformed counts with the known σ = 1, closed-form unbiased inverse Anscombe; these "
        "variance-stabilised variants beat the same filters applied to raw counts by 1–4 dB PSNR in a trial on this "
        "lattice (not rerun here). "
        "NLM and BM3D assume white noise: the row-wise flicker of the artefact sets is outside their noise model "
        "(BM3D's "
        "coloured-noise PSD option is not used), which is part of why they fall behind there. "
        f"**stemd** — `stemd.Denoiser` with the model above (step {denoiser.step}, "
        "per-frame robust normalisation). Bold: best PSNR of the set."
        + (
            " The model's training mix includes Poisson noise with scan artefacts (see above): these frames are "
            "independent draws, not an unseen kind of noise."
            if poisson_trained
            else ""
        )
        + "\n\n"
        + frames_table(sets, floor, bias)
        + "\n![Frames: raw / Gaussian / NLM / BM3D / stemd / clean](frames.png)",
        "### Findings\n\n" + findings(win, sets, floor, bias),
    ]
    return "\n\n".join(parts)


# ---------------------------------------------------------------- figures


def figure2(win: WindowResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noisy, out, clean = win.examples
    k = len(clean)
    fig, axes = plt.subplots(3, k, figsize=(1.3 * k, 4.2), squeeze=False)
    for j in range(k):
        for i, (img, lim) in enumerate(((noisy[j], None), (out[j], (0, 1)), (clean[j], (0, 1)))):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", vmin=lim[0] if lim else None, vmax=lim[1] if lim else None)
            ax.set_xticks([])
            ax.set_yticks([])
    for i, label in enumerate(("noisy", "denoised", "clean")):
        axes[i, 0].set_ylabel(label)
    fig.suptitle(
        f"Independent test windows, uniform noise SNR 0.33: error {win.error_model:.1f}% (noisy "
        f"{win.error_noisy:.1f}%)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frames_figure(sets: list[FrameSet], clean: np.ndarray, centre: np.ndarray, path: Path, crop: int = 128) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = clean.shape
    crop = min(crop, h, w)
    y0 = int(np.clip(round(centre[0]) - crop // 2, 0, h - crop))
    x0 = int(np.clip(round(centre[1]) - crop // 2, 0, w - crop))
    sl = (slice(y0, y0 + crop), slice(x0, x0 + crop))
    rows = [*METHODS, "clean"]
    fig, axes = plt.subplots(len(rows), len(sets), figsize=(2.3 * len(sets) + 0.8, 2.3 * len(rows)), squeeze=False)
    for j, s in enumerate(sets):
        for i, m in enumerate(rows):
            img = clean if m == "clean" else s.outputs[m]
            ax = axes[i, j]
            ax.imshow(img[sl], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if m != "clean":
                ax.set_title(f"{s.scores[m].psnr:.1f} dB", fontsize=8)
            if j == 0:
                ax.set_ylabel("clean" if m == "clean" else LABELS[m], fontsize=9)
        axes[0, j].set_title(f"{s.name}\n{s.scores['raw'].psnr:.1f} dB", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 500 windows, one dose, 128² frames")
    p.add_argument(
        "--out", type=Path, default=ROOT / "docs", help="folder for benchmarks.md and the PNGs (default docs/)"
    )
    p.add_argument(
        "--model", type=Path, default=PAPER_AE_PATH, help="a window_ae checkpoint (default: the shipped paper AE)"
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="device for stemd (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="offset added to the fixed test seeds")
    p.add_argument("--windows", type=int, default=None, help="test windows (default 10000; quick 500)")
    p.add_argument("--size", type=int, default=None, help="frame side in px (default 512; quick 128)")
    p.add_argument("--doses", type=float, nargs="+", default=None, help="Poisson doses (default 5 20 80; quick 20)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per method (default 3; quick 1)")
    p.add_argument("--radius-frac", type=float, default=0.35, help="column-fit radius as a fraction of the period")
    args = p.parse_args(argv)
    args.windows = args.windows or (500 if args.quick else 10_000)
    args.size = args.size or (128 if args.quick else 512)
    args.doses = args.doses or ([20.0] if args.quick else [5.0, 20.0, 80.0])
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.windows < 1 or args.size < 56 or any(d <= 0 for d in args.doses) or args.repeats < 1:
        p.error("need --windows >= 1, --size >= 56, positive --doses and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    args.command = " ".join(["python -m bench.quality", *(sys.argv[1:] if argv is None else argv)])
    args.out.mkdir(parents=True, exist_ok=True)
    model, meta = load_checkpoint(args.model)
    if model.arch().get("name") != "window_ae":
        raise SystemExit(
            f"bench.quality: the Figure 2 protocol needs a window_ae model, got {model.arch().get('name')!r}"
        )
    denoiser = Denoiser(model, meta, device=args.device)

    t0 = time.perf_counter()
    win = window_protocol(model, args.windows, args.seed + WINDOW_SEED)
    print(f"Figure 2 protocol, {win.n} windows: error {win.error_noisy:.2f}% -> {win.error_model:.2f}%, "
          f"PSNR {win.psnr_noisy:.2f} -> {win.psnr_model:.2f} dB ({time.perf_counter() - t0:.1f} s)", flush=True)
    figure2(win, args.out / "figure2.png")

    rng = np.random.default_rng(args.seed + FRAME_SEED)
    size = args.size
    sim = synthetic.simulate_frame(
        (size, size), rng, rotation_deg=ROTATION_DEG, offset_px=tuple(rng.uniform(0, 10, 2)), defect="rp"
    )
    truth = truth_for(sim, synthetic.PAPER_PERIOD_PX, args.radius_frac)
    floor = score(sim.clean.astype(np.float64), truth, None)
    noise_free = ((sim.clean + BACKGROUND) * max(args.doses)).astype(np.float32)
    bias = score(metrics.fit_scale(denoiser(noise_free), sim.clean), truth, None)

    warm_up(denoiser)
    sets = []
    for i, dose in enumerate(args.doses):
        for j, art in enumerate((False, True)):
            t0 = time.perf_counter()
            s = frame_set(truth, dose, art, denoiser, args.seed + FRAME_SEED + 1 + 2 * i + j, args.repeats)
            sets.append(s)
            line = "  ".join(f"{m} {s.scores[m].psnr:.2f}" for m in METHODS)
            print(f"{s.name}: PSNR {line}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    mid = args.doses[len(args.doses) // 2]
    shown = [s for s in sets if s.dose == mid]
    centre = sim.columns[sim.near_defect].mean(axis=0) if sim.near_defect.any() else np.array([size / 2, size / 2])
    frames_figure(shown, sim.clean, centre, args.out / "frames.png")

    args.elapsed_s = time.perf_counter() - start
    body = report(args, win, sets, floor, bias, denoiser, int(truth.cols.sum()))
    print("\n" + frames_table(sets, floor, bias) + "\n" + findings(win, sets, floor, bias))
    write_section(args.out / "benchmarks.md", "Quality", body)
    print(f"wrote {args.out / 'benchmarks.md'} (## Quality), {args.out / 'figure2.png'}, {args.out / 'frames.png'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StemdError as exc:
        print(f"bench.quality: {exc}", file=sys.stderr)
        sys.exit(2)
