"""docs/napari.png: napari with the stemd plugin's live widget docked beside its raw and denoised layers, fed by
the real simulator and daemon on loopback. `python -m bench.napari_screenshot [PNG] [--frames N]`.

Needs a display that renders OpenGL: without DISPLAY it starts Xvfb (Mesa's llvmpipe draws) and uses Qt's xcb
platform, since Qt's offscreen platform cannot draw a QOpenGLWidget (napari's canvas) into a screenshot.
`LiveStack` (simulator + daemon in a thread of their own) is shared with tests/test_napari_plugin.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import zmq.asyncio

from stemd.apps.simulate import Simulator
from stemd.config import load_settings
from stemd.live.daemon import Daemon
from stemd.live.notify import Notifier
from stemd.sim.microscope import SimSpec


class LiveStack:
    """The simulator and the daemon (the real ones, on loopback), on an asyncio loop in a thread of their own,
    so a Qt event loop can run in the main thread: `with LiveStack(model) as live: live.endpoint`."""

    def __init__(self, model: Path | str | None = None, shape: tuple[int, int] = (64, 64), fps: float = 20.0,
                 stats_interval_s: float = 0.2) -> None:
        self.spec = SimSpec(shape=shape, margin_px=8)
        self.model, self.fps, self.stats_interval_s = model, fps, stats_interval_s
        self.endpoint = ""
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="stemd-live-stack", daemon=True)

    @property
    def pixel_size_m(self) -> float:
        assert self.spec.pixel_size_m is not None  # SimSpec fills it in
        return self.spec.pixel_size_m

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the thread that waits in __enter__
            self.error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        ctx = zmq.asyncio.Context()
        sim = Simulator(self.spec, "tcp://127.0.0.1:*", fps=self.fps, startup_delay_s=0.0, run_id="napari",
                        context=ctx)
        values = {"model.device": "cpu", "input.endpoint": sim.open(), "output.endpoint": "tcp://127.0.0.1:*",
                  "stats.interval_s": self.stats_interval_s}
        if self.model is not None:
            values["model.path"] = str(self.model)
        daemon = Daemon(load_settings(None, values), notifier=Notifier(""))
        try:
            await daemon.start()
            self.endpoint = daemon.output_endpoint
            publishing = asyncio.create_task(sim.run())
            self._ready.set()
            await self._stop.wait()
            sim.stop()
            await publishing
        finally:
            sim.close()
            await daemon.stop()
            ctx.destroy(linger=0)

    def __enter__(self) -> LiveStack:
        self._thread.start()
        self._ready.wait(60)
        if self.error is not None or not self.endpoint:
            raise RuntimeError(f"the simulator and daemon did not start: {self.error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent exits (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def start_xvfb(timeout_s: float = 10.0) -> tuple[subprocess.Popen[bytes], str]:
    """A private Xvfb (unix socket only) and its DISPLAY. It ends when this process does (not before: Qt keeps
    its connection to the display while its application lives, and Xlib exits the process when it breaks)."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        raise RuntimeError("Xvfb not found: napari's canvas needs an X server for OpenGL when there is no display "
                           "(Debian: apt-get install xvfb; `make install` does it)")
    read, write = os.pipe()
    proc = subprocess.Popen([xvfb, "-displayfd", str(write), "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
                            pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent)
    os.close(write)
    number, deadline = b"", time.monotonic() + timeout_s
    try:
        while not number.endswith(b"\n") and proc.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read], [], [], left)[0]:
                break
            chunk = os.read(read, 16)
            if not chunk:
                break
            number += chunk
    finally:
        os.close(read)
    if not number.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"Xvfb did not start (exit code {proc.poll()})")
    return proc, f":{number.decode().strip()}"


@contextlib.contextmanager
def display(platform: str) -> Iterator[str]:
    """DISPLAY set (an Xvfb started when there is none) and QT_QPA_PLATFORM defaulting to `platform`, both
    restored on exit."""
    saved = {k: os.environ.get(k) for k in ("DISPLAY", "QT_QPA_PLATFORM")}
    if not os.environ.get("DISPLAY"):
        os.environ["DISPLAY"] = start_xvfb()[1]
    os.environ.setdefault("QT_QPA_PLATFORM", platform)
    try:
        yield os.environ["DISPLAY"]
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def screenshot(png: Path, frames: int = 8) -> Path:
    """Dock the live widget in a napari window, wait for `frames` frames from the live stack, save the window."""
    import napari
    from qtpy.QtWidgets import QApplication

    from stemd.apps.napari_plugin import LiveWidget

    with display("xcb"), LiveStack(shape=(256, 256), fps=2, stats_interval_s=2.0) as live:
        viewer = napari.Viewer(show=True)
        viewer.window._qt_window.resize(1400, 820)
        widget = LiveWidget(viewer, endpoint=live.endpoint)
        viewer.window.add_dock_widget(widget, name="stemd: live daemon", area="right")
        widget.start()
        deadline = time.monotonic() + 120
        while widget.shown < frames and time.monotonic() < deadline:
            QApplication.processEvents()
            time.sleep(0.01)
        if widget.shown == 0:
            raise RuntimeError("no frames arrived from the daemon")
        canvas = getattr(viewer, "canvas", viewer)  # napari >= 0.9 moved grid and overlays under viewer.canvas
        canvas.grid.enabled = True  # raw and denoised side by side
        getattr(canvas, "overlays", canvas).scale_bar.visible = True
        viewer.reset_view()
        for _ in range(20):
            QApplication.processEvents()
            time.sleep(0.02)
        viewer.screenshot(str(png), canvas_only=False)
        widget.stop()
        viewer.close()
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("png", nargs="?", type=Path, default=Path("docs/napari.png"))
    parser.add_argument("--frames", type=int, default=8, help="frames to show before the screenshot")
    args = parser.parse_args(argv)
    print(f"wrote {screenshot(args.png, args.frames)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
