"""Checks of OUTPUT before any work: can this run write there at all? (exit 4 when not)

A read-only folder, OUTPUT that is a file or lies below one, a full disk or a bucket without write access
used to surface only after Ray had started and inferred the first batch, as a traceback. One small probe
object, written and deleted in the driver, finds all of these in milliseconds. (What a write error met
later, mid-run, means is :func:`segbatch.errors.classify`'s to say.)
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Any

from segbatch._internal import _storage
from segbatch.errors import InputError, describe_write_error

PROBE_PREFIX = "._segbatch-probe-"


class OutputNotWritableError(InputError):
    """OUTPUT cannot be written (exit 4); nothing was done."""


def probe_output(url: str, storage_options: Mapping[str, Any] | None) -> None:
    """Write and delete a probe object in OUTPUT; raise OutputNotWritableError with the reason. Local
    folders the probe had to create are removed again, so a run refused later leaves no trace."""
    fs, root = _storage.open_url(url, storage_options)
    created: list[str] = []
    try:
        if _storage.retry(fs.isfile, root, what=f"check {url}"):
            raise OutputNotWritableError(f"OUTPUT {url} is a file; OUTPUT must be a folder or URL prefix")
        if _storage.is_local(fs):
            path = root
            while path and not os.path.lexists(path):
                created.append(path)
                path = os.path.dirname(path)
        probe = _storage.join_path(root, PROBE_PREFIX + uuid.uuid4().hex[:12])
        _storage.write_atomic(fs, probe, b"segbatch write probe\n")
        _storage.retry(fs.rm, probe, what=f"delete {probe}")
    except OutputNotWritableError:
        raise
    except OSError as exc:
        raise OutputNotWritableError(
            f"OUTPUT {url} is not writable: {describe_write_error(exc)}; nothing was done"
        ) from None
    finally:
        for path in created:  # deepest first; rmdir leaves anything that is not empty alone
            try:
                os.rmdir(path)
            except OSError:
                break


def check_inputs_exist(config) -> None:
    """INPUT (or the manifest) must exist before OUTPUT is touched at all."""
    from segbatch.stages.listing import require_exists

    url = config.manifest or config.input
    label = "manifest" if config.manifest else "INPUT"
    fs, path = _storage.open_url(url, config.storage_options)
    require_exists(fs, path, f"{label} {url}")
