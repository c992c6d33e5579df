"""Stage 3's handle in the driver: the inference actor class, without torch on the driver's side.

Ray Data ships the class named here to the actor pool; the model and torch are imported in the actor's
``__init__`` (segbatch.stages.model.Segmenter), so the driver of a run never pays torch's import.
"""

from __future__ import annotations

from typing import Any


class Segmenter:
    """Ray Data map step on the actor pool; see :class:`segbatch.stages.model.Segmenter`."""

    def __init__(self, **kwargs: Any):
        from segbatch.stages import model

        self._impl = model.Segmenter(**kwargs)

    def __call__(self, batch):
        return self._impl(batch)


__all__ = ["Segmenter"]
