"""bench/classical.py: the Anscombe pair is unbiased on Poisson counts, and each peer denoises a lattice."""

from __future__ import annotations

import numpy as np
import pytest

from bench import classical
from stemd.compute import metrics
from stemd.sim.lattice import simulate_frame


@pytest.mark.parametrize("lam", [2.0, 5.0, 30.0])
def test_inverse_anscombe_is_unbiased_in_the_mean(lam):
    """A perfect denoiser returns E[anscombe(z)]; the inverse must map that back to the Poisson mean."""
    counts = np.random.default_rng(0).poisson(lam, 400_000).astype(np.float64)
    expected = classical.anscombe(counts).mean()
    back = float(classical.inverse_anscombe(np.array(expected)))
    naive = (expected / 2) ** 2 - 0.375  # the algebraic inverse is biased low
    assert abs(back - lam) < 0.01 * lam
    assert abs(naive - lam) > 3 * abs(back - lam)


def test_each_peer_improves_a_noisy_lattice():
    rng = np.random.default_rng(1)
    clean = simulate_frame((96, 96), rng, period_px=10.0).clean + 0.1
    counts = rng.poisson(20 * clean).astype(np.float64)
    raw = metrics.psnr(metrics.fit_scale(counts, clean), clean, 1.0)
    gauss, sigma = classical.gaussian_best(counts, clean)
    assert sigma in classical.GAUSS_SIGMAS
    for out in (gauss, classical.nlm(counts), classical.bm3d_denoise(counts)):
        assert metrics.psnr(metrics.fit_scale(out, clean), clean, 1.0) > raw + 1.0
