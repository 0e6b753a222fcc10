"""Tasks and partitions end to end through `simulate` (in-process backend) that the other
integration tests leave out: the contiguous partition, and the file-backed tasks (a LibSVM file,
a directory of MNIST-format IDX files) written here into tmp_path.

Few clients, rounds and examples: the whole file runs in a few seconds.
"""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch

from fedsqueeze import wire
from fedsqueeze.compressors import build
from fedsqueeze.config import build_task, resolve
from fedsqueeze.simulation.runner import simulate
from fedsqueeze.tasks.data import load_digits, write_idx
from fedsqueeze.tracking import load_run


def _run(tmp_path, name: str, *overrides: str):
    """Resolve and simulate a config; check what every run must satisfy; return (cfg, result, rows)."""
    cfg = resolve(overrides=[f"out-dir={tmp_path}", f"name={name}", "target-accuracy=0.5", *overrides])
    result = simulate(cfg)
    assert result.run_dir == tmp_path / name
    run = load_run(result.run_dir)
    rows = run.rows
    assert result.summary["status"] == "completed"
    assert run.summary["status"] == "completed"
    assert [r["round"] for r in rows] == list(range(1, cfg.rounds + 1))
    assert rows == result.rows
    cum = 0
    for r in rows:
        assert r["clients_failed"] == 0, r
        assert r["clients_sampled"] == r["clients_ok"] == cfg.num_clients, r
        assert r["uplink_bytes"] > 0 and r["downlink_bytes"] > 0, r
        cum += r["uplink_bytes"]
        assert r["cum_uplink_bytes"] == cum, r
        # compressed: fewer bytes than the float32 updates would take
        assert r["uplink_bytes"] < r["dense_uplink_bytes"], r
        for key in ("train_loss", "test_loss", "test_accuracy", "compression_error"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r)
        assert 0.0 <= r["test_accuracy"] <= 1.0
    totals = run.summary["totals"]
    assert totals["uplink_bytes"] == cum == sum(r["uplink_bytes"] for r in rows)
    assert totals["downlink_bytes"] == sum(r["downlink_bytes"] for r in rows)
    assert totals["clients_failed"] == 0
    assert run.summary["diverged"] is False
    return cfg, result, rows


def _payload_len(spec: str, numel: int) -> int:
    """Bytes of one client's payload for a compressor whose payload length depends only on numel."""
    return len(wire.encode(build(spec).compress(torch.randn(numel))))


def _row_bytes(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> list[bytes]:
    """Each example (features and label) as bytes, sorted: a multiset of examples."""
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    y = np.asarray(y, dtype=np.int64)
    return sorted(xi.tobytes() + yi.tobytes() for xi, yi in zip(x, y, strict=True))


# ---- the contiguous partition --------------------------------------------------------------------


def test_contiguous_partition_on_digits(tmp_path):
    n = 4
    cfg, result, rows = _run(
        tmp_path, "contiguous", "task=digits-logreg", "partition=contiguous", f"num-clients={n}",
        "rounds=3", "local-steps=5", "batch-size=16", "lr=0.5", "compressor=topk(0.5)",
    )  # fmt: skip
    task = build_task(cfg)
    assert task.info["partition"] == "contiguous"
    assert result.summary["task"]["partition"] == "contiguous"

    # client i holds exactly the i-th chunk of the file order, chunks as equal as they can be
    data = load_digits()
    chunks = np.array_split(np.arange(len(data.y)), n)
    sizes = [len(c.train) + len(c.test) for c in task.clients]
    assert sizes == [len(c) for c in chunks] == [450, 449, 449, 449]
    for client, chunk in zip(task.clients, chunks, strict=True):
        assert not client.test_is_train
        held = _row_bytes(torch.cat([client.train.x, client.test.x]), torch.cat([client.train.y, client.test.y]))
        assert held == _row_bytes(data.x[chunk], data.y[chunk]), f"client {client.cid} is not chunk {client.cid}"
    # ... which is not what a random split would give: the label counts follow the file's chunks
    label_counts = [np.bincount(data.y[c], minlength=10).tolist() for c in chunks]
    assert [np.bincount(torch.cat([c.train.y, c.test.y]).numpy(), minlength=10).tolist() for c in task.clients] == (
        label_counts
    )

    # the bytes are the payload lengths: topk(0.5) sends the same number of bytes whatever the values
    d = task.num_params()
    assert all(r["uplink_bytes"] == n * _payload_len("topk(0.5)", d) for r in rows)
    assert all(r["dense_uplink_bytes"] == n * 4 * d for r in rows)

    # it learns: the loss and the suboptimality go down, accuracy is far above chance (0.1)
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    assert rows[-1]["subopt"] < rows[0]["subopt"]
    assert rows[-1]["test_accuracy"] > 0.6


# ---- a LibSVM file -------------------------------------------------------------------------------


def _write_libsvm(path, n: int, d: int, w: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sparse examples with labels -1/+1 from a linear rule; returns the dense (x, label in {0, 1})."""
    rng = np.random.default_rng(seed)
    x = np.where(rng.random((n, d)) < 0.5, np.round(rng.normal(0.0, 1.0, (n, d)), 3), 0.0)
    margin = x @ w
    x[np.abs(margin) < 1e-6, 0] = 1.0  # no example on the boundary
    y = np.where(x @ w > 0, 1, -1)
    lines = []
    for xi, yi in zip(x, y, strict=True):
        feats = " ".join(f"{j + 1}:{v:g}" for j, v in enumerate(xi) if v != 0.0)
        lines.append(f"{yi:+d} {feats}".rstrip())
    path.write_text("\n".join(lines) + "\n")
    return x.astype(np.float32), (y > 0).astype(np.int64)


def test_libsvm_task_end_to_end(tmp_path):
    d, n_train, n_test, clients = 12, 150, 60, 3
    w = np.random.default_rng(7).normal(0.0, 1.0, d)
    data = tmp_path / "data"
    data.mkdir()
    train_x, train_y = _write_libsvm(data / "train.libsvm", n_train, d, w, seed=1)
    _write_libsvm(data / "test.libsvm", n_test, d, w, seed=2)
    task_spec = f'libsvm-logreg(path="{data / "train.libsvm"}", test_path="{data / "test.libsvm"}", reg=0.01)'
    cfg, result, rows = _run(
        tmp_path, "libsvm", f"task={task_spec}", "partition=default", f"num-clients={clients}",
        "rounds=4", "local-steps=5", "batch-size=10", "lr=0.5", "compressor=topk(0.5)",
    )  # fmt: skip
    task = build_task(cfg)
    # the task's defaults: contiguous chunks of the file, each split into a local train and test
    # part; the test file is the global test set
    assert task.info["partition"] == "contiguous"
    assert task.num_classes == 2 and task.is_convex
    assert task.num_params() == d + 1  # binary: one weight vector and a bias
    assert len(task.global_test) == n_test
    chunks = np.array_split(np.arange(n_train), clients)
    for client, chunk in zip(task.clients, chunks, strict=True):
        assert not client.test_is_train and len(client.test) == round(0.2 * len(chunk))
        held = _row_bytes(torch.cat([client.train.x, client.test.x]), torch.cat([client.train.y, client.test.y]))
        assert held == _row_bytes(train_x[chunk], train_y[chunk])

    assert all(r["uplink_bytes"] == clients * _payload_len("topk(0.5)", task.num_params()) for r in rows)
    assert all(r["subopt"] >= -1e-9 and math.isfinite(r["subopt"]) for r in rows)
    assert (result.run_dir / "optimum.json").exists()
    # learning: loss and suboptimality fall; the held-out file is classified far above chance (0.5)
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    assert rows[-1]["subopt"] < rows[0]["subopt"]
    assert rows[-1]["test_accuracy"] >= 0.8


# ---- a directory of MNIST-format IDX files -------------------------------------------------------


def _quadrant_images(n: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 noise images with one bright quadrant; the label is the quadrant (linearly separable)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n).astype(np.uint8)
    x = rng.integers(0, 100, (n, side, side)).astype(np.int64)
    h = side // 2
    for i, q in enumerate(y):
        r, c = divmod(int(q), 2)
        x[i, r * h : (r + 1) * h, c * h : (c + 1) * h] += 150
    return x.astype(np.uint8), y


def test_mnist_idx_task_end_to_end(tmp_path):
    side, n_train, n_test, clients = 8, 200, 80, 4
    mnist = tmp_path / "data" / "mnist"
    mnist.mkdir(parents=True)
    x, y = _quadrant_images(n_train, side, seed=0)
    write_idx(mnist / "train-images-idx3-ubyte", x)
    write_idx(mnist / "train-labels-idx1-ubyte", y)
    tx, ty = _quadrant_images(n_test, side, seed=1)
    for name, array in (("t10k-images-idx3-ubyte", tx), ("t10k-labels-idx1-ubyte", ty)):
        write_idx(mnist / name, array)  # the test pair gzip-compressed, as MNIST is distributed
        with gzip.open(mnist / f"{name}.gz", "wb") as fh:
            fh.write((mnist / name).read_bytes())
        (mnist / name).unlink()
    cfg, result, rows = _run(
        tmp_path, "mnist", f'task=mnist-mlp(path="{mnist}", hidden=[16])', "partition=iid",
        f"num-clients={clients}", "rounds=3", "local-steps=5", "batch-size=16", "lr=0.2",
        "compressor=qsgd(levels=4)",
    )  # fmt: skip
    task = build_task(cfg)
    assert task.input_shape == (1, side, side) and task.num_classes == 4
    assert len(task.global_test) == n_test  # the t10k files, not the clients' held-out examples
    assert torch.equal(task.global_test.y, torch.from_numpy(ty.astype(np.int64)))
    assert torch.allclose(task.global_test.x, torch.from_numpy(tx[:, None].astype(np.float32) / 255.0))
    assert sum(len(c.train) + len(c.test) for c in task.clients) == n_train
    assert task.num_params() == side * side * 16 + 16 + 16 * 4 + 4

    # qsgd(levels=4) packs about 3 bits per coordinate instead of 32
    assert all(r["uplink_bytes"] < r["dense_uplink_bytes"] / 4 for r in rows)
    # learning: the loss falls and the four classes are told apart far above chance (0.25)
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    assert rows[-1]["test_accuracy"] >= 0.6


@pytest.mark.parametrize("task", ["libsvm-logreg", "mnist-mlp"])
def test_file_tasks_fail_cleanly_without_their_files(tmp_path, task):
    """A missing data file is a ConfigError naming the task before any round runs; no run directory is left."""
    from fedsqueeze.config import ConfigError

    out = tmp_path / "runs"
    cfg = resolve(overrides=[f"out-dir={out}", "num-clients=3", "rounds=1",
                             f'task={task}(path="{tmp_path / "missing"}")'])  # fmt: skip
    with pytest.raises(ConfigError) as info:
        simulate(cfg)
    assert info.value.key == "task" and "missing" in str(info.value)
    assert not out.exists() or not any(out.iterdir())
