"""What the benchmark scripts share: the CPU's name, percentiles, and git in a scratch repository.

Each benchmark runs as ``python benchmarks/bench_x.py``, so this folder is first on
``sys.path`` and ``import _common`` finds this file from any working directory.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

__all__ = ["cpu_model", "git", "percentile"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows, else unknown)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def percentile(samples: list[float], fraction: float) -> float:
    """The sample at ``fraction`` (0..1) of the sorted samples, nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def git(repo: Path, *args: str) -> None:
    """Run ``git -C repo args`` quietly; a failure raises."""
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
