"""Scattering laws on a 1-D q grid (q in 1/Angstrom), written from the textbook forms.

- Spheres: P(q) = [3 (sin qR - qR cos qR) / (qR)^3]^2 (Rayleigh), averaged over a Schulz distribution of radii
  weighted by volume^2, as sasmodels' `sphere` with polydispersity: the form-factor minima fill in but stay
  visible below ~12 % polydispersity.
- Porod: q^-alpha at high q; alpha = 4 for sharp interfaces, 3-4 for rough (surface-fractal) ones.
- Lamellar stacks of period d: Bragg orders at q_n = 2 pi n / d; for a bilayer filling a fraction phi of the
  period |F_n|^2 ~ sin^2(n pi phi) / n^2, times the powder Lorentz factor 1/q_n^2; orders broaden with n
  (paracrystalline disorder).
- Cubic crystal powder (Debye-Scherrer rings): the reflections a lattice allows (fcc: h, k, l all even or all
  odd; bcc: h + k + l even; sc: all) at q = 2 pi sqrt(h^2 + k^2 + l^2) / a, with intensity ~ multiplicity x
  |F(q)|^2 x Debye-Waller exp(-u^2 q^2) / q^2.
- Amorphous halo: the first and second coordination-shell peaks of a liquid or glass.
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["cubic_reflections", "gaussian", "halo", "lamellar", "porod", "rings", "schulz_spheres", "sphere"]

LATTICES = ("fcc", "bcc", "sc")


def gaussian(q: np.ndarray, q0: float, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * ((q - q0) / sigma) ** 2)


def sphere(x: np.ndarray) -> np.ndarray:
    """Normalised sphere form factor P(qR), P(0) = 1."""
    x = np.asarray(x, np.float64)
    small = x < 1e-3
    xs = np.where(small, 1.0, x)
    amp = 3.0 * (np.sin(xs) - xs * np.cos(xs)) / xs**3
    return np.where(small, 1.0 - x**2 / 5.0, amp**2)


def schulz_spheres(q: np.ndarray, radius: float, pd: float, n: int = 41) -> np.ndarray:
    """Polydisperse spheres, mean radius `radius` (Angstrom), relative width `pd`; I(0) = 1."""
    z = 1.0 / pd**2 - 1.0
    r = np.linspace(max(radius * (1 - 4 * pd), 0.05 * radius), radius * (1 + 4 * pd), n)
    x = r / radius
    w = np.exp(z * np.log(x) - (z + 1) * x) * r**6  # Schulz density x volume^2
    w /= w.sum()
    return sphere(q[:, None] * r[None, :]) @ w


def porod(q: np.ndarray, q_ref: float, alpha: float) -> np.ndarray:
    """(q / q_ref)^-alpha, 1 at q_ref."""
    return (np.maximum(q, 1e-6) / q_ref) ** -alpha


def lamellar(q: np.ndarray, d: float, phi: float, sigma1: float, orders: int = 4) -> np.ndarray:
    """Bragg orders of a lamellar stack, first order's peak = 1."""
    out = np.zeros_like(q, dtype=np.float64)
    first = np.sin(np.pi * phi) ** 2
    for n in range(1, orders + 1):
        strength = np.sin(n * np.pi * phi) ** 2 / n**2 / n**2 / first
        out += strength * gaussian(q, 2 * np.pi * n / d, sigma1 * (1 + 0.35 * (n - 1)))
    return out


def cubic_reflections(lattice: str, a: float, q_max: float) -> tuple[np.ndarray, np.ndarray]:
    """(q of each allowed reflection family up to q_max, its multiplicity), ascending q."""
    h_max = int(np.ceil(q_max * a / (2 * np.pi)))
    rng = range(-h_max, h_max + 1)
    s_of: dict[int, int] = {}
    for h, k, l in itertools.product(rng, rng, rng):
        if (h, k, l) == (0, 0, 0):
            continue
        if lattice == "fcc" and len({h % 2, k % 2, l % 2}) != 1:
            continue
        if lattice == "bcc" and (h + k + l) % 2:
            continue
        s = h * h + k * k + l * l
        s_of[s] = s_of.get(s, 0) + 1
    s = np.array(sorted(s_of), np.float64)
    q = 2 * np.pi * np.sqrt(s) / a
    keep = q <= q_max
    return q[keep], np.array([s_of[int(v)] for v in s[keep]], np.float64)


def rings(
    q: np.ndarray, q_hkl: np.ndarray, weight: np.ndarray, sigma: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Debye-Scherrer profile: a Gaussian per reflection with peak height `weight` (already including
    multiplicity, |F|^2, Debye-Waller and Lorentz factors), normalised so the strongest peak is 1.
    Returns (profile, each reflection's normalised peak height)."""
    peaks = weight / max(float(weight.max()), 1e-30)
    out = np.zeros_like(q, dtype=np.float64)
    for q0, h, s in zip(q_hkl, peaks, sigma, strict=True):
        lo, hi = np.searchsorted(q, (q0 - 5 * s, q0 + 5 * s))  # a ring is narrow: touch only its bins
        out[lo:hi] += h * gaussian(q[lo:hi], q0, s)
    return out, peaks


def halo(q: np.ndarray, q1: float, width: float) -> np.ndarray:
    """Amorphous scattering: first shell at q1 (peak 1), a weaker, broader second shell near 1.85 q1."""
    return gaussian(q, q1, width) + 0.35 * gaussian(q, 1.85 * q1, 1.4 * width)
