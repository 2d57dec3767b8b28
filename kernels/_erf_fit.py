"""Regenerate the coefficients in ``kernels._erf`` and ``kernels._fastmath``'s float64 exp
(needs mpmath; not imported by kernels).

    python -m kernels._erf_fit
    python -m kernels._erf_fit --pieces-mem > kernels/_pieces_mem.py

Each fit is the Chebyshev interpolant of the target at ``degree + 40`` Chebyshev nodes in
50-digit arithmetic, truncated to ``degree`` and rewritten as monomial coefficients
(the Chebyshev coefficients fall geometrically, so the monomial form stays well
conditioned: all coefficients below 1.3 in magnitude).

- ``ERFCX``: ``erfcx(t) * (1 + 2t)`` as a polynomial in ``z``, where
  ``y = (t - 3) / (t + 3)`` and ``z`` maps ``y``'s range for ``t`` in ``[0, 27.5]`` onto
  ``[-1, 1]`` (past 27.5, ``exp(-t^2)`` underflows, so erfc is 0 whatever erfcx is);
  degree 20, max rel. error 5.3e-16 (the half-line ``[0, inf)`` needed degree 24).
- ``EXP``: ``e^r`` on ``|r| <= ln2 / 2``, degree 11, max rel. error 2e-16 in float64
  (the Taylor series needs degree 13 for the same).
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


def erfcx_ymax(k: float = 3.0, tmax: float = 27.5) -> float:
    """``y`` at ``t = tmax``; ``z = (y + 1) * 2 / (ymax + 1) - 1``."""
    return (tmax - k) / (tmax + k)


def fit_erfcx(k: float = 3.0, degree: int = 20, tmax: float = 27.5) -> list[float]:
    """``erfcx(t) (1 + 2t)`` in ``z`` (``y = (t - k) / (t + k)`` rescaled onto [-1, 1])."""
    import mpmath as mp

    ymax = erfcx_ymax(k, tmax)

    def f(z):
        y = (z + 1) / 2 * (ymax + 1) - 1
        t = k * (1 + y) / (1 - y)
        return mp.erfc(t) * mp.exp(t * t) * (1 + 2 * t)

    return [float(c) for c in _cheb_to_monomial(f, degree)]


def fit_exp(degree: int = 11) -> list[float]:
    """``e^r`` in ``r`` on ``[-ln2 / 2, ln2 / 2]``."""
    import mpmath as mp

    half = mp.log(2) / 2
    mono_y = _cheb_to_monomial(lambda y: mp.exp(y * half), degree)
    return [float(a / half**i) for i, a in enumerate(mono_y)]


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


def fit_erfcx_pieces(k: float = 3.0, tmax: float = 27.5, pieces: int = 16,
                     degree: int = 8) -> list[list[float]]:
    """``F = 0.5 erfcx(a / sqrt2) (a + c)``, ``c = k sqrt2`` (so ``Phi(-a) =
    exp(-a^2/2) F / (a + c)``), piecewise in ``s = (y + 1) S``, ``y = (a - c) / (a + c)``,
    ``S = pieces / (1 + y(tmax sqrt2))``: one polynomial per unit interval ``[j, j+1]``
    of ``s``, in ``v = s - j`` on ``[0, 1]``. Returns ``coef[m][j]``, the table of the
    ``v^m`` coefficient over the pieces. Degree 8: max rel. error 2.2e-16 in float64."""
    import mpmath as mp

    c = k * mp.sqrt(2)
    amax = tmax * mp.sqrt(2)
    scale = pieces / (1 + (amax - c) / (amax + c))

    def piece(j):
        def f(w):  # w = 2v - 1 on [-1, 1]
            y = (j + (w + 1) / 2) / scale - 1
            a = c * (1 + y) / (1 - y)
            return mp.erfc(a / mp.sqrt(2)) * mp.exp(a * a / 2) / 2 * (a + c)
        mono_w = _cheb_to_monomial(f, degree)
        out = [mp.mpf(0)] * (degree + 1)
        for i, a in enumerate(mono_w):  # w = 2v - 1
            for m in range(i + 1):
                out[m] += a * mp.binomial(i, m) * mp.mpf(2) ** m * (-1) ** (i - m)
        return out

    cols = [piece(j) for j in range(pieces)]
    return [[float(cols[j][m]) for j in range(pieces)] for m in range(degree + 1)]


def fit_exp_table(degree: int = 6, parts: int = 16) -> list[float]:
    """``e^r`` on ``|r| <= ln2 / (2 parts)`` (1% wider), for an exp that looks up
    ``2^(j / parts)`` in a table; degree 6 for 16 parts: max rel. error 1.1e-16."""
    import mpmath as mp

    half = mp.log(2) / (2 * parts) * mp.mpf(1.01)
    mono_y = _cheb_to_monomial(lambda y: mp.exp(y * half), degree)
    return [float(a / half**i) for i, a in enumerate(mono_y)]


def fit_exp_rel(degree: int = 5, iters: int = 200) -> list[float]:
    """``e^r`` on ``|r| <= ln2 / 2`` with the constant fixed at 1 (so ``e^0`` is exact),
    for the least maximum *relative* error: weighted least squares, reweighted toward
    the worst points (degree 5: 9.2e-8 in exact arithmetic)."""
    import numpy as np

    r = np.linspace(-np.log(2) / 2, np.log(2) / 2, 20001)
    f = np.exp(r)
    v = np.vander(r, degree + 1, increasing=True)[:, 1:]
    wt = np.ones_like(r)
    best = (np.inf, None)
    for _ in range(iters):
        c, *_ = np.linalg.lstsq(v * (wt / f)[:, None], (f - 1) * wt / f, rcond=None)
        err = (1 + v @ c) / f - 1
        worst = np.abs(err).max()
        if worst < best[0]:
            best = (worst, c)
        wt = wt * (np.abs(err) / worst + 1e-4) ** 0.5
        wt /= wt.mean()
    return [1.0] + [float(x) for x in best[1]]


def fit_normal_tail_pieces(h: float = 0.3125, pieces: int = 16, degree: int = 12,
                           grad: bool = False) -> list[list[float]]:
    """``Phi(-a) = erfc(a / sqrt2) / 2`` on ``[0, pieces h]`` (with ``grad``: ``R(a) =
    a phi(a) - Phi(-a)``, so that ``GELU'(x) = 1 + R(|x|)`` for ``x >= 0`` and
    ``-R(|x|)`` below): one polynomial per piece ``[j h, (j+1) h]``, in ``t = a - (j +
    1/2) h``. Returns ``coef[m][j]``, the table of the ``t^m`` coefficient over the
    pieces. The degree needed grows with ``a h``, the change of ``log Phi(-a)`` over a
    piece: for 1.5 ulp, width 0.25 (a < 4) needs 11, 0.3125 (a < 5) 12, 0.375 (a < 6)
    13; width 0.3125 at degree 11 gives 12 ulp. ``R`` at width 0.3125, degree 12: within
    1.7 ulp of ``a phi(a) + Phi(-a)`` (it crosses 0 at a = 0.75)."""
    import mpmath as mp

    hh = mp.mpf(h)

    def target(a):
        return a * mp.npdf(a) - mp.ncdf(-a) if grad else mp.erfc(a / mp.sqrt(2)) / 2

    def piece(j):
        def f(y):  # y = 2t / h on [-1, 1]
            return target((j + mp.mpf(0.5)) * hh + y * hh / 2)
        return [c / (hh / 2) ** m for m, c in enumerate(_cheb_to_monomial(f, degree))]

    cols = [piece(j) for j in range(pieces)]
    return [[float(cols[j][m]) for j in range(pieces)] for m in range(degree + 1)]

MEM_PIECES, MEM_DEGREE = 128, 7


def pieces_mem_module() -> str:
    """The text of ``kernels._pieces_mem``: float64 GELU's tables without AVX-512,
    ``MEM_PIECES`` pieces of width ``5 / MEM_PIECES``, degree ``MEM_DEGREE``, stored piece
    by piece, as the AVX2 kernel reads them from memory (one 64-byte line per piece)."""
    import textwrap

    out = ['"""Generated by ``python -m kernels._erf_fit --pieces-mem``: do not edit.',
           "",
           "float64 GELU without AVX-512 (``kernels._avx512.central_pieces_mem``):",
           f"{MEM_PIECES} pieces of width h = 5/{MEM_PIECES} covering ``0 <= a < 5``, a",
           f"degree-{MEM_DEGREE} polynomial each in ``t = a - (j + 1/2) h``. ``NORMAL_TAIL[j][m]``",
           "is piece ``j``'s ``t^m`` coefficient of ``Phi(-a)``, ``GELU_GRAD`` the same for",
           "``R(a) = a phi(a) - Phi(-a)``.",
           '"""', "", f"PIECES = {MEM_PIECES}", ""]
    for name, grad in (("NORMAL_TAIL", False), ("GELU_GRAD", True)):
        tab = fit_normal_tail_pieces(h=5 / MEM_PIECES, pieces=MEM_PIECES, degree=MEM_DEGREE,
                                     grad=grad)
        out.append(f"{name} = (")
        for j in range(MEM_PIECES):
            row = ", ".join(repr(tab[m][j]) for m in range(len(tab)))
            out += textwrap.wrap(f"({row}),", 95, initial_indent="    ",
                                 subsequent_indent="     ")
        out.append(")")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import sys

    import mpmath as mp
    if sys.argv[1:] == ["--pieces-mem"]:
        mp.mp.dps = 50
        print(pieces_mem_module(), end="")
        sys.exit(0)

    mp.mp.dps = 50
    print("ERFCX =", tuple(fit_erfcx()))
    print("ERF_SMALL =", tuple(fit_erf_small()))
    print("EXP =", tuple(fit_exp()))
    print("EXP5_F32 =", tuple(fit_exp_rel(5)))
    print("EXP16 =", tuple(fit_exp_table()))
    print("ERFCX16 = (")
    for row in fit_erfcx_pieces():
        print("    (" + ", ".join(repr(c) for c in row) + "),")
    print(")")
    for name, grad in (("NORMAL_TAIL16", False), ("GELU_GRAD16", True)):
        print(name, "= (")
        for row in fit_normal_tail_pieces(grad=grad):
            print("    (" + ", ".join(repr(c) for c in row) + "),")
        print(")")
    import struct

    for name, grad in (("NORMAL_TAIL16_F32", False), ("GELU_GRAD16_F32", True)):
        print(name, "= (")  # float32 GELU: width 0.375 (a < 6), degree 6, float32 values
        for row in fit_normal_tail_pieces(h=0.375, degree=6, grad=grad):
            print("    (" + ", ".join(repr(struct.unpack("f", struct.pack("f", c))[0])
                                      for c in row) + "),")
        print(")")
    for name, grad, deg in (("NORMAL_TAIL4_F32", False, 8), ("GELU_GRAD4_F32", True, 10)):
        print(name, "= (")  # the same with AVX2: 4 pieces of width 1.5, degree 8 / 10
        for row in fit_normal_tail_pieces(h=1.5, pieces=4, degree=deg, grad=grad):
            print("    (" + ", ".join(repr(struct.unpack("f", struct.pack("f", c))[0])
                                      for c in row) + "),")
        print(")")
