"""The in-process backend's allocator setting: freed large buffers stay in the process for reuse,
unless the user configured glibc's malloc through its own environment variables."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from fedsqueeze.simulation.allocator import USER_KNOBS

PROBE = """
import json, sys
import numpy as np
from fedsqueeze.simulation.allocator import keep_freed_memory

def rss_mb():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS:")) / 1024

raised = keep_freed_memory() if sys.argv[1] == "keep" else False
again = keep_freed_memory() if sys.argv[1] == "keep" else False
buf = np.ones(16_000_000, dtype=np.float32)  # 64 MB, every page touched
before = rss_mb()
del buf
print(json.dumps({"raised": raised, "again": again, "returned_mb": before - rss_mb()}))
"""


def probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in USER_KNOBS}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_freed_large_buffers_stay_for_reuse_unless_the_user_configured_malloc():
    plain = probe("plain")
    assert plain["returned_mb"] > 50  # glibc's default: a 64 MB buffer is its own mapping, unmapped when freed
    kept = probe("keep")
    assert kept["raised"] and kept["again"]
    assert kept["returned_mb"] < 16  # from the heap now, kept for the next buffer of its size
    # the user's own setting wins: nothing is changed
    theirs = probe("keep", MALLOC_MMAP_THRESHOLD_="1048576")
    assert not theirs["raised"] and theirs["returned_mb"] > 50
