"""Keep freed large buffers in the process for reuse, instead of handing them back to the kernel.

Every round of a simulation allocates the same d-sized buffers again: the decoded broadcast, the
trained copy, the delta, gradients, encoded replies, a client's state read from its file. glibc
serves each allocation above its mmap threshold (at most 32 MiB, so 42 MB at d = 10.5 M) with a
fresh mapping and unmaps it when freed, so each new buffer pays its page faults again: about as
long as the copy itself. With the threshold raised, such buffers come from the heap, and memory
that was freed is reused at cache speed (a clone, a subtraction and an encode of 42 MB: about 75 ms
against 28 ms on the 2-core machine of the README). The cost: memory freed stays with the process,
so RSS stays near its peak. One arena for every thread: a buffer freed on one thread (the state
writer, the server's lane) is then reused by another (the client worker), as the buffers of a round
pass between them; with glibc's default (an arena per thread, up to 8 per core) they would not meet.

`keep_freed_memory()` is called by the in-process backend (the simulation's own process). It does
nothing where glibc is absent, or where the user has set glibc's own knobs (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES): those say how the user wants memory handled.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
#: glibc caps the mmap threshold at HEAP_MAX_SIZE / 2 = 32 MiB unless it is set explicitly; 1 GiB
#: covers the model sizes the engine is built for
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1
USER_KNOBS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds, once per process; whether they are raised."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if any(os.environ.get(k) for k in USER_KNOBS):
        log.debug("glibc's malloc is configured by the environment: left alone")
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _done = (
        bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        and bool(mallopt(M_ARENA_MAX, 1))
    )
    return _done
