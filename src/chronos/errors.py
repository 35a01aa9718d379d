"""Every error Chronos raises, in one tree.

Each class carries a stable ``code`` so the daemon can send an error over the
wire and the client can raise the same class on the other side.
"""

from __future__ import annotations

from chronos.vocabulary import RefusalCause

RUN_FAILED_EXIT = 125
"""Exit status of ``chronos run`` when Chronos itself failed (as ``timeout`` and ``docker
run`` use 125), so that it never collides with the command's own status."""


class ChronosError(Exception):
    """Base of every Chronos error; ``str(err)`` is a one-line message for users.

    A subclass names its wire ``code`` and the CLI's ``exit_code`` in its class line:
    ``class NotFound(ChronosError, code="not_found", exit_code=4)``.
    """

    code = "error"
    exit_code = 1

    def __init_subclass__(cls, code: str | None = None, exit_code: int | None = None) -> None:
        super().__init_subclass__()
        if code is not None:
            cls.code = code
        if exit_code is not None:
            cls.exit_code = exit_code


class BadRequest(ChronosError, code="bad_request", exit_code=2):
    """The request itself is invalid (bad memory, duration, device, …)."""


class AdmissionRefused(ChronosError, code="refused", exit_code=3):
    """The request is valid but does not fit now (or breaks a policy limit).

    ``cause`` says why as data (a quota and its limit, or capacity), for whoever counts
    refusals, and ``facts`` the numbers behind it (a :mod:`chronos.refusals` record); the
    message is for people. A refusal rebuilt from the wire has neither.
    """

    def __init__(
        self, message: str, cause: RefusalCause | None = None, facts: object | None = None
    ) -> None:
        super().__init__(message)
        self.cause = cause
        self.facts = facts


class CapacityRefused(AdmissionRefused):
    """Refused for lack of room on the device (waiting may help), not for a quota."""

    def __init__(self, message: str, facts: object | None = None) -> None:
        super().__init__(message, RefusalCause.capacity(), facts)


class NotFound(ChronosError, code="not_found", exit_code=4):
    """No such partition (or device)."""


class PermissionDenied(ChronosError, code="permission_denied", exit_code=5):
    """The caller may not do this to that partition."""


class PartitionEnded(ChronosError, code="ended", exit_code=6):
    """The partition was already released or has expired."""


class DaemonUnavailable(ChronosError, code="unavailable", exit_code=7):
    """The daemon could not be reached, or went away mid-request."""


class ProtocolError(ChronosError, code="protocol", exit_code=8):
    """A message on the daemon socket could not be understood."""


class DeviceError(ChronosError, code="device", exit_code=9):
    """A GPU backend failed or found no device."""


class Timeout(ChronosError, TimeoutError, code="timeout", exit_code=10):
    """A wait (for capacity, for the daemon) ran out.

    Also a :class:`TimeoutError`, so ``except TimeoutError`` catches it as it
    catches other libraries' timeouts.
    """


class CommandNotRunnable(ChronosError, code="not_runnable"):
    """``chronos run``'s command cannot be started: 127 not found, 126 not executable."""

    def __init__(self, message: str, exit_code: int = 127) -> None:
        super().__init__(message)
        self.exit_code = exit_code


_BY_CODE: dict[str, type[ChronosError]] = {
    cls.code: cls
    for cls in (
        ChronosError,
        BadRequest,
        AdmissionRefused,
        NotFound,
        PermissionDenied,
        PartitionEnded,
        DaemonUnavailable,
        ProtocolError,
        DeviceError,
        Timeout,
    )
}
"""The classes a daemon's reply can name (others with a code are raised client-side, or
share one of these codes on the wire)."""


def error_from_code(code: str, message: str) -> ChronosError:
    """Rebuild an error received from the daemon."""
    return _BY_CODE.get(code, ChronosError)(message)
