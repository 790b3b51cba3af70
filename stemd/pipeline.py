"""`Denoiser`: a checkpoint on a device that maps raw arrays to denoised arrays.

Raw frames come in arbitrary units; `stemd.compute.normalize` maps them to the model's scale and back.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stemd.compute import sampling as _sampling
from stemd.compute.dejitter import dejitter as _dejitter
from stemd.compute.fourier import bragg_filter, noise_level
from stemd.compute.normalize import REFERENCE_LEVELS, check_frames, denormalize, normalize
from stemd.compute.planar import planar_guide
from stemd.config import DEJITTER_DEFAULT, check_dejitter
from stemd.errors import CheckpointError, ConfigError
from stemd.models.checkpoint import load_checkpoint
from stemd.models.conv_unet import ConvDenoiser

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("float32", "tf32", "bf16")
FLIPS = ((), (-1,), (-2,), (-2, -1))  # identity, left-right, up-down, both: each keeps scan lines rows  # tf32: CUDA matmuls/convolutions only; bf16: autocast on CPU and CUDA
DEFAULT_STEP = 2


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU raises ConfigError."""
    allowed = ", ".join(DEVICES)
    if name not in DEVICES:
        raise ConfigError(f"model.device: unknown device {name!r} (allowed: {allowed})")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device: cuda requested but no CUDA GPU is available (allowed: {allowed})")
    return torch.device(name)


def _reference_from(metadata: dict[str, Any]) -> tuple[float, float]:
    """metadata["normalization"] = {"mean": m, "signal_std": s} (from `lattice_reference`), else the paper's."""
    ref = metadata.get("normalization")
    if ref is None:
        return REFERENCE_LEVELS
    try:
        mean, std = float(ref["mean"]), float(ref["signal_std"])
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"metadata.normalization must be {{'mean': float, 'signal_std': float}}, got {ref!r}") from None
    if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
        raise CheckpointError(f"metadata.normalization needs a finite mean and a positive signal_std, got {ref!r}")
    return mean, std


class Denoiser:
    """A loaded model on a device; call it with a 2D frame or a 3D batch."""

    model: torch.nn.Module
    metadata: dict[str, Any]
    device: torch.device
    step: int
    window: int
    reference: tuple[float, float]  # what `normalize` matches a frame's statistics to
    precision: str  # one of PRECISIONS; float32 is the reference the others are measured against
    sampling: str  # one of sampling.POLICIES: what to do with a frame whose lattice period the model was not trained on
    lattice_period_m: float  # the specimen's projected lattice period, metres
    period_range: tuple[float, float] | None  # lattice periods (px) the model was trained on; None: not recorded

    def __init__(self, model: torch.nn.Module, metadata: dict[str, Any], device: str = "auto", step: int | None = None,
                 precision: str = "float32", sampling: str = "resample",
                 lattice_period_m: float = _sampling.DEFAULT_LATTICE_PERIOD_M, flips: bool = False,
                 dejitter: int = DEJITTER_DEFAULT, planar: bool = True) -> None:
        for key, value in (("flips", flips), ("planar", planar)):
            if not isinstance(value, bool):
                raise ConfigError(f"model.{key}: must be true or false, got {value!r}")
        self.flips, self.planar = flips, planar
        self.dejitter = check_dejitter(dejitter)
        if precision not in PRECISIONS:
            raise ConfigError(f"model.precision: unknown precision {precision!r} (allowed: {', '.join(PRECISIONS)})")
        self.precision = precision
        self.sampling = _sampling.check_policy(sampling)
        self.lattice_period_m = _sampling.check_lattice_period(lattice_period_m)
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.metadata = dict(metadata)
        self.window = int(model.arch()["window"])
        source, error = ("model.step", ConfigError) if step is not None else ("checkpoint metadata step", CheckpointError)
        step = step if step is not None else self.metadata.get("step", DEFAULT_STEP)
        if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= self.window:
            raise error(f"{source}: must be an integer from 1 to the window ({self.window}), got {step!r}")
        self.step = step
        self.reference = _reference_from(self.metadata)
        self.period_range = _sampling.period_range(self.metadata)
        self._model_id: str | None = None

    @classmethod
    def load(cls, path: Path | str | None = None, device: str = "auto", step: int | None = None,
             precision: str = "float32", sampling: str = "resample",
             lattice_period_m: float = _sampling.DEFAULT_LATTICE_PERIOD_M, flips: bool = False,
             dejitter: int = DEJITTER_DEFAULT, planar: bool = True) -> "Denoiser":
        """From a checkpoint file; `None` is the shipped default model. The keywords are `ModelSettings`'
        fields, so `Denoiser.load(**settings.model.model_dump())` loads what a config names."""
        resolve_device(device)  # a bad device is reported before the file is read
        _sampling.check_policy(sampling)
        _sampling.check_lattice_period(lattice_period_m)
        check_dejitter(dejitter)
        model, metadata = load_checkpoint(None if path is None else Path(path))
        return cls(model, metadata, device=device, step=step, precision=precision, sampling=sampling,
                   lattice_period_m=lattice_period_m, flips=flips, dejitter=dejitter, planar=planar)

    @property
    def model_id(self) -> str:
        """Short stable id of the weights: '<arch name>-' + first 12 hex of sha256 over the state dict."""
        if self._model_id is None:
            digest = hashlib.sha256()
            for key, tensor in sorted(self.model.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._model_id = f"{self.model.arch()['name']}-{digest.hexdigest()[:12]}"
        return self._model_id

    def plan(self, shape: tuple[int, int], pixel_size_m: float | None = None) -> float:
        """The resampling factor for frames of `shape` at this pixel size (1.0: as is), or SamplingError."""
        return _sampling.plan(pixel_size_m, self.lattice_period_m, self.period_range, (int(shape[0]), int(shape[1])),
                              self.sampling, min_side=self.window)

    def __call__(self, image: np.ndarray, pixel_size_m: float | None = None) -> np.ndarray:
        """2D (H, W) or 3D (B, H, W) in any units -> float32 of the same shape and scale.

        With `pixel_size_m` (metres) the frame is resampled into the model's period range first (`plan`)."""
        check_frames(image, self.window)
        self.plan(image.shape[-2:], pixel_size_m)  # refused before any work
        stack = image if image.ndim == 3 else image[None]
        x, lo, hi = normalize(stack, reference=self.reference)
        with torch.inference_mode():
            y = self.denoise_tensor(torch.from_numpy(x).to(self.device)[:, None], pixel_size_m)
            y = y[:, 0].float().cpu().numpy()
        out = denormalize(y, lo, hi)
        return out if image.ndim == 3 else out[0]

    def denoise_tensor(self, frames: torch.Tensor, pixel_size_m: float | None = None) -> torch.Tensor:
        """(B, 1, H, W) normalised float tensor on self.device -> float32, same shape; no host copies (for the engine).

        Frames are normalised at their own sampling, resampled by `plan`'s factor for the model and
        back. With `flips` the output is the mean over the frame's FLIPS (4x the compute: a self-ensemble
        that averages out part of the model's own error). With precision tf32 the CUDA backends may use
        TF32 (a process-wide switch, set here each call)."""
        factor = self.plan(frames.shape[-2:], pixel_size_m)
        if self.dejitter:
            with torch.autocast(frames.device.type, enabled=False):
                frames = _dejitter(frames, self.dejitter)
        if not self.flips:
            return self._denoise(frames, factor)
        return sum(self._denoise(frames.flip(dims), factor).flip(dims) for dims in FLIPS) / len(FLIPS)

    def _denoise(self, frames: torch.Tensor, factor: float) -> torch.Tensor:
        """One pass of the model under `precision`, resampled by `factor` and back."""
        x = frames if factor == 1.0 else _sampling.resample(frames.float(), factor)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.precision == "tf32"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            if isinstance(self.model, ConvDenoiser):
                y = self.model(x, *self._conv_inputs(frames, factor)).float()
            else:
                y = self.model.denoise_frames(x, self.step).float()
        return y if factor == 1.0 else _sampling.restore(y, frames.shape[-2:])

    def _conv_inputs(self, frames: torch.Tensor, factor: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A conv model's guide (the planar-defect guide with `planar`, else the Bragg guide) and noise level,
        taken at the frame's own sampling (the guide then resampled with it): interpolation correlates the
        noise, so on an upsampled frame the guide's noise floor and the noise level would be underestimated
        (4 px lattice: 23.1 -> see docs/benchmarks.md)."""
        with torch.autocast(frames.device.type, enabled=False):
            guide = None
            if self.model.guide == "bragg":
                guide = planar_guide(frames.float()) if self.planar else bragg_filter(frames.float())
                guide = _sampling.resample(guide, factor)
            return guide, noise_level(frames) if self.model.noise_level else None
