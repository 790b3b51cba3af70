"""Typed settings for the daemon (`Settings`) and for training (`TrainSettings`).

Defaults live here and only here; `config/stemd.yaml` and `config/train.yaml` mirror them.
Each settings object is validated once, at start-up: an unknown key, a value of the wrong
type or one outside its range raises `ConfigError` naming the dotted key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stemd.errors import ConfigError

Device = Literal["auto", "cpu", "cuda"]
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _check_endpoint(value: str) -> str:
    if not value.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError("must start with tcp://, ipc:// or inproc://")
    return value


DEJITTER_DEFAULT, DEJITTER_MAX = 2, 10  # rounds of stemd.compute.dejitter; 2 take ~0.08 s per 512² frame on one CPU thread


def check_dejitter(rounds: Any, key: str = "model.dejitter") -> int:
    """The line-jitter rounds setting, or ConfigError naming `key` (an integer from 0, off, to DEJITTER_MAX)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 0 <= rounds <= DEJITTER_MAX:
        raise ConfigError(f"{key}: must be an integer from 0 (off) to {DEJITTER_MAX}, got {rounds!r}")
    return rounds


class ModelSettings(_Section):
    """The resident denoiser."""

    path: Path | None = None  # None: the model shipped inside the package
    device: Device = "auto"
    step: int | None = Field(default=None, ge=1, le=28)  # None: the checkpoint's default
    precision: Literal["float32", "tf32", "bf16"] = "float32"  # bf16: CPU and CUDA autocast; tf32: CUDA only
    # a frame whose lattice period (lattice_period_m / its header's pixel_size_m) lies outside the
    # model's trained range is resampled into it, refused, or (off) run as is; stemd.compute.sampling
    sampling: Literal["resample", "refuse", "off"] = "resample"
    lattice_period_m: float = Field(default=3.905e-10, gt=1e-11, lt=1e-8, allow_inf_nan=False)  # SrTiO3 a
    flips: bool = False  # average the model over the frame's 4 flips: 4x the compute, +0.1-0.4 dB (docs/benchmarks.md)
    # rounds of line-jitter correction before the model (stemd.compute.dejitter; 0: off): +3 dB at dose 200, ±0.05 dB at dose 2
    dejitter: int = Field(default=DEJITTER_DEFAULT, ge=0, le=DEJITTER_MAX)
    # conv models: across a planar fault (an RP fault), guide with the frame averaged along it (stemd.compute.planar)
    planar: bool = True


class InputSettings(_Section):
    """Where raw frames come from (the microscope, or `stemd simulate`)."""

    endpoint: str = "tcp://127.0.0.1:5555"
    mode: Literal["connect", "bind"] = "connect"
    hwm: int = Field(default=16, ge=1)
    _endpoint = field_validator("endpoint")(_check_endpoint)


class OutputSettings(_Section):
    """Where cleaned frames go (live viewers, recorders)."""

    endpoint: str = "tcp://127.0.0.1:5556"
    hwm: int = Field(default=16, ge=1)
    publish_raw: bool = True  # republish raw frames on the `raw` topic beside `denoised`
    _endpoint = field_validator("endpoint")(_check_endpoint)


class QueueSettings(_Section):
    """Backpressure between the socket and the model."""

    mode: Literal["live", "lossless"] = "live"  # live: drop oldest when behind
    maxsize: int = Field(default=4, ge=1)  # live mode: the worst wait is about one batch
    max_batch: int = Field(default=4, ge=1)  # frames of one shape denoised together


class LimitsSettings(_Section):
    """What a frame may be before it is rejected."""

    min_side: int = Field(default=28, ge=1)
    max_side: int = Field(default=8192, ge=28)
    max_pixels: int = Field(default=8192 * 8192, ge=28 * 28)


class RecordingSettings(_Section):
    """Optional TIFF recording, one file per series and kind."""

    enabled: bool = False
    directory: Path = Path("recordings")
    raw: bool = True
    denoised: bool = True


class StatsSettings(_Section):
    interval_s: float = Field(default=5.0, gt=0)


class Settings(_Section):
    """Everything `stemd run` needs; one object, validated at start-up."""

    model: ModelSettings = ModelSettings()
    input: InputSettings = InputSettings()
    output: OutputSettings = OutputSettings()
    queue: QueueSettings = QueueSettings()
    limits: LimitsSettings = LimitsSettings()
    recording: RecordingSettings = RecordingSettings()
    stats: StatsSettings = StatsSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class NoiseSettings(_Section):
    """Training noise; see `stemd.sim.lattice.NoiseSpec` for the exact formulas."""

    kind: Literal["uniform", "poisson", "gaussian", "none"] = "uniform"
    snr: float = Field(default=0.33, gt=0)  # uniform and gaussian kinds
    dose: float = Field(default=50.0, gt=0)  # poisson: expected counts at brightest column
    read_sigma: float = Field(default=0.0, ge=0)  # extra Gaussian read noise, fraction of max
    line_jitter_px: float = Field(default=0.0, ge=0)
    line_gain: float = Field(default=0.0, ge=0)
    line_offset: float = Field(default=0.0, ge=0)
    background: float = Field(default=0.0, ge=0)  # poisson: flat signal under the lattice, fraction of max


class LatticeSettings(_Section):
    """The synthetic SrTiO3-like lattice the model is trained on."""

    period_px: float = Field(default=10.0, gt=2)  # Sr-Sr distance in pixels
    sigma_px: float = Field(default=1.5, gt=0)  # Gaussian column width
    max_rotation_deg: float = Field(default=90.0, ge=0, le=360)  # 90: every orientation (the paper: 45)


class ConvSettings(_Section):
    """`model: conv_unet`: the network (stemd.models.conv_unet) and the patches it learns from (stemd.sim.scenes)."""

    channels: tuple[int, ...] = (48, 64, 96, 128)  # U-Net level widths, finest first
    guide: Literal["none", "bragg"] = "bragg"  # bragg: the frame's lattice Fourier components as a second input
    noise_level: bool = False  # also input the frame's noise std (stemd.compute.fourier.noise_level), so one model fits every dose
    dejitter: int = Field(default=0, ge=0, le=DEJITTER_MAX)  # rounds of stemd.compute.dejitter on each training recording
    patch: int = Field(default=96, ge=28)  # training patch side, pixels
    scene_size: int = Field(default=384, ge=28)  # side of the scenes patches are cut from, each normalised whole
    dose: tuple[float, float] = (2.0, 200.0)  # expected counts at the brightest column, log-uniform
    period_px: tuple[float, float] = (6.0, 20.0)  # lattice periods, log-uniform; stored as the model's range
    val_scenes: int = Field(default=48, ge=3)  # validation: whole 256 px scenes at doses spread over `dose`

    @field_validator("channels")
    @classmethod
    def _positive_widths(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(c < 1 for c in v):
            raise ValueError("must be a non-empty list of positive widths")
        return v

    @field_validator("dose", "period_px")
    @classmethod
    def _range(cls, v: tuple[float, float], info: Any) -> tuple[float, float]:
        low = 2.0 if info.field_name == "period_px" else 0.0
        if not low < v[0] <= v[1]:
            raise ValueError(f"must be [low, high] with {low:g} < low <= high")
        return v

    @field_validator("scene_size")
    @classmethod
    def _holds_a_patch(cls, v: int, info: Any) -> int:
        if v < info.data.get("patch", 0):
            raise ValueError(f"must be at least the patch side ({info.data['patch']})")
        return v


class TrainSettings(_Section):
    """Everything `stemd train` needs."""

    seed: int = Field(default=0, ge=0)
    samples: int = Field(default=700_000, ge=1)  # training windows, generated on the fly
    batch_size: int = Field(default=32, ge=1)  # small batches: more Adam steps per sample (docs/training.md)
    lr: float = Field(default=2e-3, gt=0)
    lr_decay: Literal["none", "cosine", "step"] = "cosine"  # step: halve at each quarter of the run
    val_samples: int = Field(default=10_000, ge=1)
    val_every: int = Field(default=100_000, ge=1)  # samples between validations
    window: int = Field(default=28, ge=8)
    hidden: tuple[int, ...] = (256, 128)  # encoder widths; the last is the code size m (docs/training.md)
    device: Device = "auto"
    threads: int = Field(default=1, ge=0)  # CPU threads for torch; 0: every core (slower on a busy machine)
    out: Path = Path("runs/default")
    noise: NoiseSettings = NoiseSettings()
    # more noise models; batches cycle through noise + these. Default: fast-scan-like Poisson frames
    noise_mix: tuple[NoiseSettings, ...] = (
        NoiseSettings(kind="poisson", dose=5.0, background=0.1, line_jitter_px=0.3, line_gain=0.03, line_offset=0.02),
        NoiseSettings(kind="poisson", dose=15.0, background=0.1),
        NoiseSettings(kind="poisson", dose=40.0, background=0.1, line_jitter_px=0.5, line_gain=0.05, line_offset=0.03),
        NoiseSettings(kind="poisson", dose=120.0, background=0.1),
    )
    lattice: LatticeSettings = LatticeSettings()
    model: Literal["window_ae", "conv_unet"] = "window_ae"  # conv_unet: set in `conv`; samples count patches
    warmup: int = Field(default=0, ge=0)  # samples of linear learning-rate warm-up
    grad_clip: float = Field(default=0.0, ge=0)  # gradient norm clipped to this; 0: off
    precision: Literal["float32", "bfloat16"] = "float32"  # bfloat16: autocast forward passes (validation stays float32)
    init: Path | None = None  # start from this checkpoint's weights (same architecture), a fresh optimizer: fine-tuning
    # mse: one L2 loss over the batch, dominated by the noisiest (lowest-dose) samples; log_mse: the mean over
    # samples of 10*log10(MSE), i.e. minus their mean PSNR, which weights every dose alike. It also picks best.pt.
    loss: Literal["mse", "log_mse"] = "mse"
    conv: ConvSettings = ConvSettings()

    @field_validator("hidden")
    @classmethod
    def _code_smaller_than_window(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(h < 1 for h in v):
            raise ValueError("must be a non-empty list of positive widths")
        return v


def _format_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg} (got {err.get('input')!r})")
    return "\n".join(lines)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Merge dotted-key overrides (`{"model.step": 3}`) into a nested mapping."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            child = node.get(p)
            node[p] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[leaf] = value
    return out


def _load(cls: type[_Section], path: Path | None, overrides: Mapping[str, Any] | None):
    data = _read_yaml(Path(path)) if path is not None else {}
    data = _merge(data, overrides or {})
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, str(path) if path else "defaults")) from None


def load_settings(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Daemon settings from a YAML file (or defaults) plus dotted-key CLI overrides."""
    return _load(Settings, path, overrides)


def load_train_settings(
    path: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> TrainSettings:
    """Training settings from a YAML file (or defaults) plus dotted-key CLI overrides."""
    return _load(TrainSettings, path, overrides)


def is_local_endpoint(endpoint: str) -> bool:
    """True when a tcp endpoint names a loopback host (ipc/inproc are always local)."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0]
    return host in LOCAL_HOSTS
