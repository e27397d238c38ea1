"""Ingest: find complete AAM deliveries on a feed store and read their lines."""

from __future__ import annotations

import hashlib
import logging
import posixpath
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from typing import BinaryIO, cast

import polars as pl
from isal import isal_zlib

from pipeline.errors import DeliveryFailed, IncompleteDelivery
from pipeline.formats import (
    MAX_LINE_BYTES,
    InfoEntry,
    InfoFile,
    OutboundName,
    escaped,
    file_name_problem,
    group_deliveries,
    info_name,
    info_order,
    parse_info,
    parse_outbound_name,
)
from pipeline.pgp import Decryptor
from pipeline.stores import Entry, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliveryFile:
    name: OutboundName
    size: int
    expected: InfoEntry | None = None


@dataclass(frozen=True)
class Delivery:
    feed: str
    root: str
    folder: str
    files: tuple[DeliveryFile, ...]
    info: InfoFile | None
    problem: str | None = None  # why the delivery is not complete yet
    broken: str | None = None  # why it cannot be processed as it is (bad control file)

    @property
    def complete(self) -> bool:
        return self.problem is None and self.broken is None

    @property
    def timestamp_ms(self) -> int | None:
        return self.files[0].name.timestamp_ms if self.files else _root_timestamp(self.root)

    @property
    def full(self) -> bool:
        """SYNC-MODE `full`: the delivery is the whole membership (no mode reads as `iter`)."""
        return bool(self.files) and self.files[0].name.sync_mode == "full"

    @property
    def date(self) -> date | None:
        return self.files[0].name.delivery_date if self.files else None

    @property
    def sort_key(self) -> tuple:
        day = self.date.isoformat() if self.date else ""
        return (day, self.timestamp_ms or 0, self.root)


def find_deliveries(store: Store, feed: str, require_info: bool = True) -> list[Delivery]:
    """Every delivery on the store, oldest first, each marked complete or not (with why)."""
    entries = store.list("")
    sizes = {e.path: e.size for e in entries}
    names = [n for n in (parse_outbound_name(e.path) for e in entries) if n is not None]
    groups = group_deliveries(names)
    for info_path in (e.path for e in entries if e.path.endswith(".info")):
        folder, base = posixpath.split(info_path)
        groups.setdefault((folder, base[: -len(".info")]), [])
    out = [_delivery(store, feed, folder, root, files, sizes, require_info)
           for (folder, root), files in groups.items()]
    return sorted(out, key=lambda d: d.sort_key)


def _delivery(store: Store, feed: str, folder: str, root: str, files: list[OutboundName],
              sizes: dict[str, int], require_info: bool) -> Delivery:
    info_path = posixpath.join(folder, info_name(root))
    unsafe = file_name_problem(folder, root, *(n.path for n in files))
    if unsafe:  # never published under such a name; the report shows it escaped
        listed = tuple(DeliveryFile(n, sizes[n.path]) for n in files)
        return Delivery(feed, escaped(root), folder, listed, None, broken=unsafe)
    if info_path not in sizes:
        listed = tuple(DeliveryFile(n, sizes[n.path]) for n in files)
        problem = None if require_info is False and files else "control file missing"
        return Delivery(feed, root, folder, listed, None, problem)
    try:
        info = parse_info(store.read_bytes(info_path).decode("utf-8", errors="replace"))
    except DeliveryFailed as exc:
        listed = tuple(DeliveryFile(n, sizes[n.path]) for n in files)
        return Delivery(feed, root, folder, listed, None, broken=f"{info_path}: {exc}")
    by_base = {posixpath.basename(n.path): n for n in files}
    in_info: list[DeliveryFile] = []
    problem = None
    for entry in sorted(info.files, key=info_order):
        name = by_base.get(posixpath.basename(entry.file_name))
        if name is None:
            problem = problem or f"file {entry.file_name} listed in control file is missing"
            continue
        if sizes[name.path] != entry.byte_size:
            problem = problem or (f"file {entry.file_name} has {sizes[name.path]} bytes, "
                                  f"control file says {entry.byte_size}")
        in_info.append(DeliveryFile(name, sizes[name.path], entry))
    if not info.files:
        problem = "control file lists no files"
    return Delivery(feed, root, folder, tuple(in_info), info, problem)


# Text per in-memory chunk: bounds memory whatever the file size. Two split files are read
# side by side, each holding a chunk and the next one read ahead: at 32 MB, a 100M-line run
# peaked in pass 1 at ~1.48 GB; the chunk size itself changes no timing measured.
CHUNK_BYTES = 16 << 20
CHUNK_LINES = 250_000  # and lines per chunk: short lines must not make a chunk of millions
_BLOCK = 8 << 20  # bytes read from the store at a time
_PIECE = 1 << 20  # decompressed bytes handled at a time (a 0.5 MB gzip may hold gigabytes)
# gzip'd bytes inflated at a time: each call that stops at _PIECE hands back a copy of the
# input it has not read, so an 8 MB block cost a few MB of copying per piece (~30% of the
# inflate time).
_INFLATE_IN = 64 << 10
_GZIP_MAGIC = b"\x1f\x8b"


def read_chunks(store: Store, delivery: Delivery, chunk_bytes: int | None = None,
                decryptor: Decryptor | None = None) -> Iterator[pl.DataFrame]:
    """Lines of a complete delivery in chunks: file_seq, line_no, line (blank lines kept).

    Size, md5 and line count (and, for PGP files, integrity and signature) are checked as each
    file ends, so a bad file raises only after
    its earlier chunks were yielded: callers must not publish before the iterator is done.
    A line longer than MAX_LINE_BYTES is cut to a little over that length (the parser marks
    it `line_too_long`); the rest of it is skipped as it streams by, never held.
    `decryptor` reads `.sync.pgp` files.
    """
    for seq, file in enumerate(delivery.files, start=1):
        yield from _file_chunks(store, file, seq, chunk_bytes or CHUNK_BYTES, decryptor)


def file_chunks(store: Store, file: DeliveryFile, seq: int,
                decryptor: Decryptor | None = None) -> Iterator[pl.DataFrame]:
    """Lines of one split file (the `seq`-th of its delivery) in chunks, as `read_chunks`:
    what one task of pass 1 reads."""
    return _file_chunks(store, file, seq, CHUNK_BYTES, decryptor)


def read_ahead(chunks: Iterator[pl.DataFrame], depth: int = 1) -> Iterator[pl.DataFrame]:
    """`chunks` produced on a thread, at most `depth` ahead of the one being consumed.

    Reading (gunzip, md5, splitting) mostly runs outside the GIL, so it overlaps the
    resolving of the previous chunk instead of leaving a core idle. The producer starts a
    chunk only once the consumer has taken the one before, so memory holds depth + 1 chunks.
    Items and the producer's exception arrive in order; closing the iterator early stops the
    producer.
    """
    slots: queue.SimpleQueue = queue.SimpleQueue()
    room = threading.Semaphore(depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            while _acquire(room, stop):
                chunk = next(chunks, done)
                slots.put((chunk, None))
                if chunk is done:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, in order
            slots.put((done, exc))

    worker = threading.Thread(target=produce, name="read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            item, exc = slots.get()
            room.release()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()
        worker.join()


def _acquire(room: threading.Semaphore, stop: threading.Event) -> bool:
    """Wait for room unless the consumer has gone; False when it has."""
    while not stop.is_set():
        if room.acquire(timeout=0.1):
            return True
    return False


def _file_chunks(store: Store, file: DeliveryFile, seq: int, chunk_bytes: int,
                 decryptor: Decryptor | None = None) -> Iterator[pl.DataFrame]:
    base = posixpath.basename(file.name.path)
    stored = _Counted()
    lines, bad_utf8 = 0, False
    pending = _Pending()
    piece_bytes = min(_PIECE, chunk_bytes)
    with store.open_read(file.name.path) as stream:
        for piece in _content(stored.reader(stream), file, base, decryptor, piece_bytes):
            pending.add(piece)
            if pending.full(chunk_bytes):
                frame, bad = _frame(pending.buffer, pending.line_start, seq, lines)
                pending.take()
                lines, bad_utf8 = lines + frame.height, bad_utf8 or bad
                yield frame
    if pending.buffer:
        pending.end()
        frame, bad = _frame(pending.buffer, len(pending.buffer), seq, lines)
        lines, bad_utf8 = lines + frame.height, bad_utf8 or bad
        yield frame
    _verify(file, base, stored.size, stored.md5.hexdigest(), lines)
    if bad_utf8:
        log.warning("file=%s bad_utf8_lines_present", base)


def _split(block: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(block), size):
        yield block[start:start + size]


class _Pending:
    """Text not yet chunked: whole lines, then the start of the line still arriving.

    A line that grows past MAX_LINE_BYTES (+4) is cut at a character boundary, still longer
    than the limit so the parser rejects it, and the rest of it is dropped until its line end.
    """

    _KEEP = MAX_LINE_BYTES + 4  # a UTF-8 character has at most 4 bytes

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.line_start = 0  # where the unfinished last line starts
        self.newlines = 0
        self.skipping = False  # inside the dropped rest of an over-long line

    def add(self, piece: bytes) -> None:
        if self.skipping:
            end = piece.find(b"\n")
            if end < 0:
                return
            piece, self.skipping = piece[end + 1:], False
        before = len(self.buffer)
        self.buffer += piece
        last = self.buffer.rfind(b"\n", before)
        if last >= 0:
            self.newlines += piece.count(b"\n")
            self.line_start = last + 1
        if len(self.buffer) - self.line_start > self._KEEP:
            self._cut()

    def _cut(self) -> None:
        end = self.line_start + self._KEEP
        # Not inside a character; bytes that are no UTF-8 at all are cut anywhere past the
        # limit (never into the lines before: the line must stay over the limit).
        while end > self.line_start + MAX_LINE_BYTES + 1 and self.buffer[end] & 0xC0 == 0x80:
            end -= 1
        del self.buffer[end:]
        self.buffer += b"\n"
        self.newlines += 1
        self.line_start = len(self.buffer)
        self.skipping = True

    def full(self, chunk_bytes: int) -> bool:
        return self.line_start > 0 and (len(self.buffer) >= chunk_bytes
                                        or self.newlines >= CHUNK_LINES)

    def take(self) -> None:
        """Drop the whole lines just turned into a frame."""
        del self.buffer[:self.line_start]
        self.line_start, self.newlines = 0, 0

    def end(self) -> None:
        """The file ended: its last line needs no line end."""
        if not self.buffer.endswith(b"\n"):
            self.buffer += b"\n"


class _Counted:
    """Size and md5 of the stored bytes (for PGP files: of the encrypted bytes, as in `.info`)."""

    def __init__(self) -> None:
        self.size = 0
        self.md5 = hashlib.md5()  # noqa: S324 - AAM's control files use md5

    def reader(self, stream: BinaryIO) -> Callable[[int], bytes]:
        def read(n: int) -> bytes:
            block = stream.read(n)
            self.size += len(block)
            self.md5.update(block)
            return block
        return read


def _content(read: Callable[[int], bytes], file: DeliveryFile, base: str,
             decryptor: Decryptor | None, piece_bytes: int) -> Iterator[bytes]:
    """A file's text in pieces: decrypted from a pipe when PGP (never written to disk), then
    gunzip'd when gzip (by name; for PGP files by the plaintext's magic bytes)."""
    if not file.name.pgp:
        yield from _pieces(iter(lambda: read(_BLOCK), b""), base, file.name.gzip, piece_bytes)
        return
    if decryptor is None:
        raise DeliveryFailed(f"{base}: PGP-encrypted, but the feed has no pgp_secret_key_file")
    with decryptor.open(read, base) as plain:
        try:
            yield from _pieces(iter(lambda: plain.read(_BLOCK), b""), base, None, piece_bytes)
        except DeliveryFailed:
            plain.check()  # bad PGP data explains a bad gzip: say that first
            raise
        plain.check()


def _pieces(blocks: Iterator[bytes], base: str, gz: bool | None,
            size: int) -> Iterator[bytes]:
    """Blocks in pieces of at most `size` bytes, gunzip'd when `gz` (None: when the first
    bytes are gzip's magic)."""
    unzip = None
    for block in blocks:
        if gz is None:
            gz = block.startswith(_GZIP_MAGIC)
        if gz and unzip is None:
            unzip = _Gunzip(base)
        yield from unzip.feed(block, size) if unzip else _split(block, size)
    if unzip:
        unzip.finish()


def _verify(file: DeliveryFile, base: str, size: int, md5: str, lines: int) -> None:
    expected = file.expected
    if size != file.size:
        raise IncompleteDelivery(f"{base}: size changed while reading")
    if expected and expected.md5 and md5 != expected.md5:
        raise DeliveryFailed(f"{base}: md5 does not match the control file")
    if expected and expected.line_count is not None and lines != expected.line_count:
        raise DeliveryFailed(f"{base}: {lines} lines, control file says {expected.line_count}")


def _frame(buffer: bytearray, cut: int, seq: int,
           first_line: int) -> tuple[pl.DataFrame, bool]:
    """The newline-terminated bytes `buffer[:cut]` -> (file_seq, line_no, line).

    One copy out of the buffer, then Arrow: no Python list of lines or big str (a 32 MB chunk
    used to pass through six copies, which showed in peak RSS).
    """
    with memoryview(buffer) as view:
        raw = bytes(view[: cut - 1])  # without the last line's newline
    text, bad = _decode(raw)
    del raw
    lines = text.str.split("\n").explode()
    frame = pl.DataFrame(lines).with_columns(
        file_seq=pl.lit(seq, dtype=pl.UInt32),
        line_no=pl.int_range(first_line + 1, first_line + pl.len() + 1, dtype=pl.UInt32),
    ).select("file_seq", "line_no", "line")
    return frame, bad


# isal's stubs declare its error as an instance of Exception; it is the class.
_GZIP_ERROR = cast("type[Exception]", isal_zlib.error)


class _Gunzip:
    """Incremental gzip that accepts multi-member files and spots truncation.

    ISA-L's inflate (the zlib API, same results) takes less than half zlib's time."""

    def __init__(self, base: str) -> None:
        self.base = base
        self._z = isal_zlib.decompressobj(wbits=31)

    def feed(self, block: bytes, size: int) -> Iterator[bytes]:
        """The text of `block` in pieces of at most `size` bytes."""
        try:
            for start in range(0, len(block), _INFLATE_IN):
                yield from self._inflate(block[start:start + _INFLATE_IN], size)
        except _GZIP_ERROR as exc:
            raise DeliveryFailed(f"{self.base}: corrupt gzip ({exc})") from None

    def _inflate(self, data: bytes, size: int) -> Iterator[bytes]:
        while True:
            out = self._z.decompress(data, size)
            if out:
                yield out
            data = self._z.unconsumed_tail
            if self._z.eof:  # a member ends: what follows starts the next one
                if not self._z.unused_data:
                    return
                data = self._z.unused_data
                self._z = isal_zlib.decompressobj(wbits=31)
            elif not data and len(out) < size:
                return

    def finish(self) -> None:
        if not self._z.eof:
            raise DeliveryFailed(f"{self.base}: truncated gzip (stream ends early)")


def _decode(data: bytes) -> tuple[pl.Series, bool]:
    """Strict UTF-8 (checked by Arrow); bad bytes become U+FFFD so the line is flagged, not lost."""
    try:
        return pl.Series("line", [data], dtype=pl.Binary).cast(pl.String), False
    except pl.exceptions.ComputeError:
        return pl.Series("line", [data.decode("utf-8", errors="replace")]), True


def _root_timestamp(root: str) -> int | None:
    name = parse_outbound_name(root + ".sync")
    return name.timestamp_ms if name else None


def entry_md5s(delivery: Delivery) -> dict[str, str]:
    """Identity of a delivery's files for the ledger: md5 from the control file, else size."""
    out = {}
    for f in delivery.files:
        base = posixpath.basename(f.name.path)
        out[base] = (f.expected.md5 if f.expected and f.expected.md5 else f"size:{f.size}")
    return out


__all__ = ["Delivery", "DeliveryFile", "Entry", "find_deliveries", "file_chunks", "read_ahead",
           "read_chunks", "entry_md5s"]
