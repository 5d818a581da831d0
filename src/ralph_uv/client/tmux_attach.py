"""Plain tmux on a tmux-backed loop, here or on a remote machine; and ``ralph-uv dial``.

A loop started with backend ``tmux`` runs its agent in the tmux session its ``get_status``
names (``{"socket", "session"}``, see :mod:`ralph_uv.runner.tmux`). :func:`tmux_attach_argv`
builds the command line that puts this terminal on that session:

- this machine: ``tmux -L ralph-uv attach-session -t =ralph-<task>``;
- over SSH: ``ssh -t [-p PORT] [user@]host tmux -L ralph-uv attach-session -t =ralph-<task>``,
  with the remote's identity file and known_hosts when it has them;
- over OpenZiti (or TCP): SSH through ``-o ProxyCommand="ralph-uv dial URL"``, where URL
  reaches the remote machine's **sshd** (for OpenZiti: a service that fronts sshd, which is
  not ralphd's service: ralphd speaks JSON-RPC, tmux needs a login), given as ``ssh_via``.

:func:`dial` is what ``ralph-uv dial URL`` runs: it copies stdin to a transport stream
(:func:`ralph_uv.transports.connect`) and the stream to stdout, which is what OpenSSH's
``ProxyCommand`` expects.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from collections.abc import Sequence

from ralph_uv.errors import TransportError, UserError
from ralph_uv.runner.tmux_target import TmuxTarget
from ralph_uv.transports import ConnectOptions, connect, parse_url
from ralph_uv.transports.base import Stream
from ralph_uv.transports.pump import half_close, pump
from ralph_uv.transports.urls import SSHAddress, TCPAddress, UnixAddress, ZitiAddress

__all__ = ["dial", "local_ralph_argv", "ssh_base_argv", "tmux_attach_argv"]

_READ_SIZE = 64 * 1024


def local_ralph_argv() -> list[str]:
    """How to run this ralph-uv from a shell (``ProxyCommand``): this Python, this package."""
    return [sys.executable, "-m", "ralph_uv.cli"]


def ssh_base_argv(options: ConnectOptions | None) -> list[str]:
    """``ssh -t`` with what ``options`` says about keys, known hosts and the ssh config."""
    argv = ["ssh", "-t"]
    if options is None:
        return argv
    if options.ssh_config == ():
        argv += ["-F", "/dev/null"]
    elif options.ssh_config:
        argv += ["-F", str(options.ssh_config[0])]
    if options.identity_file is not None:
        argv += ["-i", str(options.identity_file), "-o", "IdentitiesOnly=yes"]
    if options.known_hosts is not None:
        argv += ["-o", f"UserKnownHostsFile={options.known_hosts}"]
    return argv


def tmux_attach_argv(
    target: TmuxTarget,
    url: str | None = None,
    *,
    options: ConnectOptions | None = None,
    ssh_via: str | None = None,
    ssh_user: str | None = None,
    ralph: Sequence[str] | None = None,
) -> list[str]:
    """The command line that attaches this terminal to ``target``'s session on the machine of
    ralphd at ``url`` (``None`` or ``unix://``: this one).

    ``ssh_via`` (an ``ssh://``-less URL such as ``ziti://host-ssh?identity=FILE`` or
    ``tcp://host:22``) reaches the remote's sshd through ``ralph-uv dial`` (``ralph``: the
    command that runs this ralph-uv); it is required for OpenZiti and TCP remotes.
    """
    remote_command = shlex.join(target.attach_argv())
    address = parse_url(url) if url else UnixAddress(None)
    if isinstance(address, UnixAddress) and ssh_via is None:
        return target.attach_argv()
    if ssh_via is None:
        if isinstance(address, SSHAddress):
            argv = ssh_base_argv(options)
            if address.port is not None:
                argv += ["-p", str(address.port)]
            user = ssh_user or address.user
            return [*argv, f"{user}@{address.host}" if user else address.host, remote_command]
        kind = "OpenZiti" if isinstance(address, ZitiAddress) else "TCP"
        raise UserError(
            f"attaching with tmux to a loop reached over {kind} needs a way to the remote's "
            "sshd: pass --ssh-via URL (for OpenZiti a service that fronts sshd, e.g. "
            "ziti://HOST-ssh?identity=FILE; or tcp://HOST:22)"
        )
    via = parse_url(ssh_via)
    port: list[str] = []
    if isinstance(via, ZitiAddress):
        host = via.service
    elif isinstance(via, TCPAddress):
        # The port only names the host key in known_hosts ([host]:port), as for a direct ssh.
        host, port = via.host, ["-p", str(via.port)]
    else:
        raise UserError(f"--ssh-via {ssh_via!r} must be a ziti:// or tcp:// URL that reaches "
                        "the remote's sshd")
    if ssh_user is None and isinstance(address, SSHAddress):
        ssh_user = address.user
    # ssh expands %-tokens in ProxyCommand; a URL's %-escapes must stay as they are.
    proxy = shlex.join([*(ralph or local_ralph_argv()), "dial", ssh_via]).replace("%", "%%")
    argv = [*ssh_base_argv(options), *port, "-o", f"ProxyCommand={proxy}"]
    return [*argv, f"{ssh_user}@{host}" if ssh_user else host, remote_command]


# ------------------------------------------------------------------------------------- dial


async def _stdin_to_stream(reader: asyncio.StreamReader, stream: Stream) -> None:
    await pump(reader, stream, chunk=_READ_SIZE)
    half_close(stream)


async def dial(url: str, *, options: ConnectOptions | None = None, stdin_fd: int = 0,
               stdout_fd: int = 1) -> None:
    """Connect to ``url`` and copy ``stdin_fd`` to it and it to ``stdout_fd`` until it closes
    (pipes or sockets, as OpenSSH's ``ProxyCommand`` gives)."""
    stream = await connect(url, options=options)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        stdin = os.fdopen(stdin_fd, "rb", buffering=0, closefd=False)
        stdout = os.fdopen(stdout_fd, "wb", buffering=0, closefd=False)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, stdout)
    except (OSError, ValueError) as exc:
        stream.abort()
        raise UserError(f"ralph-uv dial needs pipes or sockets on stdin and stdout: {exc}"
                        ) from exc
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    up = asyncio.create_task(_stdin_to_stream(reader, stream))
    down = asyncio.create_task(pump(stream, writer, chunk=_READ_SIZE))
    try:
        # Done when the far end closes; stdin's end only ends the sending half.
        await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
        if up.done() and up.exception() is None and not down.done():
            await asyncio.wait({down})
        for task in (up, down):
            if task.done() and not task.cancelled():
                error = task.exception()
                if isinstance(error, OSError):
                    raise TransportError(f"dial {url}: {error}") from error
                if error is not None:
                    raise error
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        stream.abort()
        transport.close()
