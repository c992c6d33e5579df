"""Settings are validated once, and errors name the field and the fix."""

import pytest

from segbatch.cli import build_config, make_parser
from segbatch.config import DEFAULT_EXTENSIONS, RunConfig
from segbatch.errors import ConfigError


def test_defaults_follow_the_design():
    c = RunConfig(input="in", output="out")
    assert c.model == "deeplabv3_resnet101" and c.weights == "default" and c.precision == "fp32"
    assert set(DEFAULT_EXTENSIONS) == {"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"}


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"precision": "fp8"}, "precision"),
        ({"actors": "3:1"}, "actors"),
        ({"max_error_rate": 2}, "max_error_rate"),
        ({"weights_sha256": "abc"}, "weights_sha256"),
        ({"upsample": "cubic"}, "upsample"),
        ({"gpus_per_actor": -1}, "gpus_per_actor"),  # 0 is CPU inference (issue 22 item 11)
        ({"gpus_per_actor": float("inf")}, "gpus_per_actor"),
    ],
)
def test_bad_values_name_their_field(changes, field):
    with pytest.raises(ConfigError) as err:
        RunConfig(input="in", output="out", **changes)
    assert err.value.field == field and field in str(err.value)


def test_unknown_setting_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"input": "x", "bacth_size": 3})
    assert "bacth_size" in str(err.value) and "batch_size" in str(err.value)


def test_repr_never_shows_storage_secrets():
    c = RunConfig(input="in", output="out", storage_options={"secret": "hunter2"})
    assert "hunter2" not in repr(c) and "secret" in repr(c)


@pytest.mark.parametrize(
    "suffix,body",
    [
        (".yaml", "model: deeplabv3_resnet50\nbatch-size: 8\nstorage_options:\n  anon: false\n"),
        (".toml", 'model = "deeplabv3_resnet50"\nbatch_size = 8\n[storage_options]\nanon = false\n'),
    ],
)
def test_config_file_holds_the_same_settings_and_flags_win(tmp_path, suffix, body):
    path = tmp_path / f"run{suffix}"
    path.write_text(body)
    args = make_parser().parse_args(
        ["run", "in", "out", "--config", str(path), "--batch-size", "2", "--storage-option", "default_block_size=1024"]
    )
    c = build_config(args)
    assert (c.model, c.batch_size) == ("deeplabv3_resnet50", 2)
    assert c.storage_options == {"anon": False, "default_block_size": 1024}


def test_writers_are_chosen_by_name_and_the_boolean_flags_are_aliases():
    parser = make_parser()
    config = build_config(parser.parse_args(["run", "in", "out", "--writers", "overlay,confidence"]))
    assert config.writers == ("overlay", "confidence")
    assert config.output_writers == ("mask", "overlay", "confidence") and config.computes_confidence
    old = build_config(parser.parse_args(["run", "in", "out", "--overlays", "--confidence"]))
    assert old.output_writers == config.output_writers and old.computes_confidence
    plain = RunConfig(input="in", output="out")
    assert plain.output_writers == ("mask",) and not plain.computes_confidence
    assert RunConfig.from_dict({"writers": ["mask", "overlay"]}).output_writers == ("mask", "overlay")


def test_an_unknown_writer_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        RunConfig(writers=("mask", "heatmap"))
    assert err.value.field == "writers" and "mask, overlay, confidence" in str(err.value)


def test_the_confidence_writer_refuses_nearest_upsampling_like_the_flag():
    with pytest.raises(ConfigError, match="confidence"):
        RunConfig(writers=("confidence",), upsample="nearest")
