"""bench/real.py: the correlated-noise flag, the split-dose identity, and a --quick --sim-only run (simulated frames
only: no download). Thinning and the gain/offset fit: tests/test_fidelity.py; line registration:
tests/test_selfcheck.py."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, shift

from bench import real
from stemd.compute import fidelity


def test_correlated_noise_flag_fires_on_blurred_noise_only():
    rng = np.random.default_rng(2)
    white = rng.poisson(50.0, (256, 256)).astype(np.float64)
    assert not real.correlated(real.noise_flatness(white))
    lattice, _ = real.simulated_frame("perovskite_rp", 256, seed=4)
    assert not real.correlated(real.noise_flatness(lattice))  # structure alone does not trip it
    blurred = 50 + gaussian_filter(rng.standard_normal((256, 256)) * 7, 0.7)
    assert real.correlated(real.noise_flatness(blurred))
    drift_corrected = shift(white, (0.3, 0.4), order=1, mode="nearest")  # sub-pixel linear interpolation
    assert real.correlated(real.noise_flatness(drift_corrected))


def test_held_out_error_is_the_true_error_plus_the_noise():
    """E|f(y1) - y2|² = E|f(y1) - x/2|² + mean(x/2): the identity the split ranking rests on."""
    raw, mean_raw = real.simulated_frame("interface", 256, seed=6, read=0.0)
    x = (mean_raw - real.SIM_OFFSET) / real.SIM_GAIN
    counts = np.rint((raw - real.SIM_OFFSET) / real.SIM_GAIN).astype(np.int64)
    y1, y2 = fidelity.thin(counts, np.random.default_rng(0))
    mask = np.ones(x.shape, bool)
    for sigma in (0.7, 1.5):
        f = gaussian_filter(y1.astype(np.float64), sigma)
        held_out = fidelity.mse(f, y2, mask)
        assert held_out == pytest.approx(fidelity.mse(f, x / 2, mask) + x.mean() / 2, rel=0.02)


def test_quick_sim_only_run_writes_the_section(tmp_path):
    (tmp_path / "benchmarks.md").write_text("# Benchmarks\n\n## Speed\n\nkept\n")
    assert real.main(["--quick", "--sim-only", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "benchmarks.md").read_text()
    assert "## Speed\n\nkept" in text and f"## {real.TITLE}" in text
    assert "Command: `python -m bench.real --quick --sim-only" in text
    section = text.split(f"## {real.TITLE}")[1]
    assert "### Validation on simulated frames" in section and "### Experimental frames" not in section
    rows = [line for line in section.splitlines() if line.startswith("| sim perovskite_rp |")]
    assert len(rows) == 2  # the first method's row of the gains table and the ranking row
    plain, registered = rows[1].split("|")[4].split(" / ")
    agree, compared = (int(v) for v in plain.strip().split("/"))
    assert agree == compared >= 2  # every pair not tied in truth (stemd's against Gaussian at least) ranked right
    assert registered.strip() == plain.strip()
    assert (tmp_path / "real_sim.png").stat().st_size > 0


def test_knob_rows_on_a_simulated_frame():
    """Every knob row is scored; the blend bound includes weight 1 so never trails the model alone; a frame with
    correlated noise gets no rows."""
    raw, _ = real.simulated_frame("interface", 128, seed=3)
    quick = {"adapt": 5}  # the fine-tune's knob with few steps: its scoring is what is tested here
    dens = {label: real.Denoiser.load(device="cpu", **{**opts, **(quick if "adapt" in opts else {})})
            for label, opts in real.KNOBS.items()}
    rows = real.knob_rows(raw, 1, dens)
    assert set(real.KNOBS) <= set(rows) and len(rows) == len(real.KNOBS) + len(real.FACTORS) + 2
    bound = rows["blend with the input, weight chosen on half B (bound)"]
    assert bound[0] >= rows["as shipped"][0] and rows["its weight"][0] in real.BLENDS
    assert real.knob_rows(gaussian_filter(raw.astype(np.float64), 1.0), 1, dens) == {}
