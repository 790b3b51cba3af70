"""`stemd demo` end to end in-process (simulator + daemon + collector on loopback), and its parts."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from stemd.apps.cli import main
from stemd.apps.demo import DemoReport, frame_psnr
from stemd.models.checkpoint import save_checkpoint
from stemd.models.window_ae import WindowAE
from stemd.sim.lattice import clean_windows


def pca_model(k: int = 64, n: int = 3000) -> WindowAE:
    """A WindowAE that projects each window onto the top-k principal components of clean windows.

    Built in a second instead of trained: hidden units come in +/- pairs, so the ReLUs cancel and
    the net is exactly the linear projection; a fair stand-in for a trained denoiser in tests.
    """
    w = clean_windows(n, np.random.default_rng(0)).reshape(n, -1).astype(np.float64)
    mu = w.mean(axis=0)
    u = np.linalg.eigh((w - mu).T @ (w - mu))[1][:, ::-1][:, :k].T  # (k, window²), largest first
    model = WindowAE(28, (2 * k,))
    enc, dec = model.linear_layers()
    with torch.no_grad():
        enc.weight.copy_(torch.from_numpy(np.vstack([u, -u])))
        enc.bias.copy_(torch.from_numpy(np.concatenate([-u @ mu, u @ mu])))
        dec.weight.copy_(torch.from_numpy(np.hstack([u.T, -u.T])))
        dec.bias.copy_(torch.from_numpy(mu))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "pca.pt"
    save_checkpoint(path, pca_model(), {"step": 2, "model_version": "test-pca"})
    return path


def _value(table: str, row: str) -> str:
    match = re.search(rf"^{re.escape(row)}\s+(.+)$", table, re.MULTILINE)
    assert match, f"row {row!r} missing from:\n{table}"
    return match.group(1)


def test_demo_runs_and_denoised_beats_raw(checkpoint, tmp_path, capsys):
    png = tmp_path / "demo.png"
    code = main(["demo", "--seconds", "3", "--size", "96", "--model", str(checkpoint), "--device", "cpu",
                 "--png", str(png)])
    out = capsys.readouterr().out
    assert code == 0, out
    sent, denoised = int(_value(out, "frames sent")), int(_value(out, "frames denoised"))
    dropped = int(_value(out, "frames dropped").split()[0])
    assert sent > 0 and denoised > 0 and denoised + dropped <= sent
    assert int(_value(out, "frames in the PSNR means")) > 0
    raw_db = float(_value(out, "PSNR raw vs clean").split()[0])
    den_db = float(_value(out, "PSNR denoised vs clean").split()[0])
    assert den_db > raw_db + 1.0, out
    assert re.match(r"[\d.]+ / [\d.]+ ms", _value(out, "latency p50 / p99"))
    fidelity = _value(out, "fidelity, live (no truth)")  # the daemon's own estimate, checked on the first frame
    assert re.match(r"\(\d+ checks\): [-+][\d.]+( ± [\d.]+)? dB over the reference, [-+][\d.]+", fidelity), out
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 2.5 * im.size[1]  # three panels side by side
        assert "stemd demo" in im.text["Description"]


def test_demo_with_no_frame_through_fails_clearly(tmp_path, capsys):
    wide = tmp_path / "w32.pt"
    save_checkpoint(wide, WindowAE(32, (4,)), {"step": 4})  # window 32 > 28-pixel frames: all rejected
    code = main(["demo", "--seconds", "0.5", "--size", "28", "--model", str(wide), "--device", "cpu",
                 "--png", str(tmp_path / "none.png")])
    err = capsys.readouterr().err
    assert code == 2 and "no frame got through" in err and "too_small" in err
    assert not (tmp_path / "none.png").exists()


@pytest.mark.parametrize(
    "argv, text",
    [
        (["--seconds", "0"], "--seconds"),
        (["--png", "out.jpg"], "--png"),
        (["--size", "8"], "--size"),
        (["--model", "/nonexistent/model.pt"], "/nonexistent/model.pt"),
    ],
)
def test_bad_options_are_one_line_errors(argv, text, capsys, tmp_path):
    assert main(["demo", "--png", str(tmp_path / "x.png"), *argv]) == 2
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err


def test_frame_psnr_fits_gain_and_offset():
    rng = np.random.default_rng(0)
    clean = rng.random((40, 40))
    raw = 30 * clean + 100 + rng.normal(0, 3, clean.shape)
    r, d = frame_psnr(raw, 7 * clean - 2, clean)
    assert d > 100 and 15 < r < 30  # exact up to rounding
    r2, _ = frame_psnr(2 * raw + 9, clean, clean)
    assert r2 == pytest.approx(r)


def test_report_table_lists_every_figure():
    rep = DemoReport(seconds=10.0, shape=(512, 512), dwell_us=2.0, dose=20.0, model_id="m", device="cpu",
                     sent=20, received=19, denoised=15, dropped={"queue_full": 4}, rejected={},
                     latencies_s=[0.1, 0.2, 0.3], psnr_raw=[10.0, 12.0], psnr_denoised=[20.0, 22.0],
                     fidelity={"checks": 2, "gain_db": 9.5, "gain_spread_db": 0.5, "over_reference_db": 1.25,
                               "over_reference_spread_db": 0.25, "residual": 0.8, "residual_spread": 0.1,
                               "flagged": False, "output": "model"})
    t = rep.table()
    assert _value(t, "frames sent") == "20" and _value(t, "frames denoised") == "15"
    assert _value(t, "frames dropped") == "4  (queue_full 4)" and _value(t, "frames rejected") == "0"
    assert _value(t, "frames lost before the daemon") == "1" and _value(t, "denoised fps") == "1.50"
    assert _value(t, "PSNR raw vs clean") == "11.00 dB" and _value(t, "PSNR denoised vs clean") == "21.00 dB"
    assert _value(t, "latency p50 / p99") == "200.0 / 298.0 ms"
    assert _value(t, "fidelity, live (no truth)") == ("(2 checks): +1.25 ± 0.25 dB over the reference, "
                                                      "+9.50 ± 0.50 dB over raw, residual 0.80 ± 0.10")
    assert _value(DemoReport(1.0, (8, 8), 1.0, 1.0).table(), "fidelity, live (no truth)") == "off"
