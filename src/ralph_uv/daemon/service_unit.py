"""``ralphd install-service``: a systemd user unit that keeps ralphd running.

The unit runs ``ralphd start --foreground`` with this Python, restarts it when it fails, and uses
``KillMode=process``: stopping or restarting the service ends ralphd only, never the loops'
runners (they re-register with the next ralphd, as after a crash).

The unit goes to ``$XDG_CONFIG_HOME/systemd/user`` (``~/.config/systemd/user``); with
``RALPH_HOME`` set it goes under ralph's own config folder instead, so that trying it out never
touches the real one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from ralph_uv.config import paths
from ralph_uv.errors import UserError

__all__ = ["UNIT_NAME", "default_unit_dir", "enable_hints", "unit_text", "write_unit"]

UNIT_NAME = "ralphd.service"


def default_unit_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where systemd looks for this user's units (see the module docstring)."""
    env = os.environ if environ is None else environ
    if env.get("RALPH_HOME"):
        return paths(env).config / "systemd" / "user"
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    return Path(base) / "systemd" / "user"


def _quote(value: str) -> str:
    """A value for a systemd ``Environment=`` or ``ExecStart=`` word."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def unit_text(
    *, python: str | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """The unit file's text for this installation."""
    env = os.environ if environ is None else environ
    executable = python or sys.executable
    lines = [
        "[Unit]",
        "Description=ralphd: runs and supervises Ralph loops of AI coding agents",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={_quote(executable)} -m ralph_uv.daemon start --foreground",
        "Restart=on-failure",
        "RestartSec=2",
        "# Stopping ralphd must not stop the loops: their runners outlive it.",
        "KillMode=process",
        # Agents are found on the PATH of the person who installed the service.
        f"Environment={_quote('PATH=' + env.get('PATH', '/usr/local/bin:/usr/bin:/bin'))}",
    ]
    if env.get("RALPH_HOME"):
        lines.append(f"Environment={_quote('RALPH_HOME=' + env['RALPH_HOME'])}")
    lines += ["", "[Install]", "WantedBy=default.target", ""]
    return "\n".join(lines)


def write_unit(unit_dir: Path | None = None, *, text: str | None = None) -> Path:
    """Write the unit (replacing an older one) and return its path."""
    folder = unit_dir or default_unit_dir()
    target = folder / UNIT_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{UNIT_NAME}.tmp")
        temporary.write_text(text if text is not None else unit_text(), encoding="utf-8")
        os.replace(temporary, target)
    except OSError as exc:
        raise UserError(
            f"cannot write {target}: {exc.strerror or exc}; pass --unit-dir to write elsewhere"
        ) from exc
    return target


def enable_hints(user: str | None = None) -> list[str]:
    """The commands that start the service now and at boot, even without a login."""
    name = user or os.environ.get("USER") or "$USER"
    return [
        "systemctl --user daemon-reload",
        "systemctl --user enable --now ralphd",
        f"loginctl enable-linger {name}",
    ]
