"""A real S3 endpoint for the tests: moto's ThreadedMotoServer on 127.0.0.1, as s3fs's own suite runs it.

Credentials reach segbatch the way they reach it in production: only through the standard AWS
environment variables, including ``AWS_ENDPOINT_URL``. They are set when conftest is imported, before
any Ray starts, because Ray workers inherit the driver's environment at ``ray.init`` and never see a
later change. The server itself starts on first use, on the port chosen then.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from pathlib import Path

HOST = "127.0.0.1"  # loopback only: the tests never reach a real cloud
REGION = "us-east-1"  # moto's default; other regions need a LocationConstraint on create_bucket

# Distinctive fake credentials, so a grep of outputs and logs for them cannot match anything by chance.
FAKE_ACCESS_KEY_ID = "AKIASEGBATCHFAKE7Q2Z"
FAKE_SECRET_ACCESS_KEY = "segbatchFakeSecret+9xQ2vL7mTz4Kp0RwYh3NdC8sJe1"
SECRETS = (FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY)

# Variables that could point the tests at a real account or endpoint; cleared for the session.
_AWS_VARS_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)


def configure_environment(port: int) -> str:
    """Point every AWS client in this process and its children at ``HOST:port``; returns the endpoint."""
    endpoint = f"http://{HOST}:{port}"
    for name in _AWS_VARS_TO_CLEAR:
        os.environ.pop(name, None)
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": endpoint,
            # No shared config or credentials files: a developer's ~/.aws must not change what tests see.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",  # no 1 s probe of an instance-metadata service
        }
    )
    return endpoint


class S3Endpoint:
    """The moto server, started on first use, with helpers to make buckets and upload test files."""

    def __init__(self, port: int):
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self._server = None
        self._lock = threading.Lock()

    def start(self) -> S3Endpoint:
        with self._lock:
            if self._server is None:
                from moto.server import ThreadedMotoServer

                # werkzeug logs every request at INFO; that drowns a failing test's own log.
                logging.getLogger("werkzeug").setLevel(logging.WARNING)
                server = ThreadedMotoServer(ip_address=HOST, port=self.port, verbose=False)
                server.start()
                self._server = server
        return self

    def stop(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.stop()
                self._server = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=REGION)

    def new_bucket(self, prefix: str = "segbatch-test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, bucket: str) -> None:
        client = self.client()
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
        client.delete_bucket(Bucket=bucket)

    def upload_dir(self, local: Path, url: str) -> list[str]:
        """Copy every file below ``local`` to the ``s3://bucket/prefix`` at ``url``; returns the keys."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        client = self.client()
        keys = []
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                key = "/".join(p for p in (prefix.strip("/"), path.relative_to(local).as_posix()) if p)
                client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
                keys.append(key)
        return keys

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key in ``bucket`` under ``prefix``, straight from the server (no client-side cache)."""
        client = self.client()
        out = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)


def clear_s3fs_cache() -> None:
    """Drop cached s3fs instances (and with them their listing caches) so tests never share state."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
