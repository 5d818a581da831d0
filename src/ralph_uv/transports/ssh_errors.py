"""From ralph-uv's SSH options to asyncssh's, and from asyncssh's errors back to ours.

No asyncssh exception leaves :mod:`ralph_uv.transports.ssh`: each becomes a
:class:`~ralph_uv.errors.TransportError` (the network or the other side) or a
:class:`~ralph_uv.errors.UserError` (something to fix in the local setup) whose message says
what happened and what to do: an unreachable host, authentication refused (with the keys that
were offered), an unknown or changed host key (with its fingerprint and the commands that trust
it), a channel the server would not open.
"""

from __future__ import annotations

import ipaddress
import logging
import shlex
import socket
from pathlib import Path
from typing import Any

import asyncssh

from ralph_uv.errors import RalphError, TransportError, UserError
from ralph_uv.transports.options import ConnectOptions
from ralph_uv.transports.urls import DEFAULT_SSH_PORT, SSHAddress

__all__ = ["TRANSIENT", "channel_error", "connect_error", "connection_kwargs"]

log = logging.getLogger("ralph_uv.transports.ssh")

TRANSIENT: tuple[type[BaseException], ...] = (
    ConnectionRefusedError,
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
    asyncssh.ConnectionLost,
)
"""Connection failures worth another try (sshd restarting, a dropped handshake)."""

_DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_ed25519_sk", "id_ecdsa_sk", "id_rsa", "id_dsa")


def connection_kwargs(address: SSHAddress, options: ConnectOptions) -> dict[str, Any]:
    """The keyword arguments for ``asyncssh.connect`` (and its options) for ``address``."""
    config: Any
    if options.ssh_config is None:
        config = ()  # asyncssh's default: ~/.ssh/config when it exists
    elif not options.ssh_config:
        config = None  # none at all
    else:
        config = [str(path) for path in options.ssh_config]
    kwargs: dict[str, Any] = {
        "config": config,
        "keepalive_interval": options.keepalive_interval,
        "keepalive_count_max": 3,
        "connect_timeout": options.timeout,
        "login_timeout": options.timeout,
    }
    if address.user:
        kwargs["username"] = address.user
    if options.known_hosts is not None:
        kwargs["known_hosts"] = str(options.known_hosts)
    if options.identity_file is not None:
        kwargs["client_keys"] = [str(options.identity_file)]
    if not options.use_agent:
        kwargs["agent_path"] = None
    return kwargs


async def _resolved(address: SSHAddress, options: ConnectOptions) -> Any:
    """asyncssh's view of the target after the ssh config (HostName, Port, User, ...)."""
    try:
        return await asyncssh.SSHClientConnectionOptions.construct(
            host=address.host, port=address.port or (), **connection_kwargs(address, options)
        )
    except (OSError, asyncssh.Error, ValueError) as exc:
        log.debug("cannot resolve the ssh options of %s: %s", address.url, exc)
        return None


def _known_hosts_files(resolved: Any, options: ConnectOptions) -> list[Path]:
    if options.known_hosts is not None:
        return [options.known_hosts]
    configured = getattr(resolved, "known_hosts", None)
    if isinstance(configured, str | Path):
        return [Path(configured).expanduser()]
    if isinstance(configured, list | tuple) and configured:
        return [Path(str(item)).expanduser() for item in configured]
    return [Path("~/.ssh/known_hosts").expanduser()]


def _known_keys(files: list[Path], host: str, port: int) -> list[asyncssh.SSHKey]:
    """The keys the known_hosts files hold for ``host``:``port``."""
    try:
        addr = str(ipaddress.ip_address(host))
    except ValueError:
        addr = ""
    found: list[asyncssh.SSHKey] = []
    for path in files:
        if not path.is_file():
            continue
        try:
            keys = asyncssh.read_known_hosts(str(path)).match(
                host, addr, port if port != DEFAULT_SSH_PORT else None
            )[0]
        except (OSError, ValueError, asyncssh.Error):
            continue
        found.extend(keys)
    return found


def _host_key_error(address: SSHAddress, options: ConnectOptions, resolved: Any,
                    refused: asyncssh.SSHKey | None) -> TransportError:
    host = str(getattr(resolved, "host_key_alias", None) or getattr(resolved, "host", None)
               or address.host)
    port = int(getattr(resolved, "port", None) or address.port or DEFAULT_SSH_PORT)
    files = _known_hosts_files(resolved, options)
    target = f"[{host}]:{port}" if port != DEFAULT_SSH_PORT else host
    fingerprint = (f"{refused.get_algorithm()} key {refused.get_fingerprint()}"
                   if refused is not None else "its key")
    keyscan = f"ssh-keyscan{f' -p {port}' if port != DEFAULT_SSH_PORT else ''} {host}"
    known = shlex.quote(str(files[0]))
    if _known_keys(files, host, port):
        return TransportError(
            f"the host key of {target} has CHANGED: it now presents {fingerprint}, which is "
            f"not the one in {files[0]}. Someone may be intercepting the connection, or the "
            "machine was reinstalled. Only if you know why, check the new fingerprint with "
            f"the machine's owner, then replace the old key: `ssh-keygen -R "
            f"{shlex.quote(target)} -f {known}` and `{keyscan} >> {known}`"
        )
    return TransportError(
        f"the host key of {target} is not known ({fingerprint}); compare this fingerprint "
        "with the one on the machine (`ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub` there), "
        f"then trust it: `{keyscan} >> {known}` (or connect once with ssh)"
    )


def _tried_keys(resolved: Any, options: ConnectOptions) -> str:
    if options.identity_file is not None:
        files = [str(options.identity_file)]
    else:
        config = getattr(resolved, "config", None)
        configured = config.get("IdentityFile", ()) if config is not None else ()
        if configured:
            files = [str(Path(str(item)).expanduser()) for item in configured]
        else:
            folder = Path("~/.ssh").expanduser()
            files = [str(folder / name) for name in _DEFAULT_KEYS if (folder / name).exists()]
    parts = [f"key file(s) {', '.join(files)}"] if files else ["no key files"]
    agent = getattr(resolved, "agent_path", None)
    if options.use_agent and options.identity_file is None and agent:
        parts.append(f"the keys of the SSH agent at {agent}")
    elif options.use_agent and options.identity_file is None:
        parts.append("no SSH agent (SSH_AUTH_SOCK is not set)")
    return "; ".join(parts)


async def connect_error(exc: BaseException, address: SSHAddress, options: ConnectOptions,
                        refused_key: asyncssh.SSHKey | None) -> RalphError:
    """The error to raise for a failed ``asyncssh.connect`` to ``address``."""
    where = address.url
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return _host_key_error(address, options, await _resolved(address, options),
                               refused_key)
    if isinstance(exc, asyncssh.PermissionDenied):
        resolved = await _resolved(address, options)
        user = getattr(resolved, "username", None) or address.user or "?"
        return TransportError(
            f"{where} refused the login of user {user!r}; tried {_tried_keys(resolved, options)}."
            " Put your public key in ~/.ssh/authorized_keys there (ssh-copy-id), add the key "
            "to your agent (ssh-add), or give an identity file"
        )
    if isinstance(exc, asyncssh.KeyImportError):
        return UserError(f"cannot use the SSH key for {where}: {exc}; if it has a passphrase, "
                         "add it to the SSH agent (ssh-add FILE) instead")
    if isinstance(exc, ValueError):  # asyncssh's ConfigParseError and bad option values
        return UserError(f"cannot use the SSH settings for {where}: {exc}; check your ssh "
                         "config file")
    if isinstance(exc, TimeoutError):
        return TransportError(f"no SSH answer from {where} within {options.timeout:g} s; "
                              "is the host up and the port right?")
    if isinstance(exc, socket.gaierror):
        return TransportError(f"cannot resolve {address.host!r} ({exc.strerror}): it is "
                              "neither a known host name nor a Host alias in your ssh config")
    if isinstance(exc, ConnectionRefusedError):
        return TransportError(f"nothing accepts SSH connections at {where} (connection "
                              "refused); is sshd running there, on that port?")
    if isinstance(exc, OSError):
        return TransportError(f"cannot reach {where}: {exc.strerror or exc}")
    if isinstance(exc, asyncssh.DisconnectError):
        return TransportError(f"{where} ended the SSH connection: {exc.reason}")
    return TransportError(f"SSH connection to {where} failed: {exc}")


def channel_error(exc: BaseException, label: str, what: str) -> TransportError:
    """The error to raise when a channel on an established connection fails."""
    if isinstance(exc, asyncssh.ChannelOpenError):
        return TransportError(
            f"{label} would not {what} ({exc.reason}): nothing listens there, the socket is "
            "not yours, or sshd forbids forwarding to Unix sockets"
        )
    if isinstance(exc, asyncssh.DisconnectError):
        return TransportError(f"the SSH connection to {label} was lost while trying to {what}:"
                              f" {exc.reason}")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return TransportError(f"cannot {what} on {label}: {reason or type(exc).__name__}")

