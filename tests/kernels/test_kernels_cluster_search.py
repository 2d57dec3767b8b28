"""k-means assignment/update and top-k cosine search against NumPy references."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from kernels import cluster, search
from kernels.errors import KernelDtypeError, KernelInputError


def ref_sq_dists(x, c):
    x, c = x.astype(np.float64), c.astype(np.float64)
    return ((x[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)


@pytest.mark.parametrize("k", [1, 4, 7])  # 7: the four-at-a-time loop plus a remainder
def test_assign_picks_a_nearest_centroid(k, dtype, rng):
    x = rng.standard_normal((500, 11)).astype(dtype)
    c = rng.standard_normal((k, 11)).astype(dtype)
    labels, dist = cluster.kmeans_assign(x, c)
    d = ref_sq_dists(x, c)
    # f32 near-ties may pick either centroid: the chosen one must be (nearly) the closest
    slack = 1e-4 if dtype == np.float32 else 1e-10
    assert np.all(d[np.arange(500), labels] <= d.min(axis=1) + slack)
    assert (labels == d.argmin(axis=1)).mean() > 0.99
    np.testing.assert_allclose(dist, d.min(axis=1), rtol=slack, atol=slack)


def test_assign_ties_nan_and_empty():
    c = np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    x = np.array([[0.0, 0.0], [np.nan, 0.0], [1.0, 0.1]])
    labels, dist = cluster.kmeans_assign(x, c)
    assert labels.tolist() == [0, -1, 0]  # tie -> lowest index; NaN row -> -1
    assert np.isnan(dist[1])
    labels, dist = cluster.kmeans_assign(np.zeros((0, 2)), c)
    assert labels.shape == (0,) and dist.shape == (0,)


@pytest.mark.parametrize("n,d,k,tiles", [(3000, 2, 16, True), (200, 2, 300, True),
                                         (1000, 16, 64, True), (200, 64, 257, True),
                                         (1000, 2, 16, False), (1000, 20, 64, False)])
def test_assign_takes_the_tiles_where_their_copy_pays(n, d, k, tiles, dtype, rng,
                                                      monkeypatch):
    # many centroids, or few columns and some centroids: one kmeans_assign copies x into
    # the tile layout (KMeansTiles) and assigns from it (the fused kernel was 6-14x
    # slower at d = 1-3, k = 256); the same labels and distances as the other paths
    # (integer-valued data: exact dot products), ties to the lower index, NaN rows out
    used = []
    real = cluster.KMeansTiles.assign
    monkeypatch.setattr(cluster.KMeansTiles, "assign",
                        lambda self, c: used.append(1) or real(self, c))
    x = rng.integers(-3, 4, (n, d)).astype(dtype)
    x[n // 2] = np.nan
    c = rng.integers(-3, 4, (k, d)).astype(dtype)
    c[k - 1] = c[1]
    labels, dist = cluster.kmeans_assign(x, c)
    assert used == ([1] if tiles else [])
    ref = ref_sq_dists(x, c)
    ok = np.arange(n) != n // 2
    assert labels[n // 2] == -1 and np.isnan(dist[n // 2])
    np.testing.assert_array_equal(labels[ok], ref[ok].argmin(axis=1))
    np.testing.assert_array_equal(dist[ok], ref[ok].min(axis=1))
    monkeypatch.setattr(cluster, "_uses_tiles", lambda x, c: False)
    other = cluster.kmeans_assign(x, c)
    np.testing.assert_array_equal(labels, other[0])
    np.testing.assert_array_equal(dist, other[1])


def test_update_and_partial_sums(dtype, tol, rng):
    x = rng.standard_normal((400, 5)).astype(dtype)
    labels = rng.integers(0, 6, 400)
    labels[labels == 5] = 4  # cluster 5 is empty
    labels[:3] = -1  # skipped rows
    prev = np.full((6, 5), 7.0, dtype)
    cents, counts = cluster.kmeans_update(x, labels, 6, previous=prev)
    for j in range(5):
        np.testing.assert_allclose(cents[j], x[labels == j].astype(np.float64).mean(0), **tol)
    assert counts.tolist() == [(labels == j).sum() for j in range(6)]
    np.testing.assert_array_equal(cents[5], prev[5])
    assert cents.dtype == dtype


def test_strided_input_and_lloyd_matches_reference_loop(rng):
    centers = 6 * rng.standard_normal((3, 4))
    x = (centers[rng.integers(0, 3, 900)] + rng.standard_normal((900, 4)))
    xs = np.asfortranarray(x)
    cents, _, inertia, n_iter = cluster.kmeans(xs, x[:3], max_iter=50)
    c = x[:3].copy()
    for _ in range(n_iter):
        lab = ref_sq_dists(x, c).argmin(1)
        c = np.stack([x[lab == j].mean(0) for j in range(3)])
    np.testing.assert_allclose(cents, c, rtol=1e-10)
    np.testing.assert_allclose(inertia, ref_sq_dists(x, c).min(1).sum(), rtol=1e-10)


def test_cluster_input_errors():
    with pytest.raises(KernelInputError, match="centroids must have 3 columns"):
        cluster.kmeans_assign(np.zeros((4, 3)), np.zeros((2, 2)))
    with pytest.raises(KernelInputError, match="centroids is empty"):
        cluster.kmeans_assign(np.zeros((4, 3)), np.zeros((0, 3)))
    with pytest.raises(KernelDtypeError, match="centroids has dtype float32"):
        cluster.kmeans_assign(np.zeros((4, 3)), np.zeros((2, 3), np.float32))
    with pytest.raises(KernelInputError, match="labels must be < k=2"):
        cluster.kmeans_partial_sums(np.zeros((2, 3)), np.array([0, 2]), 2)


# -- search -----------------------------------------------------------------------------

def ref_topk(q, e, k):
    q, e = q.astype(np.float64), e.astype(np.float64)
    qn = np.linalg.norm(q, axis=1, keepdims=True)
    en = np.linalg.norm(e, axis=1, keepdims=True)
    s = (q @ e.T) / np.where(qn > 0, qn, 1) / np.where(en > 0, en, 1).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.fixture(params=["fused", "fused-portable", "gemm", "gemm-rows", "gemm-blas-threads"])
def search_path(request, monkeypatch):
    """Run a search test through the fused scan (on explicit vectors where the width is a
    multiple of one vector, ``kernels._simd.scan_scores``, and as LLVM vectorises it) and
    through the blocked-GEMM path in tiles of 7 rows by 3 queries (so block edges,
    offsets, a short last block and a short last tile are all crossed): each thread
    scoring its own queries (``gemm``) or its own rows (``gemm-rows``) through
    ``kernels.gemm``'s BLAS call, or BLAS scoring each tile on its own threads."""
    if request.param.startswith("gemm"):
        monkeypatch.setattr(search, "GEMM_MIN_QUERIES", 1)
        monkeypatch.setattr(search, "GEMM_BLOCK_ROWS", 7)
        monkeypatch.setattr(search, "GEMM_TILE", 1)
        monkeypatch.setattr(search, "GEMM_TILE_QUERIES", 3)
        monkeypatch.setattr(search, "GEMM_SPLIT_MIN_QUERIES", 2)
        if request.param == "gemm-rows":  # (pools always split by queries)
            monkeypatch.setattr(search, "GEMM_BY_QUERIES_MAX_BYTES", -1)
        split = request.param != "gemm-blas-threads"
        monkeypatch.setattr(search, "GEMM_SPLIT", split)
        if split:
            request.getfixturevalue("gemm_split")
    else:
        monkeypatch.setattr(search, "GEMM_MIN_QUERIES", 10**9)
        monkeypatch.setattr(search, "VEC_SCAN", request.param == "fused")
    return request.param


@pytest.mark.parametrize("d,nq,gemm", [(1536, 16, True), (1024, 15, False), (768, 32, True),
                                       (768, 31, False), (256, 63, False), (256, 64, True)])
def test_long_float32_rows_take_the_gemm_path_from_fewer_queries(d, nq, gemm, rng,
                                                                 monkeypatch):
    # float32 rows of 1024 features or more: GEMM from 16 queries, 512 or more: from 32
    # (the scan was 1.24-1.62x slower there at 1536); shorter rows and float64 as before
    used = []
    real = search._topk_gemm
    monkeypatch.setattr(search, "_topk_gemm", lambda *a: used.append(1) or real(*a))
    e = rng.standard_normal((300, d)).astype(np.float32)
    q = rng.standard_normal((nq, d)).astype(np.float32)
    s, i = search.topk_cosine(q, e, 5)
    assert used == ([1] if gemm else [])
    rs, _ = ref_topk(q, e, 5)
    np.testing.assert_allclose(s, rs, rtol=1e-4, atol=1e-5)
    assert search._gemm_min_queries(np.dtype(np.float64), d) == 32


@pytest.fixture(params=["sorted", "pooled"])
def topk_lists(request, monkeypatch):
    """Run a search test with each query's best rows kept in a sorted list (the default
    under ``search.POOL_MIN_K``) and in pools of 2k cut back when full (the default from
    there; forced here for every k, so pools fill and are cut many times)."""
    monkeypatch.setattr(search, "POOL_MIN_K", 1 if request.param == "pooled" else 10**9)
    return request.param


@pytest.mark.parametrize("n", [5, 3000])  # 3000 rows: several chunks to merge
def test_topk_matches_reference(n, dtype, tol, rng, search_path, topk_lists):
    e = rng.standard_normal((n, 16)).astype(dtype)
    q = rng.standard_normal((4, 16)).astype(dtype)
    s, i = search.topk_cosine(q, e, 8)
    rs, ri = ref_topk(q, e, 8)
    assert s.shape == i.shape == (4, min(8, n))
    np.testing.assert_allclose(s, rs, rtol=10 * tol["rtol"], atol=10 * tol["atol"])
    # the returned rows really have the returned scores (indices may differ only by ties)
    full = ref_topk(q, e, n)
    score_of = np.take_along_axis(full[0], np.argsort(full[1], axis=1), 1)
    np.testing.assert_allclose(np.take_along_axis(score_of, i, 1), rs, rtol=1e-4, atol=1e-5)
    if dtype == np.float64:
        np.testing.assert_array_equal(i, ri)


@pytest.mark.parametrize("width", [2, 16])  # 16: a whole vector per row (both dtypes)
@pytest.mark.parametrize("dtype_", [np.float32, np.float64])
def test_topk_ties_zero_rows_nan_rows_and_offset(width, dtype_, search_path, topk_lists):
    base = np.array([[1.0, 0.0], [np.nan, 1.0], [0.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    # zero columns change no cosine; 16 + 3 rows: one block of 16 and a scalar tail
    e = np.zeros((19, width), dtype_)
    e[:5, :2] = base
    e[5:, 0] = -1.0
    e[17, :2] = [np.nan, np.nan]
    e[18, :2] = [3.0, 0.0]  # in the tail: ties with rows 0 and 3, after them
    q = np.zeros((2, width), dtype_)
    q[0, 0] = 1.0
    s, i = search.topk_cosine(q, e, 5, offset=10)
    assert i[0].tolist() == [10, 13, 28, 12, 14]  # ties -> lower index; NaN rows never
    np.testing.assert_allclose(s[0], [1.0, 1.0, 1.0, 0.0, 0.0])
    assert i[1].tolist() == [10, 12, 13, 14, 15]  # a zero query scores 0 everywhere


def _exact_unit_vectors():
    """Unit vectors of six columns, each a single +-1 or four +-0.5s: the dot products
    of two are exact in any summation order (BLAS's too), one of nine values."""
    base = [np.eye(6)[c] * sign for c in range(6) for sign in (1, -1)]
    for cols in itertools.combinations(range(6), 4):
        for signs in itertools.product((0.5, -0.5), repeat=4):
            v = np.zeros(6)
            v[list(cols)] = signs
            base.append(v)
    return np.array(base)


@pytest.mark.parametrize("k", [64, 300, 1000, 5000])
def test_large_k_takes_the_pools_and_matches_the_reference(k, search_path, rng,
                                                           monkeypatch):
    # k >= POOL_MIN_K keeps pools of 2k (a row that gets into a sorted list of k moved
    # half of it: 5.6x slower at k = 1000 with 64 queries). Rows and queries are unit
    # vectors of 0.5s (four of six columns) or a single 1: every score is exact in any
    # summation order (BLAS's too), one of nine values, so rows tie exactly on every
    # path (hundreds to a score: the lower row first, and pools are cut inside ties).
    # NaN rows never show; past the valid rows, padding (k = 5000)
    assert search.POOL_MIN_K == 64
    pooled = []
    real = search._lists
    monkeypatch.setattr(search, "_lists", lambda *a: pooled.append(a[4]) or real(*a))
    base = _exact_unit_vectors()
    e = base[rng.integers(0, len(base), 3000)]
    e[[7, 2000]] = np.nan
    q = base[rng.integers(0, len(base), 5)]
    s, i = search.topk_cosine(q, e, k, offset=11, normalized=True)
    kk = min(k, 3000)
    assert s.shape == i.shape == (5, kk)
    assert s.flags.c_contiguous and i.flags.c_contiguous  # copied out of the pools
    rows = np.delete(np.arange(3000), [7, 2000])  # the reference without the NaN rows
    rs, ri = ref_topk(q, e[rows], 2998)
    m = min(kk, 2998)
    np.testing.assert_array_equal(i[:, :m], rows[ri[:, :m]] + 11)
    np.testing.assert_array_equal(s[:, :m], rs[:, :m])
    assert (i[:, m:] == -1).all() and np.isneginf(s[:, m:]).all()
    assert pooled == [True]


@pytest.mark.parametrize("case", ["random", "sample-misleads", "few-valid-rows"])
def test_pools_start_from_a_sampled_cut_and_never_lose_a_row(case, search_path, rng,
                                                             monkeypatch):
    # from SAMPLE_MIN_ROWS rows a sample of SAMPLE_ROWS sets each pool's first cut, so
    # rows under it are never appended. Where fewer than k rows beat it (a sample that
    # misled, or NaN rows), those queries run again without one: the results are the
    # reference's exactly either way (exact ties as above; ties cross the cut)
    n, k = search.SAMPLE_MIN_ROWS + 123, 300
    monkeypatch.setattr(search, "SAMPLE_MIN_KQ", 5 * k)  # (5 queries)
    base = _exact_unit_vectors()
    e = base[rng.integers(0, len(base), n)]
    q = base[rng.integers(0, len(base), 5)]
    nb = search.SAMPLE_ROWS // search.SAMPLE_BLOCK
    starts = np.arange(nb) * (n - search.SAMPLE_BLOCK) // (nb - 1)
    sampled = (starts[:, None] + np.arange(search.SAMPLE_BLOCK)).ravel()
    if case == "sample-misleads":  # 100 sampled rows are the only ones that score 1:
        q[:] = q[0]  # the sample's best (more than its m) put the cut at 1, under k rows
        e[(e == q[0]).all(axis=1)] = -q[0]
        e[rng.choice(sampled, 100, replace=False)] = q[0]
    if case == "few-valid-rows":  # NaN everywhere but 200 rows: fewer than k to return
        keep = rng.choice(n, 200, replace=False)
        e[np.setdiff1d(np.arange(n), keep)] = np.nan
    cuts = []
    real = search._search
    monkeypatch.setattr(search, "_search", lambda *a: cuts.append(a[-1]) or real(*a))
    s, i = search.topk_cosine(q, e, k, offset=7, normalized=True)
    rows = np.flatnonzero(~np.isnan(e).any(axis=1))
    rs, ri = ref_topk(q, e[rows], min(k, rows.size))
    m = ri.shape[1]
    np.testing.assert_array_equal(i[:, :m], rows[ri] + 7)
    np.testing.assert_array_equal(s[:, :m], rs)
    assert (i[:, m:] == -1).all() and np.isneginf(s[:, m:]).all()
    assert cuts[0] is not None and len(cuts) == (1 if case == "random" else 2)
    if case == "random":  # the cut lets through the ties at it, not all the rows
        beat = (q @ e.T > cuts[0][:, None]).sum(axis=1)
        assert (beat >= k).all() and (beat < n / 8).all()
    else:  # the queries that came up short, again, without a cut
        assert cuts[1] is None


@pytest.mark.parametrize("normalized", [True, False])
def test_sampled_cut_lets_through_a_few_times_k_rows(normalized, dtype, rng, monkeypatch):
    # on scores without ties, about k (1 + 4 / sqrt(k * SAMPLE_ROWS / n)) plus 8 sample
    # rows' worth beat the cut; a zero row scores 0 and a NaN row never counts
    n, k = 200_000, 1000
    e = rng.standard_normal((n, 16)).astype(dtype)
    e[::1000] = 0
    e[1::1000] = np.nan
    if normalized:
        e[2::1000] = 1  # rows of norm 4, scored as they are
        ok = np.arange(n) % 1000 > 2
        e[ok] /= np.linalg.norm(e[ok], axis=1, keepdims=True)
    q = rng.standard_normal((3, 16)).astype(dtype)
    qinv = np.empty(3, dtype)
    search._query_inv(q, qinv)
    assert search._sample_cut(q, qinv, e, k, normalized) is None  # k x 3 queries: too few
    monkeypatch.setattr(search, "SAMPLE_MIN_KQ", 3 * k)
    cut = search._sample_cut(q, qinv, e, k, normalized)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        sc = qn @ (e if normalized else e / np.linalg.norm(e, axis=1, keepdims=True)).T
    beat = (sc > cut[:, None]).sum(axis=1)
    assert cut.dtype == dtype
    assert (beat >= k).all() and (beat < 3 * k).all(), beat
    assert search._sample_cut(q, qinv, e[:search.SAMPLE_MIN_ROWS - 1], k, normalized) is None
    assert search._sample_cut(q, qinv, e, n - 1000, normalized) is None  # all the sample
    monkeypatch.setattr(search, "SAMPLE_MIN_KQ", 0)
    assert search._sample_cut(q, qinv, e, search.SAMPLE_MIN_K - 1, normalized) is None


@pytest.mark.parametrize("n", [1, 2, 17, 3000, 9000])
def test_radix_sort_ranks_as_the_quicksort(n, dtype, rng):
    # the pools' final order from RADIX_SORT_MIN_K: a radix sort on the scores' bits, then
    # runs of equal scores by row. Ties by the thousand, -0.0 beside +0.0 (equal scores),
    # negative scores, -inf padding (row -1), and the largest finite values
    s = rng.integers(-3, 4, n).astype(dtype) / 2
    some = rng.random(n) < 0.3
    s[some] = rng.standard_normal(int(some.sum()))
    s[::7] = -0.0
    s[1::11] = 0.0
    s[2::13] = -np.inf
    s[3::17] = np.finfo(dtype).max
    s[4::19] = -np.finfo(dtype).max
    r = rng.permutation(n).astype(np.int64) + 100
    r[2::13] = -1
    order = np.lexsort((r, -s.astype(np.float64)))
    ss, rr = s.copy(), r.copy()
    search._radix_sort(ss, rr, 0, n - 1)
    np.testing.assert_array_equal(rr, r[order])
    np.testing.assert_array_equal(ss, s[order])
    qs, qr = s.copy(), r.copy()
    search._sort_range(qs, qr, 0, n - 1)
    np.testing.assert_array_equal(qr, rr)
    if n > 20:  # a range inside the array; the rest untouched
        ss, rr = s.copy(), r.copy()
        search._radix_sort(ss, rr, 5, n - 6)
        np.testing.assert_array_equal(rr[:5], r[:5])
        np.testing.assert_array_equal(rr[-5:], r[-5:])
        sub = np.lexsort((r[5:-5], -s[5:-5].astype(np.float64)))
        np.testing.assert_array_equal(rr[5:-5], r[5:-5][sub])


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 100, 5000])
def test_pool_selection_and_sort_rank_by_score_then_row(n, rng):
    # the pools' quickselect and quicksort on scores with many exact ties (few distinct
    # values) and rows in random order: the best k first, then in (score desc, row asc)
    s = rng.integers(0, 4, n).astype(np.float32)
    r = rng.permutation(n).astype(np.int64) + 100
    order = np.lexsort((r, -s))
    for k in sorted({1, max(1, n // 2), n}):
        ss, rr = s.copy(), r.copy()
        search._select_best(ss, rr, n, k)
        assert sorted(rr[:k].tolist()) == sorted(r[order[:k]].tolist())
        search._sort_range(ss, rr, 0, k - 1)
        np.testing.assert_array_equal(rr[:k], r[order[:k]])
        np.testing.assert_array_equal(ss[:k], s[order[:k]])


def test_topk_empty_and_errors(search_path):
    s, i = search.topk_cosine(np.ones((2, 3)), np.zeros((0, 3)), 5)
    assert s.shape == i.shape == (2, 0)
    with pytest.raises(KernelInputError, match="embeddings must have 3 columns"):
        search.topk_cosine(np.ones((2, 3)), np.zeros((4, 2)), 1)
    with pytest.raises(KernelInputError, match="k must be a positive integer"):
        search.topk_cosine(np.ones((2, 3)), np.zeros((4, 3)), 0)


def test_topk_normalized_flag_skips_norms_with_same_result(rng, search_path):
    e = rng.standard_normal((700, 12))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    q = rng.standard_normal((9, 12))  # 9 queries: two blocks of four plus one
    s1, i1 = search.topk_cosine(q, e, 5)
    s2, i2 = search.topk_cosine(q, e, 5, normalized=True)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-12)
    # with unnormalised rows the flag changes the scores: it is really skipping the norms
    s3, _ = search.topk_cosine(q, 3 * e, 5, normalized=True)
    np.testing.assert_allclose(s3, 3 * s1, rtol=1e-12)


@pytest.mark.parametrize("nq", [1, 5])
def test_topk_normalized_flag_on_whole_vector_rows(nq, dtype, rng, search_path):
    # rows of 32: whole vectors in both dtypes, so the fused path is the vector scan,
    # whose first query (row by row, with or without the norms) differs from the rest
    e = rng.standard_normal((1000, 32)).astype(dtype)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    q = rng.standard_normal((nq, 32)).astype(dtype)
    s1, i1 = search.topk_cosine(q, e, 7)
    s2, i2 = search.topk_cosine(q, e, 7, normalized=True)
    rs, ri = ref_topk(q, e, 7)
    np.testing.assert_array_equal(i1, ri)
    np.testing.assert_array_equal(i2, ri)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(s1, rs, rtol=rtol)
    np.testing.assert_allclose(s2, rs, rtol=rtol)
    s3, i3 = search.topk_cosine(q, 3 * e, 7, normalized=True)  # the norms really skipped
    np.testing.assert_array_equal(i3, ri)
    np.testing.assert_allclose(s3, 3 * rs, rtol=rtol)


@pytest.mark.parametrize("normalized", [False, True])
def test_topk_float64_scan_asks_for_its_rows_ahead_on_every_host(normalized, rng, monkeypatch):
    # float64 matrices from SCAN_HINT_MIN_BYTES are scanned with a prefetch hint on any
    # host (ahead = 2), float32 ones for one query where the host's row hints are on (1): the
    # hinted scan must give the reference's rows (the hints clamped to the last row)
    monkeypatch.setattr(search, "GEMM_MIN_QUERIES", 10**9)
    monkeypatch.setattr(search, "SCAN_HINT_MIN_BYTES", 4096)
    seen = []
    real = search._scan_hint
    monkeypatch.setattr(search, "_scan_hint", lambda *a: seen.append(real(*a)) or seen[-1])
    e = rng.standard_normal((1003, 32))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    # several float32 queries go without the host's hint (search.SCAN_HINT_ONE_QUERY),
    # float64 ones keep theirs
    for nq, hint32 in ((1, 1), (3, 0)):
        q = rng.standard_normal((nq, 32))
        rs, ri = ref_topk(q, e, 7)
        for dt, want in ((np.float64, 2), (np.float32, hint32)):
            s, i = search.topk_cosine(q.astype(dt), e.astype(dt), 7, normalized=normalized)
            assert seen[-1] == want
            np.testing.assert_array_equal(i, ri)
            np.testing.assert_allclose(s, rs, rtol=1e-5 if dt == np.float32 else 1e-12)
    assert real(e[:10]) == 0  # under SCAN_HINT_MIN_BYTES: none
    monkeypatch.setattr(search, "SCAN_HINT_ALWAYS", False)
    assert real(e) == 1 and real(e, 3) == 0


@pytest.mark.parametrize("d", [3, 10, 17, 20, 33, 100, 300])
@pytest.mark.parametrize("nq", [1, 5])
def test_topk_vector_scan_on_rows_with_a_partial_last_vector(d, nq, dtype, rng, monkeypatch):
    # rows that are not a whole number of vectors (GloVe's 100 or 300 features, or less
    # than one) take the vector scan, its last piece masked, where
    # search.SCAN_MASKED_TAIL (by default with AVX-512; forced on here, the masked load
    # is correct at either vector width, only slower on AVX2); the portable scan is made
    # to fail, so the answers must come from the vector scan, with its first query (row
    # by row) and the later ones (piece by piece) both checked
    from kernels import _simd

    assert search.SCAN_MASKED_TAIL == (_simd.VEC_BITS == 512)
    monkeypatch.setattr(search, "SCAN_MASKED_TAIL", True)

    def portable(*args):
        raise AssertionError("the portable scan ran")

    monkeypatch.setattr(search, "_topk", portable)
    monkeypatch.setattr(search, "GEMM_MIN_QUERIES", 10**9)
    n = 1003  # several chunks, and rows past the last whole block of lanes
    e = rng.standard_normal((n, d)).astype(dtype)
    q = rng.standard_normal((nq, d)).astype(dtype)
    e[40] = 0.0
    e[40, d - 1] = 5.0  # all of this row is in the masked piece
    q[0] = 0.0
    q[0, d - 1] = 1.0  # so is all of query 0: row 40 is its exact match
    e[41, d - 1] = np.nan  # a NaN in the last piece spoils only its own row
    e[42] = q[-1] * 2  # the last query's match (with one query: ties row 40, after it)
    for normalized in (False, True):
        ee = e / np.linalg.norm(e, axis=1, keepdims=True) if normalized else e
        s, i = search.topk_cosine(q, ee, 6, normalized=normalized)
        clean = ee.copy()
        clean[41] = 0.0  # scores 0, below every top-6 score here; the NaN row never shows
        rs, ri = ref_topk(q, clean, 6)
        np.testing.assert_array_equal(i, ri)
        rtol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(s, rs, rtol=rtol, atol=rtol)
        assert i[0, 0] == 40 and i[-1, 0] == (42 if nq > 1 else 40) and 41 not in i
        np.testing.assert_allclose([s[0, 0], s[-1, 0]], [1.0, 1.0], rtol=rtol)


@pytest.mark.parametrize("extra", [0, 3])
def test_topk_vector_scan_at_every_row_length_it_unrolls(extra, dtype, rng, monkeypatch):
    # the first query's scan takes rows of up to _simd.scan_fixed_pieces() vectors as
    # straight-line code, one block per count, and longer rows through a loop: every
    # count from 0 to one past the last block, with and without a masked last piece,
    # norming the rows or not, must give the reference's rows and scores
    from kernels import _simd

    monkeypatch.setattr(search, "SCAN_MASKED_TAIL", True)
    monkeypatch.setattr(search, "_topk", None)  # the portable scan would fail to run
    monkeypatch.setattr(search, "GEMM_MIN_QUERIES", 10**9)
    lanes = _simd.VEC_BITS // 8 // np.dtype(dtype).itemsize
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for pieces in range(_simd.scan_fixed_pieces() + 2):
        d = pieces * lanes + extra
        if d == 0:
            continue
        e = rng.standard_normal((3 * lanes + 5, d)).astype(dtype)
        q = rng.standard_normal((2, d)).astype(dtype)
        e[lanes + 1] = q[0] * 3  # query 0's exact match, inside a whole block of rows
        for normalized in (False, True):
            ee = e / np.linalg.norm(e, axis=1, keepdims=True) if normalized else e
            for nq in (1, 2):
                s, i = search.topk_cosine(q[:nq], ee, 5, normalized=normalized)
                rs, ri = ref_topk(q[:nq], ee, 5)
                np.testing.assert_array_equal(i, ri, err_msg=f"d={d}")
                np.testing.assert_allclose(s, rs, rtol=rtol, atol=rtol, err_msg=f"d={d}")
                assert i[0, 0] == lanes + 1


def test_topk_gemm_path_agrees_with_the_fused_scan(rng, monkeypatch):
    e = rng.standard_normal((2000, 24)).astype(np.float32)
    # exact duplicates: the lowest index must come first (small integers, so every
    # summation order BLAS may use gives the same dot product: a real tie)
    e[[3, 100, 500]] = rng.integers(-4, 5, 24)
    e[9] = np.nan
    e[10] = 0
    q = rng.standard_normal((20, 24)).astype(np.float32)
    q[4] = e[100]
    monkeypatch.setattr(search, "GEMM_MIN_QUERIES", 10**9)
    fs, fi = search.topk_cosine(q, e, 12, offset=5)
    monkeypatch.setattr(search, "GEMM_MIN_QUERIES", 16)
    monkeypatch.setattr(search, "GEMM_BLOCK_ROWS", 300)
    gs, gi = search.topk_cosine(q, e, 12, offset=5)
    assert gi[4, :3].tolist() == [8, 105, 505]  # the three copies, in row order
    assert not np.isin([9 + 5], gi).any()
    np.testing.assert_allclose(gs, fs, rtol=1e-5, atol=1e-6)
    assert (gi == fi).mean() > 0.99  # float32 rounding may swap near-ties only


@pytest.mark.parametrize("rows,k,by_queries", [(3000, 10, True), (3000, 64, True),
                                                (40000, 64, True), (40000, 10, False)])
def test_many_queries_split_over_the_threads_by_queries_or_by_rows(rows, k, by_queries, rng,
                                                                   monkeypatch, gemm_split):
    # each thread takes its own queries where the rows are few (8 MiB) or the lists are
    # pools; else its own rows. Either way the results are the fused scan's
    e = rng.standard_normal((rows, 64))
    q = rng.standard_normal((70, 64))
    monkeypatch.setattr(search, "GEMM_MIN_QUERIES", 10**9)
    want = search.topk_cosine(q, e, k)
    monkeypatch.setattr(search, "GEMM_MIN_QUERIES", 64)
    monkeypatch.setattr(search, "GEMM_TILE", 16 * 1024)  # tiles of 64 queries: two of them
    seen = []
    real = search._topk_gemm_split

    def spy(*args):
        seen.append((args[5], args[-1]))
        return real(*args)

    monkeypatch.setattr(search, "_topk_gemm_split", spy)
    got = search.topk_cosine(q, e, k)
    assert seen == [(min(2, search.num_threads()), by_queries)]
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)


def test_gemm_path_matches_reference_ties_and_nan(dtype, rng):
    # d * k >= GEMM_MIN_DK selects the chunked-GEMM path; it must agree with the fused
    # kernel (f64: exactly, f32: up to near-ties) and keep its tie/NaN rules (in float32,
    # BLAS may round two equal centroids' dot products differently: no exact tie there)
    d, k = 40, 33
    assert cluster._uses_gemm(np.zeros((k, d)))
    x = rng.standard_normal((3000, d)).astype(dtype)
    c = rng.standard_normal((k, d)).astype(dtype)
    c[7] = c[3]  # duplicate centroid: ties -> the lower index
    x[5] = np.nan
    labels, dist = cluster.kmeans_assign(x, c)
    ref = ref_sq_dists(x, c)
    ok = np.arange(3000) != 5
    slack = 1e-3 if dtype == np.float32 else 1e-9
    assert labels[5] == -1 and np.isnan(dist[5])
    assert dtype == np.float32 or not np.any(labels == 7)
    assert np.all(ref[ok, labels[ok]] <= ref[ok].min(axis=1) + slack)
    np.testing.assert_allclose(dist[ok], ref[ok].min(axis=1), rtol=slack, atol=slack)
    fused_labels = np.empty(3000, np.int64)
    fused_dist = np.empty(3000, dtype)
    cluster._assign(x, c, np.einsum("ij,ij->i", c, c), fused_labels, fused_dist, dtype.type(0))
    same = np.where(labels == 7, 3, labels) == np.where(fused_labels == 7, 3, fused_labels)
    agree = same if dtype == np.float32 else labels == fused_labels  # f32: 3 ~ 7 (a tie)
    assert agree.mean() > 0.999 if dtype == np.float32 else agree.all()


@pytest.mark.parametrize("split", [True, False], ids=["split", "pool"])
def test_gemm_path_gives_labels_distances_and_sums_in_one_pass(dtype, rng, monkeypatch,
                                                               request, split):
    # the GEMM path two ways: each Numba thread making its own BLAS calls (split) and the
    # Python-thread pool around np.matmul; many chunks (a partial last one), a NaN row,
    # a duplicated centroid. Integer-valued data: every product is exact, so labels,
    # distances and sums must equal the reference's exactly, ties to the lower index
    if split:
        request.getfixturevalue("gemm_split")
    monkeypatch.setattr(cluster, "GEMM_SPLIT", split)
    monkeypatch.setattr(cluster, "CHUNK_BYTES", 4096)  # 64-row chunks: 16 of them
    calls = []
    real = cluster._assign_split
    monkeypatch.setattr(cluster, "_assign_split", lambda *a: calls.append(1) or real(*a))
    x = rng.integers(-3, 4, (1001, 40)).astype(dtype)
    x[500] = np.nan
    c = rng.integers(-3, 4, (33, 40)).astype(dtype)
    c[20] = c[4]
    assert cluster._uses_gemm(c)
    labels, dist, sums, counts = cluster._assign_sums(x, c)
    assert len(calls) == int(split)
    ref = ref_sq_dists(x, c)
    ok = np.arange(1001) != 500
    np.testing.assert_array_equal(labels[ok], ref[ok].argmin(axis=1))
    assert labels[500] == -1 and np.isnan(dist[500]) and not np.any(labels == 20)
    np.testing.assert_array_equal(dist[ok], ref[ok].min(axis=1))
    want_sums = np.zeros((33, 40))
    np.add.at(want_sums, labels[ok], x[ok])
    np.testing.assert_array_equal(sums, want_sums)
    np.testing.assert_array_equal(counts, np.bincount(labels[ok], minlength=33))
    assert counts.sum() == 1000
    lab2, dist2 = cluster.kmeans_assign(x, c)  # the same path without the sums
    np.testing.assert_array_equal(lab2, labels)
    np.testing.assert_array_equal(dist2, dist)


def _lloyd_over_public_steps(x, c, max_iter):
    """kmeans' loop written with kmeans_assign, kmeans_partial_sums and
    centroids_from_sums, the steps the MPI app and the Dask version take."""
    prev, n = None, 0
    for n in range(1, max_iter + 1):
        labels, _ = cluster.kmeans_assign(x, c)
        sums, counts = cluster.kmeans_partial_sums(x, labels, c.shape[0])
        new = cluster.centroids_from_sums(sums, counts, c, x.dtype)
        shift, c = float(((new - c) ** 2).sum()), new
        if (prev is not None and np.array_equal(labels, prev)) or shift <= 0:
            break
        prev = labels
    return c, cluster.kmeans_assign(x, c)[0], n


@pytest.mark.parametrize("d,k", [(32, 40), (16, 8), (3, 2)])
def test_kmeans_matches_a_loop_over_the_public_steps(rng, d, k):
    # kmeans runs every Lloyd step on a tile-major copy of x (kernels._simd.tile_argmin);
    # kmeans_assign takes the GEMM path for d * k >= GEMM_MIN_DK (the first case) and the
    # fused kernel below it: the same iterations, labels and centroids
    x = rng.standard_normal((5000, d))
    init = x[:k].copy()
    assert cluster._uses_gemm(init) == (d * k >= cluster.GEMM_MIN_DK)
    c1, l1, i1, n1 = cluster.kmeans(x, init, max_iter=8)
    c2, l2, n2 = _lloyd_over_public_steps(x, init, 8)
    assert n1 == n2
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_allclose(c1, c2, rtol=1e-10)
    np.testing.assert_allclose(i1, ref_sq_dists(x, c2).min(axis=1).sum(), rtol=1e-10)


_OTHER_WIDTH = """
import sys, numpy as np
import kernels._simd as S
S.VEC_BITS = int(sys.argv[1])  # before the first compile (into an empty cache folder)
S.VEC_REGS = 32 if S.VEC_BITS == 512 else 16
from kernels import cluster, search
cluster._SUB_BYTES = 2 * S.VEC_BITS // 8
x = np.load(sys.argv[2])
labels = cluster.KMeansTiles(x).step(x[:33].copy())[0]
scores, rows = search.topk_cosine(x[:3], x, 7)
np.savez(sys.argv[3], labels=labels, scores=scores, rows=rows)
"""


def test_register_blocked_kernels_agree_at_both_vector_widths(tmp_path, rng):
    # tile_argmin and scan_scores use 512-bit vectors on AVX-512 and 256-bit ones on AVX2
    # (kernels._simd.VEC_BITS, fixed when it is imported); the other width runs here in a
    # subprocess that sets it before compiling into an empty cache folder (LLVM lowers
    # either width on any x86-64 CPU). Each lane's dot product is the same sequence of
    # FMAs, so the labels are identical; the scores' lane sums are added in another
    # order, so they agree to rounding and the rows are the same.
    import subprocess
    import sys

    from kernels import _simd

    x = rng.standard_normal((1001, 32)).astype(np.float32)
    x[5] = np.nan
    labels = cluster.KMeansTiles(x).step(x[:33].copy())[0]
    scores, rows = search.topk_cosine(x[:3], x, 7)
    np.save(tmp_path / "x.npy", x)
    other = 768 - _simd.VEC_BITS
    env = dict(os.environ, HPCGW_NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", _OTHER_WIDTH, str(other),
                           str(tmp_path / "x.npy"), str(tmp_path / "o.npz")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    o = np.load(tmp_path / "o.npz")
    np.testing.assert_array_equal(o["labels"], labels)
    assert labels[5] == -1 and labels[0] == 0
    np.testing.assert_array_equal(o["rows"], rows)
    np.testing.assert_allclose(o["scores"], scores, rtol=1e-6)
    assert rows[0, 0] == 0 and 5 not in rows


def test_kmeans_tile_path_matches_the_gemm_path(dtype, rng):
    # the Lloyd loop's register-tiled kernel (kernels._simd.tile_argmin on a tile-major
    # copy of x) against the BLAS path: k = 33 pads to 36 centroids, n = 1001 leaves a
    # partial tile, a NaN row stays out, a duplicated centroid must lose to the lower index
    # (integer-valued data: every summation order gives the same dot products, a real tie)
    x = rng.integers(-3, 4, (1001, 40)).astype(dtype)
    x[17] = np.nan
    c = rng.integers(-3, 4, (33, 40)).astype(dtype)
    c[30] = c[2]
    assert cluster._uses_gemm(c)
    tiled = cluster.KMeansTiles(x)
    labels, sums, counts, inertia = tiled.step(c)
    ref_labels, ref_sums, ref_counts = cluster._lloyd_step(x, c)
    np.testing.assert_array_equal(labels, ref_labels)
    assert labels[17] == -1 and not np.any(labels == 30)
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-12)
    lab2, dist = tiled.assign(c)
    ref_lab2, ref_dist = cluster.kmeans_assign(x, c)
    np.testing.assert_array_equal(lab2, ref_lab2)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-6, equal_nan=True)
    assert np.isnan(dist[17])
    # the step's inertia: the labelled rows' squared distances, summed per chunk
    np.testing.assert_allclose(inertia, np.nansum(ref_dist, dtype=np.float64), rtol=1e-6)
    assert np.isnan(tiled.step(c, inertia=False)[3])


def test_kmeans_tiles_take_an_empty_shard_and_refuse_bad_centroids():
    # an MPI rank may hold no rows: zero sums and counts, inertia 0
    tiles = cluster.KMeansTiles(np.zeros((0, 3)))
    labels, sums, counts, inertia = tiles.step(np.ones((2, 3)))
    assert labels.shape == (0,) and inertia == 0.0
    np.testing.assert_array_equal(sums, np.zeros((2, 3)))
    np.testing.assert_array_equal(counts, [0, 0])
    with pytest.raises(KernelInputError, match="at least one column"):
        cluster.KMeansTiles(np.zeros((5, 0)))
    tiles = cluster.KMeansTiles(np.ones((5, 3)))
    with pytest.raises(KernelInputError, match=r"centroids must have 3 columns"):
        tiles.step(np.zeros((2, 4)))
    with pytest.raises(KernelInputError, match="centroids is empty"):
        tiles.assign(np.zeros((0, 3)))
    with pytest.raises(KernelInputError, match=r"init must have 3 columns"):
        cluster.kmeans(np.ones((5, 3)), np.zeros((2, 4)))


def test_many_query_search_splits_from_any_thread_and_puts_blas_back(monkeypatch, rng,
                                                                    gemm_split):
    # threadpoolctl changes OpenBLAS's thread count from one Python thread only: from a
    # worker thread (a Dask task) while the main thread holds a limit, its pin does
    # nothing. The search pins through kernels.gemm.one_thread, which works from there
    import threading

    from threadpoolctl import threadpool_info, threadpool_limits

    e = rng.standard_normal((20000, 16))
    q = rng.standard_normal((70, 16))
    def numpy_blas_threads():
        return {i["num_threads"] for i in threadpool_info()
                if i["user_api"] == "blas" and "numpy" in (i.get("filepath") or "")}

    seen = []
    real = search._topk_gemm_split

    def spy(*args):
        seen.append(numpy_blas_threads())
        return real(*args)

    monkeypatch.setattr(search, "_topk_gemm_split", spy)
    want = search.topk_cosine(q, e, 5)
    got = {}
    with threadpool_limits(2, user_api="blas"):
        worker = threading.Thread(target=lambda: got.setdefault("r", search.topk_cosine(q, e, 5)))
        worker.start()
        worker.join(60)
        assert numpy_blas_threads() == {2}
    assert seen == [{1}, {1}]  # both calls split, with BLAS on one thread
    np.testing.assert_array_equal(got["r"][1], want[1])
    np.testing.assert_allclose(got["r"][0], want[0], rtol=1e-12)
