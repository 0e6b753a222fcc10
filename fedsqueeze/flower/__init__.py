"""fedsqueeze compression inside any Flower app: two lines (docs/flower.md).

    from fedsqueeze.flower import Compressed, compress_mod
    app = ClientApp(mods=[compress_mod(uplink="topk(0.01)", feedback="ef21")])          # client
    strategy = Compressed(FedAvg(...), uplink="topk(0.01)", feedback="ef21")            # server

`compress_mod` (mod.py) compresses the update an unmodified train function returns; `Compressed`
(strategy.py) decodes the replies and hands the inner strategy the dense arrays it expects; the
settings both must share travel in the train message's config (settings.py), and the payloads as
fedsqueeze's `Array(uint8, stype="fedsqueeze/v1")` packing (records.py).
"""

from .mod import compress_mod
from .strategy import Compressed

__all__ = ["Compressed", "compress_mod"]
