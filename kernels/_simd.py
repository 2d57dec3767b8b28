"""Explicit 64-byte vector operations that LLVM's loop vectoriser will not emit on its own.

- ``dequant_store_nt``: 16 (float32) or 8 (float64) int8 codes times a scale, written with
  one *non-temporal* store. A normal store first reads the destination line into cache
  (write-allocate), so a kernel that reads 1 byte and writes 4 per element moves 9; the
  non-temporal store skips that read. The vectoriser refuses ``!nontemporal`` on a
  64-byte vector store, hence this intrinsic. The target address must be 64-byte aligned
  (callers peel a scalar prologue) and the writing thread must ``sfence()`` before its
  results are read elsewhere (once per chunk, not per row: per row it was slower than
  plain stores).
- ``compress_candidates``: 16 float32 entries of ``r + g``; those with magnitude
  ``>= thr`` are packed (in index order) into ``cval``/``cidx`` at ``pos`` in one
  ``llvm.masked.compressstore`` each; returns ``hits + (non-finite << 32)``.

x86-64 only (``sfence``): callers check ``NT_STORES`` and keep a plain path.
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba.core import cgutils

from kernels._jit import intrinsic, types

__all__ = ["NT_STORES", "address", "compress_candidates", "dequant_store_nt", "sfence"]

NT_STORES = platform.machine().lower() in ("x86_64", "amd64")
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _elem_ptr(context, builder, aryty, ary_val, idx, idxty):
    ary = context.make_array(aryty)(context, builder, ary_val)
    return builder.gep(ary.data, [context.cast(builder, idx, idxty, types.intp)])


def _splat(builder, value, vty: ir.VectorType):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
    mask = ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), mask)


def _is_1d(a) -> bool:
    return isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"


@intrinsic
def address(typingctx, arr, i):
    """The address of ``arr[i]`` (1-D C array), for alignment checks."""
    if not (_is_1d(arr) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        return builder.ptrtoint(p, _I64)

    return types.uint64(arr, i), codegen


@intrinsic
def sfence(typingctx):
    """Order this thread's non-temporal stores before anything it does next."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                            "llvm.x86.sse.sfence")
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def dequant_store_nt(typingctx, q, s, w, i):
    """``w[i:i+L] = q[i:i+L] * s``, L = 64 bytes of ``w``'s dtype; ``&w[i]`` 64-aligned."""
    if not (_is_1d(q) and q.dtype == types.int8 and _is_1d(w)
            and w.dtype in (types.float32, types.float64) and s == w.dtype
            and isinstance(i, types.Integer)):
        return None
    lanes = 512 // w.dtype.bitwidth

    def codegen(context, builder, sig, args):
        vf = ir.VectorType(context.get_value_type(sig.args[2].dtype), lanes)
        pq = _elem_ptr(context, builder, sig.args[0], args[0], args[3], sig.args[3])
        pw = _elem_ptr(context, builder, sig.args[2], args[2], args[3], sig.args[3])
        codes = builder.load(builder.bitcast(pq, ir.VectorType(ir.IntType(8), lanes).as_pointer()),
                             align=1)
        vals = builder.fmul(builder.sitofp(codes, vf), _splat(builder, args[1], vf))
        st = builder.store(vals, builder.bitcast(pw, vf.as_pointer()), align=64)
        st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(_I32, 1)]))
        return context.get_dummy_value()

    return types.void(q, s, w, i), codegen


def _declare(builder, name: str, ret: ir.Type, args: list) -> ir.Function:
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


@intrinsic
def compress_candidates(typingctx, g, r, i, thr, cidx, cval, pos):
    """One 64-byte block from ``i``: ``a = r + g``; the ``a`` with ``|a| >= thr`` go to
    ``cval[pos:]`` and their indices to ``cidx[pos:]``, packed in index order (up to a
    block's worth of slots from ``pos`` may be written). Returns
    ``hits + (non-finite count << 32)``."""
    if not (_is_1d(g) and _is_1d(r) and g.dtype == r.dtype == thr == cval.dtype
            and g.dtype in (types.float32, types.float64) and _is_1d(cidx)
            and cidx.dtype == types.int64 and _is_1d(cval)
            and isinstance(i, types.Integer) and isinstance(pos, types.Integer)):
        return None
    lanes = 512 // g.dtype.bitwidth
    fname = "f32" if g.dtype == types.float32 else "f64"

    def codegen(context, builder, sig, args):
        ga, ra, iv, tv, ca, va, pv = args
        gt, rt, it, _, ct, vt, pt = sig.args
        ft = context.get_value_type(gt.dtype)
        vf = ir.VectorType(ft, lanes)
        vi = ir.VectorType(_I64, lanes)
        vb = ir.VectorType(ir.IntType(1), lanes)
        load = (lambda aty, aval: builder.load(builder.bitcast(
            _elem_ptr(context, builder, aty, aval, iv, it), vf.as_pointer()), align=1))
        a = builder.fadd(load(rt, ra), load(gt, ga))
        mag = builder.call(_declare(builder, f"llvm.fabs.v{lanes}{fname}", vf, [vf]), [a])
        hit = builder.fcmp_ordered(">=", mag, _splat(builder, tv, vf))
        bad = builder.fcmp_unordered(">=", mag, _splat(builder, ir.Constant(ft, float("inf")), vf))
        mty = ir.IntType(lanes)
        ctpop = _declare(builder, f"llvm.ctpop.i{lanes}", mty, [mty])
        nhit = builder.zext(builder.call(ctpop, [builder.bitcast(hit, mty)]), _I64)
        nbad = builder.zext(builder.call(ctpop, [builder.bitcast(bad, mty)]), _I64)
        start = context.cast(builder, iv, it, types.int64)
        idx = builder.add(_splat(builder, start, vi), ir.Constant(vi, list(range(lanes))))
        pval = builder.bitcast(_elem_ptr(context, builder, vt, va, pv, pt), ft.as_pointer())
        pidx = builder.bitcast(_elem_ptr(context, builder, ct, ca, pv, pt), _I64.as_pointer())
        builder.call(_declare(builder, f"llvm.masked.compressstore.v{lanes}{fname}",
                              ir.VoidType(), [vf, ft.as_pointer(), vb]), [a, pval, hit])
        builder.call(_declare(builder, f"llvm.masked.compressstore.v{lanes}i64",
                              ir.VoidType(), [vi, _I64.as_pointer(), vb]), [idx, pidx, hit])
        return builder.or_(nhit, builder.shl(nbad, ir.Constant(_I64, 32)))

    return types.int64(g, r, i, thr, cidx, cval, pos), codegen
