"""Post-training pruning calibrated on client data: statistics, scores, masks, packing, the driver.

Pure PyTorch (no flwr): `fedsqueeze.server.calibration` gathers the statistics through Flower's apps,
`fedsqueeze prune` runs it on a finished run. Methods: magnitude, Wanda (Sun et al. 2023), RIA
(Zhang et al. 2024) and the symmetric score of SymWanda (Yi & Richtarik 2025).
"""

from .driver import DEFAULT_GROUP, Asker, Exchange, LayerReport, PruneResult, PruneSpec, local_asker, prune
from .errors import PruneError
from .masks import NM, n_of_m, parse_nm, unstructured
from .packing import PackedModel, pack_model, packed_size, unpack_model
from .scores import METHODS, score
from .stats import LayerStats, Stats, collect, merge, prunable_layers, weight_matrix

__all__ = [
    "DEFAULT_GROUP",
    "METHODS",
    "NM",
    "Asker",
    "Exchange",
    "LayerReport",
    "LayerStats",
    "PackedModel",
    "PruneError",
    "PruneResult",
    "PruneSpec",
    "Stats",
    "collect",
    "local_asker",
    "merge",
    "n_of_m",
    "pack_model",
    "packed_size",
    "parse_nm",
    "prunable_layers",
    "prune",
    "score",
    "unpack_model",
    "unstructured",
    "weight_matrix",
]
