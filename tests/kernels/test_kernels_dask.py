"""k-means and search on dask arrays, on a LocalCluster, against the in-memory kernels."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kernels import cluster, search
from kernels.errors import KernelInputError

da = pytest.importorskip("dask.array", reason='needs pip install "dask[array,distributed]"')
distributed = pytest.importorskip("distributed")
kd = pytest.importorskip("kernels.dask")
dask = pytest.importorskip("dask")


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as lc, distributed.Client(lc) as c:
        yield c


@pytest.fixture
def blobs(rng):
    centers = 5 * rng.standard_normal((4, 6))
    return centers[rng.integers(0, 4, 3000)] + rng.standard_normal((3000, 6))


def _record_rows(monkeypatch, module, name, block_arg=0):
    """Wrap ``module.name`` so that each call records how many rows its block (positional
    argument ``block_arg``) has; returns the record and the real function."""
    real, calls = getattr(module, name), []

    def spy(*args, **kwargs):
        calls.append(args[block_arg].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls, real


def test_assign_and_step_match_in_memory(client, blobs, dtype):
    x = blobs.astype(dtype)
    X = da.from_array(x, chunks=(700, 3))  # column chunks are merged by the wrapper
    c = x[:4].copy()
    labels, dist = kd.kmeans_assign(X, c)
    rl, rd = cluster.kmeans_assign(x, c)
    np.testing.assert_array_equal(labels.compute(), rl)
    np.testing.assert_allclose(dist.compute(), rd, rtol=1e-6)
    new, counts, inertia = kd.kmeans_step(X, c)
    rc, rcnt = cluster.kmeans_update(x, rl, 4, previous=c)
    np.testing.assert_allclose(new, rc, rtol=1e-5 if dtype == np.float32 else 1e-12)
    np.testing.assert_array_equal(counts, rcnt)
    assert inertia == pytest.approx(float(rd.astype(np.float64).sum()), rel=1e-6)


def test_assign_runs_the_kernel_once_per_block_for_labels_and_distances(client, blobs,
                                                                       monkeypatch, dtype):
    x = blobs.astype(dtype)
    x[17] = np.nan  # a NaN row: label -1, distance NaN, through the float64 block
    X = da.from_array(x, chunks=(700, 6))  # 5 blocks
    c = x[:4].copy()
    calls, real = _record_rows(monkeypatch, cluster, "kmeans_assign")
    labels, dist = kd.kmeans_assign(X, c)
    labels, dist = dask.compute(labels, dist)
    assert sorted(calls) == sorted(X.chunks[0])  # once per block, not once per output
    rl, rd = real(x, c)
    assert labels.dtype == np.int64 and dist.dtype == dtype
    np.testing.assert_array_equal(labels, rl)
    np.testing.assert_array_equal(dist, rd)  # exact: the float64 block holds both dtypes
    assert labels[17] == -1 and np.isnan(dist[17])


def test_step_sums_the_same_gathered_or_on_the_cluster(client, blobs, monkeypatch):
    """Partials gathered to the caller (small) or summed by a dask reduction (large):
    the same centroids, counts and inertia, and each block's kernel runs once, with no
    trial call on an empty block to infer the output's type."""
    X = da.from_array(blobs, chunks=(400, 6))  # 8 blocks
    c = blobs[:4].copy()
    calls, _ = _record_rows(monkeypatch, cluster, "_assign_sums")
    gathered = kd.kmeans_step(X, c)
    monkeypatch.setattr(kd, "GATHER_MAX_BYTES", 0)  # every size: the dask reduction
    reduced = kd.kmeans_step(X, c)
    assert sorted(calls) == sorted(X.chunks[0] * 2)  # no 0-row call
    np.testing.assert_allclose(gathered[0], reduced[0], rtol=1e-13)
    np.testing.assert_array_equal(gathered[1], reduced[1])
    assert gathered[2] == pytest.approx(reduced[2], rel=1e-13)
    rl, rd = cluster.kmeans_assign(blobs, c)
    rc, rcnt = cluster.kmeans_update(blobs, rl, 4, previous=c)
    np.testing.assert_allclose(gathered[0], rc, rtol=1e-12)
    np.testing.assert_array_equal(gathered[1], rcnt)


def test_step_with_many_centroids_sums_each_block_on_its_tiles(client, rng, monkeypatch):
    # 256 centroids: each block's step goes through a tile copy of its rows
    # (KMeansTiles.step, as kmeans_assign does there), not the GEMM path; the same
    # centroids, counts and inertia as the in-memory kernels, a NaN row left out
    x = rng.standard_normal((3000, 6))
    x[1234] = np.nan
    c = x[:256].copy()
    X = da.from_array(x, chunks=(1500, 6))
    tiles, _ = _record_rows(monkeypatch, cluster.KMeansTiles, "step", block_arg=1)
    gemm, _ = _record_rows(monkeypatch, cluster, "_assign_sums")
    real = cluster.KMeansTiles.__init__
    rows: list[int] = []
    monkeypatch.setattr(cluster.KMeansTiles, "__init__",
                        lambda self, b: rows.append(b.shape[0]) or real(self, b))
    new, counts, inertia = kd.kmeans_step(X, c)
    assert sorted(rows) == [1500, 1500] and len(tiles) == 2 and gemm == []
    labels, dist = cluster.kmeans_assign(x, c)
    ref, ref_counts = cluster.kmeans_update(x, labels, 256, previous=c)
    np.testing.assert_allclose(new, ref, rtol=1e-12)
    np.testing.assert_array_equal(counts, ref_counts)
    assert inertia == pytest.approx(float(np.nansum(dist)), rel=1e-12)


def test_kmeans_converges_like_in_memory(client, blobs):
    X = da.from_array(blobs, chunks=(1000, 6))
    cents, inertia, n_iter = kd.kmeans(X, blobs[:4], max_iter=30, tol=1e-12)
    ref, _, ref_inertia, _ = cluster.kmeans(blobs, blobs[:4], max_iter=30)
    np.testing.assert_allclose(cents, ref, rtol=1e-8)
    assert inertia == pytest.approx(ref_inertia, rel=1e-8)
    assert n_iter < 30


def test_search_matches_in_memory_with_uneven_blocks(client, rng, dtype, monkeypatch):
    e = rng.standard_normal((2500, 8)).astype(dtype)
    q = rng.standard_normal((3, 8)).astype(dtype)
    E = da.from_array(e, chunks=((900, 3, 1597), (8,)))  # a block smaller than k
    calls, _ = _record_rows(monkeypatch, search, "topk_cosine", block_arg=1)
    s, i = kd.topk_cosine(q, E, 6)
    monkeypatch.undo()
    assert sorted(calls) == [3, 900, 1597]  # one call per block, no trial on an empty one
    rs, ri = search.topk_cosine(q, e, 6)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(s, rs, rtol=1e-6)


def test_rows_picked_by_a_mask_unknown_chunk_sizes(client, rng):
    """After ``x[mask]`` dask does not know how many rows each block holds (one block
    here keeps none): search and k-means still number rows as the in-memory kernels do
    on the picked rows (the search had taken its offsets from the chunk sizes: NaN)."""
    e = rng.standard_normal((1200, 8)).astype(np.float32)
    e[300:600, 0] = -1.0  # the second block loses every row to the mask
    E = da.from_array(e, chunks=(300, 8))
    keep = e[:, 0] > 0
    F = E[E[:, 0] > 0]
    assert np.isnan(F.shape[0])
    q = rng.standard_normal((3, 8)).astype(np.float32)
    s, i = kd.topk_cosine(q, F, 7)
    rs, ri = search.topk_cosine(q, e[keep], 7)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(s, rs, rtol=1e-6)
    c = e[keep][:3].copy()
    labels, dist = dask.compute(*kd.kmeans_assign(F, c))
    rl, rd = cluster.kmeans_assign(e[keep], c)
    np.testing.assert_array_equal(labels, rl)
    new, counts, _ = kd.kmeans_step(F, c)
    rc, rcnt = cluster.kmeans_update(e[keep], rl, 3, previous=c)
    np.testing.assert_allclose(new, rc, rtol=1e-5)
    np.testing.assert_array_equal(counts, rcnt)


def test_dask_wrappers_refuse_numpy_input():
    with pytest.raises(KernelInputError, match="dask array"):
        kd.kmeans_assign(np.zeros((3, 2)), np.zeros((1, 2)))


def test_bad_arguments_are_refused_at_the_call_not_in_the_blocks(monkeypatch):
    """Checked in the caller, before any graph runs (the blocks' kernels would raise too,
    but later, from a worker, and once per block), each error naming the argument."""
    X = da.from_array(np.random.default_rng(0).random((90, 4)), chunks=(30, 4))
    ints = da.from_array(np.arange(360).reshape(90, 4), chunks=(30, 4))
    monkeypatch.setattr(cluster, "_assign_sums", None)  # nothing may run a block
    monkeypatch.setattr(cluster, "kmeans_assign", None)
    monkeypatch.setattr(search, "topk_cosine", None)
    for bad in (np.zeros((3, 5)), np.zeros(4), np.zeros((0, 4)), [["a"] * 4]):
        with pytest.raises(KernelInputError, match=r"^centroids (must|is empty)"):
            kd.kmeans_assign(X, bad)
        with pytest.raises(KernelInputError, match=r"^centroids (must|is empty)"):
            kd.kmeans_step(X, bad)
    with pytest.raises(KernelInputError, match="max_iter must be a positive integer"):
        kd.kmeans(X, np.zeros((2, 4)), max_iter=0)
    for call in (lambda: kd.kmeans_assign(ints, np.zeros((2, 4))),
                 lambda: kd.kmeans(ints, np.zeros((2, 4)))):
        with pytest.raises(KernelInputError, match="x has dtype int64"):
            call()
    with pytest.raises(KernelInputError, match="embeddings has dtype int64"):
        kd.topk_cosine(np.zeros((1, 4)), ints, 3)



def _in_a_worker_process(fn, config):
    """``fn()`` run once in the worker process of a one-worker ``LocalCluster`` started
    under the dask ``config`` (the nanny's pre-spawn environment, say)."""
    saved = dict(os.environ)  # the nanny puts its pre-spawn variables in ours
    try:
        with dask.config.set(config), distributed.LocalCluster(
                n_workers=1, threads_per_worker=1, processes=True,
                dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
            return client.submit(fn, pure=False).result(timeout=120)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_dask_workers_keep_freed_memory_with_worker_environ():
    """``kernels.memory.worker_environ()`` through the nanny's pre-spawn environment: the
    worker process (its threads started before any task) reuses a freed 128 MiB block
    without faulting it in again; a default worker faults it in."""
    from kernels.memory import worker_environ

    def refill(mib=128):  # local, so it is pickled by value for the worker process
        import resource

        import numpy

        from kernels import memory

        a = numpy.ones(mib << 17)
        del a
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        b = numpy.ones(mib << 17)
        took = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        return took, float(b[-1]), memory.keeping()

    # small pages in both workers: NumPy asks for huge pages on large blocks, and where
    # the host has them free the default worker faults 64 (CI once counted 65), no more
    # than a worker's own threads fault meanwhile (44 in the kept one that run)
    small = {"distributed.nanny.pre-spawn-environ.NUMPY_MADVISE_HUGEPAGE": "0"}
    default = _in_a_worker_process(refill, small)
    kept = _in_a_worker_process(refill, {**small, **{
        f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in worker_environ().items()}})
    assert kept[1] == default[1] == 1.0
    assert kept[2] and not default[2]
    assert default[0] >= 32768, default  # 128 MiB in 4 KiB pages
    assert kept[0] * 8 <= default[0], (kept, default)


def test_a_dask_workers_kernels_keep_to_its_omp_num_threads():
    """The nanny starts each worker process with ``OMP_NUM_THREADS=1`` (Dask's own policy:
    one library thread per task thread); the kernels' pool there is one thread, unless
    the worker's environment says ``NUMBA_NUM_THREADS``. Measured on the default
    ``LocalCluster()`` here: k-means 1.55x, search 1.36x (docs/kernels.md, "Dask")."""

    def pool():  # local, so it is pickled by value for the worker process
        import numba

        import kernels.nn  # noqa: F401

        return numba.config.NUMBA_NUM_THREADS, numba.get_num_threads()

    assert _in_a_worker_process(pool, {}) == (1, 1)
    assert _in_a_worker_process(
        pool, {"distributed.nanny.pre-spawn-environ.NUMBA_NUM_THREADS": "2"}) == (2, 2)

