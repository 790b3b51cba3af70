"""`Denoiser`: a checkpoint on a device and the one denoising pipeline every caller runs.

`Denoiser.run` takes raw frames (any units, any real dtype) as a tensor on the model's device and
returns denoised frames in the same units, without leaving the device: normalise -> line-jitter
correction -> resample into the model's period range (the `Plan`) -> the model's auxiliary inputs
(`stemd.models.base`) -> the model under `precision` -> restore the shape -> denormalise. The engine
(live), `stemd denoise` (offline) and the Python API (`Denoiser.__call__`) all call it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch

from stemd.compute import sampling as _sampling
from stemd.compute.dejitter import dejitter as _dejitter
from stemd.compute.fourier import bragg_filter, noise_level
from stemd.compute.normalize import REFERENCE_LEVELS, check_frames, denormalize, normalize
from stemd.compute.outliers import outlier_mask, repair
from stemd.compute.planar import planar_guide
from stemd.compute.scanlines import Lines, destripe, scan_lines
from stemd.config import Device, ModelSettings, Precision, model_settings
from stemd.errors import CheckpointError, ConfigError, ModelOutputError
from stemd.models.base import FrameModel
from stemd.models.checkpoint import load_checkpoint

DEVICES: tuple[str, ...] = get_args(Device)
PRECISIONS: tuple[str, ...] = get_args(Precision)  # tf32: CUDA matmuls/convolutions only; bf16: CPU and CUDA autocast
FLIPS = ((), (-1,), (-2,), (-2, -1))  # identity, left-right, up-down, both: each keeps scan lines rows
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
    """metadata["normalization"] = {"mean": m, "signal_std": s} (set by training), else the paper lattice's."""
    ref = metadata.get("normalization")
    if ref is None:
        return REFERENCE_LEVELS
    try:
        mean, std = float(ref["mean"]), float(ref["signal_std"])
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(
            f"metadata.normalization must be {{'mean': float, 'signal_std': float}}, got {ref!r}"
        ) from None
    if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
        raise CheckpointError(f"metadata.normalization needs a finite mean and a positive signal_std, got {ref!r}")
    return mean, std


@dataclass(frozen=True)
class Plan:
    """How frames of one shape and pixel size are run, computed once and carried with them."""

    shape: tuple[int, int]
    pixel_size_m: float | None
    factor: float  # resampling factor into the model's trained range; 1.0: as is
    source: str = "none"  # what chose the factor: "frame" (its measured lattice), "pixel size", or "none"
    scale_px: float | None = None  # the frame's measured lattice scale (shortest translation, px), if measured
    lattice: bool | None = None  # whether the frame shows a lattice (None: not measured)
    lines: Lines = "rows"  # the axis the scan lines run along (the line-jitter correction's and destripe's)
    stripes: bool = False  # the frame's line means flicker beyond its noise: destripe before the model

    def describe(self) -> dict[str, Any]:
        """Plain data for output metadata and the published header."""
        out: dict[str, Any] = {"factor": self.factor, "source": self.source, "scan_lines": self.lines,
                               "stripes": self.stripes}
        if self.scale_px is not None:
            out["lattice_scale_px"] = round(self.scale_px, 3)
        if self.pixel_size_m is not None:
            out["pixel_size_m"] = self.pixel_size_m
        return out


def _writable(array: np.ndarray) -> np.ndarray:
    """`array`, copied if read-only (a memory map, a ZeroMQ buffer): torch wants writable memory."""
    return array if array.flags.writeable else array.copy()


def check_finite(frames: np.ndarray) -> None:
    """ModelOutputError if a denoised frame holds NaN or inf: such output is never published or written."""
    if not np.isfinite(frames).all():
        bad = int(np.count_nonzero(~np.isfinite(frames)))
        raise ModelOutputError(f"the model produced {bad} non-finite pixel(s) (NaN or inf); output discarded")


class Denoiser:
    """A loaded model on a device with its `ModelSettings`; call it with a 2D frame or a 3D batch."""

    model: FrameModel
    metadata: dict[str, Any]
    settings: ModelSettings
    device: torch.device
    step: int
    window: int  # the smallest frame side the model takes
    reference: tuple[float, float]  # what `normalize` matches a frame's statistics to
    period_range: tuple[float, float] | None  # lattice periods (px) the model was trained on; None: not recorded
    scale_range: tuple[float, float] | None  # lattice scales (shortest translation, px) it saw (`sampling.scale_range`)

    def __init__(self, model: FrameModel, metadata: dict[str, Any], settings: ModelSettings | None = None,
                 **fields: Any) -> None:
        """`fields` replace single settings (`Denoiser(model, {}, device="cpu", dejitter=0)`), validated."""
        self.settings = model_settings(settings, **fields)
        self.device = resolve_device(self.settings.device)
        if self.settings.threads and self.device.type == "cpu":
            torch.set_num_threads(self.settings.threads)  # process-wide: the resident model sets it
        self.model = model.to(self.device).eval()
        self.metadata = dict(metadata)
        self.window = int(model.arch()["window"])
        step = self.settings.step
        source, error = (
            ("model.step", ConfigError) if step is not None else ("checkpoint metadata step", CheckpointError)
        )
        step = step if step is not None else self.metadata.get("step", DEFAULT_STEP)
        if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= self.window:
            raise error(f"{source}: must be an integer from 1 to the window ({self.window}), got {step!r}")
        self.step = step
        self.precision, self.sampling = self.settings.precision, self.settings.sampling
        self.lattice_period_m, self.flips = self.settings.lattice_period_m, self.settings.flips
        self.dejitter, self.planar = self.settings.dejitter, self.settings.planar
        self.reference = _reference_from(self.metadata)
        self.period_range = _sampling.period_range(self.metadata)
        self.scale_range = _sampling.scale_range(self.metadata)
        self._model_id: str | None = None

    @classmethod
    def load(cls, path: Path | str | None = None, settings: ModelSettings | None = None, **fields: Any) -> Denoiser:
        """From a checkpoint file (None: `settings.path`, else the shipped default model) with `settings`
        (`ModelSettings`; default: the defaults), single fields replaced by `fields`: `load(device="cuda")`."""
        settings = model_settings(settings, **fields)
        resolve_device(settings.device)  # a bad device is reported before the file is read
        model, metadata = load_checkpoint(Path(path) if path is not None else settings.path)
        return cls(model, metadata, settings)

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

    def plan(self, shape: Sequence[int], pixel_size_m: float | None = None,
             frames: np.ndarray | torch.Tensor | None = None) -> Plan:
        """How frames of `shape` (H, W) at this pixel size (metres; None: unknown) are run, or SamplingError.

        With `frames` (a 2D frame or a stack; the first is measured) the frame's lattice is measured
        (`sampling.measure_scale`): with `calibrate` its scale chooses the factor, and a frame without a lattice
        gets no line-jitter correction. Without a measured lattice the pixel size and `lattice_period_m` decide."""
        hw = (int(shape[-2]), int(shape[-1]))
        scale, lattice = None, None
        lines: Lines = "rows" if self.settings.scan_lines == "auto" else self.settings.scan_lines
        stripes = False
        if frames is not None:
            one = frames if frames.ndim == 2 else frames[0]
            first = self.repaired(torch.as_tensor(_writable(one) if isinstance(one, np.ndarray) else one)
                                  .to(self.device)[None])
            scale = _sampling.measure_scale(first.to(torch.float32)[:, None])[0]
            lattice = scale is not None
            lines, stripes = scan_lines(first[0], None if self.settings.scan_lines == "auto" else lines)
        if scale is not None and self.settings.calibrate and self.sampling != "off" and self.scale_range:
            factor = _sampling.plan_from_scale(scale, self.scale_range, hw, self.sampling, self.window)
            return Plan(hw, pixel_size_m, factor, "frame", scale, lattice, lines, stripes)
        factor = _sampling.plan(pixel_size_m, self.lattice_period_m, self.period_range, hw, self.sampling,
                                min_side=self.window)
        source = "pixel size" if pixel_size_m is not None and self.sampling != "off" and self.period_range else "none"
        return Plan(hw, pixel_size_m, factor, source, scale, lattice, lines, stripes)

    def repaired(self, raw: torch.Tensor) -> torch.Tensor:
        """(B, H, W) raw frames with saturated pixels (an integer dtype's maximum) and hot pixels replaced by
        the mean of their valid neighbours (`stemd.compute.outliers`), float32; as they are with `outliers` off."""
        if not self.settings.outliers:
            return raw
        saturation = None if raw.is_floating_point() else float(torch.iinfo(raw.dtype).max)
        return repair(raw, outlier_mask(raw, saturation))

    def stack(self, frames: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """A 2D frame, a 3D stack or a list of same-shape 2D frames as one (B, H, W) array, checked
        (`check_frames`: shape, size against the model's window, finite)."""
        if not isinstance(frames, np.ndarray) and len({f.shape for f in frames}) > 1:
            raise ValueError("a batch must hold frames of one shape")
        stack = frames if isinstance(frames, np.ndarray) else np.stack(frames)
        check_frames(stack, self.window)
        stack = _writable(stack)
        return stack if stack.ndim == 3 else stack[None]

    def __call__(self, image: np.ndarray, pixel_size_m: float | None = None, plan: Plan | None = None) -> np.ndarray:
        """2D (H, W) or 3D (B, H, W) in any units -> float32 of the same shape and scale.

        Resampled into the model's range first as `plan` says (default: `plan` of the first frame, from its own
        lattice, else from `pixel_size_m`, metres)."""
        stack = self.stack(image)
        plan = plan or self.plan(stack.shape, pixel_size_m, stack)  # refused before any work
        with torch.inference_mode():
            out = self.run(torch.from_numpy(stack).to(self.device), plan).cpu().numpy()
        check_finite(out)
        return out if image.ndim == 3 else out[0]

    def run(self, raw: torch.Tensor, plan: Plan) -> torch.Tensor:
        """(B, H, W) raw frames of any real dtype on the model's device -> float32 denoised frames in the same
        units, on the device: the whole pipeline. Saturated and hot pixels are missing data (`outliers`); line
        offset flicker is taken out along the plan's scan lines when the plan found it (`destripe`)."""
        x = self.repaired(raw)
        if plan.stripes and self.settings.destripe:
            x = destripe(x, plan.lines)
        x, lo, hi = normalize(x, reference=self.reference)
        return denormalize(self.denoise_tensor(x[:, None], plan=plan)[:, 0], lo, hi)

    def denoise_tensor(self, frames: torch.Tensor, pixel_size_m: float | None = None, *,
                       plan: Plan | None = None) -> torch.Tensor:
        """(B, 1, H, W) normalised float tensor on self.device -> float32, same shape, on the device.

        The line-jitter correction (unless the plan found no lattice to fit lines against: on real frames of
        particles without a measurable lattice it moved lines the wrong way, docs/benchmarks.md "Real data"),
        then the model resampled by the plan's factor and back (`plan`, or one made from `pixel_size_m`). With
        `flips` the output is the mean over the frame's FLIPS (4x the compute: a self-ensemble that averages out
        part of the model's own error)."""
        plan = plan or self.plan(frames.shape, pixel_size_m)
        if self.dejitter and plan.lattice is not False:  # the correction fits each line against the lattice
            with torch.autocast(frames.device.type, enabled=False):
                if plan.lines == "rows":
                    frames = _dejitter(frames, self.dejitter)
                else:
                    frames = _dejitter(frames.transpose(-2, -1), self.dejitter).transpose(-2, -1)
        if not self.flips:
            return self._denoise(frames, plan.factor)
        return sum((self._denoise(frames.flip(dims), plan.factor).flip(dims) for dims in FLIPS),
                   torch.zeros_like(frames, dtype=torch.float32)) / len(FLIPS)

    def _denoise(self, frames: torch.Tensor, factor: float) -> torch.Tensor:
        """One pass of the model under `precision`, resampled by `factor` and back. With precision tf32 the
        CUDA backends may use TF32 (a process-wide switch, set here each call)."""
        x = frames if factor == 1.0 else _sampling.resample(frames.float(), factor)
        aux = self._aux_inputs(frames, factor)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.precision == "tf32"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            y = self.model.denoise_frames(x, self.step, **aux).float()
        return y if factor == 1.0 else _sampling.restore(y, (frames.shape[-2], frames.shape[-1]))

    def _aux_inputs(self, frames: torch.Tensor, factor: float) -> dict[str, torch.Tensor]:
        """The auxiliary inputs the model declares (`FrameModel.inputs`): the guide (the planar-defect guide
        with `planar`, else the Bragg guide) and the noise level, taken at the frame's own sampling (the guide
        then resampled with it): interpolation correlates the noise, so on an upsampled frame the guide's noise
        floor and the noise level would be underestimated (docs/benchmarks.md, "Sampling")."""
        aux: dict[str, torch.Tensor] = {}
        with torch.autocast(frames.device.type, enabled=False):
            if "guide" in self.model.inputs:
                guide = planar_guide(frames.float()) if self.planar else bragg_filter(frames.float())
                aux["guide"] = _sampling.resample(guide, factor)
            if "level" in self.model.inputs:
                aux["level"] = noise_level(frames)
        return aux
