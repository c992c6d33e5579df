"""Weights resolution in the driver, without torch where it can: which model, which weights, which classes.

:func:`resolve` checks the weights once in the driver and pins their identity (a weights name or a
sha256) and class names, so a bad checkpoint fails the run before any image is touched. ``--weights
random`` and ``--weights default`` (once cached) need no torch here: the registry knows their class
names and preprocessing (segbatch.models.architectures), so the driver of such a run never imports torch.
Checking a checkpoint file loads it, and that imports torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from segbatch._internal import _storage
from segbatch.errors import WeightsError
from segbatch.models.architectures import Architecture, get_architecture

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

RANDOM_SEED = 0  # `--weights random` is seeded so every actor, and every run, builds the same model
MAX_CLASSES = 256  # masks are 8-bit PNGs: one byte per class id


@dataclass(frozen=True)
class ModelSpec:
    """Everything an actor needs to rebuild the model the driver resolved."""

    arch: str
    weights: str  # "default", "random", or a path/URL to a state_dict
    identity: str  # what the summary's `weights` column records: a weights name or a sha256
    classes: tuple[str, ...]
    storage_options: Mapping[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def architecture(self) -> Architecture:
        return get_architecture(self.arch)

    def __repr__(self) -> str:  # storage options may hold secrets
        return f"ModelSpec(arch={self.arch!r}, weights={self.weights!r}, identity={self.identity!r})"


#: Characters of a loader's error shown in a message: torch's unpickling errors run to several lines.
SHOWN_ERROR_CHARS = 200


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= SHOWN_ERROR_CHARS else line[: SHOWN_ERROR_CHARS - 3] + "..."


def _read_file(setting: str, url: str, storage_options: Mapping[str, Any], folder_fix: str) -> bytes:
    """The bytes of the file a setting names; WeightsError when it is missing or a folder."""
    fs, path = _storage.open_url(url, storage_options)
    try:
        return _storage.retry(fs.cat_file, path, what=f"read {url}")
    except FileNotFoundError:
        raise WeightsError(f"{setting}: {url} does not exist") from None
    except IsADirectoryError:
        raise WeightsError(f"{setting}: {url} is a folder; {folder_fix}") from None


def _read_classes(url: str, storage_options: Mapping[str, Any]) -> tuple[str, ...]:
    data = _read_file("classes", url, storage_options, "pass the file of class names")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise WeightsError(f"classes: {url} is not UTF-8 text (one class name per line, or a JSON list)") from None
    stripped = text.strip()
    try:
        names = json.loads(stripped) if stripped.startswith("[") else [line.strip() for line in text.splitlines()]
    except ValueError as exc:
        raise WeightsError(f"classes: {url} starts with '[' but is no JSON list ({_first_line(exc)})") from None
    if not isinstance(names, list):
        raise WeightsError(f"classes: {url} starts with '[' but is no JSON list")
    names = [str(n) for n in names if str(n)]
    if not names:
        raise WeightsError(f"classes: {url} holds no class names (one per line, or a JSON list)")
    return tuple(names)


def load_checkpoint(data: bytes, source: str, architecture: Architecture) -> dict[str, torch.Tensor]:
    """The state_dict in checkpoint bytes, checked against the architecture; WeightsError when it is not one."""
    import torch

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's unpickling errors are paragraphs that advise weights_only=False; a short one-line reason
        # (a damaged zip archive) is worth showing, the paragraphs are not.
        detail = str(exc).strip()
        reason = f"{type(exc).__name__}: {detail}" if detail and "\n" not in detail else type(exc).__name__
        if len(reason) > SHOWN_ERROR_CHARS:
            reason = type(exc).__name__
        raise WeightsError(
            f"weights: {source} is not a loadable state_dict ({reason}); pass a checkpoint saved with "
            "torch.save(model.state_dict(), PATH)"
        ) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # torchvision's reference training scripts save {"model": ...}
    if not isinstance(state, dict):
        raise WeightsError(f"weights: {source} holds a {type(state).__name__}, not a state_dict")
    return architecture.check_state_dict(state, source)


def fetch_weights(url: str, storage_options: Mapping[str, Any]) -> bytes:
    """A weights file's bytes; WeightsError when it is missing or a folder."""
    return _read_file("weights", url, storage_options, "pass the checkpoint file (.pt/.pth)")


def default_spellings(arch: str) -> tuple[str, ...]:
    """The ways to name an architecture's pretrained weights: ``default`` and torchvision's own spellings
    (``DEFAULT``, the member name such as ``COCO_WITH_VOC_LABELS_V1``, and the full enum names)."""
    full = get_architecture(arch).default_weights  # e.g. DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1
    enum, _, member = full.partition(".")
    return ("default", "DEFAULT", member, full, f"{enum}.DEFAULT")


def canonical(arch: str, weights: str) -> str:
    """``default`` for any spelling of the pretrained weights; ``weights`` itself otherwise. A torchvision
    weights name of another architecture, or an unknown one, is refused with the valid values."""
    if weights in default_spellings(arch):
        return "default"
    if weights == "random":
        return weights
    enum, dot, member = weights.partition(".")
    looks_like_enum = (dot and enum.endswith("_Weights") and "/" not in weights) or (
        weights.isupper() and weights.replace("_", "").isalnum()
    )
    if looks_like_enum:
        raise WeightsError(f"weights: {weights} is not a weights name of {arch}; {valid_weights(arch)}")
    return weights


def valid_weights(arch: str) -> str:
    return (
        f"valid values: {' | '.join(default_spellings(arch))} (torchvision's pretrained weights), random (untrained), "
        "or the path/URL of a state_dict file"
    )


def resolve(
    arch: str,
    weights: str,
    *,
    classes_url: str | None = None,
    sha256: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ModelSpec:
    """Check the weights in the driver and pin what the actors will load."""
    architecture = get_architecture(arch)
    weights = canonical(arch, weights)
    storage_options = dict(storage_options or {})
    categories = architecture.categories()
    num = len(categories)
    if weights == "default":
        if sha256:
            raise WeightsError("weights_sha256: pins a checkpoint file; it does not apply to --weights default")
        if classes_url:  # before any download: a wrong count is refused even offline
            named = len(_read_classes(classes_url, storage_options))
            if named != num:
                raise WeightsError(f"classes: {classes_url} names {named} classes; the model has {num}")
        ensure_default_weights(arch)
        identity, names = architecture.default_weights, categories
    elif weights == "random":
        log.warning(
            "\n%s\n!! --weights random: an UNTRAINED model (seed %d). Its masks mean nothing; use it for\n"
            "!! smoke tests and benchmarks only.\n%s",
            "!" * 78,
            RANDOM_SEED,
            "!" * 78,
        )
        identity, names = f"random:seed={RANDOM_SEED}", categories
    else:
        try:
            data = fetch_weights(weights, storage_options)
        except WeightsError as exc:
            raise WeightsError(f"{exc}; {valid_weights(arch)}") from None
        digest = hashlib.sha256(data).hexdigest()
        if sha256 and digest != sha256.lower():
            raise WeightsError(
                f"weights_sha256: {weights} has sha256 {digest}, not the pinned {sha256.lower()}; refusing it"
            )
        state = load_checkpoint(data, weights, architecture)
        num = int(state[architecture.head_key].shape[0])
        identity, names = digest, tuple(f"class_{i}" for i in range(num))
        if classes_url is None and num == len(categories):
            names = categories
    if classes_url:
        names = _read_classes(classes_url, storage_options)
        if len(names) != num:
            raise WeightsError(f"classes: {classes_url} names {len(names)} classes; the model has {num}")
    if len(names) > MAX_CLASSES:
        raise WeightsError(f"weights: {len(names)} classes; PNG masks hold at most {MAX_CLASSES} class ids")
    return ModelSpec(arch, weights, identity, tuple(names), storage_options)


def _hub_dir() -> str:
    """torch.hub.get_dir() without importing torch: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub, else
    ~/.cache/torch/hub. Where torch is already imported (torch.hub.set_dir may have moved it), ask torch."""
    if "torch" in sys.modules:
        import torch.hub

        return torch.hub.get_dir()
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch"
    )
    return os.path.join(os.path.expanduser(torch_home), "hub")


def ensure_default_weights(arch: str) -> str:
    """Download torchvision's DEFAULT weights into the torch hub cache once; return the cached file."""
    architecture = get_architecture(arch)
    url = architecture.default_url
    cached = os.path.join(_hub_dir(), "checkpoints", os.path.basename(url))
    if os.path.exists(cached):
        return cached
    import torch.hub

    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, cached, progress=False)
    except Exception as exc:
        raise WeightsError(
            f"weights: cannot download {architecture.default_weights} from {url} into the torch hub cache "
            f"({type(exc).__name__}: {exc}). Place the file at {cached}, pass a state_dict with "
            "--weights PATH, or use --weights random for a smoke test."
        ) from None
    return cached


__all__ = [
    "MAX_CLASSES",
    "RANDOM_SEED",
    "ModelSpec",
    "canonical",
    "default_spellings",
    "ensure_default_weights",
    "resolve",
]
