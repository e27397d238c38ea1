"""Snapshot download: whole files only, and only inside the run's work folder."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, cast

import boto3
import pytest

from pipeline.config import Location
from pipeline.errors import StoreUnavailable
from pipeline.snapshot import Snapshots
from pipeline.stores import StoreOptions
from pipeline.stores.s3 import S3Store
from tests.factories import write_snapshot

PROFILES = [{"profile_id": f"P{i}", "email": f"u{i}@example.com"} for i in range(50)]


def upload_snapshot(tmp_path: Path, bucket: str, key: str, rows: list[dict]) -> bytes:
    data = write_snapshot(tmp_path / "upload" / "s.parquet", rows).read_bytes()
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data)
    return data


class _Breaks(io.RawIOBase):
    """A download that fails after `after` bytes, as a dropped connection does."""

    def __init__(self, inner: BinaryIO, after: int) -> None:
        self.inner, self.left = inner, after

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        if self.left <= 0:
            raise StoreUnavailable("s3://test: connection reset (injected)")
        chunk = self.inner.read(min(len(buffer), self.left))
        self.left -= len(chunk)
        buffer[: len(chunk)] = chunk
        return len(chunk)


class FlakyS3Store(S3Store):
    """The real S3 store whose first download of each object breaks mid-way."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.broken: set[str] = set()

    def open_read(self, path: str) -> BinaryIO:
        stream = super().open_read(path)
        if path in self.broken:
            return stream
        self.broken.add(path)
        return cast(BinaryIO, io.BufferedReader(_Breaks(stream, 100), buffer_size=16))

    def read_bytes(self, path: str) -> bytes:
        with self.open_read(path) as stream:
            return stream.read()


def test_broken_download_leaves_no_file_and_the_retry_reads_it_whole(
    make_bucket: Callable[[], str], tmp_path: Path
) -> None:
    bucket = make_bucket()
    upload_snapshot(tmp_path, bucket, "profiles/part-0.parquet", PROFILES)
    work = tmp_path / "work"
    snapshots = Snapshots(Location(f"s3://{bucket}/profiles/"), None, str(work))
    snapshots._store.close()
    snapshots._store = FlakyS3Store(f"s3://{bucket}/profiles/")
    with pytest.raises(StoreUnavailable):
        snapshots.size(None)
    assert [p for p in work.rglob("*") if p.is_file()] == []  # nothing half-written kept
    assert snapshots.size(None) == 50  # the retry downloads again, whole
    snapshots.close()


def test_snapshot_keys_with_dot_dot_stay_out_of_the_host(
    make_bucket: Callable[[], str], tmp_path: Path
) -> None:
    """`s3://crm/profiles/../../x.parquet` is a key, not a path: it is skipped, and every
    downloaded file sits in the work folder under a name the pipeline chose."""
    bucket = make_bucket()
    upload_snapshot(tmp_path, bucket, "profiles/good.parquet", PROFILES)
    upload_snapshot(tmp_path, bucket, "profiles/../../x.parquet", PROFILES[:3])
    work = tmp_path / "a" / "work"
    snapshots = Snapshots(Location(f"s3://{bucket}/profiles/"), None, str(work))
    assert snapshots.size(None) == 50  # the good file only
    snapshots.close()
    outside = [p for p in tmp_path.rglob("*")
               if p.is_file() and work not in p.parents and "upload" not in p.parts]
    assert outside == []
    names = [p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file()]
    assert len(names) == 1 and names[0].startswith("snapshot/") and "good" not in names[0]


def test_sftp_snapshot_is_downloaded_not_read_at_the_remote_path_on_this_host(
    sftp_server, tmp_path: Path
) -> None:
    """The remote path of an SFTP file means nothing on this host (here it happens to exist,
    as the test server serves a local folder): the file is fetched into the work folder."""
    folder = Path(sftp_server.root_dir) / f"snap-{tmp_path.name}"
    write_snapshot(folder / "part.parquet", PROFILES)
    options = StoreOptions(known_hosts=sftp_server.known_hosts,
                           identity_file=sftp_server.identity_file)
    work = tmp_path / "work"
    snapshots = Snapshots(Location(f"{sftp_server.url}/snap-{tmp_path.name}", options), None,
                          str(work))
    assert snapshots.size(None) == 50
    snapshots.close()
    (fetched,) = [p for p in work.rglob("*.parquet")]
    assert fetched.read_bytes() == (folder / "part.parquet").read_bytes()
