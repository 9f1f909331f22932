"""The shared folder of prometheus_client's multiprocess mode, prepared by `manage.py serve`.

prometheus_client decides between in-memory and shared-file values from PROMETHEUS_MULTIPROC_DIR when
each process first creates a metric, so the supervisor sets it before it starts web, inference and
worker (they inherit it). Files left by the previous run are removed: their counters belong to
processes that no longer exist and would be summed into this run's scrape forever.
No prometheus_client import here: the supervisor itself records nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prometheus_dir_prepare(*, var_dir: Path) -> Path:
    """Set PROMETHEUS_MULTIPROC_DIR (default: <var>/prometheus) for the children, created and emptied."""
    path = Path(os.environ.get(ENV) or var_dir / "prometheus")
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)
    os.environ[ENV] = str(path)
    return path
