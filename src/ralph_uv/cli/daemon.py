"""``ralphd`` (and its alias ``ralph-uv daemon``): start, stop and inspect the per-machine
daemon, check the machine, install a systemd user service."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from ralph_uv import __version__
from ralph_uv.cli import RalphGroup, cli
from ralph_uv.errors import TransportError

__all__ = ["main", "ralphd"]


@click.group("ralphd", cls=RalphGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ralphd")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def ralphd(verbose: int) -> None:
    """ralphd runs and supervises this machine's Ralph loops. ralph-uv starts it on demand;
    these commands manage it by hand.

    \b
    Loops outlive ralphd: stopping or restarting it never stops a loop, and a new ralphd
    takes over the loops still running.
    """
    if verbose:
        logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2),
                            format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@ralphd.command()
@click.option("--foreground", is_flag=True,
              help="Run in this terminal (for systemd and debugging) instead of detaching.")
def start(foreground: bool) -> None:
    """Start ralphd (refused when one is already running)."""
    from ralph_uv.daemon.lifecycle import run_daemon, start_background

    if foreground:
        sys.exit(run_daemon(foreground=True))
    pid = start_background()
    click.echo(f"ralphd started (pid {pid})")


@ralphd.command()
def stop() -> None:
    """Stop ralphd; the loops keep running and the next ralphd takes them over."""
    from ralph_uv.daemon.lifecycle import stop_daemon

    pid = stop_daemon()
    if pid is None:
        click.echo("ralphd is not running")
    else:
        click.echo(f"ralphd stopped (pid {pid}); loops keep running")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


async def _health() -> dict[str, Any]:
    from ralph_uv.client.daemon import connect_daemon

    async with await connect_daemon(autostart=False, client="ralphd status") as daemon:
        health = await daemon.get_health()
        loops = await daemon.list_loops()
    return {**health.raw, "running": True, "loops": [r.to_dict() for r in loops]}


@ralphd.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON, for scripts.")
def status(as_json: bool) -> None:
    """Is ralphd running? Its pid, uptime and loops. Exit status 1 when it is not running."""
    from ralph_uv.daemon.lifecycle import running_pid

    pid = running_pid()
    report: dict[str, Any] = {"running": False, "pid": pid}
    if pid is not None:
        try:
            report = asyncio.run(_health())
        except TransportError as exc:
            report = {"running": True, "pid": pid, "answering": False, "error": exc.message}
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif not report["running"]:
        click.echo("ralphd is not running (ralph-uv starts it when needed; `ralphd start`)")
    elif "uptime" not in report:
        click.echo(f"ralphd is running (pid {pid}) but does not answer: {report['error']}")
    else:
        click.echo(f"ralphd {report['version']} is running (pid {report['pid']}), up "
                   f"{_duration(report['uptime'])}; {report['loops_active']} loop(s) running, "
                   f"{report['loops_total']} known")
        for loop in report["loops"]:
            click.echo(f"  {loop['loop_id']:<32} {loop['status']:<10} {loop['task_name']} "
                       f"({loop['agent']}, iteration {loop['iteration']}, pid {loop['pid']})")
    sys.exit(0 if report["running"] else 1)


@ralphd.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON, for scripts.")
def check(as_json: bool) -> None:
    """Check that this machine can run loops: Python, git, tmux, agents, folders, config
    files, the env file's permissions, network listeners. Exit status 0 only when ready."""
    from ralph_uv.daemon.check import is_ready, run_checks

    checks = run_checks()
    ready = is_ready(checks)
    if as_json:
        click.echo(json.dumps({"ready": ready, "checks": [c.to_dict() for c in checks]},
                              indent=2))
    else:
        width = max(len(c.name) for c in checks)
        for item in checks:
            line = f"{item.level.value:<8} {item.name:<{width}}  {item.detail}"
            if item.fix and item.level.value != "ok":
                line += f"\n{'':<8} {'':<{width}}  fix: {item.fix}"
            click.echo(line)
        click.echo("ready" if ready else "not ready: fix the problems above")
    sys.exit(0 if ready else 1)


@ralphd.command("install-service")
@click.option("--dry-run", is_flag=True, help="Print the unit instead of writing it.")
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write the unit here instead of the systemd user folder.")
def install_service(dry_run: bool, unit_dir: Path | None) -> None:
    """Write a systemd user unit (ralphd.service) that keeps ralphd running, even without a
    login session."""
    from ralph_uv.daemon.service_unit import enable_hints, unit_text, write_unit

    text = unit_text()
    if dry_run:
        click.echo(text, nl=False)
        return
    path = write_unit(unit_dir, text=text)
    click.echo(f"wrote {path}")
    click.echo("to start it now and at every boot:")
    for hint in enable_hints():
        click.echo(f"  {hint}")


cli.add_command(ralphd, name="daemon")


def main() -> None:
    """Console-script entry point of ``ralphd``."""
    ralphd(prog_name="ralphd")
