"""``ralph-uv tui`` (and the ``ralph-tui`` command): the live dashboard of every loop, local
and remote. A thin shell over :class:`ralph_uv.tui.app.RalphTui`."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from ralph_uv.cli import CliError, cli
from ralph_uv.cli.loops import complete_loop
from ralph_uv.config import paths
from ralph_uv.errors import RalphError

__all__ = ["main", "run_tui", "tui_command"]

TUI_LOG = "tui.log"


@contextlib.contextmanager
def _log_to_file() -> Iterator[Path]:
    """While the dashboard owns the terminal, log lines go to ``<state>/tui.log``."""
    root = logging.getLogger()
    moved = [
        h for h in root.handlers
        if isinstance(h, logging.StreamHandler) and h.stream in (sys.stderr, sys.__stderr__)
    ]
    path = paths().state / TUI_LOG
    handler: logging.Handler | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for old in moved:
        root.removeHandler(old)
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
        for old in moved:
            root.addHandler(old)


def run_tui(loop: str | None = None) -> None:
    """Run the dashboard until the user quits; ``loop`` (a loop id or task name) opens its
    detail at once."""
    from ralph_uv.tui.app import RalphTui  # Textual loads only for this command

    with _log_to_file():
        RalphTui(open_loop=loop).run()


@cli.command("tui")
@click.argument("loop", required=False, shell_complete=complete_loop)
def tui_command(loop: str | None) -> None:
    """A live dashboard of every loop, on this machine and on every remote.

    LOOP (a loop id or task name) opens that loop's detail at once. Press ? in the dashboard
    for every key.
    """
    run_tui(loop)


@click.command("ralph-tui")
@click.argument("loop", required=False, shell_complete=complete_loop)
def _standalone(loop: str | None) -> None:
    """A live dashboard of every loop, on this machine and on every remote (ralph-uv tui)."""
    try:
        run_tui(loop)
    except RalphError as exc:
        raise CliError(exc) from exc


def main() -> None:
    """The ``ralph-tui`` console script."""
    _standalone(prog_name="ralph-tui")
