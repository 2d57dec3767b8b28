"""Regenerate the coefficients in ``kernels._erf`` (needs mpmath; not imported by kernels).

    python -m kernels._erf_fit

Each fit is the Chebyshev interpolant of the target at ``degree + 40`` Chebyshev nodes in
50-digit arithmetic, truncated to ``degree`` and rewritten as monomial coefficients
(the Chebyshev coefficients fall geometrically, so the monomial form stays well
conditioned: all coefficients below 1.3 in magnitude).

- ``ERFCX``: ``erfcx(t) * (1 + 2t)`` as a polynomial in ``y = (t - 4) / (t + 4)``,
  ``t`` in ``[0, inf)`` -> ``y`` in ``[-1, 1)``; degree 24, max rel. error 3.6e-16.
- ``ERF_SMALL``: ``erf(t) / t`` as a polynomial in ``u = t^2`` on ``[0, 0.25]``;
  degree 9, max rel. error 2.2e-16.
"""

from __future__ import annotations

from collections.abc import Callable


def _cheb_to_monomial(f: Callable, degree: int) -> list:
    """Monomial coefficients (in y on [-1, 1]) of f's Chebyshev interpolant."""
    import mpmath as mp

    n = degree + 40
    ys = [mp.cos(mp.pi * (j + mp.mpf(0.5)) / n) for j in range(n)]
    fs = [f(y) for y in ys]
    cheb = [2 * mp.fsum(fs[j] * mp.cos(mp.pi * m * (j + mp.mpf(0.5)) / n) for j in range(n)) / n
            for m in range(degree + 1)]
    cheb[0] /= 2
    basis = [[mp.mpf(1)], [mp.mpf(0), mp.mpf(1)]]
    for m in range(2, degree + 1):
        up = [mp.mpf(0)] + [2 * v for v in basis[m - 1]]
        prev = basis[m - 2] + [mp.mpf(0)] * (len(up) - len(basis[m - 2]))
        basis.append([a - b for a, b in zip(up, prev)])
    mono = [mp.mpf(0)] * (degree + 1)
    for m in range(degree + 1):
        for i, v in enumerate(basis[m]):
            mono[i] += cheb[m] * v
    return mono


def fit_erfcx(k: float = 4.0, degree: int = 24) -> list[float]:
    """``erfcx(t) (1 + 2t)`` in ``y = (t - k) / (t + k)``."""
    import mpmath as mp

    def f(y):
        if y == 1:
            return 2 / mp.sqrt(mp.pi)
        t = k * (1 + y) / (1 - y)
        return mp.erfc(t) * mp.exp(t * t) * (1 + 2 * t)

    return [float(c) for c in _cheb_to_monomial(f, degree)]


def fit_erf_small(umax: float = 0.25, degree: int = 9) -> list[float]:
    """``erf(t) / t`` in ``u = t^2`` on ``[0, umax]``."""
    import mpmath as mp

    def f(y):
        u = (y + 1) / 2 * umax
        return 2 / mp.sqrt(mp.pi) if u == 0 else mp.erf(mp.sqrt(u)) / mp.sqrt(u)

    mono_y = _cheb_to_monomial(f, degree)
    out = [mp.mpf(0)] * (degree + 1)
    for i, a in enumerate(mono_y):  # y = (2 / umax) u - 1
        for j in range(i + 1):
            out[j] += a * mp.binomial(i, j) * (2 / mp.mpf(umax)) ** j * (-1) ** (i - j)
    return [float(c) for c in out]


if __name__ == "__main__":
    import mpmath as mp

    mp.mp.dps = 50
    print("ERFCX =", tuple(fit_erfcx()))
    print("ERF_SMALL =", tuple(fit_erf_small()))
