"""Fixtures for S3 tests: a loopback moto S3 server, a bucket, per-test prefixes, a fault proxy.

The server is moto's real HTTP server (``ThreadedMotoServer``) on 127.0.0.1 and a free port,
started once per session; tests are isolated by prefix. AWS settings from the environment (a
developer's profile, a real endpoint) are masked for the session, so nothing leaves the machine.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .faultproxy import FaultProxy

BUCKET = "asyncckpt-test"
REGION = "us-east-1"


@pytest.fixture(scope="session")
def aws_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Dummy credentials, no profile, no endpoint, no ~/.aws files, no instance metadata."""
    empty = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                mp.delenv(name)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        mp.setenv("AWS_CONFIG_FILE", str(empty / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


@pytest.fixture(scope="session")
def moto_endpoint(aws_env: None) -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a moto S3 server running for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_client(moto_endpoint: str) -> Any:
    """A plain boto3 client on the moto server, for setting up and inspecting (not under test)."""
    import boto3

    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION)
    client.create_bucket(Bucket=BUCKET)
    yield client
    client.close()


@pytest.fixture
def s3_prefix(s3_client: Any) -> str:
    """A fresh prefix in the test bucket."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_uri(s3_prefix: str) -> str:
    return f"s3://{BUCKET}/{s3_prefix}"


@pytest.fixture
def s3_options(moto_endpoint: str) -> dict[str, Any]:
    """storage_options for the moto server (short retry delays keep fault tests quick)."""
    return {"endpoint_url": moto_endpoint, "retry_backoff": 0.01}


@pytest.fixture
def fault_proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the moto server; point ``endpoint_url`` at ``.endpoint``."""
    host, _, port = moto_endpoint.removeprefix("http://").rpartition(":")
    with FaultProxy((host, int(port))) as proxy:
        yield proxy


def pending_uploads(client: Any, prefix: str) -> list[str]:
    """Keys with a multipart upload in progress under ``prefix``."""
    uploads = client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])
    return [u["Key"] for u in uploads]


def object_keys(client: Any, prefix: str) -> list[str]:
    """Keys of the objects under ``prefix``."""
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))
