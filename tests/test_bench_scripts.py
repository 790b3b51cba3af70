"""Every bench script runs as `python -m bench.NAME`: its --help, and a quick run where it has one, with all
output in tmp_path (never the real docs/benchmarks.md). Subprocess runs start in the repository root with
PYTHONPATH set to it, so they import this checkout's stemd and bench, as `python -m bench.NAME` from the root does."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench._report import HEADER
from stemd.models.checkpoint import save_checkpoint
from stemd.models.conv_unet import ConvDenoiser
from stemd.models.window_ae import WindowAE

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["adapt", "borders", "dask_scaling", "faithfulness", "latency", "near_far_seeds", "planar_fp", "quality",
           "real", "reliability", "sampling", "scanlines", "speed", "stages", "train_conv", "peers.tk_r_em_measure",
           "peers.tk_r_em_runner", "napari_screenshot", "fidelity"]


def run_module(name: str, *args: str, timeout: float = 120.0) -> str:
    """`python -m bench.NAME ARGS` from the repository root; its stdout, after checking it exited 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", f"bench.{name}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"bench.{name} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def tiny_conv(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny_conv.pt"
    save_checkpoint(path, ConvDenoiser([4, 4]), {})
    return path


@pytest.fixture(scope="module")
def tiny_ae(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny_ae.pt"
    save_checkpoint(path, WindowAE(28, (16, 8)), {"step": 4})
    return path


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_names_the_script_and_exits_0(name, capsys):
    module = importlib.import_module(f"bench.{name}")
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith("usage:")
    if module.__doc__:
        assert module.__doc__.splitlines()[0].rstrip(".") in " ".join(out.split())


def test_bench_is_a_package_without_path_edits():
    for path in (ROOT / "bench").rglob("*.py"):
        text = path.read_text()
        assert "sys.path" not in text, path
        assert "python bench/" not in text, path


def test_quality_quick_runs_to_completion(tmp_path, tiny_ae):
    """`python -m bench.quality --quick` end to end with a tiny untrained model, writing only into tmp_path."""
    (tmp_path / "benchmarks.md").write_text("# Benchmarks\n\n## Speed\n\nkept\n")
    run_module("quality", "--quick", "--size", "64", "--windows", "64", "--model", str(tiny_ae), "--out", str(tmp_path))
    text = (tmp_path / "benchmarks.md").read_text()
    assert "## Speed\n\nkept" in text and "## Quality" in text
    assert text.count("| dose 20") == 10  # 5 methods x (without, with artefacts)
    assert "python -m bench.quality --quick" in text
    assert (tmp_path / "figure2.png").stat().st_size > 0 and (tmp_path / "frames.png").stat().st_size > 0


def test_borders_quick_prints_the_three_tables(tiny_ae):
    out = run_module("borders", "--quick", "--model", str(tiny_ae))
    assert "| 20 | 3 |" in out  # dose 20, step 3: border / interior PSNR before and after
    assert "| 3 | " in out.split("| step | before s/frame | after s/frame |")[1]


def test_borders_refuses_a_conv_model(tiny_conv, capsys):
    from bench import borders

    assert borders.main(["--quick", "--model", str(tiny_conv)]) == 2
    assert "needs a window_ae" in capsys.readouterr().err


def test_sampling_quick_writes_its_section_to_out(tmp_path):
    out = tmp_path / "benchmarks.md"
    run_module("sampling", "--quick", "--write", "--out", str(out))  # the shipped conv model: it has a period range
    text = out.read_text()
    assert text.startswith(HEADER) and "## Sampling" in text
    assert "| 4 | 97.6 |" in text and "| 10 | 39.0 |" in text  # the two quick periods
    assert "Command: `python -m bench.sampling --quick" in text


def test_near_far_seeds_smoke_run_prints_both_models():
    out = run_module("near_far_seeds", "--seeds", "1", "--doses", "20", "--size", "256")
    rows = [line for line in out.splitlines() if line.startswith("| 20 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["conv", "conv no planar guide"]


def test_planar_fp_quick_writes_its_section_to_out(tmp_path):
    out = tmp_path / "benchmarks.md"
    run_module("planar_fp", "--quick", "--doses", "20", "--size", "256", "--out", str(out))
    text = out.read_text()
    assert "## Planar guide false positives" in text and "Command: `python -m bench.planar_fp --quick`" in text
    assert "| fault-free perovskite | 20 | 10 | 0.25 | 0 |" in text and "| perovskite_rp | 20 |" in text



def test_adapt_quick_writes_the_plans_verdict_and_both_psnrs_to_out(tmp_path):
    out = tmp_path / "benchmarks.md"
    run_module("adapt", "--quick", "--out", str(out))
    text = out.read_text()
    assert "## Fine-tune on the frame, simulated (bench/adapt.py)" in text
    rows = [line.split("|") for line in text.splitlines() if line.startswith(("| named", "| no line"))]
    assert len(rows) == 3
    for row in rows:
        assert row[3].strip().startswith(("yes", "rejected", "skipped")) and 25 < float(row[4]) < 45

def test_dask_scaling_quick_times_one_process_and_two_clusters(tmp_path):
    run_module("dask_scaling", "--quick", "--out", str(tmp_path))
    text = (tmp_path / "benchmarks.md").read_text()
    assert "## Dask scaling (bench/dask_scaling.py)" in text
    rows = [line for line in text.splitlines() if line.startswith(("| one process", "| LocalCluster"))]
    assert len(rows) == 3 and all(float(r.split("|")[4]) > 0 for r in rows)
    assert "a 1 Gbit/s link feeds about" in text


def test_stages_smoke_run_times_every_stage():
    out = run_module("stages", "--size", "96", "--repeats", "1")
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| stage")]
    assert len(rows) == 11 and all(float(r.split("|")[2].split()[0]) >= 0 for r in rows)
    assert any(r.startswith("| whole Denoiser.run") for r in rows)


def test_train_conv_speed_quick_times_both_shipped_models():
    """The speed table's references are the shipped paper AE and the shipped conv model (no arch 'hidden')."""
    out = run_module("train_conv", "speed", "--quick")
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(rows) == 3
    assert rows[0].startswith("| shipped AE 28 px (256, 128), step 2 |")
    assert rows[1].startswith("| shipped conv_unet [48, 64, 96, 128], unshuffle 2, guide bragg |")
    assert rows[2].startswith("| conv_unet [16, 32, 48], unshuffle 2, guide none |")


def test_speed_quick_writes_its_section_to_out(tmp_path, tiny_conv):
    from bench import speed

    out = tmp_path / "benchmarks.md"
    assert speed.main(["--quick", "--model", f"t={tiny_conv}", "--sizes", "64", "--precisions", "float32",
                       "--peer-size", "64", "--threads", str(torch.get_num_threads()), "--out", str(out),
                       "--overlap", "--trace", str(tmp_path / "trace.json")]) == 0
    text = out.read_text()
    assert "## Speed (bench/speed.py)" in text and "| cpu | t | float32 | 64² |" in text
    assert "Copy/compute overlap" in text and (tmp_path / "trace.json").stat().st_size > 0
    assert "Command: `python -m bench.speed --quick`" in text
    assert "BM3D" in text  # the classical peers ran


def test_latency_quick_runs_a_daemon_and_writes_its_section(tmp_path, tiny_conv):
    out = tmp_path / "benchmarks.md"
    run_module("latency", "--quick", "--seconds", "1", "--model", f"t={tiny_conv}", "--out", str(out), timeout=150)
    text = out.read_text()
    assert "## Latency (bench/latency.py)" in text
    assert "| t, paced" in text and "| t, full speed" in text


def test_tk_r_em_measure_without_its_venv_exits_1_with_the_setup_hint(tmp_path, monkeypatch, capsys):
    from bench.peers import tk_r_em_measure

    monkeypatch.setenv("TKREM_VENV", str(tmp_path / "none"))
    assert tk_r_em_measure.main(["--frames", "1"]) == 1
    assert "tk_r_em_setup.sh" in capsys.readouterr().err


def test_reliability_quick_fuzz_accounts_for_every_frame(tmp_path, tiny_conv):
    out = tmp_path / "benchmarks.md"
    run_module("reliability", "--quick", "--only", "fuzz,config", "--fuzz", "300", "--cost-sides", "0",
               "--model", str(tiny_conv), "--out", str(out), timeout=240)
    text = out.read_text()
    assert "## Reliability (bench/reliability.py)" in text
    assert "| malformed-message fuzz | 300 | 3 / 3 | 0 |" in text  # every valid frame published, none lost
    assert "start: exit 2, 1 line `stemd: error:" in text and "reload rejected" in text
