"""Reaching ralph-uv's tmux sessions: the socket, the session names, tmux commands, keys.

Shared by the runner (:mod:`ralph_uv.runner.tmux`, which runs agents in tmux) and the clients
(``ralph-uv attach --tmux``, :mod:`ralph_uv.client.tmux_attach`):

- :func:`tmux_socket` — ralph-uv's own tmux server (``-L ralph-uv``, or ``$RALPH_TMUX_SOCKET``:
  a name, or a path when it holds a ``/``), so the user's default server is never touched;
- :func:`session_name` — ``ralph-<task>``; :class:`TmuxTarget` — a socket and a session, as
  ``get_status`` reports them, and the command line that attaches to it;
- :func:`run_tmux` — one tmux command (or a ``;`` sequence) with an environment that carries
  no secrets; :func:`key_commands` — ``send-keys`` commands that type bytes exactly.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ralph_uv.errors import RalphError, UserError

__all__ = [
    "DEFAULT_SOCKET",
    "TMUX_SOCKET_ENV",
    "TMUX_TIMEOUT",
    "TmuxTarget",
    "key_commands",
    "run_tmux",
    "server_env",
    "session_name",
    "tmux_arg",
    "tmux_socket",
]

TMUX_SOCKET_ENV = "RALPH_TMUX_SOCKET"
DEFAULT_SOCKET = "ralph-uv"
TMUX_TIMEOUT = 15.0
_KEYS_PER_CALL = 4000  # tmux's client message is limited to 16 KiB; hex takes 3 per byte
# Variables the tmux server itself may see: enough to run, no secrets.
_SERVER_ENV = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "LC_CTYPE", "TERM",
               "TMPDIR")
# Printable ASCII but ';', or well-formed UTF-8 sequences: typed with send-keys -l.
_TEXT = re.compile(rb"(?:[\x20-\x3a\x3c-\x7e]|[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}"
                   rb"|[\xf0-\xf4][\x80-\xbf]{3})+")


def tmux_socket(environ: Mapping[str, str] | None = None) -> str:
    """The tmux socket ralph-uv's sessions live on: ``$RALPH_TMUX_SOCKET`` or ``ralph-uv``."""
    env = os.environ if environ is None else environ
    return env.get(TMUX_SOCKET_ENV) or DEFAULT_SOCKET


def session_name(task_name: str) -> str:
    """``ralph-<task>``, with what tmux does not allow in a name (``.``, ``:``) replaced."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", task_name).strip("-")
    return f"ralph-{stem or 'loop'}"


def tmux_arg(text: str) -> str:
    """``text`` as one tmux argument: tmux reads an argument ending in ``;`` as a command
    separator, and ``\\;`` as a literal ``;``."""
    return text[:-1] + "\\;" if text.endswith(";") else text


@dataclass(frozen=True, slots=True)
class TmuxTarget:
    """A tmux session on a tmux socket (a name for ``-L``, or a path for ``-S``)."""

    socket: str
    session: str

    @property
    def socket_args(self) -> list[str]:
        return ["-S", self.socket] if "/" in self.socket else ["-L", self.socket]

    def command(self, *args: str) -> list[str]:
        """``tmux`` with this socket and ``args``."""
        return ["tmux", *self.socket_args, *args]

    def attach_argv(self) -> list[str]:
        """The command line that attaches a terminal to the session (exact name match)."""
        return self.command("attach-session", "-t", f"={self.session}")

    def to_dict(self) -> dict[str, str]:
        return {"socket": self.socket, "session": self.session}

    @classmethod
    def from_dict(cls, data: object) -> TmuxTarget:
        """Read ``{socket, session}`` (from ``get_status``); :class:`RalphError` if malformed."""
        if not isinstance(data, dict):
            raise RalphError("the loop service sent no tmux session")
        socket, session = data.get("socket"), data.get("session")
        if not isinstance(socket, str) or not isinstance(session, str) or not socket \
                or not re.fullmatch(r"[A-Za-z0-9_-]+", session):
            raise RalphError(f"the loop service sent a malformed tmux session: {data!r:.200}")
        return cls(socket, session)


def server_env() -> dict[str, str]:
    """The environment tmux commands (and so a tmux server they start) get: no secrets."""
    return {name: os.environ[name] for name in _SERVER_ENV if name in os.environ}


async def run_tmux(socket_args: Sequence[str], *args: str, check: bool = True) -> str:
    """Run one tmux command (or a ``;``-separated sequence); its output."""
    try:
        process = await asyncio.create_subprocess_exec(
            "tmux", *socket_args, *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=server_env(),
        )
    except FileNotFoundError as exc:
        raise UserError("tmux is not installed; install it (Debian: apt install tmux) or run "
                        "the loop with backend pty") from exc
    try:
        async with asyncio.timeout(TMUX_TIMEOUT):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RalphError(f"tmux {args[0]} did not answer within {TMUX_TIMEOUT:g} s") from None
    if check and process.returncode != 0:
        text = err.decode("utf-8", "replace").strip() or f"exit status {process.returncode}"
        raise RalphError(f"tmux {args[0]} failed: {text}")
    return out.decode("utf-8", "replace")


def key_commands(pane: str, data: bytes) -> list[list[str]]:
    """``send-keys`` commands typing ``data`` exactly, in order, each call small enough."""
    calls: list[list[str]] = []
    current: list[str] = []
    size = 0

    def add(*command: str) -> None:
        nonlocal current, size
        cost = sum(len(part.encode()) + 3 for part in command)
        if current and size + cost > _KEYS_PER_CALL:
            calls.append(current)
            current, size = [], 0
        current.extend([";", *command] if current else command)
        size += cost

    position = 0
    for match in _TEXT.finditer(data):
        for byte in data[position:match.start()]:
            add("send-keys", "-t", pane, "-H", f"{byte:02x}")
        text = match.group().decode("utf-8")
        step = _KEYS_PER_CALL // 8  # characters take up to 4 bytes
        for start in range(0, len(text), step):
            add("send-keys", "-t", pane, "-l", "--", text[start:start + step])
        position = match.end()
    for byte in data[position:]:
        add("send-keys", "-t", pane, "-H", f"{byte:02x}")
    if current:
        calls.append(current)
    return calls
