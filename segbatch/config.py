"""Run settings: one frozen dataclass, validated once at the edge.

Everything a run needs lives in :class:`RunConfig`. The CLI, config files (YAML or TOML) and the Python
API all build one through :func:`RunConfig.from_dict` / :meth:`RunConfig.replace`, so validation and its
error messages live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import reprlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from segbatch.errors import ConfigError

#: File extensions picked from a listed INPUT, matched case-insensitively (docs/output-contract.md).
DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")

PRECISIONS = ("fp32", "bf16", "fp16")
UPSAMPLE_MODES = ("exact", "bilinear", "nearest")

#: Largest config file read, in bytes. Settings fit in a few KB; the cap bounds what parsing may cost.
MAX_CONFIG_BYTES = 1024 * 1024
#: Characters of a setting's value shown in an error message; a whole value could be any size.
SHOWN_VALUE_CHARS = 80

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = SHOWN_VALUE_CHARS
_SHOWN.maxlist = _SHOWN.maxdict = _SHOWN.maxtuple = _SHOWN.maxset = 4
_SHOWN.maxlevel = 2


def _shown(value: Any) -> str:
    """A bounded repr for error messages: never the whole of a (possibly huge or nested) value."""
    return _SHOWN.repr(value)


#: A run id names OUTPUT/runs/<run_id>.json and summary files: no separators, no leading dot.
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")

# The type each setting must have, checked before any range check. Config files (YAML, TOML, JSON) and
# the Python API reach RunConfig without argparse's conversions, so "5" or "false" must be refused here
# rather than taken as a truthy string.
_STR_FIELDS = (
    "input",
    "output",
    "manifest",
    "model",
    "weights",
    "weights_sha256",
    "classes",
    "precision",
    "upsample",
    "address",
    "actors",
    "run_id",
)
_INT_FIELDS = ("batch_size", "max_image_pixels", "max_file_bytes", "max_model_pixels", "png_compress_level")
_NUMBER_FIELDS = ("gpus_per_actor", "cpus_per_actor", "decode_cpus", "max_error_rate", "min_confidence")
_BOOL_FIELDS = ("redo_changed", "redo_all", "overlays", "confidence", "progress")
_OPTIONAL = (
    "manifest",
    "weights_sha256",
    "classes",
    "address",
    "actors",
    "run_id",
    "gpus_per_actor",
    "cpus_per_actor",
    "max_error_rate",
    "batch_size",
    "decode_cpus",
)


def _parse_actors(value: str | int | None) -> tuple[int, int] | None:
    """``N`` -> (N, N); ``MIN:MAX`` -> autoscaling pool bounds."""
    if value is None or value == "":
        return None
    text = str(value)
    lo, sep, hi = text.partition(":")
    try:
        bounds = (int(lo), int(hi if sep else lo))
    except ValueError:
        raise ConfigError("actors", f"{text!r} is not N or MIN:MAX", "e.g. --actors 4 or --actors 1:8") from None
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise ConfigError("actors", f"{text!r} needs 1 <= MIN <= MAX", "e.g. --actors 2:8")
    return bounds


_EXAMPLES = {
    "batch_size": "8",
    "png_compress_level": "1",
    "max_error_rate": "0.05",
    "redo_all": "true",
    "redo_changed": "true",
    "overlays": "false",
    "progress": "false",
    "decode_cpus": "1",
    "max_image_pixels": "100000000",
    "max_file_bytes": "536870912",
    "max_model_pixels": "16000000",
}


@dataclass(frozen=True)
class RunConfig:
    """All settings of one ``segbatch run``; docs/cli.md describes each field."""

    input: str = ""
    output: str = ""
    manifest: str | None = None
    model: str = "deeplabv3_resnet101"
    weights: str = "default"
    weights_sha256: str | None = None
    classes: str | None = None
    batch_size: int | None = None  # None: segbatch._internal.resources picks one for the cluster's devices
    precision: str = "fp32"
    upsample: str = "exact"
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    address: str | None = None
    actors: str | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    decode_cpus: float | None = None  # None: segbatch._internal.resources.plan_pool picks it
    max_image_pixels: int = 100_000_000  # pixels; refuses decompression bombs before decoding
    max_file_bytes: int = 512 * 1024 * 1024  # bytes read per input file
    max_model_pixels: int = 16_000_000  # pixels after the weights' resize; long thin strips exceed it
    max_error_rate: float | None = None
    redo_changed: bool = False
    redo_all: bool = False
    # Per-image outputs by name (segbatch.stages.writers.WRITERS); the mask always. `overlays` and
    # `confidence` are aliases that add their writer (confidence also adds its summary columns).
    writers: tuple[str, ...] = ("mask",)
    overlays: bool = False
    confidence: bool = False  # confidence maps and columns; costs a literal full-resolution softmax per image
    min_confidence: float = 0.5  # a pixel under this largest softmax probability counts as low confidence
    png_compress_level: int = 1  # zlib level 0-9; masks compress well even at 1, and 1 is ~5x faster than 6
    run_id: str | None = None
    progress: bool = True

    # Storage options may hold secrets: never let them reach a log through repr().
    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "storage_options":
                value = {k: "***" for k in value}
            parts.append(f"{f.name}={value!r}")
        return f"RunConfig({', '.join(parts)})"

    def __post_init__(self) -> None:
        self._validate()

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from a mapping whose keys may use dashes or underscores (``batch-size``)."""
        known = set(cls.field_names())
        clean: dict[str, Any] = {}
        for key, value in values.items():
            if not isinstance(key, str):  # YAML `1: 2` or `true: x`
                raise ConfigError(_shown(key), "a setting's name must be text", "e.g. batch_size: 8")
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(key, "unknown setting", f"valid settings: {', '.join(sorted(known))}")
            clean[name] = value
        if "extensions" in clean and clean["extensions"] is not None:
            ext = clean["extensions"]
            ext = ext.split(",") if isinstance(ext, str) else ext
            if isinstance(ext, (list, tuple)) and all(isinstance(e, str) for e in ext):
                clean["extensions"] = tuple(e.strip().lower().lstrip(".") for e in ext if e.strip())
        if "writers" in clean and clean["writers"] is not None:
            names = clean["writers"]
            names = names.split(",") if isinstance(names, str) else names
            if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
                clean["writers"] = tuple(n.strip() for n in names if n.strip())
        if "storage_options" in clean and isinstance(clean["storage_options"], (Mapping, type(None))):
            clean["storage_options"] = dict(clean["storage_options"] or {})
        if "actors" in clean and clean["actors"] is not None:
            clean["actors"] = str(clean["actors"])
        return cls(**clean)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    # -- derived views --------------------------------------------------------------------------------
    @property
    def output_writers(self) -> tuple[str, ...]:
        """The output writers (segbatch.stages.writers) this run uses: the mask always and first, then
        ``writers``, then what the ``overlays`` and ``confidence`` aliases add; each once."""
        names = ("mask", *self.writers, *(("overlay",) if self.overlays else ()))
        names += ("confidence",) if self.confidence else ()
        return tuple(dict.fromkeys(names))

    @property
    def computes_confidence(self) -> bool:
        """Whether the model computes per-pixel confidence: ``--confidence``, or a writer that reads it."""
        from segbatch.stages.writers import get_writer

        return self.confidence or any(get_writer(n).needs_confidence for n in self.output_writers)

    @property
    def actor_bounds(self) -> tuple[int, int] | None:
        return _parse_actors(self.actors)

    # -- validation -----------------------------------------------------------------------------------
    def _check_types(self) -> None:
        for name in (*_STR_FIELDS, *_INT_FIELDS, *_NUMBER_FIELDS, *_BOOL_FIELDS):
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if name in _BOOL_FIELDS:
                ok, want = isinstance(value, bool), "true or false (unquoted)"
            elif name in _INT_FIELDS:
                ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer (unquoted)"
            elif name in _NUMBER_FIELDS:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                want = "a number (unquoted)" + (", e.g. 0.05 for 5%" if name == "max_error_rate" else "")
            else:
                ok, want = isinstance(value, str), "a string"
            if not ok:
                raise ConfigError(
                    name,
                    f"must be {want}, got {type(value).__name__} {_shown(value)}",
                    f"write e.g. {name}: {_EXAMPLES.get(name, 'a value of that type')}",
                )
        if not isinstance(self.storage_options, Mapping):
            raise ConfigError(
                "storage_options", f"must be a mapping of KEY: VALUE, got {type(self.storage_options).__name__}"
            )
        if not isinstance(self.extensions, tuple) or not all(isinstance(e, str) for e in self.extensions):
            raise ConfigError(
                "extensions", "must be a list of extensions or one comma-separated string", "e.g. extensions: jpg,png"
            )
        if not isinstance(self.writers, tuple) or not all(isinstance(n, str) for n in self.writers):
            raise ConfigError(
                "writers", "must be a list of writer names or one comma-separated string", "e.g. writers: mask,overlay"
            )

    def _validate(self) -> None:
        self._check_types()
        if self.input and self.manifest:
            raise ConfigError("manifest", "give INPUT or --manifest, not both")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ConfigError("batch_size", f"must be a positive integer, got {self.batch_size!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError("precision", f"unknown {self.precision!r}", f"choose one of {', '.join(PRECISIONS)}")
        if self.upsample not in UPSAMPLE_MODES:
            raise ConfigError("upsample", f"unknown {self.upsample!r}", f"choose one of {', '.join(UPSAMPLE_MODES)}")
        if not self.extensions:
            raise ConfigError("extensions", "is empty", "list at least one, e.g. jpg,png")
        for name in ("max_image_pixels", "max_file_bytes", "max_model_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")
        if self.run_id is not None and (not RUN_ID_PATTERN.fullmatch(self.run_id) or ".." in self.run_id):
            raise ConfigError(
                "run_id",
                f"{self.run_id!r} is not a valid run id",
                "use 1-128 of A-Z a-z 0-9 . _ -, not starting with '.' and without '..'",
            )
        if self.max_error_rate is not None and not 0.0 <= float(self.max_error_rate) <= 1.0:
            raise ConfigError("max_error_rate", f"must be within 0..1, got {self.max_error_rate!r}", "e.g. 0.01 for 1%")
        if not 0 <= int(self.png_compress_level) <= 9:
            raise ConfigError("png_compress_level", f"must be 0..9, got {self.png_compress_level!r}")
        # `not x < inf` refuses nan and inf too: a pool of infinite CPUs or GPUs never starts.
        if self.gpus_per_actor is not None and not 0 <= float(self.gpus_per_actor) < math.inf:
            raise ConfigError(
                "gpus_per_actor",
                f"must be a finite number >= 0, got {_shown(self.gpus_per_actor)}",
                "0 runs inference on CPUs; fractions such as 0.5 pack two models on one GPU",
            )
        if self.cpus_per_actor is not None and not 0 < float(self.cpus_per_actor) < math.inf:
            raise ConfigError("cpus_per_actor", f"must be a finite number > 0, got {_shown(self.cpus_per_actor)}")
        if self.decode_cpus is not None and not 0 < float(self.decode_cpus) < math.inf:
            raise ConfigError("decode_cpus", f"must be a finite number > 0, got {_shown(self.decode_cpus)}")
        if self.weights_sha256 is not None:
            digest = self.weights_sha256.lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ConfigError("weights_sha256", "is not a 64-digit hex sha256", "compute it with `sha256sum FILE`")
        if not 0.0 <= float(self.min_confidence) <= 1.0:
            raise ConfigError("min_confidence", f"must be within 0..1, got {self.min_confidence!r}", "e.g. 0.5")
        from segbatch.stages.writers import get_writer

        for name in self.writers:
            get_writer(name)  # an unknown name: ConfigError listing the valid ones
        if self.upsample == "nearest" and self.computes_confidence:
            raise ConfigError(
                "confidence",
                "needs the reference's interpolated logits; --upsample nearest skips them",
                "use --upsample exact (the default) or bilinear",
            )
        if self.redo_all and self.redo_changed:
            raise ConfigError("redo_all", "already redoes everything; drop --redo-changed")
        _parse_actors(self.actors)

    def check_runnable(self) -> None:
        """Checks that only apply when a run is about to start (not to partial configs)."""
        if not self.input and not self.manifest:
            raise ConfigError("input", "missing", "pass INPUT (a folder or URL prefix) or --manifest FILE")
        if not self.output:
            raise ConfigError("output", "missing", "pass OUTPUT, a folder or URL prefix")


_JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def parse_storage_value(text: str) -> Any:
    """A ``--storage-option KEY=VALUE`` value: a JSON scalar (``true``, ``false``, ``null``, a JSON
    number such as ``5242880`` or ``0.5``), else the text itself as a string. So ``0777``, ``no``,
    ``@secret`` and ``1e`` stay strings; nothing is read as YAML (whose 1.1 rules turn ``0777`` into 511
    and ``no`` into False)."""
    if text in ("true", "false", "null"):
        return json.loads(text)
    if _JSON_NUMBER.fullmatch(text):
        return json.loads(text)
    return text


def _no_alias_loader():
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        """safe_load without aliases: nested aliases (a "billion laughs" document) expand a few hundred
        bytes into gigabytes once a value is used; settings never need them."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.events.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, "aliases (*name) are not allowed in a config file", event.start_mark
                )
            return super().compose_node(parent, index)

    return NoAliasLoader


def load_config_file(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML, TOML or JSON config file from any fsspec URL into a plain dict."""
    import fsspec
    import yaml

    loader = _no_alias_loader()
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError("config", f"{url} is over {MAX_CONFIG_BYTES} bytes", "a config file holds a few settings")
    lower = url.lower()
    try:
        if lower.endswith(".toml"):
            data = tomllib.loads(raw.decode())
        elif lower.endswith(".json"):
            data = json.loads(raw)
        else:
            data = yaml.load(raw, Loader=loader) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"cannot parse {url}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("config", f"{url} must hold a mapping of settings, got {type(data).__name__}")
    # A `[run]` table / `run:` block is accepted so one file can hold other tools' sections too.
    if set(data) == {"run"} and isinstance(data["run"], dict):
        data = data["run"]
    return data
