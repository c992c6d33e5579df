"""Object storage end to end, against a real S3 endpoint (moto's ThreadedMotoServer on 127.0.0.1).

The same images run local->local, s3->s3, s3->local and local->s3 through the CLI (in this process, on
the session's Ray) and must give the same masks and the same rows. Credentials reach segbatch only
through the AWS environment variables set by conftest.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from segbatch import cli

from _helpers import TEST_ARCH, exif_jpeg, photo_like

COMPARED = ["status", "error", "width", "height", "pixel_counts", "model", "weights", "device", "size"]


def write_images(root: Path) -> list[str]:
    """A few small images with awkward names; returns their paths relative to ``root``."""
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "odd name").mkdir()
    Image.fromarray(photo_like(64, 48, 1)).save(root / "a.jpg", quality=92)
    Image.fromarray(photo_like(64, 48, 2)).save(root / "a.png")
    Image.fromarray(photo_like(50, 70, 3)).convert("L").save(root / "sub" / "deep" / "g.PNG")
    (root / "rot.jpg").write_bytes(exif_jpeg(photo_like(80, 60, 4), orientation=6))
    Image.fromarray(photo_like(48, 40, 5)).save(root / "odd name" / "x#1%.png")
    (root / "notes.txt").write_text("not an image, not listed")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix != ".txt" and p.is_file())


@pytest.fixture(scope="module")
def storage(tmp_path_factory, s3_server, checkpoint):
    """The same inputs, weights, classes and config, once on local disk and once in a bucket."""
    from _s3 import clear_s3fs_cache

    clear_s3fs_cache()
    root = tmp_path_factory.mktemp("s3e2e")
    rels = write_images(root / "in")
    bucket = s3_server.new_bucket("segbatch-e2e")
    s3_server.upload_dir(root / "in", f"s3://{bucket}/in")
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="models/seeded.pt", Body=checkpoint.read_bytes())
    classes = [f"class{i}" for i in range(21)]
    client.put_object(Bucket=bucket, Key="models/classes.txt", Body="\n".join(classes).encode())
    (root / "classes.txt").write_text("\n".join(classes))
    settings = {"model": TEST_ARCH, "batch_size": 2, "progress": False}
    client.put_object(
        Bucket=bucket,
        Key="conf/run.yaml",
        Body=yaml.safe_dump(
            {**settings, "weights": f"s3://{bucket}/models/seeded.pt", "classes": f"s3://{bucket}/models/classes.txt"}
        ).encode(),
    )
    (root / "run.yaml").write_text(
        yaml.safe_dump({**settings, "weights": str(checkpoint), "classes": str(root / "classes.txt")})
    )
    yield {"root": root, "bucket": bucket, "rels": rels, "classes": classes}
    clear_s3fs_cache()
    s3_server.delete_bucket(bucket)


def _locations(storage, combo: str) -> tuple[str, str, str]:
    src, dst = combo.split("->")
    root, bucket = storage["root"], storage["bucket"]
    inp = f"s3://{bucket}/in/" if src == "s3" else str(root / "in")
    out = f"s3://{bucket}/out-{src}/" if dst == "s3" else str(root / f"out-{src}-{dst}")
    # Weights, classes and config come from the same side as the input.
    conf = f"s3://{bucket}/conf/run.yaml" if src == "s3" else str(root / "run.yaml")
    return inp, out, conf


COMBOS = ["local->local", "s3->s3", "s3->local", "local->s3"]


@pytest.fixture(scope="module")
def runs(storage, ray_local):
    """One CLI run per storage combination; returns combo -> (input, output, summary table, masks)."""
    import fsspec

    results = {}
    for combo in COMBOS:
        inp, out, conf = _locations(storage, combo)
        assert cli.main(["run", inp, out, "--config", conf, "--run-id", combo.replace(">", "")]) == 0
        fs, root = fsspec.core.url_to_fs(out)
        fs.invalidate_cache()
        files = [p for p in fs.find(root + "/summary") if p.endswith(".parquet")]
        table = pa.concat_tables(pq.read_table(io.BytesIO(fs.cat_file(p))) for p in files)
        masks = {
            row["uri"]: np.asarray(Image.open(io.BytesIO(fs.cat_file(fs._strip_protocol(row["mask_uri"])))))
            for row in table.to_pylist()
        }
        results[combo] = (inp.rstrip("/"), out.rstrip("/"), table.sort_by("uri"), masks)
    return results


@pytest.mark.parametrize("combo", COMBOS)
def test_every_combination_gives_the_same_masks_and_rows(runs, storage, combo):
    inp, out, table, masks = runs[combo]
    _, _, ref_table, ref_masks = runs["local->local"]
    ref_in = runs["local->local"][0]
    rels = storage["rels"]
    assert sorted(u[len(inp) + 1 :] for u in table["uri"].to_pylist()) == rels
    assert set(table["status"].to_pylist()) == {"ok"}, table.select(["uri", "error"]).to_pylist()
    for col in COMPARED:
        assert table[col].to_pylist() == ref_table[col].to_pylist(), col
    for row in table.to_pylist():
        rel = row["uri"][len(inp) + 1 :]
        assert row["mask_uri"].startswith(out + "/masks/")
        assert np.array_equal(masks[row["uri"]], ref_masks[f"{ref_in}/{rel}"]), rel
    # The classes come from the classes file, read from the same side as the input.
    assert json.loads(table.schema.metadata[b"segbatch.classes"]) == storage["classes"]


def test_s3_outputs_are_whole_objects_and_leave_no_temporaries(runs, storage, s3_server):
    bucket = storage["bucket"]
    for combo in ("s3->s3", "local->s3"):
        _, out, table, _ = runs[combo]
        prefix = out.removeprefix(f"s3://{bucket}/") + "/"
        keys = s3_server.keys(bucket, prefix)
        expected_masks = sorted(u.removeprefix(f"s3://{bucket}/") for u in table["mask_uri"].to_pylist())
        assert [k for k in keys if k.startswith(prefix + "masks/")] == expected_masks
        summaries = [k for k in keys if k.startswith(prefix + "summary/")]
        # The run merged its summary files when it ended; no marker of an unfinished merge is left.
        assert summaries and all(k.rsplit("/", 1)[1].startswith(("part-", "merged-")) for k in summaries)
        assert len(summaries) <= 2
        assert not [k for k in keys if k.endswith(".tmp") or "/." in k]  # no temporaries, hidden or not
        for key in keys:  # every object parses whole
            body = s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
            if key.endswith(".png"):
                Image.open(io.BytesIO(body)).load()
            elif key.endswith(".parquet"):
                pq.read_table(io.BytesIO(body))
            elif key.endswith(".json"):
                json.loads(body)


def test_resume_on_s3_skips_done_inputs(runs, storage, capsys):
    inp, out, _, _ = runs["s3->s3"]
    conf = _locations(storage, "s3->s3")[2]
    capsys.readouterr()
    assert cli.main(["run", inp + "/", out + "/", "--config", conf]) == 0
    printed = capsys.readouterr().out
    assert f"0 ok, 0 error, {len(storage['rels'])} skipped" in printed


# -- issue 22 item 1: keys with ".", ".." or empty segments are objects of their own -------------------
ODD_KEYS = ["w.jpg", "./w.jpg", "z.jpg", "a/../z.jpg", "/x.jpg", "x.jpg", "//y.jpg", "q//r.jpg"]


def test_keys_with_dot_and_empty_segments_each_get_their_own_row_and_mask(s3_bucket, s3_server, ray_local, checkpoint):
    """``p/./w.jpg`` is not ``p/w.jpg``, nor ``p//x.jpg`` ``p/x.jpg``: each key gets one ok row and a
    mask of its own image, none overwritten by another key's."""
    import fsspec

    from segbatch.store import summary
    from segbatch.store.contract import input_relpath, mask_name

    from _helpers import load_model, reference_mask

    client = s3_server.client()
    images = {}
    for i, rel in enumerate(ODD_KEYS):
        buf = io.BytesIO()
        Image.fromarray(photo_like(40 + 8 * i, 32, 100 + i)).save(buf, format="JPEG", quality=90)
        images[rel] = buf.getvalue()
        client.put_object(Bucket=s3_bucket, Key=f"p/{rel}", Body=images[rel])
    inp, out = f"s3://{s3_bucket}/p", f"s3://{s3_bucket}/out"
    args = ["run", inp, out, "--model", TEST_ARCH, "--weights", str(checkpoint), "--no-progress"]
    assert cli.main(args) == 0
    table = summary.read(out)
    rows = table.to_pylist()
    assert sorted(r["uri"] for r in rows) == sorted(f"{inp}/{rel}" for rel in ODD_KEYS)
    assert {r["status"] for r in rows} == {"ok"}, [(r["uri"], r["error"]) for r in rows]
    masks = [r["mask_uri"] for r in rows]
    assert len(set(masks)) == len(ODD_KEYS)
    fs, _ = fsspec.core.url_to_fs(out)
    model = load_model(checkpoint)
    for row in rows:
        rel = row["uri"][len(inp) + 1 :]
        name = mask_name(row["mask_uri"], row["uri"], f"{s3_bucket}/out/masks/")
        assert input_relpath(name) == rel  # the mask's name maps back to its own key
        mask = np.asarray(Image.open(io.BytesIO(fs.cat_file(fs._strip_protocol(row["mask_uri"])))))
        assert np.array_equal(mask, reference_mask(images[rel], model)), rel
    # A rerun finds every key done: no second ok row for any of them.
    assert cli.main(args) == 0
    assert summary.read(out).num_rows == len(ODD_KEYS)
