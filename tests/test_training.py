"""`stemd train`: a tiny run learns, checkpoints carry metadata, resume and seeding are exact, bad settings name
the key."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import stemd
from stemd.apps.cli import main
from stemd.apps.training import (
    evaluate,
    lr_at,
    quality,
    read_state,
    sample_log_mse,
    train,
    training_stream,
    validation_set,
)
from stemd.config import TrainSettings, load_train_settings
from stemd.errors import CheckpointError, ConfigError
from stemd.models.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def tiny(out: Path, **overrides) -> TrainSettings:
    """A run of seconds: small model, small batches, constant LR so a split run equals a whole one; paper noise only.

    One thread: on a busy 2-core machine two threads contend and run many times slower."""
    base = {"samples": 6000, "batch_size": 64, "lr": 3e-3, "lr_decay": "none", "val_samples": 1000,
            "val_every": 3000, "hidden": [64, 16], "device": "cpu", "threads": 1, "noise_mix": [], "out": str(out)}
    return load_train_settings(None, {**base, **overrides})


QUIET = {"progress": False, "log": lambda _: None, "frame_check": False}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[0].state_dict()


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    settings = tiny(tmp_path_factory.mktemp("run_a"))
    return settings, train(settings, progress=False, log=lambda _: None)


def test_tiny_run_learns(run_a):
    _, result = run_a
    initial = result.history[0]["val_loss"]
    assert [row["samples"] for row in result.history] == [0, 3000, 6000]
    assert result.best_val_loss < 0.8 * initial
    assert result.best_val_loss < 0.5 * result.noisy_quality["mse"]
    assert result.quality["mse"] == result.best_val_loss
    assert result.quality["psnr_db"] > result.noisy_quality["psnr_db"]


def test_checkpoints_load_and_carry_metadata(run_a):
    settings, result = run_a
    model, meta = load_checkpoint(result.best_path)
    assert model.arch() == {"name": "window_ae", "window": 28, "hidden": [64, 16]}
    assert meta["window"] == 28 and meta["step"] == 2
    assert meta["lattice"]["period_px"] == settings.lattice.period_px
    assert meta["lattice"]["sigma_px"] == settings.lattice.sigma_px
    assert meta["noise"]["kind"] == "uniform" and meta["noise"]["snr"] == settings.noise.snr
    assert meta["stemd_version"] == stemd.__version__
    assert meta["samples_seen"] == 6000
    assert meta["best_val_loss"] == result.best_val_loss
    assert set(meta["quality"]) == {"val_mse", "val_mae", "val_psnr_db", "val_mean_psnr_db"}
    assert meta["command"]
    assert [row["dose"] for row in meta["frame_quality"]] == [5.0, 20.0, 100.0]
    assert all(math.isfinite(row["psnr_db"]) and math.isfinite(row["noisy_psnr_db"]) for row in meta["frame_quality"])
    overall, _ = evaluate(model, validation_set(settings), torch.device("cpu"))
    assert overall["mse"] == pytest.approx(meta["quality"]["val_mse"], rel=1e-5)
    assert meta["quality_by_noise"][0]["val_mse"] == meta["quality"]["val_mse"]
    _, last_meta = load_checkpoint(result.last_path)
    assert last_meta["samples_seen"] == 6000


def test_resume_continues_exactly(run_a, tmp_path):
    _, whole = run_a
    first = train(tiny(tmp_path, samples=3000), **QUIET)
    assert first.samples_seen == 3000
    resumed = train(tiny(tmp_path), resume=first.last_path, **QUIET)
    assert resumed.samples_seen == 6000
    assert [row["samples"] for row in resumed.history] == [0, 3000, 6000]
    assert resumed.start_val_loss == pytest.approx(first.history[-1]["val_loss"], rel=1e-6)
    assert read_state(resumed.last_path)["optimizer"]["state"][0]["step"] == 2 * math.ceil(3000 / 64)
    got, want = weights(resumed.last_path), weights(whole.last_path)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_seed_reproduces_weights(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [train(tiny(tmp_path / f"r{i}", samples=640, seed=seed), **QUIET)
                for i, seed in enumerate((5, 5, 6))]
        assert torch.get_num_threads() == 2  # train() ran on 1 thread and put the setting back
    finally:
        torch.set_num_threads(threads)
    a, b, c = (weights(r.last_path) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_noise_mix_shares_data_and_reports_each_model(tmp_path):
    mix = {"samples": 1280, "val_every": 640, "val_samples": 1001, "noise_mix": [{"kind": "poisson", "dose": 20.0}]}
    settings = tiny(tmp_path, **mix)
    assert sum(len(x) for x, _ in training_stream(settings, 0, 1000)) == 1000
    val = validation_set(settings)
    assert [(p.start, p.stop) for p in val.parts] == [(0, 501), (501, 1001)]
    result = train(settings, **QUIET)
    paper, poisson = load_checkpoint(result.best_path)[1]["quality_by_noise"]
    assert paper["noise"]["kind"] == "uniform" and poisson["noise"]["kind"] == "poisson"
    assert poisson["noisy_val_mse"] < 0.5 * paper["noisy_val_mse"]  # dose 20 is far milder than SNR 0.33
    assert paper["val_mse"] < paper["noisy_val_mse"]
    half = train(tiny(tmp_path / "split", **{**mix, "samples": 640}), **QUIET)
    resumed = train(tiny(tmp_path / "split", **mix), resume=half.last_path, **QUIET)
    got, want = weights(resumed.last_path), weights(result.last_path)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_resume_finished_run_says_so(run_a, capsys):
    _, result = run_a
    before = result.last_path.stat().st_mtime_ns
    assert main(["train", "--resume", str(result.last_path), "--no-progress"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert result.last_path.stat().st_mtime_ns == before


def test_resume_refuses_what_it_cannot_continue(run_a, tmp_path):
    settings, result = run_a
    with pytest.raises(CheckpointError, match="does not exist"):
        train(settings, resume=tmp_path / "nope.pt", progress=False)
    lone = tmp_path / "lone.pt"
    shutil.copy(result.best_path, lone)
    with pytest.raises(CheckpointError, match="training state"):
        train(settings, resume=lone, progress=False)
    with pytest.raises(ConfigError, match="hidden"):
        train(tiny(tmp_path, hidden=[32, 8], samples=9000), resume=result.last_path, progress=False)


@pytest.mark.parametrize(
    ("yaml_text", "argv", "key"),
    [
        ("sampels: 5\n", [], "sampels"),
        ("noise:\n  kind: pink\n", [], "noise.kind"),
        ("lattice:\n  period_px: -1\n", [], "lattice.period_px"),
        ("", ["--samples", "0"], "samples"),
        ("", ["--lr", "fast"], "lr"),
        ("", ["--hidden", "64,x"], "hidden"),
        ("", ["--device", "tpu"], "device"),
        ("edge_fraction: 0.4\n", [], "edge_fraction"),
    ],
)
def test_bad_setting_names_the_key(tmp_path, capsys, yaml_text, argv, key):
    config = tmp_path / "train.yaml"
    config.write_text(yaml_text)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stemd: error:") and re.search(rf"\b{re.escape(key)}\b", err)
    assert not (tmp_path / "run").exists()


def _keys(node: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in node.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, prefix + k + ".")
    return out


def test_train_yaml_mirrors_the_defaults():
    path = REPO / "config" / "train.yaml"
    assert load_train_settings(path) == TrainSettings()
    assert _keys(yaml.safe_load(path.read_text())) == _keys(TrainSettings().model_dump())
    for line in path.read_text().splitlines():
        if re.match(r"\s*\w+:", line):
            assert "#" in line, f"no comment on {line!r}"


def test_lr_schedules():
    s = TrainSettings(samples=1000, lr=1.0)
    cosine = [lr_at(s, n) for n in range(0, 1001, 100)]
    assert cosine[0] == 1.0 and cosine[-1] == pytest.approx(0.02)
    assert all(a > b for a, b in zip(cosine, cosine[1:]))
    step = TrainSettings(samples=1000, lr=1.0, lr_decay="step")
    assert [lr_at(step, n) for n in (0, 249, 250, 500, 750, 1000)] == [1.0, 1.0, 0.5, 0.25, 0.125, 0.125]
    assert lr_at(TrainSettings(samples=1000, lr=1.0, lr_decay="none"), 900) == 1.0


def test_init_starts_from_a_checkpoints_weights(run_a, tmp_path):
    settings, result = run_a
    tuned = train(tiny(tmp_path / "tuned", samples=3000, val_every=3000, init=str(result.best_path)), **QUIET)
    assert tuned.start_val_loss == pytest.approx(result.best_val_loss, rel=1e-6)  # not a random start
    fresh = train(tiny(tmp_path / "fresh", samples=3000, val_every=3000), **QUIET)
    assert fresh.start_val_loss > 2 * tuned.start_val_loss
    with pytest.raises(CheckpointError, match="init: .* these settings build"):
        train(tiny(tmp_path / "other", hidden=[32, 8], init=str(result.best_path)), **QUIET)


def test_log_mse_is_minus_each_samples_psnr():
    clean = torch.zeros(3, 1, 4, 4)
    pred = clean + torch.tensor([0.1, 0.01, 0.0]).view(3, 1, 1, 1)  # MSE 1e-2, 1e-4, 0
    assert sample_log_mse(pred, clean).tolist() == pytest.approx([-20.0, -40.0, -60.0], abs=0.05)  # floor 1e-6
    q = quality(pred, clean)
    assert q["mean_psnr_db"] == pytest.approx(40.0, abs=0.05)  # the mean of the per-sample PSNRs (20, 40, 60)
    assert q["psnr_db"] == pytest.approx(10 * math.log10(3 / 0.0101), abs=1e-3)  # the PSNR of the mean MSE


def test_log_mse_run_learns_and_picks_best_by_mean_psnr(run_a, tmp_path):
    _, result = run_a
    tuned = train(tiny(tmp_path / "log", samples=3000, val_every=1000, loss="log_mse", init=str(result.best_path)),
                  **QUIET)
    assert tuned.best_val_loss == -tuned.quality["mean_psnr_db"]
    assert tuned.best_val_loss == min(row["val_loss"] for row in tuned.history)
    assert tuned.start_val_loss == pytest.approx(-result.quality["mean_psnr_db"], rel=1e-5)
    assert tuned.best_val_loss < tuned.start_val_loss  # it trained on, by its own measure
    with pytest.raises(ConfigError, match="loss"):
        tiny(tmp_path / "bad", loss="psnr")
