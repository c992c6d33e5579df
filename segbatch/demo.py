"""`make demo`: label the bundled sample photos with an embedded local Ray, then say where things are.

Pretrained weights are used when they can be had (already in the torch hub cache, or downloadable);
otherwise the demo says so and falls back to ``--weights random``, whose masks mean nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources

from segbatch import RunConfig, run
from segbatch.errors import WeightsError
from segbatch.weights import ensure_default_weights

BANNER = "=" * 78


def samples_dir() -> str:
    return str(resources.files("segbatch") / "samples")


def pick_weights(arch: str) -> str:
    try:
        cached = ensure_default_weights(arch)
    except WeightsError as exc:
        print(
            f"\n{BANNER}\nPretrained weights are not available here:\n  {exc}\n"
            f"Falling back to --weights random: an UNTRAINED model. The masks below show that the\n"
            f"pipeline works; their labels mean nothing.\n{BANNER}\n",
            file=sys.stderr,
        )
        return "random"
    print(f"using torchvision's pretrained weights from the torch hub cache: {cached}")
    return "default"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="demo-output")
    parser.add_argument("--model", default="deeplabv3_mobilenet_v3_large")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    weights = pick_weights(args.model)
    config = RunConfig(input=samples_dir(), output=args.output, model=args.model, weights=weights, redo_all=True)
    report = run(config)
    print(f"\n{report}\n")
    print(
        "Read the summary with pyarrow or pandas:\n"
        f"  python -c \"import pyarrow.dataset as ds; print(ds.dataset('{args.output}/summary')"
        ".to_table().to_pandas()[['uri','status','width','height','mask_uri']])\""
    )
    return 0 if report.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
