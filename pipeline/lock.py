"""State lock: one run at a time per state location.

The lock is `lock.json`, made with the store's create-exclusive primitive (local link(2),
SFTP rename, S3 `If-None-Match: *`): of two runs starting in the same instant exactly one
creates it. It carries a lease: an expiry time that a heartbeat thread pushes forward while
the run lives. A lock of another host is stale once its lease has lapsed; one of this host
once its process is gone (pid and process start time: pids are reused). A stale lock is
taken over.

Taking over is itself a race (two runs may find the same stale lock): the taker must first
create-exclusive a marker named after the stale lock's content, so one taker wins, then
checks the lock still holds that content, replaces it, and removes the marker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline.errors import LockHeld, PipelineError
from pipeline.procs import process_alive, process_start
from pipeline.stores import Store

log = logging.getLogger(__name__)
LOCK_PATH = "lock.json"
TAKEOVER_PREFIX = "lock-takeover-"
LEASE = timedelta(minutes=10)  # a lock not renewed for this long is stale
RENEW_EVERY = timedelta(minutes=1)
LEGACY_STALE_AFTER = timedelta(hours=12)  # locks written before leases existed


class StateLock:
    """Lock file on the state store, renewed by a heartbeat thread while held."""

    def __init__(self, store: Store, run_id: str, now: datetime | None = None,
                 lease: timedelta | None = None, renew_every: timedelta | None = None,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.run_id = run_id
        self.clock = clock or (lambda: datetime.now(UTC))
        self.since = now or self.clock()
        self.lease, self.renew_every = lease or LEASE, renew_every or RENEW_EVERY
        self.token = secrets.token_hex(8)
        self.held = False
        self.lost = False  # the heartbeat found the lock taken over (after a lapse)
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        if self.store.create_exclusive(LOCK_PATH, self._content()):
            return self._start()
        raw = self._raw()
        if raw is None:  # released between our two calls
            if self.store.create_exclusive(LOCK_PATH, self._content()):
                return self._start()
            raise LockHeld("another run took the state lock at the same time; try again")
        current = _parse(raw)
        if not self._stale(current):
            until = ("its process ends" if current.get("host") == socket.gethostname()
                     else f"its lease lapses ({current.get('expires')})")
            raise LockHeld(
                f"another run ({current.get('run_id')}, host {current.get('host')}, pid "
                f"{current.get('pid')}) holds the state lock since {current.get('since')}; "
                f"it is taken over when {until}")
        self._take_over(raw, current)

    def _take_over(self, raw: bytes, stale: dict[str, Any]) -> None:
        marker = TAKEOVER_PREFIX + hashlib.sha256(raw).hexdigest()[:32]
        if not self.store.create_exclusive(marker, self._content()):
            raise LockHeld("another run is taking over the stale state lock; try again")
        try:
            if self._raw() != raw:  # renewed, released or replaced since we read it
                raise LockHeld("the state lock changed while being taken over; try again")
            log.warning("lock=stale previous_run=%s host=%s taken_over", stale.get("run_id"),
                        stale.get("host"))
            self.store.delete(LOCK_PATH)
            if not self.store.create_exclusive(LOCK_PATH, self._content()):
                raise LockHeld("another run took the state lock at the same time; try again")
        finally:
            # The stale content is gone from the lock now, so the marker guards nothing:
            # a late taker that wins it again finds other content and gives up.
            self.store.delete(marker)
        self._start()

    def release(self) -> None:
        """Stop renewing and remove the lock if it is still ours."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if self.held and _parse(self._raw() or b"{}").get("token") == self.token:
            self.store.delete(LOCK_PATH)
        self.held = False

    def renew(self) -> None:
        """Push the lease forward, if the lock is still ours (else mark it lost)."""
        current = _parse(self._raw() or b"{}")
        if current.get("token") != self.token:
            self.lost = True
            log.error("lock=lost run=%s taken_over_by=%s", self.run_id, current.get("run_id"))
            return
        self.store.write_bytes(LOCK_PATH, self._content())

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _start(self) -> None:
        self.held = True
        self._heartbeat = threading.Thread(target=self._beat, name="lock-heartbeat",
                                           daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.renew_every.total_seconds()):
            try:
                self.renew()
            except (PipelineError, OSError) as exc:  # try again next beat; lease is long
                log.warning("lock=renew_failed error=%s", exc)
            if self.lost:
                return

    def _content(self) -> bytes:
        return json.dumps({
            "run_id": self.run_id, "token": self.token, "host": socket.gethostname(),
            "pid": os.getpid(), "started": process_start(os.getpid()),
            "since": self.since.isoformat(),
            "expires": (self.clock() + self.lease).isoformat(),
        }).encode()

    def _raw(self) -> bytes | None:
        try:
            return self.store.read_bytes(LOCK_PATH)
        except FileNotFoundError:
            return None

    def _stale(self, lock: dict[str, Any]) -> bool:
        if lock.get("host") == socket.gethostname() and isinstance(lock.get("pid"), int):
            # On this host the process itself answers, lease or not.
            started = lock.get("started")
            return not process_alive(lock["pid"], started if isinstance(started, float) else None)
        expires = _time(lock.get("expires"))
        if expires is None:
            since = _time(lock.get("since"))
            if since is None:
                return True  # unreadable lock
            expires = since + LEGACY_STALE_AFTER
        return self.clock() > expires


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _time(text: object) -> datetime | None:
    try:
        value = datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
