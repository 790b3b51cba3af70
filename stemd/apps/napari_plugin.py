"""The napari plugin (`stemd[napari]`, manifest stemd/napari.yaml): a live view of a running daemon, and a
command that denoises the selected image layer with the default model.

`LiveWidget` subscribes to a daemon's output (`stemd.apps.viewer.Subscription`) from a QTimer that polls a
non-blocking socket, so the Qt event loop never waits on the network; only the latest matched raw/denoised pair
is kept and shown, in one raw and one denoised layer updated in place. `denoise_layer` runs the model in a
napari worker thread, one frame of a stack at a time, with progress.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Generator
from typing import Any

import numpy as np
from napari.layers import Image, Layer
from napari.qt.threading import GeneratorWorker, thread_worker
from napari.utils.notifications import show_error
from napari.viewer import Viewer
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFormLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton, QVBoxLayout, QWidget

from stemd.apps.viewer import DEFAULT_ENDPOINT, LiveStats, PairMatcher, Subscription, feed
from stemd.compute.normalize import check_frames
from stemd.config import MIN_SIDE
from stemd.errors import InputError, StemdError
from stemd.live import protocol
from stemd.pipeline import Denoiser

RAW_LAYER = "stemd raw"
DENOISED_LAYER = "stemd denoised"
POLL_MS = 30  # the timer's period: ~30 polls a second, each taking what has arrived without waiting
MAX_MESSAGES = 64  # per poll, so a flood cannot hold the event loop; the socket's RCVHWM bounds the rest


def pixel_scale(header: dict[str, Any]) -> tuple[tuple[float, float], str]:
    """The layers' (scale, unit) from a frame header: its pixel size in nm, else 1 pixel."""
    size = header.get("pixel_size_m")
    if isinstance(size, (int, float)) and not isinstance(size, bool) and math.isfinite(size) and size > 0:
        return (size * 1e9, size * 1e9), "nm"
    return (1.0, 1.0), "pixel"


class LiveWidget(QWidget):
    """Dock widget: one raw and one denoised layer kept on a running daemon's latest frame, with its stats."""

    no_frames_s = 5.0  # connected this long without a pair: say what to check

    def __init__(self, napari_viewer: Viewer, endpoint: str = DEFAULT_ENDPOINT) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.layers: dict[str, Image] = {}
        self.shown = 0  # pairs shown since start()
        self.header: dict[str, Any] = {}  # the denoised header of the pair shown
        self._sub: Subscription | None = None
        self._matcher = PairMatcher(keep=4)
        self._stats = LiveStats()
        self._started = 0.0
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self.poll)

        self.endpoint_edit = QLineEdit(endpoint)
        self.button = QPushButton("Connect")
        self.button.clicked.connect(self._toggle)
        self.status_label = QLabel("not connected")
        self.status_label.setWordWrap(True)
        self.frame_label, self.fps_label, self.latency_label, self.drops_label = (QLabel("–") for _ in range(4))
        row = QHBoxLayout()
        row.addWidget(self.endpoint_edit)
        row.addWidget(self.button)
        form = QFormLayout()
        for name, label in (("frame", self.frame_label), ("fps", self.fps_label), ("latency", self.latency_label),
                            ("dropped", self.drops_label)):
            form.addRow(name, label)
        box = QVBoxLayout(self)
        box.addLayout(row)
        box.addWidget(self.status_label)
        box.addLayout(form)
        box.addStretch(1)

    @property
    def connected(self) -> bool:
        return self._sub is not None

    def start(self, endpoint: str | None = None) -> None:
        """Subscribe to `endpoint` (default: the one typed in) and start polling; a bad endpoint is shown."""
        self.stop()
        endpoint = (endpoint or self.endpoint_edit.text()).strip()
        self.endpoint_edit.setText(endpoint)
        try:
            self._sub = Subscription(endpoint, (protocol.RAW, protocol.DENOISED, protocol.STATS))
        except StemdError as exc:
            self.status_label.setText(f"error: {exc}")
            show_error(f"stemd: {exc}")
            return
        self._matcher, self._stats, self.shown = PairMatcher(keep=4), LiveStats(), 0
        self._started = time.monotonic()
        self.status_label.setText(f"waiting for frames from {endpoint}")
        self.button.setText("Disconnect")
        self._timer.start()

    def stop(self) -> None:
        """Stop polling and close the socket; the layers keep the last frame."""
        self._timer.stop()
        if self._sub is not None:
            self._sub.close()
            self._sub = None
            self.status_label.setText(f"disconnected ({self.shown} frames shown)")
        self.button.setText("Connect")

    def _toggle(self) -> None:
        if self.connected:
            self.stop()
        else:
            self.start()

    def poll(self) -> None:
        """Take what has arrived (never waits), show the newest complete pair and the latest stats. A failure
        stops the view with an error rather than repeating on every tick."""
        if self._sub is None:
            return
        try:
            self._poll(self._sub)
        except Exception as exc:
            self.stop()
            self.status_label.setText(f"error: {exc}")
            show_error(f"stemd: the live view stopped: {exc}")

    def _poll(self, sub: Subscription) -> None:
        now = time.time()
        if feed(sub.receive(0, limit=MAX_MESSAGES), self._matcher, self._stats, now):
            pair = self._matcher.latest
            assert pair is not None  # feed said a pair completed
            self._show(pair)
        elif self.shown == 0 and time.monotonic() - self._started > self.no_frames_s:
            skipped = f", {sub.skipped} malformed messages skipped" if sub.skipped else ""
            self.status_label.setText(f"no frames from {sub.endpoint} yet{skipped}: is `stemd run` running "
                                      "there with output.publish_raw on?")
        self._show_stats(now)

    def _show(self, pair: dict[str, protocol.Frame]) -> None:
        header = self.header = pair["denoised"].header
        scale, unit = pixel_scale(header)
        for kind, name in (("raw", RAW_LAYER), ("denoised", DENOISED_LAYER)):
            data = pair[kind].data
            layer = self.layers.get(kind)
            if layer is None or layer not in self.viewer.layers:  # first frame, or the user deleted it
                layer = self.viewer.add_image(data, name=name, scale=scale, units=unit, colormap="gray")
                self.layers[kind] = layer
            else:
                layer.data = data
                if tuple(layer.scale) != scale:
                    layer.scale = scale
                    layer.units = (unit, unit)
            layer.reset_contrast_limits()
        self.shown += 1
        h, w = header["shape"]
        self.frame_label.setText(f"{header['series_id']} #{header['frame_id']} ({h}×{w})")
        self.status_label.setText(f"connected to {self._sub.endpoint if self._sub else '?'}, "
                                  f"model {header.get('model_id', '?')}")

    def _show_stats(self, now: float) -> None:
        daemon = self._stats.daemon or {}
        fps = daemon.get("fps")
        self.fps_label.setText(f"{fps if isinstance(fps, (int, float)) else self._stats.fps(now):.1f}")
        self.latency_label.setText(self._stats.text(now).split(", ", 1)[1].removeprefix("latency "))
        if daemon:
            self.drops_label.setText(", ".join(_counts(daemon.get(key) or {}, key) for key in ("dropped", "rejected")))

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        self.stop()
        super().closeEvent(event)


def _counts(by_reason: dict[str, int], what: str) -> str:
    """'3 dropped (queue_full 3)': a total and its reasons."""
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(by_reason.items()))
    return f"{sum(by_reason.values())} {what}" + (f" ({reasons})" if reasons else "")


_denoiser: Denoiser | None = None
_denoiser_lock = threading.Lock()


def default_denoiser() -> Denoiser:
    """The default model, loaded once (in the worker thread that first needs it) and shared."""
    global _denoiser
    with _denoiser_lock:
        if _denoiser is None:
            _denoiser = Denoiser.load()
        return _denoiser


def layer_pixel_size_m(layer: Layer) -> float | None:
    """The layer's pixel size in metres when its scale is in length units (nm, Å, …); None otherwise."""
    unit = layer.units[-1]
    if not unit.is_compatible_with("m"):
        return None
    size = float((layer.scale[-1] * unit).to("m").magnitude)
    return size if math.isfinite(size) and size > 0 else None


def image_data(layer: Layer | None) -> Any:
    """The layer's pixels as a 2D frame or a 3D stack (numpy or lazy); InputError naming the problem."""
    if layer is None:
        raise InputError("no layer selected: select a single-channel image layer")
    if not isinstance(layer, Image):
        kind = layer.__class__.__name__  # not type(): plugins get layers wrapped in napari's PublicOnlyProxy
        raise InputError(f"{layer.name!r} is a {kind} layer; stemd denoises image layers")
    if layer.rgb:
        raise InputError(f"{layer.name!r} is an RGB image; stemd denoises single-channel (grey) images")
    data = layer.data[0] if layer.multiscale else layer.data
    if data.ndim not in (2, 3):
        raise InputError(f"{layer.name!r} is {data.ndim}D {tuple(data.shape)}; stemd denoises a 2D image or a "
                         "3D stack")
    if min(data.shape[-2:]) < MIN_SIDE:
        h, w = data.shape[-2:]
        raise InputError(f"{layer.name!r} is {h}×{w} px; the model needs at least {MIN_SIDE} px on each side")
    return data


def _denoise_frames(data: Any, pixel_size_m: float | None) -> Generator[int, None, np.ndarray]:
    """Yield after each frame (the progress), return the denoised float32 frames in data's shape."""
    den = default_denoiser()
    stack = data if data.ndim == 3 else data[None]
    first = np.asarray(stack[0])
    check_frames(first, den.window)
    plan = den.plan(first.shape, pixel_size_m, first)  # one plan for the stack, as `stemd denoise` makes
    out = np.empty(stack.shape, np.float32)
    for i in range(len(stack)):
        out[i] = den(np.asarray(stack[i]), plan=plan)
        yield i + 1
    return out if data.ndim == 3 else out[0]


def denoise_layer(viewer: Viewer, layer: Layer | None = None) -> GeneratorWorker:
    """Denoise `layer` (default: the selected one) in a worker thread with per-frame progress (the worker yields
    the frames done); the result is added as "<name> denoised" with the same scale. A layer that cannot be
    denoised raises InputError before any work."""
    layer = layer if layer is not None else viewer.layers.selection.active
    data = image_data(layer)
    assert layer is not None  # image_data refused None
    name, frames = layer.name, 1 if data.ndim == 2 else len(data)
    place = {"scale": layer.scale, "translate": layer.translate, "units": layer.units}
    worker = thread_worker(_denoise_frames, progress={"total": frames, "desc": f"stemd: denoising {name}"})(
        data, layer_pixel_size_m(layer))
    worker.returned.connect(lambda out: viewer.add_image(out, name=f"{name} denoised", **place))
    worker.errored.connect(lambda exc: show_error(f"stemd: denoising {name!r} failed: {exc}"))
    worker.start()
    return worker


def denoise_selected(viewer: Viewer) -> GeneratorWorker | None:
    """The menu command (Layers > Filter): `denoise_layer` on the selected layer; a refusal is shown as an error."""
    try:
        return denoise_layer(viewer)
    except StemdError as exc:
        show_error(f"stemd: {exc}")
        return None


class DenoiseWidget(QWidget):
    """Dock widget with one button: denoise the selected image layer (the same as the menu command)."""

    def __init__(self, napari_viewer: Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.worker: GeneratorWorker | None = None
        self.button = QPushButton("Denoise selected layer")
        self.button.clicked.connect(self.run)
        box = QVBoxLayout(self)
        box.addWidget(self.button)
        box.addStretch(1)

    def run(self) -> None:
        self.worker = denoise_selected(self.viewer)
