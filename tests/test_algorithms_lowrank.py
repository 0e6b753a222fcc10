"""Personalised low-rank deltas on a label-skewed digits partition (each client holds two labels)."""

from __future__ import annotations

import pytest
import torch
from reference.algorithms import run

from fedsqueeze.algorithms import LocalConfig, build
from fedsqueeze.algorithms.personal import summarize
from fedsqueeze.tasks import build_task

ROUNDS, STEPS, LR, BATCH = 30, 10, 0.1, 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task():
    return build_task("digits-mlp", num_clients=10, partition="shards(2)", seed=0)


def final_report(trace):
    return trace.rows[-1]


@pytest.mark.parametrize("share", ["none", "A"])
def test_lowrank_personal_accuracy_beats_the_global_model(task, share):
    alg = build(f"lowrank(rank=4, share={share})")
    sent = []

    def measure(x, outs):
        sent.extend(int(o.update.numel()) for o in outs)
        return summarize([o.metrics for o in outs])

    trace = run(alg, task, rounds=ROUNDS, lr=LR, local_steps=STEPS, batch_size=BATCH, dtype=torch.float32,
                measure=measure)  # fmt: skip
    row = final_report(trace)
    print(f"share={share}: personalised accuracy {row['personal_accuracy_mean']:.3f} "
          f"(min {row['personal_accuracy_min']:.3f}), global model {row['global_accuracy_mean']:.3f} "
          "on the clients' own test splits")  # fmt: skip
    assert row["personal_accuracy_mean"] > row["global_accuracy_mean"] + 0.2
    # the private factors never leave the device: what is sent is the model (and, shared, the A factors)
    model = task.new_model(0)
    d = sum(p.numel() for p in model.parameters())
    n_a = sum(r * cols for _, (_, cols), r in alg.targets(model))
    assert set(sent) == {d + (n_a if share == "A" else 0)}
    for st in trace.states:
        assert all(k.startswith("lowrank.B.") for k in st if share == "A")
        assert {k.split(".")[1] for k in st} == ({"B"} if share == "A" else {"A", "B"})


def test_lowrank_against_fedavg_fine_tuned_locally(task):
    """FedAvg for the same rounds, then each client fine-tunes the global model for the same local steps."""
    fed = run(build("fedavg"), task, rounds=ROUNDS, lr=LR, local_steps=STEPS, batch_size=BATCH, dtype=torch.float32)
    lora = run(build("lowrank(rank=4)"), task, rounds=ROUNDS, lr=LR, local_steps=STEPS, batch_size=BATCH,
               dtype=torch.float32, measure=lambda x, outs: summarize([o.metrics for o in outs]))  # fmt: skip
    model = task.new_model(0)
    tuned = []
    for i, c in enumerate(task.clients):
        cfg = LocalConfig(server_round=0, lr=LR, local_steps=STEPS, local_epochs=0, batch_size=BATCH, seed=i)
        out = build("fedavg").client_step(fed.x, model, c, task.loss_fn, cfg, {})
        torch.nn.utils.vector_to_parameters(fed.x + out.update, model.parameters())
        with torch.no_grad():
            tuned.append(float((model(c.test.x).argmax(1) == c.test.y).float().mean()))
    fine_tuned = sum(tuned) / len(tuned)
    personal = lora.rows[-1]["personal_accuracy_mean"]
    print(f"mean accuracy on own test split: lowrank personalised {personal:.3f}, FedAvg + {STEPS} local steps "
          f"{fine_tuned:.3f}")  # fmt: skip
    assert personal > 0.9 and fine_tuned > 0.5
