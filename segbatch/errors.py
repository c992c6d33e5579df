"""One error family, and one table from error class to exit status.

Every error segbatch raises on purpose is a :class:`SegbatchError`; its message is for a person and says
what to change. The CLI turns one into its exit status through :func:`exit_status`, so a new error class
gets its status here and nowhere else. One bad image is never an exception: it is an error row.
"""

from __future__ import annotations

__all__ = [
    "BudgetError",
    "ConfigError",
    "EXIT_STATUS",
    "ExportIncomplete",
    "IncompleteRunError",
    "InputError",
    "SegbatchError",
    "StorageError",
    "WeightsError",
    "exit_status",
]


class SegbatchError(Exception):
    """Base of every error segbatch raises on purpose."""


class ConfigError(SegbatchError, ValueError):
    """A setting is wrong. The message names the field and says how to fix it."""

    def __init__(self, field_name: str, problem: str, fix: str = ""):
        self.field = field_name
        msg = f"{field_name}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


class InputError(SegbatchError, FileNotFoundError):
    """INPUT, a manifest, OUTPUT or a ground-truth folder cannot be used; nothing ran."""


class WeightsError(SegbatchError, ValueError):
    """The weights cannot be used: missing, wrong architecture, or not the pinned sha256."""


class StorageError(SegbatchError, OSError):
    """A storage backend refused or failed an operation the run cannot do without."""


class BudgetError(SegbatchError, RuntimeError):
    """More images failed than --max-error-rate allows; the rows written so far stay valid."""


class IncompleteRunError(SegbatchError):
    """A run ended without a row for every input it listed: it is not recorded as complete, and a rerun
    labels exactly the inputs still missing."""


class ExportIncomplete(SegbatchError):
    """`segbatch export` wrote its files, but some ok rows' masks could not be exported (each is listed)."""


#: Exit status of each error class; the most specific class of an error decides.
EXIT_STATUS: dict[type[SegbatchError], int] = {
    SegbatchError: 1,
    ConfigError: 2,  # bad flags or settings: nothing ran
    BudgetError: 3,  # --max-error-rate was passed: the run stopped, its rows stay valid
    InputError: 4,  # INPUT, OUTPUT or ground truth unusable: nothing ran
    WeightsError: 4,
    StorageError: 4,
    ExportIncomplete: 5,  # export: written, without the images listed
    IncompleteRunError: 6,  # run: some listed inputs came back without a row; rerun to complete
}


def exit_status(error: SegbatchError) -> int:
    for cls in type(error).__mro__:
        if cls in EXIT_STATUS:
            return EXIT_STATUS[cls]
    return 1
