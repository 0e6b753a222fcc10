"""The algorithms of fedsqueeze.algorithms through the Flower apps (in-process backend)."""

from __future__ import annotations

import math

import pytest

from fedsqueeze.config import ConfigError, resolve
from fedsqueeze.server.coordinator import Coordinator
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
    extra = Coordinator(cfg).round_config(1)
    assert 0 < extra["p"] <= 1 and extra["K"] >= 1


def test_config_accepts_algorithm_arguments():
    assert resolve(overrides=["algorithm=fedprox(mu=0.01)"]).algorithm == "fedprox(mu=0.01)"


@pytest.mark.parametrize("spec", ["fedprox(nu=1)", "nonsense", "fedprox(mu=0.01"])
def test_config_rejects_bad_algorithm_specs(spec):
    with pytest.raises(ConfigError) as info:
        resolve(overrides=[f"algorithm={spec}"])
    assert info.value.key == "algorithm"
    assert "fedprox" in str(info.value) and "scaffnew" in str(info.value)
