"""bench.multislice: the cell's Fourier series renders the crystal exactly; a quick run scores every method."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import multislice


def _band_limited(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A periodic image with frequencies up to 3 cycles per cell: sampled 8 times per cell, above Nyquist."""
    return (2.0 + np.cos(2 * np.pi * u) + 0.5 * np.cos(2 * np.pi * (u + v)) + 0.3 * np.sin(2 * np.pi * 3 * v)
            + 0.2 * np.cos(2 * np.pi * (2 * u - v)))


def test_render_is_the_cells_periodic_image_at_any_period_rotation_and_offset():
    n = 8
    g = np.arange(n) / n
    cell = _band_limited(g[:, None], g[None, :])
    period, turn, offset = 9.7, 23.0, (0.31, 0.77)
    out = multislice.render(cell, (40, 50), period, turn, offset)
    t = np.deg2rad(turn)
    yy, xx = np.mgrid[:40, :50].astype(float)
    want = _band_limited((np.cos(t) * yy - np.sin(t) * xx) / period + offset[0],
                         (np.sin(t) * yy + np.cos(t) * xx) / period + offset[1])
    want = (want - want.min()) / (want.max() - want.min())
    assert np.abs(out - want).max() < 0.02  # min / max of 2000 samples, not of the continuous image
    assert out.min() == 0.0 and out.max() == 1.0


def test_a_quick_run_scores_stemd_against_the_gaussian_on_a_cached_cell(tmp_path, capsys):
    n = 14
    g = (np.arange(n) - n / 2) / n
    r2 = g[:, None] ** 2 + g[None, :] ** 2
    cell = np.exp(-r2 / (2 * 0.08**2)) + 0.5 * np.exp(-((np.abs(g[:, None]) - 0.5) ** 2 + (np.abs(g[None, :]) - 0.5)
                                                         ** 2) / (2 * 0.08**2))
    settings = {"lattice_A": 3.905, "energy_kv": 200, "semiangle_mrad": 20, "detector_mrad": [70, 160],
                "thickness_A": 31.2, "frozen_phonons": 1, "probes_per_cell": n, "abtem": "test"}
    np.savez(tmp_path / multislice.CELL_FILE, image=cell, settings=json.dumps(settings))
    assert multislice.main(["--quick", "--no-tkrem", "--no-write", "--cache", str(tmp_path)]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "dose" not in line}

    def value(label: str) -> float:
        return float(rows[label].split(" | ")[1].strip(" |*"))

    assert value("stemd") > value("Gaussian (best σ, oracle)") > value("raw")


def test_no_cache_and_no_abtem_venv_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ABTEM_VENV", str(tmp_path / "none"))
    with pytest.raises(SystemExit, match="no cached abtem_srtio3_cell.npz and no abTEM venv"):
        multislice.cell_image(tmp_path)
