"""The Dask path: a lazy array mapped through the denoiser, and `stemd denoise --scheduler` on a real local
cluster, give what the single-process path gives; a failing frame is named and leaves no output."""

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
from distributed import Client, LocalCluster

from stemd.apps.cli import main
from stemd.apps.distributed import denoise_array
from stemd.config import ModelSettings
from stemd.pipeline import Denoiser
from stemd.sim import scenes


@pytest.fixture(scope="module")
def stack() -> np.ndarray:
    rng = np.random.default_rng(2)
    scene = scenes.random_scene((96, 96), rng, period_px=9.0, structures=("perovskite",), layouts=("perfect",))
    return np.stack([scenes.apply_instrument(scene.clean, rng, scenes.draw_noise(rng, dose=20.0), dose=20.0)
                     for _ in range(4)]).astype(np.float32)


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as c:
        yield c


def test_denoise_array_matches_the_denoiser_frame_by_frame(stack, cluster):
    settings = ModelSettings(device="cpu")
    den = Denoiser.load(settings=settings)
    plan = den.plan(stack.shape, None, stack)
    with Client(cluster):
        out = denoise_array(da.from_array(stack, chunks=(2, 48, 96)), settings).compute()
    assert out.dtype == np.float32 and out.shape == stack.shape
    for frame, got in zip(stack, out):
        np.testing.assert_allclose(got, den(frame, plan=plan), rtol=1e-5, atol=1e-5)


def test_cli_on_a_cluster_writes_what_the_single_process_path_writes(tmp_path: Path, stack, cluster):
    inp = tmp_path / "in.tif"
    tifffile.imwrite(inp, stack, photometric="minisblack")
    assert main(["denoise", "--no-progress", "--device", "cpu", str(inp), str(tmp_path / "one.tif")]) == 0
    assert main(["denoise", "--no-progress", "--device", "cpu", "--scheduler", cluster.scheduler_address,
                 str(inp), str(tmp_path / "many.tif")]) == 0
    one, many = tifffile.imread(tmp_path / "one.tif"), tifffile.imread(tmp_path / "many.tif")
    np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-5)
    with tifffile.TiffFile(tmp_path / "many.tif") as tif:
        assert tif.shaped_metadata[0]["stemd"]["scheduler"] == "distributed"


def test_unreachable_scheduler_is_one_line_and_writes_nothing(tmp_path: Path, stack, capsys):
    inp = tmp_path / "in.tif"
    tifffile.imwrite(inp, stack[:2], photometric="minisblack")
    code = main(["denoise", "--no-progress", "--device", "cpu", "--scheduler", "tcp://127.0.0.1:9", str(inp),
                 str(tmp_path / "out.tif")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("stemd: error: --scheduler") and err.count("\n") == 1
    assert not (tmp_path / "out.tif").exists()
