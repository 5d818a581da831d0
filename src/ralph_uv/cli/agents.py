"""``ralph-uv agents``: which agent CLIs are installed, where, at which version."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from ralph_uv.agents.detect import AgentInfo, detect_agents
from ralph_uv.cli import cli
from ralph_uv.config import load_config

__all__ = ["agents_command"]


def _table(infos: list[AgentInfo]) -> Table:
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("agent", style="bold")
    table.add_column("installed", justify="center", no_wrap=True)
    table.add_column("version")
    table.add_column("path", no_wrap=True, overflow="ignore")
    for info in infos:
        table.add_row(
            info.name,
            "[green]✓[/]" if info.installed else "[red]✗[/]",
            info.version or "",
            str(info.path) if info.path else "",
        )
    return table


@cli.command("agents")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON, for scripts.")
def agents_command(as_json: bool) -> None:
    """List the agents ralph-uv can run: claude, opencode and those defined in config.toml,
    with where each is installed and its version, or how to install it."""
    infos = detect_agents(load_config())
    if as_json:
        click.echo(json.dumps([info.to_dict() for info in infos], indent=2))
        return
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 200  # piped output: never cut a path; the table is only as wide as needed
    console.print(_table(infos))
    for info in infos:
        if not info.installed and info.install_hint:
            console.print(f"{info.name} is not installed: {info.install_hint}", markup=False)
