"""The one table of what an error means (segbatch.errors): classified by code, status, class and errno,
never by the words of a message or a path."""

from __future__ import annotations

import errno

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError
from s3fs.errors import translate_boto_error

from segbatch import errors
from segbatch._internal import _storage
from segbatch.errors import Fault, classify


def client_error(code: str, status: int, operation: str = "PutObject", **error: str) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": f"{code} happened", **error},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        operation,
    )


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.EROFS, "Read-only file system", "out/masks/cam_503/timeout.png"),
        PermissionError(errno.EACCES, "Permission denied", "out/masks/cam_503/x.png"),
        PermissionError(errno.EACCES, "Permission denied: request timeout 503 SlowDown"),
        OSError(errno.ENOSPC, "No space left on device", "/mnt/timeout/503/x.png"),
        FileNotFoundError(errno.ENOENT, "No such file", "in/throttled/503.jpg"),
    ],
)
def test_words_in_a_path_or_message_never_make_an_error_transient(exc):
    assert not errors.is_transient(exc)
    calls = []

    def fail():
        calls.append(1)
        raise exc

    with pytest.raises(type(exc)):
        _storage.retry(fail, what="write")
    assert len(calls) == 1  # not retried


def test_a_read_only_error_on_a_path_named_503_stops_the_run_instead():
    exc = OSError(errno.EROFS, "Read-only file system", "out/masks/cam_503/x.png")
    assert errors.is_fatal_write_error(exc)
    assert errors.describe_write_error(exc) == "read-only filesystem (OSError)"


@pytest.mark.parametrize(
    ("code", "status", "fault"),
    [
        ("SlowDown", 503, Fault.TRANSIENT),
        ("ServiceUnavailable", 503, Fault.TRANSIENT),
        ("Throttling", 400, Fault.TRANSIENT),
        ("InternalError", 500, Fault.TRANSIENT),
        ("RequestTimeout", 400, Fault.TRANSIENT),
        ("SomethingNew", 502, Fault.TRANSIENT),  # an unknown code: its HTTP status says
        ("PreconditionFailed", 412, Fault.PRECONDITION),
        ("ConditionalRequestConflict", 409, Fault.PRECONDITION),
        ("NoSuchKey", 404, Fault.NOT_FOUND),
        ("AccessDenied", 403, Fault.PERMISSION),
        ("InvalidArgument", 400, None),
    ],
)
def test_botocore_client_errors_by_code_and_status(code, status, fault):
    assert classify(client_error(code, status)) is fault


def test_a_client_error_whose_message_says_timeout_is_still_its_code():
    exc = ClientError(
        {
            "Error": {"Code": "AccessDenied", "Message": "timeout 503 slow down"},
            "ResponseMetadata": {"HTTPStatusCode": 403},
        },
        "PutObject",
    )
    assert classify(exc) is Fault.PERMISSION and not errors.is_transient(exc)


@pytest.mark.parametrize(
    ("code", "status", "translated", "fault"),
    [
        ("SlowDown", 503, OSError, Fault.TRANSIENT),  # s3fs: OSError(EBUSY)
        ("InternalError", 500, OSError, Fault.TRANSIENT),  # s3fs: OSError(EREMOTEIO)
        ("SomethingNew", 503, OSError, Fault.TRANSIENT),  # s3fs: OSError(EIO); the cause's status says
        ("PreconditionFailed", 412, OSError, Fault.PRECONDITION),  # s3fs: OSError(EINVAL)
        ("AccessDenied", 403, PermissionError, Fault.PERMISSION),
        ("NoSuchKey", 404, FileNotFoundError, Fault.NOT_FOUND),
        ("RequestTimeout", 400, TimeoutError, Fault.TRANSIENT),
    ],
)
def test_s3fs_translated_errors_keep_their_meaning(code, status, translated, fault):
    exc = translate_boto_error(client_error(code, status))
    assert type(exc) is translated
    assert classify(exc) is fault


def test_s3fs_create_conflict_is_exists_and_a_translation_without_cause_uses_the_context():
    created = translate_boto_error(client_error("PreconditionFailed", 412, Condition="If-None-Match"))
    assert isinstance(created, FileExistsError) and classify(created) is Fault.EXISTS
    try:
        try:
            raise client_error("PreconditionFailed", 412)
        except ClientError as e:
            raise translate_boto_error(e, set_cause=False)  # noqa: B904 - as s3fs's info() does
    except OSError as exc:
        assert exc.errno == errno.EINVAL and classify(exc) is Fault.PRECONDITION


@pytest.mark.parametrize(
    ("exc", "fault"),
    [
        (OSError(errno.ECONNRESET, "reset"), Fault.TRANSIENT),
        (ConnectionResetError(errno.ECONNRESET, "reset"), Fault.TRANSIENT),
        (OSError(errno.ETIMEDOUT, "x"), Fault.TRANSIENT),
        (OSError(errno.EROFS, "x"), Fault.READ_ONLY),
        (OSError(errno.ENOSPC, "x"), Fault.NO_SPACE),
        (OSError(errno.EACCES, "x"), Fault.PERMISSION),
        (OSError(errno.ENOTDIR, "x"), Fault.NOT_A_FOLDER),
        (OSError(errno.EINVAL, "timeout 503"), None),
        (ValueError("connection reset by peer, 503"), None),
    ],
)
def test_errno_values(exc, fault):
    assert classify(exc) is fault
    assert errors.is_fatal_write_error(exc) == (fault in errors.FATAL_WRITE_FAULTS)


def test_botocore_connection_and_credential_errors():
    unreachable = EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    assert classify(unreachable) is Fault.UNREACHABLE and errors.is_unreachable(unreachable)
    assert not errors.is_transient(unreachable)
    assert classify(NoCredentialsError()) is Fault.UNREACHABLE
    assert errors.is_transient(ReadTimeoutError(endpoint_url="http://x"))
    assert not errors.is_unreachable(PermissionError(errno.EACCES, "no"))


def test_a_fatal_write_error_is_found_behind_a_wrapper_and_named_by_its_own_class():
    class RayTaskError(Exception):  # Ray keeps a task's own error as `cause`
        def __init__(self, cause):
            super().__init__("task failed")
            self.cause = cause

    wrapped = RayTaskError(OSError(errno.ENOSPC, "No space left on device"))
    assert errors.fatal_write_error(wrapped) is wrapped.cause
    assert errors.describe_write_error(wrapped) == "no space left on the device (OSError)"


def test_lease_and_identity_errors_have_their_own_exit_statuses():
    assert errors.exit_status(errors.LeaseHeldError("held")) == 2
    assert errors.exit_status(errors.IdentityMismatchError("other model")) == 2
    lost = errors.LeaseLostError("taken over")
    assert errors.exit_status(lost) == 7 and not isinstance(lost, errors.ConfigError)
    assert str(errors.LeaseHeldError("held", "wait")) == "output: held (wait)"


def test_an_unreadable_input_is_described_by_what_its_error_means():
    from segbatch.stages.decode import _describe_read_error

    assert _describe_read_error(translate_boto_error(client_error("NoSuchKey", 404, "GetObject"))).startswith(
        "object not found"
    )
    assert _describe_read_error(client_error("AccessDenied", 403, "GetObject")) == "access denied reading the object"
    assert _describe_read_error(OSError(errno.EIO, "in/cam_404/x.jpg")).startswith("cannot read: OSError")
