"""The other ways ``ralph-uv attach`` reaches an agent, and ``ralph-uv dial``.

- ``attach --tmux TASK``: for loops started with ``--backend tmux``, plain tmux on the loop's
  session (``tmux -L ralph-uv attach -t ralph-<task>``; over ``ssh -t`` for a remote loop;
  through ``ralph-uv dial`` as SSH's ProxyCommand over OpenZiti), replacing this process.
- ``attach TASK`` on an opencode loop runs the real ``opencode attach`` through a local relay
  to the loop's ``opencode serve`` (:mod:`ralph_uv.client.http_proxy`).
- ``dial URL``: stdin and stdout to a transport stream, for SSH's ``ProxyCommand``.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from typing import NoReturn

import click

from ralph_uv.cli import cli
from ralph_uv.client.loops import Loops
from ralph_uv.errors import UserError
from ralph_uv.runner.tmux_target import TmuxTarget
from ralph_uv.transports import ConnectOptions

__all__ = ["attach_with_tmux", "dial_command", "exec_tmux_attach", "opencode_attach",
           "tmux_target"]


def _notice(text: str) -> None:
    click.echo(f"[ralph-uv] {text}", err=True)


async def tmux_target(loops: Loops, loop: str) -> TmuxTarget:
    """The tmux session ``loop``'s agent runs in; :class:`UserError` when it runs in none."""
    async with await loops.open_loop(loop) as conn:
        status = await conn.endpoint.call("get_status")
    if not isinstance(status, dict) or not status.get("tmux"):
        backend = status.get("backend", "pty") if isinstance(status, dict) else "pty"
        name = status.get("task_name", loop) if isinstance(status, dict) else loop
        raise UserError(
            f"loop {loop} runs its agent in {'an HTTP server' if backend == 'http' else 'a PTY'}"
            f", not tmux: attach with `ralph-uv attach {name}`, or start the loop with "
            "`--backend tmux` to reach it with tmux"
        )
    if isinstance(status.get("status"), str) and status["status"] in (
        "completed", "exhausted", "stopped", "checkpointed", "failed", "crashed",
    ):
        raise UserError(f"loop {loop} has ended ({status['status']}); its tmux session is gone; "
                        f"read its output with `ralph-uv logs {loop}`")
    return TmuxTarget.from_dict(status["tmux"])


def exec_tmux_attach(target: TmuxTarget, url: str | None, *, options: ConnectOptions | None,
                     ssh_via: str | None, ssh_user: str | None) -> NoReturn:
    """Replace this process with tmux (or ssh running tmux) attached to ``target``."""
    from ralph_uv.client.tmux_attach import tmux_attach_argv

    argv = tmux_attach_argv(target, url, options=options, ssh_via=ssh_via, ssh_user=ssh_user)
    # tmux refuses to attach from inside another tmux while $TMUX is set; this is on purpose.
    env = {key: value for key, value in os.environ.items() if key != "TMUX"}
    _notice(shlex.join(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        raise UserError(f"cannot run {argv[0]}: {exc.strerror or exc}; install it") from exc


def attach_with_tmux(loop: str | None, remote: str | None, *, ssh_via: str | None) -> NoReturn:
    """``attach --tmux``: find ``loop``'s tmux session (``None``: the most recent running
    loop) through ralphd, here or on ``remote``, and become tmux (or ssh) attached to it."""
    from ralph_uv.cli.loops import with_loops

    async def find(loops: Loops) -> TmuxTarget:
        name = loop or (await loops.most_recent_running()).loop_id
        return await tmux_target(loops, name)

    target = with_loops(find, kind="attach", remote=remote)
    url: str | None = None
    options: ConnectOptions | None = None
    if remote is not None:
        from ralph_uv.client.remotes import get_remote, remote_options

        record = get_remote(remote)
        url, options = record.url, remote_options(record)
    exec_tmux_attach(target, url, options=options, ssh_via=ssh_via, ssh_user=None)


async def opencode_attach(loops: Loops, loop: str) -> int | None:
    """When ``loop``'s agent is an HTTP server (opencode), run ``opencode attach`` on it in
    this terminal and return its exit status; ``None`` when it is not (or opencode is not
    installed here: then the loop's journal view is used, as for any loop)."""
    from ralph_uv.agents.detect import find_binary
    from ralph_uv.client.http_proxy import attach_opencode

    async with await loops.open_loop(loop) as conn:
        state = await conn.status()
    if state.backend != "http" or state.status.is_terminal:
        return None
    binary = find_binary("opencode")
    if binary is None:
        _notice("opencode is not installed here (npm install -g opencode-ai); showing the "
                "loop's transcript instead")
        return None
    return await attach_opencode(loops.daemon, state.loop_id, binary=binary, on_notice=_notice)


@cli.command("dial")
@click.argument("url")
@click.option("--identity", "identity", type=click.Path(dir_okay=False),
              help="OpenZiti identity file, when the URL has no ?identity=.")
@click.option("--timeout", type=click.FloatRange(0.1), default=15.0, show_default=True,
              help="Seconds to establish the connection.")
def dial_command(url: str, identity: str | None, timeout: float) -> None:
    """Connect stdin and stdout to URL (tcp://HOST:PORT, tcps://..., ziti://SERVICE).

    Meant for OpenSSH's ProxyCommand, to reach a machine's sshd over OpenZiti:

    \b
      ssh -o ProxyCommand='ralph-uv dial ziti://HOST-ssh?identity=ID.json' user@HOST
    """
    from pathlib import Path

    from ralph_uv.client.tmux_attach import dial

    options = ConnectOptions(timeout=timeout,
                             ziti_identity=Path(identity) if identity else None)
    asyncio.run(dial(url, options=options))
