"""The SSH transport against a real OpenSSH sshd on 127.0.0.1 (tests/fixtures/sshd.py).

The "remote" side is this machine with its own RALPH_HOME; `ralph-uv bridge --print-socket` runs
there through sshd (this checkout's ralph-uv is first on its PATH). Most tests serve a small
JSON-RPC hello/echo service on the remote ralphd socket path; one starts a real ralphd.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.fixtures.sshd import (  # noqa: F401 - fixtures, used by name
    SSHServer,
    ssh_alias_config_fixture,
    ssh_home_fixture,
    sshd_fixture,
    sshd_no_streamlocal_fixture,
)
from tests.helpers import async_wait_until, wait_until
from tests.integration.transport_helpers import EchoService, hello_and_echo

from ralph_uv.client.daemon import DaemonClient
from ralph_uv.errors import TransportError, UserError
from ralph_uv.transports import ConnectOptions, close_connections, connect, ssh_exec
from ralph_uv.transports.ssh import open_remote_unix
from ralph_uv.transports.unix import UnixServer, start_unix_server

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
async def _close_pool() -> AsyncIterator[None]:
    yield
    await close_connections()


@pytest.fixture
async def remote_service(sshd: SSHServer) -> AsyncIterator[EchoService]:
    """The echo service on the remote ralphd socket path of ``sshd``."""
    async with _serve_remote(sshd) as service:
        yield service


class _serve_remote:
    def __init__(self, server: SSHServer) -> None:
        self.server = server
        self.service = EchoService()
        self.unix: UnixServer | None = None

    async def __aenter__(self) -> EchoService:
        self.unix = await start_unix_server(self.server.remote_socket, self.service.serve)
        return self.service

    async def __aexit__(self, *exc: object) -> None:
        assert self.unix is not None
        self.unix.close()
        self.unix.close_clients()
        await asyncio.wait_for(self.unix.wait_closed(), 10)


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def _stop_ralphd(home: Path) -> None:
    subprocess.run([sys.executable, "-m", "ralph_uv.daemon", "stop"], capture_output=True,
                   env={**os.environ, "RALPH_HOME": str(home)}, timeout=60)


def _fingerprint(public_key_file: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(public_key_file)], check=True,
                         capture_output=True, text=True).stdout
    return out.split()[1]


async def test_json_rpc_over_direct_streamlocal(sshd: SSHServer,
                                                remote_service: EchoService) -> None:
    """ssh:// reaches the remote ralphd socket through a direct-streamlocal channel, and a real
    JSON-RPC endpoint talks over it both ways."""
    stream = await connect(sshd.url, options=sshd.options())
    assert stream.extra["ssh_channel"] == "direct-streamlocal"
    assert stream.extra["remote_socket"] == str(sshd.remote_socket)
    hello, echoed = await hello_and_echo(stream, {"value": [1, "two", None]})
    assert hello["server"] == "transport-test"
    assert echoed == {"value": [1, "two", None]}
    assert len(remote_service.connections) >= 1
    assert "refused streamlocal" not in sshd.log()


async def test_real_ralphd_is_started_and_reached(sshd: SSHServer) -> None:
    """With nothing running remotely, connecting starts ralphd there (bridge --print-socket)
    and the daemon client works over the SSH stream as over a local socket."""
    try:
        options = sshd.options()
        daemon = await DaemonClient.open(lambda: connect(sshd.url, options=options))
        try:
            health = await daemon.get_health()
            assert health.pid == daemon.pid
            assert health.loops_active == 0
            assert any(str(sshd.remote_socket) in url for url in health.listeners)
        finally:
            await daemon.close()
    finally:
        await asyncio.to_thread(_stop_ralphd, sshd.remote_home)


async def test_bridge_fallback_when_streamlocal_is_forbidden(
    sshd_no_streamlocal: SSHServer,
) -> None:
    """Where sshd has AllowStreamLocalForwarding no, the stream runs `ralph-uv bridge` over an
    exec channel instead, and the refusal is remembered: the next stream goes straight there."""
    server = sshd_no_streamlocal
    async with _serve_remote(server):
        options = server.options()
        first = await connect(server.url, options=options)
        assert first.extra["ssh_channel"] == "exec-bridge"
        _, echoed = await hello_and_echo(first, "over the bridge")
        assert echoed == "over the bridge"
        second = await connect(server.url, options=options)
        assert second.extra["ssh_channel"] == "exec-bridge"
        _, echoed = await hello_and_echo(second, 42)
        assert echoed == 42
    assert server.log().count("refused streamlocal port forward") == 1


async def test_unknown_host_key_is_refused_with_its_fingerprint(sshd: SSHServer,
                                                                ssh_home: Path) -> None:
    """With no known_hosts entry (the default file, in an empty HOME), the connection is
    refused; the message shows the key's fingerprint and the ssh-keyscan line that trusts it."""
    with pytest.raises(TransportError) as caught:
        await connect(sshd.url, options=sshd.options(known_hosts=None))
    message = caught.value.message
    assert "is not known" in message
    assert _fingerprint(sshd.root / "host_ed25519.pub") in message
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {ssh_home}/.ssh/known_hosts" in message
    assert "Accepted publickey" not in sshd.log()


async def test_changed_host_key_is_refused(sshd: SSHServer, tmp_path: Path) -> None:
    """A known_hosts entry holding another key for the host makes the connection fail with a
    warning that the key changed, the new fingerprint, and how to replace the old key."""
    await asyncio.to_thread(_keygen, tmp_path / "old")
    old_type, old_data = (tmp_path / "old.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {old_type} {old_data}\n")
    with pytest.raises(TransportError) as caught:
        await connect(sshd.url, options=sshd.options(known_hosts=known))
    message = caught.value.message
    assert "CHANGED" in message
    assert _fingerprint(sshd.root / "host_ed25519.pub") in message
    assert f"ssh-keygen -R '[127.0.0.1]:{sshd.port}'" in message


async def test_alias_from_an_ssh_config_file(sshd: SSHServer,
                                             ssh_alias_config: tuple[str, Path],
                                             remote_service: EchoService) -> None:
    """A Host alias from the given ssh config supplies HostName, Port, User, IdentityFile and
    UserKnownHostsFile: ssh://ALIAS works with no other option."""
    alias, config = ssh_alias_config
    options = ConnectOptions(ssh_config=(config,), use_agent=False)
    result = await ssh_exec(f"ssh://{alias}", ["sh", "-c", "echo $RALPH_HOME; id -un"],
                            options=options)
    assert result[0] == 0
    assert result[1].decode().split() == [str(sshd.remote_home), sshd.user]
    stream = await connect(f"ssh://{alias}", options=options)
    _, echoed = await hello_and_echo(stream, "via alias")
    assert echoed == "via alias"


async def test_proxy_jump_from_an_ssh_config_file(sshd: SSHServer,
                                                  sshd_no_streamlocal: SSHServer,
                                                  remote_service: EchoService,
                                                  tmp_path: Path) -> None:
    """ProxyJump in the ssh config is honoured: the target is reached through the jump host
    (each server logs one login)."""
    jump, target = sshd_no_streamlocal, sshd
    known = tmp_path / "known_hosts"
    known.write_text(jump.known_hosts.read_text() + target.known_hosts.read_text())
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host jump\n    HostName 127.0.0.1\n    Port {jump.port}\n    User {jump.user}\n"
        f"    IdentityFile {jump.identity}\n    UserKnownHostsFile {known}\n"
        f"Host target\n    HostName 127.0.0.1\n    Port {target.port}\n    User {target.user}\n"
        f"    IdentityFile {target.identity}\n    UserKnownHostsFile {known}\n"
        "    ProxyJump jump\n"
    )
    stream = await connect("ssh://target", options=ConnectOptions(ssh_config=(config,),
                                                                  use_agent=False))
    _, echoed = await hello_and_echo(stream, "jumped")
    assert echoed == "jumped"
    assert jump.accepted_logins() == 1
    assert target.accepted_logins() == 1


async def test_one_pooled_connection_carries_many_channels(sshd: SSHServer,
                                                           remote_service: EchoService) -> None:
    """Ten streams (five at once) and five commands use a single SSH connection: sshd logs
    one login."""
    options = sshd.options()
    streams = await asyncio.gather(*(connect(sshd.url, options=options) for _ in range(5)))
    replies = await asyncio.gather(*(hello_and_echo(s, i) for i, s in enumerate(streams)))
    assert [echoed for _, echoed in replies] == list(range(5))
    for i in range(5):
        _, echoed = await hello_and_echo(await connect(sshd.url, options=options), i)
        assert echoed == i
        assert (await ssh_exec(sshd.url, ["true"], options=options)).exit_status == 0
    assert sshd.accepted_logins() == 1
    assert len(sshd.session_pids()) == 1


async def test_lost_connection_is_replaced(sshd: SSHServer,
                                           remote_service: EchoService) -> None:
    """When sshd's process for our connection dies, open streams end, the pool drops the dead
    connection and the next connect logs in again and works."""
    options = sshd.options()
    stream = await connect(sshd.url, options=options)
    _, echoed = await hello_and_echo(await connect(sshd.url, options=options), "before")
    assert echoed == "before"
    assert sshd.kill_sessions() >= 1

    async def ended() -> bool:
        try:
            return await asyncio.wait_for(stream.read(), 5) == b""
        except TransportError:
            return True

    await async_wait_until(ended, timeout=10)
    _, echoed = await hello_and_echo(await connect(sshd.url, options=options), "after")
    assert echoed == "after"
    await async_wait_until(lambda: sshd.accepted_logins() == 2, timeout=5)


async def test_exec_reports_status_and_output(sshd: SSHServer) -> None:
    """ssh_exec quotes each word for the remote shell and returns the exit status, stdout and
    stderr of the command, with stdin from ``input``."""
    script = "import sys; d = sys.stdin.read(); print(d.upper()); print('e r r', file=sys.stderr);"\
             " sys.exit(3)"
    status, out, err = await ssh_exec(sshd.url, ["python3", "-c", script], input=b"it's $HOME",
                                      options=sshd.options())
    assert (status, out, err) == (3, b"IT'S $HOME\n", b"e r r\n")


async def test_unauthorized_key_names_the_keys_tried(sshd: SSHServer, tmp_path: Path) -> None:
    """A key the server does not accept fails with a message naming the user and key file."""
    stranger = tmp_path / "stranger"
    await asyncio.to_thread(_keygen, stranger)
    with pytest.raises(TransportError) as caught:
        await connect(sshd.url, options=sshd.options(identity_file=stranger))
    assert f"refused the login of user {sshd.user!r}" in caught.value.message
    assert str(stranger) in caught.value.message


def _start_agent(folder: Path, key: Path) -> tuple[subprocess.Popen[bytes], str]:
    sock = str(folder / "agent.sock")
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    env = {**os.environ, "SSH_AUTH_SOCK": sock}
    try:  # ssh-add fails until the agent has created its socket
        wait_until(lambda: subprocess.run(["ssh-add", str(key)], env=env,
                                          capture_output=True).returncode == 0)
    except AssertionError:
        agent.kill()
        raise
    return agent, sock


async def test_keys_from_the_ssh_agent(sshd: SSHServer, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With no identity file, the keys of a real ssh-agent (SSH_AUTH_SOCK) log in; without
    the agent the login is refused and the message says there is no agent."""
    agent, sock = await asyncio.to_thread(_start_agent, tmp_path, sshd.identity)
    try:
        monkeypatch.setenv("SSH_AUTH_SOCK", sock)
        options = sshd.options(identity_file=None, use_agent=True)
        status, out, _ = await ssh_exec(sshd.url, ["echo", "agent"], options=options)
        assert (status, out) == (0, b"agent\n")
        await close_connections()
        monkeypatch.delenv("SSH_AUTH_SOCK")
        with pytest.raises(TransportError, match="no SSH agent"):
            await ssh_exec(sshd.url, ["true"], options=options)
    finally:
        agent.kill()
        agent.wait()


async def test_nothing_listening_is_a_clear_error(sshd: SSHServer) -> None:
    """A port where no sshd listens gives 'connection refused' advice, not an OSError."""
    sshd.stop()
    with pytest.raises(TransportError, match="connection refused"):
        await connect(sshd.url, options=sshd.options(timeout=5))


async def test_missing_remote_ralph_uv_says_how_to_fix(sshd: SSHServer) -> None:
    """When the remote command is not found, the error says so and names the option that
    points at it."""
    with pytest.raises(TransportError, match="remote_ralph") as caught:
        await connect(sshd.url, options=sshd.options(remote_ralph="/nonexistent/ralph-uv"))
    assert "was not found" in caught.value.message


async def test_remote_command_path_option_is_used(sshd: SSHServer,
                                                  remote_service: EchoService) -> None:
    """remote_ralph and remote_command_prefix shape the remote command: with a PATH that lacks
    ralph-uv nothing is found; a ~/ path to it (expanded by the remote shell) works."""
    prefix = ("env", "PATH=/usr/bin:/bin")
    with pytest.raises(TransportError, match="was not found"):
        await connect(sshd.url, options=sshd.options(remote_command_prefix=prefix))
    await close_connections()
    (sshd.remote_home / "venv bin").symlink_to(Path(sys.executable).parent)
    options = sshd.options(remote_ralph="~/venv bin/ralph-uv", remote_command_prefix=prefix)
    stream = await connect(sshd.url, options=options)
    _, echoed = await hello_and_echo(stream, "prefixed")
    assert echoed == "prefixed"


async def test_open_remote_unix_reaches_any_socket(sshd: SSHServer, tmp_path: Path) -> None:
    """open_remote_unix opens a channel to a given remote socket; a missing one is a
    TransportError naming the path."""
    service = EchoService()
    path = Path(f"/tmp/rs-{os.getpid()}.sock")
    server = await start_unix_server(path, service.serve)
    try:
        stream = await open_remote_unix(sshd.url, str(path), sshd.options())
        _, echoed = await hello_and_echo(stream, "direct")
        assert echoed == "direct"
    finally:
        server.close()
        server.close_clients()
        await server.wait_closed()
    with pytest.raises(TransportError, match=str(path)):
        await open_remote_unix(sshd.url, str(path), sshd.options())


async def test_ssh_url_cannot_be_a_path() -> None:
    """A bad ssh URL is a UserError before any connection is tried."""
    with pytest.raises(UserError, match="names a machine"):
        await connect("ssh://host/some/socket")
