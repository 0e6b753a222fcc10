"""Personalised low-rank deltas: each client's forward pass uses W + B_i A_i for every Linear/conv weight.

LoRA-style personalisation (Hu et al., "LoRA", ICLR 2022, eq. (3): h = W0 x + B A x, B initialised to 0,
A random) applied per client, as in algorithms.md §5: the shared model W is trained by local SGD and its
delta is sent (and compressed) as usual; the factors B_i (out x r) and A_i (r x in*kh*kw) are trained
in the same local steps, kept in the client's state ("lowrank.B.<weight>", "lowrank.A.<weight>") and
never leave the device. A conv weight (out, in, kh, kw) is treated as the matrix (out, in*kh*kw).

share = "A" (FedSA-LoRA: Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", ICLR 2025): the A factors are shared and averaged by the server with the model, B stays
personal. The communicated vector is then [W, A of every target] (`layout(model)` lists it), and every
client starts A from the same seeded initialisation.

The personal model of client i is W + B_i A_i (`personal_params`, in the base model's layout); the
global model is W alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from ._local import batches, cid_of
from .base import Algorithm, ClientOutput, LocalConfig, LossFn, generator, register
from .personal import client_report


class _Merged(nn.Module):
    """The model evaluated at given tensors; `parameters()` yields the shared weights (for the L2 term)."""

    def __init__(self, model: nn.Module, tensors: dict[str, torch.Tensor], shared: list[torch.Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a submodule: parameters() must not see it
        self._tensors = tensors
        self._shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self._model, self._tensors, (x,))

    def parameters(self, recurse: bool = True):  # type: ignore[override]
        return iter(self._shared)


@register("lowrank")
class LowRank(Algorithm):
    """Local SGD on the shared weights W and the private rank-r factors B_i, A_i; the W delta is sent."""

    def __init__(self, rank: int = 4, share: str = "none", personal_lr: float = 0.0, report: bool = True) -> None:
        if int(rank) < 1:
            raise ValueError(f"lowrank: rank must be >= 1, got {rank!r}")
        if share not in ("none", "A"):
            raise ValueError(f"lowrank: share must be 'none' or 'A', got {share!r}")
        self.rank = int(rank)
        self.share = share
        self.personal_lr = float(personal_lr)  # 0: the config's lr
        self.report = bool(report)

    # ---- layout ------------------------------------------------------------------------------
    def targets(self, model: nn.Module) -> list[tuple[str, tuple[int, int], int]]:
        """(weight name, (out, in*kh*kw), rank) of every Linear and conv weight."""
        out = []
        for mod_name, mod in model.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                w = mod.weight
                rows, cols = w.shape[0], w[0].numel()
                out.append((f"{mod_name}.weight" if mod_name else "weight", (rows, cols), min(self.rank, rows, cols)))
        return out

    def layout(self, model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
        """The communicated vector's tensors: the model's, then (share="A") every shared A factor."""
        base = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
        if self.share == "A":
            base += [(f"lowrank.A.{n}", (r, cols)) for n, (_, cols), r in self.targets(model)]
        return base

    def initial(self, model: nn.Module) -> torch.Tensor:
        """The server's starting vector: the model's parameters (and the shared A initialisation)."""
        x = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        if self.share == "A":
            x = torch.cat(
                [x]
                + [self._init_a(n, r, cols, "shared", x.dtype).reshape(-1) for n, (_, cols), r in self.targets(model)]
            )
        return x

    @staticmethod
    def _init_a(name: str, r: int, cols: int, who: object, dtype: torch.dtype) -> torch.Tensor:
        gen = generator("lowrank.A", who, name)
        return (torch.randn(r, cols, generator=gen, dtype=torch.float64) / math.sqrt(cols)).to(dtype)

    def _split(self, x: torch.Tensor, model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d = sum(p.numel() for p in model.parameters())
        w, shared_a, pos = x[:d], {}, d
        if self.share == "A":
            for n, (_, cols), r in self.targets(model):
                shared_a[n] = x[pos : pos + r * cols].reshape(r, cols)
                pos += r * cols
        return w, shared_a

    def _factors(self, model: nn.Module, data: object, state: dict, x: torch.Tensor) -> dict[str, tuple]:
        """name -> (B, A) for this client (created on first use; A from the server when shared)."""
        _, shared_a = self._split(x, model)
        out = {}
        for n, (rows, cols), r in self.targets(model):
            kb, ka = f"lowrank.B.{n}", f"lowrank.A.{n}"
            if kb not in state:
                state[kb] = torch.zeros(rows, r, dtype=x.dtype)
            if self.share == "A":
                a = shared_a[n].clone()
            else:
                if ka not in state:
                    state[ka] = self._init_a(n, r, cols, cid_of(data), x.dtype)
                a = state[ka].to(x.dtype)
            out[n] = (state[kb].to(x.dtype), a)
        return out

    # ---- models ------------------------------------------------------------------------------
    def _tensors(self, model: nn.Module, w: torch.Tensor, factors: dict[str, tuple]) -> tuple[dict, list]:
        tensors, shared, pos = {}, [], 0
        for name, p in model.named_parameters():
            t = w[pos : pos + p.numel()].reshape(p.shape)
            pos += p.numel()
            shared.append(t)
            if name in factors:
                b, a = factors[name]
                t = t + (b @ a).reshape(p.shape)
            tensors[name] = t
        return tensors, shared

    def global_params(self, x: torch.Tensor, model: nn.Module) -> torch.Tensor:
        return self._split(x, model)[0]

    def personal_params(self, x: torch.Tensor, model: nn.Module, data: object, state: dict) -> torch.Tensor:
        w, _ = self._split(x, model)
        if not any(k.startswith("lowrank.B.") for k in state):
            return w
        tensors, _ = self._tensors(model, w, self._factors(model, data, state, x))
        return torch.cat([t.reshape(-1) for t in tensors.values()]).detach()

    # ---- the two halves -----------------------------------------------------------------------
    def client_step(
        self,
        x: torch.Tensor,
        model: nn.Module,
        data: object,
        loss_fn: LossFn,
        cfg: LocalConfig,
        state: dict[str, torch.Tensor],
    ) -> ClientOutput:
        x = x.detach()
        factors = self._factors(model, data, state, x)
        metrics = client_report(self, x, model, data, state) if self.report else {}
        w = self._split(x, model)[0].clone().requires_grad_(True)
        bs = {n: b.clone().requires_grad_(True) for n, (b, _) in factors.items()}
        as_ = {n: a.clone().requires_grad_(True) for n, (_, a) in factors.items()}
        n_ex = len(data.train.y)  # type: ignore[attr-defined]
        steps, total = cfg.num_steps(n_ex), 0.0
        plr = self.personal_lr or cfg.lr
        stream = batches(cfg, data)
        for _ in range(steps):
            xb, yb = next(stream)
            tensors, shared = self._tensors(model, w, {n: (bs[n], as_[n]) for n in bs})
            loss = loss_fn(_Merged(model, tensors, shared), xb, yb)
            leaves = [w, *bs.values(), *as_.values()]
            grads = torch.autograd.grad(loss, leaves)
            with torch.no_grad():
                w -= cfg.lr * grads[0]
                for t, g in zip(leaves[1:], grads[1:], strict=True):
                    t -= plr * g
            total += float(loss.detach())
        for n in bs:
            state[f"lowrank.B.{n}"] = bs[n].detach()
            if self.share != "A":
                state[f"lowrank.A.{n}"] = as_[n].detach()
        update = w.detach() - self._split(x, model)[0]
        if self.share == "A":
            _, shared_a = self._split(x, model)
            update = torch.cat([update] + [(as_[n].detach() - shared_a[n]).reshape(-1) for n in bs])
        return ClientOutput(update, n_ex, total / steps if steps else math.nan, metrics)
