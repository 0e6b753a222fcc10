"""Split a data set's examples among clients (seeded numpy), and each client's share into train and test.

Specs read like calls, as compressor specs do: "iid", "dirichlet(0.3)", "dirichlet(alpha=0.3)",
"shards(2)", "shards(classes=2)", "contiguous", "natural".

- iid: a uniformly random permutation cut into n near-equal parts.
- dirichlet(alpha): label skew of Hsu, Qi and Brown (2019) as in NIID-Bench (Li et al. 2022): for each
  class, client proportions ~ Dir(alpha); small alpha gives few classes per client.
- shards(classes): every client holds exactly `classes` distinct labels (assigned round-robin over a
  shuffled class order so that each class is shared by equally many clients), and each class's
  examples are split evenly among its holders. Needs num_clients * classes >= num_classes so that
  every example has an owner.
- contiguous: examples in file order cut into n near-equal chunks, as the convex papers split
  LibSVM data (EF21, EF-BV).
- natural: the data set's own clients (`Dataset.groups`, e.g. Synthetic(alpha, beta)).

Every partition assigns every example to exactly one client and gives every client at least one
example, or raises TaskError.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedsqueeze.specs import SpecError, parse_call

from .errors import TaskError, choices

#: partition name -> {parameter: (type, default)}; a default of None means required
PARTITIONS: dict[str, dict[str, tuple[type, object]]] = {
    "iid": {},
    "dirichlet": {"alpha": (float, None)},
    "shards": {"classes": (int, 2)},
    "contiguous": {},
    "natural": {},
}

#: Dirichlet draws retried before empty clients are filled from the largest ones
_DIRICHLET_TRIES = 100


@dataclass(frozen=True)
class PartitionSpec:
    name: str
    params: dict[str, float | int] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.params.items())})"


def parse_partition(spec: str | PartitionSpec) -> PartitionSpec:
    """Parse and validate a partition spec; TaskError names the bad part and the valid choices."""
    if isinstance(spec, PartitionSpec):
        name, given = spec.name, dict(spec.params)
    else:
        try:
            call = parse_call(str(spec), example="dirichlet(0.3)")
        except SpecError:
            example = "'iid', 'dirichlet(0.3)', 'shards(2)'"
            raise TaskError(f"partition {spec!r} does not parse; write e.g. {example}") from None
        for value in [*call.args, *call.kwargs.values()]:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TaskError(f"partition {spec!r}: argument {value!r} is not a number")
        name, given = call.name.lower(), {"": list(call.args), **call.kwargs}
    if name not in PARTITIONS:
        raise TaskError(f"unknown partition {name!r}; valid partitions: {choices(PARTITIONS)}")
    schema = PARTITIONS[name]
    params: dict[str, float | int] = {}
    positional = given.pop("", [])
    assert isinstance(positional, list)
    if len(positional) > len(schema):
        raise TaskError(f"partition {name!r} takes at most {len(schema)} argument(s) ({choices(schema)}), got {spec!r}")
    for key, value in zip(schema, positional, strict=False):
        given[key] = value
    for key in given:
        if key not in schema:
            valid = choices(schema) if schema else "none"
            raise TaskError(f"partition {name!r} has no parameter {key!r}; valid parameters: {valid}")
    for key, (typ, default) in schema.items():
        value = given.get(key, default)
        if value is None:
            raise TaskError(f"partition {name!r} needs its parameter {key!r}, e.g. '{name}(0.5)'")
        try:
            cast = typ(value)
        except (TypeError, ValueError) as exc:
            raise TaskError(f"partition {name!r}: {key}={value!r} is not a {typ.__name__}") from exc
        if typ is int and cast != value:
            raise TaskError(f"partition {name!r}: {key}={value!r} must be an integer")
        if not cast > 0:
            raise TaskError(f"partition {name!r}: {key} must be > 0, got {value!r}")
        params[key] = cast
    return PartitionSpec(name, params)


def partition_indices(
    labels: np.ndarray,
    num_clients: int,
    spec: str | PartitionSpec,
    seed: int,
    *,
    num_classes: int | None = None,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Example indices for each client (sorted within a client); every index appears exactly once."""
    p = parse_partition(spec)
    labels = np.asarray(labels)
    n_examples = len(labels)
    if num_clients < 1:
        raise TaskError(f"num_clients must be >= 1, got {num_clients}")
    if n_examples < num_clients:
        raise TaskError(
            f"cannot give each of {num_clients} clients a training example: the data set has only {n_examples}"
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9A27]))
    if p.name == "iid":
        parts = np.array_split(rng.permutation(n_examples), num_clients)
    elif p.name == "contiguous":
        parts = np.array_split(np.arange(n_examples), num_clients)
    elif p.name == "dirichlet":
        parts = _dirichlet(labels, num_clients, float(p.params["alpha"]), rng, num_classes)
    elif p.name == "shards":
        parts = _shards(labels, num_clients, int(p.params["classes"]), rng, num_classes)
    else:  # natural
        parts = _natural(groups, num_clients)
    out = [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]
    empty = [i for i, part in enumerate(out) if len(part) == 0]
    if empty:
        raise TaskError(f"partition {str(p)!r} leaves clients {empty[:10]} without examples; use fewer clients")
    return out


def _dirichlet(
    labels: np.ndarray, n: int, alpha: float, rng: np.random.Generator, num_classes: int | None
) -> list[np.ndarray]:
    k = int(num_classes if num_classes is not None else labels.max() + 1)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(k)]
    for _ in range(_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(n)]
        for idx in by_class:
            if len(idx) == 0:
                continue
            props = rng.dirichlet(np.full(n, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        merged = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
        if min(len(m) for m in merged) >= 1:
            return merged
    # Rare (tiny alpha, many clients): hand each empty client one example from the largest client.
    for i in range(n):
        if len(merged[i]) == 0:
            donor = int(np.argmax([len(m) for m in merged]))
            merged[i], merged[donor] = merged[donor][-1:], merged[donor][:-1]
    return merged


def _shards(labels: np.ndarray, n: int, c: int, rng: np.random.Generator, num_classes: int | None) -> list[np.ndarray]:
    present = np.unique(labels)
    k = len(present)
    if c > k:
        raise TaskError(f"shards({c}): the data have only {k} classes; choose classes <= {k}")
    if n * c < k:
        raise TaskError(
            f"shards({c}) with {n} clients covers only {n * c} of {k} classes, so some examples would have no "
            f"owner; use classes >= {-(-k // n)} or more clients"
        )
    order = present[rng.permutation(k)]
    holders: dict[int, list[int]] = {int(cls): [] for cls in present}
    for client in range(n):
        for t in range(c):
            holders[int(order[(client * c + t) % k])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for cls, owners in holders.items():
        idx = rng.permutation(np.flatnonzero(labels == cls))
        for owner, chunk in zip(owners, np.array_split(idx, len(owners)), strict=True):
            parts[owner].append(chunk)
    return [np.concatenate(p) for p in parts]


def _natural(groups: np.ndarray | None, n: int) -> list[np.ndarray]:
    if groups is None:
        raise TaskError("partition 'natural' needs a naturally federated data set (e.g. synthetic); this one has none")
    g = np.asarray(groups)
    found = int(g.max()) + 1 if len(g) else 0
    if found != n:
        raise TaskError(f"partition 'natural': the data set has {found} clients but num_clients is {n}")
    return [np.flatnonzero(g == i) for i in range(n)]


def split_train_test(
    index: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle a client's indices and hold out round(test_fraction * m) of them (at least 1, at most m - 1).

    Returns (train, test), each sorted; test is empty when test_fraction is 0 or the client has one example.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise TaskError(f"test_fraction must be in [0, 1), got {test_fraction}")
    m = len(index)
    if test_fraction == 0.0 or m < 2:
        return np.sort(index), np.empty(0, dtype=np.int64)
    n_test = min(max(1, round(test_fraction * m)), m - 1)
    perm = rng.permutation(index)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])
