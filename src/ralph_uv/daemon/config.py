"""ralphd's own settings: ``<config>/daemon.toml``.

Everything has a default, so the file is optional::

    max_concurrent_loops = 4          # loops running at once; finished loops do not count
    loop_time_limit = 86400           # seconds; a loop running longer is checkpointed
    start_timeout = 30                # seconds a new runner has to answer on its socket
    listeners = ["tcp://0.0.0.0:7420?tls=1"]   # network listeners besides the Unix socket

    [log]
    level = "info"                    # debug, info, warning, error
    max_bytes = 5242880               # <state>/daemon/ralphd.log rotates at this size
    backups = 3                       # rotated files kept

``max_concurrent_loops`` falls back to the loop configuration's value (``config.toml`` or
``RALPH_MAX_CONCURRENT_LOOPS``) when daemon.toml does not set it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ralph_uv.config import Config
from ralph_uv.errors import UserError

__all__ = [
    "LISTENER_SCHEMES",
    "DaemonConfig",
    "Listener",
    "load_daemon_config",
    "parse_listener",
]

LISTENER_SCHEMES = ("tcp", "ziti")
_LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_TOP_KEYS = {
    "max_concurrent_loops",
    "loop_time_limit",
    "start_timeout",
    "listeners",
    "slow_peer_timeout",
    "max_message_size",
    "log",
}
_LOG_KEYS = {"level", "max_bytes", "backups"}


@dataclass(frozen=True, slots=True)
class Listener:
    """A network listener from ``listeners``: its URL, scheme, and whether it uses TLS."""

    url: str
    scheme: str
    host: str
    port: int | None
    tls: bool

    @property
    def loopback(self) -> bool:
        """True when only this machine can reach it."""
        if self.scheme != "tcp":
            return False
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Every setting ralphd reads from daemon.toml (see the module docstring)."""

    max_concurrent_loops: int = 4
    loop_time_limit: float | None = None
    start_timeout: float = 30.0
    listeners: tuple[Listener, ...] = ()
    slow_peer_timeout: float = 30.0
    max_message_size: int = 4 * 1024 * 1024
    log_level: str = "info"
    log_max_bytes: int = 5 * 1024 * 1024
    log_backups: int = 3

    @property
    def log_level_number(self) -> int:
        """``log_level`` as a :mod:`logging` level."""
        return _LOG_LEVELS[self.log_level]


def parse_listener(url: str, source: str = "daemon.toml") -> Listener:
    """Check one listener URL; :class:`UserError` saying what is wrong with it."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in LISTENER_SCHEMES:
        raise UserError(
            f"{source}: listener {url!r} has an unknown scheme; use "
            "tcp://HOST:PORT?tls=1 or ziti://SERVICE?identity=FILE"
        )
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    tls = query.get("tls", "").lower() in {"1", "true", "yes", "on"}
    if scheme == "ziti":
        if not parts.netloc or not query.get("identity"):
            raise UserError(
                f"{source}: listener {url!r} needs a service and an identity file: "
                "ziti://SERVICE?identity=/path/to/identity.json"
            )
        return Listener(url, scheme, parts.netloc, None, tls)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise UserError(f"{source}: listener {url!r} needs a host and a port: tcp://HOST:PORT")
    listener = Listener(url, scheme, parts.hostname, port, tls)
    if not listener.loopback and not tls:
        raise UserError(
            f"{source}: listener {url!r} is reachable from other machines and must use TLS "
            "and a token: add ?tls=1, or listen on 127.0.0.1"
        )
    return listener


def _number(
    table: Mapping[str, Any], key: str, source: str, *, integer: bool, optional: bool = False
) -> Any:
    value = table[key]
    if optional and (value is False or (isinstance(value, str) and value.lower() == "off")):
        return None
    number_ok = isinstance(value, int) or (not integer and isinstance(value, float))
    if isinstance(value, bool) or not number_ok or value <= 0:
        what = "a positive whole number" if integer else "a positive number of seconds"
        off = ' (or "off")' if optional else ""
        raise UserError(f"{source}: {key} = {value!r} must be {what}{off}")
    return value if integer else float(value)


def load_daemon_config(path: Path, loop_config: Config | None = None) -> DaemonConfig:
    """Read ``path`` (daemon.toml) over the defaults; a missing file gives the defaults.

    :class:`UserError` names the file and the setting when something is wrong.
    """
    base = DaemonConfig(
        max_concurrent_loops=(loop_config or Config()).max_concurrent_loops,
    )
    if not path.exists():
        return base
    source = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"{source}: cannot read the daemon configuration: {exc}") from exc
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise UserError(
            f"{source}: unknown setting(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(_TOP_KEYS))}"
        )
    values: dict[str, Any] = {}
    for key in ("max_concurrent_loops", "max_message_size"):
        if key in data:
            values[key] = _number(data, key, source, integer=True)
    for key in ("start_timeout", "slow_peer_timeout"):
        if key in data:
            values[key] = _number(data, key, source, integer=False)
    if "loop_time_limit" in data:
        values["loop_time_limit"] = _number(
            data, "loop_time_limit", source, integer=False, optional=True
        )
    if "listeners" in data:
        listeners = data["listeners"]
        if not isinstance(listeners, list) or not all(isinstance(u, str) for u in listeners):
            raise UserError(f'{source}: listeners must be a list of URLs, e.g. ["tcp://..."]')
        values["listeners"] = tuple(parse_listener(u, source) for u in listeners)
    log_table = data.get("log", {})
    if not isinstance(log_table, dict):
        raise UserError(f"{source}: [log] must be a table (level, max_bytes, backups)")
    unknown = set(log_table) - _LOG_KEYS
    if unknown:
        raise UserError(f"{source}: unknown [log] setting(s) {', '.join(sorted(unknown))}")
    if "level" in log_table:
        level = str(log_table["level"]).lower()
        if level not in _LOG_LEVELS:
            raise UserError(
                f"{source}: [log] level = {log_table['level']!r}; use one of "
                f"{', '.join(_LOG_LEVELS)}"
            )
        values["log_level"] = level
    if "max_bytes" in log_table:
        values["log_max_bytes"] = _number(log_table, "max_bytes", source, integer=True)
    if "backups" in log_table:
        backups = log_table["backups"]
        if isinstance(backups, bool) or not isinstance(backups, int) or backups < 0:
            raise UserError(f"{source}: [log] backups = {backups!r} must be 0 or more")
        values["log_backups"] = backups
    return dataclasses.replace(base, **values)
