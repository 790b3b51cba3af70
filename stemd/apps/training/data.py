"""Training and validation data, keyed by (seed, stream, position) so a resumed run sees what a whole one would.

Window AE: synthetic lattice windows (`stemd.sim.lattice.training_batches`), one stream per noise model.
Conv U-Net: patches of realistic scenes (`scene_patches`), recorded and normalised whole as `Denoiser` sees frames.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from stemd.compute.columns import keep_columns
from stemd.compute.dejitter import dejitter as undo_jitter
from stemd.compute.fourier import bragg_filter, noise_level
from stemd.compute.normalize import mean_and_signal_std, normalize
from stemd.compute.outliers import outlier_mask, repair
from stemd.compute.sampling import measure_lattice
from stemd.compute.scanlines import destripe, scan_lines
from stemd.config import ConvSettings, TrainSettings
from stemd.sim import scenes
from stemd.sim.lattice import NoiseSpec, training_batches

TRAIN_STREAM, VAL_STREAM = 0, 1
DOSES_PER_SCENE = 4  # training recordings of each random scene
PATCHES_PER_DOSE = 4  # patches cut from each recording
EDGE_FRACTION = 0.25  # along each axis, the chance that a patch touches its scene's edge
# the scenes `reference_levels` measures: the mix the first conv models were trained on, so the reference (a
# convention every later fine-tune inherits) stays put when the training mix widens
REFERENCE_SCENES: dict[str, Any] = {
    "layouts": ("perfect", "rp", "interface", "grain_boundary", "amorphous", "vacuum", "mixed"),
    "dopant_frac": 0.0, "lighter_frac": 0.0, "adatom_frac": 0.0, "partial_intensity": (0.2, 0.6),
}
HOT_CHANCE = 0.5  # the chance that a training recording has hot pixels
HOT_FRAC = (0.0, 3e-4)  # then the fraction of its pixels that are hot, uniform
HOT_OVER_TOP = (1.5, 10.0)  # and each one's value over the recording's 99.9th percentile, uniform


@dataclass
class ValidationSet:
    """Fixed validation samples (windows flattened, or scenes (n, 1, H, W)) evaluated `batch` at a time;
    `parts[j]` are those `labels[j]` describes (a noise model, or a dose range); `inputs`: the model's
    auxiliary inputs per sample (keyword name -> tensor), as the pipeline computes them."""

    noisy: torch.Tensor
    clean: torch.Tensor
    parts: list[slice]
    labels: list[dict[str, Any]] = field(default_factory=list)
    batch: int = 4096
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


def stream_seed(seed: int, *key: int) -> int:
    """An independent data seed for (run seed, stream, sample position[, noise model])."""
    return int(np.random.SeedSequence([seed, *key]).generate_state(1)[0])


def noise_specs(settings: TrainSettings) -> list[NoiseSpec]:
    """The run's `stemd.sim.lattice.NoiseSpec`s: `noise` first, then each of `noise_mix`."""
    return [NoiseSpec.from_settings(n) for n in (settings.noise, *settings.noise_mix)]


def _shares(n: int, k: int) -> list[int]:
    return [n // k + (j < n % k) for j in range(k)]


def window_streams(
    settings: TrainSettings, n: int, batch: int, *key: int
) -> list[Iterator[tuple[np.ndarray, np.ndarray]]]:
    """One `training_batches` stream per noise model, sharing `n` windows; model j > 0 adds j to the seed key."""
    specs = noise_specs(settings)
    return [
        training_batches(share, batch, spec, stream_seed(settings.seed, *key, *((j,) if j else ())),
                         **settings.lattice.model_dump())
        for j, (spec, share) in enumerate(zip(specs, _shares(n, len(specs))))
    ]


@functools.lru_cache(maxsize=8)
def reference_levels(
    period_px: tuple[float, float], n: int = 200, size: int = 256, seed: int = 7
) -> tuple[float, float]:
    """Median (mean, signal std) of clean random scenes (REFERENCE_SCENES): the `normalize` reference a conv model
    is trained at."""
    rng = np.random.default_rng(seed)
    clean = np.stack([scenes.random_scene((size, size), rng, period_px=period_px, **REFERENCE_SCENES).clean
                      for _ in range(n)])
    mean, signal, _ = mean_and_signal_std(clean)
    return float(np.median(mean)), float(np.median(signal))


def hot_pixels(raw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`raw` with, at chance HOT_CHANCE, a HOT_FRAC share of its pixels made hot (HOT_OVER_TOP x its 99.9th
    percentile): detector outliers, some too faint for `outlier_mask`, that the model must not take for signal."""
    if rng.random() >= HOT_CHANCE:
        return raw
    n = int(rng.uniform(*HOT_FRAC) * raw.size)
    out = raw.copy()
    flat = out.reshape(-1)
    flat[rng.choice(raw.size, n, replace=False)] = float(np.quantile(raw, 0.999)) * rng.uniform(*HOT_OVER_TOP, n)
    return out


class Recording(NamedTuple):
    """A prepared recording: the (1, 1, H, W) normalised frame, the lo/hi it was normalised by, and its measured
    lattice scale (px; None: no lattice), as `Denoiser.plan` records it."""

    frame: torch.Tensor
    lo: float
    hi: float
    scale_px: float | None


def prepare_recording(raw: np.ndarray, reference: tuple[float, float], dejitter_rounds: int) -> Recording:
    """A raw (H, W) recording as `Denoiser` prepares a frame for the model (`run`, `plan`): outliers repaired,
    line offset flicker taken out when `scan_lines` finds stripes, normalised at `reference`, and, if the frame
    shows a lattice, de-jittered `dejitter_rounds` rounds along its scan lines."""
    x = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))[None]
    x = repair(x, outlier_mask(x, None))
    scale = measure_lattice(x[:, None])[0][0]
    lines, stripes = scan_lines(x[0])
    if stripes:
        x = destripe(x, lines)
    y, lo, hi = normalize(x, reference=reference)
    frame = y[:, None]
    if dejitter_rounds and scale is not None:
        frame = (undo_jitter(frame, dejitter_rounds) if lines == "rows"
                 else undo_jitter(frame.transpose(-2, -1), dejitter_rounds).transpose(-2, -1))
    return Recording(frame, float(lo[0]), float(hi[0]), scale)


def recording_guide(rec: Recording) -> torch.Tensor:
    """The lattice guide `Denoiser` gives the model for a prepared recording (without the planar guide, which
    only differs across a planar fault): its `bragg_filter`, stepping aside at the columns the frame contradicts
    (`keep_columns`, when a lattice was measured), as `Denoiser._aux_inputs` does with `keep_defects`."""
    guide = bragg_filter(rec.frame)
    return guide if rec.scale_px is None else keep_columns(rec.frame, guide, rec.scale_px)


def scene_patches(n: int, rng: np.random.Generator, reference: tuple[float, float], conv: ConvSettings, *,
                  doses_per_scene: int = DOSES_PER_SCENE, per_dose: int = PATCHES_PER_DOSE) -> tuple[np.ndarray, ...]:
    """(noisy, [bragg guide,] [level,] clean) for `n` patches of side `conv.patch`, as `Denoiser` feeds a model.

    Arrays are float32 (n, 1, patch, patch); `level` (with `conv.noise_level`) is (n,), the `noise_level` of the
    recording a patch is cut from. Each random scene (`conv.scene_size`, periods `conv.period_px`) is recorded
    whole by `scenes.apply_instrument` at `doses_per_scene` log-uniform doses in `conv.dose`, given `hot_pixels`,
    and prepared whole as the pipeline prepares a frame (`prepare_recording`, `conv.dejitter` rounds), its guide
    taken whole (`recording_guide`), and
    `per_dose` patches cut at random places, touching a scene edge with probability EDGE_FRACTION per axis so
    the model learns the guide's fade at frame borders. The target is the clean scene mapped by the same lo/hi.
    """
    patch, size, dose = conv.patch, conv.scene_size, conv.dose
    guide = conv.guide == "bragg"
    out = [np.empty((n, 1, patch, patch), np.float32) for _ in range(3 if guide else 2)]
    levels = np.empty(n, np.float32)

    def result() -> tuple[np.ndarray, ...]:
        return (*out[:-1], levels, out[-1]) if conv.noise_level else tuple(out)

    done = 0
    while done < n:
        s = scenes.random_scene((size, size), rng, period_px=conv.period_px)
        params = scenes.draw_noise(rng, dose=dose)
        for _ in range(doses_per_scene):
            d = math.exp(rng.uniform(math.log(dose[0]), math.log(dose[1])))
            raw = hot_pixels(scenes.apply_instrument(s.clean, rng, params, dose=d), rng)
            rec = prepare_recording(raw, reference, conv.dejitter)
            frame, lo, hi = rec.frame, rec.lo, rec.hi  # (1, 1, H, W), as the model gets it
            c = (s.clean - np.float32(lo)) / np.float32((hi - lo) or 1.0)
            whole = [frame[0, 0].numpy(), c]
            if guide:
                whole.insert(1, recording_guide(rec)[0, 0].numpy())
            frame_level = float(noise_level(frame)[0]) if conv.noise_level else 0.0
            for _ in range(per_dose):
                if done == n:
                    return result()
                top = rng.integers(0, size - patch + 1, 2)
                edge = rng.random(2) < EDGE_FRACTION
                top[edge] = rng.integers(0, 2, int(edge.sum())) * (size - patch)
                r, q = top
                for o, w in zip(out, whole):
                    o[done, 0] = w[r:r + patch, q:q + patch]
                levels[done] = frame_level
                done += 1
    return result()
