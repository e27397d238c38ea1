"""Stores: one small contract, one module per backend, picked by URL scheme.

Paths given to a store are relative to its root and use '/' separators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Protocol

from pipeline.errors import ConfigError


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


class Store(Protocol):
    url: str

    def list(self, prefix: str = "") -> list[Entry]:
        """Every file under prefix (recursive), sorted by path. Missing prefix -> []."""

    def open_read(self, path: str) -> BinaryIO:
        """A readable binary stream; use as a context manager."""

    def read_bytes(self, path: str) -> bytes: ...

    def exists(self, path: str) -> bool: ...

    def write_bytes(self, path: str, data: bytes) -> None:
        """Atomic: readers see the old object or the whole new one, never a part."""

    def put_file(self, local_path: str, path: str) -> None:
        """Atomic upload of a local file to path (same guarantee as write_bytes)."""

    def rename(self, src: str, dst: str) -> None:
        """Move src to dst, replacing dst."""

    def delete(self, path: str) -> None:
        """Remove a file; a missing file is not an error."""

    def close(self) -> None: ...


def open_store(url: str, options: StoreOptions | None = None) -> Store:
    """Open the store for a URL: s3://bucket/prefix, sftp://user@host:port/path or a path."""
    options = options or StoreOptions()
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    if scheme == "s3":
        from pipeline.stores.s3 import S3Store

        return S3Store(url, options)
    if scheme == "sftp":
        from pipeline.stores.sftp import SftpStore

        return SftpStore(url, options)
    if scheme == "file":
        from pipeline.stores.local import LocalStore

        return LocalStore(url, options)
    raise ConfigError(f"unsupported store URL scheme {scheme!r} in {url!r}")
