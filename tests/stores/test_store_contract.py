"""One store contract, run against local disk, S3 (moto server) and SFTP (OpenSSH sshd)."""

import gzip
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipeline import servers
from pipeline.errors import FatalError, StoreUnavailable
from pipeline.stores import Entry, Store, StoreOptions, open_store

BINARY = bytes(range(256)) * 4 + b"\r\n\x00 end"


def sftp_options(server: servers.SftpServer) -> StoreOptions:
    return StoreOptions(known_hosts=server.known_hosts, identity_file=server.identity_file)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(params=["local", "s3", "sftp"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "local":
        url, options = str(tmp_path / "root"), StoreOptions()
    elif request.param == "s3":
        url, options = f"s3://{request.getfixturevalue('make_bucket')()}/feeds/acme", StoreOptions()
    else:
        server = request.getfixturevalue("sftp_server")
        url, options = f"{server.url}/{uuid.uuid4().hex}", sftp_options(server)
    opened = open_store(url, options)
    yield opened
    opened.close()


def raw_names(store: Store) -> list[str]:
    """Every name the backend holds under the store root, temp files included."""
    if store.url.startswith("s3://"):
        bucket = store.url.removeprefix("s3://").split("/")[0]
        listing = boto3.client("s3").list_objects_v2(Bucket=bucket)
        return sorted(obj["Key"] for obj in listing.get("Contents", []))
    root = Path(getattr(store, "root"))  # local and SFTP roots are folders of this machine
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


class TestStoreContract:
    def test_list_is_recursive_sorted_and_filtered_by_prefix(self, store: Store) -> None:
        for path in ["b/2.txt", "a/sub/3.txt", "c.txt", "a/1.txt", "ab.txt"]:
            store.write_bytes(path, path.encode())
        assert store.list() == [
            Entry("a/1.txt", 7),
            Entry("a/sub/3.txt", 11),
            Entry("ab.txt", 6),
            Entry("b/2.txt", 7),
            Entry("c.txt", 5),
        ]
        assert [e.path for e in store.list("a/")] == ["a/1.txt", "a/sub/3.txt"]
        # A prefix is a string prefix, as on S3, also on folder-based stores.
        assert [e.path for e in store.list("a")] == ["a/1.txt", "a/sub/3.txt", "ab.txt"]
        assert [e.path for e in store.list("a/s")] == ["a/sub/3.txt"]
        assert store.list("missing/") == []

    def test_list_of_an_empty_store_is_empty(self, store: Store) -> None:
        assert store.list() == []

    @pytest.mark.parametrize("data", [b"", b"hello\n", BINARY], ids=["empty", "text", "binary"])
    def test_round_trip(self, store: Store, data: bytes) -> None:
        store.write_bytes("date=2024-01-01/x.sync", data)
        assert store.read_bytes("date=2024-01-01/x.sync") == data
        with store.open_read("date=2024-01-01/x.sync") as stream:
            assert stream.read(3) == data[:3]
            assert stream.read() == data[3:]

    def test_large_payload_round_trip(self, store: Store, tmp_path: Path) -> None:
        data = os.urandom(5 * 1024 * 1024)
        store.write_bytes("big.bin", data)
        assert store.read_bytes("big.bin") == data
        with store.open_read("big.bin") as stream:
            chunks = iter(lambda: stream.read(1 << 20), b"")
            assert b"".join(chunks) == data
        local = tmp_path / "upload.bin"
        local.write_bytes(data[::-1])
        store.put_file(str(local), "up/big.bin")
        assert store.read_bytes("up/big.bin") == data[::-1]
        assert store.list("up/") == [Entry("up/big.bin", len(data))]

    def test_open_read_streams_gzip(self, store: Store) -> None:
        store.write_bytes("x.sync.gz", gzip.compress(b"line 1\nline 2\n"))
        with store.open_read("x.sync.gz") as raw, gzip.open(raw) as lines:
            assert lines.readlines() == [b"line 1\n", b"line 2\n"]

    def test_write_bytes_replaces_and_leaves_no_temp_file(self, store: Store) -> None:
        store.write_bytes("out/file.csv", b"old")
        store.write_bytes("out/file.csv", b"new content")
        assert store.read_bytes("out/file.csv") == b"new content"
        assert [n.rsplit("/", 1)[-1] for n in raw_names(store)] == ["file.csv"]

    def test_put_file(self, store: Store, tmp_path: Path) -> None:
        local = tmp_path / "local.csv"
        local.write_bytes(BINARY)
        store.put_file(str(local), "deep/er/file.csv")
        store.put_file(str(local), "deep/er/file.csv")  # replaces
        assert store.read_bytes("deep/er/file.csv") == BINARY
        assert [n.rsplit("/", 1)[-1] for n in raw_names(store)] == ["file.csv"]

    def test_rename_replaces_destination(self, store: Store) -> None:
        store.write_bytes("tmp/a", b"new")
        store.write_bytes("final/b", b"old")
        store.rename("tmp/a", "final/b")
        assert store.read_bytes("final/b") == b"new"
        assert not store.exists("tmp/a")
        store.rename("final/b", "other/folder/c")
        assert [e.path for e in store.list()] == ["other/folder/c"]

    def test_missing_file_is_file_not_found(self, store: Store) -> None:
        for call in (
            lambda: store.read_bytes("nope"),
            lambda: store.open_read("nope"),
            lambda: store.rename("nope", "dst"),
        ):
            with pytest.raises(FileNotFoundError) as info:
                call()
            assert "\n" not in str(info.value)

    def test_delete_and_exists(self, store: Store) -> None:
        store.write_bytes("a/b.txt", b"x")
        assert store.exists("a/b.txt")
        assert not store.exists("a")  # a folder (or S3 common prefix) is not a file
        assert not store.exists("a/c.txt")
        store.delete("a/b.txt")
        store.delete("a/b.txt")  # missing is fine
        assert not store.exists("a/b.txt")
        assert store.list() == []


# Temp files: local and SFTP stores write them beside the target; S3 has none.


@pytest.mark.parametrize("backend", ["local", "sftp"])
def test_list_skips_temp_files(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "local":
        root, url, options = tmp_path, str(tmp_path), StoreOptions()
    else:
        server = request.getfixturevalue("sftp_server")
        root = Path(server.root_dir, uuid.uuid4().hex)
        url, options = f"{server.url}/{root.name}", sftp_options(server)
    (root / "d").mkdir(parents=True)
    (root / "d" / "x.sync.part").write_bytes(b"partial")
    (root / "d" / "x.sync").write_bytes(b"whole")
    (root / "d" / ".hidden").write_bytes(b"temp")
    store = open_store(url, options)
    expected = [Entry("d/x.sync", 5)] if backend == "sftp" else [Entry("d/x.sync", 5)]
    assert store.list() == expected
    store.close()


def test_local_store_accepts_file_urls(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    store.write_bytes("a.txt", b"x")
    assert (tmp_path / "a.txt").read_bytes() == b"x"
    assert store.list() == [Entry("a.txt", 1)]
