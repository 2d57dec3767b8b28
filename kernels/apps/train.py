"""Data-parallel training of a small MLP classifier on synthetic data.

    python -m kernels.apps.train --epochs 3 --seed 0 --checkpoint-dir ck --metrics m.json
    mpirun -n 2 python -m kernels.apps.train ...            # same result, two ranks

Each rank owns a contiguous shard of the training rows; every step the global batch
(same permutation on all ranks) is split by ownership, gradients are summed with
Allreduce (or, with ``--topk-ratio``, all-gathered as top-k sparse updates with error
feedback) and every rank applies the same fused AdamW step. Rank 0 writes a checkpoint
after each epoch (atomically) and the metrics JSON; a rerun resumes from the latest.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kernels.apps import _mlp
from kernels.apps._common import shard, synthetic_rows, write_json, write_npz
from kernels.apps._mpi import Comm, get_comm, share_cores
from kernels.compress import ErrorFeedback, densify
from kernels.data import take_rows

_CKPT = re.compile(r"ckpt-epoch(\d+)\.npz$")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m kernels.apps.train", description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=65536, help="training rows")
    ap.add_argument("--eval-samples", type=int, default=4096)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256, help="global batch size")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-2)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--topk-ratio", type=float, default=0.0,
                    help="send only this fraction of gradient entries (0 = dense Allreduce)")
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--metrics", default=None, help="write metrics JSON here")
    args = ap.parse_args(argv)
    if args.epochs < 0 or args.batch_size < 1 or args.samples < args.batch_size:
        ap.error("need epochs >= 0, batch-size >= 1 and samples >= batch-size")
    if not 0.0 <= args.topk_ratio <= 1.0:
        ap.error("--topk-ratio must be in [0, 1]")
    return args


def make_data(args: argparse.Namespace, lo: int, hi: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``offset+lo .. offset+hi`` of a teacher-labelled Gaussian dataset."""
    teacher = np.random.default_rng(np.random.SeedSequence([args.seed, 99])).standard_normal(
        (args.features, args.classes)
    )

    def block(rng: np.random.Generator, n: int) -> np.ndarray:
        x = rng.standard_normal((n, args.features))
        y = (x @ teacher + 0.5 * rng.standard_normal((n, args.classes))).argmax(axis=1)
        return np.concatenate([x, y[:, None].astype(np.float64)], axis=1)

    rows = synthetic_rows(args.seed, offset + lo, offset + hi, block)
    return rows[:, :-1].astype(args.dtype), rows[:, -1].astype(np.int64)


class Trainer:
    """Parameters, optimiser state and the per-step communication for one rank."""

    def __init__(self, args: argparse.Namespace, comm: Comm) -> None:
        from kernels.optim import AdamW

        self.args, self.comm = args, comm
        self.shapes = _mlp.Shapes(args.features, args.hidden, args.classes)
        self.lo, self.hi = shard(args.samples, comm.rank, comm.size)
        self.x, self.y = make_data(args, self.lo, self.hi, 0)
        elo, ehi = shard(args.eval_samples, comm.rank, comm.size)
        self.ex, self.ey = make_data(args, elo, ehi, args.samples)
        params = _mlp.init_params(self.shapes, args.seed, np.dtype(args.dtype))
        self.opt = AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        self.grad = np.zeros_like(params)
        # error feedback: residual + a spare buffer, so a refused step changes nothing
        self.feedback = ErrorFeedback(params.size, params.dtype)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []

    def reduce_grad(self) -> None:
        """Sum gradients over ranks: dense Allreduce, or top-k sparse with error feedback."""
        if self.args.topk_ratio <= 0.0:
            self.comm.allreduce_sum(self.grad)
            return
        k = max(1, int(self.args.topk_ratio * self.grad.size))
        idx, vals = self.feedback.step(self.grad, k)
        parts = self.comm.allgather((idx, vals))
        self.grad[...] = densify(np.concatenate([p[0] for p in parts]),
                                 np.concatenate([p[1] for p in parts]), self.grad.size)

    def run_epoch(self) -> dict[str, Any]:
        a, B = self.args, self.args.batch_size
        perm = np.random.default_rng(np.random.SeedSequence([a.seed, 1000 + self.epoch]))
        order = perm.permutation(a.samples)
        stats = np.zeros(2, np.float64)
        xb = np.empty((B, self.x.shape[1]), self.x.dtype)  # this rank's rows of a batch
        t0 = time.perf_counter()
        for s in range(a.samples // B):
            batch = order[s * B:(s + 1) * B]
            mine = np.sort(batch[(batch >= self.lo) & (batch < self.hi)]) - self.lo
            x = take_rows(self.x, mine, out=xb[:mine.size])
            loss, correct = _mlp.loss_and_grad(self.opt.params, self.shapes, x,
                                               self.y[mine], self.grad, B)
            stats += (loss, correct)
            self.reduce_grad()
            self.opt.step(self.grad)
        seconds = time.perf_counter() - t0
        self.comm.allreduce_sum(stats)
        n_seen = (a.samples // B) * B
        ev = np.array(_mlp.evaluate(self.opt.params, self.shapes, self.ex, self.ey), np.float64)
        self.comm.allreduce_sum(ev)
        self.epoch += 1
        return {"epoch": self.epoch, "train_loss": stats[0] / n_seen,
                "train_accuracy": stats[1] / n_seen, "eval_loss": ev[0] / a.eval_samples,
                "eval_accuracy": ev[1] / a.eval_samples, "seconds": seconds,
                "samples_per_s": n_seen / seconds if seconds > 0 else None}


def _meta(args: argparse.Namespace) -> str:
    keys = ("seed", "samples", "eval_samples", "features", "hidden", "classes", "batch_size",
            "lr", "weight_decay", "dtype", "topk_ratio")
    return json.dumps({k: getattr(args, k) for k in keys}, sort_keys=True)


def latest_checkpoint(folder: str | None) -> str | None:
    """Path of the highest-epoch ``ckpt-epochNNNN.npz`` in ``folder``, or None."""
    if not folder:
        return None
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(folder, "ckpt-epoch*.npz"))
             if (m := _CKPT.search(p))]
    return max(found)[1] if found else None


def save_checkpoint(tr: Trainer, folder: str) -> None:
    """Rank 0 writes the epoch's checkpoint; residuals are gathered from all ranks."""
    residuals = tr.comm.allgather(tr.feedback.residual if tr.args.topk_ratio > 0 else None)
    if tr.comm.rank != 0:
        return
    res = np.stack(residuals) if tr.args.topk_ratio > 0 else np.zeros((0,))
    write_npz(os.path.join(folder, f"ckpt-epoch{tr.epoch:04d}.npz"),
              params=tr.opt.params, exp_avg=tr.opt.exp_avg, exp_avg_sq=tr.opt.exp_avg_sq,
              step=tr.opt.step_count, epoch=tr.epoch, meta=_meta(tr.args),
              history=json.dumps(tr.history), residuals=res, ranks=tr.comm.size)


def load_checkpoint(tr: Trainer, path: str) -> None:
    """Restore a checkpoint written by :func:`save_checkpoint` (refuses a different run)."""
    with np.load(path) as ck:
        if str(ck["meta"]) != _meta(tr.args):
            raise SystemExit(f"{path} was written by a run with different settings:\n"
                             f"  {ck['meta']}\nuse a fresh --checkpoint-dir")
        tr.opt.params[...] = ck["params"]
        tr.opt.exp_avg[...] = ck["exp_avg"]
        tr.opt.exp_avg_sq[...] = ck["exp_avg_sq"]
        tr.opt.step_count = int(ck["step"])
        tr.epoch = int(ck["epoch"])
        tr.history = json.loads(str(ck["history"]))
        res = ck["residuals"]
        if res.size and res.shape[0] == tr.comm.size:
            tr.feedback.residual[...] = res[tr.comm.rank]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    comm = get_comm()
    threads = share_cores(comm)
    tr = Trainer(args, comm)
    ckpt = latest_checkpoint(args.checkpoint_dir)
    resumed = None
    if ckpt:
        load_checkpoint(tr, ckpt)
        resumed = tr.epoch
    while tr.epoch < args.epochs:
        tr.history.append(tr.run_epoch())
        if args.checkpoint_dir:
            save_checkpoint(tr, args.checkpoint_dir)
        if comm.rank == 0:
            h = tr.history[-1]
            print(f"epoch {h['epoch']}: loss {h['train_loss']:.4f} "
                  f"eval acc {h['eval_accuracy']:.4f} {h['samples_per_s']:.0f} samples/s",
                  flush=True)
    if comm.rank == 0 and args.metrics:
        write_json(args.metrics, {
            "app": "train", "ranks": comm.size, "threads_per_rank": threads,
            "resumed_from_epoch": resumed, "settings": json.loads(_meta(args)),
            "epochs": tr.history, "final": tr.history[-1] if tr.history else None,
            "param_checksum": float(np.abs(tr.opt.params.astype(np.float64)).sum()),
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
