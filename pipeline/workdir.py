"""Per-run work folders (SPEC §14): spills and spools may hold decrypted IDs and raw lines.

One folder per run under `[state] work_dir` (default: the system temp folder), owner-only,
named `audience-pipeline-<pid>-<run id>`, with an `owner.json` (host, pid, process start
time). The run removes it when it ends, also on an error or SIGTERM; a run also removes the
folders left by runs whose process is gone (SIGKILL, power loss): same host, pid not alive
or alive with another start time (a reused pid).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import FatalError
from pipeline.procs import process_alive, process_start

log = logging.getLogger(__name__)
PREFIX = "audience-pipeline-"
OWNER = "owner.json"


@contextmanager
def run_folder(base: str | None, run_id: str) -> Iterator[Path]:
    """This run's work folder, removed on the way out whatever happens."""
    root = Path(base) if base else Path(tempfile.gettempdir())
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale(root)
        folder = root / f"{PREFIX}{os.getpid()}-{run_id}"
        folder.mkdir(mode=0o700)
        os.chmod(folder, 0o700)  # whatever the umask
        (folder / OWNER).write_text(json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(),
            "started": process_start(os.getpid()), "run_id": run_id}))
    except OSError as exc:
        raise FatalError(f"cannot create the work folder under {root} "
                         f"({exc.strerror or type(exc).__name__})") from exc
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale(root: Path) -> int:
    """Remove the work folders of this user's runs on this host whose process is gone."""
    removed = 0
    for folder in root.glob(f"{PREFIX}*"):
        if _stale(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
            log.info("workdir=stale_removed folder=%s", folder.name)
    return removed


def _stale(folder: Path) -> bool:
    try:
        if not folder.is_dir() or folder.is_symlink() or folder.stat().st_uid != os.getuid():
            return False
    except OSError:
        return False
    try:
        owner = json.loads((folder / OWNER).read_text())
    except (OSError, ValueError):  # killed before writing it, or being created right now
        return _dead_by_name(folder.name)
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return False
    pid, started = owner.get("pid"), owner.get("started")
    if not isinstance(pid, int):
        return False
    return not process_alive(pid, started if isinstance(started, float) else None)


def _dead_by_name(name: str) -> bool:
    pid = name.removeprefix(PREFIX).partition("-")[0]
    return pid.isdigit() and not process_alive(int(pid))
