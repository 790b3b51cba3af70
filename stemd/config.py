"""Typed settings for the daemon (`Settings`) and for training (`TrainSettings`).

Defaults live here and only here; `config/stemd.yaml` and `config/train.yaml` mirror them.
Each settings object is validated once, at start-up: an unknown key, a value of the wrong
type or one outside its range raises `ConfigError` naming the dotted key and what is allowed.
"""

from __future__ import annotations

import importlib.util
from argparse import BooleanOptionalAction
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stemd.errors import ConfigError

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["float32", "tf32", "bf16"]
SamplingPolicy = Literal["resample", "refuse", "off"]
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")
SRTIO3_A_M = 3.905e-10  # SrTiO3's lattice constant a (m): the training scenes' perovskite, the simulator's specimen
MIN_SIDE = 28  # the smallest frame side any model takes (the paper AE's window)
MAX_SIDE = 8192  # the largest frame side accepted by default
DEJITTER_DEFAULT, DEJITTER_MAX = 2, 10  # rounds of line-jitter correction
ENV_PREFIX = "STEMD_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


S = TypeVar("S", bound=_Section)


def _check_endpoint(value: str) -> str:
    if not value.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError("must start with tcp://, ipc:// or inproc://")
    return value


class ModelSettings(_Section):
    """The resident denoiser: which model, where, and the steps around it."""

    path: Path | None = Field(None, description="checkpoint file; null = the model shipped in the package")
    device: Device = Field("auto", description="auto (cuda if available) | cpu | cuda")
    step: int | None = Field(None, ge=1, le=MIN_SIDE,
                             description="window models' floating-window step in pixels; null = the checkpoint's")
    precision: Precision = Field("float32", description="float32 (strict, TF32 off on CUDA too: the precision "
                                 "every accuracy figure was measured at) | tf32 (CUDA only; its accuracy not yet "
                                 "measured: bench/speed.py on a GPU) | bf16 (CPU and CUDA autocast; "
                                 "~2x faster for the conv model on CPUs with AMX or AVX512-BF16)")
    sampling: SamplingPolicy = Field("resample", description="a frame whose lattice period in px (lattice_period_m / "
                                     "its pixel size) is outside the model's trained range is resampled into it and "
                                     "back, refused (counted as sampling), or run as is (off); no pixel size: as is")
    threads: int = Field(0, ge=0, le=256, description="CPU threads for torch; 0: torch's default (one per "
                         "core). On an acquisition PC whose own software keeps a core busy, 1 can be faster "
                         "(bench/latency.py --load 1)")
    calibrate: bool = Field(True, strict=True, description="measure the lattice from the frame itself (its "
                            "shortest lattice translation) to choose the resampling, so no pixel size or lattice "
                            "period is needed; a frame without a lattice falls back on pixel size x "
                            "lattice_period_m. false: always pixel size x lattice_period_m")
    calibrate_every: int = Field(64, ge=1, description="live: the lattice is measured on a series' first frame and "
                                 "again every this many frames (with its planar faults), on the engine's thread "
                                 "(~100 ms CPU per 512² frame, 1 thread: bench.stages)")
    lattice_period_m: float = Field(SRTIO3_A_M, gt=1e-11, lt=1e-8, allow_inf_nan=False,
                                    description="the specimen's projected lattice period, metres (SrTiO3 a); "
                                    "used with the pixel size when the frame's own lattice is not measured")
    outliers: bool = Field(True, strict=True, description="treat saturated pixels (the detector's maximum) and "
                           "isolated hot pixels as missing data: replaced by the mean of their valid neighbours "
                           "before normalisation, the model's estimate written there")
    flips: bool = Field(
        False, strict=True, description="average the model over the frame's 4 flips: 4x the compute, +0.1-0.4 dB"
    )
    dejitter: int = Field(DEJITTER_DEFAULT, ge=0, le=DEJITTER_MAX,
                          description="rounds of line-jitter correction before the model (stemd.compute.dejitter); "
                                      "0: off (saves ~20-30 ms CPU per 512² frame, 1 thread: bench.stages)")
    scan_lines: Literal["auto", "rows", "columns"] = Field(
        "auto", description="the axis the scan lines run along, for the line-jitter correction and destripe. "
        "auto: told by the frame's own line artefacts (stemd.compute.scanlines; rows when it shows none), "
        "measured with the lattice")
    destripe: bool = Field(True, strict=True, description="take each scan line's offset flicker (stripes) out "
                           "before the model, when the frame's line means vary more than its noise allows")
    self_check: bool = Field(False, strict=True, description="when a plan is made from a frame (once per series, "
                             "and at each recalibration): its counts are split into two half-dose frames, the model "
                             "run on one and scored against the other (lines registered), and the blend of the "
                             "model's output with its input (weight 1 to 0.5) that scores best is kept for the "
                             "series; one model pass on one frame (a central crop of at most 256²). Skipped where "
                             "the noise is not counting noise, is correlated, or is under 2 counts per pixel. "
                             "Off by default: +0.03-0.08 dB on real frames for 0.3-0.5 s of CPU on the engine's "
                             "thread per plan (a live series' recalibrations stall it). false: the model's output")
    adapt: int = Field(0, ge=0, le=5000, description="when a plan is made from a frame: fine-tune a copy of the "
                       "model this many steps on the frame's own counts (split-dose, self-supervised: "
                       "stemd.models.adapt), kept for the series only where a held-out half-dose split scores it "
                       "better than the shipped model; skipped like the self-check. Off (0) by default: ~300 "
                       "steps, +0.01-0.12 dB held-out on real frames (bench.real), take ~1 min of CPU "
                       "per plan (the engine's thread stalls that long live, once per series; offline or on a GPU)")
    planar: bool = Field(
        True,
        strict=True,
        description="conv models: across a planar fault the guide is the frame averaged along "
        "it (stemd.compute.planar); a series' plan looks for faults and its frames search only along "
        "those (none: no cost). false: the Bragg guide everywhere (saves ~13 ms CPU per 512² frame with a "
        "fault, 1 thread: bench.stages)",
    )
    keep_defects: bool = Field(
        True,
        strict=True,
        description="conv models: the guide steps aside at an atom column the frame contradicts (a vacancy, a "
        "partly empty column, a dopant), so the model keeps it instead of pulling it to the host lattice, and "
        "takes in a column where the lattice has none (an adatom) "
        "(stemd.compute.columns; bench.faithfulness --point-defects; ~30 ms CPU per 512² frame, 1 thread)",
    )
    recover: bool = Field(
        True,
        strict=True,
        description="put back what the model took out beyond the counting noise: a Wiener filter on its residual "
        "keeps the frequencies where the residual stands clear of its white-noise floor (a real frame's texture, "
        "column shapes, detail above the trained counts), and leaves a residual of noise alone as it is "
        "(stemd.compute.residual; bench.real; ~10 ms CPU per 512² frame, 1 thread)",
    )


class InputSettings(_Section):
    """Where raw frames come from (the microscope, or `stemd simulate`)."""

    endpoint: str = Field("tcp://127.0.0.1:5555", description="tcp://, ipc:// or inproc://")
    mode: Literal["connect", "bind"] = Field("connect", description="connect (the microscope binds) | bind "
                                                                    "(the microscope connects)")
    hwm: int = Field(16, ge=1, description="receive high-water mark, messages buffered by ZeroMQ")
    format: Literal["stemd", "array-1.0"] = Field("stemd", description="stemd (docs/protocol.md) | array-1.0 "
                                                  "(EPICS areaDetector's ADZMQ plugin: JSON header + raw data)")
    socket: Literal["sub", "pull"] = Field("sub", description="sub (the source PUBlishes) | pull (it PUSHes)")
    _endpoint = field_validator("endpoint")(_check_endpoint)


class OutputSettings(_Section):
    """Where cleaned frames go (live viewers, recorders)."""

    endpoint: str = Field("tcp://127.0.0.1:5556", description="always bound; a non-loopback address logs a warning")
    hwm: int = Field(16, ge=1, description="send high-water mark per subscriber; a slower subscriber loses frames")
    publish_raw: bool = Field(True, description="also republish each raw frame on the `raw` topic")
    _endpoint = field_validator("endpoint")(_check_endpoint)


class QueueSettings(_Section):
    """Backpressure between the socket and the model."""

    mode: Literal["live", "lossless"] = Field("live", description="live: drop the oldest frame when full | "
                                                                  "lossless: stop reading instead")
    maxsize: int = Field(4, ge=1, description="frames waiting for the model (live: more only adds latency)")
    max_batch: int = Field(4, ge=1, description="frames of one shape denoised together")
    max_batch_pixels: int = Field(0, ge=0, description="pixels in one batch at most, and so in one frame (a larger "
                                  "frame is rejected, too_large); 0: half the device's free memory at start over "
                                  "the measured cost per pixel (docs/benchmarks.md, Reliability)")
    stop_timeout_s: float = Field(20.0, gt=0, description="on SIGTERM, seconds to finish queued frames and exit; "
                                  "frames left are counted as dropped (shutdown); keep below systemd's TimeoutStopSec")
    max_events: int = Field(64, ge=1, description="series events waiting (they ride in order with the frames); "
                            "a flood of them drops the oldest event, counted as events_dropped, never a frame")


class LimitsSettings(_Section):
    """What a frame may be before it is rejected (counted by reason)."""

    min_side: int = Field(MIN_SIDE, ge=1, description="smallest side in pixels (never below the model's window)")
    max_side: int = Field(MAX_SIDE, ge=MIN_SIDE, description="largest side in pixels")
    max_pixels: int = Field(MAX_SIDE * MAX_SIDE, ge=MIN_SIDE * MIN_SIDE, description="H * W")


class RecordingSettings(_Section):
    """Optional recording, one file per series and kind."""

    enabled: bool = Field(False, description="record the frames that pass through")
    directory: Path = Field(Path("recordings"), description="created if missing; files are <series>_<kind>.tif "
                            "(.zspy, .hspy)")
    format: Literal["tiff", "zspy", "hspy"] = Field(
        "tiff", description="tiff: a page per frame, its header as JSON; zspy or hspy (the formats extra): a "
        "HyperSpy (N, H, W) signal appended frame by frame, the pixel size as axis scale, the frame ids in "
        "original_metadata.stemd (zspy: a crash loses at most the frame being written)")
    raw: bool = Field(True, description="record raw frames")
    denoised: bool = Field(True, description="record denoised frames (float32)")
    idle_close_s: float = Field(300.0, gt=0, description="a series' files are closed after this many seconds "
                                "without a frame (a publisher that crashed never ends its series); a later frame "
                                "of it opens <series>_<kind>-1.tif")
    max_open: int = Field(32, ge=2, description="open recording files at most; opening one more closes the one "
                          "written least recently")

    @field_validator("format")
    @classmethod
    def _format_installed(cls, value: str) -> str:
        if value != "tiff" and importlib.util.find_spec("rsciio") is None:
            raise ValueError(f"{value} needs the formats extra: pip install 'stemd[formats]'")
        return value


class StatsSettings(_Section):
    """Counters and latencies, published and logged."""

    interval_s: float = Field(5.0, gt=0, description="seconds between stats on the `stats` topic, in the log "
                                                     "and in STATUS=")


class FidelitySettings(_Section):
    """The live fidelity check: split-dose held-out scores on the frames the daemon denoises (no truth needed)."""

    enabled: bool = Field(True, strict=True, description="split a frame's counts into two independent halves, "
                          "denoise one, score it against the other and against a Gaussian reference; published "
                          "per series in the stats, the frame headers and the log")
    every: int = Field(0, ge=0, description="check every this many frames of a series; 0: as often as budget_pct "
                       "allows")
    budget_pct: float = Field(10.0, gt=0, le=100, description="with every 0: the checks' time at most this share "
                              "of the model's time (a check costs about one model run on a half frame)")
    window: int = Field(8, ge=1, le=1000, description="the running estimate is the mean ± std of a series' last "
                        "this many checks")
    action: Literal["warn", "fallback"] = Field("warn", description="when a series is flagged: warn (log, "
                                                "header flag, STATUS=) | fallback (also publish the Gaussian "
                                                "reference's output instead of the model's, flagged)")
    min_over_reference_db: float = Field(0.0, ge=-30, le=30, description="flag a series whose running gain over "
                                         "the reference is below this (dB)")
    max_residual: float = Field(3.0, gt=0, description="flag a series whose running residual ratio (Bragg-band "
                                "power of the corrected raw frame - denoised over that of noise alone) is above "
                                "this: lattice removed or invented (measured: the conv model 0.4-1.9 on simulated "
                                "and real frames, the paper AE run as is where it misfits 20-270; "
                                "docs/benchmarks.md, Fidelity)")
    warn_interval_s: float = Field(60.0, gt=0, description="a flagged series is warned about in the log when "
                                   "flagged and again at most this often")


def parse_metrics_endpoint(value: str) -> tuple[str, int]:
    """`host:port` or `http://host:port` (IPv6 in brackets: `[::1]:9108`) -> (host, port); port 0 picks a free one."""
    rest = value.removeprefix("http://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535 or "/" in rest:
        raise ValueError("must be host:port or http://host:port, e.g. 127.0.0.1:9108")
    return host.removeprefix("[").removesuffix("]"), int(port)


def is_local_host(host: str) -> bool:
    """True for a loopback host name or address (IPv6 with or without brackets)."""
    return host in LOCAL_HOSTS or host == "::1"


class MetricsSettings(_Section):
    """Prometheus metrics over HTTP (needs the metrics extra: pip install stemd[metrics])."""

    endpoint: str | None = Field(None, description="null: off; host:port (or http://host:port) serving /metrics, "
                                 "e.g. 127.0.0.1:9108; a non-loopback address logs a warning; read at start, "
                                 "not on reload")

    @field_validator("endpoint")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None:
            parse_metrics_endpoint(v)
        return v


class Settings(_Section):
    """Everything `stemd run` needs; one object, validated at start-up."""

    model: ModelSettings = ModelSettings()
    input: InputSettings = InputSettings()
    output: OutputSettings = OutputSettings()
    queue: QueueSettings = QueueSettings()
    limits: LimitsSettings = LimitsSettings()
    recording: RecordingSettings = RecordingSettings()
    stats: StatsSettings = StatsSettings()
    metrics: MetricsSettings = MetricsSettings()
    fidelity: FidelitySettings = FidelitySettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="DEBUG | INFO | WARNING | ERROR"
    )


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
    noise_level: bool = False
    dejitter: int = Field(
        default=0, ge=0, le=DEJITTER_MAX
    )  # rounds of stemd.compute.dejitter on each training recording
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
    precision: Literal["float32", "bfloat16"] = (
        "float32"  # bfloat16: autocast forward passes (validation stays float32)
    )
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


def _format_error(exc: ValidationError, source: str, prefix: str = "", given: Collection[str] = ()) -> str:
    """One line per problem, naming the dotted key (and the command-line option, for keys in `given`)."""
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        key = prefix + ".".join(str(p) for p in err["loc"]) or "(top level)"
        key += f" ({option_name(key)})" if key in given and (key in OPTION_NAMES or key in MODEL_KEYS) else ""
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg} (got {err.get('input')!r})")
    return lines[0] + lines[1][1:] if len(lines) == 2 else "\n".join(lines)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
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


def _load(cls: type[S], path: Path | None, overrides: Mapping[str, Any] | None,
          environ: Mapping[str, str] | None = None) -> S:
    data = _read_yaml(Path(path)) if path is not None else {}
    data = _merge(data, env_overrides(environ, cls) if environ is not None else {})
    data = _merge(data, overrides or {})
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        where = " and ".join(filter(None, [str(path) if path else "", "the command line" if overrides else ""]))
        raise ConfigError(_format_error(exc, where or "defaults", given=set(overrides or {}))) from None


def load_settings(path: Path | None = None, overrides: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Daemon settings: defaults < the YAML file < `STEMD_SECTION__KEY` variables in `environ` < dotted-key
    overrides (the command line). `environ` None reads no variables (tests); the commands pass os.environ."""
    return _load(Settings, path, overrides, environ)


def load_train_settings(
    path: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> TrainSettings:
    """Training settings from a YAML file (or defaults) plus dotted-key CLI overrides."""
    return _load(TrainSettings, path, overrides)


def model_settings(base: ModelSettings | None = None, **fields: Any) -> ModelSettings:
    """`base` (default: the defaults) with `fields` replaced, validated; ConfigError names `model.<key>`."""
    data = (base or ModelSettings()).model_dump()
    data.update(fields)
    try:
        return ModelSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            _format_error(exc, "model settings", prefix="model.", given={f"model.{k}" for k in fields})
        ) from None


def env_overrides(environ: Mapping[str, str], cls: type[_Section] = Settings) -> dict[str, Any]:
    """Dotted-key overrides from `STEMD_<SECTION>__<KEY>` variables (`STEMD_MODEL__PRECISION=bf16`,
    `STEMD_LOG_LEVEL=DEBUG`), values read as YAML scalars; an unknown name is refused, not ignored."""
    out: dict[str, Any] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "STEMD_CONFIG":
            continue
        dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
        if _field(cls, dotted) is None:
            raise ConfigError(f"environment variable {name}: no setting {dotted} (e.g. STEMD_MODEL__PRECISION)")
        try:
            out[dotted] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            out[dotted] = text
    return out


def _field(cls: type[BaseModel], dotted: str) -> Any:
    """The pydantic FieldInfo of a dotted key in `cls`, or None."""
    head, _, rest = dotted.partition(".")
    info = cls.model_fields.get(head)
    if info is None or not rest:
        return info
    sub = info.annotation
    return _field(sub, rest) if isinstance(sub, type) and issubclass(sub, BaseModel) else None


def is_local_endpoint(endpoint: str) -> bool:
    """True when a tcp endpoint names a loopback host (ipc/inproc are always local)."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0]
    return host in LOCAL_HOSTS


# ---- one source for config/stemd.yaml and the command line ---------------------------------------

YAML_HEADER = """\
# Daemon settings for `stemd run --config config/stemd.yaml` (and `stemd denoise --config`).
# Written by `python -m stemd.config` from the defaults and descriptions in stemd/config.py;
# edit a copy for a deployment. Every key is optional; an unknown key or a bad value stops
# start-up with an error naming the key. Precedence: defaults < this file < environment
# variables STEMD_<SECTION>__<KEY> (e.g. STEMD_MODEL__PRECISION=bf16) < command-line options.
# SIGHUP re-reads this file and the model; a bad file is rejected and the running settings kept.
"""


def _yaml_value(value: Any) -> str:
    plain = str(value) if isinstance(value, Path) else value
    return yaml.safe_dump(plain, default_flow_style=True).strip().removesuffix("\n...").strip()


def _comment_lines(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines


def render_yaml(settings: Settings | None = None, width: int = 110) -> str:
    """`settings` (default: the defaults) as commented YAML: each key with its value and its description."""
    settings = settings or Settings()
    out = [YAML_HEADER]
    for name, info in Settings.model_fields.items():
        value = getattr(settings, name)
        if isinstance(value, BaseModel):
            doc = (type(value).__doc__ or "").strip().splitlines()[0]
            out.append(f"{name}:".ljust(24) + f"# {doc}")
            for key, sub in type(value).model_fields.items():
                out += _keyed(f"  {key}: {_yaml_value(getattr(value, key))}", sub.description or "", width)
            out.append("")
        else:
            out += _keyed(f"{name}: {_yaml_value(value)}", info.description or "", width)
    return "\n".join(out).rstrip() + "\n"


def _keyed(line: str, description: str, width: int) -> list[str]:
    column = max(24, len(line) + 2)
    comments = _comment_lines(description, width - column - 2)
    if not comments:
        return [line]
    return [line.ljust(column) + f"# {comments[0]}"] + [" " * column + f"# {c}" for c in comments[1:]]


OPTION_NAMES = {"model.path": "--model", "model.lattice_period_m": "--lattice-period", "input.endpoint": "--input",
                "output.endpoint": "--output", "queue.mode": "--mode", "metrics.endpoint": "--metrics"}
MODEL_KEYS = tuple(f"model.{key}" for key in ModelSettings.model_fields)  # the options of every denoising command


def option_name(key: str) -> str:
    """The command-line option of a dotted settings key: `model.step` -> `--step`."""
    return OPTION_NAMES.get(key, "--" + key.rsplit(".", 1)[-1].replace("_", "-"))


def add_setting_options(parser: Any, keys: tuple[str, ...]) -> None:
    """argparse options for dotted `Settings` keys, derived from their types and descriptions: a Literal gives
    the choices, a bool --x/--no-x; every option defaults to None (not given), so the file's value stands."""
    for key in keys:
        info = _field(Settings, key)
        if info is None:
            raise KeyError(key)
        option = option_name(key)
        kwargs: dict[str, Any] = {"dest": "setting:" + key, "default": None, "help": f"{info.description} ({key})"}
        kind = info.annotation
        args = getattr(kind, "__args__", ())
        if kind is bool:
            kwargs["action"] = BooleanOptionalAction
        elif getattr(kind, "__origin__", None) is Literal:
            kwargs["choices"] = list(args)
        else:
            base = next((a for a in args if a is not type(None)), kind)
            kwargs["type"] = base if base in (int, float, Path) else str
            kwargs["metavar"] = {int: "N", float: "X", Path: "PATH"}.get(base, "VALUE")
        parser.add_argument(option, **kwargs)


def setting_overrides(args: Any) -> dict[str, Any]:
    """The dotted-key overrides the options of `add_setting_options` were given (None: not given)."""
    return {dest.split(":", 1)[1]: value for dest, value in vars(args).items()
            if dest.startswith("setting:") and value is not None}


if __name__ == "__main__":
    print(render_yaml(), end="")
