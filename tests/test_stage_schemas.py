"""Each hand-off between the run's stages is a declared schema (segbatch.store.contract): every stage's
``__call__``, run here on real sample images and seeded weights without Ray, hands on exactly its schema."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import segbatch
from segbatch.models import weights
from segbatch.stages.decode import DecodeImages, Limits, ResizeSpec
from segbatch.stages.listing import list_inputs
from segbatch.stages.sinks import WriteOutputs
from segbatch.stages.writers import WriterContext
from segbatch.store.contract import (
    IMAGE_ROW_SCHEMA,
    LISTING_SCHEMA,
    PASS_SCHEMA,
    SUMMARY_SCHEMA,
    WRITTEN_SCHEMA,
    check_schema,
)

from _helpers import TEST_ARCH

SAMPLES = Path(segbatch.__file__).parent / "samples"
SMALL = ResizeSpec((64,), 2)  # the model runs on any size; small keeps the forward passes cheap
OK = 6  # the samples, each labelled; broken.jpg is the seventh input, an error row
LIMITS = Limits(100_000_000, 512 * 1024 * 1024, 16_000_000)


def _schema_of(table: pa.Table) -> list[tuple[str, pa.DataType]]:
    return [(f.name, f.type) for f in table.schema]


def _declared(schema: pa.Schema) -> list[tuple[str, pa.DataType]]:
    return [(f.name, f.type) for f in schema]


@pytest.fixture(scope="module")
def stages(tmp_path_factory, checkpoint):
    """Each stage's output on the samples (plus one broken file, which becomes an error row)."""
    root = tmp_path_factory.mktemp("schemas")
    inputs = root / "in"
    shutil.copytree(SAMPLES, inputs, ignore=shutil.ignore_patterns("*.md"))
    (inputs / "broken.jpg").write_bytes(b"not an image")
    listing = list_inputs(str(inputs), {}, ("jpg", "png"))
    passes = DecodeImages(str(inputs), {}, SMALL, LIMITS, max_batch=2)(listing)

    from segbatch.stages import inference

    spec = weights.resolve(TEST_ARCH, str(checkpoint))
    patch = pytest.MonkeyPatch()
    import ray

    patch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node-under-test"))
    try:
        segmenter = inference.Segmenter(spec, min_confidence=0.5, threads=1)
        plain = inference.Segmenter(spec, threads=1)
    finally:
        patch.undo()
    images = segmenter(passes)
    context = WriterContext(str(root / "out"), {}, input_url=str(inputs), classes=spec.classes, limits=LIMITS)
    sink = WriteOutputs(context, ("mask", "overlay", "confidence"), run_id="r1", model=spec.arch, weights=spec.identity)
    written = sink(images)
    return SimpleNamespace(
        root=root, listing=listing, passes=passes, images=images, plain=plain(passes), written=written, sink=sink
    )


def test_listing_rows_are_the_listing_schema(stages):
    assert _schema_of(stages.listing) == _declared(LISTING_SCHEMA)
    assert stages.listing.num_rows == OK + 1


def test_decode_hands_the_model_pass_rows(stages):
    assert _schema_of(stages.passes) == _declared(PASS_SCHEMA)
    images = [img for row in stages.passes.to_pylist() for img in row["images"]]
    assert sorted(i["uri"] for i in images) == sorted(stages.listing["uri"].to_pylist())
    assert [i["rel"] for i in images if i["error"]] == ["broken.jpg"]


def test_the_model_hands_the_writers_one_image_row_each(stages):
    for table in (stages.images, stages.plain):
        assert _schema_of(table) == _declared(IMAGE_ROW_SCHEMA)
        assert table.num_rows == OK + 1
        assert set(table["node_id"].to_pylist()) == {"node-under-test"} and set(table["device"].to_pylist()) == {"cpu"}
    ok = [r for r in stages.images.to_pylist() if r["error"] is None]
    assert len(ok) == OK and all(r["confidence"] and r["mean_confidence"] is not None for r in ok)
    assert all(r["confidence"] is None for r in stages.plain.to_pylist())  # not asked for: null, same columns


def test_the_sinks_hand_the_driver_written_rows_and_a_full_summary(stages):
    assert _schema_of(stages.written) == _declared(WRITTEN_SCHEMA)
    assert sorted(stages.written["status"].to_pylist()) == ["error"] + ["ok"] * OK
    (part,) = (stages.root / "out" / "summary").glob("*.parquet")
    summary = pq.read_table(part)
    assert _schema_of(summary) == _declared(SUMMARY_SCHEMA)
    ok = summary.filter(pa.compute.equal(summary["status"], "ok"))
    for column in ("node_id", "device", "size", "mtime", "mask_uri", "mean_confidence"):
        assert ok[column].null_count == 0, column  # every declared upstream column arrived
    for folder in ("masks", "overlays", "confidence"):
        assert len(list((stages.root / "out" / folder).rglob("*.*"))) == OK, folder


def test_a_renamed_column_upstream_is_refused_at_the_hand_off(stages):
    renamed = stages.images.rename_columns(["node" if n == "node_id" else n for n in stages.images.column_names])
    with pytest.raises(TypeError, match="node_id: missing"):
        stages.sink(renamed)
    with pytest.raises(TypeError, match="model rows do not match"):
        check_schema(stages.images.drop_columns(["device"]), IMAGE_ROW_SCHEMA, "model")
