"""How many CPUs this process may use."""

from __future__ import annotations

import os


def cores() -> int:
    """CPUs this process may run on (affinity / cpuset aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
