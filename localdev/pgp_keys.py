"""OpenPGP keys made by the real `gpg` in throwaway homes (never the user's), and the
partner's side of the exchange: `gpg --encrypt [--sign]` and `gpg --decrypt` (tests, demo,
benchmarks)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Party:
    """One key pair in its own GnuPG home, exported to files."""

    home: Path
    uid: str
    fingerprint: str
    public: Path  # armored public key
    secret: Path  # armored secret key

    def gpg(self, *args: str, data: bytes | None = None, check: bool = True) -> bytes:
        done = subprocess.run(
            ["gpg", "--homedir", str(self.home), "--batch", "--no-tty", "--quiet",
             "--pinentry-mode", "loopback", "--passphrase", "", "--trust-model", "always",
             *args], input=data, capture_output=True, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"gpg {args[0]} failed: {done.stderr.decode()[-400:]}")
        return done.stdout

    def import_public(self, other: Party) -> None:
        self.gpg("--import", str(other.public))

    def encrypt(self, data: bytes, to: Party, sign: bool = False) -> bytes:
        """What a partner runs: gpg --encrypt [--sign] -r <our key> (binary output)."""
        self.import_public(to)
        args = ["--recipient", to.fingerprint, "--encrypt"]
        if sign:
            args = ["--local-user", self.fingerprint, "--sign", *args]
        return self.gpg(*args, data=data)

    def encrypt_file(self, src: Path, dst: Path, to: Party, sign: bool = False,
                     compress: bool = True) -> None:
        """The same, file to file (large files: nothing is held in memory)."""
        self.import_public(to)
        args = ["--recipient", to.fingerprint, "--output", str(dst), "--yes"]
        if not compress:
            args += ["--compress-algo", "none"]
        if sign:
            args += ["--local-user", self.fingerprint, "--sign"]
        self.gpg(*args, "--encrypt", str(src))

    def decrypt(self, data: bytes) -> bytes:
        return self.gpg("--decrypt", data=data)

    def close(self) -> None:
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "all"],
                       capture_output=True, check=False)


def make_party(folder: Path, name: str, passphrase: str = "") -> Party:
    """A fresh ed25519/cv25519 key pair (fast to generate), optionally passphrase-protected."""
    home = folder / name
    home.mkdir(mode=0o700, parents=True)
    uid = f"{name} <{name}@example.test>"
    subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--quiet", "--pinentry-mode", "loopback",
         "--passphrase", passphrase, "--quick-gen-key", uid, "future-default", "default",
         "never"], capture_output=True, check=True)
    listing = subprocess.run(["gpg", "--homedir", str(home), "--with-colons", "--list-keys"],
                             capture_output=True, check=True).stdout.decode()
    fingerprint = next(line.split(":")[9] for line in listing.splitlines()
                       if line.startswith("fpr:"))
    public, secret = folder / f"{name}.pub.asc", folder / f"{name}.sec.asc"
    public.write_bytes(subprocess.run(
        ["gpg", "--homedir", str(home), "--armor", "--export", fingerprint],
        capture_output=True, check=True).stdout)
    secret.write_bytes(subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback",
         "--passphrase", passphrase, "--armor", "--export-secret-keys", fingerprint],
        capture_output=True, check=True).stdout)
    return Party(home, uid, fingerprint, public, secret)
