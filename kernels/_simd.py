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
