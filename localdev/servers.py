"""Local S3 (moto) and SFTP (OpenSSH) servers on 127.0.0.1, for the demo command and the tests."""

from __future__ import annotations

import logging
import os
import pwd
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
SSHD = "/usr/sbin/sshd"
START_TIMEOUT = 10.0


@contextmanager
def moto_s3_server() -> Iterator[str]:
    """Run moto's S3 server on a free port of 127.0.0.1; yield its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@dataclass
class SftpServer:
    """A running SFTP server whose files live under root_dir (absolute paths, no chroot)."""

    host: str
    port: int
    user: str
    identity_file: str  # client private key accepted by the server
    known_hosts: str  # holds the server's host key as "[host]:port ssh-ed25519 ..."
    root_dir: str
    kind: str  # "openssh" or "paramiko" (fallback when sshd is missing)
    _backend: _OpenSshProcess | _ParamikoServer = field(repr=False)

    @property
    def url(self) -> str:
        return f"sftp://{self.user}@{self.host}:{self.port}{self.root_dir}"

    def stop(self) -> None:
        """Stop the server and drop open connections (the port then refuses connections)."""
        self._backend.stop()

    def start(self) -> None:
        """Start it again on the same port with the same keys."""
        self._backend.start()


@contextmanager
def sftp_server(root_dir: str | os.PathLike[str]) -> Iterator[SftpServer]:
    """Run an SFTP server on a free port of 127.0.0.1 with fresh host and client keys."""
    root = str(Path(root_dir).resolve())
    Path(root).mkdir(parents=True, exist_ok=True)
    user = pwd.getpwuid(os.getuid()).pw_name
    with tempfile.TemporaryDirectory(prefix="pipeline-sftp-") as tmp:
        host_key, host_pub = _new_key(Path(tmp, "host_key"))
        client_key, client_pub = _new_key(Path(tmp, "client_key"))
        port = _free_port()
        backend: _OpenSshProcess | _ParamikoServer
        if os.access(SSHD, os.X_OK):
            Path(tmp, "authorized_keys").write_text(client_pub + "\n")
            backend, kind = _OpenSshProcess(Path(tmp), port, user, host_key), "openssh"
        else:
            log.warning("%s not found: using an in-process paramiko SFTP server instead", SSHD)
            backend, kind = _ParamikoServer(port, user, host_key, client_pub), "paramiko"
        known_hosts = Path(tmp, "known_hosts")
        known_hosts.write_text(f"[{HOST}]:{port} {host_pub}\n")
        keys = str(client_key), str(known_hosts)
        handle = SftpServer(HOST, port, user, *keys, root, kind, backend)
        backend.start()
        try:
            yield handle
        finally:
            backend.stop()


def _new_key(path: Path) -> tuple[Path, str]:
    """Write a fresh ed25519 private key (OpenSSH format, 0600); return it and its public line."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    path.touch(mode=0o600)
    path.write_bytes(private)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return path, public.decode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, alive: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and alive():
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class _OpenSshProcess:
    """`sshd -D -e` as a child process, serving only internal-sftp."""

    def __init__(self, tmp: Path, port: int, user: str, host_key: Path) -> None:
        self._port = port
        self._config = tmp / "sshd_config"
        self._log = tmp / "sshd.log"
        self._config.write_text(
            "\n".join(
                [
                    f"ListenAddress {HOST}",
                    f"Port {port}",
                    f"HostKey {host_key}",
                    f"PidFile {tmp / 'sshd.pid'}",
                    f"AuthorizedKeysFile {tmp / 'authorized_keys'}",
                    f"AllowUsers {user}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "StrictModes no",
                    "UsePAM no",
                    "AllowTcpForwarding no",
                    "X11Forwarding no",
                    "Subsystem sftp internal-sftp",
                    "ForceCommand internal-sftp",
                    "",
                ]
            )
        )
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        _ensure_privsep_dir(self._config)
        with self._log.open("ab") as log_file:
            self._proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self._config)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )
        proc = self._proc
        if not _wait_for_port(self._port, lambda: proc.poll() is None):
            self.stop()
            tail = self._log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"sshd did not start on port {self._port}: {' | '.join(tail)}")

    def stop(self) -> None:
        if self._proc is None:
            return
        # Each connection is served by a forked sshd in its own session: end those too,
        # so that stop() looks like a server going down to connected clients. The listener
        # goes last, once it has reaped them (else they linger as zombies in containers).
        _terminate(_descendants(self._proc.pid))
        deadline = time.monotonic() + 2
        while _descendants(self._proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        _terminate([self._proc.pid])
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


def _ensure_privsep_dir(config: Path) -> None:
    """sshd run as root needs its privilege separation folder (/run/sshd), absent in containers."""
    check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, text=True)
    marker = "Missing privilege separation directory: "
    if check.returncode != 0 and marker in check.stderr:
        folder = check.stderr.split(marker, 1)[1].split()[0]
        log.info("creating sshd privilege separation folder %s", folder)
        os.makedirs(folder, mode=0o755, exist_ok=True)


def _terminate(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _descendants(pid: int) -> list[int]:
    """Child processes of pid, recursively (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class _ParamikoServer:
    """Fallback: an in-process SFTP server over the local file system."""

    def __init__(self, port: int, user: str, host_key: Path, client_pub: str) -> None:
        self._port, self._user = port, user
        self._host_key = paramiko.Ed25519Key.from_private_key_file(str(host_key))
        self._client_key = client_pub.split()[1]
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._transports: list[paramiko.Transport] = []

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self._port))
        listener.listen(16)
        listener.settimeout(0.1)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, args=(listener,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for transport in self._transports:
            transport.close()
        self._transports.clear()

    def _serve(self, listener: socket.socket) -> None:
        with listener:
            while not self._stopping.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                conn.settimeout(None)
                transport = paramiko.Transport(conn)
                transport.add_server_key(self._host_key)
                transport.set_subsystem_handler("sftp", paramiko.SFTPServer, _LocalSftp)
                # With an event, negotiation goes on in the transport's thread, not this one.
                auth = _Auth(self._user, self._client_key)
                transport.start_server(event=threading.Event(), server=auth)
                self._transports.append(transport)


class _Auth(paramiko.ServerInterface):
    def __init__(self, user: str, client_key: str) -> None:
        self._user, self._client_key = user, client_key

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if username == self._user and key.get_base64() == self._client_key:
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


def _sftp_errors(func):
    def wrapper(*args):
        try:
            return func(*args)
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno)

    return wrapper


class _Handle(paramiko.SFTPHandle):
    def stat(self):
        return paramiko.SFTPAttributes.from_stat(os.fstat(self.readfile.fileno()))


class _LocalSftp(paramiko.SFTPServerInterface):
    """SFTP over the local file system; paths are absolute, as with OpenSSH without chroot."""

    @_sftp_errors
    def list_folder(self, path):
        return [
            paramiko.SFTPAttributes.from_stat(os.stat(os.path.join(path, name)), name)
            for name in os.listdir(path)
        ]

    @_sftp_errors
    def stat(self, path):
        return paramiko.SFTPAttributes.from_stat(os.stat(path))

    lstat = stat

    @_sftp_errors
    def open(self, path, flags, attr):
        fd = os.open(path, flags | getattr(os, "O_BINARY", 0), 0o666)
        if flags & os.O_WRONLY:
            mode = "ab" if flags & os.O_APPEND else "wb"
        elif flags & os.O_RDWR:
            mode = "a+b" if flags & os.O_APPEND else "r+b"
        else:
            mode = "rb"
        handle = _Handle(flags)
        handle.readfile = handle.writefile = os.fdopen(fd, mode)
        return handle

    @_sftp_errors
    def remove(self, path):
        os.remove(path)
        return paramiko.SFTP_OK

    @_sftp_errors
    def rename(self, oldpath, newpath):
        if os.path.exists(newpath):  # SFTP rename never replaces, like OpenSSH's
            return paramiko.SFTP_FAILURE
        os.rename(oldpath, newpath)
        return paramiko.SFTP_OK

    @_sftp_errors
    def posix_rename(self, oldpath, newpath):
        os.replace(oldpath, newpath)
        return paramiko.SFTP_OK

    @_sftp_errors
    def mkdir(self, path, attr):
        os.mkdir(path)
        return paramiko.SFTP_OK

    @_sftp_errors
    def rmdir(self, path):
        os.rmdir(path)
        return paramiko.SFTP_OK

    def chattr(self, path, attr):
        return paramiko.SFTP_OK
