"""Executors: where a delivery's tasks run (parse + resolve per split file, join per key
bucket, merge per profile bucket).

`local` (the default) runs them one after another in this process; `dask` sends them to an
existing Dask distributed cluster. Both run the same task functions of the flow; only the
dask module imports Dask, and only when it is chosen.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ExecutorConfig, check_executor
from pipeline.executors.local import Executor, LocalExecutor, Portable, Threads


def open_executor(config: ExecutorConfig, workdir: Path, run_id: str) -> Executor:
    if config.kind == "dask":
        check_executor(config)
        from pipeline.executors.dask import DaskExecutor

        assert config.scheduler and config.work_location  # checked just above
        return DaskExecutor(config.scheduler, config.work_location, run_id,
                            config.performance_report)
    return LocalExecutor(workdir)


__all__ = ["Executor", "LocalExecutor", "Portable", "Threads", "open_executor"]
