"""Local training and the server update: one module per algorithm with its client and server halves.

`get(name)` returns the algorithm a config names; `available()` lists them.
"""

from .base import AGGREGATION_WEIGHT, Algorithm, ClientOutput, LocalConfig, available, build, derive_seed, get, register

__all__ = [
    "AGGREGATION_WEIGHT",
    "Algorithm",
    "ClientOutput",
    "LocalConfig",
    "available",
    "build",
    "derive_seed",
    "get",
    "register",
]
