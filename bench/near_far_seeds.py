"""Near/far column error at the RP fault over several seeds: how much the faithfulness bench's one frame says.

    python -m bench.near_far_seeds                  # seeds 0-3, doses 2, 5, 20 (~3 min on 2 cores)
    python -m bench.near_far_seeds --seeds 8 --doses 2,5
    python -m bench.near_far_seeds --seeds 1 --doses 20 --size 256   # smoke run (seconds)

The faithfulness bench scores one seeded RP frame per dose. By the fault only four column planes count as
"near", and with the planar-defect guide each plane's error is mostly one offset shared along it, so the
near RMS of one frame is a small sample. This prints, for the shipped conv model with and without the
planar guide, the near / far RMS (pm) of each seed's perovskite_rp frame (512², or --size) and of all seeds' columns
pooled. Prints only; nothing is written.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bench import faithfulness as fb
from stemd.pipeline import Denoiser
from stemd.sim import scenes


def errors(out: np.ndarray, scene: scenes.Scene) -> tuple[np.ndarray, np.ndarray]:
    """Squared position errors (pm²) of the near and the far columns that both fits found."""
    radii = fb.fit_radii(scene.columns, scene.params["phases"][0]["period_px"])
    ref = fb.fit_all(scene.clean.astype(np.float64), scene.columns, radii, scene.params["target_sigma_px"])
    fits = fb.fit_all(np.asarray(out, np.float64), scene.columns, radii, scene.params["target_sigma_px"])
    e2 = np.sum(((fits.centres - ref.centres) * fb.pm_per_px(scene)) ** 2, axis=1)
    groups = fb.column_groups(scene)
    ok = fits.ok & ref.ok
    return e2[groups["near"] & ok], e2[groups["far"] & ok]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 (0 is the faithfulness bench's frame)")
    p.add_argument("--doses", type=lambda s: [float(v) for v in s.split(",")], default=[2.0, 5.0, 20.0])
    p.add_argument("--size", type=int, default=512, help="frame side in px (default 512, the faithfulness bench's)")
    args = p.parse_args(argv)
    models = {"conv": Denoiser.load(device="cpu"), "conv no planar guide": Denoiser.load(device="cpu", planar=False)}
    print("| dose | model | " + " | ".join(f"seed {s}" for s in range(args.seeds)) + " | pooled |")
    print("|---:|---|" + "---:|" * (args.seeds + 1))
    for dose in args.doses:
        frames = [scenes.named_frame("perovskite_rp", (args.size, args.size), seed=fb.FRAME_SEED + s, dose=dose)
                  for s in range(args.seeds)]
        for name, den in models.items():
            cells, near_all, far_all = [], [], []
            for noisy, scene, _ in frames:
                near, far = errors(den(noisy), scene)
                near_all.append(near)
                far_all.append(far)
                cells.append(
                    f"{np.sqrt(near.mean()):.1f} / {np.sqrt(far.mean()):.1f} = {np.sqrt(near.mean() / far.mean()):.2f}"
                )
            near, far = np.concatenate(near_all), np.concatenate(far_all)
            cells.append(
                f"{np.sqrt(near.mean()):.1f} / {np.sqrt(far.mean()):.1f} = **{np.sqrt(near.mean() / far.mean()):.2f}**"
            )
            print(f"| {dose:g} | {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
