"""S3 store: an object appears whole when its PUT or multipart upload completes."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, cast

import boto3
import botocore.session
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from pipeline.errors import FatalError, StoreUnavailable
from pipeline.stores.base import Entry, StoreOptions, checked, plain_entries

MAX_ATTEMPTS = 4  # total attempts when AWS_MAX_ATTEMPTS / the AWS config file set none
NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict"}
THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"}


class S3Store:
    parallel_reads = True

    def __init__(self, url: str, options: StoreOptions | None = None) -> None:
        self.url = url
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._extra = {"ServerSideEncryption": options.sse} if options and options.sse else {}
        # Credentials, region and endpoint (AWS_ENDPOINT_URL) come from boto3's standard chain.
        core = botocore.session.get_session()
        attempts = core.get_config_variable("max_attempts") or MAX_ATTEMPTS
        config = Config(
            retries={"mode": "standard", "total_max_attempts": int(attempts)},
            connect_timeout=5,
            read_timeout=60,
        )
        self._client = boto3.session.Session(botocore_session=core).client("s3", config=config)

    def _key(self, path: str) -> str:
        return self.prefix + checked(path)

    def _raw_key(self, path: str) -> str:
        """A listing prefix, or a path in a message: never an object to act on."""
        return self.prefix + path.lstrip("/")

    def list(self, prefix: str = "") -> list[Entry]:
        entries = []
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._raw_key(prefix)
        )
        with self._errors(prefix):
            for page in pages:
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):  # folder markers made by consoles
                        entries.append(Entry(obj["Key"][len(self.prefix) :], obj["Size"]))
        return sorted(plain_entries(entries, self.url), key=lambda e: e.path)

    def open_read(self, path: str) -> BinaryIO:
        with self._errors(path):
            body = self._client.get_object(Bucket=self.bucket, Key=self._key(path))["Body"]
        return cast(BinaryIO, io.BufferedReader(_Body(body, self, path), buffer_size=1 << 20))

    def read_bytes(self, path: str) -> bytes:
        with self._errors(path):
            obj = self._client.get_object(Bucket=self.bucket, Key=self._key(path))
            return bytes(obj["Body"].read())

    def exists(self, path: str) -> bool:
        try:
            with self._errors(path):
                self._client.head_object(Bucket=self.bucket, Key=self._key(path))
        except FileNotFoundError:
            return False
        return True

    def write_bytes(self, path: str, data: bytes) -> None:
        with self._errors(path):
            self._client.put_object(
                Bucket=self.bucket, Key=self._key(path), Body=data, **self._extra
            )

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Conditional PUT (If-None-Match: *): S3 answers 412 when the key exists, 409 when
        a concurrent conditional write to it is in progress (that one may win: not us)."""
        try:
            with self._errors(path):
                self._client.put_object(Bucket=self.bucket, Key=self._key(path), Body=data,
                                        IfNoneMatch="*", **self._extra)
        except _Conflict:
            return False
        return True

    def put_file(self, local_path: str, path: str, consume: bool = False) -> None:
        # upload_file goes multipart for large files and aborts the upload on error.
        with self._errors(path):
            self._client.upload_file(
                local_path, self.bucket, self._key(path), ExtraArgs=self._extra or None
            )

    def delete(self, path: str) -> None:
        with self._errors(path):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(path))

    def close(self) -> None:
        self._client.close()

    @contextmanager
    def _errors(self, path: str) -> Iterator[None]:
        try:
            yield
        except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
            raise _mapped(exc, f"s3://{self.bucket}/{self._raw_key(path)}") from exc


class _Conflict(FatalError):
    """A conditional write found the object there (or being written): only
    create_exclusive expects it."""


def _mapped(exc: Exception, where: str) -> Exception:
    """The pipeline's error for a botocore error; names the object, not the response."""
    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, ClientError):
        exc = exc.__context__
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if code in CONFLICT or status in (409, 412):
            return _Conflict(f"{where}: exists ({code or status})")
        if code in NOT_FOUND:
            return FileNotFoundError(f"{where}: no such object")
        if code == "NoSuchBucket":
            return FatalError(f"{where}: bucket does not exist")
        if code in DENIED:
            return FatalError(f"{where}: access denied ({code})")
        if code in THROTTLED or status >= 500:
            return StoreUnavailable(f"{where}: S3 unavailable ({code or status})")
        return FatalError(f"{where}: S3 error {code or status}")
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return StoreUnavailable(f"{where}: S3 endpoint unreachable ({type(exc).__name__})")
    if isinstance(exc, NoCredentialsError):
        return FatalError(f"{where}: no AWS credentials found")
    return FatalError(f"{where}: S3 request failed ({type(exc).__name__})")


class _Body(io.RawIOBase):
    """The GET response body as a raw stream whose read errors are mapped like the rest."""

    def __init__(self, body: Any, store: S3Store, path: str) -> None:
        self._body, self._store, self._path = body, store, path

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with self._store._errors(self._path):
            chunk = self._body.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()
