"""One error family, one table from error class to exit status, and one table that says what an error
from storage means.

Every error segbatch raises on purpose is a :class:`SegbatchError`; its message is for a person and says
what to change. The CLI turns one into its exit status through :func:`exit_status`, so a new error class
gets its status here and nowhere else. One bad image is never an exception: it is an error row.

Errors segbatch meets (from the local disk, s3fs, botocore, aiohttp) are classified by :func:`classify`
into a :class:`Fault`: whether a retry may help, whether no write can succeed, whether a conditional
write lost. It reads what the error carries, never the words of its message: the storage service's error
code and HTTP status (botocore's ``ClientError.response``), the exception's class, and its errno. s3fs
turns a ``ClientError`` into an ``OSError`` subclass (its ``s3fs/errors.py``) and keeps the original as
the cause; :func:`classify` walks that chain, so a code s3fs translated lossily (412 becomes EINVAL, an
unknown code EIO) still counts.
"""

from __future__ import annotations

import enum
import errno
import sys
from collections.abc import Iterator

__all__ = [
    "BudgetError",
    "ConfigError",
    "EXIT_STATUS",
    "ExportIncomplete",
    "Fault",
    "IdentityMismatchError",
    "IncompleteRunError",
    "InputError",
    "LeaseHeldError",
    "LeaseLostError",
    "SegbatchError",
    "StorageError",
    "WeightsError",
    "classify",
    "describe_write_error",
    "exit_status",
    "fatal_write_error",
    "find_fault",
    "is_fatal_write_error",
    "is_transient",
    "is_unreachable",
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


def _about_output(problem: str, fix: str) -> str:
    return f"output: {problem}" + (f" ({fix})" if fix else "")


class LeaseHeldError(SegbatchError):
    """Another run holds OUTPUT's lease (``OUTPUT/_segbatch.lease``): nothing was done."""

    def __init__(self, problem: str, fix: str = ""):
        super().__init__(_about_output(problem, fix))


class LeaseLostError(SegbatchError):
    """This run's lease was taken over mid-run (it stalled past the timeout): it stopped writing; the rows
    it wrote before stay valid."""

    def __init__(self, problem: str):
        super().__init__(_about_output(problem, "another run now writes this OUTPUT; rerun once it is done"))


class IdentityMismatchError(SegbatchError):
    """OUTPUT is bound to another model or setting (``OUTPUT/_segbatch.json``): nothing was done."""

    def __init__(self, problem: str, fix: str = ""):
        super().__init__(_about_output(problem, fix))


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
    LeaseHeldError: 2,  # another run writes this OUTPUT: nothing ran
    IdentityMismatchError: 2,  # OUTPUT is bound to another model identity: nothing ran
    LeaseLostError: 7,  # run: another run took OUTPUT's lease mid-run; rows written before stay valid
}


def exit_status(error: SegbatchError) -> int:
    for cls in type(error).__mro__:
        if cls in EXIT_STATUS:
            return EXIT_STATUS[cls]
    return 1


# -- what an error from storage means ---------------------------------------------------------------------
class Fault(enum.Enum):
    """What a storage error means to segbatch; the value is how messages say it."""

    TRANSIENT = "a passing fault (throttling, a 5xx, a reset connection, a timeout)"
    UNREACHABLE = "the storage endpoint cannot be reached, or no credentials work there"
    NOT_FOUND = "not found"
    EXISTS = "a file is in the way"
    PRECONDITION = "it changed meanwhile (a conditional write was refused)"
    PERMISSION = "permission denied"
    READ_ONLY = "read-only filesystem"
    NO_SPACE = "no space left on the device"
    QUOTA = "the disk quota is used up"
    NOT_A_FOLDER = "a part of the path is a file, not a folder"
    TOO_LARGE = "file too large"


#: Faults no retry fixes when writing: a run stops instead of turning every image into an error row.
FATAL_WRITE_FAULTS = frozenset(
    {Fault.PERMISSION, Fault.READ_ONLY, Fault.NO_SPACE, Fault.QUOTA, Fault.NOT_A_FOLDER, Fault.TOO_LARGE}
)

#: Error codes of S3 and S3-compatible services (``response["Error"]["Code"]``).
BY_ERROR_CODE: dict[str, Fault] = {
    **dict.fromkeys(
        (
            "SlowDown",
            "ServiceUnavailable",
            "Throttling",
            "ThrottlingException",
            "ThrottledException",
            "RequestThrottled",
            "RequestThrottledException",
            "TooManyRequestsException",
            "RequestLimitExceeded",
            "BandwidthLimitExceeded",
            "RequestTimeout",
            "RequestTimeoutException",
            "InternalError",
            "PriorRequestNotComplete",
        ),
        Fault.TRANSIENT,
    ),
    "PreconditionFailed": Fault.PRECONDITION,
    "ConditionalRequestConflict": Fault.PRECONDITION,  # S3: a concurrent conditional write won (409)
    **dict.fromkeys(("NoSuchKey", "NoSuchBucket", "NoSuchUpload", "NotFound"), Fault.NOT_FOUND),
    **dict.fromkeys(
        (
            "AccessDenied",
            "AllAccessDisabled",
            "AccountProblem",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "ExpiredToken",
        ),
        Fault.PERMISSION,
    ),
}

#: HTTP statuses (``response["ResponseMetadata"]["HTTPStatusCode"]``), for codes not in BY_ERROR_CODE.
BY_HTTP_STATUS: dict[int, Fault] = {
    **dict.fromkeys((429, 500, 502, 503, 504), Fault.TRANSIENT),
    412: Fault.PRECONDITION,
    404: Fault.NOT_FOUND,
    403: Fault.PERMISSION,
}

#: Exception classes, most specific first: (module, class name), looked up in the module once it is
#: imported (an error of a module never imported cannot occur), then the built-in ones.
BY_CLASS: tuple[tuple[str, str, Fault], ...] = (
    ("botocore.exceptions", "NoCredentialsError", Fault.UNREACHABLE),
    # `--storage-option secret=...` without `key` (or the reverse): botocore refuses half a pair.
    ("botocore.exceptions", "PartialCredentialsError", Fault.UNREACHABLE),
    ("botocore.exceptions", "ConnectTimeoutError", Fault.TRANSIENT),
    ("botocore.exceptions", "ConnectionError", Fault.UNREACHABLE),  # no connection to the endpoint, or its proxy
    ("botocore.exceptions", "HTTPClientError", Fault.TRANSIENT),  # read timeouts, connections closed
    ("aiohttp", "ClientConnectorError", Fault.UNREACHABLE),
    ("aiohttp", "ServerDisconnectedError", Fault.TRANSIENT),
    ("aiohttp", "ClientPayloadError", Fault.TRANSIENT),
    ("builtins", "FileNotFoundError", Fault.NOT_FOUND),
    ("builtins", "FileExistsError", Fault.EXISTS),
    ("builtins", "PermissionError", Fault.PERMISSION),
    ("builtins", "NotADirectoryError", Fault.NOT_A_FOLDER),
    ("builtins", "TimeoutError", Fault.TRANSIENT),
    ("builtins", "ConnectionError", Fault.TRANSIENT),  # resets, aborts, broken pipes, refusals
)

#: errno values; s3fs gives EBUSY to SlowDown, ServiceUnavailable and 503, EREMOTEIO to InternalError.
BY_ERRNO: dict[int, Fault] = {
    **dict.fromkeys(
        (errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE, errno.ECONNABORTED, errno.EAGAIN, errno.EBUSY),
        Fault.TRANSIENT,
    ),
    **({errno.EREMOTEIO: Fault.TRANSIENT} if hasattr(errno, "EREMOTEIO") else {}),
    errno.ENOENT: Fault.NOT_FOUND,
    errno.EEXIST: Fault.EXISTS,
    errno.EACCES: Fault.PERMISSION,
    errno.EPERM: Fault.PERMISSION,
    errno.EROFS: Fault.READ_ONLY,
    errno.ENOSPC: Fault.NO_SPACE,
    errno.EDQUOT: Fault.QUOTA,
    errno.ENOTDIR: Fault.NOT_A_FOLDER,
    errno.EFBIG: Fault.TOO_LARGE,
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The error, then what it was raised from: ``__cause__`` (s3fs keeps its ClientError there), Ray's
    ``cause`` (a task's own error), else the ``__context__`` Python kept (``raise`` inside ``except``)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        ray_cause = getattr(e, "cause", None)
        todo.append(ray_cause if isinstance(ray_cause, BaseException) else None)
        todo.append(e.__cause__ if e.__cause__ is not None or e.__suppress_context__ else e.__context__)


def _by_response(exc: BaseException) -> Fault | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = (response.get("Error") or {}).get("Code")
    if code in BY_ERROR_CODE:
        return BY_ERROR_CODE[code]
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if status is None and isinstance(code, str) and code.isdigit():  # s3fs's own "404", "503" codes
        status = int(code)
    return BY_HTTP_STATUS.get(status) if isinstance(status, int) else None


def _by_class(exc: BaseException) -> Fault | None:
    for module_name, name, fault in BY_CLASS:
        module = sys.modules.get(module_name)
        cls = getattr(module, name, None) if module is not None else None
        if isinstance(cls, type) and isinstance(exc, cls):
            return fault
    return None


def find_fault(exc: BaseException) -> tuple[Fault, BaseException] | None:
    """What a storage error means and the error in its chain that says so, or None when nothing says:
    for the error and then each error it was raised from, its service error code, HTTP status, class,
    errno (the first that says)."""
    for e in _chain(exc):
        fault = _by_response(e) or _by_class(e)
        if fault is None and isinstance(e, OSError) and isinstance(e.errno, int):
            fault = BY_ERRNO.get(e.errno)
        if fault is not None:
            return fault, e
    return None


def classify(exc: BaseException) -> Fault | None:
    """What a storage error means (see :func:`find_fault`), or None."""
    found = find_fault(exc)
    return found[0] if found else None


def is_transient(exc: BaseException) -> bool:
    """Whether a retry may help: throttling, 5xx, resets and timeouts; never 403, 404 or a full disk."""
    return classify(exc) is Fault.TRANSIENT


def is_fatal_write_error(exc: BaseException) -> bool:
    """Whether no write to this OUTPUT can succeed (read-only, full, permission denied, below a file)."""
    return classify(exc) in FATAL_WRITE_FAULTS


def is_unreachable(exc: BaseException) -> bool:
    """Whether storage could not be reached (after retries), or would not take the credentials."""
    return classify(exc) in (Fault.UNREACHABLE, Fault.TRANSIENT)


def fatal_write_error(exc: BaseException) -> BaseException | None:
    """The error in ``exc``'s chain (Ray wraps a task's error) that says no write can succeed, if any."""
    found = find_fault(exc)
    return found[1] if found and found[0] in FATAL_WRITE_FAULTS else None


def describe_write_error(exc: BaseException) -> str:
    """Why writing OUTPUT failed, in words, with the class of the error that says so."""
    found = find_fault(exc)
    if found is None or found[0] not in {*FATAL_WRITE_FAULTS, Fault.EXISTS}:
        return f"{type(exc).__name__}: {exc}"
    fault, carrier = found
    reason = "OUTPUT, or a folder above it, is a file" if fault in (Fault.NOT_A_FOLDER, Fault.EXISTS) else fault.value
    return f"{reason} ({type(carrier).__name__})"
