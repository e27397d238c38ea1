"""OpenPGP through the system GnuPG (`gpg`): streaming decryption with signature checks, and
encryption of published files.

gpg runs as a subprocess on pipes: the encrypted bytes go to its stdin from a thread, the
plaintext comes back on its stdout in blocks, so no plaintext file is written and memory stays
bounded whatever the file size. Verdicts come from gpg's machine-readable status lines, never
from its human messages, and errors carry fixed reasons only (no key IDs, user IDs or keys).
Keys live in a private GnuPG home per feed or destination set, created for one run (0700) and
removed with it, so the user's own keyring is never read or changed.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import ConfigError, DeliveryFailed, FatalError

log = logging.getLogger(__name__)
GPG = "gpg"
BLOCK = 1 << 20
_STATUS = "[GNUPG:] "
_MAX_STATUS_LINES = 2000  # a message with many packets must not grow memory without bound
# Unix sockets (gpg-agent's live in the home) allow ~107 bytes of path.
_MAX_HOME = 80
_PASSPHRASE_ERRORS = {11, 177}  # libgpg-error: bad passphrase, no passphrase given
# Classic integrity-protected packets (SEIPD v1 + MDC) that GnuPG 2.2 reads; compression
# stays on (Adobe: "PGP encryption includes compression"), at zlib's fastest level.
_ENCRYPT = ("--cipher-algo", "AES256", "--compress-level", "1", "--trust-model", "always")


@dataclass(frozen=True)
class Decryptor:
    """What a feed decrypts with: its keyring, passphrase and required signers."""

    keyring: Keyring
    passphrase: str | None
    signers: frozenset[str]  # primary fingerprints; empty: no signature required

    @contextmanager
    def open(self, read: Callable[[int], bytes], name: str) -> Iterator[Decryption]:
        """Plaintext of the message that `read` yields, readable in blocks.

        The verdict (integrity, key, signature) is known only at the end of the message: the
        caller reads the plaintext to its end, then calls `check()`, and must not publish
        anything read before that.
        """
        with Decryption(self, read, name) as plain:
            yield plain


@dataclass(frozen=True)
class Encryptor:
    """What a destination encrypts to: public keys in a keyring."""

    keyring: Keyring
    recipients: tuple[str, ...]  # fingerprints

    def seal(self, data: bytes | Path, dst: Path) -> None:
        """Encrypt a local file or bytes into `dst` (streamed through gpg)."""
        self.keyring.encrypt(data, dst, self.recipients)

    @property
    def scratch(self) -> Path:
        """Where encrypted copies may wait for upload (the run's work folder)."""
        return self.keyring.home.parent


class RunKeys:
    """Every configured key, imported once per run into private homes under `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.feeds: dict[str, Decryptor] = {}
        self.destinations: dict[str, Encryptor] = {}
        self._rings: list[Keyring] = []

    @classmethod
    def load(cls, config: Config, folder: Path) -> RunKeys:
        """Import the keys; a key file that holds no usable key is a ConfigError naming it."""
        keys = cls(folder)
        try:
            keys._load(config)
        except BaseException:
            keys.close()
            raise
        return keys

    def _load(self, config: Config) -> None:
        for i, feed in enumerate(config.feeds):
            if feed.pgp_secret_key_file is None:
                continue
            where = f"feeds.{feed.name}"
            ring = self._ring(f"feed{i}", f"{where}.pgp_secret_key_file")
            ring.import_key(feed.pgp_secret_key_file, f"{where}.pgp_secret_key_file",
                            secret=True)
            signers = ring.import_key(feed.pgp_signer_key_file,
                                      f"{where}.pgp_signer_key_file") \
                if feed.pgp_signer_key_file else []
            self.feeds[feed.name] = Decryptor(ring, feed.pgp_passphrase, frozenset(signers))
        dests = [d for d in config.destinations if d.pgp_recipient_key_file]
        if dests:
            where = f"destinations.{dests[0].name}.pgp_recipient_key_file"
            ring = self._ring("destinations", where)
        for dest in dests:
            where = f"destinations.{dest.name}.pgp_recipient_key_file"
            assert dest.pgp_recipient_key_file is not None
            found = ring.import_key(dest.pgp_recipient_key_file, where)
            usable = tuple(f for f in found if ring.can_encrypt(f))
            if not usable:
                raise ConfigError(f"{where}: {dest.pgp_recipient_key_file} holds no key "
                                  "usable for encryption (expired, revoked or sign-only)")
            self.destinations[dest.name] = Encryptor(ring, usable)

    def _ring(self, name: str, where: str) -> Keyring:
        if not gpg_available():
            raise ConfigError(f"{where}: needs GnuPG (`{GPG}`) on the PATH")
        ring = Keyring(self.folder, name)
        self._rings.append(ring)
        return ring

    def close(self) -> None:
        for ring in self._rings:
            ring.close()
        self._rings.clear()


class Keyring:
    """A private GnuPG home holding the keys imported into it for one run."""

    def __init__(self, parent: Path, name: str) -> None:
        parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        home = parent / name
        if len(str(home)) > _MAX_HOME:  # agent sockets would not fit: a short temp home
            home = Path(tempfile.mkdtemp(prefix="pipeline-gpg-"))
        home.mkdir(mode=0o700, exist_ok=True)
        os.chmod(home, 0o700)
        # Passphrases are not cached: each decryption proves it with the configured one.
        (home / "gpg-agent.conf").write_text("default-cache-ttl 0\nmax-cache-ttl 0\n")
        self.home = home

    def run(self, args: list[str], input: bytes | None = None
            ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([GPG, *self.base_args(), *args], input=input,
                              capture_output=True, check=False)

    def base_args(self) -> list[str]:
        return ["--homedir", str(self.home), "--batch", "--no-tty",
                "--no-auto-key-retrieve", "--no-auto-key-locate", "--status-fd", "2"]

    def import_key(self, path: str, where: str, secret: bool = False) -> list[str]:
        """Import a key file (armored or binary); the primary fingerprints it held."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read key file {path} "
                              f"({exc.strerror or 'unreadable'})") from None
        done = self.run(["--import"], input=data)
        fingerprints, secrets = [], False
        for words in _status_lines(done.stderr):
            if words[0] == "IMPORT_OK" and len(words) >= 3:
                secrets = secrets or bool(int(words[1]) & 16)
                if words[2] not in fingerprints:
                    fingerprints.append(words[2])
        if not fingerprints:
            raise ConfigError(f"{where}: no OpenPGP key found in {path}")
        if secret and not secrets:
            raise ConfigError(f"{where}: {path} holds no secret key")
        return fingerprints

    def can_encrypt(self, fingerprint: str) -> bool:
        done = self.run(["--with-colons", "--list-keys", fingerprint])
        for line in done.stdout.decode("ascii", "replace").splitlines():
            fields = line.split(":")
            if fields[0] == "pub" and len(fields) > 11:
                return "E" in fields[11]  # usable for encryption (some valid subkey can)
        return False

    def encrypt(self, data: bytes | Path, dst: Path, recipients: tuple[str, ...]) -> None:
        """Encrypt a local file or bytes to `dst` (AES-256, SEIPD v1 + MDC)."""
        args = [*_ENCRYPT]
        for fpr in recipients:
            args += ["--recipient", fpr]
        args += ["--output", str(dst), "--yes", "--encrypt"]
        if isinstance(data, Path):
            done = self.run([*args, str(data)])
        else:
            done = self.run(args, input=data)
        if done.returncode != 0:
            raise FatalError(f"{dst.name}: PGP encryption failed "
                             f"({_reason(list(_status_lines(done.stderr)))})")

    def close(self) -> None:
        """Stop this home's gpg-agent (started by decryption) and delete the home."""
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "all"],
                       capture_output=True, check=False)
        shutil.rmtree(self.home, ignore_errors=True)


class Decryption:
    """One `gpg --decrypt` over pipes: a feeder thread writes the encrypted bytes to stdin, a
    reader thread collects status lines; the caller reads the plaintext from `read`."""

    def __init__(self, key: Decryptor, read: Callable[[int], bytes], name: str) -> None:
        self.key, self._source, self.name = key, read, name
        self.status: list[list[str]] = []
        self._error: BaseException | None = None
        self._proc: subprocess.Popen | None = None
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Decryption:
        args = [GPG, *self.key.keyring.base_args(), "--pinentry-mode", "loopback"]
        fds: tuple[int, ...] = ()
        if self.key.passphrase is not None:
            rfd, wfd = os.pipe()
            os.write(wfd, self.key.passphrase.encode() + b"\n")  # far below a pipe's buffer
            os.close(wfd)
            args += ["--passphrase-fd", str(rfd)]
            fds = (rfd,)
        else:
            args += ["--passphrase", ""]  # a protected key then fails: no prompt, no wait
        try:
            self._proc = subprocess.Popen([*args, "--decrypt"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          pass_fds=fds)
        except OSError as exc:
            raise FatalError(f"cannot run {GPG} ({exc.strerror})") from None
        finally:
            for fd in fds:
                os.close(fd)
        self._start(self._feed)
        self._start(self._collect)
        return self

    def _start(self, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=f"gpg-{target.__name__}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def read(self, size: int = BLOCK) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        block: bytes = self._proc.stdout.read(size)
        return block

    def _feed(self) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        stdin = self._proc.stdin
        try:
            while block := self._source(BLOCK):
                stdin.write(block)
        except BrokenPipeError:
            pass  # gpg stopped early (bad key, corrupt data): its status says why
        except BaseException as exc:  # noqa: BLE001 - a store error, raised by check()
            self._error = exc
        finally:
            try:
                stdin.close()
            except BrokenPipeError:
                pass

    def _collect(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            if line.startswith(_STATUS.encode()) and len(self.status) < _MAX_STATUS_LINES:
                self.status.append(line[len(_STATUS):].decode("ascii", "replace").split())

    def check(self) -> None:
        """After the plaintext was read to its end: raise unless gpg vouched for all of it."""
        rc = self._finish()
        if self._error is not None:
            raise self._error
        reason = verdict(self.status, rc, self.key.signers)
        if reason:
            raise DeliveryFailed(f"{self.name}: {reason}")

    def _finish(self) -> int:
        assert self._proc is not None
        if self._proc.stdout is not None:
            while self._proc.stdout.read(BLOCK):  # drain: gpg may still be writing
                pass
        for thread in self._threads:
            thread.join()
        return self._proc.wait()

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()  # the reader gave up early: nothing more is wanted
        self._finish()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


def verdict(status: list[list[str]], rc: int, signers: frozenset[str]) -> str | None:
    """A one-line reason the message must be refused, or None; from gpg's status lines."""
    seen = {words[0] for words in status if words}
    if "DECRYPTION_OKAY" not in seen:
        return _reason(status)
    if "END_DECRYPTION" not in seen or seen & {"BADMDC", "DECRYPTION_FAILED"}:
        return "corrupt or truncated PGP data"
    if "BADSIG" in seen:
        return "bad signature"
    if signers:
        valid = {w[-1] for w in status if w[0] == "VALIDSIG" and len(w) >= 10}
        if not valid & signers:
            if valid or seen & {"ERRSIG", "EXPKEYSIG", "REVKEYSIG", "EXPSIG"}:
                return "signature is not by the key in pgp_signer_key_file"
            return "missing required signature (pgp_signer_key_file is set)"
    elif rc != 0 and not seen & {"ERRSIG", "EXPKEYSIG", "REVKEYSIG", "EXPSIG"}:
        return "corrupt or truncated PGP data"  # decrypted, yet gpg reported an error
    return None


def _reason(status: list[list[str]]) -> str:
    seen = {words[0] for words in status if words}
    errors = {int(w[2]) & 0xFFFF for w in status
              if w[0] == "ERROR" and len(w) >= 3 and w[2].isdigit()}
    if seen & {"BAD_PASSPHRASE", "MISSING_PASSPHRASE"} or errors & _PASSPHRASE_ERRORS:
        return "decryption failed: wrong or missing passphrase (pgp_passphrase_env)"
    if "NO_SECKEY" in seen:
        return "decryption failed: no secret key for this file (pgp_secret_key_file)"
    if "INV_RECP" in seen:
        return "recipient key cannot encrypt (pgp_recipient_key_file)"
    return "corrupt or truncated PGP data"


def _status_lines(stderr: bytes) -> Iterator[list[str]]:
    for line in stderr.decode("ascii", "replace").splitlines():
        if line.startswith(_STATUS):
            words = line[len(_STATUS):].split()
            if words:
                yield words


def gpg_available() -> bool:
    return shutil.which(GPG) is not None
