"""The one training loop: Adam on a task's data stream, validation, best/last checkpoints, resume.

A run writes `best.pt` (lowest validation loss) and `last.pt` with `stemd.models.checkpoint.save_checkpoint`,
plus `last.state.pt` beside `last.pt`: optimizer state, samples seen and history, so `--resume` can continue.
The data stream is keyed by (seed, position), so a run resumed from a validation point sees exactly the
samples an uninterrupted run would have seen. What differs between models lives in `tasks.TrainTask`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from stemd import __version__
from stemd.apps.training.scoring import evaluate, frame_quality, parameter_count, quality, sample_log_mse, val_loss
from stemd.apps.training.tasks import TrainTask, task_for
from stemd.config import TrainSettings
from stemd.errors import CheckpointError, ConfigError
from stemd.models.checkpoint import Model, load_checkpoint, save_checkpoint
from stemd.pipeline import Denoiser, resolve_device

DEFAULT_STEP = 2  # the floating-window step in the paper's text; stored in every checkpoint
STATE_FORMAT = "stemd-train-state"
STATE_VERSION = 1


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
    by_noise: list[dict[str, Any]] = field(default_factory=list)  # per validation part: its label and figures
    start_val_loss: float = math.nan  # validation loss of the weights this call started from
    elapsed_s: float = 0.0
    already_finished: bool = False  # a resumed run that had nothing left to do


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


def _cpu_threads() -> int:
    """The cores this process may run on (threads: 0)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _state_path(checkpoint: Path) -> Path:
    """Where the training state of `checkpoint` lives: last.pt -> last.state.pt."""
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
    """Write the training state atomically (a temporary file, then a rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointError(f"cannot write training state {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _by_noise(parts: list[dict[str, float]], noisy_parts: list[dict[str, float]],
              labels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per validation part: its label, the model's validation figures and the noisy input's."""
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


def _metadata(task: TrainTask, command: str, run: _Run, q: dict[str, float], noisy_q: dict[str, float],
              by_noise: list[dict[str, Any]], params: int) -> dict[str, Any]:
    """Checkpoint metadata: the task's description of model and data, then the run's provenance and figures."""
    settings = task.settings
    return {
        "step": DEFAULT_STEP,
        **task.metadata(),
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


def load_init(model: Model, path: Path) -> None:
    """Copy a checkpoint's weights into `model` (settings `init`); CheckpointError unless the architectures match.

    A conv_unet without the noise-level input may start one with it: the new input's first-layer weights
    are zero, so the model starts out computing exactly what the checkpoint did."""

    source, _ = load_checkpoint(path)
    arch, target = source.arch(), model.arch()
    if arch | {"noise_level": True} == target and arch != target:
        state = source.state_dict()
        first = "enc.0.0.weight"
        state[first] = torch.cat(
            [state[first], torch.zeros_like(model.state_dict()[first][:, state[first].shape[1] :])], 1
        )
        model.load_state_dict(state)
        return
    if arch != target:
        raise CheckpointError(f"init: {path} is a {arch} model; these settings build a {target}")
    model.load_state_dict(source.state_dict())


def _state(settings: TrainSettings, run: _Run, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What `last.state.pt` holds: progress, optimizer and torch RNG state, and the settings."""
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


def _restore(checkpoint: Path, model: Model, optimizer: torch.optim.Optimizer, has_best: bool,
             settings_key: str) -> tuple[_Run, dict[str, Any]]:
    """Load a last.pt and its state into `model` and `optimizer`; (progress so far, the checkpoint's metadata)."""

    state = read_state(checkpoint)
    loaded, meta = load_checkpoint(checkpoint)
    if loaded.arch() != model.arch():
        raise ConfigError(
            f"{settings_key}: {checkpoint} holds {loaded.arch()}, but the settings ask for {model.arch()}"
        )
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
        run.best, run.best_quality, run.best_by_noise = (
            state["best_val_loss"],
            state["best_quality"],
            state["best_by_noise"],
        )
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
    task = task_for(settings)
    model = task.build()
    if settings.init is not None and resume is None:
        load_init(model, settings.init)
    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    run = _Run()
    if resume is not None:
        run, meta = _restore(Path(resume), model, optimizer, best_path.is_file(), task.settings_key)
        if run.samples >= settings.samples:
            log(f"{resume} already finished its run: {run.samples:,} samples seen of samples={settings.samples:,}; "
                "pass a larger --samples to train on")
            q, nq = ({k[4:]: v for k, v in meta.get(key, {}).items()} for key in ("quality", "noisy_quality"))
            return TrainResult(
                out, best_path, Path(resume), run.samples, run.best, q, nq, run.history, already_finished=True
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"out: cannot create directory {out}: {exc.strerror or exc}") from None

    val = task.validation()
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
            train_loss = _fit(model, optimizer, task, run.samples, stop, device, bar)
            run.samples = stop
            q, parts = evaluate(model, val, device)
            by_noise = _by_noise(parts, noisy_parts, val.labels)
            loss = val_loss(settings, q)
            improved = loss < run.best
            if improved:
                run.best, run.best_quality, run.best_by_noise = loss, q, by_noise
            run.history.append(
                {"samples": stop, "train_loss": train_loss, "val_loss": loss, "lr": lr_at(settings, stop)}
            )
            meta = _metadata(task, command, run, q, noisy_q, by_noise, parameter_count(model))
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
        log(
            "best checkpoint on simulated Poisson frames, PSNR noisy -> denoised (whole frame; 28 px in): "
            + ", ".join(
                f"dose {r['dose']:g}: {r['noisy_psnr_db']:.1f} -> {r['psnr_db']:.1f}; {r['inner_psnr_db']:.1f} dB"
                for r in frames
            )
        )
    return TrainResult(out, best_path, last_path, run.samples, run.best, run.best_quality, noisy_q, run.history,
                       run.best_by_noise, val_loss(settings, start_q), time.perf_counter() - t0)


def _record_frame_quality(best_path: Path, device: torch.device) -> list[dict[str, float]]:
    """Score best.pt with `frame_quality` through `Denoiser` and store the figures in its metadata."""

    model, meta = load_checkpoint(best_path)
    size = max(192, 4 * int(meta["window"]))
    meta["frame_quality"] = frame_quality(Denoiser(model, meta, device=device.type), size=size)
    save_checkpoint(best_path, model, meta)
    return meta["frame_quality"]


def _fit(model: Model, optimizer: torch.optim.Optimizer, task: TrainTask, start: int, stop: int,
         device: torch.device, bar: tqdm | None) -> float:
    """Adam steps on samples [start, stop) of the task's data stream; returns their mean training loss."""
    settings = task.settings
    pos, loss_sum, running = start, 0.0, math.nan
    for batch in task.batches(start, stop):
        n = len(batch[0])
        noisy, *extra, y = (torch.from_numpy(b).to(device) for b in batch)
        inputs = dict(zip(task.input_names, extra))
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


def _progress_bar(total: int, initial: int, enabled: bool) -> tqdm | None:
    """A tqdm bar over samples, or None when progress is off."""
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, unit="win", unit_scale=True, dynamic_ncols=True, desc="train")


