"""The napari plugin, headless: napari's `make_napari_viewer` on Qt's offscreen platform (OpenGL contexts from
Mesa through a private Xvfb when there is no display), against the real simulator and daemon on loopback."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import zmq

from bench.napari_screenshot import LiveStack, display
from stemd.errors import InputError
from stemd.sim.lattice import simulate_frame

napari = pytest.importorskip("napari", reason="the napari extra is not installed (pip install -e '.[napari]')")

from napari._app_model import get_app_model  # noqa: E402  (the app the menus and commands are registered with)
from napari.utils.notifications import notification_manager  # noqa: E402

from stemd.apps import napari_plugin  # noqa: E402
from stemd.apps.napari_plugin import (  # noqa: E402
    DenoiseWidget,
    LiveWidget,
    denoise_layer,
    layer_pixel_size_m,
)


@pytest.fixture(scope="session", autouse=True)
def headless():
    """QT_QPA_PLATFORM=offscreen and a DISPLAY for GLX (a private Xvfb when there is none), set before pytest-qt
    makes its session-wide QApplication (session scope: a module-scoped fixture would come after it)."""
    with display("offscreen") as name:
        yield name


@pytest.fixture(scope="session", autouse=True)
def gl_capabilities(headless, qapp):
    """napari asks OpenGL once (cached) for its extensions and texture sizes, from whatever context is current
    then; the offscreen platform cannot make a QOpenGLWidget's (the canvas') context current, so make one current
    for that question, through GLX on the display: the answer then does not depend on what ran before."""
    from napari._vispy.utils.gl import get_gl_extensions, get_max_texture_sizes
    from qtpy.QtGui import QOffscreenSurface, QOpenGLContext

    context, surface = QOpenGLContext(), QOffscreenSurface()
    surface.create()
    assert context.create() and context.makeCurrent(surface), f"no OpenGL context on display {headless}"
    try:
        assert "texture_float" in get_gl_extensions() and get_max_texture_sizes()[0] >= 4096
    finally:
        context.doneCurrent()


@pytest.fixture(scope="module")
def live(checkpoint):
    with LiveStack(checkpoint) as stack:
        yield stack


@pytest.fixture
def errors():
    """The error notifications napari shows during the test."""
    seen: list[str] = []

    def record(event) -> None:
        if str(event.severity) == "error":
            seen.append(event.message)

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)


def test_plugin_manifest_contributes_the_widgets_and_the_menu_command():
    from npe2 import PluginManager
    from npe2.manifest.utils import import_python_name

    pm = PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("stemd")
    assert {w.display_name for w in manifest.contributions.widgets} == {"Live daemon", "Denoise layer"}
    menu = manifest.contributions.menus["napari/layers/filter"]
    assert [m.command for m in menu] == ["stemd.denoise_selected"]
    for command in manifest.contributions.commands:  # every python_name imports
        assert callable(import_python_name(command.python_name))


def test_live_widget_keeps_two_layers_updated_in_place(make_napari_viewer, qtbot, live):
    viewer = make_napari_viewer()
    inserted: list[str] = []
    viewer.layers.events.inserted.connect(lambda e: inserted.append(e.value.name))
    _, widget = viewer.window.add_plugin_dock_widget("stemd", "Live daemon")  # Plugins > stemd > Live daemon
    assert isinstance(widget, LiveWidget) and widget.endpoint_edit.text() == "tcp://127.0.0.1:5556"
    widget.endpoint_edit.setText(live.endpoint)
    widget.button.click()
    qtbot.waitUntil(lambda: widget.shown >= 1, timeout=20_000)
    raw, den = widget.layers["raw"], widget.layers["denoised"]
    first_id, first_raw, first_den = widget.header["frame_id"], raw.data.copy(), den.data.copy()
    qtbot.waitUntil(lambda: widget.header["frame_id"] >= first_id + 3 and widget.drops_label.text() != "–"
                    and float(widget.fps_label.text()) > 0, timeout=20_000)  # fps: the daemon's, per interval
    widget.stop()

    assert inserted == ["stemd raw", "stemd denoised"] and len(viewer.layers) == 2  # no layer per frame
    assert widget.layers["raw"] is raw and widget.layers["denoised"] is den
    assert raw.data.shape == den.data.shape == live.spec.shape
    assert raw.data.dtype == np.uint16 and den.data.dtype == np.float32
    assert not np.array_equal(raw.data, first_raw) and not np.array_equal(den.data, first_den)
    assert not np.allclose(den.data, raw.data)  # the denoised layer shows the model's output
    nm = live.pixel_size_m * 1e9
    for layer in (raw, den):
        assert tuple(layer.scale) == pytest.approx((nm, nm))
        assert [str(u) for u in layer.units] == ["nanometer", "nanometer"]
    fid = widget.header["frame_id"]
    assert f"#{fid} (64×64)" in widget.frame_label.text()
    assert float(widget.fps_label.text()) > 0
    assert re.fullmatch(r"p50 \d+ ms, p99 \d+ ms", widget.latency_label.text())
    assert re.fullmatch(r"\d+ dropped( \(queue_full \d+\))?, 0 rejected", widget.drops_label.text())
    assert "disconnected" in widget.status_label.text()


def test_live_widget_never_waits_and_says_when_nothing_arrives(make_napari_viewer, errors, monkeypatch):
    viewer = make_napari_viewer()
    ctx = zmq.Context()
    silent = ctx.socket(zmq.PUB)
    endpoint = f"tcp://127.0.0.1:{silent.bind_to_random_port('tcp://127.0.0.1')}"
    monkeypatch.setattr(LiveWidget, "no_frames_s", 0.2)
    widget = LiveWidget(viewer, endpoint=endpoint)
    try:
        widget.start()
        assert widget.connected and "waiting for frames" in widget.status_label.text()
        t0 = time.perf_counter()
        for _ in range(20):
            widget.poll()
        assert (time.perf_counter() - t0) / 20 < 0.01  # a poll takes what has arrived; it never waits
        time.sleep(0.25)
        widget.poll()
        assert "no frames from" in widget.status_label.text() and "output.publish_raw" in widget.status_label.text()
        assert len(viewer.layers) == 0
        monkeypatch.setattr(napari_plugin, "feed", lambda *a: 1 / 0)
        widget.poll()  # a failure stops the view with one error, not one per tick
        assert not widget.connected and widget.status_label.text() == "error: division by zero"
        assert errors == ["stemd: the live view stopped: division by zero"]
    finally:
        widget.stop()
        silent.close(0)
        ctx.term()
    widget.start("udp://127.0.0.1:1")
    assert not widget.connected and "must start with tcp://" in widget.status_label.text()
    assert any("must start with tcp://" in m for m in errors)


def _stack(n: int = 3, side: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    clean = np.stack([simulate_frame((side, side), rng, rotation_deg=3.0 * i).clean * 20 for i in range(n)])
    return rng.poisson(clean).astype(np.uint16), clean


def test_denoise_command_on_a_stack_with_progress(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    raw, clean = _stack()
    layer = viewer.add_image(raw, name="stack", scale=(1, 0.039, 0.039), units=("pixel", "nm", "nm"))
    assert layer_pixel_size_m(layer) == pytest.approx(3.9e-11)
    worker = get_app_model().commands.execute_command("stemd.denoise_selected").result()  # Layers > Filter
    qtbot.waitUntil(lambda: "stack denoised" in viewer.layers, timeout=60_000)
    out = viewer.layers["stack denoised"]
    assert worker.pbar.total == worker.pbar.n == 3  # napari's progress bar, one step a frame
    assert out.data.shape == raw.shape and out.data.dtype == np.float32
    assert tuple(out.scale) == tuple(layer.scale) and out.units == layer.units
    for r, d, c in zip(raw, out.data, clean):
        assert np.mean((d - c) ** 2) < 0.5 * np.mean((r - c) ** 2)
    assert layer_pixel_size_m(viewer.add_image(raw[0])) is None  # plain pixels: no pixel size


def test_denoise_refuses_what_it_cannot_denoise_with_one_clear_error(make_napari_viewer, errors):
    viewer = make_napari_viewer()
    with pytest.raises(InputError, match="no layer selected"):
        denoise_layer(viewer)
    cases = [
        (viewer.add_points([[1.0, 2.0]], name="spots"), r"'spots' is a Points layer"),
        (viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, name="photo"), r"'photo' is an RGB image"),
        (viewer.add_image(np.zeros((2, 2, 64, 64)), name="hyper"), r"'hyper' is 4D"),
        (viewer.add_image(np.zeros((3, 16, 20)), name="tiny"), r"'tiny' is 16×20 px; the model needs at least 28"),
    ]
    for layer, message in cases:
        with pytest.raises(InputError, match=message):
            denoise_layer(viewer, layer)
    viewer.layers.selection.active = cases[0][0]
    _, widget = viewer.window.add_plugin_dock_widget("stemd", "Denoise layer")
    widget.button.click()  # the dock widget's button, as the menu command: a notification, no exception
    assert isinstance(widget, DenoiseWidget) and widget.worker is None
    menu = get_app_model().menus.get_menu("napari/layers/filter")
    assert "stemd.denoise_selected" in [getattr(item, "command", item).id for item in menu]
    assert get_app_model().commands.execute_command("stemd.denoise_selected").result() is None
    assert len(errors) == 2 and all(re.fullmatch(r"stemd: 'spots' is a Points layer; .*", m) for m in errors)
    assert [layer.name for layer in viewer.layers] == ["spots", "photo", "hyper", "tiny"]  # nothing added
