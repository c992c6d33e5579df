"""Recurring runs you can trust, the checks that need no Ray: settings, names, listing, leases, preflight."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from segbatch import cli, errors
from segbatch._internal import _storage
from segbatch.config import RunConfig, parse_storage_value
from segbatch.errors import ConfigError, InputError, WeightsError
from segbatch.models import weights
from segbatch.stages import listing, manifest
from segbatch.store import _lease
from segbatch.store.contract import MAX_SEGMENT_BYTES, UnsafePathError, input_relpath, mask_relpath

from _helpers import TEST_ARCH, make_checkpoint

EXIT_CONFIG, EXIT_INPUT = 2, 4  # segbatch.errors.EXIT_STATUS: settings, inputs


# -- 12: config file values of the wrong type -----------------------------------------------------------
@pytest.mark.parametrize(
    "field,value",
    [
        ("png_compress_level", "5"),
        ("overlays", "false"),
        ("redo_all", "false"),
        ("max_error_rate", "5%"),
        ("batch_size", 2.5),
        ("progress", 1),
        ("decode_cpus", "1"),
        ("batch_size", True),
        ("writers", 5),
    ],
)
def test_config_values_of_the_wrong_type_are_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"input": "in", "output": "out", field: value})
    assert err.value.field == field and field in str(err.value) and "e.g." in str(err.value)


def test_every_setting_has_its_type_checked():
    from segbatch import config

    checked = {
        *config._STR_FIELDS,
        *config._INT_FIELDS,
        *config._NUMBER_FIELDS,
        *config._BOOL_FIELDS,
        "storage_options",
        "extensions",
        "writers",
    }
    assert set(RunConfig.field_names()) == checked


def test_config_file_type_error_exits_2(tmp_path, capsys):
    conf = tmp_path / "run.yaml"
    conf.write_text('redo_all: "false"\nmax_error_rate: "5%"\n')
    assert cli.main(["run", str(tmp_path), str(tmp_path / "o"), "--config", str(conf)]) == EXIT_CONFIG
    assert "must be" in capsys.readouterr().err


def _billion_laughs(key: str) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]")
    body = "\n".join("  " + line for line in lines)
    return f"{key}:\n{body}\n" if key != "storage_options" else f"storage_options:\n{body}\n"


@pytest.mark.parametrize("key", ["batch_size", "input", "storage_options"])
def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys, key):
    """Issue 22 item 5: nested aliases expand ~1 KB into 9^9 strings; they are refused while parsing."""
    conf = tmp_path / "bomb.yaml"
    conf.write_text(_billion_laughs(key))
    started = time.monotonic()
    assert cli.main(["run", str(tmp_path), str(tmp_path / "o"), "--config", str(conf)]) == EXIT_CONFIG
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert "aliases" in err and len(err) < 2000


def test_a_wrong_type_error_shows_a_bounded_value():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"input": "in", "output": "out", "batch_size": ["x" * 10_000] * 1000})
    assert len(str(err.value)) < 500


def test_a_huge_config_file_is_refused(tmp_path, capsys):
    from segbatch.config import MAX_CONFIG_BYTES

    conf = tmp_path / "big.yaml"
    conf.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    assert cli.main(["run", str(tmp_path), str(tmp_path / "o"), "--config", str(conf)]) == EXIT_CONFIG
    assert "bytes" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["1: 2\n", "true: x\n", "null: 3\n"])
def test_a_config_key_that_is_not_text_exits_2(tmp_path, capsys, text):
    """Issue 22 item 9: a YAML key `1: 2` is a ConfigError, not an AttributeError traceback."""
    conf = tmp_path / "run.yaml"
    conf.write_text(text)
    assert cli.main(["run", str(tmp_path), str(tmp_path / "o"), "--config", str(conf)]) == EXIT_CONFIG
    assert "name must be text" in capsys.readouterr().err


# -- 13: storage-option values ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,value",
    [
        ("true", True),
        ("false", False),
        ("null", None),
        ("5242880", 5242880),
        ("0.5", 0.5),
        ("-3", -3),
        ("0777", "0777"),
        ("no", "no"),
        ("yes", "yes"),
        ("@X", "@X"),
        ("1e", "1e"),
        ("", ""),
        ("[1]", "[1]"),
    ],
)
def test_storage_option_values_are_json_scalars_else_strings(text, value):
    assert parse_storage_value(text) == value and type(parse_storage_value(text)) is type(value)


def test_storage_option_secret_never_echoed(capsys):
    args = cli.make_parser().parse_args(
        ["run", "i", "o", "--storage-option", "secret=@hunter2:x", "--storage-option", "mode=0777"]
    )
    assert cli.build_config(args).storage_options == {"secret": "@hunter2:x", "mode": "0777"}
    with pytest.raises(SystemExit):
        cli.make_parser().parse_args(["run", "i", "o", "--storage-option", "hunter2"])
    assert "hunter2" not in capsys.readouterr().err


# -- 6: run ids, colliding and long mask names -----------------------------------------------------------
@pytest.mark.parametrize("run_id", ["../x", "a/b", ".hidden", "..", "x..y", "a b", ""])
def test_bad_run_ids_are_refused(run_id):
    with pytest.raises(ConfigError, match="run_id"):
        RunConfig(input="i", output="o", run_id=run_id)
    RunConfig(input="i", output="o", run_id="2026-01-01T00.nightly_1")


def test_file_beside_a_folder_named_like_its_mask_do_not_collide():
    a, b = mask_relpath("x.jpg"), mask_relpath("x.jpg.png/y.jpg")
    assert not b.startswith(a + "/") and input_relpath(b) == "x.jpg.png/y.jpg"
    assert mask_relpath("X.JPG.PNG/y.jpg") != mask_relpath("X.JPG") + "/y.jpg.png"


def test_long_names_are_shortened_uniquely_and_fit_a_filesystem():
    long_a, long_b = "a" * 250 + "1.jpg", "a" * 250 + "2.jpg"
    names = [mask_relpath(n) for n in (long_a, long_b, "d" * 240 + "/x.jpg", "é" * 200 + ".jpg")]
    assert len(set(names)) == 4
    for name in names:
        assert all(len(seg.encode()) <= MAX_SEGMENT_BYTES for seg in name.split("/"))
        with pytest.raises(ValueError, match="summary"):
            input_relpath(name)
    assert mask_relpath(long_a) == mask_relpath(long_a)  # deterministic: a rerun finds the same mask


def test_non_utf8_names_list_and_become_error_rows(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.jpg").write_bytes(b"x")
    os.close(os.open(os.fsencode(src) + b"/caf\xe9.jpg", os.O_CREAT | os.O_WRONLY))
    table = listing.list_inputs(str(src), {}, ["jpg"])  # used to raise UnicodeEncodeError
    rels = table["rel"].to_pylist()
    assert rels == ["caf\\xe9.jpg", "good.jpg"]
    with pytest.raises(UnsafePathError, match="not valid UTF-8"):
        mask_relpath(rels[0])


def test_symlinked_images_are_followed_and_folder_links_counted(tmp_path, caplog):
    src, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    src.mkdir(), elsewhere.mkdir()
    (elsewhere / "real.jpg").write_bytes(b"x")
    (src / "link.jpg").symlink_to(elsewhere / "real.jpg")
    (src / "broken.jpg").symlink_to(tmp_path / "nothing.jpg")
    (src / "own.jpg").write_bytes(b"y")
    table = listing.list_inputs(str(src), {}, ["jpg"])
    assert table["rel"].to_pylist() == ["link.jpg", "own.jpg"]
    assert "skipped 1 symbolic link" in caplog.text


# -- 3: OUTPUT inside INPUT ------------------------------------------------------------------------------
@pytest.mark.parametrize("output_rel", ["labels", "."])
def test_outputs_own_tree_is_never_listed(tmp_path, output_rel):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    (src / "a.jpg").write_bytes(b"x")
    (src / "sub" / "b.png").write_bytes(b"x")
    out = src / output_rel
    for d in ("masks", "overlays"):
        (out / d / "sub").mkdir(parents=True, exist_ok=True)
        (out / d / "a.jpg.png").write_bytes(b"x")
        (out / d / "sub" / "b.png.jpg").write_bytes(b"x")
    table = listing.list_inputs(str(src), {}, ["jpg", "png"], exclude_output=str(out))
    assert table["rel"].to_pylist() == ["a.jpg", "sub/b.png"]


def _photos_with_outputs(src: Path, out: Path) -> None:
    (src / "sub").mkdir(parents=True, exist_ok=True)
    (src / "a.jpg").write_bytes(b"x")
    (src / "sub" / "b.png").write_bytes(b"x")
    for d in ("masks", "overlays", "confidence", "summary", "runs"):  # every folder segbatch writes
        (out / d / "sub").mkdir(parents=True, exist_ok=True)
        (out / d / "a.jpg.png").write_bytes(b"x")
        (out / d / "sub" / "b.png.png").write_bytes(b"x")


def test_confidence_maps_of_output_equal_to_input_are_never_listed(tmp_path):
    """Issue 22 item 3a: `segbatch run X X --confidence`, twice: confidence/ is OUTPUT's own too."""
    src = tmp_path / "photos"
    _photos_with_outputs(src, src)
    table = listing.list_inputs(str(src), {}, ["jpg", "png"], exclude_output=str(src))
    assert table["rel"].to_pylist() == ["a.jpg", "sub/b.png"]


@pytest.mark.parametrize("layout", ["input-link", "output-link", "same-through-link"])
def test_output_reached_through_a_symbolic_link_is_never_listed(tmp_path, layout):
    """Issue 22 item 3b: INPUT a link to the folder OUTPUT is inside, or OUTPUT a link into INPUT."""
    src = tmp_path / "in"
    if layout == "input-link":
        _photos_with_outputs(src, src / "labels")
        (tmp_path / "inlink").symlink_to(src)
        inp, out = tmp_path / "inlink", src / "labels"
    elif layout == "output-link":
        _photos_with_outputs(src, src / "labels")
        (tmp_path / "outlink").symlink_to(src / "labels")
        inp, out = src, tmp_path / "outlink"
    else:
        _photos_with_outputs(src, src)
        (tmp_path / "inlink").symlink_to(src)
        inp, out = tmp_path / "inlink", src
    table = listing.list_inputs(str(inp), {}, ["jpg", "png"], exclude_output=str(out))
    assert table["rel"].to_pylist() == ["a.jpg", "sub/b.png"]


def test_input_that_is_one_of_outputs_folders_lists_nothing(tmp_path):
    out = tmp_path / "out"
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "a.jpg.png").write_bytes(b"x")
    with pytest.raises(InputError, match="no images found"):
        listing.list_inputs(str(out / "masks"), {}, ["png"], exclude_output=str(out))


# -- 4: manifest names -----------------------------------------------------------------------------------
def test_manifest_uris_are_canonical_and_masks_unique_per_input():
    spellings = ["/data/a.jpg", "//data/a.jpg", "file:///data/a.jpg", "/data/./a.jpg", "local:///data//a.jpg"]
    keys = manifest._manifest_keys(pa.table({"uri": spellings + ["s3://data/a.jpg", "s3a://data/a.jpg"]}), "/m")
    assert set(keys["uri"].to_pylist()) == {"/data/a.jpg", "s3://data/a.jpg"}
    local, s3 = manifest.manifest_rel("/data/a.jpg"), manifest.manifest_rel("s3://data/a.jpg")
    assert local == "file/data/a.jpg" and s3 == "s3/data/a.jpg" and mask_relpath(local) != mask_relpath(s3)


# -- 8, 9, 10: weights and model checked in the driver --------------------------------------------------
@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("w") / "good.pt")


def test_wrong_shaped_and_head_only_checkpoints_are_refused(good_checkpoint, tmp_path):
    state = torch.load(good_checkpoint, weights_only=True)
    bad = dict(state)
    key = next(k for k in bad if k.startswith("backbone.") and bad[k].ndim == 4)
    bad[key] = torch.zeros(*bad[key].shape[:-1], bad[key].shape[-1] + 1)
    torch.save(bad, tmp_path / "shape.pt")
    torch.save({k: v for k, v in state.items() if k.startswith("classifier.")}, tmp_path / "head.pt")
    for name, words in (("shape.pt", "size mismatch"), ("head.pt", "Missing key")):
        with pytest.raises(WeightsError, match="does not fit") as err:
            weights.resolve(TEST_ARCH, str(tmp_path / name))
        assert words in str(err.value)
        assert (
            cli.main(
                ["run", str(tmp_path), str(tmp_path / "o"), "--model", TEST_ARCH, "--weights", str(tmp_path / name)]
            )
            == EXIT_INPUT
        )


def test_default_weights_with_the_wrong_number_of_class_names_is_refused(tmp_path):
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    with pytest.raises(WeightsError, match="names 3 classes"):
        weights.resolve(TEST_ARCH, "default", classes_url=str(tmp_path / "classes.txt"))


def test_unknown_model_is_a_bad_setting(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path), str(tmp_path / "o"), "--model", "foo"]) == EXIT_CONFIG
    assert "model: unknown 'foo'" in capsys.readouterr().err


# -- 11: INPUT with nothing to label ---------------------------------------------------------------------
def test_input_without_images_says_so(tmp_path, capsys):
    empty, texts, single = tmp_path / "empty", tmp_path / "texts", tmp_path / "one.jpg"
    empty.mkdir(), texts.mkdir()
    (texts / "a.txt").write_text("x")
    single.write_bytes(b"x")
    for where, words in ((empty, "no images found"), (texts, "no images found"), (single, "is a file")):
        rc = cli.main(["run", str(where), str(tmp_path / "o"), "--model", TEST_ARCH, "--weights", "random"])
        err = capsys.readouterr().err
        assert rc == EXIT_INPUT and words in err, err
        if words == "no images found":
            assert ".jpg" in err and ".png" in err


# -- 7: OUTPUT not writable ------------------------------------------------------------------------------
@pytest.mark.integration  # `segbatch run` starts Ray in the background while it checks OUTPUT
def test_unwritable_output_exits_4_before_any_work(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"x")
    afile = tmp_path / "file"
    afile.write_text("x")
    base = ["run", str(src), "--model", TEST_ARCH, "--weights", "random"]
    for out, words in ((afile, "is a file"), (afile / "below", "is a file")):
        assert cli.main(base[:2] + [str(out)] + base[2:]) == EXIT_INPUT
        assert words in capsys.readouterr().err
    # A full disk (or read-only mount): the probe's write fails, and no temporary is left behind.
    full = tmp_path / "full"
    real = _storage.retry

    def no_space(fn, *args, **kwargs):
        if getattr(fn, "__name__", "") == "pipe_file":
            Path(args[0]).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(_storage, "retry", no_space)
    assert cli.main(base[:2] + [str(full)] + base[2:]) == EXIT_INPUT
    assert "no space left" in capsys.readouterr().err
    assert [p.name for p in full.rglob("*")] == []


def test_fatal_write_errors_are_recognised():
    assert errors.is_fatal_write_error(OSError(errno.ENOSPC, "full"))
    assert errors.is_fatal_write_error(PermissionError(errno.EACCES, "ro"))
    assert not errors.is_fatal_write_error(OSError(errno.ECONNRESET, "reset"))


# -- 2: the lease, locally -------------------------------------------------------------------------------
def test_local_lease_excludes_a_second_run_and_is_released(tmp_path):
    out = str(tmp_path / "out")
    first = _lease.Lease(out, {}, "run-a", timeout_s=60).acquire()
    with pytest.raises(errors.LeaseHeldError) as err:
        _lease.Lease(out, {}, "run-b", timeout_s=60).acquire()
    text = str(err.value)
    assert "run-a" in text and f"pid {os.getpid()}" in text and "last renewed" in text
    first.renew()
    assert first.lost is None
    first.release()
    assert not (tmp_path / "out" / _lease.LEASE_NAME).exists()
    _lease.Lease(out, {}, "run-b", timeout_s=60).acquire().release()


def test_stale_local_lease_is_taken_over_loudly(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    stale = {
        "host": "gone",
        "pid": 1,
        "run_id": "dead-run",
        "token": "t",
        "acquired_at": time.time() - 900,
        "renewed_at": time.time() - 600,
        "timeout_s": 60,
    }
    (out / _lease.LEASE_NAME).write_text(json.dumps(stale))
    lease = _lease.Lease(str(out), {}, "run-b", timeout_s=60).acquire()
    assert lease.took_over.run_id == "dead-run" and "STALE" in caplog.text and "dead-run" in caplog.text
    assert json.loads((out / _lease.LEASE_NAME).read_text())["run_id"] == "run-b"
    # The dead run, had it come back, would find that its lease was lost.
    lease.release()


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    import socket
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    out = tmp_path / "out"
    out.mkdir()
    fresh = {
        "host": socket.gethostname(),
        "pid": gone.pid,
        "run_id": "killed-run",
        "token": "t",
        "acquired_at": time.time(),
        "renewed_at": time.time(),
        "timeout_s": 120,
    }
    (out / _lease.LEASE_NAME).write_text(json.dumps(fresh))
    lease = _lease.Lease(str(out), {}, "next", timeout_s=120).acquire()
    assert lease.took_over.run_id == "killed-run" and "is gone" in caplog.text
    lease.release()


def test_a_lease_taken_over_is_noticed_by_its_old_holder(tmp_path):
    out = str(tmp_path / "out")
    mine = _lease.Lease(out, {}, "slow", timeout_s=60).acquire()
    mine._stop.set()  # no renewals from here on, as if the driver stalled
    mine.holder.renewed_at = 0
    (tmp_path / "out" / _lease.LEASE_NAME).write_bytes(mine.holder.to_bytes())
    other = _lease.Lease(out, {}, "other", timeout_s=60).acquire()
    mine.renew()
    with pytest.raises(errors.LeaseLostError):
        mine.check()
    other.release()


def test_a_lease_being_written_is_not_stale(tmp_path):
    """Issue 22 item 2: the moment between an exclusive create and its write leaves an empty lease file;
    a second run reading it then must not take it over as if it were renewed at epoch 0."""
    out = tmp_path / "out"
    out.mkdir()
    (out / _lease.LEASE_NAME).write_bytes(b"")  # created by another run this instant, not yet written
    with pytest.raises(errors.LeaseHeldError, match="unreadable lease file"):
        _lease.Lease(str(out), {}, "second", timeout_s=60).acquire()
    assert (out / _lease.LEASE_NAME).read_bytes() == b""  # left to its creator
    # Once the file is older than the timeout, it is stale like any other lease.
    old = time.time() - 600
    os.utime(out / _lease.LEASE_NAME, (old, old))
    _lease.Lease(str(out), {}, "later", timeout_s=60).acquire().release()


def test_a_local_lease_is_never_seen_empty(tmp_path):
    """The lease is written whole before its name exists (a hard link of a written temporary), and the
    temporary is gone afterwards."""
    out = tmp_path / "out"
    lease = _lease.Lease(str(out), {}, "whole", timeout_s=60).acquire()
    try:
        assert json.loads((out / _lease.LEASE_NAME).read_text())["run_id"] == "whole"
        assert sorted(p.name for p in out.iterdir()) == [_lease.LEASE_NAME]
    finally:
        lease.release()


def _race_for_the_lease(out: str, start: float, queue) -> None:
    time.sleep(max(0.0, start - time.time()))
    try:
        lease = _lease.Lease(out, {}, f"racer-{os.getpid()}", timeout_s=60).acquire()
    except errors.LeaseHeldError:
        queue.put(False)
        return
    queue.put(True)
    time.sleep(0.5)  # hold it while the other racer looks
    lease.release()


def test_two_processes_racing_for_a_local_lease_never_both_hold_it(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for trial in range(15):
        out = str(tmp_path / f"out{trial}")
        queue = ctx.Queue()
        start = time.time() + 0.2
        racers = [ctx.Process(target=_race_for_the_lease, args=(out, start, queue)) for _ in range(2)]
        for p in racers:
            p.start()
        for p in racers:
            p.join(30)
        got = sorted(queue.get(timeout=5) for _ in racers)
        assert got == [False, True], f"trial {trial}: {got}"


@pytest.mark.parametrize(
    "content", [b"[1, 2]", b"5", b'"x"', b"{", b'{"renewed_at": 1e20}', b'{"renewed_at": "nan"}', b'{"pid": []}']
)
def test_a_damaged_lease_file_is_held_until_its_mtime_is_stale(tmp_path, content):
    """Issue 22 item 9: a lease file that is no lease is a lease of an unknown holder renewed at the
    file's mtime: exit 2 while fresh, taken over once stale, never a traceback."""
    out = tmp_path / "out"
    out.mkdir()
    (out / _lease.LEASE_NAME).write_bytes(content)
    with pytest.raises(errors.LeaseHeldError, match="unreadable lease file"):
        _lease.Lease(str(out), {}, "next", timeout_s=60).acquire()
    old = time.time() - 600
    os.utime(out / _lease.LEASE_NAME, (old, old))
    lease = _lease.Lease(str(out), {}, "next", timeout_s=60).acquire()
    assert lease.took_over.unreadable
    lease.release()


def test_lease_timeout_setting(monkeypatch):
    monkeypatch.setenv(_lease.TIMEOUT_ENV, "abc")
    with pytest.raises(ConfigError):
        _lease.lease_timeout()
    monkeypatch.setenv(_lease.TIMEOUT_ENV, "30")
    assert _lease.lease_timeout() == 30.0


# -- 2: the lease on S3 (moto): conditional PUTs ----------------------------------------------------------
def test_s3_lease_uses_conditional_puts(s3_bucket, s3_server, caplog):
    out = f"s3://{s3_bucket}/labels"
    first = _lease.Lease(out, {}, "run-a", timeout_s=60).acquire()
    assert f"labels/{_lease.LEASE_NAME}" in s3_server.keys(s3_bucket)
    with pytest.raises(errors.LeaseHeldError, match="run-a"):
        _lease.Lease(out, {}, "run-b", timeout_s=60).acquire()
    first.renew()
    assert first.lost is None
    first.release()
    assert s3_server.keys(s3_bucket) == []
    # A stale lease is replaced with If-Match on the copy that was read; the loser of a race gets none.
    stale = {
        "host": "gone",
        "pid": 1,
        "run_id": "dead-run",
        "token": "t",
        "acquired_at": 0,
        "renewed_at": 0,
        "timeout_s": 60,
    }
    s3_server.client().put_object(Bucket=s3_bucket, Key=f"labels/{_lease.LEASE_NAME}", Body=json.dumps(stale))
    taker = _lease.Lease(out, {}, "run-c", timeout_s=60)
    _holder, etag, raw = taker._read()
    assert taker.acquire().took_over.run_id == "dead-run" and "STALE" in caplog.text
    late = _lease.Lease(out, {}, "run-d", timeout_s=60)
    assert not late._replace_stale(raw, etag, late.holder.to_bytes())  # the ETag it read is gone
    assert taker._read()[0].run_id == "run-c"
    taker.release()


# -- 14: bench arguments ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra", [["--batch-size", "x"], ["--skip", "z"], ["--model", "foo"], ["--limit", "0"], ["--device", "nope"]]
)
def test_bench_bad_arguments_are_usage_errors(tmp_path, capsys, extra):
    (tmp_path / "a.jpg").write_bytes(b"x")
    try:
        rc = cli.main(["bench", str(tmp_path), *extra])
    except SystemExit as exc:  # argparse's usage error
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "error:" in err or "segbatch: " in err


def test_unreachable_endpoint_is_a_message_and_exit_4(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(_storage, "RETRY_ATTEMPTS", 1)
    rc = cli.main(
        [
            "run",
            "s3://nowhere-bucket/in",
            str(tmp_path / "o"),
            "--model",
            TEST_ARCH,
            "--weights",
            "random",
            "--storage-option",
            "endpoint_url=http://127.0.0.1:9",
        ]
    )
    err = capsys.readouterr().err
    assert rc == EXIT_INPUT and "cannot reach storage" in err, err


def test_a_full_disk_mid_run_is_found_behind_rays_wrapping_and_leaves_no_temporary(tmp_path, monkeypatch):
    from segbatch.errors import fatal_write_error as _fatal_write_error

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("task failed") from inner
    except RuntimeError as outer:
        assert _fatal_write_error(outer).errno == errno.ENOSPC
    assert _fatal_write_error(RuntimeError("a bug")) is None

    fs, root = _storage.open_url(str(tmp_path))

    def partial_then_full(path, data, **kwargs):
        Path(path).write_bytes(data[:1])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs, "pipe_file", partial_then_full)
    with pytest.raises(OSError):
        _storage.write_atomic(fs, f"{root}/masks/a.png", b"data")
    assert [p.name for p in (tmp_path / "masks").iterdir()] == []


# -- issue 22 items 9 and 11: bad paths given to the CLI are one line and a documented status ------------
def test_compact_of_a_file_or_a_missing_path_is_exit_4_and_creates_nothing(tmp_path, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    assert cli.main(["compact", str(afile)]) == EXIT_INPUT
    assert "is a file" in capsys.readouterr().err
    missing = tmp_path / "missing"
    assert cli.main(["compact", str(missing)]) == EXIT_INPUT
    assert "does not exist" in capsys.readouterr().err
    assert not missing.exists()


@pytest.mark.parametrize("problem", ["weights-folder", "classes-missing", "classes-folder", "random-bytes"])
def test_unusable_weights_or_classes_are_one_line_and_exit_4(tmp_path, capsys, problem):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"x")
    args = ["run", str(src), str(tmp_path / "out"), "--model", TEST_ARCH, "--weights", "random", "--no-progress"]
    if problem == "weights-folder":
        args[args.index("random")] = str(tmp_path)
    elif problem == "classes-missing":
        args += ["--classes", str(tmp_path / "missing.txt")]
    elif problem == "classes-folder":
        args += ["--classes", str(src)]
    else:
        (tmp_path / "rand.pt").write_bytes(os.urandom(5000))
        args[args.index("random")] = str(tmp_path / "rand.pt")
    assert cli.main(args) == EXIT_INPUT
    full = capsys.readouterr().err
    err = [line for line in full.splitlines() if line.startswith("segbatch:")]
    assert len(err) == 1 and len(err[0]) < 400, err
    assert "Traceback" not in full and "weights_only" not in full  # not torch's paragraphs either
