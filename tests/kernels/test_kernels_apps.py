"""The reference workloads: resume after preemption, and 1 vs 2 MPI ranks agree."""

from __future__ import annotations

import json

import numpy as np
import pytest

TRAIN = ["--seed", "3", "--samples", "2048", "--eval-samples", "512", "--features", "12",
         "--hidden", "24", "--classes", "5", "--batch-size", "128"]


def _ckpt(folder, epoch):
    with np.load(folder / f"ckpt-epoch{epoch:04d}.npz") as ck:
        return {k: ck[k] for k in ("params", "exp_avg", "exp_avg_sq", "step")}


def test_train_resumes_from_latest_checkpoint(tmp_path, run_app):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_app("train", *TRAIN, "--epochs", "3", "--checkpoint-dir", str(straight),
            "--metrics", str(tmp_path / "a.json"))
    run_app("train", *TRAIN, "--epochs", "1", "--checkpoint-dir", str(resumed))
    run_app("train", *TRAIN, "--epochs", "3", "--checkpoint-dir", str(resumed),
            "--metrics", str(tmp_path / "b.json"))
    a, b = _ckpt(straight, 3), _ckpt(resumed, 3)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-7)
    ma, mb = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert mb["resumed_from_epoch"] == 1 and ma["resumed_from_epoch"] is None
    assert [e["epoch"] for e in mb["epochs"]] == [1, 2, 3]
    assert mb["final"]["eval_accuracy"] == pytest.approx(ma["final"]["eval_accuracy"], abs=1e-3)
    # it learns: better than chance (0.2) and the loss falls
    assert ma["final"]["eval_accuracy"] > 0.5
    assert ma["epochs"][-1]["train_loss"] < ma["epochs"][0]["train_loss"]
    assert not list(resumed.glob(".tmp-*"))  # atomic writes leave no temp files


def test_train_refuses_checkpoint_from_other_settings(tmp_path, run_app):
    run_app("train", *TRAIN, "--epochs", "1", "--checkpoint-dir", str(tmp_path))
    proc = run_app("train", *TRAIN, "--lr", "0.5", "--epochs", "2", "--checkpoint-dir",
                   str(tmp_path), ok=False)
    assert proc.returncode != 0 and "different settings" in proc.stderr


def test_train_with_topk_compression_still_learns(tmp_path, run_app):
    run_app("train", *TRAIN, "--epochs", "2", "--topk-ratio", "0.1",
            "--metrics", str(tmp_path / "m.json"))
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["final"]["eval_accuracy"] > 0.4


def test_kmeans_app_follows_the_public_steps(tmp_path, run_app):
    # the app's rank steps on a tile-major copy of its shard (kernels.cluster.KMeansTiles):
    # the same centroids and inertias as a loop over kmeans_assign / kmeans_partial_sums
    from kernels import cluster
    from kernels.apps import kmeans as app

    argv = ["--rows", "3000", "--dim", "5", "--k", "4", "--iters", "6"]
    run_app("kmeans", *argv, "--out", str(tmp_path / "k.json"))
    got = json.loads((tmp_path / "k.json").read_text())
    args = app.parse_args(argv)
    x, c = app.blobs(args, 0, args.rows), app.blobs(args, 0, args.k)
    inertias = []
    for _ in range(args.iters):
        labels, dist = cluster.kmeans_assign(x, c)
        sums, counts = cluster.kmeans_partial_sums(x, labels, args.k)
        inertias.append(float(np.nansum(dist, dtype=np.float64)))
        c = cluster.centroids_from_sums(sums, counts, c, x.dtype)
    np.testing.assert_allclose(got["centroids"], c, rtol=1e-10)
    np.testing.assert_allclose(got["inertia"], inertias, rtol=1e-10)
    assert inertias[-1] < inertias[0]


@pytest.mark.mpi
def test_two_ranks_agree_with_one(tmp_path, run_app):
    for ranks in (1, 2):
        d = tmp_path / f"r{ranks}"
        run_app("train", *TRAIN, "--epochs", "2", "--dtype", "float64",
                "--checkpoint-dir", str(d / "ck"), "--metrics", str(d / "train.json"), ranks=ranks)
        run_app("search", "--rows", "5000", "--dim", "16", "--queries", "4", "--k", "5",
                "--repeats", "1", "--out", str(d / "search.json"), ranks=ranks)
        run_app("kmeans", "--rows", "6000", "--dim", "4", "--k", "3", "--iters", "5",
                "--out", str(d / "kmeans.json"), ranks=ranks)
    load = lambda r, n: json.loads((tmp_path / f"r{r}" / n).read_text())
    t1, t2 = load(1, "train.json"), load(2, "train.json")
    assert t2["ranks"] == 2 and t1["ranks"] == 1
    np.testing.assert_allclose(_ckpt(tmp_path / "r2" / "ck", 2)["params"],
                               _ckpt(tmp_path / "r1" / "ck", 2)["params"], rtol=1e-7, atol=1e-9)
    assert t2["final"]["train_loss"] == pytest.approx(t1["final"]["train_loss"], rel=1e-9)
    s1, s2 = load(1, "search.json"), load(2, "search.json")
    assert s1["indices"] == s2["indices"]
    np.testing.assert_allclose(s2["scores"], s1["scores"], rtol=1e-6)
    k1, k2 = load(1, "kmeans.json"), load(2, "kmeans.json")
    np.testing.assert_allclose(k2["centroids"], k1["centroids"], rtol=1e-10)
    np.testing.assert_allclose(k2["inertia"], k1["inertia"], rtol=1e-10)


@pytest.mark.mpi
def test_two_ranks_with_topk_compression_learn(tmp_path, run_app):
    # top-k of each rank's gradient is not top-k of the sum, so no 1-vs-2 equality here
    run_app("train", *TRAIN, "--epochs", "2", "--topk-ratio", "0.1",
            "--checkpoint-dir", str(tmp_path / "ck"), "--metrics", str(tmp_path / "m.json"),
            ranks=2)
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["ranks"] == 2 and m["final"]["eval_accuracy"] > 0.4
    with np.load(tmp_path / "ck" / "ckpt-epoch0002.npz") as ck:
        assert ck["residuals"].shape[0] == 2  # each rank's error feedback is kept
