"""stemd denoise on the microscopy formats RosettaSciIO reads: files written by rsciio's own writers (hspy, zspy,
Berkeley EMD) or laid out by its own header definition (mrc), read back with rsciio and tifffile."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from rsciio.emd import file_writer as emd_writer
from rsciio.hspy import file_reader as hspy_reader
from rsciio.hspy import file_writer as hspy_writer
from rsciio.zspy import file_reader as zspy_reader
from rsciio.zspy import file_writer as zspy_writer

from stemd.apps.cli import main
from stemd.apps.formats import length_m
from stemd.apps.tiffio import pixel_size_from_tags, read_tiff
from stemd.pipeline import Denoiser
from stemd.sim.lattice import NoiseSpec, corrupt, simulate_frame

# zarr 2 warns of its own NestedDirectoryStore, which rsciio's zspy writer uses
pytestmark = pytest.mark.filterwarnings("ignore:The NestedDirectoryStore is deprecated:FutureWarning")

SRTIO3_M = 3.905e-10
PIXEL_NM = 0.0279  # 14 px per SrTiO3 period


@pytest.fixture(scope="module")
def stack() -> np.ndarray:
    """Three noisy lattice frames, 14 px per period (float32)."""
    rng = np.random.default_rng(11)
    clean = np.stack([simulate_frame((64, 80), rng, period_px=14.0, sigma_px=2.1, rotation_deg=5.0 * i,
                                     offset_px=(i, 2.0 * i)).clean for i in range(3)])
    return corrupt(clean, NoiseSpec(kind="poisson", dose=20.0), rng).astype(np.float32)


def axis(name: str, scale: float, units: str, navigate: bool, size: int) -> dict:
    return {"name": name, "scale": scale, "offset": 0.0, "units": units, "size": size, "navigate": navigate}


def signal(data: np.ndarray, title: str, scale: float = PIXEL_NM, units: str = "nm", **original) -> dict:
    """A signal dict as HyperSpy hands it to rsciio's writers: image axes of `scale` `units`, a frame axis first
    for a stack, the acquisition in metadata and `original` as the vendor's metadata."""
    if data.ndim == 1:
        axes = [axis("Energy", 0.01, "keV", False, data.shape[0])]
    else:
        axes = [axis("y", scale, units, False, data.shape[-2]), axis("x", scale, units, False, data.shape[-1])]
    if data.ndim == 3:
        axes.insert(0, axis("time", 0.5, "s", True, data.shape[0]))
    metadata = {"General": {"title": title}, "Signal": {"signal_type": ""},
                "Acquisition_instrument": {"TEM": {"beam_energy": 300.0, "Detector": {"name": title}}}}
    return {"data": data, "axes": axes, "metadata": metadata, "original_metadata": original, "learning_results": {},
            "attributes": {"_lazy": False}, "models": {}, "package_info": {"package": "", "package_version": ""},
            "tmp_parameters": {}}


def denoise(*argv: str | Path) -> int:
    return main(["denoise", "--no-progress", "--device", "cpu", *map(str, argv)])


def assert_denoised(out: np.ndarray, raw: np.ndarray) -> None:
    assert out.shape == raw.shape and out.dtype == np.float32 and np.isfinite(out).all()
    assert not np.allclose(out, raw, atol=1e-3 * np.ptp(raw))
    assert abs(float(out.mean()) - float(raw.mean())) < 0.1 * np.ptp(raw)  # same units, not a rescaled image


def tiff_pixel_m(path: Path) -> float | None:
    return pixel_size_from_tags(read_tiff(path))


def test_hspy_frame_to_imagej_tiff_with_pixel_size_and_metadata(tmp_path, checkpoint, stack):
    raw = stack[0]
    inp, out = tmp_path / "frame.hspy", tmp_path / "frame.tif"
    hspy_writer(str(inp), signal(raw, "HAADF", Microscope={"name": "Titan", "serial": 4711}))
    assert denoise(inp, out, "--model", checkpoint) == 0
    with tifffile.TiffFile(out) as tif:
        data, ij = tif.asarray(), tif.imagej_metadata
    assert_denoised(data, raw)
    assert ij["unit"] == "nm"
    assert tiff_pixel_m(out) == pytest.approx(PIXEL_NM * 1e-9, rel=1e-5)
    assert '"Titan"' in ij["Info"] and '"beam_energy": 300.0' in ij["Info"] and "model" in ij["Info"]


def test_zspy_stack_to_hspy_keeps_axes_and_metadata(tmp_path, checkpoint, stack):
    inp, out = tmp_path / "series.zspy", tmp_path / "series.hspy"
    zspy_writer(str(inp), signal(stack, "HAADF", scale=27.9, units="pm", Microscope={"name": "Spectra"}))
    assert denoise(inp, out, "--model", checkpoint) == 0
    [back] = hspy_reader(str(out))
    assert_denoised(back["data"], stack)
    assert [(a["name"], a["units"], a["navigate"], int(a["size"])) for a in back["axes"]] == [
        ("time", "s", True, 3), ("y", "pm", False, 64), ("x", "pm", False, 80)]
    assert [float(a["scale"]) for a in back["axes"]] == pytest.approx([0.5, 27.9, 27.9])
    md, om = back["metadata"], back["original_metadata"]
    assert md["General"]["title"] == "HAADF" and md["Acquisition_instrument"]["TEM"]["beam_energy"] == 300.0
    assert om["Microscope"]["name"] == "Spectra"
    assert md["stemd"]["model"] and "software" in md["stemd"]


def test_tiff_in_zspy_out_takes_the_tags_pixel_size(tmp_path, checkpoint, stack):
    inp, out = tmp_path / "in.tif", tmp_path / "out.zspy"
    tifffile.imwrite(inp, stack, imagej=True, resolution=(1 / PIXEL_NM,) * 2, metadata={"unit": "nm", "axes": "TYX"})
    assert denoise(inp, out, "--model", checkpoint) == 0
    [back] = zspy_reader(str(out))
    assert_denoised(np.asarray(back["data"]), stack)
    assert back["axes"][-1]["units"] == "nm" and float(back["axes"][-1]["scale"]) == pytest.approx(PIXEL_NM, rel=1e-5)
    assert back["original_metadata"]["TIFF"]["imagej"]["unit"] == "nm"


@pytest.mark.parametrize(("scale", "units"), [(0.279, "Å"), (0.279, "A"), (27.9, "pm"), (2.79e-5, "µm")])
def test_axes_pixel_size_feeds_the_sampling_plan(tmp_path, capsys, checkpoint, stack, scale, units):
    """The model is run without calibration, so only the pixel size can resample: the file's axes must give it."""
    raw = stack[0]
    inp = tmp_path / "frame.hspy"
    hspy_writer(str(inp), signal(raw, "HAADF", scale=scale, units=units))
    den = Denoiser.load(checkpoint, device="cpu", calibrate=False)
    resampled = den(raw, pixel_size_m=PIXEL_NM * 1e-9)
    assert np.abs(den(raw) - resampled).max() > 0.05 * np.ptp(raw)  # the pixel size matters here
    out = tmp_path / "out.tif"
    assert denoise(inp, out, "--model", checkpoint, "--no-calibrate") == 0
    np.testing.assert_allclose(tifffile.imread(out), resampled, rtol=1e-5, atol=1e-3)
    assert "pixel size 2.79e-11 m (file axes), resampled x0.7" in capsys.readouterr().out
    assert tiff_pixel_m(out) == pytest.approx(PIXEL_NM * 1e-9, rel=1e-4)


def test_emd_with_several_signals_denoises_the_images_and_names_what_it_skipped(tmp_path, capsys, checkpoint, stack):
    import h5py
    from rsciio.emd._emd_ncem import EMD_NCEM  # rsciio's own writer, into a file already open (several signals)

    inp = tmp_path / "session.emd"
    emd_writer(str(inp), signal(stack[0], "HAADF", microscope={"name": "TEAM 0.5"}))
    for extra in (signal(np.linspace(0, 1, 200, dtype=np.float32), "EDS"), signal(stack, "DF4")):
        EMD_NCEM().write_file(h5py.File(inp, "a"), extra)
    assert denoise(inp, tmp_path / "out.tif", "--model", checkpoint) == 0
    captured = capsys.readouterr()
    assert sorted(p.name for p in tmp_path.glob("out*")) == ["out_DF4.tif", "out_HAADF.tif"]
    assert_denoised(tifffile.imread(tmp_path / "out_HAADF.tif"), stack[0])
    assert_denoised(tifffile.imread(tmp_path / "out_DF4.tif"), stack)
    assert "skipped EDS: a spectrum" in captured.err and captured.err.count("\n") == 1
    assert tiff_pixel_m(tmp_path / "out_DF4.tif") == pytest.approx(PIXEL_NM * 1e-9, rel=1e-5)
    with tifffile.TiffFile(tmp_path / "out_HAADF.tif") as tif:
        assert "TEAM 0.5" in tif.imagej_metadata["Info"]


def write_mrc(path: Path, data: np.ndarray, pixel_angstrom: float) -> None:
    """An MRC2014 file laid out by rsciio's own header definition; cell lengths in Å give the pixel size."""
    from rsciio.mrc._api import get_std_dtype_list

    header = np.zeros(1, dtype=get_std_dtype_list("<"))
    nz, ny, nx = data.shape
    for key, value in {"NX": nx, "NY": ny, "NZ": nz, "MODE": 2, "MX": nx, "MY": ny, "MZ": nz, "Xlen": nx *
                       pixel_angstrom, "Ylen": ny * pixel_angstrom, "Zlen": nz * pixel_angstrom, "ALPHA": 90,
                       "BETA": 90, "GAMMA": 90, "MAPC": 1, "MAPR": 2, "MAPS": 3}.items():
        header[key] = value
    assert header.itemsize == 1024
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(data.astype("<f4").tobytes())


def test_mrc_stack(tmp_path, checkpoint, stack):
    inp, out = tmp_path / "tilt.mrc", tmp_path / "tilt.tif"
    write_mrc(inp, stack, PIXEL_NM * 10)
    assert denoise(inp, out, "--model", checkpoint) == 0
    assert_denoised(tifffile.imread(out), stack)
    assert tiff_pixel_m(out) == pytest.approx(PIXEL_NM * 1e-9, rel=1e-5)


def test_zspy_out_is_never_overwritten_without_the_option(tmp_path, capsys, checkpoint, stack):
    inp, out = tmp_path / "in.hspy", tmp_path / "out.zspy"
    hspy_writer(str(inp), signal(stack[0], "HAADF"))
    assert denoise(inp, out, "--model", checkpoint) == 0
    first = np.asarray(zspy_reader(str(out))[0]["data"])
    hspy_writer(str(inp), signal(stack[1], "HAADF"))
    assert denoise(inp, out, "--model", checkpoint) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(zspy_reader(str(out))[0]["data"]), first)
    assert denoise(inp, out, "--model", checkpoint, "--overwrite") == 0
    assert not np.allclose(np.asarray(zspy_reader(str(out))[0]["data"]), first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.hspy", "out.zspy"]


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda p: hspy_writer(str(p), signal(np.linspace(0, 1, 100, dtype=np.float32), "EELS")), "holds no image"),
    (lambda p: p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100), "cannot read"),
])
def test_bad_file_is_one_line(tmp_path, capsys, checkpoint, make, fragment):
    inp = tmp_path / "bad.hspy"
    make(inp)
    assert denoise(inp, tmp_path / "out.tif", "--model", checkpoint) == 2
    err = capsys.readouterr().err
    assert err.startswith("stemd: error:") and fragment in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.hspy"]


def test_batch_reports_and_skips_a_corrupt_file(tmp_path, capsys, checkpoint, stack):
    src, outdir = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    hspy_writer(str(src / "a.hspy"), signal(stack[0], "HAADF"))
    (src / "b.dm4").write_bytes(b"not a Gatan file" * 64)
    tifffile.imwrite(src / "c.tif", stack, photometric="minisblack")
    zspy_writer(str(src / "d.zspy"), signal(stack[:2], "HAADF"))
    (src / "notes.txt").write_text("not an image")
    assert denoise(src, outdir, "--model", checkpoint) == 1
    captured = capsys.readouterr()
    assert sorted(p.name for p in outdir.iterdir()) == ["a.tif", "c.tif", "d.tif"]
    assert_denoised(tifffile.imread(outdir / "c.tif"), stack)
    assert tifffile.imread(outdir / "d.tif").shape == (2, 64, 80)
    assert f"failed {src / 'b.dm4'}: cannot read" in captured.err
    assert "denoised 3 of 4 file(s)" in captured.err and "1 failed: b.dm4" in captured.err
    assert sum(line.startswith("ok ") for line in captured.out.splitlines()) == 3

    # again, as hspy: a glob; the tif outputs are other names, nothing is overwritten
    assert denoise(str(src / "[ac].*"), outdir, "--model", checkpoint, "--format", "hspy") == 0
    assert_denoised(hspy_reader(str(outdir / "a.hspy"))[0]["data"], stack[0])
    # a third time: every output exists and none is replaced without --overwrite
    before = (outdir / "a.tif").read_bytes()
    assert denoise(src, outdir, "--model", checkpoint) == 1
    assert capsys.readouterr().err.count("exists; pass --overwrite") == 3
    assert (outdir / "a.tif").read_bytes() == before


def test_without_the_extra_a_non_tiff_input_is_one_line(tmp_path):
    inp = tmp_path / "scan.dm4"
    inp.write_bytes(b"\x00" * 64)
    code = ("import sys; sys.modules['rsciio'] = None; from stemd.apps.cli import main; "
            f"sys.exit(main(['denoise', {str(inp)!r}, {str(tmp_path / 'o.tif')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "stemd: error: reading .dm4 needs the formats extra: pip install 'stemd[formats]'\n"


def _stream(inp: Path, out: Path) -> None:
    """Denoise (here: x2) every frame of `inp` into `out` the way stemd denoise does, without the model."""
    from stemd.apps.formats import open_sources, tiff_carrier, write_signal_atomic
    from stemd.apps.offline import denoise_frames
    from stemd.apps.tiffio import stemd_note, write_tiff_atomic

    [source], _ = open_sources(inp)
    frames = denoise_frames(source, lambda f, plan: f * np.float32(2), None, False)
    if out.suffix == ".tif":
        write_tiff_atomic(out, tiff_carrier(source, source.pixel_size_m()), frames, stemd_note("test", 1))
    else:
        write_signal_atomic(out, source, frames, stemd_note("test", 1))


@pytest.mark.parametrize(("src", "dst"), [("zspy", "hspy"), ("hspy", "zspy"), ("hspy", "tif")])
def test_formats_stream_frame_by_frame(tmp_path, src, dst):
    """Reading a HyperSpy stack and writing HyperSpy or TIFF hold a few frames, far less than the stack
    (measured: 1.0-1.7 MB for this 12.6 MB stack, the same for half of it)."""
    import tracemalloc

    writer = {"zspy": zspy_writer, "hspy": hspy_writer}[src]
    writer(str(tmp_path / f"warm.{src}"), signal(np.ones((2, 32, 32), np.uint16), "HAADF"))
    _stream(tmp_path / f"warm.{src}", tmp_path / f"warm_out.{dst}")  # the libraries' first-use imports
    stack = (np.arange(96 * 256 * 256) % 4001).astype(np.uint16).reshape(96, 256, 256)
    inp, out = tmp_path / f"in.{src}", tmp_path / f"out.{dst}"
    writer(str(inp), signal(stack, "HAADF"), chunks=(1, 256, 256))
    tracemalloc.start()
    try:
        _stream(inp, out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < stack.nbytes / 4  # the stack as float32 is 2x stack.nbytes
    back = tifffile.imread(out) if dst == "tif" else np.asarray({"hspy": hspy_reader, "zspy": zspy_reader}[dst](
        str(out))[0]["data"])
    np.testing.assert_array_equal(back, stack * 2.0)


def test_several_images_check_each_output_name(tmp_path, capsys, checkpoint, stack):
    """OUT itself is not written for a file of several images: only OUT_<title> outputs are refused if they exist."""
    import h5py
    from rsciio.emd._emd_ncem import EMD_NCEM

    inp = tmp_path / "two.emd"
    emd_writer(str(inp), signal(stack[0], "HAADF"))
    EMD_NCEM().write_file(h5py.File(inp, "a"), signal(stack[1], "BF"))
    (tmp_path / "out.tif").write_bytes(b"an unrelated file")
    (tmp_path / "out_BF.tif").write_bytes(b"a previous output")
    assert denoise(inp, tmp_path / "out.tif", "--model", checkpoint) == 2
    assert "out_BF.tif exists" in capsys.readouterr().err and not (tmp_path / "out_HAADF.tif").exists()
    (tmp_path / "out_BF.tif").unlink()
    assert denoise(inp, tmp_path / "out.tif", "--model", checkpoint) == 0
    assert (tmp_path / "out.tif").read_bytes() == b"an unrelated file"
    assert_denoised(tifffile.imread(tmp_path / "out_BF.tif"), stack[1])


def write_velox(path: Path, images: dict[str, np.ndarray]) -> None:
    """A Velox EMD (rsciio has no Velox writer): the HDF5 layout its reader takes, one Data/Image group per
    detector, frames last, each frame's metadata as JSON bytes; pixel size 27.9 pm given in metres."""
    import json

    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("Version", data=np.array([json.dumps({"format": "Velox", "version": 11}).encode()]))
        for i, data in enumerate(images.values()):
            stack = data if data.ndim == 3 else data[None]
            group = f.create_group(f"Data/Image/{i:032x}")
            group.create_dataset("Data", data=np.moveaxis(stack, 0, -1), chunks=(*stack.shape[1:], 1))
            meta = {"BinaryResult": {"PixelSize": {"width": str(PIXEL_NM * 1e-9), "height": str(PIXEL_NM * 1e-9)},
                                     "PixelUnitX": "m", "PixelUnitY": "m", "Offset": {"x": "0", "y": "0"},
                                     "DetectorIndex": str(i)},
                    "Detectors": {f"Detector-{j}": {"DetectorName": name} for j, name in enumerate(images)},
                    "Scan": {"FrameTime": "1.5"}, "Optics": {"AccelerationVoltage": "300000"},
                    "Acquisition": {"AcquisitionStartDatetime": {"DateTime": "1700000000"}},
                    "Instrument": {"InstrumentModel": "Spectra 300"}, "CustomProperties": {}}
            raw = np.frombuffer(json.dumps(meta).encode(), np.uint8)
            group.create_dataset("Metadata", data=np.repeat(raw[:, None], stack.shape[0], axis=1))


def test_velox_emd_detectors_to_hspy(tmp_path, capsys, checkpoint, stack):
    """HAADF and a DF4 series are denoised, each into its own HyperSpy file; the complex iDPC image is skipped."""
    dpc = np.zeros((64, 80), dtype=[("realFloat", "<f4"), ("imagFloat", "<f4")])
    inp = tmp_path / "velox.emd"
    write_velox(inp, {"HAADF": stack[0], "DF4": (stack * 10).astype(np.uint16), "iDPC": dpc})
    assert denoise(inp, tmp_path / "out.hspy", "--model", checkpoint) == 0
    assert "skipped iDPC: its data are complex64" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("out*")) == ["out_DF4.hspy", "out_HAADF.hspy"]
    [haadf], [df4] = hspy_reader(str(tmp_path / "out_HAADF.hspy")), hspy_reader(str(tmp_path / "out_DF4.hspy"))
    assert_denoised(haadf["data"], stack[0])
    assert_denoised(df4["data"], (stack * 10).astype(np.uint16))
    for back in (haadf, df4):
        x = back["axes"][-1]  # the reader picks nm or pm by the image's width
        assert float(x["scale"]) * length_m(x["units"]) == pytest.approx(PIXEL_NM * 1e-9, rel=1e-5)
        assert back["original_metadata"]["Instrument"]["InstrumentModel"] == "Spectra 300"
    assert df4["metadata"]["General"]["title"] == "DF4" and df4["axes"][0]["name"] == "Time"
