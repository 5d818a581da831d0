"""Tokens for network listeners, and the gate every network connection passes first.

A Unix socket trusts its peer's uid (``SO_PEERCRED``) and SSH authenticates the user; a TCP or
OpenZiti listener has neither, so each of its connections must present a shared secret. The
token travels in the first message, ``hello {..., token}``, and:

- :func:`gate` reads that first line before anything else sees the connection. Anything but a
  ``hello`` request carrying the right token gets a JSON-RPC error -32010 (``UNAUTHORIZED``) and
  the connection is closed. A connection that passes is handed on as a stream that replays the
  consumed line (so the daemon's own ``hello`` handler sees the hello too) and whose
  ``extra["authenticated"]`` is ``True``: a hello handler must refuse streams without it.
- :class:`TokenStream` is the client side: it adds the token to the first ``hello`` it sends
  when the caller did not put one there, so every client works unchanged over every transport.

Tokens are compared in constant time (:func:`check_token`), stored in files of mode 0600
(:func:`write_token_file`, :func:`read_token_file` refuses a file others can read) and never
logged: nothing here puts a token in a message, a log line or a repr.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from ralph_uv.errors import ErrorCode, TransportError, UserError
from ralph_uv.protocol.framing import encode
from ralph_uv.protocol.messages import ErrorResponse
from ralph_uv.transports.base import Stream
from ralph_uv.transports.pump import PrefixedStream

__all__ = [
    "MAX_HELLO_SIZE",
    "TokenStream",
    "check_token",
    "gate",
    "generate_token",
    "read_token_file",
    "resolve_token",
    "write_token_file",
]

log = logging.getLogger("ralph_uv.transports.auth")

MAX_HELLO_SIZE = 64 * 1024
"""The longest first line a gate reads; a hello is a few hundred bytes."""
_TOKEN_BYTES = 32
_MIN_TOKEN_LENGTH = 16
_REFUSE_TIMEOUT = 1.0


def generate_token() -> str:
    """A new random token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(_TOKEN_BYTES)


def check_token(presented: object, expected: str) -> bool:
    """True when ``presented`` is a string equal to ``expected``, compared in constant time."""
    if not isinstance(presented, str) or not expected:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())


def write_token_file(path: Path, token: str | None = None) -> str:
    """Write ``token`` (a new one when ``None``) to ``path`` with mode 0600; return it.

    The file is created 0600 before the token is written to it, and replaced atomically.
    """
    token = token or generate_token()
    path = Path(path).expanduser()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(token + "\n")
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise UserError(f"cannot write the token file {path}: {exc.strerror or exc}") from exc
    return token


def read_token_file(path: Path) -> str:
    """The token stored in ``path``.

    Raises :class:`~ralph_uv.errors.UserError` when the file is missing, empty, too short, or
    readable by other users (``chmod 600`` it).
    """
    path = Path(path).expanduser()
    try:
        info = path.stat()
        text = path.read_text()
    except FileNotFoundError as exc:
        raise UserError(f"the token file {path} does not exist; create one with a random "
                        "token (mode 0600)") from exc
    except OSError as exc:
        raise UserError(f"cannot read the token file {path}: {exc.strerror or exc}") from exc
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise UserError(f"the token file {path} can be read by other users; "
                        f"run `chmod 600 {path}`")
    token = text.strip()
    if len(token) < _MIN_TOKEN_LENGTH:
        raise UserError(f"the token in {path} is shorter than {_MIN_TOKEN_LENGTH} characters; "
                        "put a long random token in it")
    return token


def resolve_token(token: str | None, token_file: Path | None) -> str | None:
    """The token given directly, else the one in ``token_file``, else ``None``."""
    if token:
        return token
    if token_file is not None:
        return read_token_file(token_file)
    return None


def _first_line_problem(line: bytes, expected: str) -> tuple[Any, str | None]:
    """``(request id, None)`` when ``line`` is a hello with the right token, else the reason."""
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None, "the first message is not JSON"
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return None, "the first message is not a JSON-RPC 2.0 request"
    request_id = message.get("id")
    if not isinstance(request_id, str | int) or isinstance(request_id, bool):
        request_id = None
    if message.get("method") != "hello" or request_id is None:
        return request_id, "the first message must be a hello request"
    params = message.get("params")
    presented = params.get("token") if isinstance(params, dict) else None
    if presented is None:
        return request_id, "hello carries no token; configure the listener's token on the client"
    if not check_token(presented, expected):
        return request_id, "wrong token"
    return request_id, None


async def _refuse(stream: Stream, request_id: Any, reason: str) -> None:
    """Send one error line, end the connection, and give the peer a moment to read it."""
    try:
        stream.write(encode(ErrorResponse(request_id, ErrorCode.UNAUTHORIZED,
                                          f"Unauthorized: {reason}").to_json()))
        async with asyncio.timeout(_REFUSE_TIMEOUT):
            await stream.drain()
    except (TransportError, TimeoutError):
        pass
    stream.close()
    try:
        async with asyncio.timeout(_REFUSE_TIMEOUT):
            await stream.wait_closed()
    except (TransportError, TimeoutError):
        stream.abort()


async def gate(stream: Stream, expected: str, *, timeout: float = 10.0) -> Stream | None:  # noqa: ASYNC109
    """Let ``stream`` through only if its first line is ``hello`` with the token ``expected``.

    Returns a :class:`~ralph_uv.transports.pump.PrefixedStream` (the first line put back,
    ``extra["authenticated"]`` ``True``), or ``None`` after refusing and closing the connection:
    not a hello, no token, a wrong token, a first line longer than :data:`MAX_HELLO_SIZE`,
    silence for ``timeout`` seconds, or the peer going away.
    """
    buffer = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while b"\n" not in buffer and len(buffer) <= MAX_HELLO_SIZE:
                chunk = await stream.read(MAX_HELLO_SIZE)
                if not chunk:
                    log.info("refused %s: closed before saying hello", stream.peer)
                    stream.close()
                    return None
                buffer += chunk
    except TimeoutError:
        log.warning("refused %s: no hello within %g s", stream.peer, timeout)
        await _refuse(stream, None, f"no hello within {timeout:g} s")
        return None
    except TransportError as exc:
        log.info("refused %s: %s", stream.peer, exc.message)
        stream.abort()
        return None
    line, newline, _ = bytes(buffer).partition(b"\n")
    if not newline:
        log.warning("refused %s: first line longer than %d bytes", stream.peer, MAX_HELLO_SIZE)
        await _refuse(stream, None, f"the first message is longer than {MAX_HELLO_SIZE} bytes")
        return None
    request_id, problem = _first_line_problem(line, expected)
    if problem is not None:
        log.warning("refused %s: %s", stream.peer, problem)
        await _refuse(stream, request_id, problem)
        return None
    return PrefixedStream(stream, bytes(buffer), {"authenticated": True})


class TokenStream(PrefixedStream):
    """The client side: puts ``token`` into the first ``hello`` written, if it has none.

    Bytes are held back only until the first newline; a first line that is not a hello
    passes unchanged (the server will refuse it, with a message saying why).
    """

    def __init__(self, stream: Stream, token: str) -> None:
        super().__init__(stream, b"")
        self._token = token
        self._pending: bytearray | None = bytearray()

    def write(self, data: bytes) -> None:
        if self._pending is None:
            super().write(data)
            return
        self._pending += data
        line, newline, rest = bytes(self._pending).partition(b"\n")
        if not newline:
            if len(self._pending) > MAX_HELLO_SIZE:  # not a hello: stop holding bytes back
                self._pending = None
                super().write(line)
            return
        self._pending = None
        super().write(self._with_token(line) + b"\n" + rest)

    def _with_token(self, line: bytes) -> bytes:
        try:
            message = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return line
        if not isinstance(message, dict) or message.get("method") != "hello":
            return line
        params = message.get("params")
        if params is None:
            params = {}
        if not isinstance(params, dict) or "token" in params:
            return line
        message["params"] = {**params, "token": self._token}
        return encode(message).rstrip(b"\n")

    async def drain(self) -> None:
        if self._pending and self.is_closing():
            raise TransportError(f"connection to {self.peer} is closed")
        await super().drain()

    def close(self) -> None:
        if self._pending:  # an unfinished first line: send it as it is
            pending, self._pending = bytes(self._pending), None
            with contextlib.suppress(TransportError):
                super().write(pending)
        super().close()

    def __repr__(self) -> str:
        return f"TokenStream({self.peer})"
