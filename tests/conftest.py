"""Test-wide settings: generated kernels go to a cache inside the checkout, kept between
runs so that a second run compiles nothing."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("CONVDSL_CACHE", str(Path(__file__).resolve().parent.parent
                                           / ".convdsl-cache"))
# The convolution cost model's built-in machine rates: the same algorithm choices on
# every machine, and no calibration run inside the tests.
os.environ.setdefault("CONVDSL_NO_CALIBRATE", "1")
