"""An S3-compatible server for tests: moto's, in a thread of the test process, on loopback.

Shared by the object-store tests (tests/index) and the cluster suite (tests/cluster), through the
session fixture ``s3_server`` of tests/conftest.py. Credentials are dummies (moto accepts any); each
test that needs isolation takes a bucket of its own (:meth:`S3.new_bucket`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

REGION = "us-east-1"


@dataclass
class S3:
    """A moto S3 server on loopback with one bucket, and the options fsspec/s3fs need to reach it."""

    endpoint_url: str
    bucket: str

    @property
    def storage_options(self) -> dict[str, Any]:
        """``fsspec.filesystem("s3", **storage_options)`` (also ``BlobStore.open``'s options)."""
        return {
            "key": "testing",
            "secret": "testing",
            "endpoint_url": self.endpoint_url,
            "client_kwargs": {"region_name": REGION},
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name=REGION,
        )

    def new_bucket(self) -> str:
        """Create an empty bucket with a fresh name and return the name."""
        name = f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name


@contextmanager
def running_s3(bucket: str = "image-search") -> Iterator[S3]:
    """A moto server on 127.0.0.1 at a free port with ``bucket`` created, stopped on exit."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        store = S3(endpoint_url=f"http://{host}:{port}", bucket=bucket)
        store.client().create_bucket(Bucket=store.bucket)
        yield store
    finally:
        server.stop()
