"""``ralph-uv setup ssh [HOST...]``: let plain ``ssh`` share one connection per host too.

ralph-uv keeps one SSH connection per host open by itself; this command does the same for the
``ssh``, ``scp`` and ``git`` commands a person (or a remote-loop workflow) runs against those
hosts, by adding OpenSSH connection sharing for them to ``~/.ssh/config``::

    # ralph-uv: begin (written by `ralph-uv setup ssh`; replaced when it runs again)
    Host build-box lan-server
        ControlMaster auto
        ControlPath ~/.ssh/ralph-uv/cm-%C
        ControlPersist 10m
    Host *
    # ralph-uv: end

The block goes at the top of the file, because ssh uses the first value it finds for each
option; the closing ``Host *`` makes whatever follows apply to every host again, as it did
before. Running the command again replaces the block (keeping the hosts already in it), never
duplicates it. The change is shown as a diff and applied only after a yes (``--yes`` skips the
question, ``--dry-run`` only shows it; with no terminal to ask on and no ``--yes`` nothing is
changed); the previous file is kept as ``config.bak-<timestamp>``. The socket folder
``~/.ssh/ralph-uv`` is created with mode 0700.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import stat
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import click

from ralph_uv.cli import cli
from ralph_uv.errors import UserError

__all__ = [
    "CONFIG_ENV",
    "CONTROL_PATH",
    "SSHConfigChange",
    "apply_change",
    "plan_change",
    "render_block",
    "setup",
    "setup_ssh",
    "update_text",
]

CONFIG_ENV = "RALPH_SSH_CONFIG"
"""Environment variable naming the ssh config file to edit instead of ``~/.ssh/config``."""
CONTROL_PATH = "~/.ssh/ralph-uv/cm-%C"
SOCKET_FOLDER = "~/.ssh/ralph-uv"
MARK_BEGIN = "# ralph-uv: begin"
MARK_END = "# ralph-uv: end"
_HOST = re.compile(r"^[A-Za-z0-9_.*?!:%@\[\]\-]+$")
_BLOCK = re.compile(
    rf"^{re.escape(MARK_BEGIN)}[^\n]*\n(?P<body>.*?)^{re.escape(MARK_END)}[^\n]*(?:\n|\Z)",
    re.MULTILINE | re.DOTALL,
)


def _check_hosts(hosts: tuple[str, ...]) -> tuple[str, ...]:
    for host in hosts:
        if not _HOST.match(host):
            raise UserError(f"{host!r} is not a host name or ssh Host pattern")
    return tuple(dict.fromkeys(hosts))


def render_block(hosts: tuple[str, ...]) -> str:
    """The marked block for ``hosts``."""
    return (
        f"{MARK_BEGIN} (written by `ralph-uv setup ssh`; replaced when it runs again)\n"
        f"Host {' '.join(hosts)}\n"
        "    ControlMaster auto\n"
        f"    ControlPath {CONTROL_PATH}\n"
        "    ControlPersist 10m\n"
        "Host *\n"
        f"{MARK_END}\n"
    )


def _block_hosts(text: str) -> tuple[str, ...]:
    match = _BLOCK.search(text)
    if match is None:
        return ()
    for line in match.group("body").splitlines():
        words = line.split()
        if len(words) > 1 and words[0].lower() == "host" and words[1:] != ["*"]:
            return tuple(words[1:])
    return ()


def update_text(text: str, hosts: tuple[str, ...]) -> str:
    """``text`` (an ssh config) with the block set for its current hosts plus ``hosts``."""
    wanted = _check_hosts(_block_hosts(text) + hosts)
    if not wanted:
        raise UserError("name the hosts to set up: ralph-uv setup ssh HOST [HOST...]")
    block = render_block(wanted)
    match = _BLOCK.search(text)
    if match is not None:
        return text[: match.start()] + block + text[match.end():]
    if not text:
        return block
    return block + "\n" + text


@dataclass(frozen=True, slots=True)
class SSHConfigChange:
    """What ``setup ssh`` would do to one config file."""

    path: Path
    before: str
    after: str
    existed: bool

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def diff(self) -> str:
        """A unified diff of the change (empty when there is none)."""
        return "".join(difflib.unified_diff(
            self.before.splitlines(keepends=True), self.after.splitlines(keepends=True),
            fromfile=str(self.path) if self.existed else "/dev/null", tofile=str(self.path),
        ))


def default_config_path() -> Path:
    """``$RALPH_SSH_CONFIG`` if set, else ``~/.ssh/config``."""
    configured = os.environ.get(CONFIG_ENV)
    return Path(configured).expanduser() if configured else Path("~/.ssh/config").expanduser()


def plan_change(path: Path, hosts: tuple[str, ...]) -> SSHConfigChange:
    """Read ``path`` (missing: empty) and work out its new text; nothing is written."""
    try:
        before = path.read_text()
        existed = True
    except FileNotFoundError:
        before, existed = "", False
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    return SSHConfigChange(path, before, update_text(before, hosts), existed)


def _private_folder(folder: Path) -> None:
    """``folder`` with mode 0700, and any folder created on the way (``~/.ssh``) 0700 too."""
    missing = [folder, *(p for p in folder.parents if not p.exists())]
    for part in reversed(missing):
        with contextlib.suppress(FileExistsError):
            part.mkdir(mode=0o700)
    if stat.S_IMODE(folder.stat().st_mode) != 0o700:
        os.chmod(folder, 0o700)


def _backup_path(path: Path, now: datetime) -> Path:
    stamp = now.strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"{path.name}.bak-{stamp}")
    counter = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.bak-{stamp}-{counter}")
        counter += 1
    return candidate


def apply_change(change: SSHConfigChange, *, now: datetime | None = None) -> Path | None:
    """Write the change (backing up the old file first) and create the socket folder; the
    backup's path, or ``None`` when the file did not exist."""
    path = change.path
    backup: Path | None = None
    try:
        _private_folder(Path(SOCKET_FOLDER).expanduser())
        if not change.changed:
            return None
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(path.stat().st_mode) if change.existed else 0o600
        if change.existed:
            backup = _backup_path(path, now or datetime.now())
            backup.write_text(change.before)
            os.chmod(backup, mode)
        temporary = path.with_name(f".{path.name}.ralph-uv.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(change.after)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError, UnboundLocalError):
            temporary.unlink()
        raise UserError(f"cannot update {path}: {exc.strerror or exc}") from exc
    return backup


@cli.group()
def setup() -> None:
    """Prepare this machine for ralph-uv (ssh settings, ...)."""


@setup.command("ssh")
@click.argument("hosts", nargs=-1)
@click.option("--yes", "-y", is_flag=True, help="Apply without asking.")
@click.option("--dry-run", is_flag=True, help="Only show the change.")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help=f"The ssh config file to edit (default: ${CONFIG_ENV} or ~/.ssh/config).")
def setup_ssh(hosts: tuple[str, ...], yes: bool, dry_run: bool,
              config_path: Path | None) -> None:
    """Share one SSH connection per host (ControlMaster) for HOSTS in ~/.ssh/config.

    Shows the change as a diff and asks before writing; keeps a backup of the old file.
    Running it again updates the same block (adding new hosts), never a second one.
    """
    path = (config_path or default_config_path()).expanduser()
    change = plan_change(path, hosts)
    if not change.changed:
        click.echo(f"{path} already shares connections for: {' '.join(_block_hosts(change.after))}")
        if not dry_run:
            apply_change(change)
        return
    click.echo(change.diff(), nl=False)
    if dry_run:
        click.echo("(dry run: nothing changed)")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise UserError("no terminal to ask for confirmation: rerun with --yes to apply "
                            "this change, or with --dry-run to only see it")
        if not click.confirm(f"Apply this change to {path}?", default=False):
            click.echo("nothing changed")
            return
    backup = apply_change(change)
    click.echo(f"updated {path}" + (f" (previous version: {backup})" if backup else ""))
