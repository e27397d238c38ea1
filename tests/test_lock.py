"""State lock: exactly one of two simultaneous runs proceeds; leases; race-safe takeover."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline.errors import LockHeld
from pipeline.lock import LOCK_PATH, StateLock
from pipeline.procs import process_start
from pipeline.stores import Store, StoreOptions, open_store

TRIALS = 20


@pytest.fixture(scope="module")
def serial_s3(s3_endpoint: str) -> Iterator[str]:
    """moto's S3 app served one request at a time. S3 makes a conditional PUT atomic; moto
    checks then writes, so its threaded server can let two racing PUTs through (a moto
    limitation, not S3's). Serving requests in turn gives S3's guarantee back."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, DomainDispatcherApplication(create_backend_app),
                         threaded=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.port}"
    server.shutdown()


@pytest.fixture(params=["local", "s3", "sftp"])
def opener(request: pytest.FixtureRequest, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Callable[[], Store]:
    """Opens a new client of one state location (each racing run has its own)."""
    options = StoreOptions()
    if request.param == "local":
        url = str(tmp_path / "state")
    elif request.param == "s3":
        monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("serial_s3"))
        url = f"s3://{request.getfixturevalue('make_bucket')()}/state"
    else:  # OpenSSH's sftp-server renames with link(2): refuses an existing target
        server = request.getfixturevalue("sftp_server")
        url = f"{server.url}/lock-{uuid.uuid4().hex[:8]}"
        options = StoreOptions(known_hosts=server.known_hosts,
                               identity_file=server.identity_file)
    return lambda: open_store(url, options)


def _race(stores: list[Store], make_lock: Callable[[Store, int], StateLock]) -> list[StateLock]:
    """Every store's lock acquired at the same instant; the locks that got it."""
    barrier = threading.Barrier(len(stores))
    won: list[StateLock] = []
    errors: list[BaseException] = []

    def contend(i: int) -> None:
        lock = make_lock(stores[i], i)
        barrier.wait()
        try:
            lock.acquire()
            won.append(lock)
        except LockHeld:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return won


def test_exactly_one_of_two_simultaneous_runs_proceeds(opener):
    stores = [opener(), opener()]
    for trial in range(TRIALS):
        won = _race(stores, lambda store, i, t=trial: StateLock(store, f"run-{t}-{i}"))
        assert len(won) == 1, f"trial {trial}: {len(won)} runs hold the lock"
        holder = json.loads(stores[0].read_bytes(LOCK_PATH))
        assert holder["run_id"] == won[0].run_id
        won[0].release()
        assert not stores[0].exists(LOCK_PATH)


def _foreign_lock(expires: datetime, run_id: str = "elsewhere") -> bytes:
    """A lock of a run on another host, which started one lease before `expires`."""
    return json.dumps({"run_id": run_id, "token": run_id, "host": "another-host", "pid": 1,
                       "since": (expires - timedelta(minutes=10)).isoformat(),
                       "expires": expires.isoformat()}).encode()


def test_exactly_one_run_takes_over_a_lapsed_lease(opener):
    stores = [opener(), opener()]
    for trial in range(TRIALS):
        lapsed = datetime.now(UTC) - timedelta(seconds=1)
        stores[0].write_bytes(LOCK_PATH, _foreign_lock(lapsed, f"dead-{trial}"))
        won = _race(stores, lambda store, i, t=trial: StateLock(store, f"run-{t}-{i}"))
        assert len(won) == 1, f"trial {trial}: {len(won)} runs hold the lock"
        assert json.loads(stores[0].read_bytes(LOCK_PATH))["run_id"] == won[0].run_id
        won[0].release()
    assert [e.path for e in stores[0].list()] == []  # no takeover marker left behind


def test_a_live_lease_of_another_host_refuses(tmp_path):
    store = open_store(str(tmp_path))
    store.write_bytes(LOCK_PATH, _foreign_lock(datetime.now(UTC) + timedelta(minutes=5)))
    with pytest.raises(LockHeld, match=r"another run \(elsewhere, host another-host"):
        StateLock(store, "me").acquire()


def test_a_dead_host_lock_does_not_block_for_12_hours(tmp_path):
    # Written an hour ago by a run on another host that died: its lease (10 min) has lapsed.
    store = open_store(str(tmp_path))
    since = datetime.now(UTC) - timedelta(hours=1)
    store.write_bytes(LOCK_PATH, _foreign_lock(since + timedelta(minutes=10)))
    with StateLock(store, "me"):
        assert json.loads(store.read_bytes(LOCK_PATH))["run_id"] == "me"
    assert not store.exists(LOCK_PATH)


def test_lease_is_renewed_while_the_run_lives(tmp_path):
    store = open_store(str(tmp_path))
    lock = StateLock(store, "me", lease=timedelta(minutes=5),
                     renew_every=timedelta(seconds=0.1))
    with lock:
        first = json.loads(store.read_bytes(LOCK_PATH))["expires"]
        deadline = time.time() + 30
        while (later := json.loads(store.read_bytes(LOCK_PATH))["expires"]) == first:
            assert time.time() < deadline, "the lease was never renewed"
            time.sleep(0.02)
        assert later > first
        # Another host would now see a lease that has not lapsed.
        with pytest.raises(LockHeld):
            StateLock(store, "other").acquire()


def test_a_lock_taken_over_after_a_lapse_is_not_removed_by_its_old_holder(tmp_path):
    store = open_store(str(tmp_path))
    lock = StateLock(store, "me", renew_every=timedelta(seconds=0.05))
    lock.acquire()
    store.write_bytes(LOCK_PATH, _foreign_lock(datetime.now(UTC) + timedelta(minutes=5), "new"))
    deadline = time.time() + 30
    while not lock.lost and time.time() < deadline:
        time.sleep(0.02)
    assert lock.lost
    lock.release()
    assert json.loads(store.read_bytes(LOCK_PATH))["run_id"] == "new"


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    # Same host, a live pid (ours), but that pid started at another time: another process.
    store = open_store(str(tmp_path))
    started = process_start(os.getpid())
    assert started is not None
    for when, taken in ((started - 3600, True), (started, False)):
        store.write_bytes(LOCK_PATH, json.dumps({
            "run_id": "old", "token": "old", "host": socket.gethostname(),
            "pid": os.getpid(), "started": when, "since": "2026-01-01T00:00:00+00:00",
            "expires": (datetime.now(UTC) + timedelta(minutes=5)).isoformat()}).encode())
        if taken:
            with StateLock(store, "me"):
                pass
        else:
            with pytest.raises(LockHeld):
                StateLock(store, "me").acquire()
