"""Data sets, partitions, models and losses, with exact optima for the convex tasks (no Flower imports).

    task = build_task("digits-mlp", num_clients=20, partition="dirichlet(0.3)", seed=0)
    model = task.new_model(seed=0)
    loss = task.loss_fn(model, task.clients[0].train.x, task.clients[0].train.y)

Built-in tasks: `available_tasks()`; a user's own: build_task("package.module:function", ...).
"""

from .data import (
    Dataset,
    load_digits,
    load_idx_dataset,
    load_libsvm,
    load_mnist,
    make_synthetic,
    parse_idx,
    read_idx,
    write_idx,
)
from .errors import TaskError
from .models import MLP, LogisticRegression, SmallCNN, flat_params, num_params, set_flat_params
from .objective import LogisticObjective, Optimum
from .partition import PARTITIONS, PartitionSpec, parse_partition, partition_indices, split_train_test
from .task import (
    ClientData,
    Split,
    Task,
    attach_logistic_objective,
    available_tasks,
    build_task,
    make_task,
    register_task,
    task_options,
)

__all__ = [
    "PARTITIONS",
    "MLP",
    "ClientData",
    "Dataset",
    "LogisticObjective",
    "LogisticRegression",
    "Optimum",
    "PartitionSpec",
    "SmallCNN",
    "Split",
    "Task",
    "TaskError",
    "attach_logistic_objective",
    "available_tasks",
    "build_task",
    "flat_params",
    "load_digits",
    "load_idx_dataset",
    "load_libsvm",
    "load_mnist",
    "make_synthetic",
    "make_task",
    "num_params",
    "parse_idx",
    "parse_partition",
    "partition_indices",
    "read_idx",
    "register_task",
    "set_flat_params",
    "split_train_test",
    "task_options",
    "write_idx",
]
