"""The task interface, the built-in tasks, and users' own tasks named "package.module:function".

A `Task` bundles what the algorithms, client and server need: a model factory, each client's
train/test tensors, a global test set, the training loss, and for convex tasks the exact objective
with its optimum. `build_task(name_or_ref, num_clients=..., partition=..., seed=..., **options)`
builds one; the same name, options and seed always give the same data and split.

A user's task is a function, referenced as "package.module:function", that is called with the
keyword arguments it declares among `num_clients`, `partition`, `seed` and the task options, and
returns one of:
- a `Task` (build it with `make_task`, exactly as the built-in tasks are built);
- `(build_model, data)` where data is a `Dataset` or a pair of arrays `(x, y)`: fedsqueeze partitions
  it among the clients with the requested partition and holds out each client's test split;
- `(build_model, clients)` with clients a list of `ClientData`, or of (x_train, y_train, x_test, y_test)
  tuples: the user's own federated split, used as given.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset, load_digits, load_libsvm, load_mnist, make_synthetic
from .errors import TaskError, choices
from .models import MLP, LogisticRegression, SmallCNN, flat_params, num_params
from .objective import LogisticObjective, Optimum
from .partition import parse_partition, partition_indices, split_train_test

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ModelFactory = Callable[[], nn.Module]


@dataclass(frozen=True)
class Split:
    """Examples as tensors: x float32 (N, *feature_shape), y int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise TaskError(f"split has {len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    @classmethod
    def from_arrays(cls, x: Any, y: Any) -> Split:
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x.float()
        yt = torch.as_tensor(np.asarray(y, dtype=np.int64)) if not isinstance(y, torch.Tensor) else y.long()
        return cls(xt, yt.reshape(-1))

    @staticmethod
    def concat(splits: Sequence[Split]) -> Split:
        return Split(torch.cat([s.x for s in splits]), torch.cat([s.y for s in splits]))


@dataclass(frozen=True)
class ClientData:
    """One client's data. When `test_is_train`, the client holds no test examples and `test` is `train`."""

    cid: int
    train: Split
    test: Split
    test_is_train: bool = False

    @property
    def num_examples(self) -> int:
        """Training examples (the weight in example-weighted averaging)."""
        return len(self.train)


@dataclass
class Task:
    """A federated learning task: model factory, per-client data, loss, and (convex tasks) the exact objective."""

    name: str
    build_model: ModelFactory
    clients: list[ClientData]
    global_test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    criterion: Criterion = F.cross_entropy
    #: L2 coefficient: the training loss adds (reg/2) * ||params||^2 (the logistic tasks' regulariser)
    reg: float = 0.0
    is_convex: bool = False
    objective: LogisticObjective | None = None
    #: resolved options, partition, data set name and sizes (for config.toml and summary.json)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def loss_fn(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Training loss on a batch: mean criterion plus the L2 term. On a client's full training set it is f_i."""
        loss = self.criterion(model(x), y)
        if self.reg:
            loss = loss + 0.5 * self.reg * sum(p.pow(2).sum() for p in model.parameters())
        return loss

    def new_model(self, seed: int | None = None) -> nn.Module:
        """A fresh model; with a seed, its initialisation is reproducible and the global torch RNG is left untouched."""
        if seed is None:
            return self.build_model()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.build_model()

    def num_params(self) -> int:
        return num_params(self.build_model())

    @property
    def optimum(self) -> Optimum | None:
        """x* and f* of a convex task (computed on first use, then kept); None for non-convex tasks."""
        return None if self.objective is None else self.objective.optimum()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: Split | None = None, batch_size: int = 4096) -> tuple[float, float]:
        """(mean criterion loss, accuracy) on a split (default: the global test set); the L2 term is not included.

        NaN for both on an empty split.
        """
        split = self.global_test if split is None else split
        if len(split) == 0:
            return math.nan, math.nan
        was_training = model.training
        model.eval()
        total_loss, correct = 0.0, 0
        try:
            for start in range(0, len(split), batch_size):
                x, y = split.x[start : start + batch_size], split.y[start : start + batch_size]
                out = model(x)
                total_loss += float(self.criterion(out, y)) * len(y)
                correct += int((out.argmax(dim=1) == y).sum())
        finally:
            model.train(was_training)
        return total_loss / len(split), correct / len(split)

    def convex_metrics(self, model_or_params: nn.Module | torch.Tensor) -> dict[str, float]:
        """subopt, grad_norm_sq and dist_sq at the model's flat parameters; {} for non-convex tasks."""
        if self.objective is None:
            return {}
        x = flat_params(model_or_params) if isinstance(model_or_params, nn.Module) else model_or_params
        return self.objective.metrics(x)


# --------------------------------------------------------------------------- building tasks from data


def make_task(
    name: str,
    build_model: ModelFactory,
    data: Dataset,
    *,
    num_clients: int,
    partition: str = "iid",
    seed: int = 0,
    test_fraction: float = 0.2,
    global_test: Dataset | None = None,
    criterion: Criterion = F.cross_entropy,
    reg: float = 0.0,
    info: dict[str, Any] | None = None,
) -> Task:
    """Partition a data set among clients, hold out each client's test split, and wrap it as a Task.

    Each client keeps round(test_fraction * m) of its m examples for testing (seeded). With
    test_fraction 0 (or a single example) a client has no test data and evaluates on its training
    data (`ClientData.test_is_train`). The global test set is `global_test` if given, else the union
    of the clients' held-out test splits: a client whose single example is its training data adds
    nothing, so the global test set never holds a training example. Only with test_fraction 0, when
    no client holds any test data, is the global test set the union of the training data.
    """
    spec = parse_partition(partition)
    parts = partition_indices(data.y, num_clients, spec, seed, num_classes=data.num_classes, groups=data.groups)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E57]))
    clients = []
    for cid, index in enumerate(parts):
        train_idx, test_idx = split_train_test(index, test_fraction, rng)
        train = Split.from_arrays(data.x[train_idx], data.y[train_idx])
        if len(test_idx):
            clients.append(ClientData(cid, train, Split.from_arrays(data.x[test_idx], data.y[test_idx])))
        else:
            clients.append(ClientData(cid, train, train, test_is_train=True))
    if global_test is not None:
        if global_test.feature_shape != data.feature_shape:
            raise TaskError(f"{name}: test features {global_test.feature_shape} differ from {data.feature_shape}")
        test = Split.from_arrays(global_test.x, global_test.y)
    else:
        test = _held_out(name, clients, test_fraction)
    meta = {
        "dataset": data.name,
        "partition": str(spec),
        "num_clients": num_clients,
        "seed": seed,
        "test_fraction": test_fraction,
        "num_examples": len(data),
        **(info or {}),
    }
    return Task(
        name=name,
        build_model=build_model,
        clients=clients,
        global_test=test,
        num_classes=data.num_classes,
        input_shape=data.feature_shape,
        criterion=criterion,
        reg=reg,
        info=meta,
    )


def _held_out(name: str, clients: Sequence[ClientData], test_fraction: float | None) -> Split:
    """The union of the clients' held-out test splits (never a training example).

    When no client holds test data, this is the union of the training data if that was asked for
    (test_fraction 0, or a user's clients given without test data: test_fraction None), else TaskError.
    """
    held = [c.test for c in clients if not c.test_is_train]
    if held:
        return Split.concat(held)
    if not test_fraction:
        return Split.concat([c.train for c in clients])
    raise TaskError(
        f"{name}: no client holds a test example (each of the {len(clients)} clients has a single example, "
        "which is its training data), so there is no global test set; use fewer clients, or test_fraction=0 "
        "to evaluate on the training data"
    )


def attach_logistic_objective(task: Task, reg: float, *, bias: bool = True) -> Task:
    """Make a logistic-regression task convex: the L2 term in its loss and its exact objective over the clients."""
    task.reg = reg
    task.is_convex = True
    task.objective = LogisticObjective(
        [c.train.x.numpy() for c in task.clients],
        [c.train.y.numpy() for c in task.clients],
        task.num_classes,
        reg,
        bias=bias,
    )
    task.info["reg"] = reg
    return task


# --------------------------------------------------------------------------- registry of built-in tasks

TaskBuilder = Callable[..., Task]


@dataclass(frozen=True)
class _Entry:
    builder: TaskBuilder
    default_partition: str
    description: str


_TASKS: dict[str, _Entry] = {}
_CALL_ARGS = ("num_clients", "partition", "seed")


def register_task(
    name: str, *, default_partition: str = "iid", description: str = ""
) -> Callable[[TaskBuilder], TaskBuilder]:
    """Register a builder `fn(*, num_clients, partition, seed, **options) -> Task` under `name`.

    The builder's other keyword-only parameters are the task's options (their defaults are the task's).
    """

    def decorate(fn: TaskBuilder) -> TaskBuilder:
        if name in _TASKS and _TASKS[name].builder is not fn:
            raise TaskError(f"a task named {name!r} is already registered")
        _TASKS[name] = _Entry(fn, default_partition, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return decorate


def available_tasks() -> dict[str, str]:
    """Built-in task names and one-line descriptions."""
    return {name: entry.description for name, entry in sorted(_TASKS.items())}


def task_options(name: str) -> dict[str, Any]:
    """A built-in task's options and their defaults (inspect.Parameter.empty: required)."""
    entry = _lookup(name)
    return {
        p.name: p.default
        for p in inspect.signature(entry.builder).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name not in _CALL_ARGS
    }


def _lookup(name: str) -> _Entry:
    if name not in _TASKS:
        raise TaskError(
            f"unknown task {name!r}; built-in tasks: {choices(_TASKS)}, "
            "or a function of your own as 'package.module:function'"
        )
    return _TASKS[name]


def build_task(
    name_or_ref: str,
    *,
    num_clients: int = 10,
    partition: str | None = None,
    seed: int = 0,
    **options: Any,
) -> Task:
    """Build a built-in task by name, or a user's task from "package.module:function".

    `partition=None` uses the task's default (iid; contiguous for libsvm-logreg; natural for synthetic-logreg).
    Option names may use dashes or underscores (`test-fraction` or `test_fraction`).
    """
    if not isinstance(num_clients, int) or isinstance(num_clients, bool) or num_clients < 1:
        raise TaskError(f"num_clients must be a positive integer, got {num_clients!r}")
    opts = {k.replace("-", "_"): v for k, v in options.items()}
    if ":" in name_or_ref:
        return _build_user_task(name_or_ref, num_clients, partition, seed, opts)
    entry = _lookup(name_or_ref)
    valid = task_options(name_or_ref)
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise TaskError(f"task {name_or_ref!r} has no option {unknown[0]!r}; valid options: {choices(valid) or 'none'}")
    missing = [k for k, v in valid.items() if v is inspect.Parameter.empty and k not in opts]
    if missing:
        raise TaskError(f"task {name_or_ref!r} needs the option {missing[0]!r}")
    coerced = {k: _coerce(name_or_ref, k, v, valid[k]) for k, v in opts.items()}
    task = entry.builder(num_clients=num_clients, partition=partition or entry.default_partition, seed=seed, **coerced)
    task.info.setdefault("task", name_or_ref)
    task.info.setdefault("options", {k: v for k, v in {**valid, **coerced}.items() if v is not inspect.Parameter.empty})
    return task


def _coerce(task: str, key: str, value: Any, default: Any) -> Any:
    """Accept ints for float options and numeric strings (from command-line overrides)."""
    if default is inspect.Parameter.empty or default is None:
        return value
    try:
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if not isinstance(value, bool):
                raise ValueError
            return value
        if isinstance(default, float) and not isinstance(value, bool):
            return float(value)
        if isinstance(default, int) and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
            return tuple(type(default[0])(v) for v in value) if default else tuple(value)
    except (TypeError, ValueError) as exc:
        raise TaskError(f"task {task!r}: option {key}={value!r} is not a valid {type(default).__name__}") from exc
    return value


# --------------------------------------------------------------------------- user tasks


def _build_user_task(ref: str, num_clients: int, partition: str | None, seed: int, opts: dict[str, Any]) -> Task:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise TaskError(f"task reference {ref!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(f"task {ref!r}: cannot import module {module_name!r} ({exc})") from exc
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise TaskError(f"task {ref!r}: module {module_name!r} has no function {attr!r}")
    not_a_task = (
        f"task {ref!r} is not a task function: a task function takes keyword arguments among "
        f"{', '.join(_CALL_ARGS)} and its options, and returns a Task, (build_model, data) or "
        "(build_model, clients) (see fedsqueeze.tasks.task)"
    )
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins and C functions without a signature
        raise TaskError(f"{not_a_task}; {attr!r} has no inspectable signature") from None
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    offered: dict[str, Any] = {"num_clients": num_clients, "partition": partition, "seed": seed, **opts}
    unknown = sorted(k for k in opts if k not in params and not takes_any)
    if unknown:
        accepted = [k for k in params if k not in _CALL_ARGS]
        raise TaskError(f"task {ref!r} takes no option {unknown[0]!r}; its options: {choices(accepted) or 'none'}")
    if partition is None:
        declared = params.get("partition")
        if declared is not None and declared.default is not inspect.Parameter.empty:
            del offered["partition"]  # the function's own default partition applies
        else:
            offered["partition"] = "iid"
    kwargs = {k: v for k, v in offered.items() if takes_any or k in params}
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as exc:
        raise TaskError(f"{not_a_task}; called with {sorted(kwargs) or 'no arguments'}: {exc}") from None
    result = fn(**kwargs)
    task = _as_task(ref, result, num_clients, partition or "iid", seed, float(opts.get("test_fraction", 0.2)))
    task.info.setdefault("task", ref)
    task.info.setdefault("options", dict(opts))
    return task


def _as_task(ref: str, result: Any, num_clients: int, partition: str, seed: int, test_fraction: float) -> Task:
    if isinstance(result, Task):
        return result
    if not (isinstance(result, tuple) and len(result) == 2 and callable(result[0])):
        raise TaskError(
            f"task {ref!r} returned {type(result).__name__}; return a Task, (build_model, Dataset or (x, y)), "
            "or (build_model, list of clients)"
        )
    build_model, data = result
    if isinstance(data, tuple) and len(data) == 2:
        data = _dataset_from_arrays(ref, *data)
    if isinstance(data, Dataset):
        return make_task(
            ref, build_model, data, num_clients=num_clients, partition=partition, seed=seed, test_fraction=test_fraction
        )
    if isinstance(data, list) and data:
        clients = [_as_client(ref, i, c) for i, c in enumerate(data)]
        x0 = clients[0].train
        labels = torch.cat([torch.cat([c.train.y, c.test.y]) for c in clients])
        return Task(
            name=ref,
            build_model=build_model,
            clients=clients,
            global_test=_held_out(ref, clients, None),
            num_classes=int(labels.max()) + 1 if len(labels) else 2,
            input_shape=tuple(x0.x.shape[1:]),
            info={"num_clients": len(clients), "partition": "user"},
        )
    raise TaskError(f"task {ref!r}: the client data must be a Dataset, (x, y) arrays or a non-empty list of clients")


def _dataset_from_arrays(ref: str, x: Any, y: Any) -> Dataset:
    xa = np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    ya = np.asarray(y.numpy() if isinstance(y, torch.Tensor) else y).astype(np.int64).reshape(-1)
    return Dataset(ref, xa, ya, max(int(ya.max()) + 1, 2) if len(ya) else 2)


def _as_client(ref: str, cid: int, c: Any) -> ClientData:
    client = _as_client_unchecked(ref, cid, c)
    for which, split in (("training", client.train), ("test", client.test)):
        finite = torch.isfinite(split.x.reshape(len(split), -1)).all(dim=1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0, 0])
            raise TaskError(
                f"task {ref!r}: client {cid}'s {which} example {row} (0-based) has a feature value that is "
                "not a finite float32 (nan, inf, or beyond +-3.4e38)"
            )
    return client


def _as_client_unchecked(ref: str, cid: int, c: Any) -> ClientData:
    if isinstance(c, ClientData):
        return c
    if isinstance(c, tuple) and len(c) == 4:
        train, test = Split.from_arrays(c[0], c[1]), Split.from_arrays(c[2], c[3])
        if len(train) == 0:
            raise TaskError(f"task {ref!r}: client {cid} has no training examples")
        if len(test) == 0:
            return ClientData(cid, train, train, test_is_train=True)
        return ClientData(cid, train, test)
    raise TaskError(f"task {ref!r}: client {cid} must be a ClientData or (x_train, y_train, x_test, y_test)")


# --------------------------------------------------------------------------- built-in tasks


def _check_fraction(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise TaskError(f"test_fraction must be in [0, 1), got {value}")
    return value


def _check_reg(value: float) -> float:
    if not value > 0:
        raise TaskError(f"reg must be > 0 (the logistic tasks are strongly convex through it), got {value}")
    return value


@register_task("digits-mlp", description="scikit-learn digits (8x8), MLP")
def _digits_mlp(
    *, num_clients: int, partition: str, seed: int, hidden: tuple[int, ...] = (64,), test_fraction: float = 0.2
) -> Task:
    data = load_digits()
    d = data.num_features
    return make_task(
        "digits-mlp",
        partial(MLP, d, 10, hidden),
        data,
        num_clients=num_clients,
        partition=partition,
        seed=seed,
        test_fraction=_check_fraction(test_fraction),
        info={"hidden": list(hidden)},
    )


@register_task("digits-cnn", description="scikit-learn digits (8x8), small CNN")
def _digits_cnn(*, num_clients: int, partition: str, seed: int, test_fraction: float = 0.2) -> Task:
    data = load_digits()
    shape = data.feature_shape
    return make_task(
        "digits-cnn",
        partial(SmallCNN, shape, 10),
        data,
        num_clients=num_clients,
        partition=partition,
        seed=seed,
        test_fraction=_check_fraction(test_fraction),
    )


@register_task("digits-logreg", description="scikit-learn digits, multinomial L2 logistic regression (convex)")
def _digits_logreg(
    *, num_clients: int, partition: str, seed: int, reg: float = 1e-3, bias: bool = True, test_fraction: float = 0.2
) -> Task:
    data = load_digits()
    d = data.num_features
    task = make_task(
        "digits-logreg",
        partial(LogisticRegression, d, 10, bias=bias),
        data,
        num_clients=num_clients,
        partition=partition,
        seed=seed,
        test_fraction=_check_fraction(test_fraction),
    )
    return attach_logistic_objective(task, _check_reg(reg), bias=bias)


@register_task(
    "synthetic-logreg",
    default_partition="natural",
    description="Synthetic(alpha, beta) of FedProx, multinomial L2 logistic regression (convex)",
)
def _synthetic_logreg(
    *,
    num_clients: int,
    partition: str,
    seed: int,
    alpha: float = 1.0,
    beta: float = 1.0,
    reg: float = 1e-2,
    bias: bool = True,
    min_samples: int = 50,
    max_samples: int = 0,
    num_features: int = 60,
    num_classes: int = 10,
    test_fraction: float = 0.2,
) -> Task:
    """max_samples = 0: no cap on a client's sample count. 60 features and 10 classes are the paper's."""
    data = make_synthetic(
        num_clients,
        alpha,
        beta,
        seed,
        num_features=num_features,
        num_classes=num_classes,
        min_samples=min_samples,
        max_samples=max_samples or None,
    )
    d, k = data.num_features, data.num_classes
    task = make_task(
        "synthetic-logreg",
        partial(LogisticRegression, d, k, bias=bias),
        data,
        num_clients=num_clients,
        partition=partition,
        seed=seed,
        test_fraction=_check_fraction(test_fraction),
    )
    return attach_logistic_objective(task, _check_reg(reg), bias=bias)


@register_task(
    "libsvm-logreg",
    default_partition="contiguous",
    description="a LibSVM file (path=...), L2 logistic regression (convex; binary or multinomial)",
)
def _libsvm_logreg(
    *,
    num_clients: int,
    partition: str,
    seed: int,
    path: str,
    reg: float = 0.1,
    bias: bool = True,
    test_fraction: float = 0.2,
    test_path: str = "",
) -> Task:
    """Contiguous chunks and reg 0.1, as the convex papers split data; each client keeps 20 % of its
    examples as its local test split (test_fraction=0 trains on every example, as those papers do)."""
    data = load_libsvm(path)
    test = load_libsvm(test_path, n_features=data.num_features) if test_path else None
    if test is not None and test.num_classes != data.num_classes:
        raise TaskError(f"libsvm-logreg: {test_path!r} has {test.num_classes} classes, {path!r} has {data.num_classes}")
    d, k = data.num_features, data.num_classes
    task = make_task(
        "libsvm-logreg",
        partial(LogisticRegression, d, k, bias=bias),
        data,
        num_clients=num_clients,
        partition=partition,
        seed=seed,
        test_fraction=_check_fraction(test_fraction),
        global_test=test,
        info={"path": str(path)},
    )
    return attach_logistic_objective(task, _check_reg(reg), bias=bias)


def _mnist(
    name: str,
    factory: Callable[[Dataset], ModelFactory],
    num_clients: int,
    partition: str,
    seed: int,
    path: str,
    test_fraction: float,
) -> Task:
    train, test = load_mnist(path)
    return make_task(
        name,
        factory(train),
        train,
        num_clients=num_clients,
        partition=partition,
        seed=seed,
        test_fraction=_check_fraction(test_fraction),
        global_test=test,
        info={"path": str(path)},
    )


@register_task("mnist-mlp", description="MNIST-format IDX files in a directory (path=...), MLP")
def _mnist_mlp(
    *,
    num_clients: int,
    partition: str,
    seed: int,
    path: str,
    hidden: tuple[int, ...] = (200, 200),
    test_fraction: float = 0.2,
) -> Task:
    return _mnist(
        "mnist-mlp",
        lambda ds: partial(MLP, ds.num_features, ds.num_classes, hidden),
        num_clients,
        partition,
        seed,
        path,
        test_fraction,
    )


@register_task("mnist-cnn", description="MNIST-format IDX files in a directory (path=...), small CNN")
def _mnist_cnn(*, num_clients: int, partition: str, seed: int, path: str, test_fraction: float = 0.2) -> Task:
    return _mnist(
        "mnist-cnn",
        lambda ds: partial(SmallCNN, ds.feature_shape, ds.num_classes),
        num_clients,
        partition,
        seed,
        path,
        test_fraction,
    )
