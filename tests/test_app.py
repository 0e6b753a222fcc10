"""The Flower app declaration, the Message contract, and equality with Flower's own FedAvg."""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedsqueeze.algorithms import LocalConfig, derive_seed
from fedsqueeze.algorithms.fedavg import local_sgd
from fedsqueeze.config import Config, build_task, resolve
from fedsqueeze.simulation.grid import InProcessGrid, run_inprocess, task_identity
from fedsqueeze.simulation.runner import simulate

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_declares_the_app_with_every_default():
    app = _pyproject()["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "fedsqueeze.server.app:app",
        "clientapp": "fedsqueeze.client.app:app",
    }
    assert app["config"] == Config().to_run_config()
    assert Config.from_run_config(app["config"]) == Config()


def test_fab_holds_the_package_and_not_tests_benchmarks_docs_or_runs():
    """The bundle `flwr run .` builds (Flower's own builder; .venv and .git are skipped to keep this fast,
    the Ray test builds the real one), with docs, runs and simulations present."""
    from flwr.cli.build import build_fab_from_files

    files: dict[str, Path | bytes] = {}
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT).as_posix()
        if path.is_file() and not rel.startswith((".venv/", ".git/")) and "__pycache__" not in rel:
            files[rel] = path
    files.update(
        {
            "docs/deploy.md": b"# guide",
            "runs/demo/metrics.jsonl": b"{}",
            "runs/demo/summary.json": b"{}",
            "simulations/efbv.toml": b'name = "x"',
        }
    )
    fab = build_fab_from_files(files)[0]
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "fedsqueeze/client/app.py" in names and "fedsqueeze/server/app.py" in names
    for folder in ("tests/", "benchmarks/", "docs/", "runs/", "simulations/", "scripts/", "examples/", ".venv/"):
        assert not any(n.startswith(folder) for n in names), folder
    assert len(fab) < 10 * 1024 * 1024


def test_component_references_pass_flowers_static_check():
    from flwr.supercore.object_ref import validate

    for ref in _pyproject()["tool"]["flwr"]["app"]["components"].values():
        assert validate(ref, check_module=True, project_dir=ROOT) == (True, None)


def test_message_contract(tmp_path):
    """query answers the partition; train answers uint8 fedsqueeze/v1 payloads and the metrics."""
    from fedsqueeze.client.app import STYPE, app, payload_record
    from fedsqueeze.engine import Server

    cfg = resolve(overrides=["num-clients=3", "compressor=topk(0.1)", f"out-dir={tmp_path}"])
    grid = InProcessGrid(app, 3, cfg.to_run_config())
    node = grid.node_for_partition(2)
    coord = Server(cfg)
    with task_identity(1):
        query = Message(RecordDict(), dst_node_id=node, message_type="query")
        (info,) = grid.send_and_receive([query], timeout=60)
        assert info.content["info"]["partition-id"] == 2
        assert info.content["info"]["num-examples"] == len(build_task(cfg).clients[2].train.y)
        content = RecordDict(
            {
                "broadcast": payload_record(coord.broadcast(1, [2]).payloads[2]),
                "config": ConfigRecord(coord.client_config(1, 2)),
            }
        )
        (reply,) = grid.send_and_receive([Message(content, dst_node_id=node, message_type="train")], timeout=60)
    update = reply.content["update"]
    assert list(update) == ["default"]
    array = update["default"]
    assert (array.dtype, array.stype, list(array.shape)) == ("uint8", STYPE, [len(array.data)])
    metrics = reply.content["metrics"]
    assert {"num-examples", "train-loss", "compression-error", "partition-id"} <= set(metrics)
    coord.begin(1)
    coord.take({"default": bytes(array.data)}, dict(metrics), 2, node)  # a valid reply
    update = coord.decode({"default": bytes(array.data)}).to_dense()  # top-k: decoded sparse
    assert update.numel() == coord.uplink.numel
    assert int((update != 0).sum()) <= int(0.1 * coord.uplink.numel) + 1


def test_identity_and_averaging_equal_flowers_fedavg(tmp_path):
    """fedsqueeze (identity compressor, example-weighted averaging) == flwr.serverapp.strategy.FedAvg."""
    cfg = resolve(
        overrides=[
            "num-clients=4",
            "rounds=3",
            "local-steps=4",
            "batch-size=16",
            "lr=0.1",
            "compressor=identity",
            f"out-dir={tmp_path}",
        ]
    )
    ours = torch.load(simulate(cfg).run_dir / "model.pt")
    task = build_task(cfg)

    flower_client = ClientApp()

    @flower_client.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        data = task.clients[pid].train
        model = task.new_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        local = LocalConfig(rnd, cfg.lr, cfg.local_steps, cfg.local_epochs, cfg.batch_size,
                            derive_seed(cfg.seed, rnd, pid, "local"))  # fmt: skip
        y, _ = local_sgd(x, model, data.x, data.y, task.loss_fn, local)
        torch.nn.utils.vector_to_parameters(y, model.parameters())
        content = RecordDict(
            {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": len(data.y)})}
        )
        return Message(content, reply_to=msg)

    flower_server = ServerApp()
    result: dict = {}

    @flower_server.main()
    def main(grid: Grid, context: Context) -> None:
        init = task.new_model(seed=derive_seed(cfg.seed, "init"))
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=cfg.num_clients)
        result["arrays"] = strategy.start(grid, ArrayRecord(init.state_dict()), num_rounds=cfg.rounds).arrays

    run_inprocess(flower_server, flower_client, cfg.num_clients, {})
    theirs = result["arrays"].to_torch_state_dict()
    assert set(ours) == set(theirs)
    init = task.new_model(seed=derive_seed(cfg.seed, "init")).state_dict()
    for name in ours:
        moved = float((ours[name] - init[name]).abs().max())
        assert moved > 1e-3  # the models trained
        np.testing.assert_allclose(ours[name].numpy(), theirs[name].numpy(), rtol=0, atol=2e-6)


def test_each_node_reads_the_task_data_from_its_own_data_path(tmp_path):
    """node config `data-path`: a device's copy of a file-backed task's data, wherever it keeps it."""
    import shutil

    from sklearn.datasets import dump_svmlight_file, load_digits

    from fedsqueeze.client.app import app as client_app
    from fedsqueeze.server.app import app as server_app
    from fedsqueeze.simulation.grid import run_inprocess
    from fedsqueeze.tracking import read_metrics

    x, y = load_digits(return_X_y=True)
    server_copy = tmp_path / "server" / "digits.svm"
    server_copy.parent.mkdir()
    dump_svmlight_file(x[:400], (y[:400] < 5).astype(int), str(server_copy))
    devices = []
    for i in range(2):
        device_copy = tmp_path / f"device{i}" / "mine.svm"
        device_copy.parent.mkdir()
        shutil.copy(server_copy, device_copy)
        devices.append({"partition-id": i, "data-path": str(device_copy)})
    common = [f"task=libsvm-logreg(path={str(server_copy)!r})", "num-clients=2", "rounds=2", f"out-dir={tmp_path}"]
    reference = simulate(resolve(overrides=[*common, "name=reference"]))
    cfg = resolve(overrides=[*common, "name=devices"])
    run_inprocess(server_app, client_app, 2, cfg.to_run_config(), node_configs=devices)
    rows = read_metrics(tmp_path / "devices" / "metrics.jsonl")
    strip = lambda row: {k: v for k, v in row.items() if k != "wall_s"}  # noqa: E731
    assert [strip(r) for r in rows] == [strip(r) for r in reference.rows]
    # a device whose copy is missing answers with an error the server counts; the other one trains
    devices[1]["data-path"] = str(tmp_path / "device1" / "gone.svm")
    run_inprocess(server_app, client_app, 2, cfg.replace(name="missing").to_run_config(), node_configs=devices)
    rows = read_metrics(tmp_path / "missing" / "metrics.jsonl")
    assert [(r["clients_ok"], r["clients_failed"]) for r in rows] == [(1, 1), (1, 1)]


def test_data_path_for_a_task_without_files_is_an_error():
    from fedsqueeze.config import ConfigError, with_data_path

    with pytest.raises(ConfigError, match="reads no data files"):
        with_data_path(resolve(overrides=["task=digits-mlp"]), "/data/x.svm")
    cfg = with_data_path(resolve(overrides=['task=libsvm-logreg(path="a.svm", reg=0.5)']), '/d/"b".svm')
    assert cfg.task_name_and_options() == ("libsvm-logreg", {"path": '/d/"b".svm', "reg": 0.5})
