"""What each trainable model brings to the one training loop: its data, validation set, network and metadata.

`TASKS` maps `TrainSettings.model` to a `TrainTask`; `task_for(settings)` builds the one a run uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from stemd.apps.training.data import (
    TRAIN_STREAM,
    VAL_STREAM,
    ValidationSet,
    reference_levels,
    scene_patches,
    stream_seed,
    window_streams,
)
from stemd.config import TrainSettings
from stemd.models.checkpoint import Model
from stemd.models.conv_unet import MIN_SIZE, ConvDenoiser
from stemd.models.window_ae import WindowAE

CONV_POOL = 8  # conv_unet: batches generated together from shared scenes, then shuffled
VAL_SCENE_PX = 256  # side of a conv_unet validation scene
EVAL_FRAMES = 4  # conv_unet validation scenes per forward pass


class TrainTask(Protocol):
    """One model kind's part of a run; the loop calls only these."""

    @property
    def settings(self) -> TrainSettings: ...

    @property
    def settings_key(self) -> str:
        """The settings that fix the architecture, named when a checkpoint does not fit them."""
        ...

    @property
    def input_names(self) -> tuple[str, ...]:
        """Model inputs a batch carries between the noisy samples and the targets."""
        ...

    def build(self) -> Model:
        """The untrained model (the loop seeds torch first)."""

    def batches(self, start: int, stop: int) -> Iterator[tuple[np.ndarray, ...]]:
        """(noisy, *inputs, clean) batches for samples [start, stop) of the run's data stream."""

    def validation(self) -> ValidationSet:
        """The fixed validation set, from seed streams training never uses."""

    def metadata(self) -> dict[str, Any]:
        """Checkpoint metadata describing the model's input and training data."""


@dataclass(frozen=True)
class WindowAETask:
    """The paper's window auto-encoder on synthetic lattice windows, noise models taking turns."""

    settings: TrainSettings
    settings_key: str = "model/hidden/window"
    input_names: tuple[str, ...] = ()

    def build(self) -> WindowAE:
        """WindowAE(window, hidden)."""
        return WindowAE(self.settings.window, self.settings.hidden)

    def batches(self, start: int, stop: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(noisy, clean) window batches (n, w, w), one batch of each noise model in turn."""
        live = window_streams(self.settings, stop - start, self.settings.batch_size, TRAIN_STREAM, start)
        while live:
            for stream in list(live):
                batch = next(stream, None)
                if batch is None:
                    live.remove(stream)
                    continue
                yield batch

    def validation(self) -> ValidationSet:
        """`val_samples` flattened windows split evenly over the noise models, one part (and label) each."""
        s = self.settings
        noisy, clean, parts, at = [], [], [], 0
        for stream in window_streams(s, s.val_samples, s.val_samples, VAL_STREAM, 0):
            for x, y in stream:
                noisy.append(x.reshape(len(x), -1))
                clean.append(y.reshape(len(y), -1))
            total = sum(len(c) for c in clean)
            parts.append(slice(at, total))
            at = total
        labels = [{"noise": n.model_dump()} for n in (s.noise, *s.noise_mix)]
        return ValidationSet(
            torch.from_numpy(np.concatenate(noisy)), torch.from_numpy(np.concatenate(clean)), parts, labels
        )

    def metadata(self) -> dict[str, Any]:
        """Window side, lattice, noise models and widths."""
        s = self.settings
        return {"window": s.window, "lattice": s.lattice.model_dump(), "noise": s.noise.model_dump(),
                "noise_mix": [n.model_dump() for n in s.noise_mix], "hidden": list(s.hidden)}


@dataclass(frozen=True)
class ConvTask:
    """`stemd.models.conv_unet.ConvDenoiser` on patches of realistic scenes, validated on whole scenes."""

    settings: TrainSettings
    settings_key: str = "model/conv"

    @property
    def input_names(self) -> tuple[str, ...]:
        """`guide` with a Bragg guide, `level` with the noise-level input, in that order."""
        c = self.settings.conv
        return ("guide",) * (c.guide == "bragg") + ("level",) * c.noise_level

    def build(self) -> ConvDenoiser:
        """ConvDenoiser(channels, guide, noise_level)."""
        c = self.settings.conv
        return ConvDenoiser(c.channels, guide=c.guide, noise_level=c.noise_level)

    def batches(self, start: int, stop: int) -> Iterator[tuple[np.ndarray, ...]]:
        """Patch batches (n, 1, p, p); patches come in pools of CONV_POOL batches, each keyed by its first
        sample, so a resumed run sees what a whole one would."""
        c, batch = self.settings.conv, self.settings.batch_size
        pool = batch * CONV_POOL
        reference = reference_levels(c.period_px)
        for first in range(start // pool * pool, stop, pool):
            rng = np.random.default_rng(stream_seed(self.settings.seed, TRAIN_STREAM, first))
            data = scene_patches(pool, rng, reference, c)
            order = rng.permutation(pool)
            end = min(stop, first + pool)
            for i in range(max(start, first), end, batch):
                take = order[i - first : min(i + batch, end) - first]
                yield tuple(d[take] for d in data)

    def validation(self) -> ValidationSet:
        """`val_scenes` whole VAL_SCENE_PX scenes, one per dose spread log-evenly over conv.dose, with the inputs
        the pipeline would give the model (`input_names`: its guide, stepping aside at contradicted columns, and
        noise level), so best.pt is chosen on what inference feeds it; parts: thirds."""
        c = self.settings.conv
        reference = reference_levels(c.period_px)
        rng = np.random.default_rng(stream_seed(self.settings.seed, VAL_STREAM, 0))
        doses = np.geomspace(c.dose[0], c.dose[1], c.val_scenes)
        whole = {"patch": VAL_SCENE_PX, "scene_size": VAL_SCENE_PX}
        recorded = [scene_patches(1, rng, reference, c.model_copy(update={**whole, "dose": (d, d)}),
                                doses_per_scene=1, per_dose=1) for d in doses]
        arrays = [torch.from_numpy(np.concatenate(column)) for column in zip(*recorded)]
        bounds = [round(k * c.val_scenes / 3) for k in range(4)]
        parts = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
        labels = [{"dose": [float(doses[p.start]), float(doses[p.stop - 1])]} for p in parts]
        return ValidationSet(arrays[0], arrays[-1], parts, labels, EVAL_FRAMES,
                             dict(zip(self.input_names, arrays[1:-1])))

    def metadata(self) -> dict[str, Any]:
        """Smallest input side, the normalisation reference, the trained period range and the conv settings."""
        c = self.settings.conv
        mean, std = reference_levels(c.period_px)
        return {
            "window": MIN_SIZE,
            "normalization": {"mean": mean, "signal_std": std},
            "sampling": {"period_px": list(c.period_px)},
            "conv": c.model_dump(),
            "training_data": "stemd.sim.scenes.random_scene (every layout and structure) recorded whole by "
                             "scenes.apply_instrument at log-uniform doses with hot pixels, prepared whole as the "
                             "pipeline prepares a frame (outliers repaired, destriped, normalised, de-jittered), "
                             "cut into patches",
        }


TASKS: dict[str, Callable[[TrainSettings], TrainTask]] = {"window_ae": WindowAETask, "conv_unet": ConvTask}


def task_for(settings: TrainSettings) -> TrainTask:
    """The task `settings.model` names."""
    return TASKS[settings.model](settings)


def training_stream(settings: TrainSettings, start: int, stop: int) -> Iterator[tuple[np.ndarray, ...]]:
    """(noisy, *inputs, clean) batches for samples [start, stop) of the run's data stream."""
    return task_for(settings).batches(start, stop)


def validation_set(settings: TrainSettings) -> ValidationSet:
    """The run's fixed validation set."""
    return task_for(settings).validation()
