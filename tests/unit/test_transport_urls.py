"""Transport URL parsing: every accepted form gives the right address record (and its canonical
URL back), and every bad one a UserError that names the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.integration.transport_helpers import EchoService, hello_and_echo

from ralph_uv.errors import UserError
from ralph_uv.transports import ConnectOptions, ListenOptions, connect, listen
from ralph_uv.transports.ssh import remote_command
from ralph_uv.transports.urls import (
    SSHAddress,
    TCPAddress,
    UnixAddress,
    ZitiAddress,
    parse_url,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("unix:///tmp/r/ralphd.sock", UnixAddress(Path("/tmp/r/ralphd.sock"))),
        ("unix://", UnixAddress(None)),
        ("unix:///tmp/with%20space.sock", UnixAddress(Path("/tmp/with space.sock"))),
        ("ssh://build-box", SSHAddress("build-box")),
        ("ssh://alice@build-box", SSHAddress("build-box", user="alice")),
        ("ssh://alice@10.0.0.5:2222", SSHAddress("10.0.0.5", user="alice", port=2222)),
        ("ssh://[::1]:22", SSHAddress("::1", port=22)),
        ("ssh://bob@[2001:db8::1]", SSHAddress("2001:db8::1", user="bob")),
        ("SSH://host.example.org/", SSHAddress("host.example.org")),
        ("ssh://my_alias", SSHAddress("my_alias")),
        ("tcp://127.0.0.1:7000", TCPAddress("127.0.0.1", 7000)),
        ("tcp://127.0.0.1:0", TCPAddress("127.0.0.1", 0)),
        ("tcp://lan-box:7000?tls=1", TCPAddress("lan-box", 7000, tls=True)),
        ("tcp://lan-box:7000?tls=no", TCPAddress("lan-box", 7000, tls=False)),
        ("tcps://lan-box:7000", TCPAddress("lan-box", 7000, tls=True)),
        ("tcps://lan-box:7000?tls=yes", TCPAddress("lan-box", 7000, tls=True)),
        ("tcp://[::1]:9000", TCPAddress("::1", 9000)),
        ("ziti://ralph-control-box?identity=/etc/id.json",
         ZitiAddress("ralph-control-box", Path("/etc/id.json"))),
        ("ziti://svc", ZitiAddress("svc")),
        ("ziti://?identity=/id.json", ZitiAddress("", Path("/id.json"))),
        ("ziti://my%20service?identity=/id.json", ZitiAddress("my service", Path("/id.json"))),
    ],
)
def test_good_urls(url: str, expected: object) -> None:
    """Each accepted form parses to the expected record."""
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "unix:///tmp/r/ralphd.sock",
        "unix://",
        "ssh://alice@10.0.0.5:2222",
        "ssh://[::1]:22",
        "tcp://127.0.0.1:7000",
        "tcps://[::1]:9000",
        "ziti://svc?identity=/etc/id.json",
    ],
)
def test_canonical_url_round_trips(url: str) -> None:
    """An address's ``url`` parses back to the same address."""
    address = parse_url(url)
    assert address.url == url
    assert parse_url(address.url) == address


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "an address is needed"),
        ("build-box", "the scheme is missing"),
        ("http://host:80", "unknown scheme 'http'"),
        ("unix:/tmp/x.sock", "write unix:// followed by the absolute path"),
        ("unix://tmp/x.sock", "absolute path after three slashes"),
        ("unix:///x.sock?mode=1", "unknown option 'mode'"),
        ("ssh://", "the host is missing"),
        ("ssh://host/var/run/x.sock", "names a machine, not a path"),
        ("ssh://alice:secret@host", "passwords in URLs are not supported"),
        ("ssh://host:22x", "the port '22x' is not a number"),
        ("ssh://host:70000", "outside 1-65535"),
        ("ssh://host:0", "outside 1-65535"),
        ("ssh://bad host", "contains spaces"),
        ("ssh://ho$t", "not a valid host name"),
        ("ssh://-oProxyCommand=x", "not a valid host name"),
        ("ssh://al ice@host", "contains spaces"),
        ("ssh://host?x=1", "unknown option 'x'"),
        ("ssh://host#frag", "fragments"),
        ("tcp://host", "the port is missing"),
        ("tcp://:7000", "the host is missing"),
        ("tcp://user@host:7000", "no user name"),
        ("tcp://host:7000/path", "has no path"),
        ("tcp://host:7000?tls=maybe", "not a yes/no value"),
        ("tcp://host:7000?tls=1&tls=0", "given twice"),
        ("tcp://host:7000?ca=x", "unknown option 'ca'"),
        ("tcps://host:7000?tls=0", "tcps:// always uses TLS"),
        ("tcp://::1:9000", "brackets"),
        ("tcp://[zz::1]:9000", "not a valid IPv6 address"),
        ("ziti://svc/path", "names a service, not a path"),
        ("ziti://svc?identity=", "needs the path of an identity file"),
        ("ziti://svc?id=x", "unknown option 'id'"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    """Each bad form raises a UserError naming the problem and showing good examples."""
    with pytest.raises(UserError) as caught:
        parse_url(url)
    assert message in caught.value.message
    if url:
        assert "examples: unix://" in caught.value.message


def test_loopback_detection() -> None:
    """127.0.0.0/8, ::1 and localhost are loopback; other addresses and names are not."""
    assert TCPAddress("127.0.0.1", 1).is_loopback
    assert TCPAddress("127.3.2.1", 1).is_loopback
    assert TCPAddress("::1", 1).is_loopback
    assert TCPAddress("localhost", 1).is_loopback
    assert not TCPAddress("0.0.0.0", 1).is_loopback
    assert not TCPAddress("192.168.1.2", 1).is_loopback
    assert not TCPAddress("box.lan", 1).is_loopback


def test_remote_command_quoting() -> None:
    """The remote command line quotes every word but keeps a leading ~/ expandable, and puts
    the prefix first."""
    options = ConnectOptions(remote_ralph="~/my venv/bin/ralph-uv",
                             remote_command_prefix=("env", "A=b c"))
    assert remote_command(options, ("ralph-uv", "bridge", "--print-socket")) == (
        "env 'A=b c' ~/'my venv/bin/ralph-uv' bridge --print-socket"
    )
    assert remote_command(ConnectOptions(), ("ralph-uv", "bridge")) == "ralph-uv bridge"


def test_options_never_show_the_token() -> None:
    """The options' repr hides the token, so it cannot reach a log through them."""
    assert "s3cret-token-value" not in repr(ConnectOptions(token="s3cret-token-value"))
    assert "s3cret-token-value" not in repr(ListenOptions(token="s3cret-token-value"))


async def test_connect_and_listen_reject_bad_urls() -> None:
    """connect and listen raise the parser's UserError, and ssh:// cannot be listened on."""
    with pytest.raises(UserError, match="unknown scheme"):
        await connect("ftp://x:1")
    with pytest.raises(UserError, match="SSH needs no listener"):
        await listen("ssh://host", _never, options=ListenOptions())


async def _never(stream: object) -> None:
    raise AssertionError("no connection expected")


async def test_unix_through_connect_and_listen(ralph_home: Path) -> None:
    """unix:// alone means this machine's ralphd socket for both listen and connect; the
    listener marks its streams authenticated (the peer uid was checked)."""
    service = EchoService()
    listener = await listen("unix://", service.serve, options=ListenOptions())
    try:
        assert listener.url == f"unix://{ralph_home}/run/ralphd.sock"
        hello, echoed = await hello_and_echo(await connect("unix://"), "local")
        assert echoed == "local"
        assert hello["authenticated"] is True
        _, echoed = await hello_and_echo(await connect(listener.url), "by path")
        assert echoed == "by path"
    finally:
        listener.close()
        listener.close_clients()
        await listener.wait_closed()
