"""Post-training pruning: statistics (federated = centralised), scores, masks, packing, the exchange, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from flwr.app import Array
from torch import nn

from fedsqueeze.cli import main
from fedsqueeze.config import build_task, resolve
from fedsqueeze.pruning import (
    NM,
    LayerStats,
    PruneError,
    PruneSpec,
    Stats,
    collect,
    local_asker,
    merge,
    n_of_m,
    pack_model,
    packed_size,
    packing,
    parse_nm,
    prunable_layers,
    prune,
    score,
    unpack_model,
    unstructured,
)
from fedsqueeze.pruning.driver import calibration_groups
from fedsqueeze.server.calibration import flower_asker, model_record, record_bytes
from fedsqueeze.simulation.grid import InProcessGrid, task_identity

W = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 0.5, 1.0]])
IN_SQ = torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)  # ||X_j|| = 2, 1, 0.5
OUT_SQ = torch.tensor([9.0, 16.0], dtype=torch.float64)  # ||Y_i|| = 3, 4


# ---- scores: against hand computation --------------------------------------------------------------------


def test_wanda_score_is_abs_weight_times_input_norm():
    s = score("wanda", W, LayerStats(IN_SQ, None, 5))
    assert s.tolist() == [[2.0, 2.0, 1.5], [8.0, 0.5, 0.5]]


def test_ria_score_by_hand():
    s = score("ria", W, LayerStats(IN_SQ, None, 5))
    # column sums of |W|: 5, 2.5, 4; row sums: 6, 5.5; ||X_j||^0.5 = sqrt(2), 1, sqrt(0.5)
    expected = [
        [(1 / 5 + 1 / 6) * math.sqrt(2), (2 / 2.5 + 2 / 6) * 1, (3 / 4 + 3 / 6) * math.sqrt(0.5)],
        [(4 / 5 + 4 / 5.5) * math.sqrt(2), (0.5 / 2.5 + 0.5 / 5.5) * 1, (1 / 4 + 1 / 5.5) * math.sqrt(0.5)],
    ]
    assert torch.allclose(s, torch.tensor(expected, dtype=torch.float64), rtol=1e-15, atol=0)


def test_symmetric_score_adds_input_and_output_norms():
    s = score("symwanda", W, LayerStats(IN_SQ, OUT_SQ, 5))
    assert s.tolist() == [[1 * 5, 2 * 4, 3 * 3.5], [4 * 6, 0.5 * 5, 1 * 4.5]]


def test_magnitude_needs_no_statistics_and_the_others_do():
    assert score("magnitude", W, None).tolist() == W.abs().double().tolist()
    for method in ("wanda", "ria", "symwanda"):
        with pytest.raises(PruneError):
            score(method, W, None)
    with pytest.raises(PruneError, match="output statistics"):
        score("symwanda", W, LayerStats(IN_SQ, None, 5))


# ---- statistics ------------------------------------------------------------------------------------------


def test_linear_statistics_are_sums_of_squares_over_examples():
    layer = nn.Linear(3, 2)
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])
    s = collect(nn.Sequential(layer), x, outputs=True).layers["0"]
    assert s.in_sq.tolist() == [1.25, 4.0, 10.0]
    y = layer(x).double()
    assert torch.allclose(s.out_sq, (y**2).sum(0), rtol=1e-6)
    assert s.positions == 2


def test_conv_statistics_are_over_unfolded_patches():
    conv = nn.Conv2d(1, 2, 2, bias=False)
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    s = collect(nn.Sequential(conv), x).layers["0"]
    patches = [x[0, 0, i : i + 2, j : j + 2].reshape(-1) for i in range(2) for j in range(2)]
    expected = sum(p.double() ** 2 for p in patches)
    assert s.in_sq.tolist() == expected.tolist() and s.positions == 4


@pytest.fixture(scope="module")
def task():
    return build_task(resolve(overrides={"task": "digits-cnn", "num-clients": 4, "partition": "iid"}))


def test_federated_statistics_equal_the_centralised_ones(task):
    model = task.new_model(seed=3)
    parts = [collect(model, c.train.x, outputs=True, batch_size=37) for c in task.clients]
    union = torch.cat([c.train.x for c in task.clients])
    central = collect(model, union, outputs=True, batch_size=256)
    fed = merge(parts)
    assert fed.examples == central.examples == len(union)
    for name, c in central.layers.items():
        f = fed.layers[name]
        assert f.positions == c.positions
        # float64 sums of the same float64 terms, added in another order
        assert torch.allclose(f.in_sq, c.in_sq, rtol=1e-12, atol=0)
        assert torch.allclose(f.out_sq, c.out_sq, rtol=1e-12, atol=0)
    for method in ("wanda", "ria", "symwanda"):
        a = prune(model, PruneSpec(method, 0.5), stats=fed)
        b = prune(model, PruneSpec(method, 0.5), stats=central)
        assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)


def test_merge_rejects_mismatched_layers():
    a = Stats(1, {"x": LayerStats(torch.zeros(3, dtype=torch.float64), None, 1)})
    b = Stats(1, {"y": LayerStats(torch.zeros(3, dtype=torch.float64), None, 1)})
    with pytest.raises(PruneError):
        merge([a, b])


# ---- masks -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_n_of_m_keeps_exactly_n_highest_per_block(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    scores = torch.rand(7, 4 * m, generator=g, dtype=torch.float64)
    mask = n_of_m(scores, NM(n, m))
    blocks, sblocks = mask.reshape(-1, m), scores.reshape(-1, m)
    assert (blocks.sum(1) == n).all()
    kept_min = torch.where(blocks, sblocks, torch.inf).amin(1)
    dropped_max = torch.where(blocks, -torch.inf, sblocks).amax(1)
    assert (kept_min > dropped_max).all()


def test_unstructured_masks_prune_exact_counts():
    scores = torch.rand(6, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    row = unstructured(scores, 0.35, "row")
    assert ((~row).sum(1) == 3).all()
    layer = unstructured(scores, 0.35, "layer")
    assert int((~layer).sum()) == 21
    assert scores[layer].min() > scores[~layer].max()


def test_parse_nm_and_spec_validation():
    assert parse_nm("2:4") == NM(2, 4)
    for bad in ("4:2", "2-4", "0:4"):
        with pytest.raises(PruneError):
            parse_nm(bad)
    for sparsity in (-0.1, 1.0, 1.5):
        with pytest.raises(PruneError, match=r"\[0, 1\)"):
            PruneSpec("wanda", sparsity)
    with pytest.raises(PruneError, match="2:4"):
        PruneSpec("wanda", 0.7, NM(2, 4))


# ---- packing ---------------------------------------------------------------------------------------------


def _pruned_weight(rows=6, cols=16, nm=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mask = n_of_m(w.abs().double(), nm) if nm else unstructured(w.abs().double(), 0.6, "layer")
    return w * mask, mask


@pytest.mark.parametrize("nm", [None, NM(2, 4), NM(1, 8)])
@pytest.mark.parametrize("int8", [False, True])
def test_packed_size_matches_the_formula_and_round_trips(nm, int8):
    w, mask = _pruned_weight(nm=nm)
    p = packing.pack_weight(w, mask, nm=nm, int8=int8)
    kept = int(mask.sum())
    assert p.nbytes == packed_size(w.numel(), w.shape[0], kept, nm=nm, int8=int8)
    bits = (kept * math.ceil(math.log2(nm.m))) if nm else w.numel()
    assert len(p.positions) == -(-bits // 8)
    back = packing.unpack_weight(p)
    assert torch.equal(back == 0, ~mask) or int8  # int8 may round a tiny kept weight to 0
    if not int8:
        assert torch.equal(back, w)
    else:
        scale = (w.abs().amax(1) / 127)[:, None]
        assert ((back - w).abs() <= scale / 2 * (1 + 1e-6)).all()
        assert torch.equal(back[~mask], torch.zeros(int((~mask).sum())))


def test_packed_model_round_trips_through_a_file(tmp_path, task):
    model = task.new_model(seed=1)
    res = prune(model, PruneSpec("magnitude", 0.5, NM(2, 4)))
    state = res.model.state_dict()
    packed = pack_model(state, res.masks, nm_layers=res.nm_layers)
    dense = sum(v.numel() * v.element_size() for k, v in state.items() if k not in res.masks)
    formula = sum(
        packed_size(state[k].numel(), state[k].shape[0], int(m.sum()), nm=res.nm_layers.get(k))
        for k, m in res.masks.items()
    )
    assert packed.nbytes == dense + formula
    packing.save(packed, tmp_path / "p.pt")
    back = unpack_model(packing.load(tmp_path / "p.pt"))
    assert all(torch.equal(back[k], v) for k, v in state.items())
    # digits-cnn: the first conv has 1 x 3 x 3 = 9 columns, not a multiple of 4: it stays dense
    assert [r.pattern.startswith("dense") for r in res.layers] == [True, False, False]


# ---- the driver ------------------------------------------------------------------------------------------


def test_sequential_calibration_uses_the_pruned_upstream_layers(task):
    model = task.new_model(seed=2)
    x = torch.cat([c.train.x for c in task.clients])
    seq = prune(model, PruneSpec("wanda", 0.5, rounds=0), local_asker(x))
    assert len(seq.exchanges) == 3
    assert [list(e.stats.layers) for e in seq.exchanges] == [["features.0"], ["features.3"], ["classifier"]]
    # by hand: prune layer 1 from dense statistics, then layer 2 from statistics of that model
    first = prune(model, PruneSpec("wanda", 0.5, exclude=("features.3", "classifier")), local_asker(x))
    stats2 = collect(first.model, x, ["features.3"])
    by_hand = unstructured(
        score("wanda", first.model.features[3].weight.reshape(32, -1), stats2.layers["features.3"]), 0.5
    )
    assert torch.equal(seq.masks["features.3.weight"], by_hand)
    one_shot = prune(model, PruneSpec("wanda", 0.5), local_asker(x))
    assert len(one_shot.exchanges) == 1 and not torch.equal(one_shot.masks["features.3.weight"], by_hand)
    assert calibration_groups(["a", "b", "c"], 2) == [["a", "b"], ["c"]]
    with pytest.raises(PruneError):
        calibration_groups(["a", "b"], 3)


def test_no_prunable_layer_is_an_error():
    with pytest.raises(PruneError, match="no prunable layer"):
        prunable_layers(nn.Sequential(nn.Flatten(), nn.ReLU()))
    with pytest.raises(PruneError, match="no prunable layer"):
        prune(nn.Sequential(nn.Linear(2, 2)), PruneSpec("magnitude", 0.5, exclude=("*",)))


# ---- the Flower exchange ---------------------------------------------------------------------------------


def test_the_flower_exchange_sums_client_statistics_and_counts_bytes(task):
    cfg = resolve(overrides={"task": "digits-cnn", "num-clients": 4, "partition": "iid"})
    model = task.new_model(seed=4)
    grid = InProcessGrid("fedsqueeze.client.app:app", 4, cfg.to_run_config(), seed=7)
    layers = list(prunable_layers(model))
    with task_identity(1):
        ex = flower_asker(grid)(model, layers, True)
    central = collect(model, torch.cat([c.train.x for c in task.clients]), outputs=True)
    assert ex.clients == 4 and not ex.failed and ex.stats.examples == central.examples
    for name in layers:
        assert torch.allclose(ex.stats.layers[name].in_sq, central.layers[name].in_sq, rtol=1e-12, atol=0)
        assert torch.allclose(ex.stats.layers[name].out_sq, central.layers[name].out_sq, rtol=1e-12, atol=0)
    per_client = [collect(model, c.train.x, outputs=True).to_arrays() for c in task.clients]
    assert ex.uplink_bytes == sum(len(Array(v).data) for arrays in per_client for v in arrays.values())
    assert ex.downlink_bytes == 4 * record_bytes(model_record(model))
    # federated Wanda through the apps = centralised Wanda on the union
    with task_identity(1):
        fed = prune(model, PruneSpec("wanda", 0.5), flower_asker(grid))
    cen = prune(model, PruneSpec("wanda", 0.5), stats=central)
    assert all(torch.equal(fed.masks[k], cen.masks[k]) for k in cen.masks)


# ---- the command -----------------------------------------------------------------------------------------


@pytest.fixture()
def run_dir(tmp_path):
    cfg = resolve(overrides={"task": "digits-mlp", "num-clients": 3, "partition": "iid", "name": "r"})
    d = tmp_path / "r"
    d.mkdir()
    (d / "config.toml").write_text(cfg.to_toml())
    model = build_task(cfg).new_model(seed=0)
    torch.save(model.state_dict(), d / "model.pt")
    return d


def test_prune_command_writes_the_pruned_and_packed_models(run_dir, capsys):
    assert main(["prune", str(run_dir), "--method", "symwanda", "--nm", "2:4", "--int8"]) == 0
    out = capsys.readouterr().out
    assert "global" in out and "client 2" in out and "packed int8" in out and "calibration: 1 exchange" in out
    target = run_dir / "pruned-symwanda-2of4"
    rep = json.loads((target / "prune.json").read_text())
    state = torch.load(target / "model.pt", weights_only=True)
    for key in ("net.1.weight", "net.3.weight"):
        assert ((state[key].reshape(-1, 4) != 0).sum(1) <= 2).all()
    assert rep["sparsity"] == pytest.approx(0.5)
    assert rep["size"]["packed_bytes"] < rep["size"]["dense_bytes"]
    assert rep["size"]["packed_int8_bytes"] < rep["size"]["packed_bytes"]
    assert rep["calibration"]["uplink_bytes"] > 0 and rep["calibration"]["per_round"][0]["clients"] == 3
    assert len(rep["accuracy"]["after"]["clients"]) == 3


def test_prune_command_errors(run_dir, tmp_path, capsys):
    def err() -> str:  # rich wraps long lines
        return " ".join(capsys.readouterr().err.split())

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.toml").write_text((run_dir / "config.toml").read_text())
    assert main(["prune", str(tmp_path / "empty"), "--method", "wanda"]) == 2
    assert "no model.pt" in err()
    assert main(["prune", str(run_dir), "--method", "wanda", "--sparsity", "1"]) == 2
    assert "[0, 1)" in err()
    assert main(["prune", str(run_dir), "--method", "wanda", "--calibration-rounds", "9"]) == 2
    assert "between 1 and 2" in err()


def test_the_pruning_package_imports_no_flower():
    code = "import sys, fedsqueeze.pruning, fedsqueeze.pruning.load; assert 'flwr' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
