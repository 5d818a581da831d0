"""The package's one error hierarchy.

Errors are split by who is at fault and carry the JSON-RPC code they travel as, so that a
failure deep in the daemon reaches the CLI as a message that says what to do, never as an
``OSError`` or a library's exception. Translate at layer boundaries with ``raise X(...) from exc``.
"""

from __future__ import annotations

import errno
from enum import IntEnum

__all__ = [
    "AgentNotFoundError",
    "ErrorCode",
    "GitError",
    "InternalError",
    "RalphError",
    "RemoteError",
    "TransportError",
    "UserError",
    "from_os_error",
]


class ErrorCode(IntEnum):
    """Wire codes: JSON-RPC's standard ones and the application's own."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    # Application codes kept from the original daemon.
    AGENT_NOT_FOUND = -32001
    TOO_MANY_LOOPS = -32002
    LOOP_NOT_FOUND = -32003
    GIT_ERROR = -32004
    ORIGIN_MISMATCH = -32005
    BRANCH_NOT_FOUND = -32006
    DISK_FULL = -32007
    # ralph-uv's own, from -32010 down.
    UNAUTHORIZED = -32010
    INVALID_NAME = -32011
    MESSAGE_TOO_LARGE = -32012
    NOT_INTERACTIVE = -32013
    INVALID_PRD = -32014
    UNSUPPORTED_PROTOCOL = -32015
    BAD_STATE = -32016
    TIMEOUT = -32017
    CONNECTION_LOST = -32018


class RalphError(Exception):
    """Base of every error ralph-uv raises on purpose.

    ``message`` is written for the person at the terminal: what is wrong and what to do.
    """

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class UserError(RalphError):
    """The input was wrong: a bad task name, a broken prd.json, a dirty tree, ..."""

    code = ErrorCode.INVALID_PARAMS


class AgentNotFoundError(UserError):
    """The requested agent is not installed or not configured."""

    code = ErrorCode.AGENT_NOT_FOUND


class GitError(RalphError):
    """A git command failed; the message carries git's own words."""

    code = ErrorCode.GIT_ERROR


class TransportError(RalphError):
    """A connection could not be made or was lost."""

    code = ErrorCode.CONNECTION_LOST


class RemoteError(RalphError):
    """The other side answered with an error; ``code`` is the one it sent."""

    def __init__(self, message: str, *, code: int, data: object = None) -> None:
        try:
            known = ErrorCode(code)
        except ValueError:
            known = ErrorCode.INTERNAL_ERROR
        super().__init__(message, code=known)
        self.wire_code = code
        self.data = data


class InternalError(RalphError):
    """A bug in ralph-uv: the message asks the user to report it."""


def from_os_error(exc: OSError) -> RalphError:
    """What an ``OSError`` nobody expected means for the user: the file and the system's
    words, ``DISK_FULL`` with what to do when the disk (or quota) is full."""
    where = f"{exc.filename}: " if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return RalphError(f"{where}no space left on the disk; free some space and try again",
                          code=ErrorCode.DISK_FULL)
    return RalphError(f"{where}{exc.strerror or exc}")
