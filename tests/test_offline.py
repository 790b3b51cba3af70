"""`stemd denoise IN OUT`: TIFF round trips keep shape and metadata, stacks get cleaner, bad input never touches OUT."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile

from stemd.apps.cli import main
from stemd.apps.offline import denoise_frames
from stemd.apps.tiffio import read_tiff, stemd_note, write_tiff_atomic
from stemd.errors import InputError
from stemd.pipeline import Denoiser
from stemd.sim.lattice import NoiseSpec, corrupt, simulate_frame

SENTINEL = b"previous output, must survive a failed run"


@pytest.fixture(scope="module")
def frames() -> tuple[np.ndarray, np.ndarray]:
    """(clean, noisy) stacks of 3 lattice frames at the paper's noise level."""
    rng = np.random.default_rng(3)
    clean = np.stack(
        [simulate_frame((64, 80), rng, rotation_deg=7.0 * i, offset_px=(i, 2.0 * i)).clean for i in range(3)]
    )
    return clean, corrupt(clean, NoiseSpec(kind="poisson", dose=20.0), rng)


def denoise(*argv: str | Path) -> int:
    return main(["denoise", "--no-progress", "--device", "cpu", *map(str, argv)])


def test_frame_round_trip_keeps_description_and_pixel_size(tmp_path, checkpoint, frames):
    raw = (frames[1][0] * 1000 + 200).clip(0).astype(np.uint16)
    inp, out = tmp_path / "frame.tif", tmp_path / "out.tif"
    tifffile.imwrite(inp, raw, description="Scope 9000, HAADF, dwell 2 us", resolution=(2.56e8, 2.56e8),
                     resolutionunit="CENTIMETER", metadata=None)  # 0.0390625 nm: the 10 px lattice is SrTiO3's
    assert denoise(inp, out, "--model", checkpoint) == 0
    expected = Denoiser.load(checkpoint, device="cpu")
    with tifffile.TiffFile(out) as tif:
        data, page = tif.asarray(), tif.pages.first
        assert data.shape == raw.shape and data.dtype == np.float32
        assert page.description == "Scope 9000, HAADF, dwell 2 us"
        assert page.resolution == (2.56e8, 2.56e8) and page.resolutionunit == tifffile.RESUNIT.CENTIMETER
        note = tif.shaped_metadata[0]["stemd"]
    assert note["model"] == expected.model_id and note["step"] == expected.step
    np.testing.assert_allclose(data, expected(raw), rtol=1e-5, atol=1e-3)


def test_imagej_stack_round_trip_is_cleaner(tmp_path, checkpoint, frames):
    clean, noisy = frames
    inp, out = tmp_path / "stack.tif", tmp_path / "out.tif"
    tifffile.imwrite(inp, noisy, imagej=True, resolution=(25.6, 25.6),
                     metadata={"axes": "TYX", "spacing": 1.0, "unit": "nm", "Info": "session 42"})
    assert denoise(inp, out, "--model", checkpoint, "--step", "3") == 0
    with tifffile.TiffFile(out) as tif:
        assert tif.is_imagej
        data, meta = tif.asarray(), tif.imagej_metadata
        assert tif.pages.first.resolution == (25.6, 25.6)
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



def test_adapt_fine_tunes_on_the_file_and_says_so_in_the_summary_and_the_metadata(tmp_path, capsys):
    rng = np.random.default_rng(5)
    clean = simulate_frame((128, 128), rng, rotation_deg=12.0).clean
    inp, out = tmp_path / "counts.tif", tmp_path / "out.tif"
    tifffile.imwrite(inp, (25 * rng.poisson((clean + 0.2) * 40.0) + 300).astype(np.uint16))
    assert denoise(inp, out, "--adapt", "3") == 0
    with tifffile.TiffFile(out) as tif:
        verdict = tif.shaped_metadata[0]["stemd"]["sampling"]["adapt"]
    assert verdict.startswith(("yes", "rejected")) and f"fine-tune on the frame: {verdict}" in capsys.readouterr().out

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
        (["--pixel-size", "-1"], "--pixel-size"),
        (["--pixel-size", "big"], "--pixel-size"),
        (["--lattice-period", "3.905"], "--lattice-period"),
        (["--sampling", "sometimes"], "--sampling"),
        (["--precision", "half"], "--precision"),
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

    def flaky(self, image, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise InputError("simulated failure on frame 2")
        return real(self, image, **kwargs)

    monkeypatch.setattr(Denoiser, "__call__", flaky)
    assert denoise(inp, out, "--model", checkpoint, "--overwrite") == 2
    assert "frame 2" in capsys.readouterr().err
    assert out.read_bytes() == SENTINEL
    assert _leftovers(tmp_path, {"in.tif", "out.tif"}) == []


def test_subprocess_error_has_no_traceback(tmp_path):
    inp = tmp_path / "in.tif"
    inp.write_text("plain text")
    proc = subprocess.run([sys.executable, "-m", "stemd.apps.cli", "denoise", str(inp), str(tmp_path / "o.tif")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("stemd: error:") and "in.tif" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o.tif").exists()


# ---- pixel size and sampling, precision, streaming, stacks tifffile tagged RGB

SRTIO3_M = 3.905e-10


@pytest.fixture(scope="module")
def lattice_14px() -> tuple[np.ndarray, float]:
    """A noisy uint16 frame whose lattice period is 14 px, and the pixel size that says so."""
    rng = np.random.default_rng(5)
    clean = simulate_frame((96, 104), rng, period_px=14.0, sigma_px=2.1, rotation_deg=11.0).clean
    return corrupt(clean, NoiseSpec(kind="poisson", dose=20.0), rng).astype(np.uint16), SRTIO3_M / 14.0


def test_tags_resample_and_options_override_them(tmp_path, capsys, checkpoint, lattice_14px):
    raw, pixel = lattice_14px
    inp = tmp_path / "in.tif"
    tifffile.imwrite(inp, raw, imagej=True, resolution=(1e-9 / pixel,) * 2, metadata={"unit": "nm"})
    den = Denoiser.load(checkpoint, device="cpu", calibrate=False)
    as_is, resampled = den(raw), den(raw, pixel_size_m=pixel)
    assert np.abs(as_is - resampled).max() > 0.05 * np.ptp(as_is)  # the pixel size matters for this model
    runs = {"tags": [], "off": ["--sampling", "off"], "override": ["--pixel-size", str(SRTIO3_M / 10.0)]}
    for name, extra in runs.items():
        out = tmp_path / f"{name}.tif"
        assert denoise(inp, out, "--model", checkpoint, "--no-calibrate", *extra) == 0
        with tifffile.TiffFile(out) as tif:
            data, info = tif.asarray(), tif.imagej_metadata["Info"]
        np.testing.assert_allclose(data, resampled if name == "tags" else as_is, rtol=1e-5, atol=1e-3)
        assert ("resampled x" in info) == (name == "tags")
    printed = capsys.readouterr().out
    assert "(resolution tags), resampled x0.72" in printed and "sampling off: run as is" in printed
    assert "(--pixel-size), in the model's range" in printed


def test_refused_sampling_exits_2_and_keeps_out(tmp_path, capsys, checkpoint, lattice_14px):
    raw, pixel = lattice_14px
    inp, out = tmp_path / "in.tif", tmp_path / "out.tif"
    tifffile.imwrite(inp, raw, resolution=(0.01 / pixel,) * 2, resolutionunit="CENTIMETER")
    out.write_bytes(SENTINEL)
    for extra, fragment in [
        (["--sampling", "refuse"], "14 px per period"),
        (["--pixel-size", "3e-10"], "not resolved"),
    ]:
        assert denoise(inp, out, "--model", checkpoint, "--overwrite", "--no-calibrate", *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("stemd: error:") and "in.tif" in err and fragment in err and err.count("\n") == 1
        assert out.read_bytes() == SENTINEL and _leftovers(tmp_path, {"in.tif", "out.tif"}) == []


def test_bf16_precision_option(tmp_path, checkpoint, frames):
    inp = tmp_path / "in.tif"
    tifffile.imwrite(inp, frames[1][0])
    assert denoise(inp, tmp_path / "f32.tif", "--model", checkpoint) == 0
    assert denoise(inp, tmp_path / "bf16.tif", "--model", checkpoint, "--precision", "bf16") == 0
    f32, bf16 = tifffile.imread(tmp_path / "f32.tif"), tifffile.imread(tmp_path / "bf16.tif")
    assert not np.array_equal(f32, bf16) and np.abs(f32 - bf16).max() < 0.01 * np.ptp(f32)


@pytest.mark.parametrize("n", [3, 4])
@pytest.mark.parametrize("dtype", [np.uint16, np.uint8])
def test_small_stack_tagged_rgb_by_tifffile_is_a_stack(tmp_path, checkpoint, frames, n, dtype):
    """tifffile writes an (n, H, W) array with n = 3 or 4 and no photometric as RGB(A) with separate planes."""
    clean = np.concatenate([frames[0], frames[0]])[:n]
    rng = np.random.default_rng(n)
    raw = rng.poisson(clean * 40).clip(0, np.iinfo(dtype).max).astype(dtype)
    inp, out = tmp_path / "in.tif", tmp_path / "out.tif"
    with pytest.warns(DeprecationWarning):  # tifffile: "stored as RGB with separate component planes"
        tifffile.imwrite(inp, raw)
    with tifffile.TiffFile(inp) as tif:
        assert tif.pages.first.photometric == tifffile.PHOTOMETRIC.RGB  # what makes it look like colour
    assert denoise(inp, out, "--model", checkpoint) == 0
    data = tifffile.imread(out)
    den = Denoiser.load(checkpoint, device="cpu")
    assert data.shape == raw.shape and data.dtype == np.float32
    plan = den.plan(raw[0].shape, None, raw[0])  # one plan for the stack, from its first frame
    for got, frame in zip(data, raw):
        np.testing.assert_allclose(got, den(frame, plan=plan), rtol=1e-5, atol=1e-3)


def test_sixteen_bit_colour_image_is_still_refused(tmp_path, capsys, checkpoint):
    inp = tmp_path / "in.tif"
    tifffile.imwrite(inp, np.ones((64, 64, 3), np.uint16), photometric="rgb")  # interleaved samples: colour
    assert denoise(inp, tmp_path / "out.tif", "--model", checkpoint) == 2
    assert "colour" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["plain", "zlib", "imagej"])
def test_stack_streams_frame_by_frame(tmp_path, layout):
    """Reading, denoising and writing hold about one frame: far less than the stack, whatever the layout."""
    stack = (np.arange(96 * 128 * 128) % 4001).astype(np.uint16).reshape(96, 128, 128)
    inp, out = tmp_path / "in.tif", tmp_path / "out.tif"
    kwargs = {"plain": {"photometric": "minisblack"}, "zlib": {"photometric": "minisblack", "compression": "zlib"},
              "imagej": {"imagej": True}}[layout]
    tifffile.imwrite(inp, stack, **kwargs)
    tracemalloc.start()
    try:
        image = read_tiff(inp)
        write_tiff_atomic(out, image, denoise_frames(image, lambda f, plan: f * np.float32(2), None, False),
                          stemd_note("test", 1))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.shape == stack.shape and peak < stack.nbytes / 4  # the stack as float32 is 2x stack.nbytes
    np.testing.assert_array_equal(tifffile.imread(out), stack * 2.0)


def test_flips_and_precision_are_applied_and_recorded(tmp_path, checkpoint, frames):
    raw = (frames[1][0] * 1000 + 200).clip(0).astype(np.uint16)
    inp, out = tmp_path / "frame.tif", tmp_path / "out.tif"
    tifffile.imwrite(inp, raw)
    assert denoise(inp, out, "--model", checkpoint, "--flips", "--precision", "bf16", "--dejitter", "1",
                   "--no-planar") == 0
    expected = Denoiser.load(checkpoint, device="cpu", flips=True, precision="bf16", dejitter=1, planar=False)
    with tifffile.TiffFile(out) as tif:
        data, note = tif.asarray(), tif.shaped_metadata[0]["stemd"]
    assert note["flips"] is True and note["precision"] == "bf16" and note["dejitter"] == 1 and note["planar"] is False
    np.testing.assert_allclose(data, expected(raw), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("bad", ["11", "-1", "two"])
def test_bad_dejitter_is_a_usage_error(tmp_path, checkpoint, capsys, bad):
    inp = tmp_path / "frame.tif"
    tifffile.imwrite(inp, np.zeros((32, 32), np.uint16))
    assert denoise(inp, tmp_path / "out.tif", "--model", checkpoint, "--dejitter", bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("stemd: error:") and "--dejitter" in err and err.count("\n") == 1
    assert not (tmp_path / "out.tif").exists()


# ---- many files, output names, formats chosen by name


def test_batch_inputs_take_known_files_and_leave_ser_to_their_emi(tmp_path):
    from stemd.apps.offline import batch_inputs

    for name in ("a.tif", "b.DM4", "c.emi", "c_1.ser", "c_2.ser", "d_1.ser", "e.txt", ".f.tif.1234.tmp", ".g.tif"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "h.zspy").mkdir()
    (tmp_path / "sub").mkdir()
    assert [p.name for p in batch_inputs(tmp_path)] == ["a.tif", "b.DM4", "c.emi", "d_1.ser", "h.zspy"]
    # a glob of .ser alone names the ser files: no .emi among them to read them with
    assert [p.name for p in batch_inputs(tmp_path / "*.ser")] == ["c_1.ser", "c_2.ser", "d_1.ser"]
    assert [p.name for p in batch_inputs(tmp_path / "[ab]*")] == ["a.tif", "b.DM4"]


@pytest.mark.parametrize(("args", "fragment"), [
    (["{dir}", "{tmp}/out.tif"], "names a file; for many inputs give a directory"),
    (["{dir}/*.png", "{tmp}/out"], "no file to denoise"),
    (["{dir}", "{tmp}/missing/out"], "output directory"),
    (["{dir}/in.tif", "{tmp}/out.png"], "name it .tif, .tiff, .hspy or .zspy"),
    (["{dir}/in.tif", "{tmp}/out.tif", "--format", "zspy"], "--format zspy but OUT"),
    (["{dir}/in.tif", "{dir}/in.tif", "--overwrite"], "is the input itself"),
    (["{dir}/in.tif", "{tmp}/out.zspy", "--scheduler", "local"], "--scheduler reads and writes TIFF only"),
    (["{dir}", "{tmp}/out", "--scheduler", "local"], "--scheduler takes one TIFF file"),
])
def test_bad_names_and_modes_are_one_line(tmp_path, capsys, checkpoint, frames, args, fragment):
    src = tmp_path / "src"
    src.mkdir()
    tifffile.imwrite(src / "in.tif", frames[1][0])
    before = (src / "in.tif").read_bytes()
    argv = [a.format(dir=src, tmp=tmp_path) for a in args]
    assert denoise(*argv, "--model", checkpoint) == 2
    err = capsys.readouterr().err
    assert err.startswith("stemd: error:") and fragment in err and err.count("\n") == 1
    assert (src / "in.tif").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"] and sorted(p.name for p in src.iterdir()) == ["in.tif"]


def test_batch_of_tiffs_one_bar_a_line_each_and_a_summary(tmp_path, capsys, checkpoint, frames):
    src, outdir = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        tifffile.imwrite(src / f"f{i}.tif", frames[1][i])
    assert main(["denoise", "--device", "cpu", str(src), str(outdir), "--model", str(checkpoint)]) == 0
    captured = capsys.readouterr()
    assert sorted(p.name for p in outdir.iterdir()) == ["f0.tif", "f1.tif", "f2.tif"]
    for i in range(3):
        out = tifffile.imread(outdir / f"f{i}.tif")
        assert out.shape == frames[1][i].shape and not np.allclose(out, frames[1][i])
    assert [line.split(" ->")[0] for line in captured.out.splitlines()[:3]] == [f"ok {src / f'f{i}.tif'}"
                                                                               for i in range(3)]
    assert "denoised 3 of 3 file(s)" in captured.out
    assert "3/3" in captured.err  # the one progress bar, over files
