"""One store contract, run against local disk, S3 (moto server) and SFTP (OpenSSH sshd)."""

import errno
import gzip
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from localdev import servers
from pipeline.errors import ConfigError, FatalError, StoreUnavailable
from pipeline.stores import Entry, Store, StoreOptions, open_store
from pipeline.stores.sftp import SftpStore

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
    # Local and SFTP roots are folders of this machine (the SFTP server runs here).
    root = Path(store.root)  # type: ignore[attr-defined]  # not part of the Store protocol
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

    def test_create_exclusive_creates_once(self, store: Store) -> None:
        assert store.create_exclusive("locks/a.json", b"first") is True
        assert store.create_exclusive("locks/a.json", b"second") is False
        assert store.read_bytes("locks/a.json") == b"first"
        assert [n.rsplit("/", 1)[-1] for n in raw_names(store)] == ["a.json"]  # no temp file
        store.delete("locks/a.json")
        assert store.create_exclusive("locks/a.json", b"third") is True
        assert store.read_bytes("locks/a.json") == b"third"

    def test_create_exclusive_race_has_one_winner(self, store: Store) -> None:
        if "://" in store.url:  # SFTP: one session per thread; moto: checks then writes
            pytest.skip("raced in tests/test_lock.py (separate clients, S3 served in turn)")
        import threading
        for trial in range(5):
            barrier, results = threading.Barrier(2), []

            def create(data: bytes, path: str, barrier=barrier, results=results) -> None:
                barrier.wait()
                results.append(store.create_exclusive(path, data))

            threads = [threading.Thread(target=create, args=(d, f"race/{trial}"))
                       for d in (b"x", b"y")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(results) == [False, True]

    def test_put_file(self, store: Store, tmp_path: Path) -> None:
        local = tmp_path / "local.csv"
        local.write_bytes(BINARY)
        store.put_file(str(local), "deep/er/file.csv")
        store.put_file(str(local), "deep/er/file.csv")  # replaces
        assert store.read_bytes("deep/er/file.csv") == BINARY
        assert [n.rsplit("/", 1)[-1] for n in raw_names(store)] == ["file.csv"]

    def test_put_file_consumed(self, store: Store, tmp_path: Path) -> None:
        """A spool the caller is done with: published whole, replacing; a local store moves
        it (no copy), the others upload it."""
        for n, data in enumerate((BINARY, b"second")):
            local = tmp_path / f"spool-{n}"
            local.write_bytes(data)
            store.put_file(str(local), "out/file.gz", consume=True)
            assert store.read_bytes("out/file.gz") == data
            assert local.exists() is (store.url.startswith(("s3://", "sftp://")))
        assert [n.rsplit("/", 1)[-1] for n in raw_names(store)] == ["file.gz"]

    def test_missing_file_is_file_not_found(self, store: Store) -> None:
        for call in (
            lambda: store.read_bytes("nope"),
            lambda: store.open_read("nope"),
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


    @pytest.mark.parametrize("path", ["../x", "a/../../x", "a/./b", "a//b", "a/.."])
    def test_paths_that_are_not_plain_are_refused(self, store: Store, path: str) -> None:
        """A path that could leave the root (on a folder-based store) never reaches the
        backend, whichever store: callers get one behaviour."""
        store.write_bytes("a.txt", b"a")
        for call in (lambda: store.write_bytes(path, b"x"), lambda: store.read_bytes(path),
                     lambda: store.exists(path), lambda: store.delete(path),
                     lambda: store.open_read(path)):
            with pytest.raises(FatalError, match="not a plain relative path"):
                call()
        assert len(raw_names(store)) == 1  # a.txt only

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
    assert store.list() == [Entry("d/x.sync", 5)]
    store.close()


def test_local_store_accepts_file_urls(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    store.write_bytes("a.txt", b"x")
    assert (tmp_path / "a.txt").read_bytes() == b"x"
    assert store.list() == [Entry("a.txt", 1)]


# Errors are mapped at the boundary to one-line pipeline errors.


def test_s3_unreachable_endpoint_is_store_unavailable(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # bounded retries, kept short here
    store = open_store("s3://bucket/prefix")
    with pytest.raises(StoreUnavailable) as info:
        store.list()
    assert str(info.value).startswith("s3://bucket/prefix/: S3 endpoint unreachable")
    assert "\n" not in str(info.value)
    assert info.value.__cause__ is not None


def test_s3_missing_bucket_is_fatal(s3_endpoint: str) -> None:
    store = open_store("s3://no-such-bucket/x")
    with pytest.raises(FatalError, match="bucket does not exist") as info:
        store.write_bytes("a.txt", b"x")
    assert "\n" not in str(info.value)


def test_s3_server_side_encryption(make_bucket: Callable[[], str], tmp_path: Path) -> None:
    bucket = make_bucket()
    store = open_store(f"s3://{bucket}/p", StoreOptions(sse="AES256"))
    store.write_bytes("a", b"x")
    (tmp_path / "b").write_bytes(b"y")
    store.put_file(str(tmp_path / "b"), "b")
    client = boto3.client("s3")
    for key in ("p/a", "p/b"):
        assert client.head_object(Bucket=bucket, Key=key)["ServerSideEncryption"] == "AES256"


def test_local_consumed_file_from_another_file_system_is_copied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rename(2) cannot cross file systems (EXDEV): the spool is then copied, atomically."""
    store = open_store(str(tmp_path / "root"))
    local = tmp_path / "spool"
    local.write_bytes(BINARY)
    real = os.rename

    def cross_device(src: object, dst: object) -> None:
        if str(src) == str(local):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", cross_device)
    store.put_file(str(local), "a/b.csv", consume=True)
    assert store.read_bytes("a/b.csv") == BINARY
    assert [p.name for p in (tmp_path / "root" / "a").iterdir()] == ["b.csv"]
    assert oct((tmp_path / "root" / "a" / "b.csv").stat().st_mode & 0o777) == oct(
        local.stat().st_mode & 0o777)


def test_sftp_fixture_is_openssh(sftp_server: servers.SftpServer) -> None:
    with socket.create_connection((sftp_server.host, sftp_server.port)) as sock:
        transport = paramiko.Transport(sock)
        transport.start_client(timeout=10)
        try:
            assert "OpenSSH" in transport.remote_version
        finally:
            transport.close()
    assert sftp_server.kind == "openssh"


def test_sftp_unknown_host_is_fatal(sftp_server: servers.SftpServer, tmp_path: Path) -> None:
    line = Path(sftp_server.known_hosts).read_text()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(line.replace(f"]:{sftp_server.port} ", "]:2222 "))  # another host
    options = StoreOptions(known_hosts=str(known_hosts), identity_file=sftp_server.identity_file)
    with pytest.raises(FatalError) as info:
        open_store(sftp_server.url, options)
    address = f"{sftp_server.host}:{sftp_server.port}"
    assert str(info.value) == f"host key for {address} not in known_hosts"


def test_sftp_changed_host_key_is_fatal(sftp_server: servers.SftpServer, tmp_path: Path) -> None:
    other = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{sftp_server.host}]:{sftp_server.port} {other.decode()}\n")
    options = StoreOptions(known_hosts=str(known_hosts), identity_file=sftp_server.identity_file)
    with pytest.raises(FatalError, match="does not match known_hosts"):
        open_store(sftp_server.url, options)


def test_sftp_server_down_is_store_unavailable(sftp_server: servers.SftpServer) -> None:
    url = f"sftp://{sftp_server.user}@127.0.0.1:{free_port()}/data"
    with pytest.raises(StoreUnavailable) as info:
        open_store(url, sftp_options(sftp_server))
    assert "\n" not in str(info.value)


def test_sftp_server_stopped_mid_run(tmp_path: Path) -> None:
    with servers.sftp_server(tmp_path) as server:
        store = open_store(f"{server.url}/out", sftp_options(server))
        store.write_bytes("a", b"1")
        server.stop()
        with pytest.raises(StoreUnavailable) as info:
            store.write_bytes("b", b"2")
        assert "\n" not in str(info.value)
        with pytest.raises(StoreUnavailable):
            store.list()
        server.start()
        store.write_bytes("b", b"2")  # the store reconnects
        assert [e.path for e in store.list()] == ["a", "b"]
        store.close()


def test_sftp_without_posix_rename_falls_back_and_says_so(
    sftp_server: servers.SftpServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = SftpStore(f"{sftp_server.url}/{uuid.uuid4().hex}", sftp_options(sftp_server))

    def unsupported(src: str, dst: str) -> None:
        raise OSError("Operation unsupported")

    store._sftp_client.posix_rename = unsupported  # a server without the extension
    with caplog.at_level(logging.WARNING):
        store.write_bytes("a", b"old")
        store.write_bytes("a", b"new")
    assert store.read_bytes("a") == b"new"
    assert "lacks the posix-rename extension" in caplog.text
    assert len(caplog.records) == 1  # said once per store
    store.close()


def test_paramiko_fallback_server_offers_the_same_handle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servers, "SSHD", str(tmp_path / "no-sshd"))
    with servers.sftp_server(tmp_path / "root") as server:
        assert server.kind == "paramiko"
        store = open_store(f"{server.url}/x", sftp_options(server))
        store.write_bytes("d/a", b"1")
        store.write_bytes("d/a", b"2")
        assert store.list() == [Entry("d/a", 1)]
        assert store.read_bytes("d/a") == b"2"
        server.stop()
        with pytest.raises(StoreUnavailable):
            store.exists("d/a")
        server.start()
        assert store.exists("d/a")
        store.close()


def test_sftp_bad_client_key_or_missing_files_are_refused(
    sftp_server: servers.SftpServer, tmp_path: Path
) -> None:
    other_key = tmp_path / "other_key"
    other_key.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    known = sftp_server.known_hosts
    with pytest.raises(FatalError, match="authentication failed"):
        open_store(sftp_server.url, StoreOptions(known, str(other_key)))
    with pytest.raises(ConfigError, match="identity file"):
        open_store(sftp_server.url, StoreOptions(known, str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="known_hosts"):
        open_store(sftp_server.url, StoreOptions(str(tmp_path / "missing"), str(other_key)))
    # A broken key file is the config's fault, not an unreachable server.
    for name, content in (("empty", b""), ("garbage", b"-----BEGIN OPENSSH PRIVATE KEY-----\n"
                                                      b"not base64 at all\n")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError, match=f"identity file .*{name} is not a usable "):
            open_store(sftp_server.url, StoreOptions(known, str(tmp_path / name)))


def test_s3_listing_skips_keys_that_are_not_plain_paths(
    make_bucket: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    """S3 keys are opaque strings: `feeds/../../x` is a key, but a local copy named after it
    would land outside its folder. Listings leave such keys out, saying so."""
    bucket = make_bucket()
    client = boto3.client("s3")
    for key in ["feeds/ok.txt", "feeds/../../x.parquet", "feeds/a//b.txt", "feeds/./c.txt",
                "feeds/d/.."]:
        client.put_object(Bucket=bucket, Key=key, Body=b"data")
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert "feeds/../../x.parquet" in keys  # the server kept the key as it is
    store = open_store(f"s3://{bucket}/feeds")
    with caplog.at_level(logging.WARNING):
        assert store.list() == [Entry("ok.txt", 4)]
    assert "skipped=4" in caplog.text and "not a plain relative path" in caplog.text
    store.close()


def test_local_listing_and_reads_refuse_links_leaving_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"secret")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "f.txt").write_bytes(b"other")
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "ok.txt").write_bytes(b"ok")
    (root / "sub" / "inside.txt").symlink_to(root / "ok.txt")  # stays inside: kept
    (root / "leak.sync").symlink_to(outside)
    (root / "sub" / "up.sync").symlink_to("../../secret.txt")
    (root / "dirlink").symlink_to(tmp_path / "elsewhere")
    store = open_store(str(root))
    assert store.list() == [Entry("ok.txt", 2), Entry("sub/inside.txt", 2)]
    for path in ("leak.sync", "sub/up.sync", "dirlink/f.txt"):
        with pytest.raises(FatalError, match="leaves the store"):
            store.read_bytes(path)
        with pytest.raises(FatalError, match="leaves the store"):
            store.open_read(path)
    assert store.read_bytes("sub/inside.txt") == b"ok"
