"""Multislice test frames from a simulator that is not stemd's own: abTEM HAADF images of SrTiO3 [001].

    python -m bench.multislice                 # doses 5 15 60 200, two 512² frames each (~6 min, BM3D included)
    python -m bench.multislice --quick         # dose 60 only, one 256² frame, no BM3D

stemd's model is trained on stemd.sim's scenes (Gaussian columns), so its lead measured on those is not
evidence about real column shapes: probe tails, channelling, thermal diffuse background. abTEM (GPL-3.0, its
own venv like tk_r_em's: bench/peers/README.md) simulates one unit cell's scan (bench/peers/abtem_runner.py),
cached with the real data; a periodic crystal needs no more, so every frame is that cell's image evaluated as a
trigonometric series at any period, rotation and offset (exact for a band-limited image sampled above its
Nyquist rate), Poisson counts at a dose (counts at the brightest column). Methods as in bench.faithfulness:
stemd, Anscombe + BM3D, the Gaussian filter at its best σ (oracle), tk_r_em when its venv exists. PSNR (peak
1) after each output's least-squares gain and offset onto the clean frame.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import classical
from bench._report import BENCHMARKS, ROOT, machine_line, write_section
from bench.peers import tk_r_em_bridge
from bench.real import cache_dir, make_methods
from stemd.compute import metrics
from stemd.pipeline import Denoiser

TITLE = "Multislice frames (bench/multislice.py)"
RUNNER = ROOT / "bench" / "peers" / "abtem_runner.py"
CELL_FILE = "abtem_srtio3_cell.npz"
DOSES = (5.0, 15.0, 60.0, 200.0)
PERIOD_PX = 11.3  # SrTiO3's 0.3905 nm at 34.6 pm per pixel: inside the model's trained range, off the integers
ROTATION_DEG = 9.0
SOURCE_FWHM_A = 0.5  # the electron source's effective size (partial spatial coherence), a Gaussian blur
SEED = 20_261_203


def default_venv() -> Path:
    """Where abTEM lives: $ABTEM_VENV or <repo>/.venv-abtem (`python -m venv` + `pip install abtem`)."""
    return Path(os.environ.get("ABTEM_VENV") or ROOT / ".venv-abtem")


def cell_image(cache: Path, venv: Path | None = None) -> tuple[np.ndarray, dict]:
    """One unit cell's HAADF scan (row = y) and its settings: from the cache, else run abTEM once (minutes)."""
    path = cache / CELL_FILE
    if not path.is_file():
        python = (venv or default_venv()) / "bin" / "python"
        if not python.is_file():
            raise SystemExit(f"error: no cached {path.name} and no abTEM venv at {python.parent.parent} "
                             "(set ABTEM_VENV; bench/peers/README.md)")
        cache.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        done = subprocess.run([str(python), str(RUNNER), str(path)], capture_output=True, text=True, env=env)
        if done.returncode != 0 or not path.is_file():
            raise SystemExit(f"error: abTEM run failed: {done.stderr.strip()[-500:]}")
    with np.load(path) as data:
        return np.asarray(data["image"], np.float64), json.loads(str(data["settings"]))


def render(cell: np.ndarray, shape: tuple[int, int], period_px: float, rotation_deg: float,
           offset: tuple[float, float] = (0.0, 0.0), source: float = 0.0) -> np.ndarray:
    """The periodic crystal whose unit cell `cell` samples (n x n, row = y), at `period_px` per cell, turned by
    `rotation_deg`, shifted by `offset` (cells), blurred by a Gaussian source of std `source` (cells): its
    Fourier series evaluated at every pixel, peak scaled to 1."""
    n = cell.shape[0]
    k = np.fft.fftfreq(n, 1.0 / n)
    coef = np.fft.fft2(cell) / cell.size * np.exp(-2 * (np.pi * source) ** 2 * (k[:, None] ** 2 + k[None, :] ** 2))
    if n % 2 == 0:  # the Nyquist term, split evenly between +n/2 and -n/2 (the series stays real)
        coef[n // 2, :] /= 2
        coef[:, n // 2] /= 2
        coef = np.concatenate([coef, coef[n // 2:n // 2 + 1]], 0)
        coef = np.concatenate([coef, coef[:, n // 2:n // 2 + 1]], 1)
        k = np.concatenate([k, [-k[n // 2]]])
    t = np.deg2rad(rotation_deg)
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    u = (np.cos(t) * yy - np.sin(t) * xx) / period_px + offset[0]
    v = (np.sin(t) * yy + np.cos(t) * xx) / period_px + offset[1]
    ey = np.exp(2j * np.pi * k[:, None, None] * u[None])
    out = np.zeros(shape)
    for j, kx in enumerate(k):
        out += np.real(np.einsum("a,ahw->hw", coef[:, j], ey) * np.exp(2j * np.pi * kx * v))
    out -= out.min()
    return out / out.max()


def score(estimate: np.ndarray, clean: np.ndarray) -> float:
    return metrics.psnr(metrics.fit_scale(estimate, clean), clean, data_range=1.0)


def run(args: argparse.Namespace) -> tuple[str, dict]:
    cell, settings = cell_image(args.cache or cache_dir())
    tk = not args.no_tkrem and tk_r_em_bridge.available()
    chosen = make_methods({"stemd": Denoiser.load(device="cpu")}, not args.no_bm3d, tk)
    labels = ["raw", "Gaussian (best σ, oracle)", *chosen]
    psnr: dict[tuple[str, float], list[float]] = {}
    shown: dict[str, np.ndarray] = {}
    for s in range(args.frames):
        rng = np.random.default_rng([SEED, s])
        source = SOURCE_FWHM_A / 2.3548 / settings["lattice_A"]
        clean = render(cell, (args.size, args.size), PERIOD_PX, ROTATION_DEG + 20 * s, tuple(rng.uniform(0, 1, 2)),
                       source)
        for dose in args.doses:
            counts = np.random.default_rng([SEED, s, int(dose * 1000)]).poisson(clean * dose).astype(np.float64)
            outs = {"raw": counts, "Gaussian (best σ, oracle)": classical.gaussian_best(counts, clean)[0]}
            for label, method in chosen.items():
                t0 = time.perf_counter()
                outs[label] = np.asarray(method(counts), np.float64)
                print(f"  frame {s} dose {dose:g}: {label} {time.perf_counter() - t0:.1f} s", flush=True)
            for label, est in outs.items():
                psnr.setdefault((label, dose), []).append(score(est, clean))
            if s == 0 and dose == args.doses[len(args.doses) // 2]:
                shown = {"clean": clean, **outs}
    rows = ["| method | " + " | ".join(f"dose {d:g}" for d in args.doses) + " |",
            "|---|" + "---:|" * len(args.doses)]
    for label in labels:
        best = [max(np.mean(psnr[(m, d)]) for m in labels) for d in args.doses]
        cells = []
        for d, b in zip(args.doses, best):
            v = float(np.mean(psnr[(label, d)]))
            cells.append(f"**{v:.2f}**" if v == b else f"{v:.2f}")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    lead = [float(np.mean(psnr[("stemd", d)]) - np.mean(psnr[("Anscombe+BM3D", d)])) for d in args.doses] \
        if ("Anscombe+BM3D", args.doses[0]) in psnr else []
    return "\n".join(rows), {"settings": settings, "lead": lead, "shown": shown, "tk": tk}


def figure(shown: dict[str, np.ndarray], path: Path, dose: float, crop: int = 96) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown), 2.9))
    for ax, (label, img) in zip(axes, shown.items()):
        ax.imshow(img[:crop, :crop], cmap="gray")
        ax.set_title(label if len(label) < 22 else label.split(" (")[0], fontsize=9)
        ax.axis("off")
    fig.suptitle(f"abTEM SrTiO3 [001], Poisson counts at dose {dose:g}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.multislice", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="dose 60, one 256² frame, no BM3D")
    p.add_argument("--doses", type=float, nargs="+", default=list(DOSES))
    p.add_argument("--frames", type=int, default=2, help="frames per dose (each its own rotation and offset)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--no-bm3d", action="store_true")
    p.add_argument("--no-tkrem", action="store_true")
    p.add_argument("--cache", type=Path, default=None, help="data cache (default: bench.real's)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.doses, args.frames, args.size, args.no_bm3d = [60.0], 1, 256, True
    if args.frames < 1 or args.size < 64 or any(not d > 0 for d in args.doses):
        p.error("need --frames >= 1, --size >= 64 and positive --doses")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    table, info = run(args)
    s = info["settings"]
    command = " ".join(["python -m bench.multislice", *(sys.argv[1:] if argv is None else argv)])
    lead = ", ".join(f"{v:+.2f}" for v in info["lead"])
    body = (
        f"Measured {time.strftime('%Y-%m-%d')} on {machine_line()} by `{command}` "
        f"({(time.perf_counter() - start) / 60:.1f} min).\n\n"
        f"**Frames.** abTEM {s['abtem']} multislice HAADF of SrTiO3 [001] ({s['energy_kv']} kV, "
        f"{s['semiangle_mrad']} mrad probe, detector {s['detector_mrad'][0]}–{s['detector_mrad'][1]} mrad, "
        f"{s['thickness_A'] / 10:.1f} nm thick, {s['frozen_phonons']} frozen-phonon configurations, a "
        f"{SOURCE_FWHM_A} Å FWHM source), one cell scanned at {s['probes_per_cell']}² probe positions "
        f"(`bench/peers/abtem_runner.py`), rendered at "
        f"{PERIOD_PX} px per cell, rotated, {args.size}², {args.frames} frame(s) per dose, Poisson counts with "
        f"the brightest column at the dose. PSNR (dB, peak 1) after a least-squares gain and offset; best "
        f"per dose in bold.\n\n" + table
        + (f"\n\nstemd − Anscombe+BM3D per dose: {lead} dB." if lead else "")
        + "\n\n![clean / raw / Gaussian / stemd / BM3D on abTEM frames](multislice.png)"
    )
    print(body)
    if not args.no_write:
        write_section(BENCHMARKS, TITLE, body)
        figure(info["shown"], BENCHMARKS.parent / "multislice.png", args.doses[len(args.doses) // 2])
        print(f"wrote {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
