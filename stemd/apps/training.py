"""`stemd train`: fit the window auto-encoder on synthetic lattice windows generated on the fly.

With `model: conv_unet` it fits `stemd.models.conv_unet.ConvDenoiser` instead, on patches of realistic
scenes (`stemd.models.conv_unet.scene_patches`), validated on whole scenes; the loop, checkpoints and
resume are the same.

`train()` is the pure entry point (settings in, checkpoints and a `TrainResult` out); the CLI wraps it.
A run writes `best.pt` (lowest validation loss) and `last.pt` with `stemd.models.checkpoint.save_checkpoint`, plus
`last.state.pt` beside `last.pt`: optimizer state, samples seen and history, so `--resume` can continue.
The training data stream is keyed by (seed, position), so a run resumed from a validation point
sees exactly the windows an uninterrupted run would have seen.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from stemd import __version__
from stemd.config import TrainSettings, load_train_settings
from stemd.errors import CheckpointError, ConfigError
from stemd.compute import metrics
from stemd.compute.dejitter import dejitter as undo_jitter
from stemd.compute.fourier import bragg_filter, noise_level
from stemd.compute.normalize import mean_and_signal_std, normalize
from stemd.compute.window import window_starts
from stemd.models.checkpoint import load_checkpoint, save_checkpoint
from stemd.models.conv_unet import MIN_SIZE, ConvDenoiser
from stemd.models.window_ae import WindowAE
from stemd.pipeline import Denoiser, resolve_device
from stemd.sim import lattice as synthetic
from stemd.sim import scenes
from stemd.sim.lattice import NoiseSpec, training_batches

DEFAULT_STEP = 2  # the floating-window step in the paper's text; stored in every checkpoint
STATE_FORMAT = "stemd-train-state"
STATE_VERSION = 1
_TRAIN_STREAM, _VAL_STREAM, _EDGE_STREAM = 0, 1, 2
_EVAL_BATCH = 4096
_EVAL_FRAMES = 4  # validation scenes per conv_unet forward pass
_CONV_POOL = 8  # conv_unet: batches generated together from shared scenes, then shuffled
VAL_SCENE_PX = 256  # side of a conv_unet validation scene


@dataclass
class TrainResult:
    """What a run produced; `quality` describes the best checkpoint on the validation set."""

    out: Path
    best_path: Path
    last_path: Path
    samples_seen: int
    best_val_loss: float
    quality: dict[str, float]
    noisy_quality: dict[str, float]  # the same figures for the noisy input itself: the baseline
    history: list[dict[str, float]] = field(default_factory=list)  # one row per validation
    by_noise: list[dict[str, Any]] = field(default_factory=list)  # per noise model: its settings and figures
    start_val_loss: float = math.nan  # validation loss of the weights this call started from
    elapsed_s: float = 0.0
    already_finished: bool = False  # a resumed run that had nothing left to do


# ---------------------------------------------------------------- compute (no I/O)


def stream_seed(seed: int, *key: int) -> int:
    """An independent data seed for (run seed, stream, sample position[, noise model])."""
    return int(np.random.SeedSequence([seed, *key]).generate_state(1)[0])


def noise_specs(settings: TrainSettings) -> list:
    """The run's `stemd.sim.lattice.NoiseSpec`s: `noise` first, then each of `noise_mix`."""

    return [NoiseSpec.from_settings(n) for n in (settings.noise, *settings.noise_mix)]


def lattice_kwargs(settings: TrainSettings) -> dict[str, float]:
    """Keyword arguments for `stemd.sim.lattice.training_batches` describing the lattice."""
    return settings.lattice.model_dump()


def lr_at(settings: TrainSettings, samples_seen: int) -> float:
    """The learning rate after `samples_seen` windows: constant, cosine to 2 %, or halved each quarter,
    ramped up linearly over the first `warmup` samples."""
    t = min(samples_seen / settings.samples, 1.0)
    ramp = min(1.0, (samples_seen + settings.batch_size) / settings.warmup) if settings.warmup else 1.0
    if settings.lr_decay == "cosine":
        return ramp * settings.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * t)))
    if settings.lr_decay == "step":
        return ramp * settings.lr * 0.5 ** min(int(4 * t), 3)
    return ramp * settings.lr


def _shares(n: int, k: int) -> list[int]:
    return [n // k + (j < n % k) for j in range(k)]


def _streams(settings: TrainSettings, n: int, batch: int, *key: int) -> list[Iterator[tuple[np.ndarray, np.ndarray]]]:
    """One `training_batches` stream per noise model, sharing `n` windows; model j > 0 adds j to the seed key."""

    specs = noise_specs(settings)
    return [
        training_batches(share, batch, spec, stream_seed(settings.seed, *key, *((j,) if j else ())), **lattice_kwargs(settings))
        for j, (spec, share) in enumerate(zip(specs, _shares(n, len(specs))))
    ]


def mirror_edges(noisy: np.ndarray, clean: np.ndarray, fraction: float, rng: np.random.Generator) -> None:
    """Reflect a random `fraction` of the (n, w, w) windows in place about a frame edge inside them.

    Such windows are what `stemd.compute.window`'s reflect padding feeds the model along a frame's border:
    the first m columns (or rows, or both at a corner) mirror the content beyond pixel m,
    out[j] = win[|j - m|], m uniform in 1..w-2, on any of the four sides. Noisy and clean windows
    get the same map, so the target is the mirrored clean window.
    """
    n, w = noisy.shape[0], noisy.shape[-1]
    picked = np.flatnonzero(rng.random(n) < fraction)
    sides = rng.integers(0, 8, size=(len(picked), 2))  # per axis: 0-3 none, 4-5 near, 6-7 far
    plain = np.flatnonzero((sides < 4).all(axis=1))  # mirror one random axis of these, on a random side
    sides[plain, rng.integers(0, 2, len(plain))] = rng.integers(4, 8, len(plain))
    depth = rng.integers(1, w - 1, size=(len(picked), 2))
    for axis in (0, 1):
        index = np.abs(np.arange(w)[None, :] - depth[:, axis, None])  # near side: mirror at m
        far = sides[:, axis] >= 6
        index[far] = (w - 1) - index[far][:, ::-1]  # far side: the same, flipped
        keep = sides[:, axis] < 4
        index[keep] = np.arange(w)
        for x in (noisy, clean):
            view = x[picked]
            x[picked] = np.take_along_axis(view, index[:, None, :] if axis else index[:, :, None], axis=2 if axis else 1)


def training_stream(settings: TrainSettings, start: int, stop: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(noisy, clean) batches for samples [start, stop) of the run's data stream, noise models taking turns.

    A share `edge_fraction` of the windows is mirrored about a frame edge (`mirror_edges`).
    For conv_unet: (noisy, [guide,] clean) patch batches from `_conv_stream`.
    """
    if settings.model == "conv_unet":
        yield from _conv_stream(settings, start, stop)
        return
    live = _streams(settings, stop - start, settings.batch_size, _TRAIN_STREAM, start)
    rng = np.random.default_rng(stream_seed(settings.seed, _EDGE_STREAM, start))
    while live:
        for stream in list(live):
            batch = next(stream, None)
            if batch is None:
                live.remove(stream)
                continue
            if settings.edge_fraction > 0:
                mirror_edges(*batch, settings.edge_fraction, rng)
            yield batch


@functools.lru_cache(maxsize=8)
def reference_levels(period_px: tuple[float, float] = (6.0, 20.0), n: int = 200, size: int = 256,
                     seed: int = 7) -> tuple[float, float]:
    """Median (mean, signal std) of clean random scenes: the `normalize` reference a conv model is trained at."""

    rng = np.random.default_rng(seed)
    clean = np.stack([scenes.random_scene((size, size), rng, period_px=period_px).clean for _ in range(n)])
    mean, signal, _ = mean_and_signal_std(clean)
    return float(np.median(mean)), float(np.median(signal))


def scene_patches(n: int, patch: int, rng: np.random.Generator, reference: tuple[float, float], *,
                  guide: bool = True, scene_size: int = 256, doses_per_scene: int = 4, per_dose: int = 4,
                  dose: tuple[float, float] = (2.0, 200.0), period: tuple[float, float] = (6.0, 20.0),
                  edge_fraction: float = 0.25, level: bool = False, dejitter: int = 0) -> tuple[np.ndarray, ...]:
    """(noisy, [bragg guide,] clean) float32 (n, 1, patch, patch), as `Denoiser` feeds a model; with
    `level`, (noisy, [guide,] level, clean), `level` (n,) the `noise_level` of the scene a patch is cut from.
    `dejitter` rounds of `stemd.dejitter` are applied to each normalised recording, as `Denoiser` does.

    Each random scene (`stemd.scenes.random_scene`, every layout and structure) is recorded whole by
    `scenes.apply_instrument` at `doses_per_scene` log-uniform doses; each recording is normalised
    whole (`stemd.compute.normalize.normalize` at `reference`), its `bragg_filter` taken whole, and `per_dose`
    patches cut at random places; along each axis a patch touches a scene edge with probability
    `edge_fraction`, so the model also learns the guide's fade at frame borders. The target is the
    clean scene mapped by the same lo/hi.
    """

    out = [np.empty((n, 1, patch, patch), np.float32) for _ in range(3 if guide else 2)]
    levels = np.empty(n, np.float32)

    def result() -> tuple[np.ndarray, ...]:
        return (*out[:-1], levels, out[-1]) if level else tuple(out)

    done = 0
    while done < n:
        s = scenes.random_scene((scene_size, scene_size), rng, period_px=period)
        params = scenes.draw_noise(rng, dose=dose)
        for _ in range(doses_per_scene):
            d = math.exp(rng.uniform(math.log(dose[0]), math.log(dose[1])))
            x, lo, hi = normalize(scenes.apply_instrument(s.clean, rng, params, dose=d)[None], reference=reference)
            frame = torch.from_numpy(x)[None]  # (1, 1, H, W), as Denoiser hands a frame to the model
            if dejitter:
                frame = undo_jitter(frame, dejitter)
            c = (s.clean - np.float32(lo[0])) / np.float32(float(hi[0] - lo[0]) or 1.0)
            whole = [frame[0, 0].numpy(), c]
            if guide:
                whole.insert(1, bragg_filter(frame)[0, 0].numpy())
            frame_level = float(noise_level(frame)[0]) if level else 0.0
            for _ in range(per_dose):
                if done == n:
                    return result()
                top = rng.integers(0, scene_size - patch + 1, 2)
                edge = rng.random(2) < edge_fraction
                top[edge] = rng.integers(0, 2, int(edge.sum())) * (scene_size - patch)
                r, q = top
                for o, w in zip(out, whole):
                    o[done, 0] = w[r:r + patch, q:q + patch]
                levels[done] = frame_level
                done += 1
    return result()


def _conv_stream(settings: TrainSettings, start: int, stop: int) -> Iterator[tuple[np.ndarray, ...]]:
    """conv_unet patch batches (n, 1, p, p) for samples [start, stop). Patches come in pools of
    _CONV_POOL batches, each keyed by its first sample, so a resumed run sees what a whole one would."""

    c, batch = settings.conv, settings.batch_size
    pool = batch * _CONV_POOL
    reference = reference_levels(c.period_px)
    for first in range(start // pool * pool, stop, pool):
        rng = np.random.default_rng(stream_seed(settings.seed, _TRAIN_STREAM, first))
        data = scene_patches(pool, c.patch, rng, reference, guide=c.guide == "bragg", scene_size=c.scene_size,
                             dose=c.dose, period=c.period_px, level=c.noise_level, dejitter=c.dejitter)
        order = rng.permutation(pool)
        end = min(stop, first + pool)
        for i in range(max(start, first), end, batch):
            take = order[i - first : min(i + batch, end) - first]
            yield tuple(d[take] for d in data)


@dataclass
class ValidationSet:
    """Fixed validation samples (windows flattened, or conv_unet scenes (n, 1, H, W)); `parts[j]` are
    those of noise model j (see `noise_specs`), or of `labels[j]` when given."""

    noisy: torch.Tensor
    clean: torch.Tensor
    parts: list[slice]
    labels: list[dict[str, Any]] = field(default_factory=list)


def _conv_validation(settings: TrainSettings) -> ValidationSet:
    """Whole VAL_SCENE_PX scenes, one per dose spread log-evenly over conv.dose; parts: low, middle, high thirds."""

    c = settings.conv
    reference = reference_levels(c.period_px)
    rng = np.random.default_rng(stream_seed(settings.seed, _VAL_STREAM, 0))
    doses = np.geomspace(c.dose[0], c.dose[1], c.val_scenes)
    noisy, clean = zip(*(scene_patches(1, VAL_SCENE_PX, rng, reference, guide=False, scene_size=VAL_SCENE_PX,
                                       doses_per_scene=1, per_dose=1, dose=(d, d), period=c.period_px,
                                       dejitter=c.dejitter) for d in doses))
    bounds = [round(k * c.val_scenes / 3) for k in range(4)]
    parts = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
    labels = [{"dose": [float(doses[p.start]), float(doses[p.stop - 1])]} for p in parts]
    return ValidationSet(torch.from_numpy(np.concatenate(noisy)), torch.from_numpy(np.concatenate(clean)), parts, labels)


def validation_set(settings: TrainSettings) -> ValidationSet:
    """The validation windows, split evenly over the noise models, from seed streams training never uses."""
    if settings.model == "conv_unet":
        return _conv_validation(settings)
    noisy, clean, parts, at = [], [], [], 0
    for stream in _streams(settings, settings.val_samples, settings.val_samples, _VAL_STREAM, 0):
        for x, y in stream:
            noisy.append(x.reshape(len(x), -1))
            clean.append(y.reshape(len(y), -1))
        total = sum(len(c) for c in clean)
        parts.append(slice(at, total))
        at = total
    return ValidationSet(torch.from_numpy(np.concatenate(noisy)), torch.from_numpy(np.concatenate(clean)), parts)


LOG_MSE_FLOOR = 1e-6  # keeps log10(MSE) finite for a perfect sample (a 60 dB PSNR cap)


def sample_log_mse(pred: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Per-sample 10*log10(MSE) (minus each sample's PSNR at peak 1.0), shape (n,)."""
    mse = (pred - clean).flatten(1).pow(2).mean(dim=1)
    return 10.0 * torch.log10(mse + LOG_MSE_FLOOR)


def quality(pred: torch.Tensor, clean: torch.Tensor) -> dict[str, float]:
    """MSE, mean absolute per-pixel error, PSNR (peak 1.0, the clean lattice maximum) and the mean of the
    per-sample PSNRs (what `loss: log_mse` maximises)."""
    mse = float(F.mse_loss(pred, clean))
    mae = float((pred - clean).abs().mean())
    return {"mse": mse, "mae": mae, "psnr_db": 10.0 * math.log10(1.0 / max(mse, 1e-12)),
            "mean_psnr_db": -float(sample_log_mse(pred, clean).mean())}


def val_loss(settings: TrainSettings, q: dict[str, float]) -> float:
    """The validation number best.pt minimises: MSE, or minus the mean per-sample PSNR for `loss: log_mse`."""
    return q["mse"] if settings.loss == "mse" else -q["mean_psnr_db"]


@torch.no_grad()
def predict(model: nn.Module, noisy: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The model's output for flattened windows (or conv_unet scenes), in batches, on the CPU."""
    was_training = model.training
    model.eval()
    step = _EVAL_BATCH if noisy.ndim == 2 else _EVAL_FRAMES
    pred = torch.cat([model(noisy[i : i + step].to(device)).float().cpu() for i in range(0, len(noisy), step)])
    model.train(was_training)
    return pred


def evaluate(model: nn.Module, val: ValidationSet, device: torch.device) -> tuple[dict[str, float], list[dict[str, float]]]:
    """`quality` of the model on the whole validation set, and on each noise model's part."""
    pred = predict(model, val.noisy, device)
    return quality(pred, val.clean), [quality(pred[part], val.clean[part]) for part in val.parts]


FRAME_DOSES = (5.0, 20.0, 100.0)
FRAME_ROTATIONS = (-12.0, 8.0, 61.0)
FRAME_SEED = 20_250_001  # not a training or validation stream (those derive from the run's seed)


def frame_quality(denoise: Callable[[np.ndarray], np.ndarray], doses: tuple[float, ...] = FRAME_DOSES,
                  size: int = 192, seed: int = FRAME_SEED) -> list[dict[str, float]]:
    """PSNR (dB) on simulated fast-scan frames: an RP fault, Poisson counts at each dose over a 0.1 background.

    Three frames per dose, rotated -12, 8 and 61 degrees (inside and outside the paper's 0-45 degree
    training range), in detector counts, through `denoise` (e.g. a `Denoiser`). Each output is mapped
    onto the clean scale by the least-squares gain and offset (`stemd.compute.metrics.fit_scale`) and scored
    on the whole frame (`psnr_db`) and away from its border (`inner_psnr_db`, 28 px in). The noisy
    frames, scored the same way, are the baseline.
    """

    rng = np.random.default_rng(seed)
    sims = [synthetic.simulate_frame((size, size), rng, rotation_deg=r, offset_px=(3.3, 1.7), defect="rp") for r in FRAME_ROTATIONS]
    regions = {"": (slice(None), slice(None)), "inner_": (slice(28, -28), slice(28, -28))}
    rows = []
    for dose in doses:
        noise = synthetic.NoiseSpec(kind="poisson", dose=dose, background=0.1)
        err: dict[str, list[float]] = {}
        for i, sim in enumerate(sims):
            counts = (synthetic.corrupt(sim.clean, noise, np.random.default_rng([seed, i, int(dose * 1000)])) + 0.1) * dose
            for kind, image in (("noisy_", counts), ("", denoise(counts.astype(np.float32)))):
                sq = (metrics.fit_scale(image, sim.clean) - sim.clean) ** 2
                for region, where in regions.items():
                    err.setdefault(f"{kind}{region}psnr_db", []).append(float(sq[where].mean()))
        rows.append({"dose": dose, **{key: float(-10 * np.log10(np.mean(v))) for key, v in sorted(err.items())}})
    return rows


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def frame_flops(window: int, hidden: tuple[int, ...], shape: tuple[int, int] = (512, 512), step: int = DEFAULT_STEP) -> float:
    """FLOPs to reconstruct one frame: the windows `stemd.compute.window` evaluates x 2 x sum(layer in*out)."""

    widths = [window * window, *hidden, *reversed(hidden[:-1]), window * window]
    per_window = sum(a * b for a, b in zip(widths, widths[1:]))
    n_windows = len(window_starts(shape[0], window, step)) * len(window_starts(shape[1], window, step))
    return 2.0 * n_windows * per_window


# ---------------------------------------------------------------- training loop


def _cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _state_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.stem + ".state.pt")


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The training state saved beside a `last.pt` (weights_only load; plain data and tensors)."""
    path = _state_path(Path(checkpoint))
    if not Path(checkpoint).is_file():
        raise CheckpointError(f"cannot resume: {checkpoint} does not exist")
    if not path.is_file():
        raise CheckpointError(
            f"cannot resume from {checkpoint}: no training state {path.name} beside it "
            "(only a last.pt written by `stemd train` can be resumed)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: torch raises many types
        raise CheckpointError(f"cannot read training state {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a stemd training state file")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path} has training state version {state.get('version')}, expected {STATE_VERSION}")
    return state


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointError(f"cannot write training state {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _by_noise(settings: TrainSettings, parts: list[dict[str, float]], noisy_parts: list[dict[str, float]],
              labels: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Per noise model (or per validation label): its settings, the model's validation figures and the noisy input's."""
    labels = labels or [{"noise": n.model_dump()} for n in (settings.noise, *settings.noise_mix)]
    return [
        {**label, **{"val_" + k: v for k, v in q.items()}, **{"noisy_val_" + k: v for k, v in nq.items()}}
        for label, q, nq in zip(labels, parts, noisy_parts)
    ]


@dataclass
class _Run:
    """Where a run stands: what `last.state.pt` records and `--resume` restores."""

    samples: int = 0
    best: float = math.inf
    best_quality: dict[str, float] = field(default_factory=dict)
    best_by_noise: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)


def _metadata(settings: TrainSettings, command: str, run: _Run, q: dict[str, float], noisy_q: dict[str, float],
              by_noise: list[dict[str, Any]], params: int) -> dict[str, Any]:
    meta = {
        "window": settings.window,
        "step": DEFAULT_STEP,
        "lattice": settings.lattice.model_dump(),
        "noise": settings.noise.model_dump(),
        "noise_mix": [n.model_dump() for n in settings.noise_mix],
        "hidden": list(settings.hidden),
        "parameters": params,
        "command": command,
        "stemd_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": settings.seed,
        "samples_seen": run.samples,
        "best_val_loss": run.best,
        "quality": {"val_" + k: v for k, v in q.items()},
        "noisy_quality": {"val_" + k: v for k, v in noisy_q.items()},
        "quality_by_noise": by_noise,
        "train_settings": settings.model_dump(mode="json"),
    }
    if settings.model == "conv_unet":

        mean, std = reference_levels(settings.conv.period_px)
        for key in ("lattice", "noise", "noise_mix", "hidden"):
            del meta[key]
        meta.update(
            window=MIN_SIZE,
            normalization={"mean": mean, "signal_std": std},
            sampling={"period_px": list(settings.conv.period_px)},
            conv=settings.conv.model_dump(),
            training_data="stemd.sim.scenes.random_scene (every layout and structure) recorded whole by "
                          "scenes.apply_instrument at log-uniform doses, normalised whole, cut into patches",
        )
    return meta


def new_model(settings: TrainSettings) -> nn.Module:
    """The untrained model `settings.model` names (seed torch first for reproducible weights)."""
    if settings.model == "conv_unet":

        return ConvDenoiser(settings.conv.channels, guide=settings.conv.guide, noise_level=settings.conv.noise_level)

    return WindowAE(settings.window, settings.hidden)


def load_init(model: nn.Module, path: Path) -> None:
    """Copy a checkpoint's weights into `model` (settings `init`); CheckpointError unless the architectures match.

    A conv_unet without the noise-level input may start one with it: the new input's first-layer weights
    are zero, so the model starts out computing exactly what the checkpoint did."""

    source, _ = load_checkpoint(path)
    arch, target = source.arch(), model.arch()
    if arch | {"noise_level": True} == target and arch != target:
        state = source.state_dict()
        first = "enc.0.0.weight"
        state[first] = torch.cat([state[first], torch.zeros_like(model.state_dict()[first][:, state[first].shape[1]:])], 1)
        model.load_state_dict(state)
        return
    if arch != target:
        raise CheckpointError(f"init: {path} is a {arch} model; these settings build a {target}")
    model.load_state_dict(source.state_dict())


def _state(settings: TrainSettings, run: _Run, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "samples_seen": run.samples,
        "best_val_loss": run.best,
        "best_quality": run.best_quality,
        "best_by_noise": run.best_by_noise,
        "history": run.history,
        "optimizer": optimizer.state_dict(),
        "settings": settings.model_dump(mode="json"),
        "torch_rng": torch.get_rng_state(),
    }


def _restore(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer, has_best: bool) -> tuple[_Run, dict[str, Any]]:
    """Load a last.pt and its state into `model` and `optimizer`; (progress so far, the checkpoint's metadata)."""

    state = read_state(checkpoint)
    loaded, meta = load_checkpoint(checkpoint)
    if loaded.arch() != model.arch():
        key = "model/conv" if model.arch()["name"] == "conv_unet" else "model/hidden/window"
        raise ConfigError(f"{key}: {checkpoint} holds {loaded.arch()}, but the settings ask for {model.arch()}")
    if meta.get("samples_seen") != state["samples_seen"]:
        raise CheckpointError(f"{checkpoint} and its {_state_path(checkpoint).name} disagree on samples seen")
    model.load_state_dict(loaded.state_dict())
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"optimizer state in {_state_path(checkpoint)} does not fit the model: {exc}") from None
    torch.set_rng_state(state["torch_rng"])
    run = _Run(int(state["samples_seen"]), history=list(state["history"]))
    if has_best:  # resuming into a directory without best.pt starts the search for the best afresh
        run.best, run.best_quality, run.best_by_noise = state["best_val_loss"], state["best_quality"], state["best_by_noise"]
    return run, meta


def train(
    settings: TrainSettings,
    *,
    resume: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    command: str | None = None,
    frame_check: bool = True,
) -> TrainResult:
    """Train (or continue training) the model `settings.model` names; returns where the checkpoints are.

    With `frame_check`, best.pt is finally scored on simulated frames (`frame_quality`, ~1 s).
    """

    device = resolve_device(settings.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads or _cpu_threads())
    try:
        return _train(settings, device, resume, progress, log, command or "stemd.apps.training.train(...)", frame_check)
    finally:
        torch.set_num_threads(threads)  # the setting is process-wide: leave it as found


def _train(settings: TrainSettings, device: torch.device, resume: Path | None, progress: bool,
           log: Callable[[str], None], command: str, frame_check: bool) -> TrainResult:

    t0 = time.perf_counter()
    out = Path(settings.out)
    best_path, last_path = out / "best.pt", out / "last.pt"
    torch.manual_seed(settings.seed)
    model = new_model(settings)
    if settings.init is not None and resume is None:
        load_init(model, settings.init)
    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    run = _Run()
    if resume is not None:
        run, meta = _restore(Path(resume), model, optimizer, best_path.is_file())
        if run.samples >= settings.samples:
            log(f"{resume} already finished its run: {run.samples:,} samples seen of samples={settings.samples:,}; "
                "pass a larger --samples to train on")
            q, nq = ({k[4:]: v for k, v in meta.get(key, {}).items()} for key in ("quality", "noisy_quality"))
            return TrainResult(out, best_path, Path(resume), run.samples, run.best, q, nq, run.history, already_finished=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"out: cannot create directory {out}: {exc.strerror or exc}") from None

    val = validation_set(settings)
    noisy_q = quality(val.noisy, val.clean)
    noisy_parts = [quality(val.noisy[part], val.clean[part]) for part in val.parts]
    start_q, _ = evaluate(model, val, device)
    log(f"{'resumed at' if resume else 'start'} {run.samples:,} samples: validation MSE {start_q['mse']:.5f} "
        f"(noisy input {noisy_q['mse']:.5f}), device {device}, torch threads {torch.get_num_threads()}")
    if not run.history:
        run.history.append({"samples": 0, "train_loss": math.nan, "val_loss": val_loss(settings, start_q),
                            "lr": lr_at(settings, 0)})

    bar = _progress_bar(settings.samples, run.samples, progress)
    try:
        while run.samples < settings.samples:
            stop = min(settings.samples, (run.samples // settings.val_every + 1) * settings.val_every)
            train_loss = _fit(model, optimizer, settings, run.samples, stop, device, bar)
            run.samples = stop
            q, parts = evaluate(model, val, device)
            by_noise = _by_noise(settings, parts, noisy_parts, val.labels)
            loss = val_loss(settings, q)
            improved = loss < run.best
            if improved:
                run.best, run.best_quality, run.best_by_noise = loss, q, by_noise
            run.history.append({"samples": stop, "train_loss": train_loss, "val_loss": loss, "lr": lr_at(settings, stop)})
            meta = _metadata(settings, command, run, q, noisy_q, by_noise, parameter_count(model))
            if improved:
                save_checkpoint(best_path, model, meta)
            _save_state(_state_path(last_path), _state(settings, run, optimizer))
            save_checkpoint(last_path, model, meta)
            each = ", ".join(f"{x['mse']:.5f}" for x in parts)
            log(f"{stop:,} samples: train loss {train_loss:.5f}, validation MSE {q['mse']:.5f}"
                f"{f' (per noise model: {each})' if len(parts) > 1 else ''}, MAE {q['mae']:.4f}, "
                f"PSNR {q['psnr_db']:.2f} dB (mean per sample {q['mean_psnr_db']:.2f}){' (best)' if improved else ''}")
    finally:
        if bar is not None:
            bar.close()
    if frame_check:
        frames = _record_frame_quality(best_path, device)
        log("best checkpoint on simulated Poisson frames, PSNR noisy -> denoised (whole frame; 28 px in): "
            + ", ".join(f"dose {r['dose']:g}: {r['noisy_psnr_db']:.1f} -> {r['psnr_db']:.1f}; {r['inner_psnr_db']:.1f} dB"
                        for r in frames))
    return TrainResult(out, best_path, last_path, run.samples, run.best, run.best_quality, noisy_q, run.history,
                       run.best_by_noise, val_loss(settings, start_q), time.perf_counter() - t0)


def _record_frame_quality(best_path: Path, device: torch.device) -> list[dict[str, float]]:
    """Score best.pt with `frame_quality` through `Denoiser` and store the figures in its metadata."""

    model, meta = load_checkpoint(best_path)
    size = max(192, 4 * int(meta["window"]))
    meta["frame_quality"] = frame_quality(Denoiser(model, meta, device=device.type), size=size)
    save_checkpoint(best_path, model, meta)
    return meta["frame_quality"]


def _extra_inputs(settings: TrainSettings) -> list[str]:
    """The names of the model inputs a training batch carries between the noisy patches and the targets."""
    if settings.model != "conv_unet":
        return []
    return ["guide"] * (settings.conv.guide == "bragg") + ["level"] * settings.conv.noise_level


def _fit(model: nn.Module, optimizer: torch.optim.Optimizer, settings: TrainSettings, start: int, stop: int,
         device: torch.device, bar: Any) -> float:
    """Adam steps on samples [start, stop) of the data stream; returns their mean training loss."""
    pos, loss_sum, running = start, 0.0, math.nan
    for batch in training_stream(settings, start, stop):
        n = len(batch[0])
        noisy, *extra, y = (torch.from_numpy(b).to(device) for b in batch)  # (noisy, [guide,] [level,] clean)
        inputs = dict(zip(_extra_inputs(settings), extra))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(settings, pos)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision == "bfloat16"):
            pred = model(noisy, **inputs)
        loss = F.mse_loss(pred.float(), y) if settings.loss == "mse" else sample_log_mse(pred.float(), y).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        value = float(loss.detach())
        running = value if math.isnan(running) else 0.95 * running + 0.05 * value
        loss_sum += value * n
        pos += n
        if bar is not None:
            bar.update(n)
            bar.set_postfix(loss=f"{running:.5f}", refresh=False)
    return loss_sum / max(pos - start, 1)


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="win", unit_scale=True, dynamic_ncols=True, desc="train")


# ---------------------------------------------------------------- CLI

_OVERRIDES = ("model", "samples", "batch_size", "lr", "seed", "device", "threads", "out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="PATH", help="YAML training settings (default: built-in, as config/train.yaml)")
    parser.add_argument("--model", metavar="window_ae|conv_unet", help="what to train (conv_unet: see config/train_conv.yaml)")
    parser.add_argument("--samples", metavar="N", help="training windows in total")
    parser.add_argument("--batch-size", metavar="N", help="windows per optimizer step")
    parser.add_argument("--lr", metavar="X", help="Adam learning rate (peak)")
    parser.add_argument("--seed", metavar="N", help="seed for weights and data")
    parser.add_argument("--device", metavar="auto|cpu|cuda", help="where to train")
    parser.add_argument("--threads", metavar="N", help="CPU threads (0: every core)")
    parser.add_argument("--out", metavar="DIR", help="directory for best.pt, last.pt, last.state.pt")
    parser.add_argument("--hidden", metavar="W1,W2,...", help="encoder widths, e.g. 256,64 (the last is the code size)")
    parser.add_argument("--resume", type=Path, metavar="CKPT", help="continue from a last.pt (its settings, unless --config)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_hidden(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"hidden: expected comma-separated integer widths like 256,64 (got {text!r})") from None


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """Config file (or, when resuming without one, the run's saved settings) plus command-line overrides."""
    overrides: dict[str, Any] = {k: getattr(args, k) for k in _OVERRIDES}
    overrides["hidden"] = _parse_hidden(args.hidden)
    if args.resume is not None and args.config is None:
        saved = read_state(args.resume)["settings"]
        overrides = {**saved, **{k: v for k, v in overrides.items() if v is not None}}
    return load_train_settings(args.config, overrides)


def command_line(args: argparse.Namespace) -> str:
    """The `stemd train ...` command these arguments amount to (stored in checkpoint metadata)."""
    parts = ["stemd", "train"]
    for key in ("config", *_OVERRIDES, "hidden", "resume"):
        value = getattr(args, key)
        if value is not None:
            parts += ["--" + key.replace("_", "-"), str(value)]
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    progress = not args.no_progress
    if progress:
        from tqdm import tqdm

        log = tqdm.write
    else:
        log = print
    result = train(settings, resume=args.resume, progress=progress, log=log, command=command_line(args))
    if not result.already_finished:
        q, nq = result.quality, result.noisy_quality
        print(
            f"best checkpoint {result.best_path}: validation MSE {q['mse']:.5f}, MAE {q['mae']:.4f}, "
            f"PSNR {q['psnr_db']:.2f} dB (noisy input {nq['psnr_db']:.2f} dB); "
            f"{result.samples_seen:,} samples in {result.elapsed_s:.0f} s"
        )
    return 0
