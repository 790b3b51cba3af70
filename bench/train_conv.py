"""Prototype trainer for stemd.convnet.ConvDenoiser on realistic scenes (issue 5).

Scenes from stemd.scenes are corrupted whole at a random dose, normalised whole with
stemd.denoiser.normalize (as `Denoiser` will see a frame), then cut into patches; the target is
the clean scene mapped by the same lo/hi. Adam, cosine decay, a fixed validation set from an
independent seed, best checkpoint kept.

    python bench/train_conv.py --steps 3000 --out runs/conv
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from stemd import __version__, scenes
from stemd.convnet import ConvDenoiser
from stemd.denoiser import _mean_and_signal_std, normalize
from stemd.model import save_checkpoint


def reference_levels(n: int = 200, size: int = 256, seed: int = 7) -> tuple[float, float]:
    """Median (mean, signal std) of clean random scenes: the scale `normalize` maps frames to."""
    rng = np.random.default_rng(seed)
    clean = np.stack([scenes.random_scene((size, size), rng).clean for _ in range(n)])
    mean, signal, _ = _mean_and_signal_std(clean)
    return float(np.median(mean)), float(np.median(signal))


def scene_patches(n: int, patch: int, rng: np.random.Generator, reference: tuple[float, float], *,
                  scene_size: int = 256, doses_per_scene: int = 4, per_dose: int = 4,
                  dose: tuple[float, float] = (2.0, 200.0), period: tuple[float, float] = (6.0, 20.0)):
    """(noisy, clean) float32 (n, 1, patch, patch) in the normalised scale of whole noisy scenes."""
    noisy = np.empty((n, 1, patch, patch), np.float32)
    clean = np.empty_like(noisy)
    done = 0
    while done < n:
        s = scenes.random_scene((scene_size, scene_size), rng, period_px=period)
        params = scenes.draw_noise(rng, dose=dose)
        for _ in range(doses_per_scene):
            d = math.exp(rng.uniform(math.log(dose[0]), math.log(dose[1])))
            frame = scenes.apply_instrument(s.clean, rng, params, dose=d)
            x, lo, hi = normalize(frame[None], reference=reference)
            g = float(hi[0] - lo[0]) or 1.0
            c = (s.clean - np.float32(lo[0])) / np.float32(g)
            for _ in range(per_dose):
                if done == n:
                    return noisy, clean
                r, q = rng.integers(0, scene_size - patch + 1, 2)
                noisy[done, 0] = x[0, r:r + patch, q:q + patch]
                clean[done, 0] = c[r:r + patch, q:q + patch]
                done += 1
    return noisy, clean


def _time(fn, frame: np.ndarray, reps: int = 5) -> float:
    fn(frame)
    return min(_elapsed(fn, frame) for _ in range(reps))


def _elapsed(fn, frame: np.ndarray) -> float:
    t = time.perf_counter()
    fn(frame)
    return time.perf_counter() - t


def quick_check(models: dict[str, Path | None], doses=(5.0, 20.0, 80.0), threads: int = 2) -> None:
    """PSNR (after metrics.fit_scale) and seconds per frame on 512^2 simulate_frame RP-defect frames."""
    from stemd.denoiser import Denoiser
    from stemd.metrics import fit_scale, psnr
    from stemd.synthetic import NoiseSpec, corrupt, simulate_frame

    torch.set_num_threads(threads)
    dens = {name: Denoiser.load(path, device="cpu") for name, path in models.items()}
    print(f"| dose | raw | {' | '.join(dens)} |")
    times: dict[str, float] = {}
    for dose in doses:
        rng = np.random.default_rng(int(dose))
        clean = simulate_frame((512, 512), rng, rotation_deg=7.0, offset_px=(3.3, 1.7), defect="rp").clean
        noisy = corrupt(clean, NoiseSpec(kind="poisson", dose=dose), rng)
        row = [psnr(fit_scale(noisy, clean), clean)]
        for name, den in dens.items():
            row.append(psnr(fit_scale(den(noisy), clean), clean))
            times[name] = min(times.get(name, math.inf), _time(den, noisy))
        print(f"| {dose:g} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    print("seconds per 512^2 frame (%d threads): " % threads + ", ".join(f"{k} {v:.3f}" for k, v in times.items()))


def speed_table(configs: list[tuple[tuple[int, ...], int]], threads: int, reps: int = 8) -> None:
    """Markdown rows: channels, unshuffle, parameters, receptive field, GFLOP and min seconds per 512^2 frame."""
    from torch.utils.flop_counter import FlopCounterMode

    from stemd.model import WindowAE

    torch.set_num_threads(threads)
    x = torch.randn(1, 1, 512, 512)
    rows = {"paper AE 28 px (256, 64), step 2": (WindowAE(28, [256, 64]).eval(), 2)}
    for ch, u in configs:
        rows[f"conv_unet {list(ch)}, unshuffle {u}"] = (ConvDenoiser(ch, u).eval(), 0)
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", default="16,32,48,64")
    p.add_argument("--unshuffle", type=int, default=2)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--patch", type=int, default=96)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--loss", choices=("l1", "l2"), default="l2")
    p.add_argument("--val", type=int, default=48, help="validation scenes (256 px, one dose each)")
    p.add_argument("--pool", type=int, default=64, help="patches generated at once and shuffled")
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine")
    p.add_argument("--out", type=Path, default=Path("runs/conv"))
    p.add_argument("--check", nargs="+", metavar="NAME=CKPT", help="only the quick PSNR/time check of these models")
    p.add_argument("--speed", action="store_true", help="only the speed table of candidate widths")
    a = p.parse_args(argv)
    if a.check:
        quick_check({k: Path(v) for k, v in (c.split("=", 1) for c in a.check)}, threads=a.threads)
        return 0
    if a.speed:
        configs = [((16, 32, 48), 2), ((16, 32, 48, 64), 2), ((24, 32, 48, 64), 2), ((32, 48, 64, 96), 2),
                   ((48, 64, 96, 128), 2), ((16, 24, 32, 48), 1)]
        speed_table(configs, a.threads)
        return 0
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ref = reference_levels()
    vn, vc = scene_patches(a.val, 256, np.random.default_rng([a.seed, 1]), ref, doses_per_scene=1, per_dose=1)
    vn, vc = torch.from_numpy(vn), torch.from_numpy(vc)
    print(f"reference {ref[0]:.4f} {ref[1]:.4f}; validation raw MSE {F.mse_loss(vn, vc):.5f} ({time.perf_counter() - t0:.1f} s)", flush=True)
    model = ConvDenoiser([int(c) for c in a.channels.split(",")], a.unshuffle)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    rng = np.random.default_rng([a.seed, 0])
    lossf = F.l1_loss if a.loss == "l1" else F.mse_loss
    best, history, running, t_data = math.inf, [], math.nan, 0.0
    pool = (np.zeros((0,)), np.zeros((0,)))
    command = "python bench/train_conv.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for step in range(1, a.steps + 1):
        for g in opt.param_groups:
            g["lr"] = a.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (step - 1) / a.steps)))
        td = time.perf_counter()
        if len(pool[0]) < a.batch:
            pn, pc = scene_patches(a.pool, a.patch, rng, ref)
            order = rng.permutation(a.pool)
            pool = (pn[order], pc[order])
        x, y = torch.from_numpy(pool[0][:a.batch]), torch.from_numpy(pool[1][:a.batch])
        pool = (pool[0][a.batch:], pool[1][a.batch:])
        t_data += time.perf_counter() - td
        loss = lossf(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        running = value if math.isnan(running) else 0.98 * running + 0.02 * value
        if step % a.val_every == 0 or step == a.steps:
            model.eval()
            with torch.no_grad():
                mse = float(sum(F.mse_loss(model(vn[i:i + 8]), vc[i:i + 8], reduction="sum") for i in range(0, len(vn), 8)) / vc.numel())
            model.train()
            history.append({"step": step, "train_loss": running, "val_mse": mse})
            meta = {
                "step": 2,
                "arch_note": "fully convolutional U-Net, residual output",
                "normalization": {"mean": ref[0], "signal_std": ref[1]},
                "sampling": {"period_px": [6.0, 20.0]},
                "training_data": "stemd.scenes.random_scene 256 px (all layouts and structures), "
                                 "scenes.apply_instrument at log-uniform dose, whole scene normalised, "
                                 f"{a.patch} px patches",
                "doses": [2.0, 200.0],
                "periods_px": [6.0, 20.0],
                "loss": a.loss, "steps": step, "batch": a.batch, "patch": a.patch, "lr": a.lr, "seed": a.seed,
                "val_mse": mse, "best_val_mse": min(best, mse), "history": history,
                "command": command, "stemd_version": __version__,
            }
            if mse < best:
                best = mse
                save_checkpoint(a.out / "best.pt", model, meta)
            save_checkpoint(a.out / "last.pt", model, meta)
            el = time.perf_counter() - t0
            print(f"step {step}: train {running:.5f} val MSE {mse:.5f} (PSNR {-10 * math.log10(mse):.2f} dB)"
                  f"{' best' if mse <= best else ''}  {el:.0f} s, data {t_data:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
