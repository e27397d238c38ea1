"""Shared fixtures: a moto S3 server and a real OpenSSH SFTP server on 127.0.0.1."""

import uuid
from collections.abc import Callable, Iterator

import boto3
import pytest

from localdev import servers


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server; boto3's standard chain points at it for the rest of the session."""
    with servers.moto_s3_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS"):
            mp.delenv(name, raising=False)
        yield endpoint


@pytest.fixture
def make_bucket(s3_endpoint: str) -> Callable[[], str]:
    """Create a fresh, uniquely named bucket; returns its name."""
    client = boto3.client("s3")

    def make() -> str:
        name = f"test-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=name)
        return name

    return make


@pytest.fixture(scope="session")
def sftp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.SftpServer]:
    """OpenSSH sshd serving SFTP over a temp folder (see localdev.servers.sftp_server)."""
    with servers.sftp_server(tmp_path_factory.mktemp("sftp")) as server:
        yield server
