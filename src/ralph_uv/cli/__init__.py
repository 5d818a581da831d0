"""The ``ralph-uv`` command line: thin click commands over the Python API.

Every command module registers itself on :data:`cli`; :func:`main` is the console script and the
one place where ralph-uv's errors become a message and an exit status instead of a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from ralph_uv import __version__
from ralph_uv.errors import RalphError, UserError, from_os_error

__all__ = ["CliError", "cli", "main"]


class CliError(click.ClickException):
    """A :class:`RalphError` on its way to the terminal: exit status 2 for bad input (as click
    does for usage errors), 1 for everything else."""

    def __init__(self, error: RalphError) -> None:
        super().__init__(error.message)
        self.exit_code = 2 if isinstance(error, UserError) else 1  # type: ignore[misc]


class RalphGroup(click.Group):
    """A click group that turns :class:`RalphError` into a clean message and exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RalphError as exc:
            raise CliError(exc) from exc
        except OSError as exc:  # a file or system problem no command expected
            raise CliError(from_os_error(exc)) from exc


@click.group(cls=RalphGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ralph-uv")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def cli(verbose: int) -> None:
    """Run Ralph loops of AI coding agents here or on remote machines, and watch, attach to,
    steer, stop and checkpoint any of them from anywhere.

    \b
    Quick start:
      ralph-uv init my-feature        # scaffold tasks/my-feature/prd.json and prompt.md
      ralph-uv validate my-feature    # check the prd.json
      ralph-uv run my-feature --foreground
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="ralph-uv")


# Command modules register themselves on ``cli`` when imported.
from ralph_uv.cli import commands as _commands  # noqa: E402, F401
