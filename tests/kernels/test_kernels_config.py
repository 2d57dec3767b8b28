"""Config resolution, the configurable cache folder, and a cheap ``import kernels``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernels import config as config_mod
from kernels.config import FASTMATH_FLAGS, KernelConfig, load_config
from kernels.errors import KernelConfigError

REPO = Path(__file__).resolve().parents[2]


def test_load_config_reads_hpcgw_variables(tmp_path):
    cfg = load_config({"HPCGW_NUMBA_CACHE_DIR": str(tmp_path / "c"), "HPCGW_NUMBA_PARALLEL": "0",
                       "HPCGW_NUMBA_FASTMATH": "false", "HPCGW_NUMBA_ROW_HINTS": "1"})
    assert cfg == KernelConfig(cache_dir=str(tmp_path / "c"), parallel=False, fastmath=False,
                               row_hints=True)
    opts = cfg.jit_options(parallel=True)
    assert opts["cache"] is True and opts["parallel"] is False and opts["fastmath"] is False


def test_defaults_keep_nan_semantics():
    cfg = load_config({})
    assert cfg.cache_dir is None and cfg.parallel
    assert "nnan" not in FASTMATH_FLAGS and "ninf" not in FASTMATH_FLAGS
    assert load_config({"NUMBA_CACHE_DIR": "/x"}).cache_dir == "/x"


def test_row_hints_follow_the_variable_and_default_to_intel_zen2_and_zen5_hosts(monkeypatch):
    from kernels import config

    assert load_config({"HPCGW_NUMBA_ROW_HINTS": "1"}).row_hints
    assert not load_config({"HPCGW_NUMBA_ROW_HINTS": "off"}).row_hints
    for vendor, family, on in (("GenuineIntel", 6, True), ("AuthenticAMD", 25, False),
                               ("AuthenticAMD", 26, True), ("AuthenticAMD", 23, True),
                               ("", 23, False), ("", -1, False)):
        monkeypatch.setattr(config, "_cpu_vendor", lambda v=vendor: v)
        monkeypatch.setattr(config, "_cpu_family", lambda f=family: f)
        assert load_config({}).row_hints is on
        assert load_config({"HPCGW_NUMBA_ROW_HINTS": "auto"}).row_hints is on
        # a named target (a portable cache) keeps them off whatever the host
        assert not load_config({"NUMBA_CPU_NAME": "x86-64-v3"}).row_hints
    with pytest.raises(KernelConfigError, match="HPCGW_NUMBA_ROW_HINTS='some'.*auto, 1 or 0"):
        load_config({"HPCGW_NUMBA_ROW_HINTS": "some"})


def test_cpu_vendor_is_read_from_this_host():
    from kernels.config import _cpu_vendor

    with open("/proc/cpuinfo") as f:
        listed = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("vendor_id")]
    assert _cpu_vendor() == listed[0]
    from kernels.config import _cpu_family

    with open("/proc/cpuinfo") as f:
        fams = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("cpu family")]
    assert _cpu_family() == (int(fams[0]) if fams else -1)


def test_bad_boolean_is_refused_with_the_valid_values():
    with pytest.raises(KernelConfigError, match="HPCGW_NUMBA_PARALLEL='maybe'.*0/1/true/false"):
        load_config({"HPCGW_NUMBA_PARALLEL": "maybe"})


def test_import_kernels_does_not_import_numba(run_python):
    out = run_python("import sys, kernels, kernels.config, kernels.errors; "
                  "print('numba' in sys.modules, 'dask' in sys.modules)")
    assert out.split() == ["False", "False"]


def test_cache_dir_is_used_and_second_process_loads_from_it(tmp_path, run_python):
    code = ("import json, numpy as np\nfrom kernels import optim\n"
            "optim.adamw_step(np.ones(3), np.ones(3), np.zeros(3), np.zeros(3), step=1)\n"
            "s = optim._adamw_head.stats\n"
            "print(json.dumps([s.cache_path, sum(s.cache_hits.values()), "
            "sum(s.cache_misses.values())]))")
    cache = tmp_path / "numba cache"  # a space in the path on purpose
    first = json.loads(run_python(code, HPCGW_NUMBA_CACHE_DIR=str(cache)))
    second = json.loads(run_python(code, HPCGW_NUMBA_CACHE_DIR=str(cache)))
    assert first[0].startswith(str(cache / "src-")) and first[1:] == [0, 1]
    assert "-p1f1" in first[0]  # compile flags are part of the folder name
    assert second[1:] == [1, 0]
    assert any(p.suffix == ".nbi" for p in cache.rglob("*"))


# one kernel, one process per argument type: each compiles its signature, then saves it
# with numba's index write slowed by 1 s, all at once (a barrier: the file "go")
_RACER = """
import pathlib, sys, time
import numpy as np
from numba.core import caching
save = caching.IndexDataCacheFile._save_index

def slow(self, overloads):
    time.sleep(1.0)
    save(self, overloads)

caching.IndexDataCacheFile._save_index = slow
folder, module, kind = sys.argv[1:]
sys.path.insert(0, folder)
bump = __import__(module).bump
arg = {"i8": 3, "f8": 0.1, "f4": np.float32(0.1), "c16": 3 + 0j}[kind]
pathlib.Path(folder, f"ready-{module}-{kind}").touch()
deadline = time.monotonic() + 120
while not pathlib.Path(folder, "go").exists() and time.monotonic() < deadline:
    time.sleep(0.01)
bump(arg)
"""
# a fresh process: each type loaded from the cache (or not) and its result
_CHECK = """
import json, sys
import numpy as np
folder, module = sys.argv[1:]
sys.path.insert(0, folder)
bump = __import__(module).bump
for kind, arg in {"i8": 3, "f8": 0.1, "f4": np.float32(0.1), "c16": 3 + 0j}.items():
    r = bump(arg)
    print(json.dumps([kind, sum(bump.stats.cache_hits.values()), repr(r),
                      type(r).__name__]), flush=True)
"""


def _race(folder, module: str, decorator: str) -> list[list]:
    (folder / f"{module}.py").write_text(
        f"import numba\nfrom kernels._jit import jit\n\n\n@{decorator}\n"
        "def bump(x):\n    return x + 1\n")
    env = {**os.environ, "HPCGW_NUMBA_CACHE_DIR": str(folder / "cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    kinds = ("i8", "f8", "f4", "c16")
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(folder), module, k],
                              env=env) for k in kinds]
    deadline = time.monotonic() + 120
    while not all((folder / f"ready-{module}-{k}").exists() for k in kinds):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    (folder / "go").touch()
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    (folder / "go").unlink()
    check = subprocess.run([sys.executable, "-c", _CHECK, str(folder), module], env=env,
                           capture_output=True, text=True, timeout=120, check=False)
    return [json.loads(line) for line in check.stdout.splitlines()]


def test_concurrent_saves_of_one_kernel_keep_every_signature(tmp_path):
    # float32 and float64 jobs starting together on a cold shared cache: numba's own
    # save (read the index, take the first free data-file number, write) loses keys or
    # maps one key to another's code; the project's jit serialises the saves
    # (kernels._jit._LockedFunctionCache), so every signature is kept, each with its code
    want = [["i8", 1, "4", "int"], ["f8", 2, "1.1", "float"],  # (1 + a float32: float64)
            ["f4", 3, "1.1000000014901161", "float"], ["c16", 4, "(4+0j)", "complex"]]
    plain = _race(tmp_path, "plain", "numba.njit(cache=True)")
    assert plain != want, "the race did not happen: the check below proves nothing"
    assert _race(tmp_path, "locked", "jit()") == want


def test_a_child_process_uses_its_parents_cache_folder(run_python):
    # kernels._jit exports the folder it resolved as NUMBA_CACHE_DIR (numba reads that);
    # a child (an MPI rank, a warm-up worker, a job) took it for a configured base and
    # cached in a sub-folder of it, never loading what its parent compiled. The child
    # here also runs without the HPCGW_* variables, as the gateway's test harness and
    # any tool that isolates its own settings start processes
    import kernels._jit as jit_mod

    child = ("import json\nimport numpy as np\nfrom kernels import optim\n"
             "from kernels._jit import CACHE_DIR\na = np.ones(3)\n"
             "optim.adamw_step(a, a, a * 0, a * 0, step=1)\ns = optim._adamw_head.stats\n"
             "print(json.dumps([CACHE_DIR, sum(s.cache_hits.values()), "
             "sum(s.cache_misses.values())]), flush=True)\n")
    parent = child + ("import os, subprocess, sys\n"
                      "env = {k: v for k, v in os.environ.items() if not k.startswith('HPCGW_')}\n"
                      f"subprocess.run([sys.executable, '-c', {child!r}], env=env)\n")
    lines = [json.loads(line) for line in run_python(parent).splitlines()]
    assert [line[0] for line in lines] == [jit_mod.CACHE_DIR] * 2
    assert sum(lines[0][1:]) == 1 and lines[1][1:] == [1, 0]  # the child loads, no compile
    # a user's NUMBA_CACHE_DIR is a base; one of kernels._jit's folders stands for its base
    assert load_config({"NUMBA_CACHE_DIR": "/x"}).cache_dir == "/x"
    own = "/x/src-0123456789abcdef-p1f1h0"
    assert load_config({"NUMBA_CACHE_DIR": own}).cache_dir == "/x"
    assert load_config({"NUMBA_CACHE_DIR": own + "/"}).cache_dir == "/x"
    assert load_config({"NUMBA_CACHE_DIR": "/x/src-mine"}).cache_dir == "/x/src-mine"
    assert load_config({"NUMBA_CACHE_DIR": own, "HPCGW_NUMBA_CACHE_DIR": "/y"}).cache_dir == "/y"
    assert config_mod.OWN_FOLDER.match(os.path.basename(jit_mod.CACHE_DIR))


def test_prefetch_hints_can_be_compiled_out_for_the_benchmark(monkeypatch):
    # bench_prefetch.py compares kernels with and without their hints; if the switch did
    # nothing it would compare a kernel with itself and report that no hint matters
    import numba
    import numpy as np

    from kernels import _prefetch

    def summed(a):
        s = 0.0
        for i in range(a.size):
            _prefetch.prefetch(a, min(i + 64, a.size - 1))
            s += a[i]
        return s

    a = np.arange(100.0)
    ir = {}
    for on in (True, False):
        monkeypatch.setattr(_prefetch, "ENABLED", on)
        f = numba.njit(cache=False)(summed)
        assert f(a) == a.sum()  # compiled now, with the flag as set
        ir[on] = "".join(f.inspect_llvm().values())
    assert "llvm.prefetch" in ir[True] and "llvm.prefetch" not in ir[False]


@pytest.mark.parametrize("kernel", ["quant._quantize", "search._topk_vec",
                                    "nn._softmax_xent_short", "nn._softmax_xent"])
def test_row_hints_are_issued_only_where_the_host_setting_is_on(monkeypatch, kernel):
    # the host-dependent hints (kernels._prefetch.ROW_HINTS): int8 quantisation asks for
    # the next row during its second pass over a row, the vector search scan 8 KiB ahead,
    # softmax's rows held in registers 4 KiB ahead, its row loops the next row
    import importlib

    import numpy as np

    from kernels import _jit, _prefetch, nn, quant, search
    from kernels._jit import fresh_copy

    modname, name = kernel.split(".")
    mod = importlib.import_module(f"kernels.{modname}")
    # scan_scores is generic LLVM vector code: the vector scan runs on any host
    monkeypatch.setattr(search, "VEC_SCAN", True)
    monkeypatch.setattr(search, "SCAN_HINT_MIN_BYTES", 0)  # the hinted branch runs too
    monkeypatch.setattr(_jit, "SERIAL_TWINS", False)  # 8 rows: the kernel, not its twin
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 256)).astype(np.float32)
    q = rng.standard_normal((1, 256)).astype(np.float32)
    short, labels = np.ascontiguousarray(w[:, :100]), rng.integers(0, 100, 8)
    # (AVX2 or AVX-512: a row of 100 classes is held in registers)
    assert nn.VEC_SHORT or name != "_softmax_xent_short"
    run = {"_quantize": lambda: quant.quantize_int8(w),
           "_topk_vec": lambda: search.topk_cosine(q, w, 3),
           "_softmax_xent_short": lambda: nn.softmax_cross_entropy(short, labels),
           "_softmax_xent": lambda: nn.softmax_cross_entropy(w, labels)}[name]
    want = run()
    orig = getattr(mod, name)
    chunk = getattr(mod, f"{name}_chunk", None)  # where the scan's loop is (not inlined)
    ir = {}
    for on in (True, False):
        monkeypatch.setattr(_prefetch, "ROW_HINTS", on)
        if chunk is not None:  # compiled afresh too, so the kernel links this one
            monkeypatch.setattr(mod, f"{name}_chunk", fresh_copy(chunk))
        f = fresh_copy(orig)
        monkeypatch.setattr(mod, name, f)
        got = run()  # compiled now, with the flag as set
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        ir[on] = "".join(f.inspect_llvm().values())
    calls = {on: ir[on].count("call void @llvm.prefetch") for on in ir}
    # the search scan also holds the float64 matrices' hint, there on every host
    # (search.SCAN_HINT_ALWAYS); quantisation and softmax have no other
    assert calls[True] > calls[False] > 0 if name == "_topk_vec" else calls[False] == 0
    assert calls[True] > 0


def test_num_threads_follows_numba_per_thread():
    # kernels._jit.num_threads reads numba's thread-local count directly once the pool
    # is up; it must still follow set_num_threads, and another thread keeps its own
    import threading

    import numba

    from kernels._jit import num_threads

    default = numba.config.NUMBA_NUM_THREADS
    assert num_threads() == numba.get_num_threads() == default
    numba.set_num_threads(1)
    try:
        assert num_threads() == 1
        seen: list[int] = []
        t = threading.Thread(target=lambda: seen.append(num_threads()))
        t.start()
        t.join()
        assert seen == [default]
    finally:
        numba.set_num_threads(default)
    assert num_threads() == default


def test_warmup_compiles_the_parallel_kernels_and_their_serial_twins(run_python):
    # the warm-up's calls are small, so layer norm runs its kernels' serial twins
    # (kernels._jit.serial_twin); an image whose cache held only those would compile the
    # parallel kernels at a job's first large call. In a fresh process (the suite's cache
    # folder), each kernel the warm-up reached must be reached both ways, for each dtype.
    # It runs as `--jobs 2` does: two worker processes compile, then this process loads
    # every kernel, and must compile none itself (so the workers left the cache whole; a
    # worker that failed would be a warning, made an error here)
    code = ("import json, sys, warnings\nfrom kernels import nn, warmup\n"
            "warnings.filterwarnings('error', message='a warm-up worker')\n"
            "warmup.warm_all(jobs=2)\n"
            "stats = [v.stats for m, mod in list(sys.modules.items()) if m.startswith('kernels')"
            " for v in vars(mod).values() if hasattr(getattr(v, 'stats', None), 'cache_hits')]\n"
            "print(json.dumps([sum(sum(s.cache_hits.values()) for s in stats), "
            "sum(sum(s.cache_misses.values()) for s in stats)]))\n"
            "print(json.dumps([[k[:-2], [str(s) for s in getattr(nn, k[:-2]).signatures], "
            "[str(s) for s in v.signatures]] for k, v in vars(nn).items() "
            "if k.endswith('_1') and hasattr(v, 'py_func')]))")
    counts, pairs = map(json.loads, run_python(code).splitlines())
    assert counts[1] == 0 and counts[0] >= 60, counts  # (hits, misses) of the loading pass
    assert len(pairs) >= 9
    reached = [p for p in pairs if p[1] or p[2]]
    assert len(reached) >= 4  # rows, one pass, wide rows, row loops at least
    for name, kernel, twin in reached:
        for dt in ("float32", "float64"):
            assert any(dt in s for s in kernel) == any(dt in s for s in twin), (name, dt)


def test_a_warmup_worker_that_fails_is_a_warning_and_its_kernels_compile_here(monkeypatch):
    import numpy as np

    from kernels import optim, warmup

    calls = []
    x = np.ones(4)
    monkeypatch.setattr(warmup, "_calls", lambda dt: {  # one cheap kernel
        "adamw_step": lambda: calls.append(optim.adamw_step(x.copy(), x, x * 0, x * 0, step=1))})
    monkeypatch.setattr(warmup.sys, "executable", "/bin/false")  # workers exit 1 at once
    with pytest.warns(UserWarning, match="a warm-up worker exited 1") as caught:
        times = warmup.warm_all(jobs=2)
    assert len([w for w in caught if "warm-up worker" in str(w.message)]) == 2
    assert set(times) == {"import numba", "adamw_step[float32]", "adamw_step[float64]"}
    assert len(calls) == 4  # each dtype both ways, in this process


def test_warmup_workers_split_the_kernels_between_them(tmp_path, run_python):
    # two workers on one claim folder (as --jobs 2 starts them): each kernel is compiled
    # by exactly one of them (a claim file per kernel, created exclusively)
    code = ("import json\nfrom kernels import warmup\n"
            "warmup._warm = lambda name: {name: 0.0}\n"  # the claims only, no compiling
            f"print(json.dumps(sorted(warmup._warm_claimed({str(tmp_path)!r}))))")
    first, second = json.loads(run_python(code)), json.loads(run_python(code))
    from kernels import warmup

    assert first == sorted(warmup._order()) and second == []
    assert warmup._order()[:len(warmup.FIRST)] == list(warmup.FIRST)
    with pytest.raises(SystemExit):
        warmup.main(["--jobs", "0"])


_POOL = ("import json, numba, kernels.nn\n"
         "print(json.dumps([numba.config.NUMBA_NUM_THREADS, numba.get_num_threads()]))\n")


def test_numbas_pool_follows_omp_num_threads_unless_numba_num_threads_is_set(run_python):
    """Dask's nanny starts workers with ``OMP_NUM_THREADS=1``; numba reads only its own
    variable, so without this each task's kernel took every core (docs/kernels.md,
    "Dask"). The kernel modules import numba before ``kernels._jit`` runs: the config
    is set on numba too, before its pool starts."""
    from kernels.config import threads_from_omp

    assert json.loads(run_python(_POOL, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS=None)) == [1, 1]
    assert json.loads(run_python(_POOL, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="2")) == [2, 2]
    default = json.loads(run_python(_POOL, OMP_NUM_THREADS=None, NUMBA_NUM_THREADS=None))
    assert json.loads(run_python(_POOL, OMP_NUM_THREADS="4,2", NUMBA_NUM_THREADS=None)) == default
    assert threads_from_omp({"OMP_NUM_THREADS": "3"}) == "3"
    assert threads_from_omp({"OMP_NUM_THREADS": "3", "NUMBA_NUM_THREADS": "2"}) is None
    for odd in ("0", "-1", "4,2", "two", ""):
        assert threads_from_omp({"OMP_NUM_THREADS": odd}) is None

