"""segbatch: batch semantic segmentation of images at scale, torchvision models on Ray Data.

>>> from segbatch import RunConfig, run
>>> report = run(RunConfig(input="imgs/", output="labels/", weights="random"))

Names load on first use, so ``import segbatch`` (and the CLI's start-up) does not import torch or Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
    "RunConfig": ("segbatch.config", "RunConfig"),
    "RunReport": ("segbatch.pipeline", "RunReport"),
    "run": ("segbatch.pipeline", "run"),
    "status": ("segbatch.commands._status", "collect"),
    "report": ("segbatch.commands._report", "write_report"),
    "evaluate": ("segbatch.commands._evaluate", "evaluate"),
    "available_models": ("segbatch.models.architectures", "available_models"),
    "SegbatchError": ("segbatch.errors", "SegbatchError"),
    "ConfigError": ("segbatch.errors", "ConfigError"),
    "IncompleteRunError": ("segbatch.errors", "IncompleteRunError"),
    "InputError": ("segbatch.errors", "InputError"),
    "WeightsError": ("segbatch.errors", "WeightsError"),
    "StorageError": ("segbatch.errors", "StorageError"),
    "BudgetError": ("segbatch.errors", "BudgetError"),
    "LeaseHeldError": ("segbatch.errors", "LeaseHeldError"),
    "LeaseLostError": ("segbatch.errors", "LeaseLostError"),
    "IdentityMismatchError": ("segbatch.errors", "IdentityMismatchError"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'segbatch' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
