"""simulations/cohort/run.py --quick: the costs it reports are those of the cost models, and the first cohort
end at the target is where an independent replay of the same run first gets there."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fedsqueeze.config import resolve
from fedsqueeze.engine import LocalTransport, Server, run_round

SCRIPT = Path(__file__).resolve().parents[1] / "simulations" / "cohort" / "run.py"


def _script():
    spec = importlib.util.spec_from_file_location("cohort_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_reports_costs_of_both_models_and_the_first_cohort_at_the_target(tmp_path):
    run = _script()
    assert run.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "cohort-squeeze.json").read_text())
    table = (tmp_path / "cohort-squeeze.md").read_text()
    assert (tmp_path / "cohort-squeeze.png").stat().st_size > 0
    c1, c2 = results["c1"], results["c2"]
    hits = {key: v for key, v in results["sppm"].items() if v}
    assert hits, results["sppm"]  # the quick grid is chosen so that some run gets there
    for key, v in hits.items():
        k = int(key.split()[2])
        assert v["plain"] == v["cohorts"] * k
        assert v["hierarchical"] == pytest.approx(v["cohorts"] * (c1 * k + c2))
        assert f"| {v['plain']:g} |" in table
    for v in [*results["localgd"].values(), *results["localgd_stratified"].values()]:
        assert v is not None and v["cohorts"] == v["plain"]  # a new cohort every round
        assert v["hierarchical"] == pytest.approx(v["plain"] * (c1 + c2))

    key, v = min(hits.items(), key=lambda kv: kv[1]["plain"])
    sampling, gamma, k = key.split()
    cfg = resolve(overrides=[f"task={results['task']}", f"partition={results['partition']}", "num-clients=100",
                             "cohort-size=10", "batch-size=0", "target-accuracy=0", f"out-dir={tmp_path}",
                             f"algorithm=sppm(gamma={gamma}, inner={k}, solver={results['solver']})",
                             f"sampling={run.SAMPLINGS[sampling]}"])  # fmt: skip
    server, transport = Server(cfg), LocalTransport(cfg)
    start = server.task.objective.f(server.plan.x0.double()) - server.task.optimum.f
    ratios = [run_round(server, transport, r)["subopt"] / start for r in range(1, int(v["plain"]) + 1)]
    ends = ratios[int(k) - 1 :: int(k)]  # at each cohort's end
    assert ends[-1] <= results["target"] < min(ends[:-1])
