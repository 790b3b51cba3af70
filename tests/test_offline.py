"""`stemd denoise IN OUT`: TIFF round trips keep shape and metadata, stacks get cleaner, bad input never touches OUT."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from stemd.cli import main
from stemd.denoiser import Denoiser
from stemd.errors import InputError
from stemd.synthetic import NoiseSpec, corrupt, simulate_frame

SENTINEL = b"previous output, must survive a failed run"


@pytest.fixture(scope="module")
def frames() -> tuple[np.ndarray, np.ndarray]:
    """(clean, noisy) stacks of 3 lattice frames at the paper's noise level."""
    rng = np.random.default_rng(3)
    clean = np.stack([simulate_frame((64, 80), rng, rotation_deg=7.0 * i, offset_px=(i, 2.0 * i)).clean for i in range(3)])
    return clean, corrupt(clean, NoiseSpec(kind="poisson", dose=20.0), rng)


def denoise(*argv: str | Path) -> int:
    return main(["denoise", "--no-progress", "--device", "cpu", *map(str, argv)])


def test_frame_round_trip_keeps_description_and_pixel_size(tmp_path, checkpoint, frames):
    raw = (frames[1][0] * 1000 + 200).clip(0).astype(np.uint16)
    inp, out = tmp_path / "frame.tif", tmp_path / "out.tif"
    tifffile.imwrite(inp, raw, description="Scope 9000, HAADF, dwell 2 us", resolution=(2e7, 2e7),
                     resolutionunit="CENTIMETER", metadata=None)
    assert denoise(inp, out, "--model", checkpoint) == 0
    expected = Denoiser.load(checkpoint, device="cpu")
    with tifffile.TiffFile(out) as tif:
        data, page = tif.asarray(), tif.pages.first
        assert data.shape == raw.shape and data.dtype == np.float32
        assert page.description == "Scope 9000, HAADF, dwell 2 us"
        assert page.resolution == (2e7, 2e7) and page.resolutionunit == tifffile.RESUNIT.CENTIMETER
        note = tif.shaped_metadata[0]["stemd"]
    assert note["model"] == expected.model_id and note["step"] == expected.step
    np.testing.assert_allclose(data, expected(raw), rtol=1e-5, atol=1e-3)


def test_imagej_stack_round_trip_is_cleaner(tmp_path, checkpoint, frames):
    clean, noisy = frames
    inp, out = tmp_path / "stack.tif", tmp_path / "out.tif"
    tifffile.imwrite(inp, noisy, imagej=True, resolution=(20.0, 20.0),
                     metadata={"axes": "TYX", "spacing": 1.0, "unit": "nm", "Info": "session 42"})
    assert denoise(inp, out, "--model", checkpoint, "--step", "3") == 0
    with tifffile.TiffFile(out) as tif:
        assert tif.is_imagej
        data, meta = tif.asarray(), tif.imagej_metadata
        assert tif.pages.first.resolution == (20.0, 20.0)
    assert data.shape == noisy.shape and data.dtype == np.float32
    assert meta["unit"] == "nm" and meta["images"] == 3
    assert meta["Info"].startswith("session 42") and "step 3" in meta["Info"]
    mse = lambda a: float(np.mean((a - clean) ** 2))  # noqa: E731
    assert mse(data) < 0.5 * mse(noisy)


def test_plain_stack_keeps_tifffile_metadata(tmp_path, checkpoint, frames):
    inp, out = tmp_path / "stack.tif", tmp_path / "out.tif"
    tifffile.imwrite(inp, frames[1], photometric="minisblack", metadata={"axes": "ZYX", "pixel_nm": 0.05})
    assert denoise(inp, out, "--model", checkpoint) == 0
    with tifffile.TiffFile(out) as tif:
        meta = tif.shaped_metadata[0]
        assert tif.series[0].shape == frames[1].shape and tif.series[0].dtype == np.float32
    assert meta["pixel_nm"] == 0.05 and meta["axes"] == "ZYX" and meta["stemd"]["step"] >= 1


def test_default_model_is_the_shipped_one(tmp_path, frames):
    inp, out = tmp_path / "frame.tif", tmp_path / "out.tif"
    tifffile.imwrite(inp, frames[1][0])
    assert denoise(inp, out) == 0
    with tifffile.TiffFile(out) as tif:
        note = tif.shaped_metadata[0]["stemd"]
    shipped = Denoiser.load(None, device="cpu")
    assert note["model"] == shipped.model_id and note["step"] == shipped.step


def _leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


BAD_INPUTS = {
    "missing": (None, "does not exist"),
    "not_a_tiff": (lambda p: p.write_text("not an image"), "cannot read"),
    "truncated": (lambda p: p.write_bytes(_tiff_bytes(p, np.ones((64, 64), np.float32))[:300]), "cannot read"),
    "one_d": (lambda p: tifffile.imwrite(p, np.ones(64, np.float32)), "1D"),
    "four_d": (lambda p: tifffile.imwrite(p, np.ones((2, 2, 40, 40), np.float32)), "4D"),
    "rgb": (lambda p: tifffile.imwrite(p, np.ones((40, 40, 3), np.uint8), photometric="rgb"), "RGB"),
    "too_small": (lambda p: tifffile.imwrite(p, np.ones((20, 40), np.float32)), "window"),
    "nan": (lambda p: tifffile.imwrite(p, np.where(np.eye(40) > 0, np.nan, 1.0).astype(np.float32)), "NaN"),
    "inf": (lambda p: tifffile.imwrite(p, np.full((2, 40, 40), np.inf, np.float32)), "inf"),
}


def _tiff_bytes(path: Path, data: np.ndarray) -> bytes:
    tifffile.imwrite(path, data)
    return path.read_bytes()


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_and_keeps_out(tmp_path, capsys, checkpoint, case):
    make, fragment = BAD_INPUTS[case]
    inp, out = tmp_path / "in.tif", tmp_path / "out.tif"
    if make is not None:
        make(inp)
    out.write_bytes(SENTINEL)
    assert denoise(inp, out, "--model", checkpoint, "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.startswith("stemd: error:") and fragment in err and err.count("\n") == 1
    assert out.read_bytes() == SENTINEL
    assert _leftovers(tmp_path, {"in.tif", "out.tif"}) == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--step", "0"], "--step"),
        (["--step", "29"], "--step"),
        (["--step", "two"], "--step"),
        (["--device", "tpu"], "device"),
        (["--model", "{garbage}"], "garbage.pt"),
        (["--model", "{missing}"], "does not exist"),
    ],
)
def test_bad_option_exits_2_and_keeps_out(tmp_path, capsys, checkpoint, frames, args, fragment):
    inp, out = tmp_path / "in.tif", tmp_path / "out.tif"
    tifffile.imwrite(inp, frames[1][0])
    out.write_bytes(SENTINEL)
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    args = [a.format(garbage=tmp_path / "garbage.pt", missing=tmp_path / "missing.pt") for a in args]
    if "--model" not in args:
        args += ["--model", str(checkpoint)]
    assert denoise(inp, out, "--overwrite", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("stemd: error:") and fragment in err
    assert out.read_bytes() == SENTINEL
    assert _leftovers(tmp_path, {"in.tif", "out.tif", "garbage.pt"}) == []


def test_existing_out_needs_overwrite(tmp_path, capsys, checkpoint, frames):
    inp, out = tmp_path / "in.tif", tmp_path / "out.tif"
    tifffile.imwrite(inp, frames[1][0])
    out.write_bytes(SENTINEL)
    assert denoise(inp, out, "--model", checkpoint) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == SENTINEL
    assert denoise(inp, out, "--model", checkpoint, "--overwrite") == 0
    assert tifffile.imread(out).shape == frames[1][0].shape


def test_missing_out_directory(tmp_path, capsys, checkpoint, frames):
    inp = tmp_path / "in.tif"
    tifffile.imwrite(inp, frames[1][0])
    assert denoise(inp, tmp_path / "no" / "out.tif", "--model", checkpoint) == 2
    assert "directory" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_failure_mid_stack_leaves_out_untouched(tmp_path, capsys, checkpoint, frames, monkeypatch):
    inp, out = tmp_path / "in.tif", tmp_path / "out.tif"
    tifffile.imwrite(inp, frames[1], photometric="minisblack")
    out.write_bytes(SENTINEL)
    calls = []
    real = Denoiser.__call__

    def flaky(self, image):
        calls.append(1)
        if len(calls) == 2:
            raise InputError("simulated failure on frame 2")
        return real(self, image)

    monkeypatch.setattr(Denoiser, "__call__", flaky)
    assert denoise(inp, out, "--model", checkpoint, "--overwrite") == 2
    assert "frame 2" in capsys.readouterr().err
    assert out.read_bytes() == SENTINEL
    assert _leftovers(tmp_path, {"in.tif", "out.tif"}) == []


def test_subprocess_error_has_no_traceback(tmp_path):
    inp = tmp_path / "in.tif"
    inp.write_text("plain text")
    proc = subprocess.run([sys.executable, "-m", "stemd.cli", "denoise", str(inp), str(tmp_path / "o.tif")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("stemd: error:") and "in.tif" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o.tif").exists()
