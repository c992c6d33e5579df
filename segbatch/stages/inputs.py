"""What every kind of input (a listed INPUT, a manifest) offers the pipeline.

The pipeline knows inputs only through :class:`Inputs`: :class:`segbatch.stages.listing.ListedInputs` lists a
folder or prefix in Ray read tasks, :class:`segbatch.stages.manifest.ManifestInputs` lets Ray read a file of
URLs. Both yield rows of :data:`segbatch.stages.listing.LISTING_SCHEMA`, both have already dropped the inputs
that OUTPUT holds an ok row for, and both report how many they listed and skipped through
segbatch/_internal/_tally.py.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["Inputs"]


class Inputs(Protocol):
    #: Listing parts that each report their final counts (read tasks); None where unknown in advance.
    parts: int | None
    #: Rows per block handed to decoding (a whole number of forward passes).
    block_rows: int

    def plan(self, *, run_id: str, batch_size: int, block_rows: int, spread: int, max_shards: int, resize: Any) -> None:
        """Fix the run's sizing before :meth:`dataset` (driver only, before any listing)."""

    def dataset(self) -> Any:
        """The lazy Ray Dataset of the listing rows still to do; needs a running Ray."""

    def verification(self, run_id: str) -> Inputs:
        """The same inputs, less every one that run ``run_id`` wrote a row for."""
