"""SFTP store (paramiko): verified host keys, uploads to `name.part` then posix-rename."""

from __future__ import annotations

import io
import logging
import os
import posixpath
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, BinaryIO, cast
from urllib.parse import unquote, urlsplit

import paramiko

from pipeline.errors import ConfigError, FatalError, PipelineError, StoreUnavailable
from pipeline.stores.base import Entry, StoreOptions, checked

log = logging.getLogger(__name__)
TIMEOUT = 10  # seconds, for connect, banner and authentication


def _is_temp(name: str) -> bool:
    """Our `.part` uploads, and dot-files other uploaders use the same way."""
    return name.endswith(".part") or name.startswith(".")


class _RejectUnknownHost(paramiko.RejectPolicy):
    def __init__(self, address: str) -> None:
        self._address = address

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        raise FatalError(f"host key for {self._address} not in known_hosts")


def _load_key(identity: str) -> paramiko.PKey:
    """The private key, read before connecting: a bad key file is a configuration error,
    not an unreachable server."""
    path = os.path.expanduser(identity)
    if not os.path.isfile(path):
        raise ConfigError(f"identity file {identity} not found")
    try:
        return paramiko.PKey.from_path(path)
    except paramiko.PasswordRequiredException:
        raise ConfigError(f"identity file {identity} is passphrase-protected; "
                          "use a key without passphrase") from None
    except (paramiko.SSHException, OSError, ValueError, IndexError, TypeError) as exc:
        raise ConfigError(f"identity file {identity} is not a usable private key "
                          f"({type(exc).__name__})") from None


class SftpStore:
    parallel_reads = False

    def __init__(self, url: str, options: StoreOptions | None = None) -> None:
        self.url = url
        parts = urlsplit(url)
        if not parts.hostname:
            raise ConfigError(f"SFTP URL without a host: {url!r}")
        self._host, self._port = parts.hostname, parts.port or 22
        self._user = unquote(parts.username) if parts.username else None
        self._address = f"{self._host}:{self._port}"
        self.root = posixpath.normpath(unquote(parts.path)) if parts.path else "."
        self._options = options or StoreOptions()
        self._client: paramiko.SSHClient | None = None
        self._folders: set[str] = set()  # folders known to exist
        self._posix_rename = True
        self._connect()

    def _connect(self) -> None:
        client = paramiko.SSHClient()
        known_hosts, identity = self._options.known_hosts, self._options.identity_file
        try:
            if known_hosts:
                client.load_host_keys(os.path.expanduser(known_hosts))
            else:
                client.load_system_host_keys()
        except OSError as exc:
            raise ConfigError(f"cannot read known_hosts file {known_hosts}") from exc
        key = _load_key(identity) if identity else None
        client.set_missing_host_key_policy(_RejectUnknownHost(self._address))
        try:
            try:
                client.connect(
                    self._host, self._port, username=self._user,
                    pkey=key,
                    allow_agent=not identity, look_for_keys=not identity,
                    timeout=TIMEOUT, banner_timeout=TIMEOUT, auth_timeout=TIMEOUT,
                )
                self._sftp_client = client.open_sftp()
            except BaseException:
                client.close()
                raise
        except paramiko.BadHostKeyException as exc:
            raise FatalError(f"host key for {self._address} does not match known_hosts") from exc
        except paramiko.AuthenticationException as exc:
            who = f"{self._user}@{self._address}"
            raise FatalError(f"SFTP authentication failed for {who}") from exc
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise StoreUnavailable(f"SFTP server {self._address} unreachable") from exc
        self._client = client

    @property
    def _sftp(self) -> paramiko.SFTPClient:
        if not self._active():  # dropped since the last call: reconnect (or fail as unavailable)
            self.close()
            self._connect()
        return self._sftp_client

    def _active(self) -> bool:
        transport = self._client.get_transport() if self._client else None
        return bool(transport and transport.is_active())

    def _full(self, path: str) -> str:
        return posixpath.join(self.root, checked(path)) if path.strip("/") else self.root

    def list(self, prefix: str = "") -> list[Entry]:
        """Files whose relative path starts with prefix (as on S3), temp files skipped."""
        with self._errors(prefix):
            return sorted(self._walk(prefix.rpartition("/")[0], prefix), key=lambda e: e.path)

    def _walk(self, folder: str, prefix: str) -> Iterator[Entry]:
        try:
            attrs = self._sftp.listdir_attr(self._full(folder))
        except FileNotFoundError:
            return
        for attr in attrs:
            path = f"{folder}/{attr.filename}" if folder else attr.filename
            mode = attr.st_mode or 0
            if "/" in attr.filename or attr.filename in ("", ".", ".."):  # a server's word
                log.warning("store=%s skipped=%r reason=not a plain file name", self.url, path)
            elif stat.S_ISDIR(mode) and (path.startswith(prefix) or prefix.startswith(path + "/")):
                yield from self._walk(path, prefix)
            elif stat.S_ISREG(mode) and path.startswith(prefix) and not _is_temp(attr.filename):
                yield Entry(path, attr.st_size or 0)

    def open_read(self, path: str) -> BinaryIO:
        with self._errors(path):
            remote = self._sftp.open(self._full(path), "rb")
            remote.prefetch()  # pipelined reads instead of one round trip per 32 KiB
        return cast(BinaryIO, io.BufferedReader(_Reader(remote, self, path), 1 << 20))

    def read_bytes(self, path: str) -> bytes:
        buffer = io.BytesIO()
        with self._errors(path):
            self._sftp.getfo(self._full(path), buffer)
        return buffer.getvalue()

    def exists(self, path: str) -> bool:
        with self._errors(path):
            try:
                return stat.S_ISREG(self._sftp.stat(self._full(path)).st_mode or 0)
            except FileNotFoundError:
                return False

    def write_bytes(self, path: str, data: bytes) -> None:
        self._atomic(path, lambda part: self._sftp.putfo(io.BytesIO(data), part, len(data)))

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Upload to a unique `.part`, then the plain SFTP rename, which by the protocol
        fails when the target exists (OpenSSH: link(2)); the file appears whole.

        SFTP's failure code does not say why a rename failed, so the target is looked at
        after: there -> False; gone again (its owner removed it meanwhile) -> the rename is
        tried again; failing a third time with no target is a real error."""
        full = self._full(path)
        part = f"{full}.{secrets.token_hex(4)}.part"
        with self._errors(path):
            self._makedirs(posixpath.dirname(full))
            self._sftp.putfo(io.BytesIO(data), part, len(data))
            created = False
            try:
                for _ in range(2):
                    try:
                        self._sftp.rename(part, full)
                        created = True
                        return True
                    except OSError:
                        if not self._active():
                            raise
                        if self.exists(path):
                            return False
                self._sftp.rename(part, full)  # a last try: its error is the real one
                created = True
                return True
            finally:
                if not created and self._active():
                    with suppress(OSError):
                        self._sftp_client.remove(part)

    def put_file(self, local_path: str, path: str, consume: bool = False) -> None:
        self._atomic(path, lambda part: self._sftp.put(local_path, part))

    def delete(self, path: str) -> None:
        with self._errors(path), suppress(FileNotFoundError):
            self._sftp.remove(self._full(path))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _atomic(self, path: str, upload: Callable[[str], object]) -> None:
        """Upload to `<name>.part` (put/putfo check the size), then rename over the target."""
        full = self._full(path)
        with self._errors(path):
            self._makedirs(posixpath.dirname(full))
            try:
                upload(full + ".part")
                self._replace(full + ".part", full)
            except BaseException:
                if self._active():  # else the server may keep the .part; list() skips it
                    with suppress(Exception):
                        self._sftp_client.remove(full + ".part")
                raise

    def _replace(self, src: str, dst: str) -> None:
        if self._posix_rename:
            try:
                self._sftp.posix_rename(src, dst)
                return
            except OSError as exc:
                if not self._active() or "unsupported" not in str(exc).lower():
                    raise
            self._posix_rename = False
            log.warning(
                "SFTP server %s lacks the posix-rename extension: replacing files by "
                "remove + rename, so readers may briefly miss them", self._address,
            )
        with suppress(FileNotFoundError):
            self._sftp.remove(dst)
        self._sftp.rename(src, dst)

    def _makedirs(self, folder: str) -> None:
        if folder in self._folders or folder in ("", ".", "/"):
            return
        try:
            self._sftp.stat(folder)
        except FileNotFoundError:
            self._makedirs(posixpath.dirname(folder))
            try:
                self._sftp.mkdir(folder)
            except OSError:  # created meanwhile by someone else?
                self._sftp.stat(folder)
        self._folders.add(folder)

    @contextmanager
    def _errors(self, path: str) -> Iterator[None]:
        where = f"sftp://{self._address}{posixpath.join(self.root, path.lstrip('/'))}"
        try:
            yield
        except PipelineError:
            raise
        except (OSError, EOFError, paramiko.SSHException) as exc:
            if not self._active():
                raise StoreUnavailable(f"{where}: connection to SFTP server lost") from exc
            if isinstance(exc, FileNotFoundError):
                raise FileNotFoundError(f"{where}: no such file") from exc
            if isinstance(exc, PermissionError):
                raise FatalError(f"{where}: permission denied") from exc
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise FatalError(f"{where}: SFTP operation failed ({detail})") from exc


class _Reader(io.RawIOBase):
    """A remote file as a raw stream whose read errors are mapped like the rest."""

    def __init__(self, remote: paramiko.SFTPFile, store: SftpStore, path: str) -> None:
        self._remote, self._store, self._path = remote, store, path

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with self._store._errors(self._path):
            chunk = self._remote.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        if not self.closed:
            with suppress(Exception):
                self._remote.close()
        super().close()
