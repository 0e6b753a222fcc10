"""Test-wide settings: property tests draw the same examples on every run (fixed seeds, as the
statistical tests use), so a CI result is reproducible; run with HYPOTHESIS_PROFILE=explore to search anew."""

import os

from hypothesis import settings

settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
