"""What several benchmarks measure the same way."""
from __future__ import annotations


def rss_mb() -> float:
    """The process's resident set size now, in MB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0
