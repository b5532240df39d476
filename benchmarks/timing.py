"""Shared timing helper for the benchmarks: medians of interleaved runs.

This machine is noisy, so benchmarks compare things measured in the same run.
Interleaving (one call of each function per round) makes a burst of outside
load hit every contender alike instead of ruining one of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 2) -> dict[str, float]:
    """Median seconds per function; one call of each per round, so machine noise hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}
