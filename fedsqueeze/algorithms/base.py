"""The algorithm interface: a client half (local training from the broadcast model) and a server half.

One round, as the Flower apps drive it (see DESIGN.md, "One round, as data"):

    client: out = algorithm.client_step(x, model, data, loss_fn, cfg, state)   # out.update = v_i
            v_i is compressed per tensor rules (fedsqueeze.algorithms.updates) and sent
    server: g = algorithm.aggregate(decoded v_i, weights)                          # weighted mean
            x' = algorithm.server_step(x, g, server_round)

Everything here is plain PyTorch: no Flower. `state` is the client's persistent memory (a dict of
tensors the ClientApp keeps in its Context between rounds); algorithms with control variates or
personal parameters keep them there. `round_config` lets the server half send per-round values
(for example a random number of local steps) that the client half reads from `cfg.extra`.
Algorithms register by name; `get(name)` imports `fedsqueeze.algorithms.<name>` on first use;
`build(spec)` also takes arguments written like a call: "fedprox(mu=0.01)", "flix(alpha=[0.1, 0.5])".
"""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

Scalar = bool | int | float | str
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from (run seed, round, client id, purpose, ...), the same on every machine."""
    text = "\x1f".join(repr(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") >> 1


def generator(*parts: object) -> torch.Generator:
    """A CPU torch.Generator seeded from `derive_seed(*parts)`."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(*parts))


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
    #: per-round values from the server half's `round_config`
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
        """Train locally from the flat global model `x` on this client's data; may read and update `state`."""

    def layout(self, model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor of the communicated vector x, in order: the model's parameters."""
        return [(name, tuple(p.shape)) for name, p in model.named_parameters()]

    def initial(self, model: nn.Module) -> torch.Tensor:
        """The server's starting vector x^0, in `layout(model)` order: the model's parameters."""
        return nn.utils.parameters_to_vector(model.parameters()).detach().clone()

    def global_params(self, x: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """The global model's parameters within x (what the server evaluates and saves): x itself."""
        return x

    def round_config(self, server_round: int, seed: int) -> dict[str, Scalar]:
        """Per-round values sent to every sampled client (none by default)."""
        return {}

    def aggregate(self, updates: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
        """The server's estimate from the decoded client vectors: the weighted mean (weights: examples)."""
        total = float(sum(weights))
        out = torch.zeros_like(updates[0], dtype=torch.float64)
        for u, w in zip(updates, weights, strict=True):
            out.add_(u.to(torch.float64), alpha=w / total)
        return out.to(updates[0].dtype)

    def server_step(self, x: torch.Tensor, estimate: torch.Tensor, server_round: int) -> torch.Tensor:
        """The new global model (model-delta algorithms: x + estimate)."""
        return x + estimate


#: optional ClientOutput.metrics key: the client's weight in the server average when it is not its
#: example count (Scafflix weighs client j by alpha_j^2 / gamma_j); servers pass it to `aggregate`
AGGREGATION_WEIGHT = "aggregation-weight"

_REGISTRY: dict[str, type[Algorithm]] = {}
_HELPERS = {"base", "updates"}


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
    import ast
    import inspect

    try:
        node = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError(f"cannot parse algorithm spec {spec!r}; write e.g. 'fedprox(mu=0.01)'") from None
    if isinstance(node, ast.Name):
        return get(node.id)
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ValueError(f"cannot parse algorithm spec {spec!r}; write e.g. 'fedprox(mu=0.01)'")

    def literal(arg: ast.expr) -> object:
        if isinstance(arg, ast.Name):
            return {"true": True, "false": False, "True": True, "False": False}.get(arg.id, arg.id)
        try:
            return ast.literal_eval(arg)
        except ValueError:
            raise ValueError(f"argument {ast.unparse(arg)!r} in {spec!r} is not a literal") from None

    name = node.func.id
    get(name)  # raises with the valid names
    cls = _REGISTRY[name]
    args = [literal(a) for a in node.args]
    kwargs = {kw.arg: literal(kw.value) for kw in node.keywords if kw.arg is not None}
    try:
        inspect.signature(cls).bind(*args, **kwargs)
    except TypeError as exc:
        valid = ", ".join(inspect.signature(cls).parameters) or "none"
        raise ValueError(f"bad arguments for {name} in {spec!r}: {exc}; valid arguments: {valid}") from None
    return cls(*args, **kwargs)
