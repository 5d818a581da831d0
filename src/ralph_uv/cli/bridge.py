"""``ralph-uv bridge``: relay stdin/stdout to this machine's ralphd (for SSH servers that forbid
socket forwarding), or, with ``--print-socket``, make sure ralphd runs and print its socket."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from ralph_uv.cli import cli

__all__ = ["bridge"]


@cli.command()
@click.option("--print-socket", is_flag=True,
              help="Start ralphd if it is not running, print its socket path and exit.")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Relay to this Unix socket instead of ralphd's.")
def bridge(print_socket: bool, socket_path: Path | None) -> None:
    """Relay stdin and stdout to this machine's ralphd.

    Clients run this over SSH when the server does not allow forwarding to Unix sockets; it
    is not meant to be typed by hand. stdout carries only the relayed bytes.
    """
    from ralph_uv.client.bridge import ensure_daemon_socket, run_bridge

    if print_socket:
        click.echo(str(asyncio.run(ensure_daemon_socket())))
        return

    def announce(line: str) -> None:
        click.echo(line, err=True)

    sys.exit(asyncio.run(run_bridge(socket_path, announce=announce)))
