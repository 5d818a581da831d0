"""``ralph-uv demo``: watch a real loop finish a sample task with the offline demo model."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from ralph_uv.cli import cli
from ralph_uv.config import load_config


@cli.command()
@click.option(
    "--agent",
    type=click.Choice(["claude-print", "claude", "opencode"]),
    default="claude-print",
    show_default=True,
    help="claude-print shows a readable transcript; claude shows Claude Code's own TUI.",
)
@click.option(
    "--dir",
    "workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to create the sample repository [a new temporary folder].",
)
@click.option(
    "--pause",
    type=click.FloatRange(0),
    default=0.5,
    show_default=True,
    help="Seconds between iterations.",
)
def demo(agent: str, workdir: Path | None, pause: float) -> None:
    """Run a real Ralph loop offline: the real agent CLI against a scripted demo model.

    A sample repository with three user stories is created, and the loop runs the agent until
    every story passes: the files, prd.json updates and commits are the agent's real work.
    With a real Anthropic key or a logged-in claude, `ralph-uv run` uses the real model instead.
    """
    # Imported here: the demo model server pulls in aiohttp, which every other command can skip.
    from ralph_uv.demo.run import run_demo

    folder = workdir or Path(tempfile.mkdtemp(prefix="ralph-demo-"))
    config = load_config().with_overrides(
        pause=pause, yolo=True, max_iterations=6, iteration_timeout=300.0
    )
    out = sys.stdout.buffer

    def show(data: bytes) -> None:
        out.write(data)
        out.flush()

    def note(text: str) -> None:
        click.secho(f"[ralph-uv demo] {text}", fg="cyan", err=True)

    outcome = asyncio.run(
        run_demo(folder, agent=agent, config=config, on_output=show, on_note=note)
    )
    note(
        f"loop {outcome.status.value}: {outcome.reason} — {outcome.stories_done}/"
        f"{outcome.stories_total} stories in {outcome.iterations} iterations"
    )
    repo = folder / "textkit"
    log = subprocess.run(
        ["git", "log", "--oneline", "--decorate", "-n", "5"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    note(f"commits made by the agent in {repo}:\n{log.rstrip()}")
    sys.exit(0 if outcome.status.value == "completed" else 1)
