"""The algorithm interface: a client half, a server half, and the server's decisions as hooks.

One round, as the round engine (`fedsqueeze.engine`) drives it:

    server: cohort = algorithm.select(round, population, size, generator)   # ids and p_i = P(i in S)
            config_i = algorithm.configure(round, i, seed)                  # what each client is told
    client: out = algorithm.client_step(x, model, data, loss_fn, cfg, state) # out.update = v_i
            v_i is compressed per tensor rules (fedsqueeze.engine.payloads) and sent
    server: every reply goes into the mechanism's server half (fedsqueeze.feedback; "none" is the
            plain weighted mean) with the client's share from algorithm.shares(task), or the weight
            the client reports (algorithm.reply_weight); that is the one aggregation path
            x' = algorithm.server_step(x, estimate, round)

Everything here is plain PyTorch: no Flower. `state` is the client's persistent memory (a dict of
tensors the ClientApp keeps in its Context between rounds); algorithms with control variates or
personal parameters keep them there. `configure` lets the server half send per-client values
(for example a random number of local steps) that the client half reads from `cfg.extra`.
Algorithms register by name; `get(name)` imports `fedsqueeze.algorithms.<name>` on first use;
`build(spec)` also takes arguments written like a call: "fedprox(mu=0.01)", "flix(alpha=[0.1, 0.5])".

The cohort comes from the run's sampling (`fedsqueeze.algorithms.sampling`, config key `sampling`),
which declares every client's inclusion probability p_i; where the p_i differ the server weighs a
reply by s_i / p_i (s_i the client's share), so the cohort mean estimates the mean over all clients.
A cohort algorithm (several rounds per cohort, `sppm`) keeps the cohort it drew in `select` and
returns it again until its inner rounds are done; `position` says which cohort and inner round a
round is, and `configure` tells its clients.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fedsqueeze.seeding import derive_seed, generator  # noqa: F401 (the algorithms' seeding, re-exported)
from fedsqueeze.specs import SpecError, parse_call

from .sampling import Cohort, Nice, Sampling

Scalar = bool | int | float | str
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LocalConfig:
    """What a client step needs for one round."""

    server_round: int
    lr: float
    #: local SGD steps (0 when local_epochs is used)
    local_steps: int
    #: local epochs (> 0 replaces local_steps)
    local_epochs: float
    #: mini-batch size; 0 = the whole local training split (full-batch gradient)
    batch_size: int
    #: seed for this client and round (mini-batch order and any other local randomness)
    seed: int
    #: per-client values from the server half's `configure`
    extra: Mapping[str, Scalar] = field(default_factory=dict)

    def num_steps(self, num_examples: int) -> int:
        """Local steps this round: local_steps, or local_epochs passes over the data."""
        if self.local_epochs > 0:
            batch = self.batch_size if 0 < self.batch_size < num_examples else num_examples
            batches_per_epoch = -(-num_examples // max(batch, 1))
            return max(1, round(self.local_epochs * batches_per_epoch))
        return self.local_steps


@dataclass
class ClientOutput:
    """What the client half produces: the vector to communicate and what it reports."""

    #: the flat float32 vector sent to the server (model delta for FedAvg)
    update: torch.Tensor
    #: weight of this client in the server's average
    num_examples: int
    #: mean training loss over the local steps
    train_loss: float
    metrics: dict[str, float] = field(default_factory=dict)


class Algorithm(ABC):
    """A federated algorithm: client half and server half, side by side."""

    name: str = ""
    #: True when clients report their own weight in the average (AGGREGATION_WEIGHT); feedback
    #: mechanisms keep running means over fixed client shares and cannot be used with such algorithms
    reports_weights: bool = False
    #: True when every client's share in the objective is the same (`shares` then is uniform)
    uniform_shares: bool = False
    #: True when the server step needs the estimate of the cohort's own objective f_S (SPPM-AS): a
    #: feedback mechanism whose estimate mixes in the memories of clients outside the cohort cannot be used
    cohort_objective: bool = False
    #: who takes part in a round; the server half sets the run's (`sampling` key)
    sampling: Sampling = Nice()

    @abstractmethod
    def client_step(
        self,
        x: torch.Tensor,
        model: nn.Module,
        data: object,
        loss_fn: LossFn,
        cfg: LocalConfig,
        state: dict[str, torch.Tensor],
    ) -> ClientOutput:
        """Train locally from the flat global model `x` on this client's data; may read and update `state`.

        `x` is read only: the clients of a round that one process serves share it (the engine raises
        if it was changed in place)."""

    def layout(self, model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor of the communicated vector x, in order: the model's parameters."""
        return [(name, tuple(p.shape)) for name, p in model.named_parameters()]

    def initial(self, model: nn.Module) -> torch.Tensor:
        """The server's starting vector x^0, in `layout(model)` order: the model's parameters."""
        return nn.utils.parameters_to_vector(model.parameters()).detach().clone()

    def global_params(self, x: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """The global model's parameters within x (what the server evaluates and saves): x itself."""
        return x

    def setup(self, task: object) -> None:  # noqa: B027 (a hook: most algorithms need nothing)
        """Read what the algorithm needs from the task before the run (e.g. p = "theory"); nothing by default."""

    # ---- server-side hooks -----------------------------------------------------------------

    def select(self, server_round: int, population: Sequence[int], size: int, gen: torch.Generator) -> Cohort:
        """Who takes part this round: a cohort drawn from `sampling` (the run's `sampling` key, which the
        server sets; default nice: `size` clients uniformly at random, p_i = size / n)."""
        return self.sampling.draw(population, size, gen)

    def position(self, server_round: int) -> tuple[int, int]:
        """(cohort t, inner round k) of a round, both from 1: one round per cohort unless an algorithm
        keeps its cohort for several (the metrics row's `cohort` and `inner_round`)."""
        return server_round, 1

    def configure(self, server_round: int, client: int, seed: int) -> dict[str, Scalar]:
        """What sampled `client` is told this round (`seed` is the round's, the same for every client)."""
        return {}

    def shares(self, task: object) -> list[float]:
        """Each client's share p_i of the objective and of the server's average: its example count,
        or equal shares when `uniform_shares` is set (normalised by the server)."""
        clients = task.clients  # type: ignore[attr-defined]
        if self.uniform_shares:
            return [1.0] * len(clients)
        return [float(len(c.train.y)) for c in clients]

    def reply_weight(self, metrics: Mapping[str, float]) -> float | None:
        """The weight a reply carries this round instead of its fixed share (None: the share)."""
        if not self.reports_weights:
            return None
        return float(metrics[AGGREGATION_WEIGHT]) if AGGREGATION_WEIGHT in metrics else None

    def server_step(self, x: torch.Tensor, estimate: torch.Tensor, server_round: int) -> torch.Tensor:
        """The new global model (model-delta algorithms: x + estimate)."""
        return x + estimate

    def state_dict(self) -> dict[str, object]:
        """What the server half keeps between rounds beyond x (a cohort algorithm's cohort, say), for the
        run's checkpoint: tensors, numbers, strings and containers of them. Nothing by default."""
        return {}

    def load_state_dict(self, state: Mapping[str, object]) -> None:  # noqa: B027 (nothing kept by default)
        """Take up what `state_dict` returned (when a run resumes)."""


#: optional ClientOutput.metrics key: the client's weight in the server average when it is not its
#: example count (Scafflix weighs client j by alpha_j^2 / gamma_j); servers pass it to `aggregate`
AGGREGATION_WEIGHT = "aggregation-weight"

_REGISTRY: dict[str, type[Algorithm]] = {}
_HELPERS = {"base", "personal", "sampling"}


def register(name: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    def decorate(cls: type[Algorithm]) -> type[Algorithm]:
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return decorate


def available() -> list[str]:
    """Every algorithm name (imports each module of this package once)."""
    from fedsqueeze import algorithms

    for info in pkgutil.iter_modules(algorithms.__path__):
        if info.name not in _HELPERS and not info.name.startswith("_"):
            importlib.import_module(f"fedsqueeze.algorithms.{info.name}")
    return sorted(_REGISTRY)


def get(name: str) -> Algorithm:
    """A fresh instance of the algorithm `name`; ValueError lists the valid names."""
    if name not in _REGISTRY and name.isidentifier() and name not in _HELPERS:
        try:
            importlib.import_module(f"fedsqueeze.algorithms.{name}")
        except ModuleNotFoundError:
            pass
    if name not in _REGISTRY:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(available())}")
    return _REGISTRY[name]()


def build(spec: str) -> Algorithm:
    """The algorithm a spec names, with its arguments: "scaffnew", "fedprox(0.01)", "flix(alpha=[0.1, 1])".

    Arguments are Python literals (numbers, strings, true/false, lists) or bare words (read as strings).
    ValueError names the valid algorithms, or the arguments the algorithm takes.
    """
    import inspect

    try:
        call = parse_call(spec, example="fedprox(mu=0.01)")
    except SpecError as exc:
        raise ValueError(f"algorithm spec: {exc}") from None
    get(call.name)  # raises with the valid names
    cls = _REGISTRY[call.name]
    try:
        inspect.signature(cls).bind(*call.args, **call.kwargs)
    except TypeError as exc:
        valid = ", ".join(inspect.signature(cls).parameters) or "none"
        raise ValueError(f"bad arguments for {call.name} in {spec!r}: {exc}; valid arguments: {valid}") from None
    return cls(*call.args, **call.kwargs)
