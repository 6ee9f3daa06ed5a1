"""The benchmark harness, without the `oms` console script: the same code as `oms bench`.

    .venv/bin/python bench/harness.py seed_mix [--out DIR] [--smoke] [--orders N] [--rate R]
    .venv/bin/python bench/harness.py --help

Scenarios are in bench/scenarios/; results go to bench/out/ (see README, "Benchmark harness").
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from oms_pipeline.benchmark.command import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
