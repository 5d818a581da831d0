"""Transport URLs: what a client dials and what a listener binds, parsed and checked once.

=========================================  ==============================================
``unix:///path/ralphd.sock``               a Unix socket (``unix://`` alone: this machine's
                                           ralphd, ``paths().daemon_socket``)
``ssh://[user@]host[:port]``               ralphd on ``host``, reached over SSH; ``host``
                                           may be an alias from ``~/.ssh/config``
``tcp://host:port[?tls=1]``, ``tcps://…``  TCP, with TLS when ``tls`` is on (``tcps``)
``ziti://SERVICE[?identity=FILE]``         an OpenZiti service, with the identity file
=========================================  ==============================================

:func:`parse_url` turns a string into one of the frozen address records below, or raises a
:class:`~ralph_uv.errors.UserError` that says what is wrong with it and what a good one looks
like. Each record's :attr:`url` gives the canonical form back.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlsplit

from ralph_uv.errors import UserError

__all__ = [
    "DEFAULT_SSH_PORT",
    "SCHEMES",
    "Address",
    "SSHAddress",
    "TCPAddress",
    "UnixAddress",
    "ZitiAddress",
    "parse_url",
]

DEFAULT_SSH_PORT = 22
SCHEMES = ("unix", "ssh", "tcp", "tcps", "ziti")

_EXAMPLES = (
    "unix:///run/user/1000/ralph/ralphd.sock, ssh://user@host[:port], "
    "tcp://host:port?tls=1 (or tcps://host:port), ziti://SERVICE?identity=FILE"
)
# Host names and ssh config aliases: letters, digits and the few signs names use.
_HOST_NAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_])?$")
_USER_NAME = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.\-]*\$?$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True, slots=True)
class UnixAddress:
    """A Unix socket; ``path`` ``None`` means this machine's ralphd socket."""

    path: Path | None

    @property
    def url(self) -> str:
        return f"unix://{quote(str(self.path))}" if self.path is not None else "unix://"


@dataclass(frozen=True, slots=True)
class SSHAddress:
    """ralphd on an SSH host. ``user`` and ``port`` ``None`` leave them to the ssh config
    (and then to the login name and port 22)."""

    host: str
    user: str | None = None
    port: int | None = None

    @property
    def url(self) -> str:
        user = f"{quote(self.user, safe='')}@" if self.user else ""
        port = f":{self.port}" if self.port is not None else ""
        return f"ssh://{user}{_bracket(self.host)}{port}"


@dataclass(frozen=True, slots=True)
class TCPAddress:
    """A TCP endpoint, with TLS or not. Port 0 (listeners only) lets the system pick one."""

    host: str
    port: int
    tls: bool = False

    @property
    def url(self) -> str:
        scheme = "tcps" if self.tls else "tcp"
        return f"{scheme}://{_bracket(self.host)}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """True for 127.0.0.0/8, ::1 and ``localhost`` (names are not resolved here)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True, slots=True)
class ZitiAddress:
    """An OpenZiti service. An empty ``service`` lets a listener use its default name."""

    service: str
    identity: Path | None = None

    @property
    def url(self) -> str:
        query = f"?identity={quote(str(self.identity))}" if self.identity is not None else ""
        return f"ziti://{quote(self.service, safe='')}{query}"


Address = UnixAddress | SSHAddress | TCPAddress | ZitiAddress


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bad(url: str, problem: str) -> UserError:
    return UserError(f"bad address {url!r}: {problem}; examples: {_EXAMPLES}")


def _query(url: str, raw: str, allowed: tuple[str, ...]) -> dict[str, str]:
    try:
        pairs = parse_qsl(raw, keep_blank_values=True, strict_parsing=bool(raw))
    except ValueError as exc:
        raise _bad(url, f"the query {raw!r} cannot be read") from exc
    values: dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            known = ", ".join(allowed) if allowed else "none"
            raise _bad(url, f"unknown option {key!r} (known options: {known})")
        if key in values:
            raise _bad(url, f"option {key!r} is given twice")
        values[key] = value
    return values


def _flag(url: str, name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise _bad(url, f"{name}={value!r} is not a yes/no value (use {name}=1 or {name}=0)")


def _host(url: str, raw: str | None, *, allow_empty: bool = False) -> str:
    if not raw:
        if allow_empty:
            return ""
        raise _bad(url, "the host is missing")
    if ":" in raw:  # urlsplit has already removed the brackets of an IPv6 literal
        try:
            return str(ipaddress.IPv6Address(raw))
        except ValueError as exc:
            raise _bad(url, f"{raw!r} is not a valid IPv6 address") from exc
    if not _HOST_NAME.match(raw):
        raise _bad(url, f"{raw!r} is not a valid host name")
    return raw


def _port(url: str, split_port: str, *, allow_zero: bool = False) -> int | None:
    if not split_port:
        return None
    if not split_port.isdigit():
        raise _bad(url, f"the port {split_port!r} is not a number")
    port = int(split_port)
    if port > 65535 or (port == 0 and not allow_zero):
        raise _bad(url, f"the port {port} is outside 1-65535")
    return port


def _netloc_port(url: str, netloc: str) -> str:
    """The text after the host's ``:`` (urlsplit's ``port`` raises on bad values)."""
    hostport = netloc.rpartition("@")[2]
    if hostport.startswith("["):
        _, _, rest = hostport.partition("]")
        return rest[1:] if rest.startswith(":") else ""
    if hostport.count(":") > 1:
        raise _bad(url, "an IPv6 address must be written in brackets, as in tcp://[::1]:9000")
    return hostport.partition(":")[2]


def _parse_unix(url: str, split: SplitResult) -> UnixAddress:
    netloc, path, query = split.netloc, split.path, split.query
    if netloc:
        raise _bad(url, "a Unix socket URL has an absolute path after three slashes, "
                        "as in unix:///tmp/ralphd.sock")
    _query(url, query, ())
    if not path:
        return UnixAddress(None)
    decoded = unquote(path)
    if not decoded.startswith("/"):
        raise _bad(url, "the socket path must be absolute")
    return UnixAddress(Path(decoded))


def _parse_ssh(url: str, split: SplitResult) -> SSHAddress:
    netloc, path, query = split.netloc, split.path, split.query
    if path not in ("", "/"):
        raise _bad(url, "an ssh URL names a machine, not a path (ralphd's socket is found "
                        "on the remote side)")
    _query(url, query, ())
    userinfo, at, _ = netloc.rpartition("@")
    user: str | None = None
    if at:
        if ":" in userinfo:
            raise _bad(url, "passwords in URLs are not supported; use keys or the SSH agent")
        user = unquote(userinfo)
        if not _USER_NAME.match(user):
            raise _bad(url, f"{user!r} is not a valid user name")
    host = _host(url, split.hostname if netloc else None)
    return SSHAddress(host=host, user=user, port=_port(url, _netloc_port(url, netloc)))


def _parse_tcp(url: str, split: SplitResult, scheme: str) -> TCPAddress:
    netloc, path, query = split.netloc, split.path, split.query
    if path not in ("", "/"):
        raise _bad(url, "a tcp URL has no path")
    if "@" in netloc:
        raise _bad(url, "a tcp URL has no user name; authentication uses a token")
    options = _query(url, query, ("tls",))
    host = _host(url, split.hostname if netloc else None)
    port = _port(url, _netloc_port(url, netloc), allow_zero=True)
    if port is None:
        raise _bad(url, "the port is missing")
    tls = scheme == "tcps"
    if "tls" in options:
        wanted = _flag(url, "tls", options["tls"])
        if tls and not wanted:
            raise _bad(url, "tcps:// always uses TLS; write tcp:// for plain TCP")
        tls = wanted
    return TCPAddress(host=host, port=port, tls=tls)


def _parse_ziti(url: str, split: SplitResult) -> ZitiAddress:
    netloc, path, query = split.netloc, split.path, split.query
    if path not in ("", "/"):
        raise _bad(url, "a ziti URL names a service, not a path")
    options = _query(url, query, ("identity",))
    service = unquote(netloc)
    if "@" in netloc or any(ord(ch) < 32 for ch in service):
        raise _bad(url, f"{service!r} is not a valid service name")
    identity = options.get("identity")
    if identity is not None and not identity:
        raise _bad(url, "identity= needs the path of an identity file")
    return ZitiAddress(
        service=service, identity=Path(identity).expanduser() if identity else None
    )


def parse_url(url: str) -> Address:
    """Parse and check a transport URL (see the module docstring for the forms).

    Raises :class:`~ralph_uv.errors.UserError` naming the problem and showing good forms.
    """
    if not isinstance(url, str) or not url.strip():
        raise UserError(f"an address is needed; examples: {_EXAMPLES}")
    url = url.strip()
    scheme, sep, _ = url.partition("://")
    if not sep:
        if url.startswith("unix:"):
            raise _bad(url, "write unix:// followed by the absolute path")
        raise _bad(url, "the scheme is missing")
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise _bad(url, f"unknown scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    if any(ch.isspace() for ch in url) and scheme != "unix":
        raise _bad(url, "it contains spaces")
    if "#" in url:
        raise _bad(url, "fragments (#...) are not used")
    try:
        split = urlsplit(url)
        if scheme in ("ssh", "tcp", "tcps"):
            split.port  # noqa: B018 - makes urlsplit check the brackets and the port
    except ValueError as exc:
        netloc = url.partition("://")[2].partition("/")[0].partition("?")[0]
        _port(url, _netloc_port(url, netloc))  # raises with a clearer message if it is the port
        hostport = netloc.rpartition("@")[2]
        if hostport.startswith("["):
            literal = hostport[1:].partition("]")[0]
            raise _bad(url, f"{literal!r} is not a valid IPv6 address") from exc
        raise _bad(url, str(exc)) from exc
    if scheme == "unix":
        return _parse_unix(url, split)
    if scheme == "ssh":
        return _parse_ssh(url, split)
    if scheme in ("tcp", "tcps"):
        return _parse_tcp(url, split, scheme)
    return _parse_ziti(url, split)
