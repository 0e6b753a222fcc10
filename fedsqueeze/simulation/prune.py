"""The runner behind `fedsqueeze prune RUN_DIR`: calibrate through the apps, prune, pack, evaluate, write.

The finished run's config rebuilds its task and clients; the in-process backend runs the real
ClientApp for every partition, and the calibration statistics travel as `query.calibrate` messages
(`fedsqueeze.server.calibration`). Outputs go to `RUN_DIR/pruned-<method>-<pattern>/` (or `out`):

    model.pt        the pruned model as a state_dict (zeros where pruned; torch.load, load_state_dict)
    packed.pt       values + bitmap or N:M index bits (`fedsqueeze.pruning.packing`)
    packed-int8.pt  the same with int8 per-row weights (with int8=True)
    prune.json      spec, per-layer sparsity, accuracies, sizes, calibration bytes
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from fedsqueeze.pruning import PruneSpec, pack_model, packing, prune, unpack_model
from fedsqueeze.pruning.load import evaluate, load_run

from .grid import InProcessGrid, task_identity

SUMMARY_FILE = "prune.json"


def default_out(run_dir: Path, spec: PruneSpec) -> Path:
    pattern = f"{spec.nm.n}of{spec.nm.m}" if spec.nm else f"{spec.sparsity:g}-{spec.comparison}"
    rounds = "" if spec.rounds == 1 or spec.method == "magnitude" else f"-seq{spec.rounds or 'L'}"
    return run_dir / f"pruned-{spec.method}-{pattern}{rounds}"


def run_prune(
    run_dir: str | os.PathLike[str],
    spec: PruneSpec,
    *,
    int8: bool = False,
    out: str | os.PathLike[str] | None = None,
    max_examples: int = 0,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Prune a finished run's global model; returns (and writes) the report."""
    from fedsqueeze.server.calibration import flower_asker

    run = load_run(run_dir)
    before = evaluate(run.task, run.model)
    grid = InProcessGrid("fedsqueeze.client.app:app", run.cfg.num_clients, run.cfg.to_run_config(), seed=run.cfg.seed)
    with task_identity(run_id=1):
        result = prune(run.model, spec, flower_asker(grid, max_examples=max_examples, timeout=timeout))
    after = evaluate(run.task, result.model)

    target = Path(out) if out is not None else default_out(run.path, spec)
    target.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    torch.save(state, target / "model.pt")
    dense_bytes = sum(v.numel() * v.element_size() for v in run.model.state_dict().values())
    sizes: dict[str, Any] = {"dense_bytes": dense_bytes}
    packed = pack_model(state, result.masks, nm_layers=result.nm_layers)
    sizes["packed_bytes"] = packed.nbytes
    sizes["packed_file_bytes"] = packing.save(packed, target / "packed.pt")
    report: dict[str, Any] = {
        "run_dir": str(run.path),
        "out": str(target),
        "spec": {
            "method": spec.method,
            "sparsity": spec.sparsity,
            "nm": str(spec.nm) if spec.nm else None,
            "group": spec.comparison,
            "rounds": spec.rounds,
            "exclude": list(spec.exclude),
            "max_examples": max_examples,
        },
        "accuracy": {"before": before, "after": after},
        **result.summary(),
    }
    if int8:
        q = pack_model(state, result.masks, nm_layers=result.nm_layers, int8=True)
        sizes["packed_int8_bytes"] = q.nbytes
        sizes["packed_int8_file_bytes"] = packing.save(q, target / "packed-int8.pt")
        model = run.task.new_model()
        model.load_state_dict(unpack_model(q))
        report["accuracy"]["after_int8"] = evaluate(run.task, model)
    report["size"] = sizes
    (target / SUMMARY_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report
