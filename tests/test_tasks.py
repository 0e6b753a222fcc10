"""Tasks: data loaders, partitions, models, the exact logistic objective, the task registry and user tasks."""

from __future__ import annotations

import gzip
import struct
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.tasks import (
    MLP,
    ClientData,
    Dataset,
    LogisticObjective,
    LogisticRegression,
    SmallCNN,
    Task,
    TaskError,
    available_tasks,
    build_task,
    flat_params,
    load_digits,
    load_idx_dataset,
    load_libsvm,
    load_mnist,
    make_synthetic,
    make_task,
    parse_partition,
    partition_indices,
    read_idx,
    set_flat_params,
    split_train_test,
    write_idx,
)

# --------------------------------------------------------------------------- data sources


def test_digits_shape_and_range():
    d = load_digits()
    assert len(d) == 1797 and d.num_classes == 10
    assert d.x.dtype == np.float32 and d.y.dtype == np.int64
    assert d.feature_shape == (1, 8, 8)
    assert d.x.min() == 0.0 and d.x.max() == 1.0
    assert set(np.unique(d.y)) == set(range(10))


def test_synthetic_is_seeded_and_naturally_federated():
    a = make_synthetic(8, alpha=0.5, beta=0.5, seed=3)
    b = make_synthetic(8, alpha=0.5, beta=0.5, seed=3)
    c = make_synthetic(8, alpha=0.5, beta=0.5, seed=4)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert not np.array_equal(a.y[:50], c.y[:50]) or not np.array_equal(a.x[:50], c.x[:50])
    assert a.feature_shape == (60,) and a.num_classes == 10
    counts = np.bincount(a.groups)
    assert len(counts) == 8 and counts.min() >= 50
    capped = make_synthetic(8, 1.0, 1.0, seed=0, max_samples=60)
    assert np.bincount(capped.groups).max() <= 60


def test_synthetic_heterogeneity_knob():
    # with alpha = beta = 0 the clients share the input mean's distribution; with large beta their means spread
    def spread(beta):
        d = make_synthetic(20, alpha=0.0, beta=beta, seed=1, max_samples=200)
        means = np.stack([d.x[d.groups == k].mean(0) for k in range(20)])
        return means.mean(1).std()

    assert spread(5.0) > 2 * spread(0.0)


def _write_idx_by_hand(path, array, code):
    # independent of write_idx: magic 00 00 <type> <ndim>, big-endian uint32 dims, big-endian data
    header = bytes([0, 0, code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    path.write_bytes(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def test_idx_reader_parses_hand_written_files(tmp_path):
    imgs = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    _write_idx_by_hand(tmp_path / "imgs", imgs, 0x08)
    assert np.array_equal(read_idx(tmp_path / "imgs"), imgs)
    ints = np.array([1, -2, 70000], dtype=np.int32)
    _write_idx_by_hand(tmp_path / "ints", ints, 0x0C)
    got = read_idx(tmp_path / "ints")
    assert got.dtype == np.int32 and got.tolist() == [1, -2, 70000]
    floats = np.array([[1.5, -2.25]], dtype=np.float64)
    _write_idx_by_hand(tmp_path / "f", floats, 0x0E)
    assert np.array_equal(read_idx(tmp_path / "f"), floats)


def test_idx_round_trip_and_gzip(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (7, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / "a", a)
    assert np.array_equal(read_idx(tmp_path / "a"), a)
    with gzip.open(tmp_path / "a.gz", "wb") as fh:
        fh.write((tmp_path / "a").read_bytes())
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\x00\x00", "too short"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "type code"),
        (b"\x00\x00\x08\x00", "zero dimensions"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "header"),
        (b"\x00\x00\x08\x02" + struct.pack(">II", 3, 4) + bytes(11), "truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + bytes(5), "trailing"),
        (b"\x00\x00\x0c\x01" + struct.pack(">I", 2) + bytes(7), "truncated"),
    ],
)
def test_idx_reader_rejects_corrupt_files(tmp_path, raw, message):
    p = tmp_path / "bad-idx"
    p.write_bytes(raw)
    with pytest.raises(TaskError, match=message):
        read_idx(p)


def test_idx_huge_declared_dims_do_not_allocate(tmp_path):
    p = tmp_path / "huge"
    p.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", 2**31, 2**31, 2**31) + bytes(10))
    with pytest.raises(TaskError, match="truncated"):
        read_idx(p)


def _write_mnist_dir(directory, n_train=60, n_test=20, side=28, gz=False):
    rng = np.random.default_rng(0)
    directory.mkdir(exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        if n == 0:
            continue
        write_idx(directory / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, side, side)).astype(np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
        if gz:
            for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
                src = directory / f"{prefix}-{kind}"
                with gzip.open(str(src) + ".gz", "wb") as fh:
                    fh.write(src.read_bytes())
                src.unlink()
    return directory


def test_mnist_directory_loader(tmp_path):
    train, test = load_mnist(_write_mnist_dir(tmp_path / "mnist", gz=True))
    assert train.feature_shape == (1, 28, 28) and len(train) == 60 and train.num_classes == 10
    assert 0.0 <= train.x.min() and train.x.max() <= 1.0
    assert test is not None and len(test) == 20
    train_only, none = load_mnist(_write_mnist_dir(tmp_path / "only", n_test=0))
    assert none is None and len(train_only) == 60
    with pytest.raises(TaskError, match="lacks"):
        load_mnist(tmp_path / "only" / "..")
    with pytest.raises(TaskError, match="not a directory"):
        load_mnist(tmp_path / "missing")


def test_idx_dataset_count_mismatch(tmp_path):
    write_idx(tmp_path / "x", np.zeros((5, 4, 4), np.uint8))
    write_idx(tmp_path / "y", np.zeros(4, np.uint8))
    with pytest.raises(TaskError, match="different numbers"):
        load_idx_dataset(tmp_path / "x", tmp_path / "y")


def test_libsvm_loader_maps_labels(tmp_path):
    p = tmp_path / "mush.txt"
    p.write_text("2 1:1 3:0.5\n1 2:1\n2 1:0.25 2:0.75 3:1\n1 3:2\n")
    d = load_libsvm(p)
    assert d.num_classes == 2 and d.y.tolist() == [1, 0, 1, 0]
    assert d.x.shape == (4, 3) and d.x.dtype == np.float32
    assert d.x[0].tolist() == [1.0, 0.0, 0.5] and d.x[3].tolist() == [0.0, 0.0, 2.0]
    q = tmp_path / "pm1.txt"
    q.write_text("-1 1:1\n+1 2:1\n-1 1:2\n")
    assert load_libsvm(q).y.tolist() == [0, 1, 0]


def test_libsvm_loader_errors(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        load_libsvm(tmp_path / "nope")
    bad = tmp_path / "bad.txt"
    bad.write_text("1 1:1\nnot a line at all\n")
    with pytest.raises(TaskError, match="cannot be parsed"):
        load_libsvm(bad)
    one = tmp_path / "one.txt"
    one.write_text("1 1:1\n1 2:1\n")
    with pytest.raises(TaskError, match="single label"):
        load_libsvm(one)


# --------------------------------------------------------------------------- partitions


def _labels(n=600, k=10, seed=0):
    return np.random.default_rng(seed).integers(0, k, n)


@settings(max_examples=40, deadline=None)
@given(
    n_clients=st.integers(1, 30),
    seed=st.integers(0, 2**16),
    spec=st.sampled_from(["iid", "contiguous", "dirichlet(0.1)", "dirichlet(alpha=5)", "shards(2)", "shards(3)"]),
)
def test_partition_assigns_every_example_exactly_once(n_clients, seed, spec):
    labels = _labels(300, 10, seed)
    if spec.startswith("shards") and n_clients * int(spec[7]) < 10:
        with pytest.raises(TaskError, match="covers only"):
            partition_indices(labels, n_clients, spec, seed)
        return
    parts = partition_indices(labels, n_clients, spec, seed)
    assert len(parts) == n_clients
    assert all(len(p) >= 1 for p in parts)
    allidx = np.concatenate(parts)
    assert np.array_equal(np.sort(allidx), np.arange(len(labels)))


def test_partition_is_seeded():
    labels = _labels()
    a = partition_indices(labels, 10, "dirichlet(0.5)", 7)
    b = partition_indices(labels, 10, "dirichlet(0.5)", 7)
    c = partition_indices(labels, 10, "dirichlet(0.5)", 8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_contiguous_chunks_keep_file_order():
    parts = partition_indices(np.zeros(10, np.int64), 3, "contiguous", 0)
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def _label_skew(parts, labels, k=10):
    """Mean total-variation distance between each client's label distribution and the global one."""
    glob = np.bincount(labels, minlength=k) / len(labels)
    return np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - glob).sum() for p in parts])


def test_dirichlet_skew_increases_as_alpha_falls():
    labels = _labels(3000)
    skew = {
        a: np.mean([_label_skew(partition_indices(labels, 20, f"dirichlet({a})", s), labels) for s in range(3)])
        for a in (100.0, 1.0, 0.1)
    }
    assert skew[100.0] < skew[1.0] < skew[0.1]
    assert skew[100.0] < 0.15 and skew[0.1] > 0.5


@pytest.mark.parametrize("c", [1, 2, 3, 5])
def test_shards_give_c_classes_per_client(c):
    labels = _labels(2000)
    parts = partition_indices(labels, 20, f"shards({c})", 0)
    assert [len(np.unique(labels[p])) for p in parts] == [c] * 20
    # each class is shared by equally many clients (20 * c / 10)
    holders = np.zeros(10, int)
    for p in parts:
        holders[np.unique(labels[p])] += 1
    assert holders.tolist() == [2 * c] * 10


def test_natural_partition_uses_groups():
    d = make_synthetic(5, seed=0, max_samples=80)
    parts = partition_indices(d.y, 5, "natural", 0, groups=d.groups)
    assert [len(p) for p in parts] == np.bincount(d.groups).tolist()
    with pytest.raises(TaskError, match="has 5 clients"):
        partition_indices(d.y, 4, "natural", 0, groups=d.groups)
    with pytest.raises(TaskError, match="naturally federated"):
        partition_indices(d.y, 5, "natural", 0)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("zipf(2)", "unknown partition 'zipf'.*'dirichlet'.*'iid'"),
        ("dirichlet", "needs its parameter 'alpha'"),
        ("dirichlet(-1)", "must be > 0"),
        ("dirichlet(beta=1)", "no parameter 'beta'; valid parameters: 'alpha'"),
        ("shards(1.5)", "must be an integer"),
        ("iid(3)", "at most 0"),
        ("dirichlet(x)", "not a number"),
        ("((", "does not parse"),
    ],
)
def test_partition_spec_errors(spec, message):
    with pytest.raises(TaskError, match=message):
        parse_partition(spec)


def test_partition_spec_forms():
    assert parse_partition("Dirichlet(0.3)") == parse_partition("dirichlet(alpha=0.3)")
    assert str(parse_partition("shards")) == "shards(classes=2)"


def test_partition_impossible_cases():
    with pytest.raises(TaskError, match="only 5"):
        partition_indices(np.zeros(5, np.int64), 6, "iid", 0)
    with pytest.raises(TaskError, match="covers only"):
        partition_indices(_labels(), 3, "shards(2)", 0)
    with pytest.raises(TaskError, match="only 10 classes"):
        partition_indices(_labels(), 30, "shards(11)", 0)
    # tiny alpha with as many clients as examples: still everyone gets one
    parts = partition_indices(np.arange(12) % 3, 12, "dirichlet(0.01)", 0)
    assert sorted(len(p) for p in parts) == [1] * 12


def test_train_test_split():
    rng = np.random.default_rng(0)
    idx = np.arange(100, 150)
    train, test = split_train_test(idx, 0.2, rng)
    assert len(test) == 10 and len(train) == 40
    assert np.array_equal(np.sort(np.concatenate([train, test])), idx)
    assert split_train_test(np.array([4]), 0.2, rng)[1].size == 0
    assert len(split_train_test(np.array([4, 5]), 0.01, rng)[0]) == 1
    with pytest.raises(TaskError, match="test_fraction"):
        split_train_test(idx, 1.0, rng)


# --------------------------------------------------------------------------- models


def test_model_shapes():
    x8 = torch.rand(5, 1, 8, 8)
    assert LogisticRegression(64, 10)(x8).shape == (5, 10)
    assert LogisticRegression(64, 2)(x8).shape == (5, 2)
    assert MLP(64, 10, (32, 16))(x8).shape == (5, 10)
    assert SmallCNN((1, 8, 8), 10)(x8).shape == (5, 10)
    assert SmallCNN((1, 28, 28), 10)(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(TaskError):
        MLP(64, 10, ())


def test_binary_logistic_is_sigmoid_regression():
    torch.manual_seed(0)
    m = LogisticRegression(4, 2)
    assert m.linear.weight.shape == (1, 4) and m.linear.bias.shape == (1,)
    assert float(flat_params(m).abs().sum()) == 0.0  # x^0 = 0
    torch.nn.init.normal_(m.linear.weight)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    z = m.linear(x).squeeze(1)
    assert torch.allclose(F.cross_entropy(m(x), y), F.binary_cross_entropy_with_logits(z, y.float()), atol=1e-6)
    assert torch.allclose(torch.softmax(m(x), 1)[:, 1], torch.sigmoid(z), atol=1e-6)


def test_flat_params_round_trip():
    m = MLP(8, 3, (5,))
    v = torch.arange(sum(p.numel() for p in m.parameters()), dtype=torch.float32)
    set_flat_params(m, v)
    assert torch.equal(flat_params(m), v)
    with pytest.raises(TaskError, match="shape"):
        set_flat_params(m, v[:-1])


# --------------------------------------------------------------------------- the convex objective


def _clients(k, m=40, d=5, n=3, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, k))
    feats, labs = [], []
    for _ in range(n):
        a = rng.normal(size=(m, d)).astype(np.float32)
        y = np.argmax(a @ w + rng.gumbel(size=(m, k)), axis=1)
        feats.append(a)
        labs.append(y)
    return feats, labs


def _clients_unequal(k, d=4, sizes=(7, 30, 13), seed=1):
    rng = np.random.default_rng(seed)
    feats = [rng.normal(size=(m, d)).astype(np.float32) for m in sizes]
    labs = [rng.integers(0, k, m) for m in sizes]
    return feats, labs


@pytest.mark.parametrize("k", [2, 4])
def test_objective_matches_task_loss_and_autograd(k):
    feats, labs = _clients_unequal(k)
    reg = 0.05
    obj = LogisticObjective(feats, labs, k, reg)
    model = LogisticRegression(4, k).double()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    x = flat_params(model)
    task = Task("t", lambda: model, [], None, k, (4,), reg=reg)  # type: ignore[arg-type]
    fis, grads = [], []
    for i, (a, y) in enumerate(zip(feats, labs, strict=True)):
        model.zero_grad()
        loss = task.loss_fn(model, torch.tensor(a, dtype=torch.float64), torch.tensor(y))
        loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert obj.f_i(i, x) == pytest.approx(loss.item(), rel=1e-12)
        assert torch.allclose(obj.grad_i(i, x), g, rtol=1e-10, atol=1e-12)
        fis.append(loss.item())
        grads.append(g)
    assert obj.f(x) == pytest.approx(np.mean(fis), rel=1e-12)
    assert torch.allclose(obj.grad(x), torch.stack(grads).mean(0), atol=1e-12)
    hess = torch.autograd.functional.hessian(lambda v: _f_torch(obj, v), x)
    assert torch.allclose(obj.hessian(x), hess, atol=1e-10)
    v = torch.randn(obj.dim, dtype=torch.float64)
    assert torch.allclose(obj.hvp(x, v), hess @ v, atol=1e-10)


def _f_torch(obj, v):
    # f written directly with autograd-able torch ops, as an independent reference for the Hessian
    total = 0.0
    model = LogisticRegression(obj.num_features, obj.num_classes).double()
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    w, b = torch.split(v, sizes)
    w = w.reshape(params[0].shape)
    for i in range(obj.num_clients):
        rows = obj._rows(i)
        a = obj._a[rows][:, :-1]
        z = a @ w.T + b
        if obj.binary:
            z = torch.cat([torch.zeros_like(z), z], 1)
        total = total + F.cross_entropy(z, obj._y[rows]) + 0.5 * obj.reg * v.pow(2).sum()
    return total / obj.num_clients


def _sklearn_fit(feats, labs, reg):
    from sklearn.linear_model import LogisticRegression as SK

    a = np.concatenate(feats).astype(np.float64)
    y = np.concatenate(labs)
    # our regulariser covers the bias: append a constant feature and let sklearn regularise it as a weight.
    # sum-loss form: C * sum_s loss_s + 1/2 ||w||^2 == N C (mean loss + 1/(2 N C) ||w||^2), so C = 1 / (N reg)
    aug = np.hstack([a, np.ones((len(a), 1))])
    sk = SK(C=1.0 / (len(a) * reg), fit_intercept=False, tol=1e-12, max_iter=10000).fit(aug, y)
    return sk


def test_binary_optimum_matches_sklearn():
    feats, labs = _clients(2, m=50, d=5, n=4)
    reg = 0.01
    obj = LogisticObjective(feats, labs, 2, reg)
    opt = obj.optimum()
    assert opt.grad_norm < 1e-10
    assert float(obj.grad(opt.x).norm()) < 1e-10
    coef = _sklearn_fit(feats, labs, reg).coef_[0]  # [w, b]
    assert np.allclose(opt.x.numpy(), coef, atol=1e-6)


def test_multinomial_optimum_matches_sklearn():
    feats, labs = _clients(3, m=60, d=4, n=3, seed=2)
    reg = 0.02
    obj = LogisticObjective(feats, labs, 3, reg)
    opt = obj.optimum()
    assert opt.grad_norm < 1e-10
    coef = _sklearn_fit(feats, labs, reg).coef_  # (3, d + 1): [W | b]
    expected = np.concatenate([coef[:, :-1].reshape(-1), coef[:, -1]])  # flat layout [W row-major, b]
    assert np.allclose(opt.x.numpy(), expected, atol=1e-6)
    assert obj.f(opt.x) == pytest.approx(opt.f, abs=1e-15)
    m = obj.metrics(opt.x)
    assert abs(m["subopt"]) < 1e-14 and m["dist_sq"] == 0.0 and m["grad_norm_sq"] < 1e-20


def test_optimum_without_bias_and_newton_cg_path(monkeypatch):
    import fedsqueeze.tasks.objective as objective

    feats, labs = _clients(3, m=50, d=6, n=2, seed=5)
    dense = LogisticObjective(feats, labs, 3, 0.05, bias=False).optimum()
    monkeypatch.setattr(objective, "DENSE_HESSIAN_MAX_DIM", 1)
    cg = LogisticObjective(feats, labs, 3, 0.05, bias=False).optimum()
    assert dense.x.numel() == 18 and cg.grad_norm < 1e-10
    assert torch.allclose(dense.x, cg.x, atol=1e-9)


@pytest.mark.parametrize("k", [2, 3])
def test_smoothness_constants_bound_the_hessian(k):
    feats, labs = _clients_unequal(k, d=5, sizes=(9, 25, 16))
    obj = LogisticObjective(feats, labs, k, 0.1)
    gen = torch.Generator().manual_seed(0)
    for scale in (0.0, 0.5, 3.0):
        for _ in range(3):
            x = scale * torch.randn(obj.dim, generator=gen, dtype=torch.float64)
            assert float(torch.linalg.eigvalsh(obj.hessian(x))[-1]) <= obj.L * (1 + 1e-12)
            for i in range(obj.num_clients):
                assert float(torch.linalg.eigvalsh(obj.hessian(x, i))[-1]) <= obj.L_i[i] * (1 + 1e-12)
    assert obj.mu == 0.1 and obj.L <= np.mean(obj.L_i) + 1e-12
    assert obj.L_tilde == pytest.approx(np.sqrt(np.mean(np.square(obj.L_i))))
    if k == 2:
        # at x = 0 every sigmoid'(z) = 1/4, so the binary constants are attained there: they are exact
        h0 = obj.hessian(torch.zeros(obj.dim, dtype=torch.float64))
        assert float(torch.linalg.eigvalsh(h0)[-1]) == pytest.approx(obj.L, rel=1e-12)
        assert float(torch.linalg.eigvalsh(obj.hessian(torch.zeros(obj.dim), 1))[-1]) == pytest.approx(obj.L_i[1])


def test_objective_errors():
    feats, labs = _clients(2)
    with pytest.raises(TaskError, match="reg must be > 0"):
        LogisticObjective(feats, labs, 2, 0.0)
    obj = LogisticObjective(feats, labs, 2, 0.1)
    with pytest.raises(TaskError, match="expects 6"):
        obj.f(torch.zeros(5))
    with pytest.raises(TaskError, match="out of range"):
        obj.f_i(3, torch.zeros(6))


# --------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn", "digits-logreg"])
def test_digits_tasks_build_and_train_step(name):
    task = build_task(name, num_clients=7, partition="dirichlet(0.5)", seed=1)
    assert task.num_clients == 7 and task.num_classes == 10 and task.input_shape == (1, 8, 8)
    total = sum(len(c.train) + (0 if c.test_is_train else len(c.test)) for c in task.clients)
    assert total == 1797 and len(task.global_test) == sum(len(c.test) for c in task.clients)
    m1, m2 = task.new_model(seed=3), task.new_model(seed=3)
    assert torch.equal(flat_params(m1), flat_params(m2))
    c = task.clients[0]
    loss = task.loss_fn(m1, c.train.x, c.train.y)
    loss.backward()
    test_loss, acc = task.evaluate(m1)
    assert np.isfinite(test_loss) and 0.0 <= acc <= 1.0
    assert task.is_convex == (name == "digits-logreg")
    assert task.info["partition"] == "dirichlet(alpha=0.5)"


def test_build_task_is_deterministic():
    a = build_task("digits-mlp", num_clients=5, partition="shards(2)", seed=4)
    b = build_task("digits-mlp", num_clients=5, partition="shards(2)", seed=4)
    for ca, cb in zip(a.clients, b.clients, strict=True):
        assert torch.equal(ca.train.y, cb.train.y) and torch.equal(ca.test.x, cb.test.x)


def test_convex_task_loss_is_the_client_objective():
    task = build_task(
        "synthetic-logreg", num_clients=4, seed=0, alpha=0.5, beta=0.5, max_samples=80, num_features=12, num_classes=4
    )
    assert task.info["partition"] == "natural" and task.is_convex
    model = task.new_model()
    x = flat_params(model)
    for i, c in enumerate(task.clients):
        assert task.loss_fn(model, c.train.x, c.train.y).item() == pytest.approx(task.objective.f_i(i, x), rel=1e-5)
    opt = task.optimum
    assert opt is not None and opt.grad_norm < 1e-10
    set_flat_params(model, opt.x)
    metrics = task.convex_metrics(model)
    assert metrics["subopt"] < 1e-6 and metrics["dist_sq"] < 1e-10  # float32 model parameters
    assert set(task.convex_metrics(opt.x)) == {"subopt", "grad_norm_sq", "dist_sq"}


def test_synthetic_task_repartitioned():
    task = build_task("synthetic-logreg", num_clients=4, partition="iid", seed=0, max_samples=80)
    sizes = [len(c.train) + len(c.test) for c in task.clients]
    assert max(sizes) - min(sizes) <= 1


def test_libsvm_task_contiguous_uses_all_data(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(40):
        feats = " ".join(f"{j + 1}:1" for j in range(8) if rng.random() < 0.4)
        lines.append(f"{rng.integers(1, 3)} {feats}")
    p = tmp_path / "toy.libsvm"
    p.write_text("\n".join(lines) + "\n")
    task = build_task("libsvm-logreg", num_clients=4, seed=0, path=str(p), **{"test-fraction": 0.0, "reg": 0.1})
    assert task.info["partition"] == "contiguous"
    assert [len(c.train) for c in task.clients] == [10, 10, 10, 10]
    assert all(c.test_is_train for c in task.clients) and len(task.global_test) == 40
    assert task.num_classes == 2 and task.num_params() == 9
    assert task.objective.reg == 0.1 and task.optimum.grad_norm < 1e-10


def test_mnist_tasks(tmp_path):
    d = _write_mnist_dir(tmp_path / "m", n_train=50, n_test=10)
    task = build_task("mnist-cnn", num_clients=5, seed=0, path=str(d))
    assert len(task.global_test) == 10 and task.input_shape == (1, 28, 28)
    model = task.new_model(0)
    assert model(task.clients[0].train.x).shape[1] == 10
    mlp = build_task("mnist-mlp", num_clients=5, seed=0, path=str(d), hidden="32")
    assert task.evaluate(model)[1] >= 0.0 and mlp.new_model(0)(mlp.global_test.x).shape == (10, 10)


def test_task_errors():
    with pytest.raises(TaskError, match="unknown task 'digits-rnn'.*'digits-mlp'"):
        build_task("digits-rnn")
    with pytest.raises(TaskError, match="no option 'lr'; valid options: 'hidden', 'test_fraction'"):
        build_task("digits-mlp", lr=0.1)
    with pytest.raises(TaskError, match="needs the option 'path'"):
        build_task("libsvm-logreg")
    with pytest.raises(TaskError, match="reg must be > 0"):
        build_task("digits-logreg", reg=0)
    with pytest.raises(TaskError, match="not a valid float"):
        build_task("digits-logreg", reg="lots")
    with pytest.raises(TaskError, match="unknown partition"):
        build_task("digits-mlp", partition="random")
    with pytest.raises(TaskError, match="num_clients"):
        build_task("digits-mlp", num_clients=0)
    with pytest.raises(TaskError, match="only 1797"):
        build_task("digits-mlp", num_clients=2000)
    assert {
        "digits-mlp",
        "digits-cnn",
        "digits-logreg",
        "synthetic-logreg",
        "libsvm-logreg",
        "mnist-mlp",
        "mnist-cnn",
    } <= set(available_tasks())


# --------------------------------------------------------------------------- user tasks

USER_MODULE = textwrap.dedent(
    """
    import numpy as np
    import torch
    from torch import nn
    from fedsqueeze.tasks import Dataset, make_task

    def data(n=120, d=6):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(n, d)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64)
        return x, y

    def as_task(num_clients, partition, seed, width=8):
        x, y = data()
        return make_task("mine", lambda: nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 2)),
                         Dataset("mine", x, y, 2), num_clients=num_clients, partition=partition, seed=seed)

    def as_arrays(num_clients):
        return (lambda: nn.Linear(6, 2)), data()

    def as_clients():
        x, y = data()
        return (lambda: nn.Linear(6, 2)), [(x[:50], y[:50], x[50:60], y[50:60]), (x[60:], y[60:], x[:0], y[:0])]

    def broken():
        return 42
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    pkg = tmp_path / "myproj"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "fedtask.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "myproj.fedtask"
    for mod in ("myproj.fedtask", "myproj"):
        sys.modules.pop(mod, None)


def test_user_task_returning_a_task(user_module):
    task = build_task(f"{user_module}:as_task", num_clients=4, partition="dirichlet(1.0)", seed=2, width=5)
    assert isinstance(task, Task) and task.num_clients == 4
    model = task.new_model(0)
    assert model[0].out_features == 5
    c = task.clients[1]
    task.loss_fn(model, c.train.x, c.train.y).backward()
    assert task.info["task"] == f"{user_module}:as_task" and task.info["options"] == {"width": 5}


def test_user_task_returning_model_and_arrays(user_module):
    task = build_task(f"{user_module}:as_arrays", num_clients=3, seed=0)
    assert task.num_clients == 3 and task.info["partition"] == "iid"
    assert sum(len(c.train) + len(c.test) for c in task.clients) == 120
    assert task.evaluate(task.new_model(0))[1] >= 0


def test_user_task_returning_clients(user_module):
    task = build_task(f"{user_module}:as_clients", num_clients=2)
    assert [len(c.train) for c in task.clients] == [50, 60]
    assert isinstance(task.clients[1], ClientData) and task.clients[1].test_is_train
    assert len(task.global_test) == 10  # client 0's held-out examples; client 1's training data is not test data


def test_user_task_errors(user_module):
    with pytest.raises(TaskError, match="cannot import module 'nope.mod'"):
        build_task("nope.mod:fn")
    with pytest.raises(TaskError, match="no function 'missing'"):
        build_task(f"{user_module}:missing")
    with pytest.raises(TaskError, match="returned int"):
        build_task(f"{user_module}:broken")
    with pytest.raises(TaskError, match="takes no option 'depth'; its options: 'width'"):
        build_task(f"{user_module}:as_task", depth=3)
    with pytest.raises(TaskError, match="package.module:function"):
        build_task(":fn")


def test_make_task_with_global_test():
    d = load_digits()
    train, test = d.subset(np.arange(1500)), d.subset(np.arange(1500, 1797))
    task = make_task("t", lambda: MLP(64, 10), train, num_clients=3, global_test=test)
    assert len(task.global_test) == 297
    assert isinstance(Dataset, type)
