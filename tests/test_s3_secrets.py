"""No credential in the terminal, the logs or any output file: the CLI in a subprocess, grepped."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from _helpers import TEST_ARCH, photo_like
from _s3 import SECRETS

pytestmark = pytest.mark.integration  # runs segbatch against S3 in a subprocess

MAX_GREPPED_FILE = 64 * 1024 * 1024  # bytes; Ray's logs are far smaller, spill files are not logs


def _leaks(texts: dict[str, bytes]) -> list[tuple[str, str]]:
    return [(where, secret) for where, data in texts.items() for secret in SECRETS if secret.encode() in data]


def test_no_secret_in_terminal_logs_or_outputs(s3_bucket, s3_server, tmp_path, checkpoint):
    for i in range(2):
        Image.fromarray(photo_like(40, 30, i)).save(tmp_path / f"img{i}.png")
    s3_server.upload_dir(tmp_path, f"s3://{s3_bucket}/in")
    s3_server.client().put_object(Bucket=s3_bucket, Key="w/seeded.pt", Body=checkpoint.read_bytes())

    # Credentials stay in the environment only. The endpoint comes from --storage-option this time, which
    # must reach the driver's listing, the weights download and every Ray worker.
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL", "RAY_ADDRESS")}
    ray_tmp = tempfile.mkdtemp(prefix="sbs", dir="/tmp")  # short: Ray's socket paths have a length limit
    env["RAY_TMPDIR"] = ray_tmp
    cmd = [
        sys.executable,
        "-m",
        "segbatch",
        "run",
        f"s3://{s3_bucket}/in/",
        f"s3://{s3_bucket}/out/",
        "--model",
        TEST_ARCH,
        "--weights",
        f"s3://{s3_bucket}/w/seeded.pt",
        "--batch-size",
        "2",
        "--storage-option",
        f"endpoint_url={s3_server.url}",
        "--no-progress",
    ]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, timeout=540, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-4000:]
        assert b"2 ok, 0 error" in proc.stdout, proc.stdout
        texts = {"stdout": proc.stdout, "stderr": proc.stderr}
        client = s3_server.client()
        written = s3_server.keys(s3_bucket, "out/")
        assert any(k.startswith("out/masks/") for k in written) and any(k.startswith("out/summary/") for k in written)
        for key in written:
            texts[f"s3://{s3_bucket}/{key}"] = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        logs = [p for p in Path(ray_tmp).rglob("*") if p.is_file() and not p.is_symlink()]
        assert any(p.suffix in (".out", ".err", ".log") for p in logs)  # the grep saw Ray's logs
        for p in logs:
            if p.stat().st_size <= MAX_GREPPED_FILE:
                texts[str(p)] = p.read_bytes()
        assert _leaks(texts) == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
