"""Paths and configuration.

One function, :func:`paths`, gives every directory ralph-uv uses, honouring ``RALPH_HOME`` so
that tests (and people who want everything in one folder) never touch ``$HOME``. One
:class:`Config` holds every setting, layered: defaults < ``config.toml`` < ``RALPH_*``
environment variables < command-line flags (:meth:`Config.with_overrides`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from ralph_uv.errors import UserError

__all__ = ["APP_NAME", "Config", "CustomAgent", "Paths", "load_config", "load_env_file", "paths"]

APP_NAME = "ralph"


@dataclass(frozen=True, slots=True)
class Paths:
    """Where ralph-uv keeps its files on this machine (DESIGN §3)."""

    data: Path
    state: Path
    config: Path
    runtime: Path

    @property
    def registry(self) -> Path:
        return self.data / "sessions.db"

    @property
    def workspaces(self) -> Path:
        return self.data / "workspaces"

    @property
    def loops(self) -> Path:
        return self.state / "loops"

    def loop_dir(self, loop_id: str) -> Path:
        return self.loops / loop_id

    @property
    def daemon_socket(self) -> Path:
        return self.runtime / "ralphd.sock"

    def loop_socket(self, loop_id: str) -> Path:
        return self.runtime / "loops" / f"{loop_id}.sock"

    @property
    def config_file(self) -> Path:
        return self.config / "config.toml"

    @property
    def daemon_config_file(self) -> Path:
        return self.config / "daemon.toml"

    @property
    def env_file(self) -> Path:
        return self.config / "env"


def paths(environ: Mapping[str, str] | None = None) -> Paths:
    """The directories for this user; ``RALPH_HOME=<dir>`` puts all of them under one folder."""
    env = os.environ if environ is None else environ
    home = env.get("RALPH_HOME")
    if home:
        root = Path(home).expanduser().resolve()
        return Paths(root / "data", root / "state", root / "config", root / "run")
    xdg_runtime = env.get("XDG_RUNTIME_DIR", "")
    if xdg_runtime and os.access(xdg_runtime, os.W_OK):
        runtime = Path(xdg_runtime) / APP_NAME
    else:
        # No XDG runtime directory (a plain ssh login without systemd-logind, a container):
        # a per-user folder (created 0700 by whoever makes sockets) keeps socket paths short.
        runtime = Path(f"/tmp/{APP_NAME}-{os.getuid()}")
    return Paths(
        data=Path(platformdirs.user_data_dir(APP_NAME)),
        state=Path(platformdirs.user_state_dir(APP_NAME)),
        config=Path(platformdirs.user_config_dir(APP_NAME)),
        runtime=runtime,
    )


@dataclass(frozen=True, slots=True)
class CustomAgent:
    """An agent defined in config: ``[agents.NAME] command = ["codex", "exec", "{prompt}"]``."""

    name: str
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting ralph-uv reads. Field names are the TOML keys and, upper-cased with a
    ``RALPH_`` prefix, the environment variables (``RALPH_MAX_ITERATIONS=20``)."""

    agent: str = "claude"
    failover: tuple[str, ...] = ()
    model: str | None = None
    max_iterations: int = 10
    max_runtime: float | None = None  # seconds for the whole loop
    iteration_timeout: float | None = 3600.0
    pause: float = 2.0
    yolo: bool = False
    max_consecutive_failures: int = 3
    stall_iterations: int = 3
    rate_limit_initial_wait: float = 30.0
    rate_limit_max_wait: float = 900.0
    rate_limit_max_retries: int = 20
    progress_max_lines: int = 300
    progress_max_archives: int = 5
    journal_retention: int = 256 * 1024 * 1024
    terminate_grace: float = 5.0
    max_message_size: int = 4 * 1024 * 1024
    max_concurrent_loops: int = 4
    attach_prefix: str = "ctrl-]"
    agents: Mapping[str, CustomAgent] = field(default_factory=dict)

    def with_overrides(self, **values: Any) -> Config:
        """A copy with the given settings replaced; ``None`` values are ignored (unset flags)."""
        changes = {k: v for k, v in values.items() if v is not None}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise UserError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert a TOML or environment value to the field's type, or say what is wrong."""
    default = _FIELDS[name].default
    kind = _FIELDS[name].type
    try:
        if isinstance(value, str) and "tuple" in str(kind):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        if isinstance(value, list) and "tuple" in str(kind):
            return tuple(str(v) for v in value)
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if isinstance(default, int) and not isinstance(default, bool):
            return int(value)
        if "float" in str(kind):
            if isinstance(value, str) and value.strip().lower() in {"", "none", "off"}:
                return None
            return float(value)
        return None if value in ("", None) and "None" in str(kind) else str(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{source}: {name} = {value!r} is not a valid {kind}") from exc


def _custom_agents(table: Any, source: str) -> dict[str, CustomAgent]:
    if not isinstance(table, dict):
        raise UserError(f"{source}: [agents] must be a table of agent definitions")
    agents: dict[str, CustomAgent] = {}
    for name, spec in table.items():
        command = spec.get("command") if isinstance(spec, dict) else None
        if not isinstance(command, list) or not command or not all(
            isinstance(part, str) for part in command
        ):
            raise UserError(
                f"{source}: [agents.{name}] needs command = [\"program\", \"arg\", ...], "
                "for example command = [\"codex\", \"exec\", \"{prompt}\"]"
            )
        env = spec.get("env", {})
        if not isinstance(env, dict):
            raise UserError(f"{source}: [agents.{name}].env must be a table of strings")
        agents[name] = CustomAgent(name, tuple(command), {str(k): str(v) for k, v in env.items()})
    return agents


def load_config(
    config_file: Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Defaults, then ``config.toml`` (when it exists), then ``RALPH_*`` variables."""
    env = os.environ if environ is None else environ
    file = config_file if config_file is not None else paths(env).config_file
    values: dict[str, Any] = {}
    if file.exists():
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise UserError(f"{file}: cannot read the configuration: {exc}") from exc
        section = dict(data.get("loop", {})) if isinstance(data.get("loop"), dict) else {}
        section.update({k: v for k, v in data.items() if k not in {"loop", "agents"}})
        for key, value in section.items():
            if key not in _FIELDS or key == "agents":
                raise UserError(f"{file}: unknown setting {key!r}")
            values[key] = _coerce(key, value, str(file))
        if "agents" in data:
            values["agents"] = _custom_agents(data["agents"], str(file))
    for key in _FIELDS:
        if key == "agents":
            continue
        raw = env.get(f"RALPH_{key.upper()}")
        if raw is not None:
            values[key] = _coerce(key, raw, f"RALPH_{key.upper()}")
    return Config(**values)


def load_env_file(path: Path) -> dict[str, str]:
    """Read ``KEY=value`` lines (agents' API keys). Blank lines and ``#`` comments are skipped.

    The values are secrets: callers pass them to child processes' environments only, never to a
    log or a command line.
    """
    result: dict[str, str] = {}
    if not path.exists():
        return result
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export "):
            stripped = stripped[len("export ") :]
        key, sep, value = stripped.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UserError(f"{path}:{number}: expected KEY=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        result[key.strip()] = value
    return result
