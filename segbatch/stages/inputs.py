"""What every kind of input (a listed INPUT, a manifest) offers the pipeline, and the registry of kinds.

The pipeline knows inputs only through :class:`Inputs`: :class:`segbatch.stages.listing.ListedInputs` lists a
folder or prefix in Ray read tasks, :class:`segbatch.stages.manifest.ManifestInputs` lets Ray read a file of
URLs. Both yield rows of :data:`segbatch.store.contract.LISTING_SCHEMA`, both have already dropped the inputs
that OUTPUT holds an ok row for, and both report how many they listed and skipped through
segbatch/_internal/_tally.py.

Each kind is a class registered in :data:`INPUT_KINDS` by its ``name``; :func:`inputs_for` builds the one
whose ``selected_by(config)`` says the run's settings name it. Adding a kind is one registered class in
one of :data:`KIND_MODULES` (a new module is added to that list).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from segbatch._internal.registry import Registry
from segbatch.errors import ConfigError

__all__ = ["INPUT_KINDS", "KIND_MODULES", "Inputs", "inputs_for"]


class Inputs(Protocol):
    #: The kind's name in :data:`INPUT_KINDS`.
    name: str
    #: Listing parts that each report their final counts (read tasks); None where unknown in advance.
    parts: int | None
    #: Rows per block handed to decoding (a whole number of forward passes).
    block_rows: int

    def __init__(self, config: Any, relabel_since: float | None = None, run_id: str = "plan") -> None:
        """Check the settings and the input's existence in the driver; ok rows written before
        ``relabel_since`` (an earlier model's) do not count as done."""

    @classmethod
    def selected_by(cls, config: Any) -> bool:
        """Whether the run's settings name an input of this kind."""

    def plan(self, *, run_id: str, batch_size: int, block_rows: int, spread: int, max_shards: int, resize: Any) -> None:
        """Fix the run's sizing before :meth:`dataset` (driver only, before any listing)."""

    def dataset(self) -> Any:
        """The lazy Ray Dataset of the listing rows still to do; needs a running Ray."""

    def verification(self, run_id: str) -> Inputs:
        """The same inputs, less every one that run ``run_id`` wrote a row for."""


#: Input kinds by name, registered by the modules in :data:`KIND_MODULES`.
INPUT_KINDS: Registry[type[Inputs]] = Registry("input kind", "input")
#: The modules that register input kinds; imported on first use, so the registry is complete.
KIND_MODULES = ("segbatch.stages.manifest", "segbatch.stages.listing")


def inputs_for(config: Any, relabel_since: float | None = None, run_id: str = "plan") -> Inputs:
    """The inputs of the kind ``config`` names (INPUT: listed; --manifest: a manifest)."""
    for module in KIND_MODULES:
        importlib.import_module(module)
    for _, kind in INPUT_KINDS.items():
        if kind.selected_by(config):
            return kind(config, relabel_since, run_id=run_id)
    raise ConfigError("input", "missing", "pass INPUT (a folder or URL prefix) or --manifest FILE")
