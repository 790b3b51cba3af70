"""Image-quality metrics against a known clean reference, and atom-column position fits.

Pure numpy, no I/O; used by bench/quality.py, the demo and the tests. scikit-image is
needed only by `ssim` (a bench extra) and is imported there.

Conventions: `ref`/`clean` is the noise-free frame on the generator's scale (brightest column
peak 1.0); every other array is compared with it pixel by pixel, in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _as_pair(x: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {x.shape} vs reference {ref.shape}")
    return x, ref


def _range(ref: np.ndarray, data_range: float | None) -> float:
    span = float(ref.max() - ref.min()) if data_range is None else float(data_range)
    if not span > 0:
        raise ValueError("data_range must be positive (a constant reference has no range; pass data_range)")
    return span


def psnr(x: np.ndarray, ref: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio of `x` against `ref` in dB: 10 log10(range² / MSE).

    `data_range` defaults to ref.max() - ref.min() (≈1 for the generator's frames and for a
    batch of windows, whose clean maximum is 1 and background near 0). Identical images: inf.
    """
    x, ref = _as_pair(x, ref)
    span = _range(ref, data_range)
    mse = float(np.mean((x - ref) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(span**2 / mse))


def ssim(x: np.ndarray, ref: np.ndarray, data_range: float | None = None) -> float:
    """Mean structural similarity (scikit-image, default 7×7 window) of a 2D `x` against `ref`."""
    from skimage.metrics import structural_similarity

    x, ref = _as_pair(x, ref)
    # scikit-image's function is unannotated (no-untyped-call under strict)
    return float(structural_similarity(x, ref, data_range=_range(ref, data_range)))  # type: ignore[no-untyped-call]


def fit_gain_offset(x: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(gain, offset) minimising ||gain·x + offset − ref||²; a constant `x` gets gain 0."""
    x, ref = _as_pair(x, ref)
    xc = x - x.mean()
    var = float(np.mean(xc**2))
    gain = float(np.mean(xc * (ref - ref.mean())) / var) if var > 0 else 0.0
    return gain, float(ref.mean() - gain * x.mean())


def fit_scale(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """`x` mapped onto `ref`'s scale by the least-squares gain and offset (float64).

    Noisy frames and the outputs of denoisers that keep their input's units are in detector
    counts, the clean reference is in [0, 1]: comparing them needs a common scale. Every method
    gets the same (oracle, since it uses `ref`) affine fit, so the comparison stays fair.
    """
    gain, offset = fit_gain_offset(x, ref)
    return np.asarray(x, dtype=np.float64) * gain + offset


def mean_abs_error_percent(pred: np.ndarray, clean: np.ndarray, data_range: float | None = None) -> float:
    """The paper's "average error per pixel": 100 · mean|pred − clean| / data_range, in %.

    The mean runs over every pixel of the array (a batch of windows counts as one array);
    `data_range` defaults to clean.max() − clean.min(), i.e. ≈ 1 on the generator's scale,
    so the figure is the mean absolute error as a percentage of the brightest column.
    """
    pred, clean = _as_pair(pred, clean)
    return float(100.0 * np.mean(np.abs(pred - clean)) / _range(clean, data_range))


@dataclass(frozen=True)
class ColumnFits:
    """2D-Gaussian fits around given column positions; rows align with the positions passed."""

    centres: np.ndarray  # (N, 2) float64 fitted (y, x) in pixels
    amplitudes: np.ndarray  # (N,) peak height above background
    widths: np.ndarray  # (N,) Gaussian sigma in pixels
    background: np.ndarray  # (N,)
    ok: np.ndarray  # (N,) bool: False where the fit failed (see `fit_columns`)


def _gauss(p: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model values (N, P) and the Gaussian factor g, for params p = (A, cy, cx, s, b) per row."""
    a, cy, cx, s, b = (p[:, i : i + 1] for i in range(5))
    g = np.exp(-((dy - cy) ** 2 + (dx - cx) ** 2) / (2 * s**2))
    return a * g + b, g


def _jacobian(p: np.ndarray, g: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    a, cy, cx, s, _ = (p[:, i : i + 1] for i in range(5))
    ey, ex = dy - cy, dx - cx
    ag = a * g
    return np.stack([g, ag * ey / s**2, ag * ex / s**2, ag * (ey**2 + ex**2) / s**3, np.ones_like(g)], axis=-1)


def _cost(p: np.ndarray, dy: np.ndarray, dx: np.ndarray, vals: np.ndarray, wgt: np.ndarray) -> np.ndarray:
    model, _ = _gauss(p, dy, dx)
    cost: np.ndarray = np.sum(wgt * (model - vals) ** 2, axis=1)  # numpy's stubs: Any for an axis sum
    return cost


def fit_columns(
    image: np.ndarray,
    positions: np.ndarray,
    radius: float = 3.5,
    sigma0: float = 1.5,
    iterations: int = 40,
) -> ColumnFits:
    """Fit A·exp(−r²/2s²) + b to the pixels within `radius` of each given (y, x) column position.

    All columns are fitted at once by a batched Levenberg–Marquardt (numpy; same least-squares
    problem as scipy.optimize.least_squares per column, which the tests check it against),
    started at the given position with width `sigma0`. `radius` should stay below half the
    nearest-neighbour distance (3.5 px for the paper's 10 px lattice). A fit fails (ok=False)
    when under 60% of its disc lies in the image, or it ends non-finite, with amplitude ≤ 0,
    a width outside [0.3, 2·radius] px, or a centre more than `radius` from the start.
    """
    img = np.asarray(image, dtype=np.float64)
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    if img.ndim != 2:
        raise ValueError(f"image must be 2D, got shape {img.shape}")
    if radius <= 0:
        raise ValueError("radius must be positive")
    h, w = img.shape
    n = len(pos)
    half = int(np.ceil(radius))
    gy, gx = np.meshgrid(np.arange(-half, half + 1), np.arange(-half, half + 1), indexing="ij")
    oy, ox = gy.ravel().astype(np.float64), gx.ravel().astype(np.float64)

    base = np.round(pos).astype(np.int64)  # patch centres (integer pixels)
    frac = pos - base  # start position relative to the patch centre
    yy, xx = base[:, :1] + oy.astype(np.int64), base[:, 1:] + ox.astype(np.int64)
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    disc = (oy - frac[:, :1]) ** 2 + (ox - frac[:, 1:]) ** 2 <= radius**2
    wgt = (inside & disc).astype(np.float64)
    vals = img[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)] * wgt

    any_px = wgt.sum(axis=1) > 0
    bg0 = np.where(any_px, np.where(wgt > 0, vals, np.inf).min(axis=1), 0.0)
    peak0 = np.where(any_px, np.where(wgt > 0, vals, -np.inf).max(axis=1), 0.0)
    p = np.column_stack([peak0 - bg0, frac[:, 0], frac[:, 1], np.full(n, sigma0), bg0])

    lam = np.full(n, 1e-3)
    current = _cost(p, oy, ox, vals, wgt)
    eye = np.eye(5)
    active = np.arange(n)
    for _ in range(iterations):
        if active.size == 0:
            break
        pa, va, wa = p[active], vals[active], wgt[active]
        model, g = _gauss(pa, oy, ox)
        jac = _jacobian(pa, g, oy, ox) * wa[..., None]
        jtj = np.einsum("npi,npj->nij", jac, jac)
        jtr = np.einsum("npi,np->ni", jac, wa * (model - va))
        damp = lam[active, None, None] * (jtj * eye) + 1e-12 * eye
        step = np.linalg.solve(jtj + damp, -jtr[..., None])[..., 0]
        trial = pa + step
        trial[:, 3] = np.clip(np.abs(trial[:, 3]), 0.1, 4 * radius)
        with np.errstate(all="ignore"):
            new = _cost(trial, oy, ox, va, wa)
        better = np.isfinite(new) & (new <= current[active])
        p[active] = np.where(better[:, None], trial, pa)
        current[active] = np.where(better, new, current[active])
        lam[active] = np.where(better, lam[active] / 3, lam[active] * 4)
        done = (better & (np.abs(step).max(axis=1) < 1e-6)) | (lam[active] > 1e8)
        active = active[~done]

    centres = base + p[:, 1:3]
    shift = np.hypot(*(centres - pos).T)
    ok = (
        (wgt.sum(axis=1) >= 0.6 * disc.sum(axis=1))
        & np.all(np.isfinite(p), axis=1)
        & (p[:, 0] > 0)
        & (p[:, 3] >= 0.3)
        & (p[:, 3] <= 2 * radius)
        & (shift <= radius)
    )
    return ColumnFits(centres=centres, amplitudes=p[:, 0], widths=p[:, 3], background=p[:, 4], ok=ok)


def column_rms_error(fitted: np.ndarray, true: np.ndarray, ok: np.ndarray | None = None) -> float:
    """RMS distance in px between fitted and true (y, x) positions, over rows where `ok` (all if None)."""
    fitted = np.asarray(fitted, dtype=np.float64).reshape(-1, 2)
    true = np.asarray(true, dtype=np.float64).reshape(-1, 2)
    if fitted.shape != true.shape:
        raise ValueError(f"shapes differ: {fitted.shape} vs {true.shape}")
    keep = np.ones(len(true), bool) if ok is None else np.asarray(ok, bool)
    if not keep.any():
        return float("nan")
    d2 = np.sum((fitted[keep] - true[keep]) ** 2, axis=1)
    return float(np.sqrt(d2.mean()))
