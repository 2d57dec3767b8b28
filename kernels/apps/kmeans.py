"""Distributed k-means: each rank assigns its shard, partial sums are all-reduced.

    python -m kernels.apps.kmeans --rows 200000 --dim 16 --k 8 --iters 20 --out r.json
    mpirun -n 2 python -m kernels.apps.kmeans ...

A rank copies its rows once into the tile layout of ``kernels.cluster.KMeansTiles``;
per iteration it assigns them there (register-tiled, no sums across lanes), sums points
and counts per cluster (float64) and its inertia in the same pass, and one Allreduce of
``k*(d+1)+1`` numbers gives every rank the same new centroids. Initial centroids are
the first ``k`` global rows (every rank can build them), so 1 and N ranks follow the
same trajectory.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np

from kernels.apps._common import shard, synthetic_rows, write_json
from kernels.apps._mpi import get_comm, share_cores


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m kernels.apps.kmeans",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    ap.add_argument("--out", default=None, help="write centroids + inertia JSON here")
    args = ap.parse_args(argv)
    if min(args.dim, args.k, args.iters) < 1 or args.rows < args.k:
        ap.error("need dim, k, iters >= 1 and rows >= k")
    return args


def blobs(args: argparse.Namespace, lo: int, hi: int) -> np.ndarray:
    """Rows lo..hi of Gaussian blobs around ``k`` random centres."""
    centers = 5.0 * np.random.default_rng(np.random.SeedSequence([args.seed, 3])).standard_normal(
        (args.k, args.dim)
    )

    def block(rng: np.random.Generator, n: int) -> np.ndarray:
        return centers[rng.integers(0, args.k, n)] + rng.standard_normal((n, args.dim))

    return synthetic_rows(args.seed, lo, hi, block).astype(args.dtype)


def main(argv: Sequence[str] | None = None) -> int:
    from kernels.cluster import KMeansTiles, centroids_from_sums

    args = parse_args(argv)
    comm = get_comm()
    share_cores(comm)
    lo, hi = shard(args.rows, comm.rank, comm.size)
    x = blobs(args, lo, hi)
    c = blobs(args, 0, args.k)
    inertia = []
    comm.barrier()
    t0 = time.perf_counter()
    tiles = KMeansTiles(x)  # the shard copied once into the tile layout, read every step
    for _ in range(args.iters):
        _, sums, counts, shard_inertia = tiles.step(c)
        buf = np.concatenate([sums.ravel(), counts.astype(np.float64), [shard_inertia]])
        comm.allreduce_sum(buf)
        kd = args.k * args.dim
        c = centroids_from_sums(buf[:kd].reshape(args.k, args.dim), buf[kd:kd + args.k],
                                previous=c, dtype=x.dtype)
        inertia.append(float(buf[-1]))
    seconds = time.perf_counter() - t0
    if comm.rank == 0:
        print(f"kmeans: {args.iters} iterations on {args.rows} rows in {seconds:.3f} s, "
              f"inertia {inertia[-1]:.6g} ({comm.size} ranks)", flush=True)
        if args.out:
            write_json(args.out, {
                "app": "kmeans", "ranks": comm.size, "settings": vars(args),
                "seconds": seconds, "inertia": inertia, "centroids": c.astype(float).tolist(),
            })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
