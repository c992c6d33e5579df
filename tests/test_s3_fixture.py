"""The S3 fixture itself: a real endpoint reached through the standard AWS environment only."""

from __future__ import annotations

import os

import fsspec


def test_env_only_reaches_the_loopback_server(s3_bucket, s3_server, tmp_path):
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.url
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_bytes(b"hello")
    keys = s3_server.upload_dir(tmp_path, f"s3://{s3_bucket}/in")
    assert keys == ["in/d/a.txt"]
    # No endpoint or key passed: s3fs finds both in the environment, as it does in production.
    fs, _ = fsspec.core.url_to_fs(f"s3://{s3_bucket}")
    assert fs.cat_file(f"{s3_bucket}/in/d/a.txt") == b"hello"
    fs.pipe_file(f"{s3_bucket}/out/b.txt", b"x")
    assert s3_server.keys(s3_bucket) == ["in/d/a.txt", "out/b.txt"]
