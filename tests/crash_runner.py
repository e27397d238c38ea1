"""Runs the CLI in a subprocess and SIGKILLs itself at a chosen stage boundary.

usage: python tests/crash_runner.py STAGE run --config FILE ...
STAGE: after_ingest | after_resolve | mid_publish | before_ledger | none, or for membership
(SPEC §11): before_membership:N (outputs published, N-th membership version not saved),
before_ledger:N (N-th ledger record not written), between_feeds (second feed not started)
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import run  # noqa: E402
from pipeline.cli import main  # noqa: E402
from pipeline.flows import aam as delivery  # noqa: E402
from pipeline.membership import FeedMembership  # noqa: E402
from pipeline.stages import publish  # noqa: E402


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def after(func):
    def wrapper(*args, **kwargs):
        result = func(*args, **kwargs)
        die()
        return result

    return wrapper


def before(func):
    def wrapper(*args, **kwargs):
        die()
        return func(*args, **kwargs)

    return wrapper


def before_nth(func, n: int):
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n:
            die()
        return func(*args, **kwargs)

    return wrapper


def mid_publish(func):
    def wrapper(store, dest, key, out):
        if out.files:  # first file written in full under its final name, then the crash
            path, data = out.files[0]
            if isinstance(data, Path):
                store.put_file(str(data), path)
            else:
                store.write_bytes(path, data)
            die()
        return func(store, dest, key, out)

    return wrapper


def install(stage: str) -> None:
    if stage == "after_ingest":  # pass 1 done: every line parsed, resolved and spilled
        delivery.ingest = after(delivery.ingest)
    elif stage == "after_resolve":  # pass 2 done: every key joined to its profile
        delivery.match = after(delivery.match)
    elif stage == "mid_publish":
        publish.write_outputs = mid_publish(publish.write_outputs)
    elif stage == "before_ledger":
        run._record = before(run._record)
    elif stage.startswith("before_membership:"):
        FeedMembership.save = before_nth(FeedMembership.save, int(stage.partition(":")[2]))
    elif stage.startswith("before_ledger:"):
        run._record = before_nth(run._record, int(stage.partition(":")[2]))
    elif stage == "between_feeds":
        run.flow_for = before_nth(run.flow_for, 2)


if __name__ == "__main__":
    install(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
