"""How to connect and how to listen: the settings every transport reads its part of.

One :class:`ConnectOptions` and one :class:`ListenOptions` serve every scheme, so a caller that
takes a URL from the user passes the same options whatever the URL turns out to be; each
transport reads the fields it needs and ignores the rest. Both are frozen (hashable: the SSH
pool keys its connections on them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ConnectOptions", "ListenOptions"]


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """Client-side settings.

    Every transport:
        ``timeout`` — seconds to establish the connection (including SSH authentication).

    TCP/TLS and OpenZiti (network connections authenticate with a token):
        ``token`` or ``token_file`` — the listener's token; the stream adds it to the first
        ``hello`` the caller sends if that hello carries none.

    SSH (see :mod:`ralph_uv.transports.ssh`):
        ``identity_file`` — a private key to use instead of the agent and the ssh config's keys;
        ``known_hosts`` — the known_hosts file (default: the ssh config's ``UserKnownHostsFile``,
        then ``~/.ssh/known_hosts``); ``ssh_config`` — ssh config files to read (``None``:
        ``~/.ssh/config``; ``()``: none); ``use_agent`` — offer the SSH agent's keys;
        ``keepalive_interval`` — seconds between keepalives on the pooled connection (3 missed
        ones drop it); ``remote_ralph`` — the command that runs ``ralph-uv`` on the remote
        machine (e.g. ``~/.venvs/ralph/bin/ralph-uv``); ``remote_command_prefix`` — words put
        before it (e.g. ``("env", "PATH=/opt/ralph/bin:/usr/bin:/bin")``).

    TLS (``tcps://`` or ``?tls=1``):
        ``tls_ca`` — CA certificates to trust (default: the system's); ``tls_cert`` and
        ``tls_key`` — a client certificate for mutual TLS; ``tls_server_name`` — the name to
        check the server's certificate against (default: the URL's host).

    OpenZiti:
        ``ziti_identity`` — the identity file, when the URL has no ``identity=``.
    """

    timeout: float = 15.0
    token: str | None = None
    token_file: Path | None = None
    identity_file: Path | None = None
    known_hosts: Path | None = None
    ssh_config: tuple[Path, ...] | None = None
    use_agent: bool = True
    keepalive_interval: float = 15.0
    remote_ralph: str = "ralph-uv"
    remote_command_prefix: tuple[str, ...] = ()
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    ziti_identity: Path | None = None

    def __repr__(self) -> str:
        # The token must not reach a log through a repr.
        shown = "***" if self.token else None
        return (f"ConnectOptions(timeout={self.timeout}, token={shown}, "
                f"identity_file={self.identity_file}, ssh_config={self.ssh_config})")


@dataclass(frozen=True, slots=True)
class ListenOptions:
    """Server-side settings.

    Unix sockets: ``allowed_uid`` (default: this process's uid; ``None`` lets every uid in)
    and ``max_connections``.

    Network listeners (TCP/TLS, OpenZiti) need a token (``token`` or ``token_file``): a
    connection whose first message is not a ``hello`` carrying it is refused before the
    connection handler sees it. ``auth_timeout`` bounds the wait for that first message.

    TLS: ``tls_cert`` and ``tls_key`` (the server's certificate chain and key; required on a
    non-loopback address), ``tls_client_ca`` (require client certificates signed by it:
    mutual TLS).

    OpenZiti: ``ziti_identity`` when the URL has no ``identity=``.
    """

    token: str | None = None
    token_file: Path | None = None
    auth_timeout: float = 10.0
    allowed_uid: int | None = field(default_factory=os.getuid)
    max_connections: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    ziti_identity: Path | None = None

    def __repr__(self) -> str:
        shown = "***" if self.token else None
        return (f"ListenOptions(token={shown}, token_file={self.token_file}, "
                f"tls_cert={self.tls_cert}, tls_client_ca={self.tls_client_ca})")
