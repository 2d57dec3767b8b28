"""Float64 GELU on explicit 8-lane AVX-512 vectors: forward and backward, with or
without a bias (the float64 path of ``kernels.activations`` where the CPU has AVX-512F);
the same table exp also serves float64 softmax (``softmax_exp_f64``, in ``kernels.nn``:
0.57 -> 0.50 ns per element per core in cache).

The scalar-style ``kernels._erf.normal_parts``, which LLVM vectorises on its own, costs
about 71 vector operations per 8 elements (a degree-11 exp, a division and a degree-20
polynomial); this machine issues about two 512-bit operations per cycle, so float64
GELU was compute-bound at 1.1 ns per element per core. Here ``Phi(-a) = exp(-a^2 / 2)
F(s) / (a + c)``, ``a = |x|``, takes about 50, using what LLVM's vectoriser cannot
express: ``vpermi2pd`` (any of 16 doubles per lane, one instruction) and ``vscalefpd``:

- ``exp(-a^2/2)``: ``-a^2/2 = k ln2/16 + r``; ``2^((k mod 16) / 16)`` from a 16-entry
  table, ``e^r`` by a degree-6 polynomial (``|r| <= ln2/32``), ``2^floor(k/16)`` by
  ``vscalefpd`` (subnormals and 0 with no branch). ``a^2`` is split exactly (FMA) and
  its low part folded into ``r``, so the lower tail keeps its accuracy.
- ``F = 0.5 erfcx(a / sqrt2) (a + c)``, ``c = 3 sqrt2``: ``s = (y + 1) S`` in [0, 16)
  for ``y = (a - c) / (a + c) = 1 - 2c / (a + c)``, so one division gives both ``s`` and
  the final ``1 / (a + c)``; one degree-8 polynomial per unit interval of ``s``, its 9
  coefficients looked up per lane (``kernels._erf_fit.fit_erfcx_pieces``; max rel.
  error 2.2e-16). (``vrcp14pd`` and two Newton steps instead of the division measured
  7% slower.)

Measured against mpmath: at most 8 ulp for ``x >= -36`` (the old path: 7); below that
the result is subnormal (the old path flushed it to 0). Each call does 32 elements as 4
vectors in lockstep, so their long dependency chains overlap (one core, in cache: 1, 2,
4 and 8 vectors per call took 0.88, 0.85, 0.76 and 0.83 ns per element; the old path
1.09); ``_tail`` variants take the last, partial block with masked loads and stores, so
every element goes through the same arithmetic wherever it sits. Callers must be
compiled with ``fastmath={"contract"}``: reassociation would undo the rounding tricks.
"""

from __future__ import annotations

import math

from llvmlite import ir
from numba.core import cgutils

from kernels._jit import intrinsic, numba, types
from kernels._simd import store_nt

__all__ = ["AVAILABLE", "BLOCK", "gelu_bias_bwd_f64", "gelu_bias_bwd_f64_nt",
           "gelu_bias_bwd_f64_tail", "gelu_bias_f64", "gelu_bias_f64_nt", "gelu_bias_f64_tail",
           "gelu_bwd_f64", "gelu_bwd_f64_nt", "gelu_bwd_f64_tail", "gelu_f64", "gelu_f64_nt",
           "gelu_f64_tail", "softmax_exp_f64", "softmax_exp_f64_tail"]

# e^r on |r| <= 1.01 ln2/32, degree 6 (python -m kernels._erf_fit)
EXP16 = (1.0, 1.0000000000000024, 0.5000000000000007, 0.16666666662689536,
         0.04166666665956466, 0.00833349952335219, 0.0013889126302947898)
# ERFCX16[m][j]: coefficient of v^m on piece j (python -m kernels._erf_fit)
ERFCX16 = (
    (2.1213203435596424, 1.857033572508873, 1.6308692876801063, 1.4378150285002704,
     1.2732985254730145, 1.1332045106874025, 1.0138777132530479, 0.9121129249600104,
     0.8251337910360389, 0.7505625928251799, 0.6863836661753658, 0.6309031980320895,
     0.5827079669816596, 0.5406251911223375, 0.5036851037176299, 0.4710872921810063),
    (-0.2851231953910231, -0.24435474246532093, -0.20880975041452995, -0.17806109292545555,
     -0.15165783890507564, -0.12913923290498278, -0.11004820435167655, -0.09394358799911338,
     -0.08041034995529167, -0.0690673142338661, -0.059572148376209215, -0.05162365173645011,
     -0.04496164783050126, -0.03936496952262634, -0.03464811727095139, -0.030657165035897053),
    (0.021756926541270902, 0.01904410655361001, 0.01653659376009891, 0.014249758833883248,
     0.012192005043649182, 0.010364792866335444, 0.008763085288677773, 0.007376181901420129,
     0.006188862297232203, 0.0051827198246190385, 0.004337544587900655, 0.00363261592455993,
     0.003047790028505706, 0.0025643118617820013, 0.002165330840929123, 0.0018361445792309673),
    (-0.0009362240032819816, -0.0008710986973534237, -0.0007997204092798778,
     -0.000724369483881302, -0.0006473877374726908, -0.000571038245774314,
     -0.0004973677216452676, -0.00042808763914840966, -0.0003644891525151211,
     -0.0003074025412036916, -0.0002572048638821613, -0.00021387120478140884,
     -0.00017705751617941117, -0.00014619871389046982, -0.00012060552315162144,
     -9.954724250256528e-05),
    (1.5320104987991346e-05, 1.715500005600585e-05, 1.8438589014090898e-05,
     1.9138704867081985e-05, 1.925728910977323e-05, 1.8831670462592007e-05,
     1.7931916393887458e-05, 1.6654152619437782e-05, 1.5110527884435377e-05,
     1.341728612100705e-05, 1.168294515718047e-05, 9.998638763612442e-06,
     8.432162941288173e-06, 7.026308251554648e-06, 5.800991798216836e-06,
     4.757914272938722e-06),
    (4.18420809498607e-07, 3.1345140442007064e-07, 1.9889435605132281e-07,
     8.121245449893206e-08, -3.25225907819126e-08, -1.3536101182272006e-07,
     -2.2129472533790773e-07, -2.8602355812653667e-07, -3.275036956417027e-07,
     -3.461374206957333e-07, -3.445384769186658e-07, -3.2691917280768163e-07,
     -2.982550093859236e-07, -2.6344288314543244e-07, -2.2665025224632461e-07,
     -1.9096458057408336e-07),
    (-1.637783127947724e-08, -1.8457094586723332e-08, -1.9544035608344212e-08,
     -1.9485404160397734e-08, -1.8236189298596524e-08, -1.588385300686074e-08,
     -1.265247483781253e-08, -8.88036068477538e-09, -4.970763912457682e-09,
     -1.3239385662448117e-09, 1.733162609713508e-09, 3.999764140063043e-09,
     5.421237240752044e-09, 6.072217619301004e-09, 6.1125574057072925e-09,
     5.734386191992404e-09),
    (-3.616072809293769e-10, -2.334974121029604e-10, -7.676865382613709e-11,
     9.529961490692834e-11, 2.6479705029840825e-10, 4.1146986897848893e-10,
     5.162594219383139e-10, 5.654521639022942e-10, 5.542948403236369e-10,
     4.887185760992619e-10, 3.841874320862559e-10, 2.616958625685345e-10,
     1.4220925045319218e-10, 4.164284458690761e-11, -3.179875549842496e-11,
     -7.735785196048492e-11),
    (1.590566897457537e-11, 1.94292820483634e-11, 2.13091899821226e-11, 2.0980479944138836e-11,
     1.816044368052433e-11, 1.2999478938569169e-11, 6.1534552358823506e-12,
     -1.282663278619257e-12, -8.004137373455647e-12, -1.28436199218293e-11,
     -1.511590367091826e-11, -1.480910971761554e-11, -1.252557526539335e-11,
     -9.201725417671032e-12, -5.754239110919507e-12, -2.8220386299436045e-12),
)
# ln2/16 in two parts (fdlibm's split of ln2, 32 + 53 bits): k * _LN2_16_HI is exact
_LN2_16_HI = 0.6931471803691238 / 16
_LN2_16_LO = 1.9082149292705877e-10 / 16
_MAGIC = 1.5 * 2.0 ** 52  # x + _MAGIC rounds x to an integer held in the low bits
_C = 3.0 * math.sqrt(2.0)  # the map's centre, in units of a
_A_FIT = 27.5 * math.sqrt(2.0)  # the fit covers a <= _A_FIT (s < 16)
# a is clamped here: exp(-a^2 / 2) is exactly 0 (so -inf gives NaN, as -inf * 0 does)
_A_CLAMP = 38.7
_S_SCALE = 16.0 / (1.0 + (_A_FIT - _C) / (_A_FIT + _C))
_POW2_16 = tuple(2.0 ** (j / 16) for j in range(16))
_INV_SQRT_2PI = 0.3989422804014327


def _target_has_avx512() -> bool:
    """True when numba compiles for a CPU with AVX-512F: the host (unless NUMBA_CPU_NAME
    names another target, as for a portable cache), or explicit NUMBA_CPU_FEATURES."""
    feats = numba.config.CPU_FEATURES
    if feats:
        return "+avx512f" in feats.split(",")
    if numba.config.CPU_NAME not in (None, "", "host"):
        return False
    try:
        import llvmlite.binding as llvm
        return bool(llvm.get_host_cpu_features().get("avx512f", False))
    except Exception:  # pragma: no cover - a platform llvmlite cannot query
        return False


AVAILABLE = _target_has_avx512()

_F64 = ir.DoubleType()
_I64 = ir.IntType(64)
_I32 = ir.IntType(32)
_V8 = ir.VectorType(_F64, 8)
_I8V = ir.VectorType(_I64, 8)
_M8 = ir.VectorType(ir.IntType(1), 8)


class _Vec:
    """Arithmetic on <8 x double> for one codegen call (keeps the math below readable).

    Every operand may also be a list of vectors (a few independent vectors handled in
    lockstep: the instructions of their long dependency chains come out interleaved, so
    the core overlaps them); constants are plain vectors shared by all."""

    def __init__(self, builder, width: int = 1):
        self.b = builder
        self.width = width

    def _fn(self, name, ret, args):
        return cgutils.get_or_insert_function(self.b.module, ir.FunctionType(ret, args), name)

    def _map(self, op, *args):
        if not any(isinstance(a, list) for a in args):
            return op(*args)
        return [op(*(a[q] if isinstance(a, list) else a for a in args))
                for q in range(self.width)]

    def const(self, v):
        return ir.Constant(_V8, [float(v)] * 8)

    def table(self, vals):
        return ir.Constant(_V8, [float(v) for v in vals])

    def fma(self, a, b, c):
        fn = self._fn("llvm.fma.v8f64", _V8, [_V8] * 3)
        return self._map(lambda x, y, z: self.b.call(fn, [x, y, z]), a, b, c)

    def add(self, a, b):
        return self._map(self.b.fadd, a, b)

    def sub(self, a, b):
        return self._map(self.b.fsub, a, b)

    def mul(self, a, b):
        return self._map(self.b.fmul, a, b)

    def div(self, a, b):
        return self._map(self.b.fdiv, a, b)

    def neg(self, a):
        return self._map(self.b.fneg, a)

    def fabs(self, a):
        fn = self._fn("llvm.fabs.v8f64", _V8, [_V8])
        return self._map(lambda x: self.b.call(fn, [x]), a)

    def minnum(self, a, b):
        fn = self._fn("llvm.minnum.v8f64", _V8, [_V8, _V8])
        return self._map(lambda x, y: self.b.call(fn, [x, y]), a, b)

    def select_lt(self, p, q, a, b):
        """``a`` where ``p < q`` (ordered: false for NaN), else ``b``."""
        return self._map(lambda pp, qq, x, y: self.b.select(
            self.b.fcmp_ordered("<", pp, qq), x, y), p, q, a, b)

    def select_neg(self, z, a, b):
        """``a`` where ``z < 0``, else ``b``."""
        return self.select_lt(z, self.const(0.0), a, b)

    def hsum(self, a):
        """The sum of all lanes of all vectors in ``a`` (a tree: one double)."""
        acc = a[0] if isinstance(a, list) else a
        for x in (a[1:] if isinstance(a, list) else []):
            acc = self.b.fadd(acc, x)
        for half in (4, 2, 1):
            mask = ir.Constant(ir.VectorType(_I32, 8), [(i + half) % 8 for i in range(8)])
            acc = self.b.fadd(acc, self.b.shuffle_vector(acc, acc, mask))
        return self.b.extract_element(acc, ir.Constant(_I32, 0))

    def lookup16(self, tab, idx_bits):
        """``tab[idx & 15]`` per lane (vpermi2pd over two 8-entry halves)."""
        fn = self._fn("llvm.x86.avx512.vpermi2var.pd.512", _V8, [_V8, _I8V, _V8])
        lo, hi = self.table(tab[:8]), self.table(tab[8:])
        return self._map(lambda i: self.b.call(fn, [lo, i, hi]), idx_bits)

    def scalef(self, a, e):
        """``a * 2^floor(e)`` (vscalefpd)."""
        fn = self._fn("llvm.x86.avx512.mask.scalef.pd.512", _V8,
                      [_V8, _V8, _V8, ir.IntType(8), _I32])
        return self._map(lambda x, y: self.b.call(
            fn, [x, y, x, ir.Constant(ir.IntType(8), -1), ir.Constant(_I32, 4)]), a, e)

    def trunc_int(self, a):
        return self._map(lambda x: self.b.fptosi(x, _I8V), a)

    def int_to_float(self, a):
        return self._map(lambda x: self.b.sitofp(x, _V8), a)

    def bits(self, a):
        return self._map(lambda x: self.b.bitcast(x, _I8V), a)

    def estrin(self, coefs, u):
        """Estrin's scheme: depth log2(degree) instead of Horner's degree."""
        terms, x = list(coefs), u
        while len(terms) > 1:
            nxt = [self.fma(terms[i + 1], x, terms[i]) for i in range(0, len(terms) - 1, 2)]
            if len(terms) % 2:
                nxt.append(terms[-1])
            terms, x = nxt, self.mul(x, x)
        return terms[0]



def _exp_reduce(v: _Vec, w):
    """``w = k ln2/16 + r`` (|r| <= ln2/32): ``(kf, kd, r)``, ``kf`` holding ``k`` in its
    low bits (for the table lookup), ``kd = k`` as a double. ``|w| < 2^47``."""
    kf = v.fma(w, v.const(16.0 / math.log(2)), v.const(_MAGIC))
    kd = v.sub(kf, v.const(_MAGIC))
    r = v.fma(kd, v.const(-_LN2_16_HI), w)
    return kf, kd, v.fma(kd, v.const(-_LN2_16_LO), r)


def _exp_finish(v: _Vec, kf, kd, r):
    """``2^(k/16) e^r``: table, degree-6 polynomial, ``vscalefpd`` (0 on underflow)."""
    p = v.estrin([v.const(c) for c in EXP16], r)
    return v.scalef(v.mul(v.lookup16(_POW2_16, v.bits(kf)), p), v.mul(kd, v.const(1.0 / 16)))


def exp_nonpos(v: _Vec, w):
    """``e^w`` for ``w <= 0`` (about 2 ulp; 0 below -745; NaN stays NaN)."""
    w = v.select_lt(w, v.const(-746.0), v.const(-746.0), w)
    return _exp_finish(v, *_exp_reduce(v, w))


def normal_tail_and_exp(v: _Vec, z):
    """``(cdf, e)``: ``Phi(z)`` and ``exp(-z^2 / 2)`` per lane (see the module text)."""
    a = v.minnum(v.fabs(z), v.const(_A_CLAMP))
    # exp(-a^2 / 2) = 2^(k / 16) e^r, a^2 = hi + lo exactly, lo folded into r
    hi = v.mul(a, a)
    lo = v.fma(a, a, v.neg(hi))
    kf, kd, r = _exp_reduce(v, v.mul(hi, v.const(-0.5)))
    e = _exp_finish(v, kf, kd, v.fma(lo, v.const(-0.5), r))
    # Phi(-a) = e F(s) / (a + c): s = (y + 1) S with y = (a - c) / (a + c) = 1 - 2c / (a + c)
    q = v.div(v.const(1.0), v.add(a, v.const(_C)))
    s = v.fma(q, v.const(-2.0 * _C * _S_SCALE), v.const(2.0 * _S_SCALE))
    j = v.trunc_int(s)  # s >= -ulp: truncation gives piece 0 there, never -1
    u = v.sub(s, v.int_to_float(j))
    f = v.estrin([v.lookup16(row, j) for row in ERFCX16], u)
    h = v.mul(v.mul(e, q), f)
    return v.select_neg(z, h, v.sub(v.const(1.0), h)), e


def _ptr(context, builder, aryty, ary, idx, idxty):
    data = context.make_array(aryty)(context, builder, ary).data
    p = builder.gep(data, [context.cast(builder, idx, idxty, types.intp)])
    return builder.bitcast(p, _V8.as_pointer())


def _mask(builder, n):
    lanes = ir.Constant(_I8V, list(range(8)))
    nv = builder.insert_element(ir.Constant(_I8V, ir.Undefined), n, ir.Constant(_I32, 0))
    nv = builder.shuffle_vector(nv, ir.Constant(_I8V, ir.Undefined),
                                ir.Constant(ir.VectorType(_I32, 8), [0] * 8))
    return builder.icmp_signed("<", lanes, nv)


def _load(builder, ptr, mask):
    """8 doubles from ``ptr`` (any alignment); with a mask, only its lanes (others 0)."""
    if mask is None:
        return builder.load(ptr, align=8)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V8, [_V8.as_pointer(), _I32, _M8, _V8]),
        "llvm.masked.load.v8f64.p0")
    return builder.call(fn, [ptr, ir.Constant(_I32, 8), mask, ir.Constant(_V8, [0.0] * 8)])


def _store(builder, val, ptr, mask, nt=False):
    """Store 8 doubles (with a mask: only its lanes); ``nt``: a non-temporal store, which
    skips the write-allocate read of the line (``ptr`` must be 64-byte aligned)."""
    if mask is None:
        if nt:
            store_nt(builder, val, ptr)
        else:
            builder.store(val, ptr, align=8)
        return
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [_V8, _V8.as_pointer(), _I32, _M8]),
        "llvm.masked.store.v8f64.p0")
    builder.call(fn, [val, ptr, ir.Constant(_I32, 8), mask])


class _Block:
    """The ``_UNROLL`` vectors of one call from flat index ``base`` of an array argument:
    their pointers, and the lane masks of a masked call (``n`` elements valid)."""

    def __init__(self, context, builder, sig, args, n64, masked: bool):
        self.context, self.builder, self.sig, self.args = context, builder, sig, args
        self.offs = [ir.Constant(_I64, 8 * q) for q in range(_UNROLL)]
        self.masks = ([_mask(builder, builder.sub(n64, o)) for o in self.offs] if masked
                      else [None] * _UNROLL)

    def ptrs(self, k, base):
        return [_ptr(self.context, self.builder, self.sig.args[k], self.args[k],
                     self.builder.add(base, o), types.int64) for o in self.offs]

    def load(self, k, base):
        return [_load(self.builder, p, m) for p, m in zip(self.ptrs(k, base), self.masks)]

    def store(self, vals, k, base, nt=False):
        for val, p, m in zip(vals, self.ptrs(k, base), self.masks):
            _store(self.builder, val, p, m, nt)


def _is_f64(a) -> bool:
    return (isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
            and a.dtype == types.float64)


BLOCK = 32  # elements per call: 4 vectors in lockstep (see above)
_UNROLL = BLOCK // 8


def _gelu_intrinsic(bias: bool, backward: bool, masked: bool, nt: bool = False):
    """Build one ``gelu[_bias][_bwd]_f64[_tail|_nt]`` intrinsic: ``(dy, x, b, out, acc, i,
    j, n)``, all arrays 1-D C float64 (ones a variant does not use may be any of them).

    ``z = x[i:i+n]`` (plus ``b[j:j+n]`` with a bias). Forward: ``out[i:i+n] = z Phi(z)``.
    Backward: ``out[i:i+n] = dy[i:i+n] (Phi(z) + z phi(z))``, and with a bias also
    ``acc[j:j+n] += out[i:i+n]``. ``n`` is ``BLOCK`` for the plain variants; the ``_tail``
    ones take any ``n`` up to ``BLOCK`` (masked loads and stores, same arithmetic). The
    ``_nt`` ones write ``out`` with non-temporal stores: ``&out[i]`` must be 64-byte
    aligned and the thread must ``sfence()`` before the results are read elsewhere."""

    def typer(typingctx, dy, x, b, out, acc, i, j, n):
        if not (all(_is_f64(a) for a in (dy, x, b, out, acc))
                and all(isinstance(a, types.Integer) for a in (i, j, n))):
            return None

        def codegen(context, builder, sig, args):
            ity, jty, nty = sig.args[5:]
            v = _Vec(builder, _UNROLL)
            n64 = context.cast(builder, args[7], nty, types.int64)
            i64 = context.cast(builder, args[5], ity, types.int64)
            j64 = context.cast(builder, args[6], jty, types.int64)
            blk = _Block(context, builder, sig, args, n64, masked)
            load, store = blk.load, blk.store

            z = load(1, i64)
            if bias:
                z = v.add(z, load(2, j64))
            cdf, e = normal_tail_and_exp(v, z)
            if backward:
                res = v.mul(load(0, i64), v.fma(v.mul(z, e), v.const(_INV_SQRT_2PI), cdf))
            else:
                res = v.mul(z, cdf)
            store(res, 3, i64, nt)
            if bias and backward:
                store(v.add(load(4, j64), res), 4, j64)
            return context.get_dummy_value()

        return types.void(dy, x, b, out, acc, i, j, n), codegen

    typer.__name__ = typer.__qualname__ = ("gelu" + ("_bias" if bias else "")
                                           + ("_bwd" if backward else "") + "_f64"
                                           + ("_tail" if masked else "")
                                           + ("_nt" if nt else ""))
    return intrinsic(typer)


gelu_f64 = _gelu_intrinsic(False, False, False)
gelu_f64_tail = _gelu_intrinsic(False, False, True)
gelu_f64_nt = _gelu_intrinsic(False, False, False, nt=True)
gelu_bwd_f64 = _gelu_intrinsic(False, True, False)
gelu_bwd_f64_nt = _gelu_intrinsic(False, True, False, nt=True)
gelu_bwd_f64_tail = _gelu_intrinsic(False, True, True)
gelu_bias_f64 = _gelu_intrinsic(True, False, False)
gelu_bias_f64_tail = _gelu_intrinsic(True, False, True)
gelu_bias_f64_nt = _gelu_intrinsic(True, False, False, nt=True)
gelu_bias_bwd_f64 = _gelu_intrinsic(True, True, False)
gelu_bias_bwd_f64_nt = _gelu_intrinsic(True, True, False, nt=True)
gelu_bias_bwd_f64_tail = _gelu_intrinsic(True, True, True)


def _softmax_exp_intrinsic(masked: bool):
    """Build ``softmax_exp_f64[_tail](x, g, i, mx, n)``: ``g[i:i+n] = exp(x[i:i+n] - mx)``
    (``x <= mx``) and return their sum; ``n = BLOCK`` for the plain variant, up to
    ``BLOCK`` (masked) for ``_tail``. For float64 softmax: the table exp takes about 13
    vector operations per 8 lanes, the portable one about 28."""

    def typer(typingctx, x, g, i, mx, n):
        if not (_is_f64(x) and _is_f64(g) and mx == types.float64
                and isinstance(i, types.Integer) and isinstance(n, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            _, _, iv, mxv, nv = args
            v = _Vec(builder, _UNROLL)
            n64 = context.cast(builder, nv, sig.args[4], types.int64)
            i64 = context.cast(builder, iv, sig.args[2], types.int64)
            blk = _Block(context, builder, sig, args, n64, masked)
            mxb = builder.insert_element(ir.Constant(_V8, ir.Undefined), mxv,
                                         ir.Constant(_I32, 0))
            mxb = builder.shuffle_vector(mxb, ir.Constant(_V8, ir.Undefined),
                                         ir.Constant(ir.VectorType(_I32, 8), [0] * 8))
            e = exp_nonpos(v, v.sub(blk.load(0, i64), mxb))
            if masked:  # lanes past n: w = 0 - mx there; keep them out of the sum
                e = [builder.select(m, x, ir.Constant(_V8, [0.0] * 8))
                     for x, m in zip(e, blk.masks)]
            blk.store(e, 1, i64)
            return v.hsum(e)

        return types.float64(x, g, i, mx, n), codegen

    typer.__name__ = typer.__qualname__ = "softmax_exp_f64" + ("_tail" if masked else "")
    return intrinsic(typer)


softmax_exp_f64 = _softmax_exp_intrinsic(False)
softmax_exp_f64_tail = _softmax_exp_intrinsic(True)
