#!/usr/bin/env python
"""k-means and search on dask arrays: kernels.dask against what a Dask user reaches for.

    python tests/benchmarks/bench_dask.py [--out docs/benchmarks.md] [--repeat 3]

One `distributed.LocalCluster()` with its defaults (on 2 cores: 2 worker processes of 1
thread), the data made on the workers and persisted there, as a notebook would. k-means:
`kernels.dask.kmeans` against dask-ml's `KMeans` (`pip install dask-ml`; the row is left
out without it), both from the same initial centroids with `tol=0`, so both run the
same number of Lloyd iterations; the in-memory kernels and scikit-learn on the same rows
in this process show what the cluster adds. Search: `kernels.dask.topk_cosine` against
the same search written in dask.array (rows and queries normalised, one product,
`argtopk` over the rows). Each timing is the best of `--repeat` runs. Agreement: the
largest difference between final centroids (float32 data in [0, 1): after 20
iterations a few rows near a boundary may have gone the other way), and the share of
top-k indices found by both searches.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

from report import replace_section  # noqa: E402

from kernels.config import cpu_field  # noqa: E402

SECTION = "## Dask (k-means and search on a LocalCluster)"


def _best(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _plain_search(q: np.ndarray, e, k: int):
    """Cosine top-k in dask.array, as a user would write it."""
    import dask.array as da

    en = e / da.sqrt((e * e).sum(axis=1, keepdims=True))
    qn = q / np.sqrt((q * q).sum(axis=1, keepdims=True))
    scores = en @ qn.T  # (n, q)
    idx = da.argtopk(scores, k, axis=0)  # (k, q), best first
    idx = idx.compute().T
    return idx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="markdown file whose Dask section is replaced")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import dask
    import dask.array as da
    import distributed
    from sklearn.cluster import KMeans

    from kernels import cluster
    from kernels import dask as kd

    try:
        from dask_ml.cluster import KMeans as DaskMLKMeans
    except ImportError:
        DaskMLKMeans = None
    t_start = time.perf_counter()
    rows = []
    with distributed.LocalCluster(dashboard_address=None) as lc, distributed.Client(lc) as client:
        workers = len(client.scheduler_info()["workers"])
        threads = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
        for n, d, k, blocks in ((2_000_000, 16, 8, 8), (1_000_000, 32, 64, 8)):
            x = da.random.default_rng(0).random((n, d), dtype=np.float32,
                                                chunks=(n // blocks, d)).persist()
            distributed.wait(x)
            init = x[:k].compute()
            iters = 20
            kd.kmeans(x, init, max_iter=1)  # the workers load the kernels once
            t_ours, (c_ours, _, it_ours) = _best(
                lambda: kd.kmeans(x, init, max_iter=iters, tol=0.0), args.repeat)
            row = {"case": f"k-means {n} x {d}, k = {k}, {blocks} blocks, {iters} iterations",
                   "ours": t_ours}
            if DaskMLKMeans is not None:
                t_ml, km = _best(lambda: DaskMLKMeans(
                    n_clusters=k, init=init, max_iter=iters, tol=0.0).fit(x), args.repeat)
                assert km.n_iter_ == it_ours == iters, (km.n_iter_, it_ours)
                row["other"] = t_ml
                row["agree"] = float(np.abs(km.cluster_centers_ - c_ours).max())
            xn = x.compute()
            row["mem"] = _best(lambda: cluster.kmeans(xn, init, max_iter=iters, tol=0.0),
                               args.repeat)[0]
            row["sk"], skm = _best(lambda: KMeans(k, init=init, n_init=1, max_iter=iters,
                                                  tol=0.0, algorithm="lloyd").fit(xn),
                                   args.repeat)
            row["sk_agree"] = float(np.abs(skm.cluster_centers_ - c_ours).max())
            rows.append(row)
            print(row, flush=True)
            client.cancel(x)
        n, d, q, k, blocks = 1_000_000, 64, 16, 10, 8
        e = da.random.default_rng(1).standard_normal((n, d), dtype=np.float32,
                                                     chunks=(n // blocks, d)).persist()
        distributed.wait(e)
        qs = np.random.default_rng(2).standard_normal((q, d)).astype(np.float32)
        kd.topk_cosine(qs, e, k)
        t_ours, (_, i_ours) = _best(lambda: kd.topk_cosine(qs, e, k), args.repeat)
        t_plain, i_plain = _best(lambda: _plain_search(qs, e, k), args.repeat)
        row = {"case": f"search {n} x {d}, {q} queries, k = {k}, {blocks} blocks",
               "ours": t_ours, "other": t_plain,
               "agree": float(np.mean(np.sort(i_ours, axis=1) == np.sort(i_plain, axis=1)))}
        rows.append(row)
        print(row, flush=True)
    seconds = time.perf_counter() - t_start

    lines = [SECTION, "", f"Command ({seconds:.0f} s here; dask-ml for its row: "
             "`pip install dask-ml`):", "", "```",
             "python tests/benchmarks/bench_dask.py --out docs/benchmarks.md", "```", "",
             __doc__.split("\n\n", 2)[2].strip().replace("\n", " "), "",
             f"Machine: {cpu_field('model name') or 'unknown CPU'}, {os.cpu_count()} cores, "
             f"{time.strftime('%Y-%m-%d')}; dask {dask.__version__}, "
             f"{workers} workers, {threads} threads in all; best of {args.repeat}.", "",
             "| case | kernels.dask s | other s | vs other | other | in memory: kernels s | "
             "scikit-learn s | agreement |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        search_row = r["case"].startswith("search")
        other = "dask.array (normalise, product, argtopk)" if search_row else "dask-ml KMeans"
        o = r.get("other")
        o_s, ratio = ("–", "–") if o is None else (f"{o:.3f}", f"{o / r['ours']:.2f}x")
        if "agree" not in r:
            agree = "–"
        elif search_row:
            agree = f"{r['agree']:.0%} of the indices the same"
        else:
            agree = (f"centroids within {r['agree']:.1e} of dask-ml's, "
                     f"{r['sk_agree']:.1e} of scikit-learn's")
        mem = "–" if search_row else f"{r['mem']:.3f}"
        sk = "–" if search_row else f"{r['sk']:.3f}"
        lines.append(f"| {r['case']} | {r['ours']:.3f} | {o_s} | {ratio} | {other} | {mem} | "
                     f"{sk} | {agree} |")
    for line in lines[-len(rows):]:
        print(line)
    if args.out:
        replace_section(args.out, SECTION, lines)


if __name__ == "__main__":
    main()
