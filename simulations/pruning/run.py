"""Accuracy against sparsity for magnitude, Wanda, RIA and the symmetric score, calibrated on client data.

For each task: a short federated training run (`fedsqueeze simulate`, in-process), then one calibration
exchange through the Flower apps (every client's sums of squares, added by the server) on the dense
global model; the statistics are reused for every method and sparsity (one-shot statistics do not depend
on them). Then, at 50 %, sequential calibration (one exchange per layer), model sizes (packed, int8).

    PYTHONPATH=.:simulations/pruning .venv/bin/python simulations/pruning/run.py [--rounds 30]

writes docs/pruning-accuracy.png, docs/pruning-accuracy.md and docs/pruning-accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the user task wide_task:build

from fedsqueeze.config import resolve  # noqa: E402
from fedsqueeze.pruning import METHODS, NM, PruneSpec, pack_model, prunable_layers, prune, unpack_model  # noqa: E402
from fedsqueeze.pruning.load import load_run  # noqa: E402
from fedsqueeze.server.calibration import flower_asker  # noqa: E402
from fedsqueeze.simulation.grid import InProcessGrid, task_identity  # noqa: E402
from fedsqueeze.simulation.runner import simulate  # noqa: E402

TASKS = {
    "digits-mlp": {"task": "digits-mlp"},
    "digits-cnn": {"task": "digits-cnn"},
    "wide-mlp (user task)": {"task": "wide_task:build"},
}
SPARSITIES = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
NM24 = NM(2, 4)
GROUP_SPARSITIES = [0.5, 0.7, 0.8]


def accuracy(task: Any, model: torch.nn.Module) -> float:
    return float(task.evaluate(model)[1])


def one_task(label: str, overrides: dict[str, Any], rounds: int, out_dir: Path) -> dict[str, Any]:
    name = label.split()[0]
    cfg = resolve(overrides={**overrides, "rounds": rounds, "name": name, "out-dir": str(out_dir)})
    t0 = time.perf_counter()
    sim = simulate(cfg)
    run = load_run(sim.run_dir)
    model, task = run.model, run.task
    grid = InProcessGrid("fedsqueeze.client.app:app", cfg.num_clients, cfg.to_run_config(), seed=cfg.seed)
    ask = flower_asker(grid)
    with task_identity(1):
        exchange = ask(model, list(prunable_layers(model)), True)
    res: dict[str, Any] = {
        "params": sum(p.numel() for p in model.parameters()),
        "clients": exchange.clients,
        "dense": accuracy(task, model),
        "calibration": {"uplink_bytes": exchange.uplink_bytes, "downlink_bytes": exchange.downlink_bytes},
        "unstructured": {},
        "2:4": {},
        "sequential": {},
    }
    for method in METHODS:
        res["unstructured"][method] = [
            accuracy(task, prune(model, PruneSpec(method, s), stats=exchange.stats).model) for s in SPARSITIES
        ]
        res["2:4"][method] = accuracy(task, prune(model, PruneSpec(method, 0.5, NM24), stats=exchange.stats).model)
    # the comparison group matters as much as the score: every method with both groups
    res["groups"] = {
        f"{method} per {group}": [
            accuracy(task, prune(model, PruneSpec(method, s, group=group), stats=exchange.stats).model)
            for s in GROUP_SPARSITIES
        ]
        for method in METHODS
        for group in ("row", "layer")
    }
    for method in ("wanda", "ria", "symwanda"):
        with task_identity(1):
            seq = prune(model, PruneSpec(method, 0.5, rounds=0), ask)
        res["sequential"][method] = {
            "accuracy": accuracy(task, seq.model),
            "rounds": len(seq.exchanges),
            "uplink_bytes": seq.uplink_bytes,
            "downlink_bytes": seq.downlink_bytes,
        }
    res["size"] = sizes(task, model, exchange.stats)
    res["seconds"] = time.perf_counter() - t0
    return res


def sizes(task: Any, model: torch.nn.Module, stats: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"dense_bytes": sum(v.numel() * v.element_size() for v in model.state_dict().values())}
    for label, spec in (("wanda 50%", PruneSpec("wanda", 0.5)), ("wanda 2:4", PruneSpec("wanda", 0.5, NM24))):
        r = prune(model, spec, stats=stats)
        state = r.model.state_dict()
        for int8 in (False, True):
            packed = pack_model(state, r.masks, nm_layers=r.nm_layers, int8=int8)
            m = task.new_model()
            m.load_state_dict(unpack_model(packed))
            out[label + (" int8" if int8 else "")] = {"bytes": packed.nbytes, "accuracy": accuracy(task, m)}
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"magnitude": "tab:gray", "wanda": "tab:blue", "ria": "tab:orange", "symwanda": "tab:green"}
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), sharey=True)
    for ax, (label, res) in zip(axes, results.items(), strict=True):
        ax.axhline(res["dense"], color="black", ls="--", lw=1, label="dense")
        for i, method in enumerate(METHODS):
            ax.plot(SPARSITIES, res["unstructured"][method], "-o", ms=3, color=colors[method], label=method)
            ax.plot(0.5 + 0.012 * (i - 1.5), res["2:4"][method], "s", mfc="none", ms=8, color=colors[method])
        ax.set_title(f"{label}, {res['params']:,} params")
        ax.set_xlabel("sparsity of Linear/conv weights (squares: 2:4)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("global test accuracy")
    axes[0].legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: dict[str, Any]) -> str:
    lines = []
    head = "| task | method | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " | 2:4 | 50 % sequential |"
    for label, res in results.items():
        lines += [f"**{label}**: dense {res['dense']:.4f}, {res['params']:,} parameters, {res['clients']} clients", ""]
        lines += [head, "|---|---|" + "---:|" * (len(SPARSITIES) + 2)]
        for method in METHODS:
            seq = res["sequential"].get(method)
            cells = [f"{a:.4f}" for a in res["unstructured"][method]] + [f"{res['2:4'][method]:.4f}"]
            cells.append(f"{seq['accuracy']:.4f}" if seq else "-")
            lines.append(f"| {label} | {method} | " + " | ".join(cells) + " |")
        cal = res["calibration"]
        seq = res["sequential"]["wanda"]
        lines += [
            "",
            f"Calibration (one exchange of input and output statistics, {res['clients']} clients): "
            f"uplink {cal['uplink_bytes']:,} B, "
            f"downlink {cal['downlink_bytes']:,} B (the model to each client). Sequential ({seq['rounds']} exchanges, "
            f"Wanda): uplink {seq['uplink_bytes']:,} B, downlink {seq['downlink_bytes']:,} B.",
            "",
            "| method, comparison group | " + " | ".join(f"{s:.0%}" for s in GROUP_SPARSITIES) + " |",
            "|---|" + "---:|" * len(GROUP_SPARSITIES),
            *[f"| {k} | " + " | ".join(f"{a:.4f}" for a in v) + " |" for k, v in res["groups"].items()],
            "",
            "| model | bytes | accuracy |",
            "|---|---:|---:|",
            f"| dense float32 | {res['size']['dense_bytes']:,} | {res['dense']:.4f} |",
        ]
        for k, v in res["size"].items():
            if k != "dense_bytes":
                lines.append(f"| {k} packed | {v['bytes']:,} | {v['accuracy']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--runs", default="runs/pruning", help="where the training runs go")
    ap.add_argument("--docs", default="docs")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for label, overrides in TASKS.items():
        results[label] = one_task(label, overrides, args.rounds, Path(args.runs))
        print(f"{label}: dense {results[label]['dense']:.4f} ({results[label]['seconds']:.0f} s)", flush=True)
    docs = Path(args.docs)
    plot(results, docs / "pruning-accuracy.png")
    md = table(results)
    (docs / "pruning-accuracy.md").write_text(
        "# Pruning: accuracy against sparsity\n\n`python simulations/pruning/run.py`"
        f" ({args.rounds} training rounds per task). Comparison groups: magnitude and RIA per layer, Wanda and"
        " the symmetric score per output row. One-shot statistics unless marked sequential.\n\n" + md
    )
    (docs / "pruning-accuracy.json").write_text(json.dumps(results, indent=1) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
