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
  ``>= thr`` are packed (in index order) into ``cval``/``cidx`` at ``pos`` by vector
  compresses into registers (``llvm.experimental.vector.compress``) and plain stores,
  skipped when nothing hit; returns ``hits + (non-finite << 32)``. With an LLVM older
  than 19 (no vector compress), ``llvm.masked.compressstore`` instead.
  ``compress_candidates_update`` also stores ``r + g`` into ``o`` (``r`` itself for the
  in-place one-pass mode); ``compress_candidates_nt`` stores it with a non-temporal
  store (a separate, 64-byte aligned output: no write-allocate read).
- ``quant_store``: 64 elements of a row times ``1 / scale``, rounded, clamped to
  +-127 and stored as 64 int8 codes (the vectoriser's version of that loop converted
  and packed the codes at twice the cost).
- ``copy64_nt``: 64 bytes from a scratch buffer to an aligned destination with one
  non-temporal store (layer norm's backward builds each output row in a scratch row and
  streams it out this way); ``scale64_nt`` the same times a factor (softmax's rows).
- ``ln_out``, ``ln_bwd_out``: one vector of layer norm's output / of its backward
  (``dx``; the dgamma/dbeta shares updated), written with a non-temporal store: the
  row loops of streamed rows call them vector by vector with a prefetch after each.
  ``ln_bwd_out_next`` also takes the next row's two sums at the same place, into the
  lanes of a small buffer (``ln_row_sums_vec`` alone: a chunk's first row), so wide
  float32 rows need no pass that only reads.
- ``tile_argmin``: k-means assignment for 2 vectors of rows of a tile-major transposed
  block, four centroids at a time with eight FMA accumulators and the running minima
  held in registers (the loop vectoriser keeps accumulators in memory when the rows,
  not ``d``, are the vector lanes).

All but ``sfence`` are generic LLVM (vector types, ``llvm.fma``, masked compress), which
LLVM lowers for any target; ``sfence`` is x86-64 only, so the non-temporal path is
taken only where ``NT_STORES`` is true.
"""

from __future__ import annotations

import contextlib
import platform

import llvmlite.binding as llvm
from llvmlite import ir
from numba.core import cgutils

from kernels import memory as _memory
from kernels._checks import PAGE, data_address
from kernels._jit import intrinsic, types
from kernels._prefetch import ROW_HINTS
from kernels.config import zen2_host

__all__ = ["NT_AHEAD_SLOW_BYTES", "NT_FRESH", "NT_MIN_BYTES", "NT_STORES", "address",
           "compress_candidates", "compress_candidates_nt", "compress_candidates_update",
           "copy64_nt", "dequant_store_nt", "flush_subnormals",
           "ln_bwd_out", "ln_out", "QUANT_LANES", "quant_store", "restore_fp", "scale64_nt",
           "scan_scores", "sfence", "stream_out", "streaming_every_output", "tile_argmin"]

NT_STORES = platform.machine().lower() in ("x86_64", "amd64")
# llvm.experimental.vector.compress arrived in LLVM 19; an older LLVM (llvmlite before
# 0.44, e.g. Debian 12's numba) does not know it and aborts the process when it links
VECTOR_COMPRESS = llvm.llvm_version_info >= (19,)
# Outputs this large (half this machine's L3) are written with non-temporal stores: they
# would not stay in cache anyway, and skipping the write-allocate read saves a third of
# the traffic of a kernel that reads one array and writes one. Smaller outputs keep
# ordinary stores, so the next kernel finds them in cache.
NT_MIN_BYTES = 16 << 20
# Whether a kernel's own new output (a fresh allocation: its pages fault in, and the OS
# zeroes each one, as the kernel first writes it) is streamed too. On the Intel host
# (``ROW_HINTS`` on) plain stores into such pages were faster: 2^25 float32 from
# memory, A/B by rounds in one process (streamed / plain time, medians of 9-15 rounds):
# dequantise 1.17-1.18, GELU float32 1.11-1.19, float64 1.02-1.08; layer norm 0.96-1.04
# and softmax 1.00-1.05 (those two stream as before). The pages just zeroed are still in
# the cache, where a plain store finds them and a non-temporal one has to push them out.
NT_FRESH = not ROW_HINTS
# Where an output starts 1 to this many bytes ahead of the input its kernel reads as it
# writes it, modulo 4 KiB, that kernel writes it with plain stores (where the caller
# says which input: ``stream_out``'s ``src``). On the Zen 2 host the non-temporal stores
# held up the loads with the same low 12 address bits that followed them (plain stores
# did not): float32 GELU 49 ms with the output 16-48 bytes ahead, 26 at 64-80, 18-19
# from 96 on (plain: 17-18 everywhere); layer norm forward, float32 256 features,
# 15.4 ms at 48 bytes, 11.2 at 176, 8.1 half a page away. The kernels' own outputs sit
# half a page away (``kernels.empty_aligned``'s ``apart_from``); this is for a caller's
# ``out=``, and only GELU and bias + GELU pass ``src`` (2^25 elements from memory, A/B
# in one process, time streamed / plain: float32 16-48 bytes ahead 1.76-2.71, 80
# 0.89-0.95, 112 1.07-1.13; float64 16-112 1.09-1.23; 176 1.00). Layer norm's times
# moved between runs as much as between the two, so it streams as before. Elsewhere
# 0: the Intel and Zen 4 hosts streamed such outputs at 92-115% of the triad.
NT_AHEAD_SLOW_BYTES = 128 if zen2_host() else 0


def _target_has(*features: str) -> bool:
    """True when numba compiles for a CPU with all of ``features`` (LLVM's names): the
    host, unless NUMBA_CPU_NAME names another target (a portable cache: then False), or
    NUMBA_CPU_FEATURES lists them."""
    import numba

    feats = numba.config.CPU_FEATURES
    if feats:
        return all(f"+{f}" in feats.split(",") for f in features)
    if numba.config.CPU_NAME not in (None, "", "host"):
        return False
    try:
        host = llvm.get_host_cpu_features()
    except Exception:  # pragma: no cover - a platform llvmlite cannot query
        return False
    return all(host.get(f, False) for f in features)


def _host_has_avx512() -> bool:
    """True when numba compiles for a CPU with AVX-512F (32 vector registers of 64 bytes;
    without it, AVX2's 16 of 32 bytes hold a quarter as much)."""
    return _target_has("avx512f")


def _host_has_avx2_fma() -> bool:
    """True when numba compiles for a CPU with AVX2 and FMA: the row and block kernels of
    ``kernels._avx512`` (softmax, layer norm) run there on 256-bit vectors. Without FMA
    their ``llvm.fma`` calls would become a libm call per lane."""
    return _target_has("avx2", "fma")


# The vector width of the register-blocked intrinsics (tile_argmin, scan_scores): each
# keeps 8-16 accumulators over its loop. At 512 bits they and the loads fit AVX-512's 32
# registers; on an AVX2 CPU each 512-bit vector takes two of its 16, and the accumulators
# went to the stack on every FMA, so there they use 256-bit vectors (tile_argmin: half a
# tile per call; scan_scores: 8 float32 rows per call)
VEC_BITS = 512 if _host_has_avx512() else 256
VEC_REGS = 32 if VEC_BITS == 512 else 16


def scan_fixed_pieces() -> int:
    """The most vectors a row may hold for ``scan_scores``' first query to take it as
    straight-line code: a quarter of the vector registers (8 with AVX-512, 4 without), so
    the query's pieces stay in registers beside the rows' accumulators. Read when a
    kernel is compiled, from ``VEC_REGS`` as it then is."""
    return VEC_REGS // 4


@contextlib.contextmanager
def streaming_every_output():
    """While inside, ``stream_out`` streams outputs of any size (``NT_MIN_BYTES`` 0), as
    it does large ones: the warm-up compiles the kernels that only streamed outputs take
    (float64 GELU's staged loops, bias + ReLU / none), and ``bench_prefetch.py`` times
    their hints on small arrays. Process-wide; not for code that runs beside others."""
    global NT_MIN_BYTES
    keep, NT_MIN_BYTES = NT_MIN_BYTES, 0
    try:
        yield
    finally:
        NT_MIN_BYTES = keep


def stream_out(out, fresh: bool = False, src=None) -> bool:
    """Whether a kernel writes ``out`` with non-temporal stores: on x86-64, and when it
    is ``NT_MIN_BYTES`` or more (the one place that decides, for every kernel). ``fresh``:
    ``out`` is the kernel's own new allocation (callers pass it where measured), then
    streamed only where ``NT_FRESH``, or where freed memory is kept
    (``kernels.memory``): a new array then reuses mapped pages, which are not in cache
    as the pages of a first touch are, like a caller's ``out=``. ``src``: the input
    read as ``out`` is written, where its place was measured to matter
    (``NT_AHEAD_SLOW_BYTES``)."""
    return (NT_STORES and out.nbytes >= NT_MIN_BYTES
            and (NT_FRESH or not fresh or _memory.keeping())
            and (src is None or not NT_AHEAD_SLOW_BYTES or not 0 < (
                data_address(out) - data_address(src)) % PAGE < NT_AHEAD_SLOW_BYTES))


_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _elem_ptr(context, builder, aryty, ary_val, idx, idxty):
    ary = context.make_array(aryty)(context, builder, ary_val)
    return builder.gep(ary.data, [context.cast(builder, idx, idxty, types.intp)])


def _splat(builder, value, vty: ir.VectorType):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
    mask = ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), mask)


def elem_bytes(vty: ir.VectorType) -> int:
    """Bytes per lane of an LLVM vector type (float, double or an integer)."""
    el = vty.element
    if isinstance(el, ir.IntType):
        return el.width // 8
    return 4 if isinstance(el, ir.FloatType) else 8


def _vec_name(vty: ir.VectorType) -> str:
    return f"v{vty.count}{'f32' if vty.element == ir.FloatType() else 'f64'}"


def _mask(builder, n, lanes: int = 8):
    """Lanes ``0 .. n-1`` of a ``lanes``-wide vector (``n`` an int64)."""
    ity = ir.VectorType(_I64, lanes)
    return builder.icmp_signed("<", ir.Constant(ity, list(range(lanes))), _splat(builder, n, ity))


def _load(builder, ptr, mask, passthru=None):
    """A vector (``ptr``'s pointee: 8 doubles or 16 floats) from ``ptr``, any alignment;
    with a mask, only its lanes (the others ``passthru``, default 0)."""
    vty = ptr.type.pointee
    align = elem_bytes(vty)
    if mask is None:
        return builder.load(ptr, align=align)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vty, [ptr.type, _I32, mask.type, vty]),
        f"llvm.masked.load.{_vec_name(vty)}.p0")
    fill = passthru if passthru is not None else ir.Constant(vty, [0.0] * vty.count)
    return builder.call(fn, [ptr, ir.Constant(_I32, align), mask, fill])


def store_nt(builder, val, ptr):
    """A store of ``val`` (a vector) marked ``!nontemporal`` (no write-allocate), aligned
    to its size up to 64 bytes (a 256-bit vector: 32)."""
    st = builder.store(val, ptr, align=min(64, val.type.count * elem_bytes(val.type)))
    st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(_I32, 1)]))


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
    """Order this thread's non-temporal stores before anything it does next (x86-64; a
    no-op elsewhere, where callers take no non-temporal path)."""
    def codegen(context, builder, sig, args):
        if not NT_STORES:
            return context.get_dummy_value()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                            "llvm.x86.sse.sfence")
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


_FTZ_DAZ = 0x8040  # MXCSR: flush-to-zero (bit 15), denormals-are-zero (bit 6)


def _mxcsr_call(builder, name: str, slot) -> None:
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()]),
        f"llvm.x86.sse.{name}")
    builder.call(fn, [builder.bitcast(slot, ir.IntType(8).as_pointer())])


@intrinsic
def flush_subnormals(typingctx):
    """Make this thread's SSE/AVX arithmetic flush subnormal results to 0 and read
    subnormal inputs as 0 (MXCSR FTZ and DAZ); returns the MXCSR value to hand back to
    ``restore_fp`` when the work is done (x86-64; elsewhere a no-op returning 0).

    On the Intel hosts every vector operation whose result is subnormal takes a
    microcode assist of about 150 cycles. Softmax rows whose logits spread over more
    than about 87 (float32: ``exp`` below 2^-126, gradients below it) hit one per
    vector: 9-30 ns per element instead of 0.5-1.5 (docs/kernels.md, "Subnormals")."""
    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        if not NT_STORES:
            return ir.Constant(i32, 0)
        slot = cgutils.alloca_once(builder, i32)
        _mxcsr_call(builder, "stmxcsr", slot)
        old = builder.load(slot)
        builder.store(builder.or_(old, ir.Constant(i32, _FTZ_DAZ)), slot)
        _mxcsr_call(builder, "ldmxcsr", slot)
        return old

    return types.int32(), codegen


@intrinsic
def restore_fp(typingctx, old):
    """Put back the MXCSR value ``flush_subnormals`` returned (x86-64; else a no-op)."""
    if old != types.int32:
        return None

    def codegen(context, builder, sig, args):
        if NT_STORES:
            slot = cgutils.alloca_once_value(builder, args[0])
            _mxcsr_call(builder, "ldmxcsr", slot)
        return context.get_dummy_value()

    return types.void(old), codegen


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
        store_nt(builder, vals, builder.bitcast(pw, vf.as_pointer()))
        return context.get_dummy_value()

    return types.void(q, s, w, i), codegen


QUANT_LANES = 64  # elements per quant_store call: 64 int8 codes, one 64-byte store


@intrinsic
def quant_store(typingctx, w, inv, q, i):
    """``q[i:i+64] = clip(rint(w[i:i+64] * inv), -127, 127)`` as int8 (``w`` float32 or
    float64, ``q`` int8, both 1-D C): one 64-lane multiply, ``llvm.rint`` (round half
    to even, as ``np.rint``), ``minnum``/``maxnum`` (a NaN becomes 127; rows holding one
    are refused anyway) and a 64-byte store of the codes. The loop vectoriser's version
    of the same scalar loop body measured 2x slower in cache (float32 0.52-0.61 ns per
    element per core -> 0.28; float64 0.96-1.11 -> 0.60-0.97); from memory both are
    bound by the reads."""
    if not (_is_1d(w) and w.dtype in (types.float32, types.float64) and inv == w.dtype
            and _is_1d(q) and q.dtype == types.int8 and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ft = context.get_value_type(sig.args[0].dtype)
        vf = ir.VectorType(ft, QUANT_LANES)
        pw = _elem_ptr(context, builder, sig.args[0], args[0], args[3], sig.args[3])
        pq = _elem_ptr(context, builder, sig.args[2], args[2], args[3], sig.args[3])
        f32 = isinstance(ft, ir.FloatType)
        x = builder.load(builder.bitcast(pw, vf.as_pointer()), align=4 if f32 else 8)
        codes = _quant_codes(builder, x, args[1])
        builder.store(codes, builder.bitcast(pq, codes.type.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(w, inv, q, i), codegen


def _quant_codes(builder, x, inv):
    """``clip(rint(x * inv), -127, 127)`` as int8 codes, lane by lane (``x`` a float
    vector): ``quant_store``'s and ``quant_store_part``'s arithmetic."""
    vf = x.type
    sfx = _vec_name(vf)
    v = builder.fmul(x, _splat(builder, inv, vf))
    v = builder.call(_declare(builder, f"llvm.rint.{sfx}", vf, [vf]), [v])
    for op, lim in (("minnum", 127.0), ("maxnum", -127.0)):
        v = builder.call(_declare(builder, f"llvm.{op}.{sfx}", vf, [vf, vf]),
                         [v, ir.Constant(vf, [lim] * vf.count)])
    return builder.fptosi(v, ir.VectorType(ir.IntType(8), vf.count))


@intrinsic
def quant_store_part(typingctx, w, inv, q, i, n):
    """``quant_store`` of the ``n`` elements from ``i`` only, ``n`` at most one 512-bit
    vector of ``w`` (16 float32, 8 float64): the load and the store of the codes masked
    to them (``llvm.masked.load`` / ``llvm.masked.store``: one instruction each with
    AVX-512, which ``kernels.quant.MASKED_TAIL`` requires; AVX2 has no masked byte
    store). A row's last piece, or a whole row shorter than 64: as a loop, LLVM's vector
    body plus up to 63 scalar rounds took 3.2x the time of a whole 64 (float32, 4096 x 63
    against x 64, Zen 5 host)."""
    if not (_is_1d(w) and w.dtype in (types.float32, types.float64) and inv == w.dtype
            and _is_1d(q) and q.dtype == types.int8 and isinstance(i, types.Integer)
            and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ft = context.get_value_type(sig.args[0].dtype)
        lanes = 512 // sig.args[0].dtype.bitwidth
        vf = ir.VectorType(ft, lanes)
        pw = _elem_ptr(context, builder, sig.args[0], args[0], args[3], sig.args[3])
        pq = _elem_ptr(context, builder, sig.args[2], args[2], args[3], sig.args[3])
        f32 = isinstance(ft, ir.FloatType)
        mask = _mask(builder, context.cast(builder, args[4], sig.args[4], types.int64), lanes)
        vp = builder.bitcast(pw, vf.as_pointer())
        load = _declare(builder, f"llvm.masked.load.{_vec_name(vf)}.p0", vf,
                        [vp.type, _I32, mask.type, vf])
        x = builder.call(load, [vp, ir.Constant(_I32, 4 if f32 else 8), mask,
                                ir.Constant(vf, [0.0] * lanes)])
        codes = _quant_codes(builder, x, args[1])
        cp = builder.bitcast(pq, codes.type.as_pointer())
        store = _declare(builder, f"llvm.masked.store.v{lanes}i8.p0", ir.VoidType(),
                         [codes.type, cp.type, _I32, mask.type])
        builder.call(store, [codes, cp, ir.Constant(_I32, 1), mask])
        return context.get_dummy_value()

    return types.void(w, inv, q, i, n), codegen


def _declare(builder, name: str, ret: ir.Type, args: list) -> ir.Function:
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _compress_to(builder, vec, mask, ptr) -> None:
    """Store the lanes of ``vec`` selected by ``mask`` packed at ``ptr`` (a whole vector
    is written: the slots past the packed lanes get junk, so the caller must own them).
    Compressing into a register and storing it plainly, instead of
    ``llvm.masked.compressstore``: the masked compress-store to memory is slow on this
    CPU, even with an empty mask (the candidate pass, float32, one core in cache: 0.28
    -> 0.09 ns per element read-only, 0.30 -> 0.12 storing, with the empty blocks
    skipped as well)."""
    vty = vec.type
    elem = {ir.FloatType(): "f32", ir.DoubleType(): "f64"}.get(vty.element, "i64")
    if not VECTOR_COMPRESS:  # an LLVM before 19 (Debian 12's numba): the slow, sure way
        fn = _declare(builder, f"llvm.masked.compressstore.v{vty.count}{elem}",
                      ir.VoidType(), [vty, vty.element.as_pointer(), mask.type])
        builder.call(fn, [vec, builder.bitcast(ptr, vty.element.as_pointer()), mask])
        return
    fn = _declare(builder, f"llvm.experimental.vector.compress.v{vty.count}{elem}",
                  vty, [vty, mask.type, vty])
    packed = builder.call(fn, [vec, mask, ir.Constant(vty, ir.Undefined)])
    builder.store(packed, builder.bitcast(ptr, vty.as_pointer()), align=1)


def _compress_candidates(store: str | None):
    """Build a ``compress_candidates`` variant. ``store``: None (read only), "plain"
    (``a`` also stored into ``o[i:]``) or "nt" (the same with a non-temporal store; the
    address must be 64-byte aligned and the thread must ``sfence()`` afterwards)."""

    def typer(typingctx, g, r, o, i, thr, cidx, cval, pos):
        """One 64-byte block from ``i``: ``a = r + g``; the ``a`` with ``|a| >= thr`` go to
        ``cval[pos:]`` and their indices to ``cidx[pos:]``, packed in index order (up to a
        block's worth of slots from ``pos`` may be written). The storing variants write
        ``a`` into ``o[i:]`` with 0 in place of each candidate (the caller puts back the
        candidates it does not choose). Returns ``hits + (non-finite count << 32)``."""
        if not (_is_1d(g) and _is_1d(r) and _is_1d(o)
                and g.dtype == r.dtype == o.dtype == thr == cval.dtype
                and g.dtype in (types.float32, types.float64) and _is_1d(cidx)
                and cidx.dtype == types.int64 and _is_1d(cval)
                and isinstance(i, types.Integer) and isinstance(pos, types.Integer)):
            return None
        lanes = 512 // g.dtype.bitwidth
        fname = "f32" if g.dtype == types.float32 else "f64"

        def codegen(context, builder, sig, args):
            ga, ra, oa, iv, tv, ca, va, pv = args
            gt, rt, ot, it, _, ct, vt, pt = sig.args
            ft = context.get_value_type(gt.dtype)
            vf = ir.VectorType(ft, lanes)
            vb = ir.VectorType(ir.IntType(1), lanes)
            load = (lambda aty, aval: builder.load(builder.bitcast(
                _elem_ptr(context, builder, aty, aval, iv, it), vf.as_pointer()), align=1))
            a = builder.fadd(load(rt, ra), load(gt, ga))
            mag = builder.call(_declare(builder, f"llvm.fabs.v{lanes}{fname}", vf, [vf]), [a])
            hit = builder.fcmp_ordered(">=", mag, _splat(builder, tv, vf))
            if store is not None:
                po = builder.bitcast(_elem_ptr(context, builder, ot, oa, iv, it), vf.as_pointer())
                kept = builder.select(hit, ir.Constant(vf, [0.0] * lanes), a)
                if store == "nt":
                    store_nt(builder, kept, po)
                else:
                    builder.store(kept, po, align=1)
            bad = builder.fcmp_unordered(">=", mag, _splat(builder, ir.Constant(ft, float("inf")), vf))
            mty = ir.IntType(lanes)
            ctpop = _declare(builder, f"llvm.ctpop.i{lanes}", mty, [mty])
            nhit = builder.zext(builder.call(ctpop, [builder.bitcast(hit, mty)]), _I64)
            nbad = builder.zext(builder.call(ctpop, [builder.bitcast(bad, mty)]), _I64)
            with builder.if_then(builder.icmp_unsigned("!=", nhit, ir.Constant(_I64, 0)),
                                 likely=False):
                start = context.cast(builder, iv, it, types.int64)
                pval = _elem_ptr(context, builder, vt, va, pv, pt)
                pidx = _elem_ptr(context, builder, ct, ca, pv, pt)
                _compress_to(builder, a, hit, pval)
                # indices 8 at a time (one 512-bit vector of int64), each part packed
                # right after the previous part's hits
                step = 8
                for part in range(lanes // step):
                    sel = list(range(part * step, part * step + step))
                    ids = builder.add(_splat(builder, start, ir.VectorType(_I64, step)),
                                      ir.Constant(ir.VectorType(_I64, step), sel))
                    m = (hit if lanes == step else
                         builder.shuffle_vector(hit, ir.Constant(vb, ir.Undefined),
                                                ir.Constant(ir.VectorType(_I32, step), sel)))
                    _compress_to(builder, ids, m, pidx)
                    if part + 1 < lanes // step:
                        m8 = builder.bitcast(m, ir.IntType(step))
                        c8 = builder.call(_declare(builder, f"llvm.ctpop.i{step}",
                                                   ir.IntType(step), [ir.IntType(step)]), [m8])
                        pidx = builder.gep(pidx, [builder.zext(c8, _I64)])
            return builder.or_(nhit, builder.shl(nbad, ir.Constant(_I64, 32)))

        return types.int64(g, r, o, i, thr, cidx, cval, pos), codegen

    typer.__name__ = typer.__qualname__ = {
        None: "compress_candidates", "plain": "compress_candidates_update",
        "nt": "compress_candidates_nt"}[store]
    return intrinsic(typer)


compress_candidates = _compress_candidates(None)
compress_candidates_update = _compress_candidates("plain")
compress_candidates_nt = _compress_candidates("nt")


@intrinsic
def tile_argmin(typingctx, cf, cn, kp, xt, d, ldx, r0, best, lab):
    """Nearest of ``kp`` centroids (``kp`` a multiple of 4) for the 2L rows from ``r0``
    of a transposed block (see ``dot_tile``): for each group of four centroids the eight
    dot-product accumulators stay in registers over the ``t`` loop, then
    ``|c|^2 - 2 x.c`` is compared with each row's running best by vector selects
    (strict ``<``: ties keep the lower index; NaN never wins). Writes ``best[:2L]`` and
    ``lab[:2L]`` (-1 where nothing won)."""
    if not (_is_1d(cf) and _is_1d(cn) and _is_1d(xt) and _is_1d(best) and _is_1d(lab)
            and cf.dtype == cn.dtype == xt.dtype == best.dtype
            and cf.dtype in (types.float32, types.float64) and lab.dtype == types.int64
            and all(isinstance(a, types.Integer) for a in (kp, d, ldx, r0))):
        return None
    lanes = VEC_BITS // cf.dtype.bitwidth
    fname = "f32" if cf.dtype == types.float32 else "f64"
    group = 4

    def codegen(context, builder, sig, args):
        cfa, cna, kpv, xta, dv, ldv, rv, besta, laba = args
        ity = types.intp
        kpv, dv, ldv, rv = (context.cast(builder, v, t, ity) for v, t in
                            zip((kpv, dv, ldv, rv), (sig.args[2], sig.args[4], sig.args[5],
                                                     sig.args[6])))
        ft = context.get_value_type(sig.args[0].dtype)
        vf = ir.VectorType(ft, lanes)
        vi = ir.VectorType(_I64, lanes)
        fma = _declare(builder, f"llvm.fma.v{lanes}{fname}", vf, [vf, vf, vf])
        data = [context.make_array(sig.args[i])(context, builder, args[i]).data
                for i in (0, 1, 3, 7, 8)]
        cfd, cnd, xtd, bestd, labd = data
        zero = ir.Constant(vf, [0.0] * lanes)
        bests = [cgutils.alloca_once_value(builder, ir.Constant(vf, [float("inf")] * lanes))
                 for _ in range(2)]
        labs = [cgutils.alloca_once_value(builder, ir.Constant(vi, [-1] * lanes))
                for _ in range(2)]
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(2 * group)]
        L = ir.Constant(_I64, lanes)
        ngroups = builder.sdiv(kpv, ir.Constant(_I64, group))
        with cgutils.for_range(builder, ngroups) as gloop:
            j = builder.mul(gloop.index, ir.Constant(_I64, group))
            for acc in accs:
                builder.store(zero, acc)
            with cgutils.for_range(builder, dv) as loop:
                t = loop.index
                xb = builder.add(builder.mul(t, ldv), rv)
                xv = [builder.load(builder.bitcast(builder.gep(xtd, [builder.add(xb, off)]),
                                                   vf.as_pointer()), align=1)
                      for off in (ir.Constant(_I64, 0), L)]
                for q in range(group):
                    ci = builder.add(builder.mul(builder.add(j, ir.Constant(_I64, q)), dv), t)
                    w = _splat(builder, builder.load(builder.gep(cfd, [ci])), vf)
                    for v in range(2):
                        acc = accs[q * 2 + v]
                        builder.store(builder.call(fma, [w, xv[v], builder.load(acc)]), acc)
            minus2 = ir.Constant(vf, [-2.0] * lanes)
            for q in range(group):
                jq = builder.add(j, ir.Constant(_I64, q))
                cq = _splat(builder, builder.load(builder.gep(cnd, [jq])), vf)
                jqv = _splat(builder, jq, vi)
                for v in range(2):
                    dist = builder.call(fma, [minus2, builder.load(accs[q * 2 + v]), cq])
                    b = builder.load(bests[v])
                    win = builder.fcmp_ordered("<", dist, b)
                    builder.store(builder.select(win, dist, b), bests[v])
                    builder.store(builder.select(win, jqv, builder.load(labs[v])), labs[v])
        for v in range(2):
            off = ir.Constant(_I64, v * lanes)
            builder.store(builder.load(bests[v]),
                          builder.bitcast(builder.gep(bestd, [off]), vf.as_pointer()), align=1)
            builder.store(builder.load(labs[v]),
                          builder.bitcast(builder.gep(labd, [off]), vi.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(cf, cn, kp, xt, d, ldx, r0, best, lab), codegen


def _copy64_ok(dst, di, src, si) -> bool:
    return (_is_1d(dst) and _is_1d(src) and dst.dtype == src.dtype
            and dst.dtype in (types.float32, types.float64)
            and isinstance(di, types.Integer) and isinstance(si, types.Integer))


def _copy64_codegen(scaled: bool):
    def codegen(context, builder, sig, args):
        lanes = 512 // sig.args[0].dtype.bitwidth
        vf = ir.VectorType(context.get_value_type(sig.args[0].dtype), lanes)
        ps = _elem_ptr(context, builder, sig.args[2], args[2], args[3], sig.args[3])
        pd = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        v = builder.load(builder.bitcast(ps, vf.as_pointer()), align=1)
        if scaled:
            v = builder.fmul(v, _splat(builder, args[4], vf))
        store_nt(builder, v, builder.bitcast(pd, vf.as_pointer()))
        return context.get_dummy_value()

    return codegen


@intrinsic
def copy64_nt(typingctx, dst, di, src, si):
    """Copy 64 bytes from ``src[si:]`` (any alignment) to ``dst[di:]`` with one
    non-temporal store (``&dst[di]`` 64-byte aligned; ``sfence()`` afterwards, as for
    ``dequant_store_nt``). For kernels that build an output row in a small scratch buffer
    and stream it out without the write-allocate read of the destination."""
    if not _copy64_ok(dst, di, src, si):
        return None
    return types.void(dst, di, src, si), _copy64_codegen(False)


@intrinsic
def scale64_nt(typingctx, dst, di, src, si, f):
    """``copy64_nt`` of ``src[si:] * f``: 64 bytes of a scratch row scaled on their way
    out (each lane one multiply, as a scalar loop rounds it)."""
    if not (_copy64_ok(dst, di, src, si) and f == dst.dtype):
        return None
    return types.void(dst, di, src, si, f), _copy64_codegen(True)


def _fvec(context, builder, sig, lanes):
    """``(vector type, element alignment, llvm.fma)`` for an intrinsic over ``lanes``
    elements of ``sig.args[0]``'s dtype."""
    bits = sig.args[0].dtype.bitwidth
    vf = ir.VectorType(context.get_value_type(sig.args[0].dtype), lanes)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf] * 3),
                                         f"llvm.fma.v{lanes}f{bits}")
    return vf, bits // 8, fma


def _vec_ptr(context, builder, sig, args, k, i, vf):
    """A ``vf`` pointer to ``args[k][args[i]]``."""
    p = _elem_ptr(context, builder, sig.args[k], args[k], args[i], sig.args[i])
    return builder.bitcast(p, vf.as_pointer())


@intrinsic
def ln_out(typingctx, x, xi, gamma, beta, gi, y, yi, mu, r):
    """One 64-byte vector of layer norm's output: ``y[yi:yi+L] = fma((x[xi:xi+L] - mu) *
    r, gamma[gi:gi+L], beta[gi:gi+L])`` (``L`` = 64 bytes of the dtype; loads at any
    alignment), stored non-temporally (``&y[yi]`` 64-byte aligned, ``sfence()``
    afterwards). Explicit, so the row loop can ask for a line ahead after each vector
    (LLVM stops vectorising a loop that holds a prefetch) and streams straight out,
    without a scratch row."""
    if not (all(_is_1d(a) for a in (x, gamma, beta, y))
            and x.dtype in (types.float32, types.float64)
            and all(a.dtype == x.dtype for a in (gamma, beta, y)) and mu == x.dtype
            and r == x.dtype and all(isinstance(i, types.Integer) for i in (xi, gi, yi))):
        return None
    lanes = 512 // x.dtype.bitwidth

    def codegen(context, builder, sig, args):
        vf, align, fma = _fvec(context, builder, sig, lanes)
        xv, g, b = (builder.load(_vec_ptr(context, builder, sig, args, k, i, vf), align=align)
                    for k, i in ((0, 1), (2, 4), (3, 4)))
        t = builder.fmul(builder.fsub(xv, _splat(builder, args[7], vf)),
                         _splat(builder, args[8], vf))
        store_nt(builder, builder.call(fma, [t, g, b]),
                 _vec_ptr(context, builder, sig, args, 5, 6, vf))
        return context.get_dummy_value()

    return types.void(x, xi, gamma, beta, gi, y, yi, mu, r), codegen


def _bwd_out(context, builder, sig, args, lanes):
    """``ln_bwd_out``'s code (args ``x, dy, gamma, sg, sb, dx, j, mu, r, a, b``); returns
    ``(vector type, alignment, llvm.fma, the gamma vector)`` for code that follows."""
    vf, align, fma = _fvec(context, builder, sig, lanes)
    ptr = [_vec_ptr(context, builder, sig, args, k, 6, vf) for k in range(6)]

    def splat(k):
        return _splat(builder, args[k], vf)

    xv, u, g, pg, pb = (builder.load(ptr[k], align=align) for k in range(5))
    r = splat(8)
    h = builder.fmul(builder.fsub(xv, splat(7)), r)
    t = builder.call(fma, [u, g, builder.fneg(splat(9))])
    t = builder.call(fma, [builder.fneg(h), splat(10), t])
    store_nt(builder, builder.fmul(r, t), ptr[5])
    builder.store(builder.call(fma, [u, h, pg]), ptr[3], align=align)
    builder.store(builder.fadd(pb, u), ptr[4], align=align)
    return vf, align, fma, g


@intrinsic
def ln_bwd_out(typingctx, x, dy, gamma, sg, sb, dx, j, mu, r, a, b):
    """One 64-byte vector of layer norm's backward at ``j`` (rows ``x``, ``dy``, ``dx``,
    the row's share sums ``sg``, ``sb``): ``h = (x - mu) * r``, ``dx = r * (dy * gamma -
    a - h * b)`` stored non-temporally (``&dx[j]`` 64-byte aligned, ``sfence()``
    afterwards), ``sg += dy * h``, ``sb += dy``; loads at any alignment. Explicit, so
    the row loop can ask for a line of the next row after each vector and stream
    straight out, without a scratch row (``ln_out`` does the forward's)."""
    arrs = (x, dy, gamma, sg, sb, dx)
    if not (all(_is_1d(v) for v in arrs) and x.dtype in (types.float32, types.float64)
            and all(v.dtype == x.dtype for v in arrs) and isinstance(j, types.Integer)
            and all(v == x.dtype for v in (mu, r, a, b))):
        return None
    lanes = 512 // x.dtype.bitwidth

    def codegen(context, builder, sig, args):
        _bwd_out(context, builder, sig, args, lanes)
        return context.get_dummy_value()

    return types.void(x, dy, gamma, sg, sb, dx, j, mu, r, a, b), codegen


def _next_sums(context, builder, sig, args, vf, fma, align, g, k):
    """``acc[:L] += dy1 * g``, ``acc[L:2L] += dy1 * g * ((x1 - mu1) * r1)`` at ``j``,
    with ``x1, dy1, mu1, r1, acc = args[k:k+5]`` and ``j = args[6]``."""
    x1v, u1 = (builder.load(_vec_ptr(context, builder, sig, args, q, 6, vf), align=align)
               for q in (k, k + 1))
    lanes = vf.count
    pa, pb = (_vec_ptr_at(context, builder, sig.args[k + 4], args[k + 4],
                          ir.Constant(ir.IntType(64), off), vf) for off in (0, lanes))
    sa, sb = builder.load(pa, align=64), builder.load(pb, align=64)
    gy = builder.fmul(u1, g)
    h1 = builder.fmul(builder.fsub(x1v, _splat(builder, args[k + 2], vf)),
                      _splat(builder, args[k + 3], vf))
    builder.store(builder.fadd(sa, gy), pa, align=64)
    builder.store(builder.call(fma, [gy, h1, sb]), pb, align=64)


@intrinsic
def ln_row_sums_vec(typingctx, x1, dy1, gamma, mu1, r1, acc, j):
    """A row's two sums for layer norm's backward, one 64-byte vector at ``j`` into the
    lanes of ``acc`` (64-byte aligned, ``2 L`` elements): ``acc[:L] += dy1 * gamma``,
    ``acc[L:] += dy1 * gamma * ((x1 - mu1) * r1)``; ``ln_bwd_out_next`` takes the same
    sums, bit for bit, while it writes the row before."""
    arrs = (x1, dy1, gamma, acc)
    if not (all(_is_1d(v) for v in arrs) and x1.dtype in (types.float32, types.float64)
            and all(v.dtype == x1.dtype for v in arrs) and isinstance(j, types.Integer)
            and all(v == x1.dtype for v in (mu1, r1))):
        return None
    lanes = 512 // x1.dtype.bitwidth

    def codegen(context, builder, sig, args):
        vf, align, fma = _fvec(context, builder, sig, lanes)
        g = builder.load(_vec_ptr(context, builder, sig, args, 2, 6, vf), align=align)
        # the helper reads x1, dy1, mu1, r1, acc at k.. k+4: here args 0, 1, 3, 4, 5
        a = [args[0], args[1], args[3], args[4], args[5], None, args[6]]
        st = [sig.args[0], sig.args[1], sig.args[3], sig.args[4], sig.args[5], None,
              sig.args[6]]
        _next_sums(context, builder, _Sig(st), a, vf, fma, align, g, 0)
        return context.get_dummy_value()

    return types.void(x1, dy1, gamma, mu1, r1, acc, j), codegen


class _Sig:
    """The ``args`` of a signature, rearranged for a shared code generator."""

    def __init__(self, args):
        self.args = args


@intrinsic
def ln_bwd_out_next(typingctx, x, dy, gamma, sg, sb, dx, j, mu, r, a, b, x1, dy1, mu1, r1,
                    acc):
    """``ln_bwd_out`` at ``j``, and the next row's (``x1``, ``dy1``) two sums taken at
    the same ``j`` meanwhile (``ln_row_sums_vec``). The wide backward's second pass over
    a row thus reads the next row from memory while it works from cache, instead of a
    first pass that only waits on memory."""
    arrs = (x, dy, gamma, sg, sb, dx, x1, dy1, acc)
    if not (all(_is_1d(v) for v in arrs) and x.dtype in (types.float32, types.float64)
            and all(v.dtype == x.dtype for v in arrs) and isinstance(j, types.Integer)
            and all(v == x.dtype for v in (mu, r, a, b, mu1, r1))):
        return None
    lanes = 512 // x.dtype.bitwidth

    def codegen(context, builder, sig, args):
        vf, align, fma, g = _bwd_out(context, builder, sig, args, lanes)
        _next_sums(context, builder, sig, args, vf, fma, align, g, 11)
        return context.get_dummy_value()

    return types.void(x, dy, gamma, sg, sb, dx, j, mu, r, a, b, x1, dy1, mu1, r1, acc), codegen


def _vec_ptr_at(context, builder, aryty, ary, idx, vf):
    """A ``vf`` pointer to ``ary[idx]`` (``idx`` an i64 constant)."""
    p = _elem_ptr(context, builder, aryty, ary, idx, types.intp)
    return builder.bitcast(p, vf.as_pointer())


def _reduce_lanes(builder, vecs: list) -> ir.Value:
    """``L`` vectors of ``L`` lanes -> one vector whose lane ``i`` is the sum of
    ``vecs[i]``: pairwise, each step halving the partial sums per row (two two-source
    shuffles and one add per pair, ``L - 1`` pairs in all), instead of ``L`` separate
    horizontal reductions (about ``2 log2 L`` dependent operations each)."""
    lanes = vecs[0].type.count
    width = lanes  # partial lanes per row in each vector
    while len(vecs) > 1:
        half = width // 2
        rows = lanes // width  # rows held per vector at this level
        lo, hi = [], []
        for src in range(2):  # output: the rows of a, then the rows of b
            for r in range(rows):
                base = src * lanes + r * width
                lo += list(range(base, base + half))
                hi += list(range(base + half, base + width))
        mlo = ir.Constant(ir.VectorType(_I32, lanes), lo)
        mhi = ir.Constant(ir.VectorType(_I32, lanes), hi)
        vecs = [builder.fadd(builder.shuffle_vector(a, b, mlo), builder.shuffle_vector(a, b, mhi))
                for a, b in zip(vecs[0::2], vecs[1::2])]
        width = half
    return vecs[0]


@intrinsic
def scan_scores(typingctx, emb, r0, d, qs, nq, qinv, normalized, sc):
    """Cosine scores of ``L`` rows (``L`` = 16 float32 / 8 float64, one 512-bit vector;
    half that without AVX-512, see ``VEC_BITS``)
    from row ``r0`` of the flat ``(n, d)`` embedding ``emb`` against each of the ``nq``
    flat ``(nq, d)`` queries ``qs``: ``sc[q * L + l] = (qs[q] . e) * (qinv[q] * einv)``,
    ``einv = 1 / |e|`` (0 for a zero row, NaN for a NaN row; 1 when ``normalized``).
    ``d`` (>= 1) need not be a multiple of ``L``: the last ``d % L`` elements of each row and
    query are one masked load each (``llvm.masked.load``, the other lanes 0 in both, so
    a NaN in the next row cannot reach a score), which AVX-512 does in one instruction
    (``search.SCAN_MASKED_TAIL``).

    Each row's dot product is accumulated in one vector over its ``d / L`` pieces, and
    the ``L`` vectors are summed across lanes together (``_reduce_lanes``): the scan
    as LLVM vectorised it, one horizontal reduction per row and query, was
    compute-bound at 0.17 ns per element per core (48 GB/s on 2 cores). The rows' norms
    are summed with the first query's dot products, from the same loads (a separate
    norm loop loaded every row twice): one query, 262144 x 64 float32 from memory
    26-30 -> 29-31 GB/s, in cache 1.11x; 16 queries 1.02x.

    The first query's pass reads the rows one after the other, each row's pieces in
    turn, so its loads walk memory in order. Piece by piece across the ``L`` rows (the
    first piece of every row, then the second...), the loads jumped a row's length at a
    time, and from memory the scan took as long as its arithmetic and its reads added
    together: the CPU's prefetchers did not run ahead of that order, and a software
    hint only partly made up for it. The later queries, on rows then in cache, keep the
    piece-by-piece order (more independent multiply-adds at once: row by row they ran
    0.81-0.85x). 262144 x 64 float32 from memory, both cores: one query 1.32-1.47x,
    16 queries 1.14-1.26x; in cache 1.01-1.07x. Rows of up to ``scan_fixed_pieces()``
    whole vectors take straight-line code in that first pass (``rows_in_order``): in
    the L2, one core, 1.2-1.7x."""
    if not (_is_1d(emb) and _is_1d(qs) and _is_1d(qinv) and _is_1d(sc)
            and emb.dtype == qs.dtype == qinv.dtype == sc.dtype
            and emb.dtype in (types.float32, types.float64)
            and all(isinstance(a, types.Integer) for a in (r0, d, nq))
            and isinstance(normalized, types.Boolean)):
        return None
    lanes = VEC_BITS // emb.dtype.bitwidth
    fname = "f32" if emb.dtype == types.float32 else "f64"

    def codegen(context, builder, sig, args):
        ity = types.intp
        embd, qsd, qid, scd = (context.make_array(sig.args[i])(context, builder, args[i]).data
                               for i in (0, 3, 5, 7))
        r0v, dv, nqv = (context.cast(builder, args[i], sig.args[i], ity) for i in (1, 2, 4))
        ft = context.get_value_type(sig.args[0].dtype)
        vf = ir.VectorType(ft, lanes)
        fma = _declare(builder, f"llvm.fma.v{lanes}{fname}", vf, [vf, vf, vf])
        sqrt = _declare(builder, f"llvm.sqrt.v{lanes}{fname}", vf, [vf])
        zero = ir.Constant(vf, [0.0] * lanes)
        L = ir.Constant(_I64, lanes)
        npieces = builder.sdiv(dv, L)
        tail_at = builder.mul(npieces, L)
        rem = builder.sub(dv, tail_at)
        has_tail = builder.icmp_signed(">", rem, ir.Constant(_I64, 0))
        tail_mask = _mask(builder, rem, lanes)
        rows = [builder.mul(builder.add(r0v, ir.Constant(_I64, r)), dv) for r in range(lanes)]

        def vload(base, off):
            return builder.load(builder.bitcast(builder.gep(base, [off]), vf.as_pointer()), align=1)

        def tail_into(qbase, group, with_norms):
            """The last ``d % L`` elements (a masked load; the other lanes 0) of the
            query at ``qbase`` and of each row in ``group``, into their accumulators."""
            def at(base, start):
                return builder.bitcast(builder.gep(base, [builder.add(start, tail_at)]),
                                       vf.as_pointer())

            with builder.if_then(has_tail):
                w = _load(builder, at(qsd, qbase), tail_mask)
                for r in group:
                    fma_into(w, _load(builder, at(embd, rows[r]), tail_mask), r, with_norms)

        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(lanes)]
        naccs = [cgutils.alloca_once_value(builder, zero) for _ in range(lanes)]
        einv = cgutils.alloca_once_value(builder, ir.Constant(vf, [1.0] * lanes))

        def fma_into(w, e, r, with_norms):
            builder.store(builder.call(fma, [w, e, builder.load(accs[r])]), accs[r])
            if with_norms:
                builder.store(builder.call(fma, [e, e, builder.load(naccs[r])]), naccs[r])

        def rows_in_order(qbase, group, with_norms):
            """Row by row, each row's pieces in turn. Up to ``scan_fixed_pieces()`` pieces
            a row, one straight-line block per count (``switch``), the query's pieces
            loaded once for all the rows: the loop LLVM made of it, unrolled by 8, ran
            its remainder loop one piece at a time for ``d = 64`` float32."""
            done = builder.append_basic_block("rows.done")
            looped = builder.append_basic_block("rows.loop")
            sw = builder.switch(npieces, looped)
            for p in range(scan_fixed_pieces() + 1):
                block = builder.append_basic_block(f"rows.{p}")
                sw.add_case(ir.Constant(_I64, p), block)
                builder.position_at_end(block)
                ws = [vload(qsd, builder.add(qbase, ir.Constant(_I64, j * lanes)))
                      for j in range(p)]
                for r in group:
                    for j in range(p):
                        e = vload(embd, builder.add(rows[r], ir.Constant(_I64, j * lanes)))
                        fma_into(ws[j], e, r, with_norms)
                builder.branch(done)
            builder.position_at_end(looped)
            for r in group:
                with cgutils.for_range(builder, npieces) as loop:
                    off = builder.mul(loop.index, L)
                    w = vload(qsd, builder.add(qbase, off))
                    fma_into(w, vload(embd, builder.add(rows[r], off)), r, with_norms)
            builder.branch(done)
            builder.position_at_end(done)
            for r in group:
                tail_into(qbase, [r], with_norms)

        def dot_loop(qidx, with_norms, in_order):
            """``accs[r]`` (lane sums to) ``qs[qidx] . row r``; with ``with_norms`` also
            ``naccs[r]`` to ``|row r|^2``, from the same loads, in groups of rows small
            enough that both sets of accumulators stay in registers. ``in_order``: row by
            row, each row's pieces in turn (the loads walk memory in order: the first
            query's pass, which reads the rows from memory); otherwise piece by piece
            across the rows (independent multiply-adds side by side: the later
            queries', on rows already in cache)."""
            qbase = builder.mul(qidx, dv)
            for acc in accs + (naccs if with_norms else []):
                builder.store(zero, acc)
            half = lanes // 2
            groups = ([range(half), range(half, lanes)] if with_norms
                      and 2 * lanes + 2 > VEC_REGS else [range(lanes)])
            for group in groups:
                if in_order:
                    rows_in_order(qbase, group, with_norms)
                    continue
                with cgutils.for_range(builder, npieces) as loop:
                    off = builder.mul(loop.index, L)
                    w = vload(qsd, builder.add(qbase, off))
                    for r in group:
                        fma_into(w, vload(embd, builder.add(rows[r], off)), r, with_norms)
                tail_into(qbase, group, with_norms)

        def store_score(qidx):
            dot = _reduce_lanes(builder, [builder.load(a) for a in accs])
            qi = _splat(builder, builder.load(builder.gep(qid, [qidx])), vf)
            score = builder.fmul(dot, builder.fmul(qi, builder.load(einv)))
            builder.store(score, builder.bitcast(
                builder.gep(scd, [builder.mul(qidx, L)]), vf.as_pointer()), align=1)

        # the rows' norms come with the first query's dot products, from the same loads
        some = builder.icmp_signed(">", nqv, ir.Constant(_I64, 0))
        q0 = ir.Constant(_I64, 0)
        with builder.if_then(some):
            with builder.if_else(args[6]) as (given, norming):
                with given:
                    dot_loop(q0, False, True)
                with norming:
                    dot_loop(q0, True, True)
                    sq = _reduce_lanes(builder, [builder.load(a) for a in naccs])
                    inv = builder.fdiv(ir.Constant(vf, [1.0] * lanes), builder.call(sqrt, [sq]))
                    nan_or_0 = builder.select(builder.fcmp_unordered("uno", sq, sq), sq, zero)
                    builder.store(builder.select(builder.fcmp_ordered(">", sq, zero), inv,
                                                 nan_or_0), einv)
            store_score(q0)
        start = builder.zext(some, _I64)
        with cgutils.for_range(builder, builder.sub(nqv, start)) as qloop:
            qidx = builder.add(qloop.index, start)
            dot_loop(qidx, False, False)
            store_score(qidx)
        return context.get_dummy_value()

    return types.void(emb, r0, d, qs, nq, qinv, normalized, sc), codegen
