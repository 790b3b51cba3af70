"""bench/faithfulness.py: its scoring functions on images with known answers, and a quick smoke run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from bench import faithfulness as fb
from bench import near_far_seeds
from stemd.compute import metrics
from stemd.pipeline import Denoiser
from stemd.sim import scenes


@pytest.fixture(scope="module")
def amorphous():
    """A 256² amorphous frame (perovskite on the left, amorphous on the right) and its region's weight."""
    noisy, scene, noise = scenes.named_frame("amorphous", (256, 256), seed=1, dose=20.0)
    weight = fb.region_weight(scene.amorphous, margin=10.0)
    return noisy, scene, weight


@pytest.fixture(scope="module")
def reference() -> float:
    _, scene, _ = scenes.named_frame("perovskite_rp", (256, 256), seed=1, dose=20.0)
    return fb.ring_power(scene.clean, fb.region_weight(np.ones_like(scene.clean, bool)),
                         fb.lattice_shells(scene.params["phases"]))


def _lattice(shape: tuple[int, int], rotation: float) -> np.ndarray:
    """A clean perfect perovskite (10 px, like the reference) at `rotation`."""
    phase = scenes.Phase("perovskite", 10.0, rotation, (3.0, 4.0))
    return scenes.build_scene(shape, [phase], [], np.random.default_rng(0), sigma_px=1.3, blur_px=0.6).clean


# ---------------------------------------------------------------- invention score


def test_ring_power_of_a_cosine_is_its_mean_square() -> None:
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float64)
    for a, (gy, gx) in ((0.3, (0.0, 0.1)), (0.1, (0.06, 0.08))):
        wave = a * np.cos(2 * np.pi * (gy * yy + gx * xx))
        power = fb.ring_power(wave, fb.region_weight(np.ones((256, 256), bool)), [math.hypot(gy, gx)])
        assert power == pytest.approx(a * a / 2, rel=0.1)
        assert fb.ring_power(wave, np.ones((256, 256)), [0.17]) == pytest.approx(0.0, abs=0.01 * a * a)


def test_ring_power_does_not_depend_on_the_window_size() -> None:
    lattice = _lattice((256, 256), 20.0)
    shells = fb.lattice_shells([fb.TRAINING_LATTICE])
    wide = fb.ring_power(lattice, fb.region_weight(np.ones((256, 256), bool)), shells)
    band = np.zeros((256, 256), bool)
    band[:, 100:160] = True
    narrow = fb.ring_power(lattice, fb.region_weight(band, taper=4.0), shells)
    assert 0.6 * wide < narrow < 1.1 * wide  # a narrow window leaks some power outside the rings


def test_invention_is_zero_for_the_clean_image_and_near_zero_for_noise(amorphous, reference) -> None:
    noisy, scene, weight = amorphous
    shells = fb.lattice_shells([*scene.params["phases"], fb.TRAINING_LATTICE])
    assert fb.invention_score(scene.clean, scene.clean, weight, shells, reference) == 0.0
    assert abs(fb.invention_score(noisy, scene.clean, weight, shells, reference)) < 0.003


@pytest.mark.parametrize("rotation", [12.0, 40.0])
def test_invention_sees_a_lattice_painted_into_the_amorphous_region(amorphous, reference, rotation) -> None:
    _, scene, weight = amorphous
    shells = fb.lattice_shells([*scene.params["phases"], fb.TRAINING_LATTICE])
    lattice = _lattice(scene.clean.shape, rotation)
    full = fb.invention_score(scene.clean + lattice * scene.amorphous, scene.clean, weight, shells, reference)
    faint = fb.invention_score(scene.clean + 0.2 * lattice * scene.amorphous, scene.clean, weight, shells, reference)
    assert 0.6 < full < 1.3  # as much lattice as the reference crystal
    assert faint == pytest.approx(0.04 * full, rel=0.15)  # power: quadratic in the amplitude


def test_defect_bands_cover_the_fault_and_the_control_is_elsewhere() -> None:
    _, scene, _ = scenes.named_frame("perovskite_rp", (256, 256), seed=1, dose=20.0)
    band, control = fb.defect_bands(scene)
    near = np.round(scene.columns[scene.near_defect]).astype(int)
    near = near[(near >= 0).all(1) & (near < 256).all(1)]
    assert band[near[:, 0], near[:, 1]].all()
    assert control.sum() > 0.5 * band.sum() and not (band & control).any()


def test_band_score_ignores_contrast_loss_and_sees_a_lattice_continued_across_the_fault() -> None:
    _, scene, _ = scenes.named_frame("perovskite_rp", (256, 256), seed=1, dose=20.0)
    band, control = fb.defect_bands(scene)
    shells = fb.lattice_shells(scene.params["phases"])
    clean = scene.clean.astype(np.float64)
    assert fb.band_score(clean, clean, band, control, shells) == 0.0
    assert abs(fb.band_score(0.4 * clean + 0.1, clean, band, control, shells)) < 0.02
    phase = scenes.Phase(**{**scene.params["phases"][0], "rp_fault_at": None,
                            "offset_px": tuple(scene.params["phases"][0]["offset_px"])})
    perfect = scenes.build_scene((256, 256), [phase], [], np.random.default_rng(0), sigma_px=1.3, blur_px=0.6,
                                 drift_px=scene.params["drift_px"]).clean
    diff = np.abs(perfect - clean)
    assert diff[:, :64].mean() < 0.01 < 0.05 < diff[:, -64:].mean()  # the same lattice before the fault only
    painted = np.where(band, perfect, clean)
    assert fb.band_score(painted, clean, band, control, shells) > 0.3


def test_lattice_shells() -> None:
    square = fb.lattice_shells([{"kind": "perovskite", "period_px": 10.0}])
    assert square == pytest.approx([0.1, math.sqrt(2) / 10, 0.2, math.sqrt(5) / 10], abs=1e-6)
    hexagonal = fb.lattice_shells([{"kind": "hexagonal", "period_px": 12.0}, {"kind": "vacuum", "period_px": 12.0}])
    assert hexagonal[0] == pytest.approx(2 / (math.sqrt(3) * 12), abs=1e-6)


# ---------------------------------------------------------------- column statistics


def _scene(columns: np.ndarray, near: np.ndarray, period: float = 10.0, shape=(100, 100)) -> scenes.Scene:
    z = np.zeros(shape, bool)
    return scenes.Scene(np.zeros(shape, np.float32), columns, np.ones(len(columns)), near, z, z,
                        np.zeros(shape, np.int8), {"phases": [{"kind": "perovskite", "period_px": period}]})


def test_pm_per_px_uses_the_perovskite_period() -> None:
    assert fb.pm_per_px(_scene(np.zeros((0, 2)), np.zeros(0, bool), period=10.0)) == pytest.approx(39.05)
    assert fb.pm_per_px(_scene(np.zeros((0, 2)), np.zeros(0, bool), period=12.5)) == pytest.approx(31.24)
    hexagonal = _scene(np.zeros((0, 2)), np.zeros(0, bool))
    hexagonal.params["phases"] = [{"kind": "hexagonal", "period_px": 12.0}]
    with pytest.raises(ValueError, match="perovskite"):
        fb.pm_per_px(hexagonal)


def test_column_groups_split_near_and_far_inside_the_margin() -> None:
    cols = np.array([[50, 50], [50, 60], [20, 20], [3, 50], [50, 96], [80, 80]], float)
    near = np.array([True, True, False, True, False, False])
    g = fb.column_groups(_scene(cols, near), margin=8)
    assert g["all"].tolist() == [True, True, True, False, False, True]
    assert g["near"].tolist() == [True, True, False, False, False, False]
    assert g["far"].tolist() == [False, False, True, False, False, True]


def _fits(centres: np.ndarray, amps: np.ndarray, ok: np.ndarray) -> metrics.ColumnFits:
    n = len(centres)
    return metrics.ColumnFits(centres, amps, np.ones(n), np.zeros(n), ok)


def test_column_stats_in_pm_with_bias_spread_and_failures() -> None:
    ref = _fits(
        np.array([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0], [40.0, 40.0]]), np.ones(4), np.array([1, 1, 1, 0], bool)
    )
    shift = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    fits = _fits(ref.centres + shift, np.array([1.1, 0.9, 5.0, 1.0]), np.array([1, 1, 0, 1], bool))
    s = fb.column_stats(fits, ref, np.ones(4, bool), pm=39.05)
    assert s.n == 3 and s.failed == pytest.approx(1 / 3)  # column 4's reference fit failed: not counted
    assert s.bias_pm == pytest.approx(39.05) and s.spread_pm == pytest.approx(0.0, abs=1e-9)
    assert s.rms_pm == pytest.approx(39.05)
    assert s.int_bias_pct == pytest.approx(0.0, abs=1e-9) and s.int_spread_pct == pytest.approx(10.0)
    opposite = _fits(ref.centres + shift * np.array([[1], [-1], [1], [1]]), np.ones(4), np.ones(4, bool))
    s = fb.column_stats(opposite, ref, np.array([1, 1, 0, 0], bool), pm=10.0)
    assert (
        s.bias_pm == pytest.approx(0.0, abs=1e-9)
        and s.spread_pm == pytest.approx(10.0)
        and s.rms_pm == pytest.approx(10.0)
    )
    assert fb.near_far_ratio(fb.column_stats(fits, ref, np.array([1, 0, 0, 0], bool), 2.0),
                             fb.column_stats(opposite, ref, np.array([0, 1, 0, 0], bool), 1.0)) == pytest.approx(2.0)


def test_fit_radii_shrink_for_close_pairs() -> None:
    cols = np.array([[50.0, 50.0], [50.0, 53.9], [20.0, 20.0], [20.0, 40.0]])
    r = fb.fit_radii(cols, period_px=11.0)
    assert r.tolist() == [1.75, 1.75, 3.75, 3.75]


def test_bm3d_gat_returns_clean_units_and_removes_noise() -> None:
    level, dose = 0.25, 20.0
    noise = {**scenes.NAMED_NOISE, "dose": dose, "line_jitter_px": 0.0, "line_gain": 0.0, "line_offset": 0.0}
    noisy = scenes.detect(np.full((64, 64), level, np.float32), np.random.default_rng(3), noise)
    out = fb.bm3d_gat(fb.Frame("noise_only", dose, noisy, None, noise))
    assert abs(out.mean() - level) < 0.02 * level
    assert out.std() < 0.3 * noisy.std()


# ---------------------------------------------------------------- the script


def test_tk_r_em_is_skipped_with_a_note_when_its_venv_is_missing(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TKREM_VENV", str(tmp_path / "none"))
    assert fb.tkrem_method() is None
    assert "tk_r_em: not available" in capsys.readouterr().out


def test_bad_model_option_is_a_clear_usage_error(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        fb.parse_args(["--model", f"x={tmp_path / 'missing.pt'}"])
    assert exc.value.code == 2 and "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fb.parse_args(["--model", "no-equals-sign"])
    with pytest.raises(SystemExit):
        fb.parse_args(["--model", f"x={tmp_path}@half"])
    with pytest.raises(SystemExit):
        fb.parse_args(["--model", f"x={tmp_path}@bf16+mirror"])


def test_model_option_takes_a_precision(tmp_path) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(b"")
    args = fb.parse_args(["--model", f"a={path}", "--model", f"b={path}@bf16", "--model", f"c={path}@bf16+flips"])
    assert args.models == {"a": path, "b": path, "c": path}
    assert args.options == {"b": {"precision": "bf16"}, "c": {"precision": "bf16", "flips": True}}


def test_quick_smoke_run_writes_the_section_and_figure(tmp_path, capsys) -> None:
    import torch

    from stemd.models.checkpoint import save_checkpoint
    from stemd.models.window_ae import WindowAE

    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, WindowAE(28, [16]), {"step": 7})
    out = tmp_path / "docs"
    assert fb.main(["--quick", "--no-tkrem", "--model", f"tiny={path}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for label in ("no denoising", "Gaussian (best σ, oracle)", "GAT + BM3D", "tiny"):
        assert f"| {label} |" in printed
    text = (out / "benchmarks.md").read_text()
    assert "## Faithfulness" in text and "Quick smoke run" in text and "- **tiny**:" in text
    assert (out / "defect.png").stat().st_size > 10_000



def test_near_far_seeds_errors_are_zero_on_the_clean_frame_and_grow_with_a_shift():
    """bench/near_far_seeds.py: the clean frame scores 0 pm near and far; the frame moved by 0.1 px scores
    0.1 px (in pm) in both groups."""
    from scipy import ndimage

    _, scene, _ = scenes.named_frame("perovskite_rp", (192, 192), seed=fb.FRAME_SEED, dose=20.0)
    near, far = near_far_seeds.errors(scene.clean, scene)
    assert len(near) > 10 and len(far) > 10 and near.max() < 1e-12 and far.max() < 1e-12
    moved = ndimage.shift(scene.clean.astype(np.float64), (0.0, 0.1), order=3, mode="nearest")
    near, far = near_far_seeds.errors(moved, scene)
    expected = 0.1 * fb.pm_per_px(scene)
    assert np.sqrt(near.mean()) == pytest.approx(expected, rel=0.15)
    assert np.sqrt(far.mean()) == pytest.approx(expected, rel=0.15)


# ---------------------------------------------------------------- point defects (issue 17)


@pytest.fixture(scope="module")
def defects() -> tuple[scenes.Scene, np.ndarray]:
    frame = fb.point_defect_frame(128, seed=3, dose=20.0)
    return frame.scene, scenes.host_clean(frame.scene)


def test_disc_means_average_the_pixels_inside_the_disc() -> None:
    img = np.zeros((20, 20))
    img[10, 10], img[10, 12] = 5.0, 7.0  # 1 px and 2 px from the point
    got = fb.disc_means(img, np.array([[10.0, 10.0], [0.0, 0.0]]), 1.5)
    assert got[0] == pytest.approx(5.0 / 9)  # the 3 x 3 block lies within 1.5 px; (10, 12) does not
    assert got[1] == 0.0


def test_the_truth_scores_zero_and_the_host_lattice_one(defects) -> None:
    scene, host = defects
    kinds = np.bincount(scene.params["defects"]["kind"], minlength=4)
    assert min(kinds[1:]) >= 3
    truth = fb.point_scores(scene.clean.astype(np.float64), scene, host)
    assert max(abs(v) for v in (truth.vacancy_fill, truth.partial_fill, truth.dopant_dim)) < 1e-6
    assert truth.error_all < 1e-6 and truth.error_defect < 1e-6
    filled = fb.point_scores(host.astype(np.float64), scene, host)
    assert filled.vacancy_fill == pytest.approx(1.0) and filled.partial_fill == pytest.approx(1.0)
    assert filled.dopant_dim == pytest.approx(1.0)
    assert filled.error_defect > 20 and filled.error_defect > 2 * filled.error_all
    # a global gain is calibrated away on the intact columns
    scaled = fb.point_scores(3.0 * host.astype(np.float64), scene, host)
    assert scaled.vacancy_fill == pytest.approx(1.0) and scaled.dopant_dim == pytest.approx(1.0)


def test_a_blur_scores_between_and_more_blur_more(defects) -> None:
    scene, host = defects
    fills = []
    for sigma in (1.5, 3.0):
        s = fb.point_scores(ndimage.gaussian_filter(scene.clean.astype(np.float64), sigma), scene, host)
        for v in (s.vacancy_fill, s.partial_fill, s.dopant_dim):
            assert 0.02 < v < 1.0
        fills.append(s)
    assert fills[1].vacancy_fill > fills[0].vacancy_fill and fills[1].dopant_dim > fills[0].dopant_dim


def test_guide_swap_changes_only_the_guide() -> None:
    base = Denoiser.load(device="cpu")
    if "guide" not in base.model.inputs:
        pytest.fail("the default model takes no guide: the ablation has nothing to swap")
    x = torch.from_numpy(np.random.default_rng(0).poisson(5.0, (1, 64, 64)).astype(np.float32))
    ref = base._aux_inputs(x, 1.0)
    for swap, expect in (("zero", torch.zeros_like(ref["guide"])), ("noisy", x),
                         ("flat", ref["guide"].mean().expand_as(ref["guide"]))):
        d = fb.GuideSwapDenoiser.load(device="cpu")
        d.swap = swap
        aux = d._aux_inputs(x, 1.0)
        torch.testing.assert_close(aux["guide"], expect.reshape(aux["guide"].shape))
        assert set(aux) == set(ref) and all(torch.equal(aux[k], ref[k]) for k in ref if k != "guide")
    oracle = fb.GuideSwapDenoiser.load(device="cpu")
    oracle.swap = "truth"
    with pytest.raises(ValueError, match="target"):
        oracle._aux_inputs(x, 1.0)
    oracle.target = (x[0].numpy() - 0.5) / 4.0  # an affine image of the frame: mapped back onto it exactly
    torch.testing.assert_close(oracle._aux_inputs(x, 1.0)["guide"].reshape(x.shape), x, atol=1e-3, rtol=1e-4)


def test_point_defect_run_writes_its_section_and_figure(tmp_path) -> None:
    rc = fb.main(["--point-defects", "--quick", "--no-tkrem", "--size", "96", "--out", str(tmp_path)])
    assert rc == 0
    text = (tmp_path / "benchmarks.md").read_text()
    assert "## Point defects" in text and "| stemd, zero guide | vacancy fill |" in text
    assert "| clean (check: 0) | dopant dim | 0.00 |" in text or "| clean (check: 0) | dopant dim | -0.00 |" in text
    assert (tmp_path / "defects.png").stat().st_size > 5000


def test_the_mos2_frame_carries_each_defect_kind_and_scores_like_the_perovskite() -> None:
    frame = fb.point_defect_frame(160, seed=3, dose=20.0, structure="MoS2")
    scene, host = frame.scene, scenes.host_clean(frame.scene)
    assert frame.kind == "MoS2" and scene.params["phases"][0]["kind"] == "hexagonal"
    assert min(np.bincount(scene.params["defects"]["kind"], minlength=6)[1:]) >= 3
    truth = fb.point_scores(scene.clean.astype(np.float64), scene, host)
    filled = fb.point_scores(host.astype(np.float64), scene, host)
    kinds = (truth.vacancy_fill, truth.partial_fill, truth.dopant_dim, truth.lighter_fill, truth.adatom_loss)
    assert max(abs(v) for v in kinds) < 1e-6
    assert min(filled.vacancy_fill, filled.partial_fill, filled.dopant_dim, filled.lighter_fill,
               filled.adatom_loss) == pytest.approx(1.0)
