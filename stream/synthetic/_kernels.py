"""Per-pixel kernels (numba): render the expected-count image and draw detector counts from it.

Both are single passes over the frame with no temporaries, which is what makes full-size
PILATUS frames cheap enough to stream at > 25 Hz on one core. Randomness is counter-based
(SplitMix64 of frame key + pixel index), so a frame's noise depends only on (seed, frame
index): frames can be rendered in any order, in any process, and come out bit-identical.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# PILATUS3 counters are 20 bit: a pixel saturates at 2**20 - 1 counts per frame.
SATURATION = (1 << 20) - 1
GAP_VALUE = -1  # what PILATUS writes into inter-module gap pixels
# Below this mean, counts are drawn exactly (inversion); above, by a Cornish-Fisher corrected
# normal quantile, whose error (< 1e-3 in the CDF at lambda=16) is far below counting noise.
EXACT_POISSON_BELOW = 16.0

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_INV_2_53 = 1.0 / 9007199254740992.0


def frame_key(seed: int, index: int, stream: int = 0) -> np.uint64:
    """A 64-bit key for one frame's noise, derived from (seed, frame index, stream)."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xD1B54A32D192ED03 + stream * 0xABC98388FB8FAC03) & mask
    for _ in range(2):  # SplitMix64 finaliser, twice: neighbouring seeds/indices decorrelate fully
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
    return np.uint64(z)


@njit(inline="always")
def _uniform(key, counter):  # pragma: no cover - compiled
    """Uniform in the open interval (0, 1) from SplitMix64(key + counter * golden)."""
    z = key + counter * _GOLDEN
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    z = z ^ (z >> _S31)
    return (float(z >> _S11) + 0.5) * _INV_2_53


# Acklam's rational approximation of the inverse normal CDF (relative error < 1.2e-9).
_A = (
    -3.969683028665376e01,
    2.209460984245205e02,
    -2.759285104469687e02,
    1.383577518672690e02,
    -3.066479806614716e01,
    2.506628277459239e00,
)
_B = (
    -5.447609879822406e01,
    1.615858368580409e02,
    -1.556989798598866e02,
    6.680131188771972e01,
    -1.328068155288572e01,
    1.0,
)
_C = (
    -7.784894002430293e-03,
    -3.223964580411365e-01,
    -2.400758277161838e00,
    -2.549732539343734e00,
    4.374664141464968e00,
    2.938163982698783e00,
)
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00, 1.0)
_P_LOW = 0.02425


@njit(inline="always")
def _horner(coeffs, x):  # pragma: no cover - compiled
    acc = 0.0
    for c in coeffs:
        acc = acc * x + c
    return acc


@njit(inline="always")
def _norm_ppf(p):  # pragma: no cover - compiled
    """Inverse standard normal CDF at p in (0, 1)."""
    if p < _P_LOW:
        q = math.sqrt(-2.0 * math.log(p))
        return _horner(_C, q) / _horner(_D, q)
    if p > 1.0 - _P_LOW:
        q = math.sqrt(-2.0 * math.log(1.0 - p))
        return -_horner(_C, q) / _horner(_D, q)
    q = p - 0.5
    r = q * q
    return _horner(_A, r) * q / _horner(_B, r)


@njit(inline="always")
def _poisson_from_uniform(lam, u):  # pragma: no cover - compiled
    """Poisson(lam) quantile at u: exact inversion for small lam, Cornish-Fisher above."""
    if not lam > 0.0:  # also catches NaN
        return 0
    if lam < EXACT_POISSON_BELOW:
        p = math.exp(-lam)
        s = p
        k = 0
        while u > s and k < 200:
            k += 1
            p *= lam / k
            s += p
        return k
    z = _norm_ppf(u)
    sl = math.sqrt(lam)
    # Cornish-Fisher expansion of the Poisson quantile (cumulants all = lam), continuity corrected.
    x = lam + sl * z + (z * z - 1.0) / 6.0 + (z - z * z * z) / (72.0 * sl)
    k = math.ceil(x - 0.5)
    if k < 0:
        return 0
    if k > SATURATION:
        return SATURATION
    return int(k)


@njit(cache=True, nogil=True)
def render_expected(
    rb,
    cb,
    iso,
    arc_r,
    arc_a,
    cart_col,
    cart_row,
    rowfac,
    bc_row,
    bc_col,
    bs_radius,
    arm_cos,
    arm_sin,
    arm_half_width,
    bs_transmission,
    out,
):  # pragma: no cover - compiled
    """Expected counts per pixel: polar lookups (isotropic + anisotropic terms), separable
    Cartesian terms (GISAXS rods), a per-row factor (sample horizon, Yoneda) and the beamstop.

    rb, cb: (H, W) radial-bin and azimuth-bin index of every pixel; iso[rb]; arc_r[k, rb] * arc_a[k, cb];
    cart_col[k, x] * cart_row[k, y]; rowfac[y]. The beamstop is a disc of bs_radius px at the beam
    centre plus an arm of half-width arm_half_width px running from it along (arm_cos, -arm_sin).
    """
    h, w = out.shape
    n_arc = arc_r.shape[0]
    n_cart = cart_col.shape[0]
    r2 = bs_radius * bs_radius
    for y in range(h):
        rf = rowfac[y]
        dy = y - bc_row
        for x in range(w):
            r = rb[y, x]
            v = iso[r]
            if n_arc:
                c = cb[y, x]
                for k in range(n_arc):
                    v += arc_r[k, r] * arc_a[k, c]
            for k in range(n_cart):
                v += cart_col[k, x] * cart_row[k, y]
            v *= rf
            dx = x - bc_col
            if dx * dx + dy * dy <= r2:
                v *= bs_transmission
            elif arm_half_width > 0.0:
                along = dx * arm_cos - dy * arm_sin
                if along > 0.0 and abs(dx * arm_sin + dy * arm_cos) <= arm_half_width:
                    v *= bs_transmission
            out[y, x] = v


@njit(cache=True, nogil=True)
def draw_counts(lam, key, gap, out):  # pragma: no cover - compiled
    """Poisson counts for every pixel of `lam` (expected counts), GAP_VALUE on gap pixels."""
    h, w = lam.shape
    for y in range(h):
        base = np.uint64(y * w)
        for x in range(w):
            if gap[y, x]:
                out[y, x] = GAP_VALUE
            else:
                out[y, x] = _poisson_from_uniform(float(lam[y, x]), _uniform(key, base + np.uint64(x)))
