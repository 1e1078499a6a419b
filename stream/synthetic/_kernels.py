"""Per-pixel kernels (numba): render the expected-count image and draw detector counts from it.

Both are single passes over the frame with no temporaries, which is what makes full-size
PILATUS frames cheap enough to stream at > 25 Hz on one core. Randomness is counter-based
(SplitMix64 of frame key + pixel index), so a frame's noise depends only on (seed, frame
index): frames can be rendered in any order, in any process, and come out bit-identical.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
from numba import njit

# PILATUS3 counters are 20 bit: a pixel saturates at 2**20 - 1 counts per frame.
SATURATION = (1 << 20) - 1
GAP_VALUE = -1  # what PILATUS writes into inter-module gap pixels
# Below this mean, counts come from tabulated Poisson CDFs (exact distribution, see below);
# above, from a Cornish-Fisher corrected normal quantile, whose CDF error (< 1e-3 at lambda=16,
# shrinking as 1/lambda) is far below what one frame's counting noise can reveal.
EXACT_POISSON_BELOW = 16.0
# Tabulated CDFs: one row per mean lambda = level / LEVELS_PER_COUNT, up to EXACT_POISSON_BELOW.
# A pixel's mean is rounded to a neighbouring level at random with probabilities that keep its
# mean exact; the mixture of the two Poisson laws adds a variance <= (1/64)^2 / 4 = 6e-5 counts^2.
LEVELS_PER_COUNT = 64
_K_MAX = 56  # P(X > 56 | lambda = 16) < 1e-12: the tail beyond is folded into the last count
_GUIDE = 256  # guide table: where to start the CDF search, per 1/256 of the unit interval
_Z_INTERVALS = 16384  # inverse normal CDF table; linear interpolation error < 1e-3 in z
_Z_TAIL = 1.0 / 1024.0  # below (above 1 minus) this, the exact rational approximation is used

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_INV_2_53 = 1.0 / 9007199254740992.0
_INV_2_11 = 1.0 / 2048.0
_LOW11 = np.uint64(0x7FF)


def _poisson_tables() -> tuple[np.ndarray, np.ndarray]:
    """(cdf[level, k], guide[level, j]) for lambda = level / LEVELS_PER_COUNT < EXACT_POISSON_BELOW."""
    lam = np.arange(int(EXACT_POISSON_BELOW * LEVELS_PER_COUNT) + 2, dtype=np.float64) / LEVELS_PER_COUNT
    k = np.arange(_K_MAX + 1, dtype=np.float64)
    lgam = np.array([math.lgamma(x + 1.0) for x in k])
    log_lam = np.log(np.where(lam > 0.0, lam, 1.0))
    pmf = np.exp(k[None, :] * log_lam[:, None] - lam[:, None] - lgam[None, :])
    pmf[0, :] = 0.0  # lambda = 0: always 0 counts
    pmf[0, 0] = 1.0
    cdf = np.cumsum(pmf, axis=1)
    cdf[:, -1] = 1.0  # fold the (< 1e-12) tail into the last count
    # guide[l, j] = smallest k with cdf[l, k] > j / _GUIDE: a lower bound for any u >= j / _GUIDE.
    thresholds = np.arange(_GUIDE, dtype=np.float64) / _GUIDE
    guide = np.empty((lam.size, _GUIDE), dtype=np.uint8)
    for level in range(lam.size):
        guide[level] = np.searchsorted(cdf[level], thresholds, side="right")
    cdf.flags.writeable = False
    guide.flags.writeable = False
    return cdf, guide


def _z_table() -> np.ndarray:
    """Inverse standard normal CDF at u = i / _Z_INTERVALS (ends clamped; only used inside the tails)."""
    nd = NormalDist()
    u = np.arange(_Z_INTERVALS + 1) / _Z_INTERVALS
    u[0], u[-1] = _Z_TAIL, 1.0 - _Z_TAIL
    table = np.array([nd.inv_cdf(float(x)) for x in u])
    table.flags.writeable = False
    return table


POISSON_CDF, POISSON_GUIDE = _poisson_tables()
Z_TABLE = _z_table()


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
def _hash(key, counter):  # pragma: no cover - compiled
    """64 random bits: SplitMix64(key + counter * golden)."""
    z = key + counter * _GOLDEN
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(inline="always")
def _uniform(bits):  # pragma: no cover - compiled
    """Uniform in the open interval (0, 1) from the top 53 bits."""
    return (float(bits >> _S11) + 0.5) * _INV_2_53


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
def _fast_norm_ppf(u, ztab):  # pragma: no cover - compiled
    """Inverse normal CDF: table interpolation in the body, rational approximation in the tails."""
    if u < _Z_TAIL or u > 1.0 - _Z_TAIL:
        return _norm_ppf(u)
    x = u * _Z_INTERVALS
    i = int(x)
    return ztab[i] + (ztab[i + 1] - ztab[i]) * (x - i)


@njit(cache=True)
def _poisson_large(lam, u, ztab):  # pragma: no cover - compiled
    """Poisson(lam) quantile at u for lam >= EXACT_POISSON_BELOW: Cornish-Fisher expansion
    (all cumulants equal lam) of the normal quantile, with continuity correction."""
    z = _fast_norm_ppf(u, ztab)
    sl = math.sqrt(lam)
    x = lam + sl * z + (z * z - 1.0) / 6.0 + (z - z * z * z) / (72.0 * sl)
    return min(max(math.ceil(x - 0.5), 0), SATURATION)


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
def draw_counts(lam, key, gap, cdf, guide, ztab, out):  # pragma: no cover - compiled
    """Poisson counts for every pixel of `lam` (expected counts), GAP_VALUE on gap pixels.

    Each pixel takes 64 random bits: the top 53 give the quantile u, the low 11 round lam to a
    neighbouring CDF table level. cdf, guide, ztab: POISSON_CDF, POISSON_GUIDE, Z_TABLE (arguments,
    not globals, so that the compiled kernel does not embed 1 MB of constants).
    The small-lam path is written inline here on purpose: behind a helper function with several
    returns, numba compiled it 6x slower.
    """
    h, w = lam.shape
    for y in range(h):
        base = np.uint64(y * w)
        for x in range(w):
            if gap[y, x]:
                out[y, x] = GAP_VALUE
                continue
            bits = _hash(key, base + np.uint64(x))
            u = _uniform(bits)
            mean = float(lam[y, x])
            if mean < EXACT_POISSON_BELOW:
                level_x = max(mean, 0.0) * LEVELS_PER_COUNT  # NaN -> 0
                level = int(level_x)
                if (float(bits & _LOW11) + 0.5) * _INV_2_11 < level_x - level:
                    level += 1
                k = np.int64(guide[level, int(u * _GUIDE)])
                while cdf[level, k] < u:
                    k += 1
                out[y, x] = k
            else:
                out[y, x] = _poisson_large(mean, u, ztab)
