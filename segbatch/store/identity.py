"""Which model labels an OUTPUT: ``OUTPUT/_segbatch.json`` (docs/recurring-runs.md).

The first run into an OUTPUT writes the identity of what labels it: architecture, weights identity (a
torchvision weights name, ``random:seed=0`` or the checkpoint's sha256), class names, upsample mode and
precision, everything that changes a mask. Every later run compares its own identity with it before any
image is read. A run with another identity stops (exit 2) unless it is ``--redo-all``: that relabels
every input with the new model, rewrites the file, and records ``relabel_since`` (the time the new
identity was bound). From then on only ok rows written since then count as done, so a ``--redo-all`` that
stops halfway is finished by the next plain run, and rows of the old model are never taken as labelled.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc

from segbatch._internal import _storage
from segbatch.errors import ConfigError, IdentityMismatchError

log = logging.getLogger(__name__)

IDENTITY_NAME = "_segbatch.json"
IDENTITY_VERSION = 1
#: The fields of an identity, in the order messages show them.
FIELDS = ("model", "weights", "classes", "upsample", "precision")


def of_run(config, spec) -> dict[str, Any]:
    """The identity of a run: what its masks depend on besides the image."""
    return {
        "model": spec.arch,
        "weights": spec.identity,
        "classes": list(spec.classes),
        "upsample": config.upsample,
        "precision": config.precision,
    }


def describe(identity: Mapping[str, Any]) -> str:
    parts = []
    for name in FIELDS:
        if name not in identity:
            continue
        value = identity[name]
        if name == "classes" and isinstance(value, list):
            value = f"{len(value)} names ({', '.join(map(str, value[:3]))}{', ...' if len(value) > 3 else ''})"
        parts.append(f"{name}={value}")
    return ", ".join(parts)


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [name for name in FIELDS if name in old and old.get(name) != new.get(name)]


@dataclass
class Binding:
    identity: dict[str, Any]
    relabel_since: float | None  # epoch seconds; ok rows written before it are from an earlier identity
    changed_from: dict[str, Any] | None = None  # set when this run (a --redo-all) rebinds OUTPUT
    #: The identity file this binding still has to write: (output, options, identity, run_id, since,
    #: previous), or None. Written by :meth:`commit`, once the run is about to label something, so a
    #: run refused or with nothing to do never binds OUTPUT to its model.
    pending: tuple | None = None

    def commit(self) -> None:
        if self.pending is not None:
            _write(*self.pending)
            self.pending = None


def _location(output_url: str, storage_options: Mapping[str, Any] | None):
    fs, root = _storage.open_url(output_url, storage_options)
    return fs, _storage.join_path(root, IDENTITY_NAME)


def read(output_url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The contents of OUTPUT/_segbatch.json, or None when OUTPUT has none yet."""
    fs, path = _location(output_url, storage_options)
    fs.invalidate_cache(path)
    try:
        raw = _storage.retry(fs.cat_file, path, what=f"read {path}")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("identity"), dict):
            raise ValueError("no identity mapping")
        # Every identity segbatch writes names all its fields: one with fewer (a hand-edited `{}`) would
        # match any model, and let another model's rows count as done beside the old ones.
        missing = [name for name in FIELDS if name not in data["identity"]]
        if missing:
            raise ValueError(f"its identity lacks {', '.join(missing)}")
        since = data.get("relabel_since")
        if since is not None and (
            isinstance(since, bool) or not isinstance(since, (int, float)) or not math.isfinite(since)
        ):
            raise ValueError("relabel_since is not a number of seconds")
        return data
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(
            "output",
            f"{IDENTITY_NAME} in OUTPUT is unreadable ({exc})",
            "restore it from a backup, or delete it to bind OUTPUT to this run's model",
        ) from None


def _write(
    output_url: str,
    storage_options,
    identity: dict[str, Any],
    run_id: str,
    relabel_since: float | None,
    previous: dict[str, Any] | None,
    inputs: str | None = None,
) -> None:
    fs, path = _location(output_url, storage_options)
    data = {
        "version": IDENTITY_VERSION,
        "identity": identity,
        "inputs": inputs,
        "bound_by_run": run_id,
        "bound_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "relabel_since": relabel_since,
        "previous": previous,
    }
    _storage.write_atomic(fs, path, (json.dumps(data, indent=1) + "\n").encode())


def _legacy_identity(output_url: str, storage_options) -> dict[str, Any] | None:
    """For an OUTPUT labelled before identity files existed: the model and weights of its ok rows, when
    they differ from one another or from ``current`` (the summary records only these two)."""
    from segbatch.store import summary

    table = summary.read(output_url, storage_options, columns=["model", "weights"], filter=pc.field("status") == "ok")
    if table.num_rows == 0:
        return None
    pairs = table.group_by(["model", "weights"]).aggregate([]).to_pylist()
    if len(pairs) == 1:
        return {"model": pairs[0]["model"], "weights": pairs[0]["weights"]}
    return {
        "model": "+".join(sorted({str(p["model"]) for p in pairs})),
        "weights": "+".join(sorted({str(p["weights"]) for p in pairs})),
    }


#: How an OUTPUT's inputs are named (``inputs`` in the identity file): relative to a listed INPUT, or by
#: their protocol and path (a manifest). The two namings can meet (a listed ``INPUT/file/data/a.jpg`` and a
#: manifest's ``/data/a.jpg`` both name ``masks/file/data/a.jpg.png``), so one OUTPUT holds one kind.
LISTED, MANIFEST = "listed", "manifest"


def inputs_kind(config) -> str:
    return MANIFEST if getattr(config, "manifest", None) else LISTED


def _check_inputs_kind(data: Mapping[str, Any] | None, kind: str) -> None:
    bound = data.get("inputs") if data else None
    if bound not in (None, kind):
        raise IdentityMismatchError(
            f"OUTPUT holds the masks of {bound} inputs; this run's inputs are {kind}, and their masks could "
            "take the names of the ones there (a listed INPUT/file/data/a.jpg and a manifest's /data/a.jpg "
            "both name masks/file/data/a.jpg.png)",
            "write to another OUTPUT",
        )


def bind(config, spec, run_id: str) -> Binding:
    """Check this run's identity against OUTPUT's before any work; on the first run, and on a
    ``--redo-all`` that changes it, the returned binding's :meth:`Binding.commit` writes it (call that
    once the run is about to label something). Raises IdentityMismatchError otherwise. Call it holding
    the lease."""
    mine = of_run(config, spec)
    kind = inputs_kind(config)
    data = read(config.output, config.storage_options)
    _check_inputs_kind(data, kind)
    if data is None:
        old = _legacy_identity(config.output, config.storage_options)
        relabel_since = None
    else:
        old = data["identity"]
        relabel_since = data.get("relabel_since")
    diff = differences(old, mine) if old is not None else []
    if not diff:
        pending = None
        if data is None or data["identity"] != mine or data.get("inputs") != kind:
            pending = (
                config.output,
                config.storage_options,
                mine,
                run_id,
                relabel_since,
                data.get("previous") if data else None,
                kind,
            )
        return Binding(mine, relabel_since, pending=pending)
    if not config.redo_all:
        raise IdentityMismatchError(
            f"OUTPUT was labelled by [{describe(old)}]; this run is [{describe(mine)}] "
            f"(differs in {', '.join(diff)}). Mixing the two in one OUTPUT is refused",
            "pass --redo-all to relabel every input with the new model (OUTPUT then belongs to it), "
            "or write to another OUTPUT",
        )
    since = time.time()
    log.warning(
        "--redo-all: OUTPUT moves from [%s] to [%s]; every input is relabelled, and until it is, "
        "rows of the earlier model do not count as labelled",
        describe(old),
        describe(mine),
    )
    return Binding(
        mine, since, changed_from=old, pending=(config.output, config.storage_options, mine, run_id, since, old, kind)
    )
