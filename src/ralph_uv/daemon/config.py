"""ralphd's own settings: ``<config>/daemon.toml``.

Everything has a default, so the file is optional::

    max_concurrent_loops = 4          # loops running at once; finished loops do not count
    loop_time_limit = 86400           # seconds; a loop running longer is checkpointed
    start_timeout = 30                # seconds a new runner has to answer on its socket
    listeners = ["tcp://127.0.0.1:7420"]  # network listeners besides the Unix socket (or
                                          # [[listeners]] tables, below)
    checkout_retention = { after_days = 7 }   # or "keep": when finished loops' checkouts go
    min_free_space = 1073741824       # bytes a code upload must leave free (and 2 x its size)
    allow_local_origins = false       # tests only: also accept file:// origin URLs

    [log]
    level = "info"                    # debug, info, warning, error
    max_bytes = 5242880               # <state>/daemon/ralphd.log rotates at this size
    backups = 3                       # rotated files kept

Remote loops run in checkouts under ``<data>/workspaces``; a finished loop's checkout is
removed ``after_days`` days after the loop ended, never while it holds uncommitted changes or
commits that no branch holds. ``allow_local_origins`` exists for the test suite, which has no
network git server: leave it off, since it lets clients make ralphd read local repositories.

A network listener needs a token (a 0600 file holding a long random string) and, unless it
is on loopback, TLS; a table gives its files::

    [[listeners]]
    url = "tcp://0.0.0.0:7420?tls=1"
    token_file = "~/.config/ralph/listener.token"
    tls_cert = "~/.config/ralph/tls/cert.pem"
    tls_key = "~/.config/ralph/tls/key.pem"
    client_ca = "~/.config/ralph/tls/clients-ca.pem"   # optional: mutual TLS

    [[listeners]]
    url = "ziti://ralph-control-myhost?identity=/home/me/.config/ralph/ziti/host.json"
    token_file = "~/.config/ralph/listener.token"

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
from ralph_uv.transports.options import ListenOptions

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
    "checkout_retention",
    "min_free_space",
    "allow_local_origins",
}
_LOG_KEYS = {"level", "max_bytes", "backups"}
_LISTENER_KEYS = {"url", "token_file", "tls_cert", "tls_key", "client_ca"}


@dataclass(frozen=True, slots=True)
class Listener:
    """A network listener from ``listeners``: its URL, scheme, whether it uses TLS, and the
    files it reads (its token, its TLS certificate and key, the CA of client certificates)."""

    url: str
    scheme: str
    host: str
    port: int | None
    tls: bool
    token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None

    def options(self) -> ListenOptions:
        """The settings :func:`ralph_uv.transports.listen` takes for it."""
        return ListenOptions(token_file=self.token_file, tls_cert=self.tls_cert,
                             tls_key=self.tls_key, tls_client_ca=self.client_ca)

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
    checkout_retention_days: float | None = 7.0  # None: keep every checkout
    min_free_space: int = 1024 * 1024 * 1024
    allow_local_origins: bool = False

    @property
    def log_level_number(self) -> int:
        """``log_level`` as a :mod:`logging` level."""
        return _LOG_LEVELS[self.log_level]


def _listener_table(item: Mapping[str, Any], source: str) -> Listener:
    unknown = set(item) - _LISTENER_KEYS
    if unknown or not isinstance(item.get("url"), str):
        raise UserError(
            f"{source}: a [[listeners]] table needs url and may have token_file, tls_cert, "
            f"tls_key and client_ca" + (f" (unknown: {', '.join(sorted(unknown))})"
                                        if unknown else "")
        )
    def path(key: str) -> Path | None:
        if key not in item:
            return None
        if not isinstance(item[key], str) or not item[key]:
            raise UserError(f"{source}: listener {item['url']!r}: {key} must be a path")
        return Path(item[key]).expanduser()

    listener = dataclasses.replace(
        parse_listener(item["url"], source), token_file=path("token_file"),
        tls_cert=path("tls_cert"), tls_key=path("tls_key"), client_ca=path("client_ca"),
    )
    if listener.tls and listener.scheme == "tcp" and (
            listener.tls_cert is None or listener.tls_key is None):
        raise UserError(f"{source}: listener {listener.url!r} uses TLS: give its certificate "
                        "and key (tls_cert, tls_key)")
    return listener


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


def _retention(value: Any, source: str) -> float | None:
    """``checkout_retention``: ``"keep"``, ``{after_days = N}`` or ``"after_days = N"``."""
    days: Any = None
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "keep":
            return None
        key, sep, number = text.partition("=")
        if sep and key.strip() == "after_days":
            try:
                days = float(number)
            except ValueError:
                days = None
    elif isinstance(value, dict) and set(value) == {"after_days"}:
        days = value["after_days"]
    if isinstance(days, bool) or not isinstance(days, int | float) or days < 0:
        raise UserError(
            f'{source}: checkout_retention = {value!r}; use "keep" or {{ after_days = N }} '
            "(N days after a loop ends, 0 or more)"
        )
    return float(days)


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
    for key in ("max_concurrent_loops", "max_message_size", "min_free_space"):
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
        if not isinstance(listeners, list) or not all(isinstance(u, str | dict)
                                                      for u in listeners):
            raise UserError(f'{source}: listeners must be a list of URLs, e.g. ["tcp://..."], '
                            "or [[listeners]] tables")
        values["listeners"] = tuple(
            parse_listener(u, source) if isinstance(u, str) else _listener_table(u, source)
            for u in listeners
        )
    if "checkout_retention" in data:
        values["checkout_retention_days"] = _retention(data["checkout_retention"], source)
    if "allow_local_origins" in data:
        if not isinstance(data["allow_local_origins"], bool):
            raise UserError(f"{source}: allow_local_origins must be true or false")
        values["allow_local_origins"] = data["allow_local_origins"]
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
