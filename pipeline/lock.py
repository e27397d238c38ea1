"""State lock: one run at a time per state location, stale locks of dead runs are taken over."""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline.errors import LockHeld
from pipeline.stores import Store

log = logging.getLogger(__name__)
LOCK_PATH = "lock.json"
STALE_AFTER = timedelta(hours=12)


class StateLock:
    """Lock file on the state store.

    Stores have no common compare-and-swap, so the lock is written then read back: two runs
    starting in the same instant could both pass; runs scheduled minutes apart cannot.
    """

    def __init__(self, store: Store, run_id: str, now: datetime | None = None) -> None:
        self.store = store
        self.run_id = run_id
        self.now = now or datetime.now(UTC)
        self.held = False

    def acquire(self) -> None:
        current = self._read()
        if current and not self._stale(current):
            raise LockHeld(
                f"another run ({current.get('run_id')}, host {current.get('host')}, pid "
                f"{current.get('pid')}) holds the state lock since {current.get('since')}; "
                f"if it is dead, remove {LOCK_PATH} from the state location")
        if current:
            log.warning("lock=stale previous_run=%s taken_over", current.get("run_id"))
        mine = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                "since": self.now.isoformat()}
        self.store.write_bytes(LOCK_PATH, json.dumps(mine).encode())
        if (self._read() or {}).get("run_id") != self.run_id:
            raise LockHeld("another run took the state lock at the same time; try again")
        self.held = True

    def release(self) -> None:
        if self.held and (self._read() or {}).get("run_id") == self.run_id:
            self.store.delete(LOCK_PATH)
        self.held = False

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _read(self) -> dict[str, Any] | None:
        if not self.store.exists(LOCK_PATH):
            return None
        try:
            data = json.loads(self.store.read_bytes(LOCK_PATH))
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _stale(self, lock: dict) -> bool:
        if lock.get("host") == socket.gethostname() and isinstance(lock.get("pid"), int):
            return not _alive(lock["pid"])
        try:
            since = datetime.fromisoformat(lock["since"])
        except (KeyError, TypeError, ValueError):
            return True
        return self.now - since > STALE_AFTER


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
