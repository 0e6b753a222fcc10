"""Deployment pieces without a SuperLink: credentials, the state file, the ClientApp's state-dir hook."""

from __future__ import annotations

import json
import logging
import stat
import threading
import zlib

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedsqueeze.cli import main
from fedsqueeze.config import resolve
from fedsqueeze.deploy.credentials import CredentialsError, make_credentials
from fedsqueeze.deploy.processes import node_config_arg
from fedsqueeze.deploy.state import StateError, StateIdentity, StateStore, config_digest, store_for
from fedsqueeze.simulation.grid import run_inprocess

# ---- credentials -----------------------------------------------------------------------------------


def test_keys_command_writes_ca_server_cert_and_node_keys(tmp_path):
    out = tmp_path / "keys"
    assert main(["keys", str(out), "--nodes", "2"]) == 0
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    assert server.issuer == ca.subject
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for name in ("node1", "node2"):
        key = serialization.load_ssh_private_key((out / name).read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        pub = (out / f"{name}.pub").read_text()
        assert pub.startswith("ecdsa-sha2-nistp384 ")
        loaded = serialization.load_ssh_public_key(pub.encode())
        assert loaded.public_numbers() == key.public_key().public_numbers()
    for private in ("ca.key", "server.key", "node1", "node2"):
        assert stat.S_IMODE((out / private).stat().st_mode) == 0o600, private


def test_keys_never_overwrite_without_force(tmp_path, capsys):
    make_credentials(tmp_path, 1)
    before = (tmp_path / "node1").read_bytes()
    assert main(["keys", str(tmp_path), "--nodes", "1"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "node1").read_bytes() == before
    # a new node key next to existing ones is still an overwrite of the CA: refused as a whole
    with pytest.raises(CredentialsError):
        make_credentials(tmp_path, 2)
    assert not (tmp_path / "node2").exists()
    assert main(["keys", str(tmp_path), "--nodes", "1", "--force"]) == 0
    assert (tmp_path / "node1").read_bytes() != before


def test_keys_custom_sans(tmp_path):
    creds = make_credentials(tmp_path, 0, sans=["edge.example.org", "10.0.0.5", "::1"])
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["edge.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "::1"]
    with pytest.raises(CredentialsError, match="neither an IP address nor a host name"):
        make_credentials(tmp_path / "x", 0, sans=["bad host"])


def test_node_config_arg_quotes_strings():
    assert node_config_arg({"partition-id": 0, "state-dir": "/a b"}) == 'partition-id=0 state-dir="/a b"'


# ---- state file ------------------------------------------------------------------------------------

IDENT = StateIdentity(run_id=7, partition_id=1, config_digest="abc")


def test_state_round_trip_is_exact(tmp_path):
    store = StateStore(tmp_path, IDENT)
    tensors = {"residual": torch.randn(5, 3), "h": torch.arange(4, dtype=torch.int64), "empty": torch.zeros(0)}
    store.save(tensors, server_round=3)
    loaded = store.load()
    assert loaded.server_round == 3
    assert loaded.tensors.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded.tensors[k].dtype == v.dtype and torch.equal(loaded.tensors[k], v)
    assert [p.name for p in store.path.parent.iterdir()] == [store.path.name]  # no temporary file left



def test_a_state_files_check_is_zlibs_crc32_of_everything_before_it(tmp_path):
    # the format (module docstring) is CRC-32 as zlib computes it, whichever library computes it here
    store = StateStore(tmp_path, IDENT)
    store.save({"residual": torch.randn(70_000), "h": torch.arange(9)}, server_round=2)
    data = store.path.read_bytes()
    assert int.from_bytes(data[-4:], "little") == zlib.crc32(data[:-4])

@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_corrupted_state_file_is_refused(tmp_path, damage):
    store = StateStore(tmp_path, IDENT)
    store.save({"residual": torch.ones(100)}, server_round=1)
    data = bytearray(store.path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        data = data[:-10]
    elif damage == "garbage":
        data = bytearray(b"not a state file at all" * 4)
    else:
        data = bytearray()
    store.path.write_bytes(bytes(data))
    with pytest.raises(StateError, match="corrupted|not a fedsqueeze state file"):
        store.load()


@pytest.mark.parametrize(
    "other",
    [
        StateIdentity(run_id=8, partition_id=1, config_digest="abc"),
        StateIdentity(run_id=7, partition_id=2, config_digest="abc"),
        StateIdentity(run_id=7, partition_id=1, config_digest="xyz"),
    ],
)
def test_foreign_state_file_is_refused(tmp_path, other):
    StateStore(tmp_path, other).save({"residual": torch.ones(3)}, server_round=1)
    store = StateStore(tmp_path, IDENT)
    store.path.parent.mkdir(parents=True, exist_ok=True)
    # a file copied in from another client, run or config
    StateStore(tmp_path, other).path.replace(store.path)
    with pytest.raises(StateError, match="belongs to another client"):
        store.load()


def test_a_store_keeps_the_state_before_the_newest_and_reads_the_newest_before_a_round(tmp_path):
    store = StateStore(tmp_path, IDENT)
    assert store.load(before_round=1) is None and not store.exists()
    store.save({"g": torch.full((2,), 3.0)}, server_round=3)
    store.save({"g": torch.full((2,), 7.0)}, server_round=7)
    assert store.load().server_round == 7
    assert store.load(before_round=8).server_round == 7
    # a server that resumed before round 7 repeats it: the client starts from its state of round 3
    assert store.load(before_round=7).server_round == 3
    assert torch.equal(store.load(before_round=7).tensors["g"], torch.full((2,), 3.0))
    store.save({"g": torch.full((2,), 9.0)}, server_round=7)  # round 7 again: round 3's stays the previous
    assert store.load(before_round=7).server_round == 3 and store.load().tensors["g"][0] == 9.0
    assert store.load(before_round=3) is None
    # a crash left a temporary file: the next rotation writes over it (or over the discarded previous
    # state), and only the two states stay
    (store.path.parent / f".{store.path.name}.tmp").write_bytes(b"torn" * 1000)
    store.save({"g": torch.full((2,), 11.0)}, server_round=8)
    store.save({"g": torch.full((2,), 12.0)}, server_round=9)
    assert sorted(p.name for p in store.path.parent.iterdir()) == [store.path.name, store.previous_path.name]
    assert store.load().server_round == 9 and store.load(before_round=9).server_round == 8
    assert torch.equal(store.load(before_round=9).tensors["g"], torch.full((2,), 11.0))


@pytest.fixture
def behind():
    from fedsqueeze.deploy import state

    state.write_behind(True)
    try:
        yield state
    finally:
        state.write_behind(False)


def test_writes_behind_land_in_order_and_a_load_waits_for_its_own_file(tmp_path, behind, monkeypatch):
    store = StateStore(tmp_path, IDENT)
    other = StateStore(tmp_path, StateIdentity(run_id=7, partition_id=2, config_digest="abc"))
    gate = threading.Event()
    real_save = StateStore.save

    def slow_save(self, tensors, server_round):
        if self is other:
            gate.wait(10)  # the other client's write is still in flight
        real_save(self, tensors, server_round)

    monkeypatch.setattr(StateStore, "save", slow_save)
    other.save_behind({"g": torch.ones(3)}, server_round=1)
    store.save_behind({"g": torch.full((1000,), 3.0)}, server_round=1)
    store.save_behind({"g": torch.full((1000,), 4.0)}, server_round=2)
    assert not store.exists()  # queued behind the other client's write, not written yet
    gate.set()
    loaded = store.load()  # waits for its own writes, in the order they were handed over
    assert loaded.server_round == 2 and torch.equal(loaded.tensors["g"], torch.full((1000,), 4.0))
    assert store.load(before_round=2).server_round == 1
    behind.flush()
    assert other.load().server_round == 1


def test_a_failed_write_behind_is_raised_by_the_next_flush(tmp_path, behind):
    store = StateStore(tmp_path, IDENT)
    store.save_behind({"z": torch.zeros(2, dtype=torch.complex64)}, server_round=1)
    with pytest.raises(StateError, match="complex64"):
        behind.flush()
    behind.flush()  # reported once


def _corrupt(store):
    store.path.write_bytes(store.path.read_bytes()[:-1] + b"\x00")


def _barrier(tmp_path, behind):
    """Return once every read and write handed to the write-behind thread so far is done (it runs them
    in order)."""
    StateStore(tmp_path / "barrier", IDENT).save_behind({"b": torch.zeros(1)}, server_round=1)
    behind.flush()


def test_a_read_ahead_serves_the_next_load_of_its_file(tmp_path, behind):
    store = StateStore(tmp_path, IDENT)
    store.save({"g": torch.full((1000,), 3.0)}, server_round=1)
    store.read_ahead(before_round=2)
    _barrier(tmp_path, behind)
    _corrupt(store)  # the file changes after the read (no client does that): the load takes the read state
    loaded = store.load(before_round=2)
    assert loaded.server_round == 1 and torch.equal(loaded.tensors["g"], torch.full((1000,), 3.0))
    with pytest.raises(StateError, match="corrupted"):  # taken once: the next load reads the file
        store.load(before_round=2)


def test_a_read_ahead_is_dropped_by_a_later_write_another_reader_or_another_round(tmp_path, behind):
    store = StateStore(tmp_path, IDENT)
    store.save({"g": torch.full((4,), 1.0)}, server_round=1)
    store.read_ahead(before_round=3)
    store.save_behind({"g": torch.full((4,), 2.0)}, server_round=2)  # handed over after the read
    assert torch.equal(store.load(before_round=3).tensors["g"], torch.full((4,), 2.0))
    store.read_ahead(before_round=3)
    _barrier(tmp_path, behind)
    store.save({"g": torch.full((4,), 5.0)}, server_round=2)  # round 2 again, written now
    assert torch.equal(store.load(before_round=3).tensors["g"], torch.full((4,), 5.0))
    # a read for another round, or by a reader of another identity (the same file), is not used
    for reader, before in ((store, None), (StateStore(tmp_path, StateIdentity(7, 1, "other")), 3)):
        reader.read_ahead(before_round=before)
        _barrier(tmp_path, behind)
        _corrupt(store)
        with pytest.raises(StateError, match="corrupted"):
            store.load(before_round=3)
        store.save({"g": torch.full((4,), 5.0)}, server_round=2)


def test_a_failed_read_ahead_is_raised_by_its_load_and_at_most_two_wait(tmp_path, behind):
    stores = [StateStore(tmp_path, StateIdentity(7, pid, "abc")) for pid in range(3)]
    for store in stores:
        store.save({"g": torch.full((4,), float(store.identity.partition_id))}, server_round=1)
    _corrupt(stores[0])
    stores[0].read_ahead(before_round=2)
    with pytest.raises(StateError, match="corrupted"):
        stores[0].load(before_round=2)
    stores[0].save({"g": torch.zeros(4)}, server_round=1)
    for store in stores:  # three reads ahead: the oldest is dropped
        store.read_ahead(before_round=2)
    _barrier(tmp_path, behind)
    for store in stores:
        _corrupt(store)
    with pytest.raises(StateError, match="corrupted"):
        stores[0].load(before_round=2)
    for store in stores[1:]:
        assert store.load(before_round=2).tensors["g"][0] == store.identity.partition_id


def test_without_write_behind_a_read_ahead_does_nothing(tmp_path):
    store = StateStore(tmp_path, IDENT)
    store.save({"g": torch.ones(2)}, server_round=1)
    store.read_ahead(before_round=2)
    _corrupt(store)
    with pytest.raises(StateError, match="corrupted"):
        store.load(before_round=2)


def test_store_only_with_state_dir(tmp_path):
    assert store_for({"partition-id": 0}, 1, {}, 0) is None
    assert store_for({"state-dir": ""}, 1, {}, 0) is None
    store = store_for({"state-dir": str(tmp_path)}, 5, {"lr": 0.1}, 2)
    assert store is not None and store.path == tmp_path / "run-5" / "partition-2.fsqstate" and store.fsync
    # a simulation's state-dir comes in the run config: no fsync (the files need not survive a power cut)
    sim = store_for({"partition-id": 2}, "ab12", {"state-dir": str(tmp_path)}, 2)
    assert sim is not None and sim.path == tmp_path / "run-ab12" / "partition-2.fsqstate" and not sim.fsync
    # name and out-dir do not change what a client computes; lr does
    assert config_digest({"lr": 0.1, "name": "a"}) == config_digest({"lr": 0.1, "name": "b"})
    assert config_digest({"lr": 0.1}) != config_digest({"lr": 0.2})


# ---- the ClientApp hook (a restart = a new process with an empty context.state) --------------------


def _run(cfg, state_dir, run_id=1):
    return run_inprocess(
        "fedsqueeze.server.app:app",
        "fedsqueeze.client.app:app",
        cfg.num_clients,
        cfg.to_run_config(),
        seed=cfg.seed,
        run_id=run_id,
        node_configs=[{"partition-id": i, "state-dir": str(state_dir)} for i in range(cfg.num_clients)],
    )


def _cfg(tmp_path, name):
    return resolve(
        overrides=[
            "num-clients=2",
            "rounds=2",
            "local-steps=2",
            "compressor=topk(0.1)",
            f"out-dir={tmp_path}",
            f"name={name}",
        ]
    )


RUN_UID = "00112233445566778899aabbccddeeff"


@pytest.fixture
def fixed_run_uid(monkeypatch):
    """The server's run uid known in advance (the clients key their state files by it)."""
    import uuid

    monkeypatch.setattr("fedsqueeze.engine.server.uuid.uuid4", lambda: uuid.UUID(RUN_UID))
    return RUN_UID[:16]


def test_client_writes_state_each_round_and_restores_it_after_a_restart(tmp_path, caplog, fixed_run_uid):
    state_dir = tmp_path / "state"
    cfg = _cfg(tmp_path, "first")
    ident = StateIdentity(fixed_run_uid, 0, config_digest(cfg.to_run_config()))
    # what the node kept before its restart (a residual, say): the restarted ClientApp must use it
    kept = {"residual": torch.linspace(-1, 1, 11)}
    StateStore(state_dir, ident).save(kept, server_round=0)
    with caplog.at_level(logging.WARNING, logger="fedsqueeze.client"):
        _run(cfg, state_dir)
    assert "restored the state of round 0" in caplog.text
    assert StateStore(state_dir, ident).load().server_round == 2  # written after each round
    # partition 1 has nothing to keep (fedavg with top-k): no file is written for it
    assert StateStore(state_dir, StateIdentity(fixed_run_uid, 1, ident.config_digest)).load() is None
    after = StateStore(state_dir, ident).load()
    assert torch.equal(after.tensors["residual"], kept["residual"])  # carried through, not dropped
    rows = [r for r in (tmp_path / "first" / "metrics.jsonl").read_text().splitlines() if r]
    assert len(rows) == 2


def test_corrupted_state_gives_an_error_reply_and_is_not_used(tmp_path, caplog, fixed_run_uid):
    state_dir = tmp_path / "state"
    cfg = _cfg(tmp_path, "bad")
    store = StateStore(state_dir, StateIdentity(fixed_run_uid, 0, config_digest(cfg.to_run_config())))
    store.save({"residual": torch.ones(3)}, server_round=0)
    store.path.write_bytes(store.path.read_bytes()[:-1] + b"\x00")
    with caplog.at_level(logging.WARNING):
        _run(cfg, state_dir)
    rows = [json.loads(r) for r in (tmp_path / "bad" / "metrics.jsonl").read_text().splitlines() if r]
    assert [r["clients_failed"] for r in rows] == [1, 1]  # partition 0 fails every round, loudly
    assert "corrupted" in caplog.text
    assert store.path.read_bytes()[-1:] == b"\x00"  # never overwritten by a fresh state


def test_states_read_ahead_of_their_calls_change_nothing_in_a_run(tmp_path, fixed_run_uid, monkeypatch):
    """In-process, the grid reads the next call's state file while a call runs: the same rows and
    the same state files as a run that reads each file in its own call."""
    from fedsqueeze.client.app import read_ahead
    from fedsqueeze.deploy import state

    seen, readers = [], []
    real_read = StateStore._read_newest

    def read(self, before_round):  # which thread reads the files
        readers.append(threading.current_thread().name.split("_")[0])
        return real_read(self, before_round)

    monkeypatch.setattr(StateStore, "_read_newest", read)

    def recording(msg, context):
        if msg.metadata.message_type == "train":
            seen.append((context.node_config["partition-id"], dict(msg.content["config"])["server-round"]))
        read_ahead(msg, context)

    runs = {}
    for name, hook in (("plain", None), ("ahead", recording)):
        cfg = resolve(overrides=["num-clients=3", "rounds=3", "local-steps=2", "compressor=topk(0.1)",
                                 "feedback=ef21", f"out-dir={tmp_path}", f"name={name}"])  # fmt: skip
        state_dir = tmp_path / f"state-{name}"
        readers.clear()
        state.write_behind(True)
        try:
            nodes = [{"partition-id": i, "state-dir": str(state_dir)} for i in range(3)]
            run_inprocess("fedsqueeze.server.app:app", "fedsqueeze.client.app:app", cfg.num_clients,
                          cfg.to_run_config(), seed=cfg.seed, read_ahead=hook, node_configs=nodes)  # fmt: skip
        finally:
            state.write_behind(False)
        runs[f"{name} readers"] = sorted(readers)
        rows = [json.loads(r) for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if r]
        digest = config_digest(cfg.to_run_config())
        files = [StateStore(state_dir, StateIdentity(fixed_run_uid, pid, digest)).load() for pid in range(3)]
        runs[name] = ([{k: v for k, v in r.items() if k != "wall_s"} for r in rows], files)
    (rows, files), (rows_ahead, files_ahead) = runs["plain"], runs["ahead"]
    assert rows == rows_ahead and len(rows) == 3
    for a, b in zip(files, files_ahead, strict=True):
        assert a.server_round == b.server_round == 3 and a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    # each round's calls after the first were read ahead, in order (every client is sampled), and
    # their calls read no file: the first client's call reads its own
    assert seen == [(pid, rnd) for rnd in (1, 2, 3) for pid in (1, 2)]
    assert runs["plain readers"] == ["fedsqueeze-clientapp"] * 9
    assert runs["ahead readers"] == ["fedsqueeze-clientapp"] * 3 + ["fedsqueeze-state"] * 6
