"""Remote machines: the ralphds this client runs loops on, reached by name.

A remote is a row of the registry's ``remotes`` table (name, URL, identity file, where its
token is kept) plus, when needed, a few connection settings in ``<config>/remotes/<name>.toml``
(a CA to trust, a client certificate, the path of ``ralph-uv`` on the remote machine).
Tokens given on the command line are written to ``<config>/remotes/<name>.token`` (mode 0600)
and the registry keeps only a ``file:`` reference to them, never the token itself.

- :func:`add_remote` checks the name and URL, connects once (unless told not to) and stores it;
  :func:`remove_remote` forgets it; :func:`get_remote` finds it or says how to add it.
- :func:`connect_remote` gives a :class:`~ralph_uv.client.daemon.DaemonClient` on the remote's
  ralphd over its transport (SSH, TCP/TLS, OpenZiti, or a Unix socket); :func:`remote_opener`
  gives the stream opener behind it, for clients that reconnect by themselves.
- :func:`probe_remote` says whether a remote answers, its version, its loops and the round-trip
  time of one call; :func:`check_remote` runs ``ralphd check`` there (over SSH).

A plain (non-TLS) TCP address that is not loopback is refused unless the remote was added with
``tunnel`` (an OpenZiti or VPN intercept that encrypts underneath): the token would otherwise
cross the network in clear text.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ralph_uv.client.daemon import DaemonClient, StreamOpener
from ralph_uv.client.loops import Loops, client_name
from ralph_uv.config import paths
from ralph_uv.errors import ErrorCode, RalphError, UserError
from ralph_uv.registry import LOCAL, Registry, RemoteRecord
from ralph_uv.transports import ConnectOptions, connect, parse_url
from ralph_uv.transports.auth import read_token_file, write_token_file
from ralph_uv.transports.base import Stream
from ralph_uv.transports.urls import SSHAddress, TCPAddress, ZitiAddress

__all__ = [
    "PROBE_TIMEOUT",
    "STATUS_TIMEOUT",
    "CheckResult",
    "Probe",
    "RemoteSettings",
    "add_remote",
    "check_remote",
    "close_remote_connections",
    "connect_remote",
    "get_remote",
    "list_remotes",
    "load_settings",
    "probe_remote",
    "remote_loops",
    "remote_opener",
    "remote_options",
    "remove_remote",
    "validate_remote_name",
]

log = logging.getLogger("ralph_uv.client.remotes")

STATUS_TIMEOUT = 3.0
"""Seconds ``status`` and ``remote list`` give each remote before calling it unreachable."""
PROBE_TIMEOUT = 30.0
"""Seconds ``remote add`` gives the first connection (it may start ralphd over there)."""
_CHECK_TIMEOUT = 180.0
_NAME_CHARS = "letters, digits, '.', '_' or '-', starting with a letter or digit, at most 63"


# ----------------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class RemoteSettings:
    """Connection settings of a remote beyond its URL, identity file and token.

    ``tls_ca``: the CA certificate that signed the remote's TLS certificate (default: the
    system's CAs); ``tls_cert``/``tls_key``: a client certificate for mutual TLS;
    ``tls_server_name``: the name its certificate carries, when it is not the URL's host;
    ``remote_ralph``: the ``ralph-uv`` command on the remote machine when it is not on the PATH
    of a non-interactive SSH session (e.g. ``~/.local/bin/ralph-uv``); ``tunnel``: allow plain
    TCP to a non-loopback address because an OpenZiti or VPN intercept encrypts it.
    """

    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    remote_ralph: str | None = None
    tunnel: bool = False

    def is_default(self) -> bool:
        return self == RemoteSettings()

    def to_toml(self) -> str:
        """The settings file's text (only the settings that are set)."""
        lines = ["# ralph-uv remote settings (written by `ralph-uv remote add`)"]
        for item in fields(self):
            value = getattr(self, item.name)
            if value is None or value is False:
                continue
            text = "true" if value is True else json.dumps(str(value))
            lines.append(f"{item.name} = {text}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str) -> RemoteSettings:
        known = {item.name for item in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"{source}: unknown setting(s) {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(sorted(known))}")
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name == "tunnel":
                if not isinstance(value, bool):
                    raise UserError(f"{source}: tunnel must be true or false")
                values[name] = value
            elif not isinstance(value, str) or not value:
                raise UserError(f"{source}: {name} must be a non-empty string")
            elif name in ("tls_ca", "tls_cert", "tls_key"):
                values[name] = Path(value).expanduser()
            else:
                values[name] = value
        return cls(**values)


def _remotes_dir() -> Path:
    return paths().config / "remotes"


def _settings_file(name: str) -> Path:
    return _remotes_dir() / f"{name}.toml"


def _token_file(name: str) -> Path:
    return _remotes_dir() / f"{name}.token"


def load_settings(name: str) -> RemoteSettings:
    """The remote's settings file, or the defaults when it has none."""
    file = _settings_file(name)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return RemoteSettings()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"{file}: cannot read the remote's settings ({exc}); fix or remove it "
                        "and add the remote again") from exc
    return RemoteSettings.from_mapping(data, str(file))


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc


# ----------------------------------------------------------------------------------- records


def validate_remote_name(name: str) -> str:
    """``name`` when it can name a remote (the registry's rule), else a ``UserError``."""
    ok = (
        isinstance(name, str) and 0 < len(name) <= 63 and name != LOCAL
        and name[0].isascii() and name[0].isalnum()
        and all(ch.isascii() and (ch.isalnum() or ch in "._-") for ch in name)
    )
    if not ok:
        raise UserError(f"{name!r} cannot name a remote: use {_NAME_CHARS} (not {LOCAL!r})",
                        code=ErrorCode.INVALID_NAME)
    return name


def list_remotes() -> list[RemoteRecord]:
    """Every remote, by name (none when the registry does not exist yet)."""
    if not paths().registry.exists():
        return []
    with Registry.open() as registry:
        return registry.list_remotes()


def get_remote(name: str) -> RemoteRecord:
    """The remote called ``name``; a ``UserError`` naming the known ones when there is none."""
    validate_remote_name(name)
    remotes = list_remotes()
    for remote in remotes:
        if remote.name == name:
            return remote
    known = ", ".join(r.name for r in remotes) or "none yet"
    raise UserError(f"no remote named {name!r} (known: {known}); add it with "
                    f"`ralph-uv remote add {name} ssh://user@host`",
                    code=ErrorCode.INVALID_NAME)


def _resolve_token(remote: RemoteRecord) -> str | None:
    ref = remote.token_ref
    if ref is None:
        return None
    scheme, _, value = ref.partition(":")
    if scheme == "file":
        return read_token_file(Path(value))
    if scheme == "env":
        token = os.environ.get(value)
        if not token:
            raise UserError(f"remote {remote.name}: its token is read from ${value}, which is "
                            "not set; export it first")
        return token
    try:
        import keyring  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise UserError(f"remote {remote.name}: its token is in the keyring ({ref}) but the "
                        "keyring package is not installed; pip install keyring") from None
    token = keyring.get_password("ralph-uv", value)
    if not token:
        raise UserError(f"remote {remote.name}: no token named {value!r} in the keyring")
    return str(token)


def remote_options(remote: RemoteRecord) -> ConnectOptions:
    """How to connect to ``remote``: its identity file, token and settings."""
    settings = load_settings(remote.name)
    return ConnectOptions(
        token=_resolve_token(remote),
        identity_file=Path(remote.identity_file) if remote.identity_file else None,
        remote_ralph=settings.remote_ralph or "ralph-uv",
        tls_ca=settings.tls_ca,
        tls_cert=settings.tls_cert,
        tls_key=settings.tls_key,
        tls_server_name=settings.tls_server_name,
    )


def _refuse_plain_network_tcp(name: str, url: str, tunnel: bool) -> None:
    address = parse_url(url)
    if isinstance(address, TCPAddress) and not address.tls and not address.is_loopback \
            and not tunnel:
        raise UserError(
            f"remote {name}: refusing plain TCP to {address.host}: its token would cross the "
            "network in clear text; use tcps://HOST:PORT (or ?tls=1) with a listener that has "
            "a certificate, or, when the address is an OpenZiti or VPN intercept that encrypts "
            "the traffic itself, add the remote with --tunnel"
        )


def remote_opener(remote: RemoteRecord) -> StreamOpener:
    """A function that opens a new stream to ``remote``'s ralphd each time it is called."""
    _refuse_plain_network_tcp(remote.name, remote.url, load_settings(remote.name).tunnel)
    options = remote_options(remote)
    url = remote.url

    async def opener() -> Stream:
        return await connect(url, options=options)

    return opener


async def connect_remote(remote: RemoteRecord | str, *, client: str) -> DaemonClient:
    """A connection to the remote's ralphd, after ``hello`` (over SSH, ralphd is started
    there if it is not running)."""
    record = get_remote(remote) if isinstance(remote, str) else remote
    return await DaemonClient.open(remote_opener(record), client=client)


async def remote_loops(remote: RemoteRecord | str, *, kind: str = "ralph-uv") -> Loops:
    """The loop commands (:class:`~ralph_uv.client.loops.Loops`) on the remote's ralphd; a lost
    connection is made again to the same remote."""
    record = get_remote(remote) if isinstance(remote, str) else remote
    name = client_name(kind)

    async def reconnect() -> DaemonClient:
        return await connect_remote(record, client=name)

    return Loops(await reconnect(), client=name, reconnect=reconnect)


async def close_remote_connections() -> None:
    """Close the pooled SSH connections this event loop opened, if any (call before it ends)."""
    if "ralph_uv.transports.ssh" in sys.modules:
        from ralph_uv.transports import close_connections

        await close_connections()


# ------------------------------------------------------------------------------------- probes


@dataclass(frozen=True, slots=True)
class Probe:
    """What one connection to a remote found. ``rtt`` is the seconds one ``get_health`` call
    took on the open connection; ``error`` says why it is unreachable."""

    remote: RemoteRecord
    reachable: bool
    version: str | None = None
    host: str | None = None
    loops_active: int | None = None
    rtt: float | None = None
    connect_time: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.remote.name, "url": self.remote.url, "reachable": self.reachable,
            "version": self.version, "host": self.host, "loops_active": self.loops_active,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 2),
            "connect_ms": None if self.connect_time is None else round(self.connect_time * 1000),
            "error": self.error, "last_seen_at": self.remote.last_seen_at,
        }


async def probe_remote(remote: RemoteRecord, *, timeout: float = STATUS_TIMEOUT,  # noqa: ASYNC109
                       client: str = "ralph-uv remote") -> Probe:
    """Connect to ``remote`` within ``timeout`` seconds, ask for its health, and record when it
    was seen and its version in the registry. Never raises for an unreachable remote."""
    began = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            daemon = await connect_remote(remote, client=client)
            connected = time.monotonic()
            try:
                asked = time.monotonic()
                health = await daemon.get_health()
                rtt = time.monotonic() - asked
            finally:
                await daemon.close()
    except TimeoutError:
        return Probe(remote, False, error=f"no answer within {timeout:g} s")
    except RalphError as exc:
        return Probe(remote, False, error=exc.message)
    _seen(remote.name, health.version)
    return Probe(remote, True, version=health.version, host=health.host,
                 loops_active=health.loops_active, rtt=rtt, connect_time=connected - began)


def _seen(name: str, version: str | None) -> None:
    try:
        with Registry.open() as registry:
            registry.update_remote(name, last_seen_at=time.time(), version=version)
    except RalphError as exc:  # removed meanwhile, or the registry is busy: not worth failing
        log.info("remote %s: not recorded as seen: %s", name, exc.message)


# ------------------------------------------------------------------------------- add, remove


def _prepare(
    name: str, url: str, identity_file: Path | None, token: str | None,
    token_file: Path | None, settings: RemoteSettings,
) -> RemoteRecord:
    """Every check of :func:`add_remote` that needs no connection; the record to store."""
    validate_remote_name(name)
    address = parse_url(url)
    url = address.url
    with Registry.open() as registry:
        if registry.get_remote(name) is not None:
            raise UserError(f"a remote named {name} exists already; `ralph-uv remote remove "
                            f"{name}` first, or pick another name", code=ErrorCode.INVALID_NAME)
    networked = isinstance(address, TCPAddress | ZitiAddress)
    if token is not None and token_file is not None:
        raise UserError("give the token once: --token or --token-file, not both")
    if networked and token is None and token_file is None:
        raise UserError(f"{url}: a {'TCP' if isinstance(address, TCPAddress) else 'OpenZiti'} "
                        "remote needs the listener's token: --token-file FILE (mode 0600) or "
                        "--token TOKEN")
    if not networked and (token is not None or token_file is not None):
        raise UserError(f"{url}: tokens are for tcp:// and ziti:// remotes; an SSH remote "
                        "authenticates with your SSH keys")
    if identity_file is not None:
        if not isinstance(address, SSHAddress):
            raise UserError("--identity is an SSH key; it only applies to ssh:// remotes")
        identity_file = identity_file.expanduser().resolve()
        if not identity_file.is_file():
            raise UserError(f"the identity file {identity_file} does not exist")
    _refuse_plain_network_tcp(name, url, settings.tunnel)
    token_ref: str | None = None
    if token_file is not None:
        token_file = token_file.expanduser().resolve()
        read_token_file(token_file)  # missing, too short or readable by others: say so now
        token_ref = f"file:{token_file}"
    elif token is not None:
        if len(token.strip()) < 16:
            raise UserError("the token is shorter than 16 characters; use the listener's token")
        token_ref = f"file:{_token_file(name)}"
    return RemoteRecord(name=name, url=url,
                        identity_file=str(identity_file) if identity_file else None,
                        token_ref=token_ref)


async def add_remote(
    name: str,
    url: str,
    *,
    identity_file: Path | None = None,
    token: str | None = None,
    token_file: Path | None = None,
    settings: RemoteSettings | None = None,
    check: bool = True,
) -> tuple[RemoteRecord, Probe | None]:
    """Check and store a new remote; with ``check``, connect to it first (nothing is stored
    when that fails). Returns the stored record and the probe (``None`` without ``check``)."""
    settings = settings or RemoteSettings()
    record = _prepare(name, url, identity_file, token, token_file, settings)
    written: list[Path] = []
    try:
        if token is not None:
            write_token_file(_token_file(name), token.strip())
            written.append(_token_file(name))
        if not settings.is_default():
            _write_private(_settings_file(name), settings.to_toml())
            written.append(_settings_file(name))
        probe: Probe | None = None
        if check:
            probe = await probe_remote(record, timeout=PROBE_TIMEOUT, client="ralph-uv remote add")
            if not probe.reachable:
                raise UserError(f"cannot reach {name} at {record.url}: {probe.error}; fix "
                                "that, or add it anyway with --no-check")
            record = dataclasses.replace(record, last_seen_at=time.time(),
                                         version=probe.version)
        with Registry.open() as registry:
            registry.add_remote(record)
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    log.info("remote %s added: %s", name, record.url)
    return record, probe


def remove_remote(name: str) -> RemoteRecord:
    """Forget a remote and the token and settings files ralph-uv wrote for it (a token file
    you gave with ``--token-file`` stays). Its loops' rows stay in the registry."""
    remote = get_remote(name)
    with Registry.open() as registry:
        registry.delete_remote(name)
    for path in (_token_file(name), _settings_file(name)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return remote


# -------------------------------------------------------------------------------------- check


@dataclass(frozen=True, slots=True)
class CheckResult:
    """``ralphd check`` as run on the remote: its exit status and output."""

    exit_status: int
    output: str
    errors: str


async def check_remote(name: str) -> CheckResult:
    """Run ``ralphd check`` on the remote machine (over SSH: it needs a shell there)."""
    remote = get_remote(name)
    address = parse_url(remote.url)
    if not isinstance(address, SSHAddress):
        raise UserError(
            f"remote {name} is reached over {remote.url.partition(':')[0]}, which carries only "
            "ralphd's protocol; `remote check` runs `ralphd check` over SSH. Run `ralphd check` "
            f"on that machine yourself (`ralph-uv remote list` shows whether {name} answers)"
        )
    from ralph_uv.transports import ssh_exec
    from ralph_uv.transports.ssh import remote_command

    options = remote_options(remote)
    command = remote_command(options, ("ralph-uv", "daemon", "check"))
    # Through sh -c so that a remote_ralph of ~/... is expanded there.
    status, out, err = await ssh_exec(remote.url, ["sh", "-c", command], options=options,
                                      timeout=_CHECK_TIMEOUT)
    if status == 127:
        raise UserError(
            f"ralph-uv was not found on {name} (`{command}`); install it there "
            "(`pipx install ralph-uv`), or give its path: `ralph-uv remote remove "
            f"{name}` and add it again with --remote-ralph ~/.local/bin/ralph-uv"
        )
    return CheckResult(status, out.decode(errors="replace"), err.decode(errors="replace"))

