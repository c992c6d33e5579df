"""--manifest: URL lists (text, CSV, Parquet) read by Ray, deduplicated, resumed; against a real S3."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segbatch import RunConfig, cli
from segbatch.errors import EXIT_STATUS, ConfigError, InputError
from segbatch.stages.listing import LISTING_SCHEMA
from segbatch.stages.manifest import ManifestInputs
from segbatch.store import summary

from _helpers import TEST_ARCH, photo_like


def _png(seed: int, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo_like(*size, seed)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def images(s3_bucket, s3_server, tmp_path):
    client = s3_server.client()
    for i, key in enumerate(["imgs/a.png", "imgs/sub/b.png", "imgs/c.png"]):
        client.put_object(Bucket=s3_bucket, Key=key, Body=_png(i))
    local = tmp_path / "local.png"
    local.write_bytes(_png(9))
    return s3_bucket, local


def _put(s3_server, bucket: str, key: str, body: bytes) -> str:
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=body)
    return f"s3://{bucket}/{key}"


def test_text_manifest_runs_dedups_and_resumes(images, s3_server, tmp_path, ray_local, capsys):
    bucket, local = images
    lines = [
        "# images to label",
        f"s3://{bucket}/imgs/a.png",
        "",
        "sub/b.png",  # relative to the manifest's folder
        f"s3://{bucket}/imgs/a.png",  # a duplicate: labelled once
        f"s3://{bucket}/imgs/missing.png",  # never there: an error row
        f"s3://{bucket}/imgs/../imgs/c.png",  # a key of its own (not imgs/c.png), never uploaded: an error row
        str(local),  # a local file in the same manifest
    ]
    manifest = _put(s3_server, bucket, "imgs/list.txt", "\n".join(lines).encode())
    out = f"s3://{bucket}/labels"
    args = ["run", "--manifest", manifest, out, "--model", TEST_ARCH, "--weights", "random", "--no-progress"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "3 ok, 2 error, 0 skipped (already labelled) of 5 listed" in printed

    rows = {r["uri"]: r for r in summary.read(out).to_pylist()}
    a, b = f"s3://{bucket}/imgs/a.png", f"s3://{bucket}/imgs/sub/b.png"
    assert sorted(rows) == sorted(
        [a, b, f"s3://{bucket}/imgs/missing.png", f"s3://{bucket}/imgs/../imgs/c.png", str(local)]
    )
    assert rows[a]["status"] == "ok" and rows[a]["mask_uri"] == f"{out}/masks/s3/{bucket}/imgs/a.png.png"
    assert rows[b]["status"] == "ok" and rows[b]["mask_uri"] == f"{out}/masks/s3/{bucket}/imgs/sub/b.png.png"
    assert "not found" in rows[f"s3://{bucket}/imgs/missing.png"]["error"]
    assert "not found" in rows[f"s3://{bucket}/imgs/../imgs/c.png"]["error"]
    # A local file in an S3 run: its mask is named after its protocol and absolute path, below OUTPUT.
    assert rows[str(local)]["mask_uri"] == f"{out}/masks/file/{str(local).lstrip('/')}.png"
    masks = s3_server.keys(bucket, "labels/masks/")
    assert f"labels/masks/s3/{bucket}/imgs/a.png.png" in masks

    # Resume: ok inputs are skipped by the distributed group-by; error rows are retried.
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "0 ok, 2 error, 3 skipped (already labelled) of 5 listed" in printed
    again = summary.read(out).to_pylist()
    assert sum(r["status"] == "ok" for r in again) == 3  # never a second ok row


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet_manifests(images, s3_server, fmt, ray_local):
    bucket, _ = images
    uris = [f"s3://{bucket}/imgs/a.png", f"s3://{bucket}/imgs/c.png", f"s3://{bucket}/imgs/a.png"]
    table = pa.table({"label": ["x", "y", "z"], "uri": uris})
    if fmt == "csv":  # no `uri` column here: the first column holds the URLs
        buf = io.BytesIO()
        pacsv.write_csv(pa.table({"image": uris, "label": ["x", "y", "z"]}), buf)
        url = _put(s3_server, bucket, "lists/m.csv", buf.getvalue())
    else:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        url = _put(s3_server, bucket, "lists/m.parquet", buf.getvalue())
    config = RunConfig(manifest=url, output=f"s3://{bucket}/out", model=TEST_ARCH, weights="random")
    inputs = ManifestInputs(config, run_id=f"manifest-test-{fmt}")
    got = pa.concat_tables(inputs.dataset().iter_batches(batch_size=None, batch_format="pyarrow"))
    assert got.schema == LISTING_SCHEMA
    got = got.sort_by("uri").to_pylist()
    assert [r["uri"] for r in got] == sorted(set(uris))
    assert [r["rel"] for r in got] == [f"s3/{bucket}/imgs/a.png", f"s3/{bucket}/imgs/c.png"]
    assert [r["path"] for r in got] == [f"{bucket}/imgs/a.png", f"{bucket}/imgs/c.png"]
    assert inputs.counts() == (2, 0)


def test_missing_manifest_and_redo_changed_are_refused(s3_bucket, tmp_path, capsys):
    args = [
        "run",
        "--manifest",
        f"s3://{s3_bucket}/nope.txt",
        str(tmp_path / "out"),
        "--model",
        TEST_ARCH,
        "--weights",
        "random",
    ]
    assert cli.main(args) == EXIT_STATUS[InputError]
    assert f"manifest s3://{s3_bucket}/nope.txt does not exist" in capsys.readouterr().err
    (tmp_path / "m.txt").write_text("/x.png\n")
    with pytest.raises(ConfigError, match="redo_changed"):
        ManifestInputs(RunConfig(manifest=str(tmp_path / "m.txt"), output=str(tmp_path / "o"), redo_changed=True))


# -- issue 22 item 4: a listed input and a manifest input never share a mask ----------------------------
def test_listed_and_manifest_inputs_never_share_an_output(tmp_path, ray_local, capsys):
    """A listed ``in/file/<abs>/rocket.jpg`` and a manifest's ``<abs>/rocket.jpg`` both name
    ``masks/file/<abs>/rocket.jpg.png``: an OUTPUT holds one kind of input, the other is refused (exit 2)."""
    from segbatch.store import identity

    src, out, elsewhere = tmp_path / "in", tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    rocket = elsewhere / "rocket.jpg"
    rocket.write_bytes(_png(1))
    nested = src / "file" / str(elsewhere).lstrip("/")
    nested.mkdir(parents=True)
    (nested / "rocket.jpg").write_bytes(_png(2))
    base = ["--model", TEST_ARCH, "--weights", "random", "--no-progress"]
    assert cli.main(["run", str(src), str(out), *base]) == 0
    listed_mask = summary.read(str(out)).to_pylist()[0]["mask_uri"]
    before = (tmp_path / "out" / listed_mask.split("/out/", 1)[1]).read_bytes()
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"{rocket}\n")
    capsys.readouterr()
    assert cli.main(["run", "--manifest", str(manifest), str(out), *base]) == EXIT_STATUS[ConfigError]
    assert "listed inputs" in capsys.readouterr().err
    assert summary.read(str(out)).num_rows == 1  # nothing written, the listed input's mask untouched
    assert (tmp_path / "out" / listed_mask.split("/out/", 1)[1]).read_bytes() == before
    assert identity.read(str(out))["inputs"] == "listed"
    # Another OUTPUT takes the manifest. A later manifest's count is of its own lines only: the ok row
    # of rocket.jpg, which it does not name, is neither listed nor skipped (it said "1 skipped of 2").
    fresh = tmp_path / "fresh"
    assert cli.main(["run", "--manifest", str(manifest), str(fresh), *base]) == 0
    (elsewhere / "other.jpg").write_bytes(_png(3))
    manifest.write_text(f"{elsewhere / 'other.jpg'}\n")
    capsys.readouterr()
    assert cli.main(["run", "--manifest", str(manifest), str(fresh), *base]) == 0
    assert "1 ok, 0 error, 0 skipped (already labelled) of 1 listed" in capsys.readouterr().out
