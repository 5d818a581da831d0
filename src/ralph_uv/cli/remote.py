"""``ralph-uv remote add/list/remove/check`` and ``ralph-uv pull``: the machines loops run on,
and bringing a remote loop's branch home. Thin shells over :mod:`ralph_uv.client.remotes` and
:mod:`ralph_uv.client.remote_run`."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import click
from rich import box
from rich.console import Console
from rich.table import Table

from ralph_uv.cli import cli
from ralph_uv.cli.loops import ago, complete_loop, loop_ref
from ralph_uv.client.loops import client_name
from ralph_uv.client.mirror import resolve_loop
from ralph_uv.client.remote_run import pull_remote_loop
from ralph_uv.client.remotes import (
    STATUS_TIMEOUT,
    Probe,
    RemoteSettings,
    add_remote,
    check_remote,
    close_remote_connections,
    connect_remote,
    list_remotes,
    probe_remote,
    remove_remote,
)
from ralph_uv.errors import UserError

__all__ = ["pull_command", "remote"]

T = TypeVar("T")


def _notice(text: str) -> None:
    click.echo(f"[ralph-uv] {text}", err=True)


def _run(work: Awaitable[T]) -> T:
    async def main() -> T:
        try:
            return await work
        finally:
            await close_remote_connections()

    return asyncio.run(main())


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


@cli.group()
def remote() -> None:
    """Machines that run loops for you: add, list, check and remove them.

    \b
    ralph-uv remote add box ssh://me@box.example.com
    ralph-uv run my-task --on box        # send the branch, run the loop there, attach
    ralph-uv status                      # local and remote loops together
    ralph-uv pull my-task                # bring the loop's commits back
    """


@remote.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--identity", "identity", metavar="FILE", help="SSH private key to use.")
@click.option("--token", metavar="TOKEN",
              help="The listener's token (tcp://, ziti://); `-` reads it from stdin. It is "
                   "stored in a 0600 file under the config folder.")
@click.option("--token-file", metavar="FILE",
              help="A 0600 file holding the listener's token (kept where it is).")
@click.option("--tls-ca", metavar="FILE", help="CA certificate that signed the remote's TLS "
                                               "certificate.")
@click.option("--tls-cert", metavar="FILE", help="Client certificate, for mutual TLS.")
@click.option("--tls-key", metavar="FILE", help="Client certificate's key, for mutual TLS.")
@click.option("--tls-server-name", metavar="NAME",
              help="The name in the remote's certificate, when not the URL's host.")
@click.option("--remote-ralph", metavar="COMMAND",
              help="ralph-uv on the remote machine when not on its PATH "
                   "(e.g. ~/.local/bin/ralph-uv).")
@click.option("--tunnel", is_flag=True,
              help="Allow plain TCP to a non-loopback address: an OpenZiti or VPN intercept "
                   "encrypts it.")
@click.option("--no-check", is_flag=True, help="Store it without connecting first.")
def add_command(name: str, url: str, identity: str | None, token: str | None,
                token_file: str | None, tls_ca: str | None, tls_cert: str | None,
                tls_key: str | None, tls_server_name: str | None, remote_ralph: str | None,
                tunnel: bool, no_check: bool) -> None:
    """Add the remote NAME at URL: ssh://[user@]host[:port] (or an ~/.ssh/config alias),
    tcp://host:port?tls=1 with a token, ziti://SERVICE?identity=FILE with a token.

    It connects once to check (over SSH this starts ralphd there) unless --no-check.
    """
    if token == "-":
        token = sys.stdin.readline().strip()
    settings = RemoteSettings(
        tls_ca=_path(tls_ca), tls_cert=_path(tls_cert), tls_key=_path(tls_key),
        tls_server_name=tls_server_name, remote_ralph=remote_ralph, tunnel=tunnel,
    )
    record, probe = _run(add_remote(name, url, identity_file=_path(identity), token=token,
                                    token_file=_path(token_file), settings=settings,
                                    check=not no_check))
    if probe is None:
        click.echo(f"added {record.name} ({record.url}), not checked")
        return
    click.echo(f"added {record.name} ({record.url}): ralphd {probe.version} on {probe.host}, "
               f"{probe.loops_active} loop(s) running, round trip {_ms(probe.rtt)}")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _probe_all(timeout: float) -> list[Probe]:
    remotes = list_remotes()

    async def probe_all() -> list[Probe]:
        return list(await asyncio.gather(
            *(probe_remote(r, timeout=timeout, client=client_name("ralph-uv remote list"))
              for r in remotes)))

    return _run(probe_all()) if remotes else []


@remote.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the remotes as JSON.")
@click.option("--timeout", type=click.FloatRange(0.1), default=STATUS_TIMEOUT, show_default=True,
              help="Seconds to wait for each remote.")
def list_command(as_json: bool, timeout: float) -> None:
    """List the remotes, asked in parallel: reachable or not, version, running loops, round
    trip of one call."""
    probes = _probe_all(timeout)
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in probes], indent=2))
        return
    if not probes:
        click.echo("No remotes yet; add one with `ralph-uv remote add NAME ssh://user@host`.")
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("NAME", "URL", "STATE", "VERSION", "LOOPS", "RTT", "SEEN"):
        table.add_column(column, no_wrap=column != "URL")
    for p in probes:
        state = "[green]reachable[/]" if p.reachable else f"[red]unreachable[/]: {p.error}"
        table.add_row(p.remote.name, p.remote.url, state, p.version or p.remote.version or "-",
                      "-" if p.loops_active is None else str(p.loops_active), _ms(p.rtt),
                      "now" if p.reachable else ago(p.remote.last_seen_at))
    Console().print(table)


@remote.command("remove")
@click.argument("name")
def remove_command(name: str) -> None:
    """Forget the remote NAME (its loops keep running there; their rows stay here)."""
    record = remove_remote(name)
    click.echo(f"removed {record.name} ({record.url})")


@remote.command("check")
@click.argument("name")
@click.pass_context
def check_command(ctx: click.Context, name: str) -> None:
    """Run `ralphd check` on the remote NAME (over SSH) and show what it says."""
    result = _run(check_remote(name))
    click.echo(result.output, nl=False)
    if result.errors.strip():
        click.echo(result.errors, nl=False, err=True)
    ctx.exit(0 if result.exit_status == 0 else 1)


@cli.command("pull")
@click.argument("task", shell_complete=complete_loop)
@click.option("--on", "on", metavar="REMOTE", help="The remote the loop runs on (default: "
                                                   "the one the registry names).")
def pull_command(task: str, on: str | None) -> None:
    """Bring the branch of TASK's remote loop (a task name or loop id) into this repository,
    also after the loop has ended.

    The commits land in ralph/<branch>; <branch> itself is created or fast-forwarded when
    that is safe, and uncommitted work is never touched.
    """
    target = resolve_loop(loop_ref(task), on)
    if target.remote is None and target.record is None:
        raise UserError(f"no loop {task!r} is known here; `ralph-uv status --all` lists the "
                        "loops (remote ones too), or name the remote with --on")
    if target.remote is None:
        raise UserError(f"{task} runs on this machine: its commits are already in its "
                        "repository; pull is for loops run with --on")
    remote_name = target.remote

    async def pull() -> tuple[str, str]:
        daemon = await connect_remote(remote_name, client=client_name("ralph-uv pull"))
        try:
            return await pull_remote_loop(daemon, Path.cwd(), target.loop, on_notice=_notice)
        finally:
            await daemon.close()

    branch, sha = _run(pull())
    click.echo(f"pulled {branch} at {sha[:12]} from {remote_name}")
