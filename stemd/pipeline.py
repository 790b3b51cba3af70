"""`Denoiser`: a checkpoint on a device and the one denoising pipeline every caller runs.

`Denoiser.run` takes raw frames (any units, any real dtype) as a tensor on the model's device and
returns denoised frames in the same units, without leaving the device: normalise -> line-jitter
correction -> resample into the model's period range (the `Plan`) -> the model's auxiliary inputs
(`stemd.models.base`) -> the model under `precision` -> restore the shape -> denormalise. The engine
(live), `stemd denoise` (offline) and the Python API (`Denoiser.__call__`) all call it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch

from stemd.compute import planar as _planar
from stemd.compute import sampling as _sampling
from stemd.compute import selfcheck as _selfcheck
from stemd.compute.columns import keep_columns
from stemd.compute.dejitter import dejitter as _dejitter
from stemd.compute.dejitter import row_shifts, shift_rows
from stemd.compute.fourier import bragg_filter, bragg_spectrum, noise_level
from stemd.compute.normalize import REFERENCE_LEVELS, check_frames, denormalize, normalize
from stemd.compute.outliers import outlier_mask, repair
from stemd.compute.planar import Vectors, planar_guide
from stemd.compute.residual import line_artefacts, recover
from stemd.compute.scanlines import Lines, destripe, scan_lines
from stemd.config import Device, ModelSettings, Precision, model_settings
from stemd.errors import CheckpointError, ConfigError, ModelOutputError
from stemd.models.adapt import finetune, thinned_pair
from stemd.models.base import FrameModel
from stemd.models.checkpoint import load_checkpoint

DEVICES: tuple[str, ...] = get_args(Device)
PRECISIONS: tuple[str, ...] = get_args(Precision)  # tf32: CUDA matmuls/convolutions only; bf16: CPU and CUDA autocast
FLIPS = ((), (-1,), (-2,), (-2, -1))  # identity, left-right, up-down, both: each keeps scan lines rows
DEFAULT_STEP = 2
CHECK_SIDE = 256  # px: the self-check runs the model on a central crop of at most this side
ADAPT_SIDE = 512  # px: the fine-tune (`adapt`) trains on a central crop of at most this side
ADAPT_MIN_DB = 0.02  # held-out gain (dB) the fine-tuned model must show over the shipped one to be kept


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
    vectors: Vectors | None = None  # its two lattice translations (px), if measured and found: the planar guide's
    lines: Lines = "rows"  # the axis the scan lines run along (the line-jitter correction's and destripe's)
    stripes: bool = False  # the frame's line means flicker beyond its noise: destripe before the model
    blend: float = 1.0  # the model output's weight; the rest is the frame as given to the model (the self-check's)
    checked: str = "no"  # the self-check: "yes" (it chose the blend), "no" (not run), or why it was skipped
    faults: tuple[int, ...] | None = None  # the planar guide's directions with a fault in the measured frame
    # (`planar.fault_directions`; its frames search only these); None: not measured, each frame searches all
    adapted: str = "no"  # the fine-tune (`adapt`): "yes +N dB" (kept), "rejected: ..." or "skipped: ...", or "no"
    model: FrameModel | None = field(default=None, compare=False, repr=False)  # the series' fine-tuned model

    def describe(self) -> dict[str, Any]:
        """Plain data for output metadata and the published header."""
        out: dict[str, Any] = {"factor": self.factor, "source": self.source, "scan_lines": self.lines,
                               "stripes": self.stripes}
        if self.scale_px is not None:
            out["lattice_scale_px"] = round(self.scale_px, 3)
        if self.pixel_size_m is not None:
            out["pixel_size_m"] = self.pixel_size_m
        if self.checked != "no":
            out["self_check"] = {"result": self.checked, "blend": self.blend}
        if self.adapted != "no":
            out["adapt"] = self.adapted
        return out


def _line_vectors(plan: Plan) -> Vectors | None:
    """The plan's lattice translations with the scan lines as rows (swapped where they run along columns)."""
    if plan.vectors is None or plan.lines == "rows":
        return plan.vectors
    (uy, ux), (vy, vx) = plan.vectors
    return (ux, uy), (vx, vy)


def _writable(array: np.ndarray) -> np.ndarray:
    """`array`, copied if read-only (a memory map, a ZeroMQ buffer): torch wants writable memory."""
    return array if array.flags.writeable else array.copy()


def check_finite(frames: np.ndarray) -> None:
    """ModelOutputError if a denoised frame holds NaN or inf: such output is never published or written."""
    if not np.isfinite(frames).all():
        bad = int(np.count_nonzero(~np.isfinite(frames)))
        raise ModelOutputError(f"the model produced {bad} non-finite pixel(s) (NaN or inf); output discarded")


def _flipped(vectors: Vectors, dims: tuple[int, ...]) -> Vectors:
    """Lattice translations (y, x) of a frame flipped along `dims` (-2: y, -1: x)."""
    sy, sx = (-1.0 if -2 in dims else 1.0), (-1.0 if -1 in dims else 1.0)
    (uy, ux), (vy, vx) = vectors
    return (sy * uy, sx * ux), (sy * vy, sx * vx)


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
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # a series' frames share one shape: the fastest kernels, found once
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
             frames: np.ndarray | torch.Tensor | None = None, previous: Plan | None = None) -> Plan:
        """How frames of `shape` (H, W) at this pixel size (metres; None: unknown) are run, or SamplingError.

        With `frames` (a 2D frame or a stack; the first is measured) the frame's lattice is measured
        (`sampling.measure_scale`): with `calibrate` its scale chooses the factor, and a frame without a lattice
        gets no line-jitter correction, and the directions of its planar faults are found (`Plan.faults`: the
        series' frames search only those). Without a measured lattice the pixel size and `lattice_period_m` decide.
        With `self_check` the frame also chooses the blend of the model's output with its input (`self_checked`);
        with `adapt` a copy of the model is fine-tuned on it (`adapted`), or taken from `previous` (the series' last
        plan, at a recalibration) where that one has tried already."""
        hw = (int(shape[-2]), int(shape[-1]))
        scale, lattice, vectors = None, None, None
        lines: Lines = "rows" if self.settings.scan_lines == "auto" else self.settings.scan_lines
        stripes = False
        one = None if frames is None else frames if frames.ndim == 2 else frames[0]
        if one is not None:
            first = self.repaired(torch.as_tensor(_writable(one) if isinstance(one, np.ndarray) else one)
                                  .to(self.device)[None])
            scale, vectors = _sampling.measure_lattice(first.to(torch.float32)[:, None])[0]
            lattice = scale is not None
            lines, stripes = scan_lines(first[0], None if self.settings.scan_lines == "auto" else lines)
        if scale is not None and self.settings.calibrate and self.sampling != "off" and self.scale_range:
            factor = _sampling.plan_from_scale(scale, self.scale_range, hw, self.sampling, self.window)
            made = Plan(hw, pixel_size_m, factor, "frame", scale, lattice, vectors, lines, stripes)
        else:
            factor = _sampling.plan(pixel_size_m, self.lattice_period_m, self.period_range, hw, self.sampling,
                                    min_side=self.window)
            given = pixel_size_m is not None and self.sampling != "off" and self.period_range
            source = "pixel size" if given else "none"
            made = Plan(hw, pixel_size_m, factor, source, scale, lattice, vectors, lines, stripes)
        if vectors is not None and self.planar and "guide" in self.model.inputs:
            for dims in FLIPS if self.flips else ((),):  # the planar guide's geometry, its host reads done here
                _planar.prepare(hw, _flipped(vectors, dims), self.device)
            if one is not None:
                made = replace(made, faults=self._fault_directions(one, made))
        host = None  # the frame on the host, read back from the device only for the split-dose steps
        if one is not None and (self.settings.adapt or self.settings.self_check):
            host = one if isinstance(one, np.ndarray) else one.detach().cpu().numpy()
        if host is not None and self.settings.adapt:
            if previous is not None and previous.adapted != "no" and previous.shape == made.shape:
                made = replace(made, model=previous.model, adapted=previous.adapted)
            else:
                made = self.adapted(made, host)
        if host is not None and self.settings.self_check:
            made = self.self_checked(made, host)
        return made

    def _fault_directions(self, raw: np.ndarray | torch.Tensor, plan: Plan) -> tuple[int, ...]:
        """The planar guide's directions with a fault in one (H, W) raw frame of the series, prepared as the
        pipeline prepares it (`planar.fault_directions`)."""
        assert plan.vectors is not None
        one = torch.as_tensor(_writable(raw) if isinstance(raw, np.ndarray) else raw).to(self.device)[None]
        with torch.inference_mode():
            x = self._dejittered(normalize(self._destriped(one, plan), reference=self.reference)[0][:, None], plan)
            x = x.float()
            spectrum = bragg_spectrum(x)
            return _planar.fault_directions(x, bragg_filter(x, spectrum=spectrum), plan.vectors, spectrum)

    def _central_split(self, plan: Plan, raw: np.ndarray, side: int) -> tuple[_selfcheck.Split, Plan] | str:
        """A central crop of `raw` (side², more where the plan shrinks it below the model's window) split into two
        half-dose frames (`selfcheck.split`), with the plan for the crop's shape; or why it cannot be."""
        h, w = raw.shape
        side = max(side, math.ceil(self.window / plan.factor))  # resampled, still the model's window at least
        top, left = max((h - side) // 2, 0), max((w - side) // 2, 0)
        crop = raw[top:top + side, left:left + side]
        if min(crop.shape) * min(plan.factor, 1.0) < self.window:
            return "skipped: frame smaller than the model's window"
        saturation = float(np.iinfo(raw.dtype).max) if raw.dtype.kind in "iu" and self.settings.outliers else None
        half = _selfcheck.split(crop, saturation)
        if half is None:
            return "skipped: no counting noise to split (or too few counts)"
        return half, replace(plan, shape=(int(crop.shape[0]), int(crop.shape[1])))

    def self_checked(self, plan: Plan, raw: np.ndarray) -> Plan:
        """`plan` with the blend of the model's output and its input that does best on `raw` (one frame of the
        series) by split dose (`stemd.compute.selfcheck`): the model runs on a half-dose split of a central crop
        (CHECK_SIDE², more where the plan shrinks it below the window), scored against the other half. The plan
        as it is, marked with the reason, where a split would not rank blends."""
        made = self._central_split(plan, raw, CHECK_SIDE)
        if isinstance(made, str):
            return replace(plan, checked=made)
        half, trial = made
        given = torch.from_numpy(half.a.astype(np.float32))[None].to(self.device)
        with torch.inference_mode():
            outputs = {"model": (self.run(given, trial)[0].double().cpu().numpy(),
                                 self.prepared(given, trial)[0].double().cpu().numpy())}
        _, blend, _ = _selfcheck.best(outputs, half, plan.lines)
        return replace(plan, blend=blend, checked="yes")

    def adapted(self, plan: Plan, raw: np.ndarray) -> Plan:
        """`plan` with a copy of the model fine-tuned on `raw` (one frame of the series) where that helps
        (`stemd.models.adapt`). The frame's counts are split in two halves (`selfcheck.split`, skipped where it
        would not rank models); the copy trains `adapt` steps on half A alone (thinned again into input and
        target), then the pipeline with each model denoises half A and is scored against half B (lines
        registered). The copy is kept when it beats the shipped model by ADAPT_MIN_DB."""
        made = self._central_split(plan, raw, ADAPT_SIDE)
        if isinstance(made, str):
            return replace(plan, adapted=made)
        half, trial = made
        trial = replace(trial, model=None)
        inputs, target = thinned_pair(half.a, np.random.default_rng(_selfcheck.SEED))
        with torch.inference_mode():  # the target takes the input's corrections: no scan artefact is learnt
            x, lo, hi = normalize(self._destriped(torch.from_numpy(inputs)[None].to(self.device), trial),
                                  reference=self.reference)
            t = self._destriped(torch.from_numpy(target)[None].to(self.device), trial).double()
            t = ((t - lo[:, None, None]) / (hi - lo)[:, None, None]).float()
            x, t = self._dejittered_pair(x[:, None], t[:, None], trial)
            shipped = self._denoise(x, trial)
            shared = line_artefacts((x + t) / 2 - shipped, shipped, trial.lines)  # line gain flicker, left jitter
            x, t = x - shared, t - shared
            aux = self._aux_inputs(x, trial.factor, trial)
            x, t = (v if trial.factor == 1.0 else _sampling.resample(v.float(), trial.factor) for v in (x, t))
        tuned = finetune(self.model, x, t, aux, self.settings.adapt, step=self.step)
        given = torch.from_numpy(half.a.astype(np.float32))[None].to(self.device)
        with torch.inference_mode():
            errors = [_selfcheck.registered_mse(self.run(given, replace(trial, model=m))[0].double().cpu().numpy(),
                                                half.b, half.mask, plan.lines) for m in (None, tuned)]
        gain = 10 * math.log10(errors[0] / errors[1])
        if gain < ADAPT_MIN_DB:
            return replace(plan, adapted=f"rejected: {gain:+.3f} dB held-out")
        return replace(plan, model=tuned, adapted=f"yes {gain:+.3f} dB held-out")

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
        x, lo, hi = normalize(self._destriped(raw, plan), reference=self.reference)
        return denormalize(self.denoise_tensor(x[:, None], plan=plan)[:, 0], lo, hi)

    def prepared(self, raw: torch.Tensor, plan: Plan) -> torch.Tensor:
        """(B, H, W) raw frames after the pipeline's own corrections (outliers, stripes, line jitter), float32 in
        the same units: what the model is asked to denoise, so `prepared - run` is what the model alone took out
        (the live fidelity check's residual)."""
        x, lo, hi = normalize(self._destriped(raw, plan), reference=self.reference)
        return denormalize(self._dejittered(x[:, None], plan)[:, 0], lo, hi)

    def _destriped(self, raw: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Outliers repaired, then line offset flicker taken out along the plan's scan lines when it found some."""
        x = self.repaired(raw)
        return destripe(x, plan.lines) if plan.stripes and self.settings.destripe else x

    def _dejittered(self, frames: torch.Tensor, plan: Plan) -> torch.Tensor:
        """(B, 1, H, W) normalised frames with the line-jitter correction along the plan's scan lines (unless the
        plan found no lattice to fit lines against: on real frames of particles without a measurable lattice it
        moved lines the wrong way, docs/benchmarks.md "Real data"); the plan's lattice tells the shifts that follow
        it from the scan's (`stemd.compute.dejitter`)."""
        if not self.dejitter or plan.lattice is False:
            return frames
        with torch.autocast(frames.device.type, enabled=False):
            if plan.lines == "rows":
                return _dejitter(frames, self.dejitter, plan.vectors)
            return _dejitter(frames.transpose(-2, -1), self.dejitter, _line_vectors(plan)).transpose(-2, -1)

    def _dejittered_pair(self, frames: torch.Tensor, follow: torch.Tensor, plan: Plan
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_dejittered` frames, and `follow` (same shape) moved by the line shifts fitted to the frames."""
        if not self.dejitter or plan.lattice is False:
            return frames, follow
        t = (lambda v: v) if plan.lines == "rows" else (lambda v: v.transpose(-2, -1))
        shifts = row_shifts(t(frames), self.dejitter, _line_vectors(plan))
        return t(shift_rows(t(frames), shifts)), t(shift_rows(t(follow), shifts))

    def denoise_tensor(self, frames: torch.Tensor, pixel_size_m: float | None = None, *,
                       plan: Plan | None = None) -> torch.Tensor:
        """(B, 1, H, W) normalised float tensor on self.device -> float32, same shape, on the device.

        The line-jitter correction (`_dejittered`), then the model resampled by the plan's factor and back (`plan`,
        or one made from `pixel_size_m`). With `flips` the output is the mean over the frame's FLIPS (4x the
        compute: a self-ensemble that averages out part of the model's own error). With `recover` the residual's
        structure above its noise floor is put back (`stemd.compute.residual`). Last, the plan's `blend` of the
        output with the frame as given to the model (`self_checked`)."""
        plan = plan or self.plan(frames.shape, pixel_size_m)
        frames = self._dejittered(frames, plan)
        if not self.flips:
            out = self._denoise(frames, plan)
        else:
            out = sum((self._denoise(frames.flip(dims), plan, dims).flip(dims) for dims in FLIPS),
                      torch.zeros_like(frames, dtype=torch.float32)) / len(FLIPS)
        if self.settings.recover:
            out = recover(frames, out, lines=plan.lines)
        return out if plan.blend == 1.0 else plan.blend * out + (1.0 - plan.blend) * frames.float()

    def _denoise(self, frames: torch.Tensor, plan: Plan, flipped: tuple[int, ...] = ()) -> torch.Tensor:
        """One pass of the model under `precision`, resampled by the plan's factor and back (`flipped`: the
        frames are flipped along these dims). With precision tf32 the CUDA backends may use TF32 (a
        process-wide switch, set here each call); float32 stays strict float32, the precision the accuracy
        figures were measured at (TF32's has not been: docs/benchmarks.md)."""
        factor = plan.factor
        x = frames if factor == 1.0 else _sampling.resample(frames.float(), factor)
        aux = self._aux_inputs(frames, factor, plan, flipped)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.precision == "tf32"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            y = (self.model if plan.model is None else plan.model).denoise_frames(x, self.step, **aux).float()
        return y if factor == 1.0 else _sampling.restore(y, (frames.shape[-2], frames.shape[-1]))

    def _aux_inputs(self, frames: torch.Tensor, factor: float, plan: Plan | None = None,
                    flipped: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
        """The auxiliary inputs the model declares (`FrameModel.inputs`): the guide (the planar-defect guide
        with `planar`, else the Bragg guide) and the noise level, taken at the frame's own sampling (the guide
        then resampled with it): interpolation correlates the noise, so on an upsampled frame the guide's noise
        floor and the noise level would be underestimated (docs/benchmarks.md, "Sampling"). The planar guide
        takes the lattice the plan measured (once per series) when it has one, and shares the Bragg guide's
        Fourier transform; without a measured lattice it measures each frame's own. With `keep_defects` the guide
        then steps aside at the columns the frame contradicts (`stemd.compute.columns`)."""
        aux: dict[str, torch.Tensor] = {}
        with torch.autocast(frames.device.type, enabled=False):
            if "guide" in self.model.inputs:
                x = frames.float()
                spectrum = bragg_spectrum(x)
                guide = bragg_filter(x, spectrum=spectrum)
                vectors, faults = (plan.vectors, plan.faults) if plan is not None else (None, None)
                if self.planar and (plan is None or plan.lattice is None):
                    guide = planar_guide(x, guide, spectrum=spectrum)
                elif self.planar and vectors is not None:
                    guide = planar_guide(x, guide, _flipped(vectors, flipped), spectrum, faults)
                if self.settings.keep_defects and plan is not None and plan.scale_px is not None:
                    guide = keep_columns(x, guide, plan.scale_px)
                aux["guide"] = _sampling.resample(guide, factor)
            if "level" in self.model.inputs:
                aux["level"] = noise_level(frames)
        return aux
