"""A real Dask cluster on 127.0.0.1 for tests: `dask scheduler` and `dask worker` processes,
started the way an operator starts them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

DASK = str(Path(sys.executable).with_name("dask"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Cluster:
    address: str
    port: int
    env: dict[str, str]
    logs: Path
    scheduler: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)

    def start_scheduler(self) -> None:
        self.scheduler = _spawn([DASK, "scheduler", "--host", "127.0.0.1", "--port",
                                 str(self.port), "--no-dashboard"], self.env,
                                self.logs / "scheduler.log")
        _wait_port(self.port)

    def start_worker(self) -> None:
        n = len(self.workers)
        self.workers.append(_spawn(
            [DASK, "worker", self.address, "--host", "127.0.0.1", "--nthreads", "1",
             "--no-nanny", "--no-dashboard", "--name", f"w{n}", "--memory-limit", "0"],
            self.env, self.logs / f"worker-{n}.log"))

    def wait_for_workers(self, n: int, timeout: float = 60) -> None:
        from distributed import Client

        with Client(self.address, timeout="30s") as client:
            client.wait_for_workers(n, timeout=timeout)

    def kill_scheduler(self) -> None:
        assert self.scheduler is not None
        self.scheduler.send_signal(signal.SIGKILL)
        self.scheduler.wait()

    def stop(self) -> None:
        for proc in [*self.workers, self.scheduler]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()


@contextmanager
def local_cluster(logs: Path, env: Mapping[str, str] | None = None,
                  workers: int = 2) -> Iterator[Cluster]:
    """Scheduler and workers as subprocesses; workers inherit os.environ plus `env`."""
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(f"tcp://127.0.0.1:{port}", port, {**os.environ, **(env or {})}, logs)
    try:
        cluster.start_scheduler()
        for _ in range(workers):
            cluster.start_worker()
        cluster.wait_for_workers(workers)
        yield cluster
    finally:
        cluster.stop()


def _spawn(args: list[str], env: Mapping[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(args, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")
