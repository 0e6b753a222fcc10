"""Client samplings: who takes part in a cohort, each with its declared inclusion probabilities p_i = P(i in S).

Yi, Kharisov, Sokolov, Richtárik, "Cohort Squeeze: Beyond a Single Communication Round per Cohort in
Cross-Device Federated Learning" (arXiv 2406.01115), Section 2 (arbitrary sampling):

    nice(tau)                      a uniform subset of tau clients, p_i = tau / n (tau: cohort-size)
    block(blocks=b, q=[...])       the clients split into b blocks (contiguous, or `assignment=[block of
                                   client 0, ...]`); one whole block j is drawn with probability q_j
                                   (uniform by default), p_i = q_{j(i)}
    stratified(clusters=b, by=..)  the clients clustered into b strata C_j (seeded k-means on label
                                   histograms, feature means, or the clients' gradients at x^0); one
                                   client drawn uniformly from each stratum, p_i = 1 / |C_{j(i)}|
    importance(by=examples|smoothness)
                                   independent inclusion, p_i proportional to n_i (training examples)
                                   or L_i (smoothness), capped at 1, with sum_i p_i = cohort-size: the
                                   cohort's size is random and cohort-size is its expectation

With any of them f_S = sum_{i in S} f_i / (n p_i) is an unbiased estimate of f = (1/n) sum_i f_i. The
round engine (`fedsqueeze.engine.server`) weighs a reply by s_i / p_i (s_i: the client's share of the
objective) whenever the p_i differ, so a cohort mean estimates the full mean; `nice` (equal p_i) keeps
the plain cohort mean, bit for bit.

`stratified(by=gradients)` needs every client's gradient at x^0. In simulation the server holds the
task and computes them itself (full training split, the initial model); in a deployment this would
cost one extra round in which every client sends its gradient, which is not built.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedsqueeze.specs import SpecError, parse_call


@dataclass(frozen=True)
class Cohort:
    """The clients that take part in a round and every client's inclusion probability P(i in S)."""

    ids: tuple[int, ...]
    #: p_i for every client of the population (sampled or not); an unbiased cohort objective
    #: weighs client i by 1 / (n p_i)
    probabilities: Mapping[int, float]


class SamplingError(ValueError):
    """A sampling spec or argument that cannot be used; the message names the valid ones."""


class Sampling(ABC):
    """Draws cohorts from a population of n clients with fixed, declared inclusion probabilities."""

    name: str = ""

    @abstractmethod
    def probabilities(self, n: int, size: int) -> list[float]:
        """p_i for clients 0..n-1 (`size`: the configured cohort size)."""

    @abstractmethod
    def draw_ids(self, n: int, size: int, gen: torch.Generator) -> list[int]:
        """One cohort's client ids (any order, each once)."""

    def draw(self, population: Sequence[int], size: int, gen: torch.Generator) -> Cohort:
        """A cohort of the population (ids 0..n-1), sorted, with every client's p_i."""
        n = len(population)
        p = self.probabilities(n, size)
        ids = sorted(population[i] for i in self.draw_ids(n, size, gen))
        return Cohort(tuple(ids), {population[i]: p[i] for i in range(n)})


class Nice(Sampling):
    """tau clients uniformly without replacement (tau = the cohort size unless given)."""

    name = "nice"

    def __init__(self, tau: int | None = None) -> None:
        if tau is not None and (isinstance(tau, bool) or not isinstance(tau, int) or tau < 1):
            raise SamplingError(f"nice: tau must be a positive integer, got {tau!r}")
        self.tau = tau

    def _k(self, n: int, size: int) -> int:
        return min(self.tau if self.tau is not None else size, n)

    def probabilities(self, n: int, size: int) -> list[float]:
        return [self._k(n, size) / max(n, 1)] * n

    def draw_ids(self, n: int, size: int, gen: torch.Generator) -> list[int]:
        k = self._k(n, size)
        if k >= n:
            return list(range(n))
        return torch.randperm(n, generator=gen)[:k].tolist()


class Block(Sampling):
    """One whole block per cohort: block j with probability q_j; p_i = q of i's block."""

    name = "block"

    def __init__(self, assignment: Sequence[int], q: Sequence[float] | None = None) -> None:
        blocks = sorted(set(int(b) for b in assignment))
        if blocks != list(range(len(blocks))):
            raise SamplingError(f"block: blocks must be numbered 0..b-1, each non-empty, got {sorted(set(assignment))}")
        self.assignment = [int(b) for b in assignment]
        b = len(blocks)
        q = [1.0 / b] * b if q is None else [float(v) for v in q]
        if len(q) != b or any(not math.isfinite(v) or v < 0 for v in q) or abs(sum(q) - 1) > 1e-9:
            raise SamplingError(f"block: q must be {b} non-negative block probabilities summing to 1, got {q}")
        self.q = q

    @classmethod
    def contiguous(cls, n: int, blocks: int, q: Sequence[float] | None = None) -> Block:
        """Blocks of consecutive client ids, sizes differing by at most one."""
        if not 1 <= blocks <= n:
            raise SamplingError(f"block: blocks must be in 1..{n} (num-clients), got {blocks}")
        return cls([i * blocks // n for i in range(n)], q)

    def probabilities(self, n: int, size: int) -> list[float]:
        self._check(n)
        return [self.q[b] for b in self.assignment]

    def draw_ids(self, n: int, size: int, gen: torch.Generator) -> list[int]:
        self._check(n)
        j = int(torch.multinomial(torch.tensor(self.q, dtype=torch.float64), 1, generator=gen))
        return [i for i, b in enumerate(self.assignment) if b == j]

    def _check(self, n: int) -> None:
        if len(self.assignment) != n:
            raise SamplingError(f"block: the assignment covers {len(self.assignment)} clients, the population is {n}")


class Stratified(Sampling):
    """One client uniformly from each stratum C_j; p_i = 1 / |C_{j(i)}|."""

    name = "stratified"

    def __init__(self, strata: Sequence[int]) -> None:
        labels = sorted(set(int(s) for s in strata))
        self.strata = [labels.index(int(s)) for s in strata]  # renumbered 0..b-1, every stratum non-empty
        self.members = [[i for i, s in enumerate(self.strata) if s == j] for j in range(len(labels))]

    def probabilities(self, n: int, size: int) -> list[float]:
        self._check(n)
        return [1.0 / len(self.members[s]) for s in self.strata]

    def draw_ids(self, n: int, size: int, gen: torch.Generator) -> list[int]:
        self._check(n)
        return [m[int(torch.randint(len(m), (), generator=gen))] for m in self.members]

    def _check(self, n: int) -> None:
        if len(self.strata) != n:
            raise SamplingError(f"stratified: the strata cover {len(self.strata)} clients, the population is {n}")


class Importance(Sampling):
    """Independent inclusion with p_i = min(1, c w_i), c such that sum_i p_i = cohort size."""

    name = "importance"

    def __init__(self, weights: Sequence[float]) -> None:
        w = [float(v) for v in weights]
        if not w or any(not math.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
            raise SamplingError(f"importance: weights must be finite, non-negative and not all zero, got {w}")
        self.weights = w

    def probabilities(self, n: int, size: int) -> list[float]:
        if len(self.weights) != n:
            raise SamplingError(f"importance: {len(self.weights)} weights for a population of {n}")
        return capped_proportional(self.weights, min(size, n))

    def draw_ids(self, n: int, size: int, gen: torch.Generator) -> list[int]:
        p = torch.tensor(self.probabilities(n, size), dtype=torch.float64)
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        return torch.nonzero(u < p).flatten().tolist()


def capped_proportional(weights: Sequence[float], total: float) -> list[float]:
    """p_i = min(1, c w_i) with sum_i p_i = total (water-filling: cap the largest, rescale the rest)."""
    w = np.asarray(weights, dtype=np.float64)
    p = np.zeros_like(w)
    capped = np.zeros(len(w), dtype=bool)
    positive = w > 0
    if total > positive.sum():
        raise SamplingError(f"importance: an expected cohort of {total} needs that many clients with positive weight")
    for _ in range(len(w) + 1):
        free = positive & ~capped
        if not free.any():
            break
        c = (total - capped.sum()) / w[free].sum()
        p = np.where(capped, 1.0, c * w)
        newly = free & (p >= 1.0)
        if not newly.any():
            break
        capped |= newly
    return np.minimum(p, 1.0).tolist()


# ---- the `sampling` config key -------------------------------------------------------------------

#: every sampling spec name and the arguments it accepts
SAMPLINGS: dict[str, tuple[str, ...]] = {
    "nice": ("tau",),
    "block": ("blocks", "q", "assignment"),
    "stratified": ("clusters", "by"),
    "importance": ("by",),
}
STRATIFY_BY = ("labels", "features", "gradients")
IMPORTANCE_BY = ("examples", "smoothness")
DEFAULT_SAMPLING = "nice"


def parse_sampling(spec: str, num_clients: int | None = None) -> tuple[str, dict[str, object]]:
    """(name, arguments by name) of a sampling spec; SamplingError names the valid names and arguments."""
    try:
        call = parse_call(spec, example="stratified(clusters=4, by=labels)")
    except SpecError as exc:
        raise SamplingError(f"sampling spec: {exc}") from None
    if call.name not in SAMPLINGS:
        raise SamplingError(f"unknown sampling {call.name!r}; valid: {', '.join(SAMPLINGS)}")
    try:
        args: dict[str, object] = call.bind(SAMPLINGS[call.name])
    except SpecError as exc:
        raise SamplingError(str(exc)) from None
    n = num_clients
    if call.name == "nice" and "tau" in args:
        Nice(args["tau"])  # type: ignore[arg-type]
        if n is not None and args["tau"] > n:  # type: ignore[operator]
            raise SamplingError(f"nice: tau = {args['tau']} is more than the {n} clients")
    if call.name == "block":
        if "assignment" in args:
            a = args["assignment"]
            if not isinstance(a, list) or (n is not None and len(a) != n):
                raise SamplingError(f"block: assignment must list one block per client ({n}), got {a!r}")
            Block(a, args.get("q"))  # type: ignore[arg-type]
        else:
            b = args.get("blocks")
            if isinstance(b, bool) or not isinstance(b, int) or b < 1 or (n is not None and b > n):
                raise SamplingError(f"block: blocks must be an integer in 1..{n or 'num-clients'}, got {b!r}")
            if n is not None:
                Block.contiguous(n, b, args.get("q"))  # type: ignore[arg-type]
    if call.name == "stratified":
        b = args.get("clusters")
        if isinstance(b, bool) or not isinstance(b, int) or b < 1 or (n is not None and b > n):
            raise SamplingError(f"stratified: clusters must be an integer in 1..{n or 'num-clients'}, got {b!r}")
        args.setdefault("by", "labels")
        if args["by"] not in STRATIFY_BY:
            raise SamplingError(f"stratified: by must be one of {', '.join(STRATIFY_BY)}, got {args['by']!r}")
    if call.name == "importance":
        args.setdefault("by", "examples")
        if args["by"] not in IMPORTANCE_BY:
            raise SamplingError(f"importance: by must be one of {', '.join(IMPORTANCE_BY)}, got {args['by']!r}")
    return call.name, args


def build_sampling(
    spec: str, task: object, x0: torch.Tensor, model: torch.nn.Module, seed: int
) -> Sampling:
    """The sampling a spec names, over the task's clients (strata and weights computed from the task)."""
    n = len(task.clients)  # type: ignore[attr-defined]
    name, args = parse_sampling(spec, n)
    if name == "nice":
        return Nice(args.get("tau"))  # type: ignore[arg-type]
    if name == "block":
        if "assignment" in args:
            return Block(args["assignment"], args.get("q"))  # type: ignore[arg-type]
        return Block.contiguous(n, args["blocks"], args.get("q"))  # type: ignore[arg-type]
    if name == "stratified":
        points = client_points(task, str(args["by"]), x0, model)
        return Stratified(kmeans(points, int(args["clusters"]), seed))  # type: ignore[arg-type]
    return Importance(client_weights(task, str(args["by"]), x0, model, seed))


def client_points(task: object, by: str, x0: torch.Tensor, model: torch.nn.Module) -> np.ndarray:
    """One row per client to cluster: its label histogram, its mean feature vector, or grad f_i(x^0)."""
    from ._local import flat_grad

    rows = []
    for c in task.clients:  # type: ignore[attr-defined]
        x, y = c.train.x, c.train.y
        if by == "labels":
            hist = torch.bincount(y, minlength=task.num_classes).to(torch.float64)  # type: ignore[attr-defined]
            rows.append(hist / max(float(hist.sum()), 1.0))
        elif by == "features":
            rows.append(x.reshape(len(y), -1).to(torch.float64).mean(dim=0))
        else:
            rows.append(flat_grad(model, x0, task.loss_fn, x, y)[1].to(torch.float64))  # type: ignore[attr-defined]
    return torch.stack(rows).numpy()


def kmeans(points: np.ndarray, clusters: int, seed: int) -> list[int]:
    """Seeded k-means (scikit-learn, k-means++ with 10 restarts): a cluster label per row."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=clusters, n_init=10, random_state=seed % (2**32))
    return [int(v) for v in km.fit_predict(points)]


def client_weights(task: object, by: str, x0: torch.Tensor, model: torch.nn.Module, seed: int) -> list[float]:
    """n_i (training examples) or L_i (exact for the logistic tasks, else estimated at x^0)."""
    clients = task.clients  # type: ignore[attr-defined]
    if by == "examples":
        return [float(len(c.train.y)) for c in clients]
    objective = getattr(task, "objective", None)
    if objective is not None:
        return [float(v) for v in objective.L_i]
    from ._local import smoothness_estimate

    return [smoothness_estimate(model, [x0], task.loss_fn, c, iters=30, seed=seed + i)  # type: ignore[attr-defined]
            for i, c in enumerate(clients)]  # fmt: skip
