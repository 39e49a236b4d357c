#!/usr/bin/env python
"""Benchmark suite: formats x stores x sizes x operations, ckptstore beside the stock peers and the limits.

One invocation measures, interleaved and each in a fresh child process, every implementation
(``suite/impls.py``: stock torch, safetensors, Lightning, DCP, ckptstore, and the limits) on
every store (``suite/stores.py``: local disk, memory://, S3 on moto, GCS on its emulator) for
every operation (``suite/operations.py``: save, full load, 10% partial load). The package
``benchmarks/suite/`` holds the code, one concept per module; this file is its entry point.

Run ``python benchmarks/bench_suite.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import sys

from suite.cli import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__.split("\n\n")[0]))
