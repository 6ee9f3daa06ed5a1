#!/usr/bin/env python3
"""Run the oms-pipeline daemon in the foreground.

    python run_pipeline.py                 # the embedded default: config/oms.toml
    python run_pipeline.py --config FILE

SIGTERM/SIGINT: drain and exit 0 (a second one aborts, exit 1). SIGHUP: reload
pool sizes and queue bounds. Exit 2: the configuration cannot be used.
"""
from __future__ import annotations

import argparse
import sys

import anyio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the oms-pipeline daemon in the foreground.")
    parser.add_argument("--config", help="config file (default: config/oms.toml, the embedded default)")
    args = parser.parse_args(argv)
    from oms_pipeline.daemon import serve
    return anyio.run(serve, args.config, backend_options={"use_uvloop": True})


if __name__ == "__main__":
    sys.exit(main())
