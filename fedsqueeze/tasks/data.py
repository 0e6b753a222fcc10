"""Data sources: each returns a `Dataset` of numpy arrays (features float32, labels int64).

Nothing here downloads anything: digits ships with scikit-learn, Synthetic(alpha, beta) is generated
from a seed, and LibSVM and MNIST-format IDX data are read from paths the user gives.
"""

from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import TaskError


@dataclass(frozen=True)
class Dataset:
    """Examples in memory.

    x: float32, shape (N, *feature_shape); y: int64 labels in [0, num_classes), shape (N,).
    groups: optional int64 (N,), the client each example naturally belongs to (data sets that are
    federated by construction, such as Synthetic(alpha, beta)); the `natural` partition uses it.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int
    groups: np.ndarray | None = None
    info: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.x.dtype != np.float32:
            raise TaskError(f"{self.name}: features must be float32, got {self.x.dtype}")
        if self.y.dtype != np.int64 or self.y.ndim != 1:
            raise TaskError(f"{self.name}: labels must be a 1-D int64 array, got {self.y.dtype} {self.y.shape}")
        if len(self.x) != len(self.y):
            raise TaskError(f"{self.name}: {len(self.x)} feature rows but {len(self.y)} labels")
        if self.num_classes < 2:
            raise TaskError(f"{self.name}: needs at least 2 classes, got {self.num_classes}")
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= self.num_classes):
            raise TaskError(
                f"{self.name}: labels must lie in [0, {self.num_classes}), got {self.y.min()}..{self.y.max()}"
            )
        if len(self.x) and not np.isfinite(self.x).all():
            bad = np.flatnonzero(~np.isfinite(self.x.reshape(len(self.x), -1)).all(axis=1))
            raise TaskError(
                f"{self.name}: example {int(bad[0])} (0-based; {len(bad)} such example(s)) has a feature value "
                "that is not a finite float32 (nan, inf, or beyond +-3.4e38)"
            )
        if self.groups is not None and self.groups.shape != self.y.shape:
            raise TaskError(f"{self.name}: groups must have one entry per example")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def num_features(self) -> int:
        return int(math.prod(self.feature_shape))

    def subset(self, index: np.ndarray) -> Dataset:
        groups = None if self.groups is None else self.groups[index]
        return Dataset(self.name, self.x[index], self.y[index], self.num_classes, groups, dict(self.info))


# --------------------------------------------------------------------------- digits


def load_digits() -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), pixels scaled to [0, 1].

    Features have shape (1, 8, 8) so the CNN sees an image; MLP and logistic models flatten them.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    return Dataset("digits", x, y, 10)


# --------------------------------------------------------------------------- Synthetic(alpha, beta)


def make_synthetic(
    num_clients: int,
    alpha: float = 1.0,
    beta: float = 1.0,
    seed: int = 0,
    *,
    num_features: int = 60,
    num_classes: int = 10,
    min_samples: int = 50,
    max_samples: int | None = None,
) -> Dataset:
    """Synthetic(alpha, beta) of Li et al., "Federated Optimization in Heterogeneous Networks" (FedProx), 2020, §5.1.

    Client k: u_k ~ N(0, alpha), W_k ~ N(u_k, 1) (num_features x num_classes), b_k ~ N(u_k, 1);
    B_k ~ N(0, beta), v_k ~ N(B_k, 1) per coordinate, x ~ N(v_k, Sigma) with Sigma = diag(j^-1.2);
    y = argmax softmax(W_k^T x + b_k). alpha controls how much the local models differ, beta how much
    the local inputs differ. Sample counts follow the authors' generator (lognormal(4, 2) + 50,
    `data/synthetic_*/generate_synthetic.py`), which also reads N(0, alpha) as a standard deviation;
    `max_samples` optionally caps a client's count.
    Returns the pooled examples with `groups` giving each example's client.
    """
    if num_clients < 1:
        raise TaskError(f"synthetic: num_clients must be >= 1, got {num_clients}")
    if alpha < 0 or beta < 0:
        raise TaskError(f"synthetic: alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
    if num_features < 1 or num_classes < 2:
        raise TaskError(f"synthetic: needs num_features >= 1 and num_classes >= 2, got {num_features}, {num_classes}")
    if min_samples < 1:
        raise TaskError(f"synthetic: min_samples must be >= 1, got {min_samples}")
    if max_samples is not None and max_samples < min_samples:
        raise TaskError(f"synthetic: max_samples ({max_samples}) must be >= min_samples ({min_samples})")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E17]))
    counts = rng.lognormal(4.0, 2.0, num_clients).astype(np.int64) + min_samples
    if max_samples is not None:
        counts = np.minimum(counts, max_samples)
    u = rng.normal(0.0, alpha, num_clients)
    big_b = rng.normal(0.0, beta, num_clients)
    sigma_sqrt = np.arange(1, num_features + 1, dtype=np.float64) ** (-1.2 / 2)
    xs, ys, gs = [], [], []
    for k in range(num_clients):
        w = rng.normal(u[k], 1.0, (num_features, num_classes))
        b = rng.normal(u[k], 1.0, num_classes)
        v = rng.normal(big_b[k], 1.0, num_features)
        xk = v + sigma_sqrt * rng.standard_normal((int(counts[k]), num_features))
        yk = np.argmax(xk @ w + b, axis=1)  # argmax of softmax = argmax of the logits
        xs.append(xk)
        ys.append(yk)
        gs.append(np.full(int(counts[k]), k))
    x = np.concatenate(xs).astype(np.float32)
    y = np.concatenate(ys).astype(np.int64)
    groups = np.concatenate(gs).astype(np.int64)
    info = {"alpha": alpha, "beta": beta, "seed": seed}
    return Dataset(f"synthetic({alpha},{beta})", x, y, num_classes, groups, info)


# --------------------------------------------------------------------------- LibSVM


#: refuse to densify a LibSVM file beyond this many bytes (float32 features)
MAX_DENSE_BYTES = 2 * 1024**3


def load_libsvm(path: str | os.PathLike[str], *, n_features: int | None = None) -> Dataset:
    """A LibSVM/svmlight file, densified to float32.

    Labels are mapped to 0..K-1 in increasing order of their values, so binary files labelled
    {-1, +1}, {0, 1} or {1, 2} (mushrooms) all become {0, 1}.
    """
    from sklearn.datasets import load_svmlight_file

    p = Path(path)
    if not p.is_file():
        raise TaskError(f"LibSVM file {str(p)!r} does not exist or is not a file")
    try:
        x_sparse, raw = load_svmlight_file(str(p), n_features=n_features, dtype=np.float64)
    except (ValueError, OSError, IndexError) as exc:
        raise TaskError(f"LibSVM file {str(p)!r} cannot be parsed: {exc}") from exc
    if x_sparse.shape[0] == 0:
        raise TaskError(f"LibSVM file {str(p)!r} holds no examples")
    n, d = x_sparse.shape
    if n * d * 4 > MAX_DENSE_BYTES:
        raise TaskError(f"LibSVM file {str(p)!r}: {n} x {d} features is too large to hold densely")
    _check_libsvm_values(p, x_sparse, raw)
    values = np.unique(raw)
    if len(values) < 2:
        raise TaskError(f"LibSVM file {str(p)!r} has a single label value {values.tolist()}; need at least 2 classes")
    if not np.all(values == np.round(values)):
        raise TaskError(f"LibSVM file {str(p)!r} has non-integer labels (regression data?): {values[:5].tolist()}")
    y = np.searchsorted(values, raw).astype(np.int64)
    x = np.asarray(x_sparse.todense(), dtype=np.float32)
    return Dataset(p.name, x, y, len(values), info={"labels": values.tolist(), "path": str(p)})


#: the largest float32: feature values beyond it would become inf when densified
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_libsvm_values(p: Path, x_sparse: object, raw: np.ndarray) -> None:
    """TaskError naming the file and line of the first label or feature value that is not a finite float32."""
    bad_label = np.flatnonzero(~np.isfinite(raw))
    data = x_sparse.data  # type: ignore[attr-defined]
    bad = np.flatnonzero(~np.isfinite(data) | (np.abs(data) > _FLOAT32_MAX))
    rows = [int(bad_label[0])] if len(bad_label) else []
    if len(bad):
        indptr = x_sparse.indptr  # type: ignore[attr-defined]
        rows.append(int(np.searchsorted(indptr, bad[0], side="right")) - 1)
    if not rows:
        return
    row = min(rows)
    line = libsvm_line_number(p, row)
    if len(bad_label) and int(bad_label[0]) == row:
        what = f"label {float(raw[row])!r} (not a finite number)"
    else:
        start, stop = x_sparse.indptr[row], x_sparse.indptr[row + 1]  # type: ignore[attr-defined]
        k = start + int(np.flatnonzero(~np.isfinite(data[start:stop]) | (np.abs(data[start:stop]) > _FLOAT32_MAX))[0])
        value = float(data[k])
        feature = int(x_sparse.indices[k]) + 1  # type: ignore[attr-defined]  # LibSVM numbers features from 1
        kind = "not a finite number" if not math.isfinite(value) else "too large for float32"
        what = f"feature {feature} = {value!r} ({kind})"
    where = f"line {line}" if line is not None else f"example {row + 1}"
    raise TaskError(f"LibSVM file {str(p)!r}, {where}: {what}; every label and feature value must be a finite number")


def libsvm_line_number(path: str | os.PathLike[str], row: int) -> int | None:
    """The 1-based line of a LibSVM file that holds example `row` (0-based), as scikit-learn's reader counts
    examples: every line that holds something other than a comment ('#' to the end of the line)."""
    seen = -1
    try:
        with open(path, "rb") as fh:
            for number, text in enumerate(fh, start=1):
                if text.split(b"#", 1)[0].strip():
                    seen += 1
                    if seen == row:
                        return number
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------- IDX (MNIST format)

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); data are big-endian.
_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) into a native-endian numpy array.

    Layout: two zero bytes, a type code, the number of dimensions; then each dimension as a
    big-endian uint32; then the data, big-endian, row-major. Anything else raises TaskError.
    """
    p = Path(path)
    if not p.is_file():
        raise TaskError(f"IDX file {str(p)!r} does not exist or is not a file")
    try:
        with open(p, "rb") as fh:
            head = fh.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(p, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise TaskError(f"IDX file {str(p)!r} cannot be read: {exc}") from exc
    return parse_idx(raw, name=str(p))


def parse_idx(raw: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes; see `read_idx`."""
    if len(raw) < 4:
        raise TaskError(f"IDX file {name!r} is too short for the 4-byte magic number ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise TaskError(f"IDX file {name!r}: bad magic number {raw[:4].hex()} (must start with 0000)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        valid = ", ".join(f"0x{c:02x}" for c in _IDX_TYPES)
        raise TaskError(f"IDX file {name!r}: unknown data type code 0x{code:02x} (valid: {valid})")
    if ndim == 0:
        raise TaskError(f"IDX file {name!r}: zero dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise TaskError(f"IDX file {name!r} is truncated inside its header ({len(raw)} of {header} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_TYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    have = len(raw) - header
    if have < expected:
        raise TaskError(f"IDX file {name!r} is truncated: dims {dims} need {expected} data bytes, found {have}")
    if have > expected:
        raise TaskError(f"IDX file {name!r} has {have - expected} unexpected trailing bytes after dims {dims}")
    data = np.frombuffer(raw, dtype=dtype, count=math.prod(dims), offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write an array as an IDX file (used by tests and to export data)."""
    codes = {v.newbyteorder("="): k for k, v in _IDX_TYPES.items()}
    dtype = np.dtype(array.dtype).newbyteorder("=")
    if dtype not in codes or array.ndim == 0 or array.ndim > 255:
        raise TaskError(f"cannot write dtype {array.dtype} with {array.ndim} dimensions as IDX")
    head = bytes([0, 0, codes[dtype], array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    Path(path).write_bytes(head + np.ascontiguousarray(array).astype(_IDX_TYPES[codes[dtype]]).tobytes())


def load_idx_dataset(
    images: str | os.PathLike[str], labels: str | os.PathLike[str], *, name: str | None = None
) -> Dataset:
    """Images (N, H, W) or (N, D) and labels (N,) from a pair of IDX files; uint8 pixels scaled to [0, 1]."""
    xi = read_idx(images)
    yi = read_idx(labels)
    if xi.ndim not in (2, 3):
        raise TaskError(f"IDX images {str(images)!r} must have 2 or 3 dimensions, got shape {xi.shape}")
    if yi.ndim != 1:
        raise TaskError(f"IDX labels {str(labels)!r} must have 1 dimension, got shape {yi.shape}")
    if len(xi) != len(yi):
        raise TaskError(f"IDX images ({len(xi)}) and labels ({len(yi)}) hold different numbers of examples")
    if not np.issubdtype(yi.dtype, np.integer):
        raise TaskError(f"IDX labels {str(labels)!r} must be integers, got {yi.dtype}")
    if len(yi) == 0:
        raise TaskError(f"IDX files {str(images)!r} hold no examples")
    if yi.min() < 0:
        raise TaskError(f"IDX labels {str(labels)!r} must be >= 0, got {yi.min()}")
    x = xi.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
    if len(bad):
        row = int(bad[0])
        value = xi[row].reshape(-1)[int(np.flatnonzero(~np.isfinite(x[row].reshape(-1)))[0])].item()
        kind = "not a finite number" if not math.isfinite(value) else "too large for float32"
        raise TaskError(
            f"IDX images {str(images)!r}, example {row} (0-based; {len(bad)} such example(s)): value {value!r} "
            f"is {kind}; every pixel must be a finite number"
        )
    if xi.dtype == np.uint8:
        x /= 255.0
    if x.ndim == 3:
        x = x[:, None, :, :]
    y = yi.astype(np.int64)
    num_classes = max(int(y.max()) + 1, 2)
    return Dataset(name or Path(images).name, x, y, num_classes, info={"images": str(images), "labels": str(labels)})


_MNIST_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(directory: Path, stem: str) -> Path | None:
    # also the "train-images.idx3-ubyte" spelling some mirrors use
    for base in (stem, stem.replace("-idx", ".idx")):
        for suffix in ("", ".gz"):
            p = directory / (base + suffix)
            if p.is_file():
                return p
    return None


def load_mnist(path: str | os.PathLike[str]) -> tuple[Dataset, Dataset | None]:
    """MNIST-format data (MNIST, Fashion-MNIST, ...) from a directory of IDX files.

    Returns (train, test); test is None when the t10k files are absent. The number of classes is
    the larger of the two sets' label ranges so that both agree.
    """
    d = Path(path)
    if not d.is_dir():
        raise TaskError(f"MNIST path {str(d)!r} is not a directory holding IDX files")
    found = {split: tuple(_find(d, stem) for stem in stems) for split, stems in _MNIST_NAMES.items()}
    if None in found["train"]:
        want = " and ".join(_MNIST_NAMES["train"])
        raise TaskError(f"MNIST directory {str(d)!r} lacks {want} (optionally .gz)")
    train = load_idx_dataset(*found["train"], name="mnist")  # type: ignore[arg-type]
    test = None
    if None not in found["test"]:
        test = load_idx_dataset(*found["test"], name="mnist-test")  # type: ignore[arg-type]
        k = max(train.num_classes, test.num_classes)
        train = Dataset(train.name, train.x, train.y, k, info=train.info)
        test = Dataset(test.name, test.x, test.y, k, info=test.info)
        if train.feature_shape != test.feature_shape:
            raise TaskError(f"MNIST train images {train.feature_shape} and test images {test.feature_shape} differ")
    return train, test
