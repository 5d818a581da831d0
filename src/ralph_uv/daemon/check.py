"""``ralphd check``: is this machine ready to run Ralph loops?

Each check gives one line: ``ok``, ``warn`` (works, but worth a look) or ``problem`` (something
a loop needs is missing or broken), with what was found and, when it is not ok, the fix. The
machine is ready when no check reports a problem. Nothing here changes the machine.
"""

from __future__ import annotations

import enum
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ralph_uv.agents.detect import detect_agents
from ralph_uv.config import Config, Paths, load_config, load_env_file, paths
from ralph_uv.daemon.config import DaemonConfig, Listener, load_daemon_config
from ralph_uv.errors import RalphError
from ralph_uv.transports.auth import read_token_file
from ralph_uv.transports.unix import MAX_SOCKET_PATH

__all__ = ["Check", "Level", "is_ready", "run_checks"]

_MIN_PYTHON = (3, 11)
_TIMEOUT = 10.0


class Level(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    PROBLEM = "problem"


@dataclass(frozen=True, slots=True)
class Check:
    """One line of ``ralphd check``."""

    name: str
    level: Level
    detail: str
    fix: str | None = None

    @property
    def ok(self) -> bool:
        """True unless this is a problem."""
        return self.level != Level.PROBLEM

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "level": self.level.value, "detail": self.detail,
                "fix": self.fix}


def is_ready(checks: list[Check]) -> bool:
    """True when no check found a problem."""
    return all(check.ok for check in checks)


def _version_of(command: list[str]) -> str | None:
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, errors="replace", check=False,
            stdin=subprocess.DEVNULL, timeout=_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if done.returncode == 0 and text else None


def _python() -> list[Check]:
    version = ".".join(str(part) for part in sys.version_info[:3])
    if sys.version_info[:2] >= _MIN_PYTHON:
        return [Check("python", Level.OK, f"{version} ({sys.executable})")]
    wanted = ".".join(str(p) for p in _MIN_PYTHON)
    return [Check("python", Level.PROBLEM, f"{version} is too old",
                  f"install Python {wanted} or newer and reinstall ralph-uv with it")]


def _program(name: str, version_args: list[str], fix: str, *, required: bool) -> list[Check]:
    found = shutil.which(name)
    if found is None:
        level = Level.PROBLEM if required else Level.WARN
        return [Check(name, level, "not found on PATH", fix)]
    version = _version_of([found, *version_args]) or "version unknown"
    return [Check(name, Level.OK, f"{version} ({found})")]


def _agents(config: Config) -> list[Check]:
    result: list[Check] = []
    infos = detect_agents(config)
    default = config.agent.removesuffix("-print")
    for info in infos:
        name = f"agent {info.name}"
        if info.installed:
            detail = f"{info.version or 'version unknown'} ({info.path})"
            result.append(Check(name, Level.OK, detail))
            continue
        needed = info.name == default
        level = Level.PROBLEM if needed else Level.WARN
        detail = "not installed" + (" (the default agent in config.toml)" if needed else "")
        result.append(Check(name, level, detail, info.install_hint))
    if not any(info.installed for info in infos):
        result.append(Check("agents", Level.PROBLEM, "no agent CLI is installed",
                            "install claude or opencode, or define [agents.NAME] in config.toml"))
    return result


def _folder(label: str, folder: Path) -> Check:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return Check(f"{label} folder", Level.PROBLEM, f"{existing} is not a folder",
                     f"move {existing} away so that {folder} can be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        return Check(f"{label} folder", Level.PROBLEM, f"{existing} is not writable",
                     f"make {existing} writable by this user, or set RALPH_HOME")
    note = "" if existing == folder else " (will be created)"
    return Check(f"{label} folder", Level.OK, f"{folder}{note}")


def _folders(dirs: Paths) -> list[Check]:
    checks = [_folder(label, getattr(dirs, label)) for label in ("data", "state", "config",
                                                                  "runtime")]
    socket = dirs.daemon_socket
    if len(os.fsencode(socket)) > MAX_SOCKET_PATH:
        checks.append(Check("socket path", Level.PROBLEM,
                            f"{socket} is longer than {MAX_SOCKET_PATH} bytes",
                            "set XDG_RUNTIME_DIR or RALPH_HOME to a shorter folder"))
    return checks


def _parse(label: str, file: Path, load: Callable[[], object]) -> tuple[Check, Any]:
    try:
        value = load()
    except RalphError as exc:
        return Check(label, Level.PROBLEM, exc.message, f"fix {file} (see `ralph-uv --help`)"), None
    detail = f"{file}" if file.exists() else f"{file} absent: defaults apply"
    return Check(label, Level.OK, detail), value


def _env_file(file: Path) -> list[Check]:
    if not file.exists():
        return [Check("env file", Level.OK, f"{file} absent (agents use their own login)")]
    try:
        count = len(load_env_file(file))
        mode = stat.S_IMODE(file.stat().st_mode)
    except (RalphError, OSError, UnicodeDecodeError) as exc:
        message = exc.message if isinstance(exc, RalphError) else str(exc)
        return [Check("env file", Level.PROBLEM, message, f"write {file} as KEY=value lines")]
    detail = f"{file}: {count} variable(s), mode {mode:04o}"
    if mode & 0o077:
        return [Check("env file", Level.WARN, detail + ": others can read the agents' keys",
                      f"chmod 600 {file}")]
    return [Check("env file", Level.OK, detail)]


def _listeners(daemon: DaemonConfig | None) -> list[Check]:
    if daemon is None:
        return []
    if not daemon.listeners:
        return [Check("listeners", Level.OK,
                      "Unix socket only (SSH clients need no listener)")]
    return [_listener(item) for item in daemon.listeners]


def _listener(item: Listener) -> Check:
    """One listener: its files must be usable before ralphd can listen on it."""
    detail = f"{item.url}" + (" (TLS)" if item.tls else " (loopback)" if item.loopback else "")
    if item.token_file is None:
        return Check("listener", Level.PROBLEM, detail,
                     "give it a token: a [[listeners]] table with url and token_file (a 0600 "
                     "file holding a long random token; clients get the same token)")
    try:
        read_token_file(item.token_file)
    except RalphError as exc:
        return Check("listener", Level.PROBLEM, f"{detail}: {exc.message}",
                     f"write a long random token to {item.token_file} with mode 0600")
    for label, path in (("tls_cert", item.tls_cert), ("tls_key", item.tls_key),
                        ("client_ca", item.client_ca)):
        if path is not None and not path.is_file():
            return Check("listener", Level.PROBLEM, f"{detail}: {label} {path} does not exist",
                         f"put the PEM file at {path} or fix {label} in daemon.toml")
    if item.scheme == "ziti" and importlib.util.find_spec("openziti") is None:
        return Check("listener", Level.PROBLEM, f"{detail}: the openziti SDK is not installed",
                     "pip install 'ralph-uv[ziti]', or host ralphd's TCP listener with a ziti "
                     "tunneler instead")
    return Check("listener", Level.OK, detail)


def run_checks(dirs: Paths | None = None, environ: Mapping[str, str] | None = None) -> list[Check]:
    """Every check, in the order ``ralphd check`` prints them. Blocking (runs programs)."""
    dirs = dirs or paths(environ)
    checks = _python()
    checks += _program("git", ["--version"], "install git (apt install git)", required=True)
    checks += _program("tmux", ["-V"], "install tmux (apt install tmux); only the tmux "
                                        "backend needs it", required=False)
    checks += _folders(dirs)
    config_check, config = _parse(
        "config.toml", dirs.config_file, lambda: load_config(dirs.config_file, environ)
    )
    checks.append(config_check)
    daemon_check, daemon = _parse(
        "daemon.toml", dirs.daemon_config_file,
        lambda: load_daemon_config(dirs.daemon_config_file, config),
    )
    checks.append(daemon_check)
    checks += _env_file(dirs.env_file)
    checks += _listeners(daemon)
    checks += _agents(config if isinstance(config, Config) else Config())
    return checks
