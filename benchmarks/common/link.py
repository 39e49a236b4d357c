"""The fault and link proxy of the tests (``tests/netfault.py``), for the benchmarks' region-like link.

One proxy serves both: tests inject faults with it, benchmarks add latency and cap bandwidth.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from netfault import FaultProxy

__all__ = ["FaultProxy"]
