"""Local training and the server update: one module per algorithm with its client and server halves.

`get(name)` returns the algorithm a config names; `available()` lists them.
"""

from .base import Algorithm, ClientOutput, LocalConfig, available, derive_seed, get, register

__all__ = ["Algorithm", "ClientOutput", "LocalConfig", "available", "derive_seed", "get", "register"]
