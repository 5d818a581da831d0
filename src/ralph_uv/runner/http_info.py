"""``<loop_dir>/http.json``: where an HTTP-driven agent's server listens, and its password.

The runner of an opencode loop writes it (mode 0600) as soon as ``opencode serve`` answers and
removes it when the server stops; ralphd reads it for ``connect_http`` (a byte relay to that
port) and ``get_http_auth`` (the password, for ``opencode attach``). The password travels only
through this file and authenticated replies: never a command line, never a log.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ralph_uv.agents.base import AgentBackend
from ralph_uv.config import Config

__all__ = [
    "HTTP_FILE",
    "HttpInfo",
    "publishing_backends",
    "read_http_info",
    "remove_http_info",
    "write_http_info",
]

log = logging.getLogger("ralph_uv.runner.http_info")

HTTP_FILE = "http.json"


@dataclass(frozen=True, slots=True)
class HttpInfo:
    """An agent server on this machine's loopback: ``http://127.0.0.1:PORT`` and its password."""

    url: str
    password: str
    username: str = "opencode"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int | None:
        try:
            return urlsplit(self.url).port
        except ValueError:
            return None

    @property
    def is_loopback(self) -> bool:
        """Only a loopback address may be relayed to (the file could have been edited)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def write_http_info(loop_dir: Path, info: HttpInfo) -> None:
    """Write ``http.json`` atomically, readable by this user only."""
    path = loop_dir / HTTP_FILE
    temporary = loop_dir / f".{HTTP_FILE}.{os.getpid()}.tmp"
    payload = json.dumps({"url": info.url, "password": info.password,
                          "username": info.username})
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(payload)
        os.replace(temporary, path)
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)
        with contextlib.suppress(OSError):
            temporary.unlink()


def remove_http_info(loop_dir: Path) -> None:
    """The server has stopped: nothing to reach any more."""
    with contextlib.suppress(FileNotFoundError):
        (loop_dir / HTTP_FILE).unlink()


def read_http_info(loop_dir: Path) -> HttpInfo | None:
    """The loop's agent server, or None when it has none (now)."""
    try:
        data = json.loads((loop_dir / HTTP_FILE).read_text(encoding="utf-8"))
        return HttpInfo(url=str(data["url"]), password=str(data["password"]),
                        username=str(data.get("username", "opencode")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("cannot read %s: %s", loop_dir / HTTP_FILE, exc)
        return None


def publishing_backends(
    loop_dir: Path, factory: Callable[[str, Config], AgentBackend]
) -> Callable[[str, Config], AgentBackend]:
    """``factory``, with every backend that runs an HTTP server publishing it in ``loop_dir``."""

    def make(name: str, config: Config) -> AgentBackend:
        backend = factory(name, config)
        if hasattr(backend, "on_server"):
            def publish(url: str | None, password: str) -> None:
                if url is None:
                    remove_http_info(loop_dir)
                else:
                    write_http_info(loop_dir, HttpInfo(url, password))

            backend.on_server = publish
        return backend

    return make
