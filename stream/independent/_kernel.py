"""The per-pixel pass: expected counts from the run's 1-D profiles, then Poisson counting noise.

expected(pixel) = factor * (iso[rbin] + radial[rbin] * azimuthal[chibin] + extra)
`factor` holds solid angle, polarisation, beamstop shadow and module gain; `extra` the Bragg spots.

numpy's Poisson sampler costs 50-70 ns a pixel on this machine (0.3 s for an EIGER2 4M frame), and a
sequential CDF search about as much, so counts below `TABLE_BELOW` expected come from a quantile table: the
expected count is rounded at random to one of two neighbouring levels (lambda_j = (j / S)^2, chosen so that
the mean stays exact; the variance grows by ~lambda / S^2 = 0.4 %), and 12 bits of a uniform pick the
quantile.
Each count's probability is right to 1/4096; the last 1/4096 of the distribution (the tail) is searched
exactly. Above `TABLE_BELOW` the normal approximation is used (skewness < 0.18 there). Uniforms come from a
counter-based hash of (frame key, pixel index): no state carried between frames, no two frames share noise.
"""

from __future__ import annotations

import numba
import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = 2**64 - 1
TABLE_BELOW = 32.0
_S = 16  # level density: lambda_j = (j / _S)^2
_U_BITS = 12
_MAX_COUNT_IN_TABLE = 96  # P(k > 96 | lambda = 32) ~ 1e-20


def _quantile_table() -> np.ndarray:
    """(levels, 2**_U_BITS) uint8: the count at the centre of each uniform bin, per level."""
    levels = (np.arange(int(_S * np.sqrt(TABLE_BELOW)) + 2) / _S) ** 2
    k = np.arange(_MAX_COUNT_IN_TABLE + 1)
    pmf = np.empty((levels.size, k.size))
    pmf[:, 0] = np.exp(-levels)
    for i in k[1:]:
        pmf[:, i] = pmf[:, i - 1] * levels / i
    cdf = np.cumsum(pmf, axis=1)
    u = (np.arange(2**_U_BITS) + 0.5) / 2**_U_BITS
    return np.stack([np.searchsorted(c, u, side="right") for c in cdf]).astype(np.uint8)


POISSON_TABLE = _quantile_table()


def frame_key(run_key: int, index: int) -> int:
    """A frame's 64-bit noise key: splitmix64 of (run key, index), so no two frames share a noise stream."""
    x = (run_key + 0x9E3779B97F4A7C15 * (index + 1)) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@numba.njit(inline="always")
def _mix(x):  # pragma: no cover  (splitmix64's finaliser)
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


@numba.njit(inline="always")
def _unit(h):  # pragma: no cover  53 bits of h -> (0, 1)
    return (float(h >> np.uint64(11)) + 0.5) * (1.0 / 9007199254740992.0)


@numba.njit(inline="always")
def _expected(rbin, chibin, factor, iso, radial, azimuthal, extra, i):  # pragma: no cover
    b = rbin[i]
    return factor[i] * (iso[b] + radial[b] * azimuthal[chibin[i]] + extra[i])


@numba.njit(cache=True, nogil=True)
def expected_counts(rbin, chibin, factor, iso, radial, azimuthal, extra, out):  # pragma: no cover
    for i in range(rbin.size):
        out[i] = _expected(rbin, chibin, factor, iso, radial, azimuthal, extra, i)


@numba.njit(cache=True, nogil=True)
def poisson_counts(lam, key, table, out):  # pragma: no cover
    """Counts for an array of expected values (the same sampler as `sample_counts`, for tests)."""
    key2 = _mix(key ^ _GOLDEN)
    for i in range(lam.size):
        out[i] = _poisson(np.float64(lam[i]), key, key2, i, table)


@numba.njit(inline="always")
def _poisson(lam, key, key2, i, table):  # pragma: no cover
    if lam <= 0.0:
        return 0
    if lam >= TABLE_BELOW:
        u1 = _unit(_mix(key + np.uint64(i) * _GOLDEN))
        u2 = _unit(_mix(key2 + np.uint64(i) * _GOLDEN))
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        return max(0, int(np.floor(lam + np.sqrt(lam) * z + 0.5)))
    h = _mix(key + np.uint64(i) * _GOLDEN)
    j = int(np.sqrt(lam) * _S)
    # the upper level with the probability that keeps the mean: (lam - lam_j) / (lam_j+1 - lam_j)
    w = (lam * _S * _S - j * j) / (2 * j + 1)
    if float((h >> np.uint64(_U_BITS)) & np.uint64(0xFFFFFFFFFF)) * (1.0 / 1099511627776.0) < w:
        j += 1
    m = int(h >> np.uint64(64 - _U_BITS))
    if m < (1 << _U_BITS) - 1:
        return int(table[j, m])
    # the tail bin: exact CDF search for a uniform inside it
    level = (j / _S) ** 2
    u = (m + _unit(_mix(key2 + np.uint64(i) * _GOLDEN))) / (1 << _U_BITS)
    p = np.exp(-level)
    cdf = p
    k = 0
    while u > cdf and k < 10_000:
        k += 1
        p *= level / k
        cdf += p
    return k


@numba.njit(cache=True, nogil=True)
def sample_counts(
    rbin,
    chibin,
    factor,
    iso,
    radial,
    azimuthal,
    extra,
    status,
    key,
    gap_value,
    bad_value,
    max_count,
    table,
    out,
):  # pragma: no cover
    key2 = _mix(key ^ _GOLDEN)
    for i in range(rbin.size):
        s = status[i]
        if s == 1:
            out[i] = gap_value
        elif s == 2:
            out[i] = bad_value
        else:
            lam = np.float64(_expected(rbin, chibin, factor, iso, radial, azimuthal, extra, i))
            out[i] = min(_poisson(lam, key, key2, i, table), max_count)
