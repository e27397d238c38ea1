"""The store contract and path rules, apart from `open_store` so that the backends import
them without a cycle.

Paths given to a store are relative to its root and use '/' separators.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from pipeline.errors import FatalError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the store root, '/'-separated
    size: int


@dataclass(frozen=True)
class StoreOptions:
    """Connection options that are not part of the URL."""

    known_hosts: str | None = None  # SFTP: known_hosts file; unknown hosts are refused
    identity_file: str | None = None  # SFTP: private key file
    sse: str | None = None  # S3: server-side encryption ("AES256" or "aws:kms")


def plain_path(path: str) -> bool:
    """A relative '/'-separated path without empty, '.' or '..' segments (or NUL): joined
    onto a folder, it stays inside that folder."""
    return bool(path) and "\0" not in path and all(
        part not in ("", ".", "..") for part in path.split("/"))


def checked(path: str) -> str:
    """`path` (a leading '/' tolerated) if it is plain, else FatalError: no store operation
    ever touches a path that could leave its root."""
    rel = path.lstrip("/")
    if not plain_path(rel):
        raise FatalError(f"{path!r} is not a plain relative path; refused")
    return rel


def plain_entries(entries: Iterable[Entry], url: str) -> list[Entry]:
    """Listing entries whose path is plain; the others are left out with a warning (an S3 key
    or a server's file name is any string, `../../x` included)."""
    kept: list[Entry] = []
    skipped: list[Entry] = []
    for entry in entries:
        (kept if plain_path(entry.path) else skipped).append(entry)
    if skipped:
        log.warning("store=%s skipped=%d reason=not a plain relative path (empty, '.' or '..' "
                    "segment) first=%r", url, len(skipped), skipped[0].path)
    return kept


class Store(Protocol):
    url: str
    # Files may be read on several threads at once (one client shared): local files and
    # boto3's client are; a paramiko SFTP session is read one file at a time.
    parallel_reads: bool

    def list(self, prefix: str = "") -> list[Entry]:
        """Every file under prefix (recursive), sorted by path. Missing prefix -> []."""

    def open_read(self, path: str) -> BinaryIO:
        """A readable binary stream; use as a context manager."""

    def read_bytes(self, path: str) -> bytes: ...

    def exists(self, path: str) -> bool: ...

    def write_bytes(self, path: str, data: bytes) -> None:
        """Atomic: readers see the old object or the whole new one, never a part."""

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create path with data only if it does not exist: True if this call created it,
        False if it existed. Atomic (of two racing calls exactly one gets True) and whole
        (readers never see a part of data)."""

    def put_file(self, local_path: str, path: str, consume: bool = False) -> None:
        """Atomic upload of a local file to path (same guarantee as write_bytes).
        `consume`: the caller is done with the local file; a store may move it instead of
        copying (it is then gone)."""

    def delete(self, path: str) -> None:
        """Remove a file; a missing file is not an error."""

    def close(self) -> None: ...
