"""kernels.memory: freed blocks kept for the next large array (glibc's mallopt).

The settings are process-wide, so every check that applies them runs in a fresh
interpreter (``run_python``) and reports what it saw as JSON: page faults counted by the
kernel (``ru_minflt``), the resident size, where blocks landed."""

from __future__ import annotations

import json

import pytest

from kernels import memory
from kernels.config import load_config
from kernels.errors import KernelConfigError

# A child that frees a block of ``mib`` MiB and allocates and writes one again (in the main
# thread, or in a thread started after the settings), reporting the page faults the second
# one took. 64 MiB and up are above glibc's largest dynamic mmap threshold (32 MiB), so by
# default each block is a fresh mapping whose pages fault in as they are written.
_REFILL = """
import json, resource, sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from kernels import memory
mode, mib, where = sys.argv[1], int(sys.argv[2]), sys.argv[3]
applied = None
if mode != "default":
    applied = memory.keep_freed_memory(one_arena=(mode == "keep"))
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def refill():
    a = np.ones(mib << 17)
    del a
    before = faults()
    b = np.ones(mib << 17)
    return faults() - before, float(b[-1])
if where == "thread":
    with ThreadPoolExecutor(1) as pool:
        took, last = pool.submit(refill).result()
else:
    took, last = refill()
print(json.dumps({"applied": applied, "faults": took, "last": last,
                  "keeping": memory.keeping()}))
"""


def _refill(run_python, mode: str, mib: int, where: str = "main", **env: str) -> dict:
    """Run ``_REFILL``: ``mode`` "default", "keep" (one arena) or "keep-no-arena"."""
    code = "import sys; sys.argv = ['x', %r, %r, %r]\n" % (mode, str(mib), where) + _REFILL
    return json.loads(run_python(code, **env).strip().splitlines()[-1])


@pytest.mark.parametrize("where", ["main", "thread"])
def test_a_freed_large_block_is_reused_without_page_faults(run_python, where):
    default = _refill(run_python, "default", 128, where)
    kept = _refill(run_python, "keep", 128, where)
    assert default["applied"] is None and not default["keeping"]
    assert kept["applied"] is True and kept["keeping"]
    assert default["last"] == kept["last"] == 1.0
    # by default the second 128 MiB block faults in again (64 huge pages, or 32768 small
    # ones); kept, it lands on the pages the first one left
    assert default["faults"] >= 48, default
    assert kept["faults"] * 8 <= default["faults"], (kept, default)


def test_without_one_arena_a_thread_still_maps_blocks_over_64_mib(run_python):
    """A thread's own arena cannot hold a block over 64 MiB: glibc maps it even with the
    main heap's limit lifted, which is what ``one_arena`` is for."""
    main = _refill(run_python, "keep-no-arena", 128, "main")
    thread = _refill(run_python, "keep-no-arena", 128, "thread")
    assert main["faults"] * 8 <= thread["faults"], (main, thread)


def test_a_process_started_with_the_tunables_keeps_from_its_start(run_python):
    """``worker_environ()`` (``GLIBC_TUNABLES``): glibc applies it before any thread, so
    a thread pool that existed before the kernels were imported keeps blocks too."""
    tunables = memory.glibc_tunables(512 << 20)
    assert tunables == ("glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:"
                        "glibc.malloc.trim_threshold=536870912")
    environ = memory.worker_environ(512 << 20)
    assert environ == {"GLIBC_TUNABLES": tunables, "MALLOC_TRIM_THRESHOLD_": "536870912"}
    started = _refill(run_python, "default", 128, "thread", **environ)
    default = _refill(run_python, "default", 128, "thread")
    assert started["keeping"] and not default["keeping"]
    assert started["faults"] * 8 <= default["faults"], (started, default)


_RSS = """
import json
import numpy as np
from kernels import memory
memory.keep_freed_memory(keep_bytes=KEEP)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 >> 20
base = rss()
a = np.ones(256 << 17)  # 256 MiB
held = rss() - base
del a
after_free = rss() - base
released = memory.release_freed_memory()
print(json.dumps({"held": held, "after_free": after_free, "after_release": rss() - base,
                  "released": released}))
"""


def test_freed_memory_stays_until_released(run_python):
    kept = json.loads(run_python(_RSS.replace("KEEP", "None")))
    assert kept["held"] >= 250
    assert kept["after_free"] >= 250, kept  # kept for the next array
    assert kept["released"] and kept["after_release"] <= 16, kept


def test_keep_bytes_bounds_what_is_kept(run_python):
    none_kept = json.loads(run_python(_RSS.replace("KEEP", "0")))
    assert none_kept["held"] >= 250
    assert none_kept["after_free"] <= 16, none_kept  # past keep_bytes: back to the OS


def test_the_variable_applies_it_when_the_first_kernel_module_loads(run_python):
    code = ("import json\nfrom kernels import memory\nbefore = memory.keeping()\n"
            "import kernels.nn\nprint(json.dumps([before, memory.keeping()]))\n")
    assert json.loads(run_python(code, HPCGW_KEEP_FREED_MEMORY="1")) == [False, True]
    assert json.loads(run_python(code, HPCGW_KEEP_FREED_MEMORY="0")) == [False, False]
    assert json.loads(run_python(code)) == [False, False]
    with pytest.raises(KernelConfigError, match="HPCGW_KEEP_FREED_MEMORY='sometimes'.*0/1"):
        load_config({"HPCGW_KEEP_FREED_MEMORY": "sometimes"})
    assert load_config({"HPCGW_KEEP_FREED_MEMORY": "yes"}).keep_freed_memory


_STREAMED = """
import json
import numpy as np
from kernels import _simd, memory
from kernels.activations import gelu
_simd.NT_FRESH = False  # as on the Intel hosts: fresh outputs written through the cache
shape = (2048, _simd.NT_MIN_BYTES // 8 // 2048)  # the smallest streamed output
out = np.empty(shape)
before = _simd.stream_out(out, fresh=True), _simd.stream_out(out, fresh=False)
memory.keep_freed_memory()
after = _simd.stream_out(out, fresh=True)
x = np.random.default_rng(3).standard_normal(shape)
ys = [gelu(x) for _ in range(3)]  # the later ones on freed, kept blocks, streamed
ref = np.empty_like(x)
gelu(x, out=ref)
print(json.dumps({"before": before, "after": after, "nt": _simd.NT_STORES,
                  "same": all(np.array_equal(y, ref) for y in ys)}))
"""


def test_kept_memory_makes_fresh_outputs_stream_like_out(run_python):
    """A kept block is mapped but not in cache, like a caller's ``out=``: so a kernel's
    own output is streamed then where a first-touch output is not, with the same
    values."""
    got = json.loads(run_python(_STREAMED))
    assert got["same"]
    # off x86-64 there are no non-temporal stores: nothing is streamed, kept or not
    assert got["before"] == [False, got["nt"]]
    assert got["after"] is got["nt"]


def test_bad_keep_bytes_is_refused_before_anything_changes(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_glibc", lambda: calls.append(1))
    for bad in (-1, 1.5, True, "1G"):
        with pytest.raises(ValueError, match="keep_bytes must be a whole number"):
            memory.keep_freed_memory(bad)
        with pytest.raises(ValueError, match="keep_bytes must be a whole number"):
            memory.glibc_tunables(bad)
    assert calls == []


def test_elsewhere_than_glibc_nothing_is_done(monkeypatch):
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    assert memory.keep_freed_memory() is False
    assert memory.keep_heap_blocks() is False
    assert memory.release_freed_memory() is False
    assert memory.keeping() is False


def test_default_keep_bytes_is_an_eighth_of_memory_within_bounds():
    keep = memory.default_keep_bytes()
    assert 256 << 20 <= keep <= 2**31 - 1


# A training step's pattern: six 1 MiB arrays made and dropped, step after step. Once the
# first step's freed blocks have raised glibc's thresholds to 1 MiB they come from the heap,
# but the 6 MiB freed at its top are over twice that and go back to the OS, so by default
# every later step faults all 1536 pages in again.
_STEPS = """
import json, resource
import numpy as np
import kernels.nn
from kernels import memory
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    a = [np.ones(1 << 17) for _ in range(6)]; del a
before = faults()
for _ in range(10):
    a = [np.ones(1 << 17) for _ in range(6)]; del a
print(json.dumps({"faults": faults() - before, "set": memory.malloc_set_by_environ()}))
"""
_NO_MALLOC_ENV = {name: None for name in (*memory._MALLOC_VARS, "GLIBC_TUNABLES")}


def test_by_default_a_steps_freed_blocks_are_kept_for_the_next(run_python):
    kept = json.loads(run_python(_STEPS, **_NO_MALLOC_ENV))
    off = json.loads(run_python(_STEPS, **_NO_MALLOC_ENV, HPCGW_KEEP_FREED_MEMORY="0"))
    assert not kept["set"] and not off["set"]
    assert kept["faults"] < 100, kept  # all ten steps on kept heap blocks
    assert off["faults"] > 10 * 6 * 256 // 2, off  # glibc's defaults: pages fault in again


@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "65536"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=65536"}])
def test_malloc_settings_from_the_environment_are_left_alone(run_python, env):
    """Dask's nanny starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536`` so that freed
    memory goes back at once: the kernels do not undo a launcher's choice."""
    got = json.loads(run_python(_STEPS, **{**_NO_MALLOC_ENV, **env}))
    assert got["set"]
    assert got["faults"] > 10 * 6 * 256 // 2, got


def test_malloc_set_by_environ_reads_glibcs_variables():
    assert not memory.malloc_set_by_environ({})
    assert not memory.malloc_set_by_environ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"})
    assert memory.malloc_set_by_environ({"MALLOC_ARENA_MAX": "2"})
    assert memory.malloc_set_by_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"})
    assert not load_config({}).keep_freed_memory and load_config({}).keep_heap_blocks
    assert not load_config({"HPCGW_KEEP_FREED_MEMORY": "0"}).keep_heap_blocks
