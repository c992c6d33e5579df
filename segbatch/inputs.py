"""What every kind of input (a listed INPUT, a manifest) offers the pipeline.

The pipeline knows inputs only through :class:`Inputs`: :class:`segbatch.listing.ListedInputs` lists a
folder or prefix in the driver, :class:`segbatch.manifest.ManifestInputs` lets Ray read a file of URLs.
Both yield rows of :data:`segbatch.listing.LISTING_SCHEMA` and both have already dropped the inputs that
OUTPUT holds an ok row for.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["Inputs"]


class Inputs(Protocol):
    @property
    def pending(self) -> int | None:
        """Inputs still to do; None where that is known only once Ray has read them."""

    def counts(self) -> tuple[int, int]:
        """(inputs listed, of which skipped as already labelled), as far as known now."""

    def dataset(self, batch_size: int) -> Any:
        """The lazy Ray Dataset of the listing rows still to do; needs a running Ray."""
