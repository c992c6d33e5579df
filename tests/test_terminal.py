"""At the terminal: one progress bar on a TTY, short progress lines in a log, no line of Ray's own noise
on a default run, Ray's lines back with -v; help that prints the defaults the code uses."""

from __future__ import annotations

import io
import os
import re
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segbatch._internal import _logs, resources
from segbatch._internal.progress import INTERVAL_ENV, RunProgress
from segbatch.config import RunConfig

from _helpers import TEST_ARCH, write_inputs

# Lines that only Ray writes; a default run shows none of them.
RAY_NOISE = (
    "core_worker.cc",
    "Token authentication",
    "auth_token",
    "Started a local Ray instance",
    "streaming_executor",
    "Progress bars",
    "progress UI",
    "(MapWorker",
    "logging.cc",
    "Execution plan",
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_DATA_DISABLE_PROGRESS")}
    env.pop("RAY_AUTH_MODE", None)  # what a user gets: Ray's token authentication and its notice
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    env.update(extra)
    return env


def _run_cmd(tmp_path: Path, checkpoint: Path, *extra: str) -> list[str]:
    write_inputs(tmp_path / "in")
    return [
        sys.executable,
        "-m",
        "segbatch",
        "run",
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        "--model",
        TEST_ARCH,
        "--weights",
        str(checkpoint),
        *extra,
    ]


def _on_pty(cmd: list[str], env: dict[str, str], timeout: float = 300) -> tuple[int, str]:
    """Run ``cmd`` with stdin, stdout and stderr on a real pseudo-terminal of 120x40; all it wrote."""
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every holder of the terminal's other side is gone
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            pytest.fail(f"timed out; output so far:\n{out.decode(errors='replace')[-3000:]}")
        return proc.wait(timeout=60), out.decode(errors="replace")
    finally:
        os.close(master)


# -- the progress display on its own ----------------------------------------------------------------------


def test_progress_in_a_log_writes_a_start_line_then_one_line_per_interval(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0.2")
    stream = io.StringIO()
    bar = RunProgress(True, stream)
    bar.update(skipped=3)
    bar.set_total(10)
    bar.update(2, 0)  # within the interval: no line
    time.sleep(0.25)
    bar.update(2, 1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "segbatch: labelling 10 images, 3 skipped (already labelled); progress every 0.2s"
    assert len(lines) == 2, lines
    assert re.fullmatch(r"segbatch: 5/10 images \(50%\), 4 ok, 1 error, [\d.]+ images/s, ETA \d+s", lines[1]), lines
    assert "\r" not in stream.getvalue() and not ANSI.search(stream.getvalue())


def test_no_progress_writes_nothing():
    stream = io.StringIO()
    with RunProgress(False, stream) as bar:
        bar.set_total(4)
        bar.update(4, 0)
    assert stream.getvalue() == ""


def test_progress_on_a_pty_is_one_bar_with_counts_rate_and_eta():
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    with open(slave, "w", closefd=True) as stream:
        bar = RunProgress(True, stream)
        assert bar.tty
        bar.set_total(8)
        bar.update(3, 1)
        bar.close()
    text = b""
    while select.select([master], [], [], 0.2)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        text += chunk
    os.close(master)
    final = text.decode().replace("\r\n", "\n").split("\r")[-1]
    assert "segbatch" in final and "4/8" in final and "50%" in final, final
    assert "images/s" in final and "ok=3 error=1" in final, final
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", final), final  # elapsed < ETA


def test_ray_core_lines_are_recognised():
    noise = b"[2026-12-02 03:51:17,084 E 4503 4503] core_worker.cc:2465: Actor with class name: 'MapWorker' and ID: 'x' has constructor arguments in the object store and max_restarts > 0. If"
    info = b"[2026-12-02 06:19:41,437 I 6886 6886] logging.cc:303: Set ray log level from environment variable"
    other_error = b"[2026-12-02 03:51:17,084 E 4503 4503] raylet_client.cc:12: something broke"
    assert _logs.is_ray_noise(noise) and _logs.is_ray_noise(info)
    assert not _logs.is_ray_noise(other_error)  # a real error of Ray's core still shows
    assert not _logs.is_ray_noise(b"segbatch: labelling 7 images")


# -- a real run, as a user sees it ------------------------------------------------------------------------


@pytest.mark.integration
def test_a_run_on_a_terminal_shows_a_bar_and_no_ray_noise(tmp_path, checkpoint):
    code, text = _on_pty(_run_cmd(tmp_path, checkpoint), _env())
    assert code == 0, text[-3000:]
    for noise in RAY_NOISE:
        assert noise not in text, f"{noise!r} in:\n{text}"
    frames = text.replace("\r\n", "\n").replace("\r", "\n")
    bar = [line for line in frames.splitlines() if line.startswith("segbatch:") and "|" in line]
    assert bar, text
    assert "7/7" in bar[-1] and "ok=6 error=1" in bar[-1] and "images/s" in bar[-1], bar[-1]
    assert re.search(r"segbatch run \S+: 6 ok, 1 error", text), text
    assert "\x1b[3" not in text  # no coloured worker prefixes


@pytest.mark.integration
def test_a_piped_run_logs_short_plain_lines_and_no_ray_noise(tmp_path, checkpoint):
    done = subprocess.run(
        _run_cmd(tmp_path, checkpoint),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    for noise in RAY_NOISE:
        assert noise not in text, f"{noise!r} in:\n{text}"
    assert not ANSI.search(text) and "\r" not in text, repr(text)
    assert "segbatch: labelling 7 images; progress every 30s" in done.stderr
    # The progress start line, segbatch's own compaction note, and the report (5 lines, one error example).
    assert len(text.splitlines()) <= 9, text
    # The run id's time is the start time the run record shows.
    import calendar
    import json

    record = json.loads(next((tmp_path / "out" / "runs").glob("*.json")).read_text())
    from_id = calendar.timegm(time.strptime(record["run_id"].split("-")[0], "%Y%m%dT%H%M%SZ"))
    started = calendar.timegm(time.strptime(record["started_at"], "%Y-%m-%dT%H:%M:%SZ"))
    assert abs(from_id - started) <= 1, record


@pytest.mark.integration
def test_verbose_brings_rays_lines_back(tmp_path, checkpoint):
    done = subprocess.run(
        _run_cmd(tmp_path, checkpoint, "-v", "--no-progress"),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Started a local Ray instance" in done.stderr, done.stderr[-3000:]
    assert "labelling 7 images" not in done.stderr  # --no-progress


# -- help that tells the truth ----------------------------------------------------------------------------


def _help(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "segbatch", *args, "--help"],
        capture_output=True,
        text=True,
        env=_env(COLUMNS="400"),
        timeout=60,
        check=True,
    )
    return " ".join(done.stdout.split())


@pytest.mark.parametrize(
    ("flag", "field"),
    [
        ("--actors", "max_actors"),
        ("--cpus-per-actor", "cpus_per_actor"),
        ("--decode-cpus", "decode_cpus"),
        ("--batch-size", "batch_size"),
    ],
)
def test_run_help_prints_what_size_for_cluster_picks(flag, field):
    text = _help("run")
    entry = re.search(re.escape(flag) + r" [A-Z_]+ (.*?)(?= --[a-z])", text).group(1)
    assert "default auto:" in entry, entry
    examples = dict(re.findall(r"(\d+ CPUs(?: \+ \d+ GPUs)?): ([\d.]+)", entry))
    assert len(examples) >= 3, entry
    for where, shown in examples.items():
        cpus, gpus = (int(n) for n in (re.findall(r"\d+", where) + ["0"])[:2])
        size = resources.size_for_cluster(RunConfig(), cpus, gpus)
        assert float(shown) == pytest.approx(getattr(size, field)), (flag, where, shown, size)
    # The words name the constants size_for_cluster uses.
    rule = {
        "--actors": str(resources.THREADS_PER_ACTOR),
        "--decode-cpus": f"at most {resources.MAX_DECODE_CPUS:g}",
        "--cpus-per-actor": f"{resources.CPUS_PER_GPU_ACTOR:g}",
        "--batch-size": f"{resources.CPU_BATCH_SIZE} on CPU",
    }
    assert rule[flag] in entry, entry


def test_a_two_cpu_machine_gets_the_reservation_help_promises():
    """The case that was seen: a CPU-only run reserved 1.75 CPU for one actor while help said 1."""
    size = resources.size_for_cluster(RunConfig(), 2, 0)
    assert (size.max_actors, size.cpus_per_actor) == (1, 1.75)
    assert re.search(r"--cpus-per-actor \S+ .*?2 CPUs: 1\.75", _help("run"))


def test_every_literal_default_in_run_help_is_runconfigs():
    import argparse

    from segbatch.cli import make_parser

    sub = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    for action in sub.choices["run"]._actions:
        found = re.search(r"\(default ([^ ;:)]+)\)", action.help or "")
        if not found or action.dest not in RunConfig.field_names():
            continue
        want = getattr(RunConfig, action.dest)
        shown = found.group(1)
        assert shown == (f"{want:g}" if isinstance(want, float) else str(want)), (action.dest, shown, want)
        checked += 1
    assert checked >= 6, checked


def test_every_bench_flag_has_help_that_names_its_default():
    text = _help("bench").split("options:", 1)[1]
    for flag, default in (
        ("--model", "deeplabv3_mobilenet_v3_large"),
        ("--weights", "random"),
        ("--precision", "fp32"),
        ("--hours", "24"),
        ("--gpus-per-node", "8"),
        ("--cpus-per-node", "96"),
    ):
        entry = re.search(re.escape(flag) + r" [A-Z_{},a-z0-9]+ (.*?)\(default ([^)]+)\)", text)
        assert entry and entry.group(2) == default and "(default" not in entry.group(1), (
            flag,
            entry and entry.group(0),
        )


def test_config_help_names_json():
    assert "YAML, TOML or JSON" in _help("run")


# -- torchvision's own spelling of weights ---------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        "default",
        "DEFAULT",
        "COCO_WITH_VOC_LABELS_V1",
        "DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1",
        "DeepLabV3_MobileNet_V3_Large_Weights.DEFAULT",
    ],
)
def test_torchvisions_spellings_of_the_pretrained_weights_are_default(spelling):
    from segbatch.models import weights

    assert weights.canonical(TEST_ARCH, spelling) == "default"


def test_torchvision_spellings_match_torchvisions_enum():
    from torchvision.models import get_model_weights

    from segbatch.models import weights

    enum = get_model_weights(TEST_ARCH)
    for spelling in weights.default_spellings(TEST_ARCH)[1:]:
        member = spelling.rsplit(".", 1)[-1]
        assert enum[member] is enum.DEFAULT, spelling


@pytest.mark.parametrize("bad", ["FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1", "IMAGENET1K_V1", "/no/such/file.pt"])
def test_a_wrong_weights_name_lists_the_valid_values(bad):
    from segbatch.errors import WeightsError
    from segbatch.models import weights

    with pytest.raises(WeightsError) as err:
        weights.resolve(TEST_ARCH, bad)
    assert "valid values: default | DEFAULT | COCO_WITH_VOC_LABELS_V1" in str(err.value), err.value
    assert "random" in str(err.value) and "state_dict" in str(err.value)


def test_the_cli_takes_torchvisions_spelling(tmp_path, monkeypatch):
    """Offline, --weights DEFAULT reaches the download (and says how to get the file), not 'does not exist'."""
    from segbatch.models import weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    resolved = []

    def fake_ensure(arch):
        resolved.append(arch)
        return str(tmp_path / "cached.pth")

    monkeypatch.setattr(weights, "ensure_default_weights", fake_ensure)
    spec = weights.resolve(TEST_ARCH, "DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1")
    assert resolved == [TEST_ARCH]
    assert spec.weights == "default" and spec.identity == "DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1"


# -- make demo leads somewhere ----------------------------------------------------------------------------


@pytest.mark.integration
def test_the_demo_falls_back_to_seeded_weights_and_its_next_commands_work_as_printed(tmp_path):
    env = _env(TORCH_HOME=str(tmp_path / "torch"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    done = subprocess.run(
        [sys.executable, "-m", "segbatch.commands.demo", "--output", "demo-output"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout + done.stderr
    if "Pretrained weights are not available" in text:  # offline, as CI is
        assert "SEEDED, UNTRAINED" in text and "seeded-bn-calibrated" in text
        import numpy as np

        from _helpers import summary_table

        # Not one class everywhere (what --weights random gives): the masks follow the photos.
        for counts in summary_table(tmp_path / "demo-output")["pixel_counts"].to_pylist():
            assert max(counts) / sum(counts) < 0.99 and np.count_nonzero(counts) >= 2, counts
    for noise in RAY_NOISE:
        assert noise not in text, noise
    assert (tmp_path / "demo-output" / "report.html").is_file()
    commands = done.stdout.split("Next, from this folder", 1)[1].splitlines()[1:]
    commands = [c.strip() for c in commands if c.startswith("  ")]
    assert len(commands) >= 3 and any(" status demo-output" in c for c in commands), done.stdout
    for command in commands:
        ran = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
        assert ran.returncode == 0, (command, ran.stderr[-2000:])
        assert ran.stdout.strip(), command


# -- small ones -------------------------------------------------------------------------------------------


def test_status_of_a_missing_output_says_it_does_not_exist(tmp_path, capsys):
    from segbatch.cli import main

    assert main(["status", str(tmp_path / "mistyped")]) == 4
    err = capsys.readouterr().err
    assert "does not exist" in err and "no runs yet" not in err, err


def test_export_names_the_files_it_wrote():
    from segbatch.commands.export import ExportResult

    zips = ExportResult("cvat", "/x/cvat.zip", images=6, shard_size=4)
    zips.shards = [{"path": "cvat-00000.zip", "images": 4}, {"path": "cvat-00001.zip", "images": 2}]
    text = str(zips)
    assert "into /x/\n" in text and "cvat-00000.zip, cvat-00001.zip" in text and "into /x/cvat.zip" not in text

    folder = ExportResult("cvat", "/x/cvat", images=6)
    folder.shards = [{"path": "", "images": 6}]
    assert str(folder).splitlines()[:2] == [
        "segbatch export: 6 images as cvat into /x/cvat",
        "  1 shard (up to 10000 images a shard)",
    ]

    one_zip = ExportResult("cvat", "/x/one.zip", images=6)
    one_zip.shards = [{"path": "one.zip", "images": 6}]
    assert "into /x/one.zip" in str(one_zip) and ": ." not in str(one_zip)


# -- the report shows what eval showed, and its matrix fits the window -------------------------------------


def _report_with_eval(tmp_path: Path) -> Path:
    import json

    import numpy as np

    from segbatch.commands._report import write_report
    from segbatch.models.architectures import VOC_CATEGORIES

    from _helpers import write_output

    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    write_output(
        out, [{"rel": f"{i}.jpg", "mask": rng.integers(0, 21, (8, 8))} for i in range(3)], list(VOC_CATEGORIES)
    )
    counts = rng.integers(10_000, 999_999, (21, 21)).tolist()
    ev = {
        "miou": 0.5,
        "pixel_accuracy": 0.6,
        "images": 2,
        "missing_ground_truth": 0,
        "missing_ground_truth_examples": [],
        "errors": 1,
        "error_examples": [{"uri": "/in/2.jpg", "error": "ground truth is 10x10, the mask 8x8"}],
        "per_class": [
            {"id": i, "class": c, "iou": 0.5, "support": sum(counts[i]), "predicted": sum(r[i] for r in counts)}
            for i, c in enumerate(VOC_CATEGORIES)
        ],
        "confusion_matrix": {"classes": list(VOC_CATEGORIES), "counts": counts},
        "worst_images": [],
    }
    (out / "eval.json").write_text(json.dumps(ev))
    write_report(str(out), samples=0)
    return out / "report.html"


def test_report_lists_images_that_failed_evaluation(tmp_path):
    html = _report_with_eval(tmp_path).read_text()
    section = html[html.index('id="evaluation"') : html.index('id="gallery"')]
    assert "failed evaluation" in section
    not_compared = section[section.index('id="not-compared"') : section.index('id="confusion"')]
    assert "/in/2.jpg" in not_compared and "ground truth is 10x10, the mask 8x8" in not_compared
    confusion = section[section.index('id="confusion"') :]
    assert confusion.count('class="n col"') == 21  # every VOC class, names whole (vertical headers)
    assert '<div class="scroll-x"><table id="confusion">' in section


@pytest.mark.integration  # starts a browser
def test_the_confusion_matrix_fits_a_1280px_window_in_chromium(tmp_path):
    import json

    from test_results import chromium

    page = _report_with_eval(tmp_path)
    probe = tmp_path / "probe.html"
    probe.write_text(
        page.read_text().replace(
            "</body>",
            """<script>window.addEventListener('load', () => {
  const t = document.querySelector('#confusion').getBoundingClientRect();
  const heads = [...document.querySelectorAll('#confusion th')];
  const out = {right: t.right, page: document.documentElement.scrollWidth,
               clipped: heads.filter(h => h.scrollWidth > h.clientWidth + 1 || h.scrollHeight > h.clientHeight + 1)
                             .map(h => h.textContent)};
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});</script></body>""",
        )
    )
    dom = chromium(tmp_path, probe.as_uri(), "--dump-dom", "--window-size=1280,900").stdout
    found = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1).replace("&quot;", '"'))
    assert found["right"] <= 1280 and found["page"] <= 1280, found
    assert found["clipped"] == [], found
