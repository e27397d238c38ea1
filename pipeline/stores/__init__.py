"""Stores: one small contract (`base`), one module per backend, picked by URL scheme.

Paths given to a store are relative to its root and use '/' separators.
"""

from __future__ import annotations

from pipeline.errors import ConfigError
from pipeline.stores.base import Entry, Store, StoreOptions, checked, plain_entries, plain_path

__all__ = ["Entry", "Store", "StoreOptions", "checked", "open_store", "plain_entries",
           "plain_path"]


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
