"""Bad data and bad task specs get a clear error before round 1 (never a traceback mid-run).

Each case goes through the `fedsqueeze simulate` command: in this process where the command refuses the
config before anything starts, in a subprocess where a run used to start and then crash (so what the
user sees on the terminal is what is checked).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sklearn
import torch

from fedsqueeze.cli import main
from fedsqueeze.tasks import LogisticObjective, TaskError, build_task, load_libsvm, write_idx

#: scikit-learn's own svmlight test file: six examples, one feature value 1.234567890123456e10
SKLEARN_SVMLIGHT = Path(sklearn.__file__).parent / "datasets" / "tests" / "data" / "svmlight_classification.txt"
FAST = ["--set", "rounds=1", "--set", "local-steps=1", "--quiet"]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # rich wraps long messages at the console width


def _libsvm(tmp_path: Path, rows: list[str], name: str = "data.txt") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(rows) + "\n")
    return p


def _clean_rows(n: int = 40) -> list[str]:
    rng = np.random.default_rng(0)
    return [f"{i % 2} 1:{rng.normal():.3f} 2:{rng.normal():.3f} 3:{rng.normal():.3f}" for i in range(n)]


def _refused(tmp_path: Path, capsys, task: str, *more: str) -> str:
    """Run `fedsqueeze simulate` in this process; it must exit 2, write nothing and print no traceback."""
    out_dir = tmp_path / "runs"
    code = main(["simulate", "--set", f"task={task}", "--set", f"out-dir={out_dir}", *more, *FAST])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == 2, text
    assert "Traceback" not in text
    assert not out_dir.exists()  # refused before a run directory was made
    return " ".join(captured.err.split())


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "1000", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fedsqueeze.cli", "simulate", "--set", f"out-dir={tmp_path / 'runs'}", *args, *FAST],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


# ---- non-finite values name the file and line ------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_row", "fragment"),
    [
        ("1 1:0.5 2:inf 3:1", "feature 2 = inf (not a finite number)"),
        ("0 1:nan 2:1", "feature 1 = nan (not a finite number)"),
        ("1 3:1e400", "feature 3 = inf (not a finite number)"),  # overflows float64 on reading
        ("1 2:1e39", "feature 2 = 1e+39 (too large for float32)"),
        ("nan 1:1", "label nan (not a finite number)"),
    ],
)
def test_non_finite_libsvm_value_names_file_and_line(tmp_path, capsys, bad_row, fragment):
    rows = _clean_rows()
    rows[7:7] = ["# a comment line, which the reader skips", "", bad_row]  # the bad example is on line 10
    p = _libsvm(tmp_path, rows)
    err = _refused(tmp_path, capsys, f'libsvm-logreg(path="{p}")', "--set", "num-clients=4")
    assert f"LibSVM file '{p}', line 10: {fragment}" in err, err


def test_nan_in_a_test_row_is_refused(tmp_path, capsys):
    # it used to be accepted: every test_loss null and "diverged": true although training converged
    train = _libsvm(tmp_path, _clean_rows(), "train.txt")
    rows = _clean_rows(10)
    rows[3] = "1 1:0.1 2:nan"
    test = _libsvm(tmp_path, rows, "test.txt")
    err = _refused(tmp_path, capsys, f'libsvm-logreg(path="{train}", test_path="{test}")', "--set", "num-clients=4")
    assert f"LibSVM file '{test}', line 4: feature 2 = nan" in err, err


def test_nan_in_training_rows_stops_before_round_one(tmp_path):
    # it used to crash in round 1 with torch's LinAlgError traceback, leaving only config.toml
    rows = _clean_rows()
    rows[20] = "0 1:nan 2:nan 3:1"
    p = _libsvm(tmp_path, rows)
    proc = _cli(tmp_path, "--set", f'task=libsvm-logreg(path="{p}")', "--set", "num-clients=4", "--set", "name=nan")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"LibSVM file '{p}', line 21: feature 1 = nan" in " ".join(proc.stderr.split())
    assert not (tmp_path / "runs").exists()


def test_non_finite_idx_pixels_name_the_file_and_example(tmp_path, capsys):
    d = tmp_path / "mnist"
    d.mkdir()
    images = np.random.default_rng(0).random((20, 4, 4)).astype(np.float32)
    images[13, 2, 1] = np.inf
    write_idx(d / "train-images-idx3-ubyte", images)
    write_idx(d / "train-labels-idx1-ubyte", (np.arange(20) % 2).astype(np.uint8))
    err = _refused(tmp_path, capsys, f'mnist-mlp(path="{d}")', "--set", "num-clients=2")
    assert f"IDX images '{d / 'train-images-idx3-ubyte'}', example 13" in err and "inf" in err, err


def test_non_finite_arrays_of_a_user_task_are_refused():
    x = np.ones((30, 3), dtype=np.float32)
    x[5, 1] = np.nan
    with pytest.raises(TaskError, match="example 5 .* not a finite float32"):
        build_task("tests.test_bad_data:_arrays_task", num_clients=2, x=x)
    with pytest.raises(TaskError, match="client 1's training example 0 .* not a finite float32"):
        build_task("tests.test_bad_data:_clients_task", num_clients=2, x=x)


def _arrays_task(*, x):  # a user's task: (build_model, (x, y))
    return (lambda: torch.nn.Linear(3, 2)), (x, np.arange(len(x)) % 2)


def _clients_task(*, x):  # a user's task: (build_model, clients), the second client's first row is bad
    y = np.arange(len(x)) % 2
    return (lambda: torch.nn.Linear(3, 2)), [(x[:5], y[:5], x[:2], y[:2]), (x[5:], y[5:], x[:2], y[:2])]


# ---- ill-conditioned convex task -------------------------------------------------------------------


def test_sklearn_svmlight_file_solves_its_optimum_and_runs(tmp_path):
    # the value 1.2e10 made the Cholesky factor of the Hessian fail in round 1 (a traceback mid-run)
    proc = _cli(
        tmp_path, "--set", f'task=libsvm-logreg(path="{SKLEARN_SVMLIGHT}")', "--set", "num-clients=2",
        "--set", "name=sk",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "runs" / "sk" / "summary.json").read_text())
    assert summary["rounds"] == 1 and np.isfinite(summary["optimum"]["f_star"])


def test_newton_survives_a_hessian_that_rounding_makes_indefinite():
    data = load_libsvm(SKLEARN_SVMLIGHT)
    x = data.x.reshape(len(data), -1)
    objective = LogisticObjective([x[:3], x[3:]], [data.y[:3], data.y[3:]], data.num_classes, 0.1)
    with pytest.raises(torch.linalg.LinAlgError):  # the plain factorisation fails at the start point
        torch.linalg.cholesky(objective.hessian(torch.zeros(objective.dim)))
    opt = objective.optimum()
    g0 = float(objective.grad(torch.zeros(objective.dim)).norm())
    assert opt.grad_norm < 1e-12 * g0  # float64 resolution relative to the data's scale (g0 ~ 3e9)
    # no other point along the gradient does better
    for t in (1e-12, 1e-9, 1e-6):
        assert objective.f(opt.x - t * objective.grad(opt.x) / objective.L) >= opt.f - 1e-12


# ---- the global test set holds no training example --------------------------------------------------


def test_dirichlet_single_example_clients_keep_their_example_out_of_the_test_set():
    # at 500 clients dirichlet(0.01) leaves hundreds of clients with one example, which used to be
    # added to the global test set (383 of its 675 examples were training data)
    task = build_task("digits-mlp", num_clients=500, partition="dirichlet(0.01)", seed=0)
    single = [c for c in task.clients if c.test_is_train]
    assert len(single) > 100
    train_rows = {bytes(r.numpy().tobytes()) for c in task.clients for r in c.train.x.reshape(len(c.train), -1)}
    test_rows = [bytes(r.numpy().tobytes()) for r in task.global_test.x.reshape(len(task.global_test), -1)]
    assert not train_rows.intersection(test_rows)
    assert len(test_rows) == sum(len(c.test) for c in task.clients if not c.test_is_train)


def test_no_held_out_example_at_all_is_refused(tmp_path, capsys):
    p = _libsvm(tmp_path, _clean_rows(6))
    err = _refused(tmp_path, capsys, f'libsvm-logreg(path="{p}")', "--set", "num-clients=6")
    assert "no client holds a test example" in err and "test_fraction=0" in err, err
    # test_fraction 0 asks for evaluation on the training data, as the convex papers do
    task = build_task("libsvm-logreg", num_clients=6, path=str(p), test_fraction=0.0)
    assert len(task.global_test) == 6


# ---- task specs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "quoted"),
    [
        ("libsvm-logreg(path=/data/a9a.txt)", 'libsvm-logreg(path="/data/a9a.txt")'),
        ("libsvm-logreg(path=a9a.txt, reg=0.1)", 'libsvm-logreg(path="a9a.txt", reg=0.1)'),
        ("libsvm-logreg(path=../my-data/a9a)", 'libsvm-logreg(path="../my-data/a9a")'),
    ],
)
def test_unquoted_path_shows_the_quoted_form(tmp_path, capsys, written, quoted):
    err = _refused(tmp_path, capsys, written)
    assert "must be quoted" in err and f"--set 'task={quoted}'" in err and f"task = '{quoted}'" in err, err


@pytest.mark.parametrize(
    ("ref", "fragment"),
    [
        ("os.path:join", "missing a required argument: 'a'"),
        ("json:dumps", "missing a required argument: 'obj'"),
        ("builtins:dict", "no inspectable signature"),
    ],
)
def test_import_path_that_is_not_a_task_function(tmp_path, capsys, ref, fragment):
    err = _refused(tmp_path, capsys, ref)
    assert f"config key 'task' = '{ref}': task '{ref}' is not a task function" in err and fragment in err, err
