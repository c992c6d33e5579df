"""`make demo`: label the bundled sample photos with an embedded local Ray, write the report, say what next.

Pretrained weights are used when they can be had (already in the torch hub cache, or downloadable);
otherwise the demo says so loudly and falls back to seeded, BatchNorm-calibrated weights
(segbatch/models/seeded.py): untrained, so the labels mean nothing, but the masks follow the photos' content, so
the masks, overlays and report show that the pipeline works.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from importlib import resources

from segbatch import RunConfig, run
from segbatch._internal import _logs
from segbatch.errors import WeightsError
from segbatch.models.weights import ensure_default_weights

BANNER = "=" * 78


def samples_dir() -> str:
    return str(resources.files("segbatch") / "samples")


def pick_weights(arch: str) -> str:
    """``default`` when torchvision's pretrained weights are here or downloadable, else the path of the
    seeded checkpoint."""
    try:
        cached = ensure_default_weights(arch)
    except WeightsError as exc:
        from segbatch.models.seeded import cached_checkpoint

        path = cached_checkpoint(arch)
        print(
            f"\n{BANNER}\nPretrained weights are not available here:\n  {exc}\n"
            "Falling back to SEEDED, UNTRAINED weights (BatchNorm-calibrated, segbatch/models/seeded.py):\n"
            f"  {path}\n"
            "The masks follow the photos' edges and regions, so they show that the pipeline works;\n"
            "their class NAMES MEAN NOTHING. With network access, `make demo` uses the pretrained weights.\n"
            f"{BANNER}\n",
            file=sys.stderr,
        )
        return str(path)
    print(f"using torchvision's pretrained weights from the torch hub cache: {cached}")
    return "default"


def _bin(name: str) -> str:
    """How to call ``name`` of this Python's environment from the current folder, e.g. ``.venv/bin/segbatch``."""
    folder = os.path.dirname(sys.executable)
    rel = os.path.relpath(folder)
    where = rel if not rel.startswith("..") else folder
    return os.path.join(where, name)


def next_steps(output: str) -> list[str]:
    """Commands that work exactly as printed, from the folder the demo ran in."""
    segbatch = _bin("segbatch") if os.path.exists(_bin("segbatch")) else f"{_bin('python')} -m segbatch"
    out = shlex.quote(output)
    python = _bin("python")
    read = (
        "import pyarrow.dataset as ds; "
        f"print(ds.dataset({json.dumps(output + '/summary')}).to_table().to_pandas()"
        '[["uri", "status", "width", "height"]])'
    )
    return [
        f"{segbatch} status {out}",
        f"{segbatch} report {out}",
        f"{python} -c {shlex.quote(read)}",
        f"{segbatch} run --help",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="demo-output")
    parser.add_argument("--model", default="deeplabv3_mobilenet_v3_large")
    args = parser.parse_args(argv)
    _logs.configure(0)

    weights = pick_weights(args.model)
    config = RunConfig(input=samples_dir(), output=args.output, model=args.model, weights=weights, redo_all=True)
    report = run(config)
    print(f"\n{report}\n")
    from segbatch.commands._report import write_report

    where = write_report(args.output, {})
    print(f"segbatch report: wrote {where} (open it in a browser)\n")
    activate = os.path.join(os.path.dirname(_bin("python")), "activate")
    print("Next, from this folder (or `source " + activate + "` first, then plain `segbatch ...`):")
    for command in next_steps(args.output):
        print(f"  {command}")
    return 0 if report.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
