"""Local file system store: temp file in the same folder, fsync, then os.replace."""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from pipeline.errors import FatalError
from pipeline.stores.base import Entry, StoreOptions, checked

log = logging.getLogger(__name__)
# Read once, at import (before any thread): os.umask can only be read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _is_temp(name: str) -> bool:
    return name.endswith(".part") or name.startswith(".")


class LocalStore:
    parallel_reads = True

    def __init__(self, url: str, options: StoreOptions | None = None) -> None:
        self.url = url
        path = unquote(urlsplit(url).path) if url.startswith("file://") else url
        self.root = Path(path).expanduser().absolute()

    def _path(self, path: str) -> Path:
        return self.root / checked(path) if path.strip("/") else self.root

    def _inside(self, path: str) -> Path:
        """The file to read; a link (or linked folder) leading out of the root is refused."""
        full = self._path(path)
        if not _within(full, self.root):
            raise FatalError(f"{path}: a link that leaves the store root; refused")
        return full

    def list(self, prefix: str = "") -> list[Entry]:
        """Files whose relative path starts with prefix (as on S3), temp files skipped."""
        base = prefix.rpartition("/")[0]
        entries: list[Entry] = []
        for folder, dirs, files in os.walk(self._path(base)):
            rel = Path(folder).relative_to(self.root).as_posix()
            rel = "" if rel == "." else rel + "/"
            # Only descend where a path can still start with prefix.
            dirs[:] = [d for d in dirs if _may_match(rel + d + "/", prefix)]
            for name in files:
                path = rel + name
                if not path.startswith(prefix) or _is_temp(name):
                    continue
                full = Path(folder) / name
                if full.is_symlink() and not (full.exists() and _within(full, self.root)):
                    # os.walk does not enter linked folders; linked files are checked here.
                    log.warning("store=%s skipped=%r reason=a link that leaves the store root "
                                "(or leads nowhere)", self.url, path)
                    continue
                entries.append(Entry(path, full.stat().st_size))
        return sorted(entries, key=lambda e: e.path)

    def open_read(self, path: str) -> BinaryIO:
        return self._inside(path).open("rb")

    def read_bytes(self, path: str) -> bytes:
        return self._inside(path).read_bytes()

    def exists(self, path: str) -> bool:
        return self._path(path).is_file()

    def write_bytes(self, path: str, data: bytes) -> None:
        self._atomic_write(path, lambda out: out.write(data))

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Written to a temp file, then hard-linked to path: link(2) fails if path exists,
        and the file appears with all its content (O_EXCL alone would show it empty first)."""
        target, temp = self._target(path)
        try:
            with temp.open("xb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(temp, target)
            except FileExistsError:
                return False
        finally:
            temp.unlink(missing_ok=True)
        _fsync_dir(target.parent)
        return True

    def put_file(self, local_path: str, path: str, consume: bool = False) -> None:
        if consume and self._move_in(local_path, path):
            return

        def copy(out: BinaryIO) -> None:
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)

        self._atomic_write(path, copy)

    def _move_in(self, local_path: str, path: str) -> bool:
        """The file itself renamed into place, flushed first: no copy (an output of hundreds
        of MB took seconds to copy). False when it is on another file system."""
        target, temp = self._target(path)
        with open(local_path, "rb") as src:
            os.fsync(src.fileno())
        try:
            os.rename(local_path, temp)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                return False
            raise
        try:
            os.chmod(temp, 0o666 & ~_UMASK)  # as a copy would have been created
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        return True

    def delete(self, path: str) -> None:
        self._path(path).unlink(missing_ok=True)

    def close(self) -> None:
        pass

    def _target(self, path: str) -> tuple[Path, Path]:
        """Where path lives (its folder made), and a temporary name beside it that `list`
        never shows."""
        target = self._path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target, target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")

    def _atomic_write(self, path: str, write: Callable[[BinaryIO], object]) -> None:
        target, temp = self._target(path)
        try:
            with temp.open("xb") as out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)


def _within(path: Path, root: Path) -> bool:
    """Whether `path`, links resolved, is `root` or below it."""
    return path.resolve().is_relative_to(root.resolve())


def _may_match(folder: str, prefix: str) -> bool:
    return folder.startswith(prefix) or prefix.startswith(folder)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
