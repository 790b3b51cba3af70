"""Scan lines told by the frame: the axis its line flicker runs along, the flicker taken out, never invented."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stemd.compute.metrics import psnr
from stemd.compute.scanlines import destripe, line_excess, line_flicker, scan_lines
from stemd.pipeline import Denoiser
from stemd.sim.scenes import named_frame

FLICKER = {"line_offset": 0.05, "line_gain": 0.05}


def frame(kind: str, seed: int = 0, size: int = 256, **noise) -> tuple[np.ndarray, np.ndarray]:
    noise = {"line_jitter_px": 0.0, "line_gain": 0.0, "line_offset": 0.0, **noise}
    noisy, scene, _ = named_frame(kind, (size, size), seed=seed, dose=20.0, **noise)
    return noisy, scene.clean.astype(np.float32)


@pytest.mark.parametrize("kind", ["perovskite_rp", "vacuum_edge", "interface"])
def test_flicker_found_along_its_axis(kind: str) -> None:
    noisy, _ = frame(kind, **FLICKER)
    t = torch.as_tensor(noisy)
    assert scan_lines(t) == ("rows", True)
    assert scan_lines(t.T) == ("columns", True)
    assert scan_lines(t, "columns") == ("columns", False)  # told the wrong axis, it finds no stripes along it


@pytest.mark.parametrize("kind", ["perovskite_rp", "vacuum_edge", "interface", "grain_boundary", "amorphous",
                                  "noise_only"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_stripes_invented(kind: str, seed: int) -> None:
    """Frames without line artefacts (lattices along the axes, an interface, a vacuum edge) show none."""
    noisy, _ = frame(kind, seed)
    t = torch.as_tensor(noisy)
    assert scan_lines(t) == ("rows", False) and scan_lines(t.T) == ("rows", False)
    assert line_excess(t[None]).abs().max() < 4.0


def test_destripe_takes_the_flicker_out_and_leaves_a_clean_frame_alone() -> None:
    noisy, clean = frame("perovskite_rp", **FLICKER)
    x = torch.as_tensor(noisy)[None]
    before = line_flicker(x).square().mean()
    fixed = destripe(x)
    assert line_flicker(fixed).square().mean() < 0.1 * before
    assert np.mean((fixed[0].numpy() - clean) ** 2) < np.mean((noisy - clean) ** 2)
    turned = destripe(x.transpose(-2, -1), "columns")
    torch.testing.assert_close(turned.transpose(-2, -1), fixed)
    plain, _ = frame("perovskite_rp")
    p = torch.as_tensor(plain)[None]
    assert (destripe(p) - p).abs().max() < 0.02 * float(p.std())


def test_pipeline_plans_and_destripes_a_frame_scanned_along_columns() -> None:
    noisy, clean = frame("perovskite_rp", size=128, **FLICKER)
    x, c = noisy.T.copy(), clean.T.copy()
    now, before = Denoiser.load(), Denoiser.load(scan_lines="rows", destripe=False)
    plan = now.plan(x.shape, None, x)
    assert (plan.lines, plan.stripes) == ("columns", True)
    assert plan.describe()["scan_lines"] == "columns" and plan.describe()["stripes"] is True
    span = float(c.max() - c.min())
    assert psnr(now(x), c, data_range=span) > psnr(before(x), c, data_range=span) + 0.5
    plain, _ = frame("perovskite_rp", size=128)
    assert (now.plan(plain.shape, None, plain).stripes, now.plan(plain.shape).lines) == (False, "rows")
    np.testing.assert_array_equal(now(plain), Denoiser.load(destripe=False)(plain))
