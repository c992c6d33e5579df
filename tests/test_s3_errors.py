"""S3 failure modes on a real endpoint: what stops a run at the start, and what costs one image's row."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from segbatch import RunConfig, cli, pipeline
from segbatch.errors import EXIT_STATUS, InputError
from segbatch.models import weights
from segbatch.stages.listing import list_inputs
from segbatch.store import summary

from _helpers import TEST_ARCH, photo_like


def _fast(*args: str) -> list[str]:
    return ["run", *args, "--model", TEST_ARCH, "--weights", "random", "--no-progress"]


def test_missing_bucket_stops_the_run_at_the_start(s3_bucket, tmp_path, capsys):
    assert cli.main(_fast("s3://segbatch-no-such-bucket/in/", str(tmp_path / "out"))) == EXIT_STATUS[InputError]
    err = capsys.readouterr().err
    assert "INPUT s3://segbatch-no-such-bucket/in/ does not exist" in err
    assert not (tmp_path / "out").exists()


def test_missing_prefix_stops_the_run_at_the_start(s3_bucket, tmp_path, capsys):
    with pytest.raises(InputError, match="does not exist"):
        list_inputs(f"s3://{s3_bucket}/nothing-here/", {}, ["jpg"])
    assert cli.main(_fast(f"s3://{s3_bucket}/nothing-here/", str(tmp_path / "out"))) == EXIT_STATUS[InputError]
    assert f"INPUT s3://{s3_bucket}/nothing-here/ does not exist" in capsys.readouterr().err


def test_missing_output_bucket_stops_the_run_at_the_start(s3_bucket, s3_server, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.fromarray(photo_like(32, 24, 1)).save(tmp_path / "in" / "a.png")
    code = cli.main(_fast(str(tmp_path / "in"), "s3://segbatch-no-such-out-bucket/labels/"))
    assert code == EXIT_STATUS[InputError]
    assert "OUTPUT s3://segbatch-no-such-out-bucket/labels/" in capsys.readouterr().err
    # A missing prefix in an existing bucket is fine: writing creates it.
    pipeline.listing.check_output(f"s3://{s3_bucket}/not/yet/there/", {})


class _Listed:
    """Inputs (segbatch.stages.inputs.Inputs) whose listing was taken before the test changed the bucket."""

    parts = None
    block_rows = 2

    def __init__(self, table):
        self.table = table

    def plan(self, **_sizing):
        pass

    def dataset(self):
        import ray

        return ray.data.from_arrow(self.table)


def test_vanished_and_denied_objects_become_error_rows(s3_bucket, s3_server, tmp_path, ray_local):
    """A key deleted between listing and reading, and a key a bucket policy denies: one error row each,
    and the run goes on to label the rest."""
    for name, seed in (("ok.png", 1), ("gone.png", 2), ("denied.png", 3), ("ok2.png", 4)):
        Image.fromarray(photo_like(40, 30, seed)).save(tmp_path / name)
    s3_server.upload_dir(tmp_path, f"s3://{s3_bucket}/in")
    config = RunConfig(
        input=f"s3://{s3_bucket}/in",
        output=f"s3://{s3_bucket}/out",
        model=TEST_ARCH,
        weights="random",
        batch_size=2,
        progress=False,
    )
    listed = pipeline.plan_inputs(config)
    assert listed.counts() == (4, 0)
    todo = _Listed(listed.todo())  # listed now; read below, after the deletion

    client = s3_server.client()
    client.delete_object(Bucket=s3_bucket, Key="in/gone.png")
    # moto enforces an explicit Deny in a bucket policy on object reads, as S3 does.
    client.put_bucket_policy(
        Bucket=s3_bucket,
        Policy=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Deny",
                        "Principal": "*",
                        "Action": "s3:GetObject",
                        "Resource": f"arn:aws:s3:::{s3_bucket}/in/denied.png",
                    }
                ],
            }
        ),
    )
    spec = weights.resolve(TEST_ARCH, "random")
    rows = {}
    for batch in pipeline.build_dataset(config, spec, todo, "r1").iter_batches(batch_size=None, batch_format="pyarrow"):
        rows.update((r["uri"], r) for r in batch.to_pylist())
    base = f"s3://{s3_bucket}/in/"
    assert rows[base + "ok.png"]["status"] == "ok" and rows[base + "ok2.png"]["status"] == "ok"
    assert rows[base + "gone.png"]["status"] == "error"
    assert "not found" in rows[base + "gone.png"]["error"]
    assert rows[base + "denied.png"]["status"] == "error"
    assert "access denied" in rows[base + "denied.png"]["error"]
    written = summary.read(config.output, columns=["uri", "status", "error"]).to_pylist()
    assert sorted((r["uri"], r["status"]) for r in written) == sorted((u, r["status"]) for u, r in rows.items())
    client.delete_bucket_policy(Bucket=s3_bucket)


def test_storage_options_from_config_file_and_flags(s3_bucket, s3_server, tmp_path, monkeypatch):
    """A `storage_options:` block in the config file reaches the filesystem; --storage-option wins over it."""
    from _s3 import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY, clear_s3fs_cache

    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint now comes only from the options
    clear_s3fs_cache()
    s3_server.client().put_object(Bucket=s3_bucket, Key="in/a.png", Body=b"\x89PNG")
    conf = tmp_path / "run.yaml"
    conf.write_text(f"""
input: s3://{s3_bucket}/in/
output: {tmp_path / "out"}
storage_options:
  endpoint_url: http://127.0.0.1:1          # nothing listens here; the flag below replaces it
  config_kwargs: {{max_pool_connections: 4}}
""")
    args = cli.make_parser().parse_args(
        [
            "run",
            "--config",
            str(conf),
            "--storage-option",
            f"endpoint_url={s3_server.url}",
            "--storage-option",
            f"key={FAKE_ACCESS_KEY_ID}",
            "--storage-option",
            f"secret={FAKE_SECRET_ACCESS_KEY}",
        ]
    )
    config = cli.build_config(args)
    assert config.storage_options == {
        "endpoint_url": s3_server.url,
        "config_kwargs": {"max_pool_connections": 4},
        "key": FAKE_ACCESS_KEY_ID,
        "secret": FAKE_SECRET_ACCESS_KEY,
    }
    assert FAKE_SECRET_ACCESS_KEY not in repr(config)
    table = list_inputs(config.input, config.storage_options, config.extensions)
    assert table["uri"].to_pylist() == [f"s3://{s3_bucket}/in/a.png"]
    clear_s3fs_cache()


# -- issue 22 item 9: every subcommand meets an unreachable endpoint or half a key pair with exit 4 -------
@pytest.mark.parametrize("command", ["status", "report", "compact", "export"])
def test_an_unreachable_endpoint_is_exit_4_for_every_subcommand(tmp_path, capsys, command, monkeypatch):
    from segbatch._internal import _storage

    from _helpers import free_port

    # Every try of the backoff still happens (the refusal comes after the last); only the waits shrink.
    monkeypatch.setattr(_storage, "RETRY_BASE_DELAY", 0.001)
    monkeypatch.setattr(_storage, "RETRY_MAX_DELAY", 0.001)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # and botocore's own retries with backoff
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = [command, "s3://segbatch-unreachable/out", "--storage-option", f"endpoint_url={closed}"]
    if command == "export":
        args[2:2] = [str(tmp_path / "dest"), "--format", "coco", "--no-progress"]
    assert cli.main(args) == EXIT_STATUS[InputError]
    err = capsys.readouterr().err
    assert "cannot reach storage" in err and "Traceback" not in err


def test_a_secret_without_its_key_is_exit_4_and_never_echoed(s3_bucket, capsys):
    secret = "segbatch-half-a-pair-secret"
    assert cli.main(["status", f"s3://{s3_bucket}/out", "--storage-option", f"secret={secret}"]) == 4
    err = capsys.readouterr().err
    assert "PartialCredentialsError" in err and secret not in err
