"""The algorithms of fedsqueeze.algorithms through the Flower apps (in-process backend)."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedsqueeze import wire
from fedsqueeze.algorithms.lowrank import LowRank
from fedsqueeze.client.app import app as client_app
from fedsqueeze.client.app import load_state
from fedsqueeze.config import ConfigError, resolve
from fedsqueeze.engine import Server, plan_for
from fedsqueeze.simulation.grid import run_inprocess
from fedsqueeze.simulation.runner import simulate
from fedsqueeze.tracking import load_run

SMALL = ["num-clients=4", "rounds=4", "local-steps=3", "batch-size=16", "target-accuracy=0.5"]


def _run(tmp_path, name: str, *overrides: str):
    cfg = resolve(overrides=[*SMALL, f"out-dir={tmp_path}", f"name={name}", *overrides])
    result = simulate(cfg)
    run = load_run(result.run_dir)
    assert result.summary["status"] == "completed"
    assert [r["round"] for r in run.rows] == list(range(1, cfg.rounds + 1))
    assert all(r["clients_failed"] == 0 and r["clients_ok"] == cfg.num_clients for r in run.rows)
    return run.rows


@pytest.mark.parametrize(
    ("name", "algorithm", "task"),
    [
        ("fedprox", "fedprox(mu=0.01)", "digits-logreg"),
        ("scaffnew", "scaffnew(p=0.3)", "digits-logreg"),
    ],
)
def test_global_algorithms_lower_the_loss(tmp_path, name, algorithm, task):
    rows = _run(tmp_path, name, f"algorithm={algorithm}", f"task={task}", "compressor=topk(0.5)", "lr=0.1")
    losses = [r["test_loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("algorithm", ["flix(alpha=0.5)", "scafflix(alpha=0.5, gamma=0.1, p=0.5)", "lowrank(rank=2)"])
def test_personalised_algorithms_report_personal_metrics(tmp_path, algorithm):
    name = algorithm.split("(")[0]
    rows = _run(tmp_path, name, f"algorithm={algorithm}", "task=digits-mlp", "compressor=topk(0.5)")
    for row in rows:
        for key in ("global_accuracy_mean", "personal_accuracy_mean", "personal_accuracy_min"):
            assert key in row, (key, sorted(row))
            assert 0.0 <= row[key] <= 1.0
    assert all(math.isfinite(r["test_loss"]) for r in rows)


def test_theory_p_is_configured_from_the_task(tmp_path):
    cfg = resolve(overrides=[*SMALL, f"out-dir={tmp_path}", "task=digits-logreg", "algorithm=scaffnew(p=theory)"])
    extra = Server(cfg).client_config(1, 0)
    assert 0 < extra["p"] <= 1 and extra["K"] >= 1


def test_config_accepts_algorithm_arguments():
    assert resolve(overrides=["algorithm=fedprox(mu=0.01)"]).algorithm == "fedprox(mu=0.01)"


@pytest.mark.parametrize("spec", ["fedprox(nu=1)", "nonsense", "fedprox(mu=0.01"])
def test_config_rejects_bad_algorithm_specs(spec):
    with pytest.raises(ConfigError) as info:
        resolve(overrides=[f"algorithm={spec}"])
    assert info.value.key == "algorithm"
    assert "fedprox" in str(info.value) and "scaffnew" in str(info.value)


class _Recording(ClientApp):
    """The fedsqueeze ClientApp, keeping every train reply and the node's context after it."""

    def __init__(self) -> None:
        super().__init__()
        self.replies: list[tuple[Message, Context]] = []

    def __call__(self, message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        if message.metadata.message_type == "train":
            self.replies.append((reply, context))
        return reply


@pytest.mark.parametrize("share", ["none", "A"])
def test_lowrank_personal_factors_never_leave_the_device(tmp_path, share):
    """Every reply of a low-rank run carries exactly the communicated vector (W, and A when shared):
    no payload or metric holds a private factor, and the factors persist in the node's state."""
    cfg = resolve(overrides=[*SMALL, f"out-dir={tmp_path}", f"name=lowrank-{share}", "task=digits-mlp",
                             "num-clients=5", "partition=shards(2)", "compressor=identity", "lr=0.1",
                             f"algorithm=lowrank(rank=2, share={share})"])  # fmt: skip
    recording = _Recording()
    run_inprocess("fedsqueeze.server.app:app", recording, cfg.num_clients, cfg.to_run_config(), seed=cfg.seed)
    plan = plan_for(cfg)
    model = plan.task.new_model()
    d = sum(p.numel() for p in model.parameters())
    targets = LowRank(rank=2).targets(model)
    n_a = sum(r * cols for _, (_, cols), r in targets)
    assert plan.uplink.numel == d + (n_a if share == "A" else 0)
    assert len(recording.replies) == cfg.rounds * cfg.num_clients
    private = "lowrank.B." if share == "A" else "lowrank."
    for reply, context in recording.replies:
        assert set(reply.content) == {"update", "metrics"}
        assert not any("lowrank" in k for k in reply.content["metrics"])
        payloads = {k: bytes(a.data) for k, a in reply.content["update"].items()}
        sent = plan.uplink.decompress([wire.decode(payloads[g.key], g.numel) for g in plan.uplink.groups])
        assert sent.numel() == plan.uplink.numel
        state = load_state(context)
        factors = {k: v for k, v in state.items() if k.startswith(private)}
        assert len(factors) == len(targets) * (1 if share == "A" else 2)
        assert not any(k.startswith("lowrank.A.") for k in state if share == "A")
        for name, value in factors.items():
            values = value.to(torch.float32).flatten()
            values = values[values != 0]
            assert values.numel() > 0, name  # trained, so the test below means something
            assert not torch.isin(values, sent).any(), f"{name} appears in a payload"
    rows = load_run(tmp_path / f"lowrank-{share}").rows
    assert rows[-1]["personal_accuracy_mean"] > rows[-1]["global_accuracy_mean"]
