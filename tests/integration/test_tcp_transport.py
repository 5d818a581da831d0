"""The TCP/TLS transport on real loopback sockets: the token gate, TLS with certificates made
here with ``cryptography`` (a CA, a server certificate for 127.0.0.1, a client certificate),
mutual TLS, and the listener's refusal of unsafe settings."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tests.integration.transport_helpers import HELLO, EchoService, hello_and_echo

from ralph_uv.errors import ErrorCode, RemoteError, TransportError, UserError
from ralph_uv.rpc import Endpoint
from ralph_uv.transports import (
    ConnectOptions,
    Listener,
    ListenOptions,
    connect,
    generate_token,
    listen,
)
from ralph_uv.transports.auth import write_token_file

TOKEN = generate_token()


@dataclass(frozen=True)
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
          ip: str | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False), critical=True)
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False)
    if ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _make_pki(folder: Path) -> PKI:
    def ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        return _cert(name, key, subject, key, ca=True), key

    ca_cert, ca_key = ca("ralph test CA")
    other_cert, _ = ca("someone else's CA")
    files: dict[str, Path] = {}
    for name, data in (("ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM)),
                       ("other-ca.pem", other_cert.public_bytes(serialization.Encoding.PEM))):
        files[name] = folder / name
        files[name].write_bytes(data)
    for role, ip in (("server", "127.0.0.1"), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"ralph {role}", key, ca_cert.subject, ca_key, ip=ip)
        files[f"{role}.pem"] = folder / f"{role}.pem"
        files[f"{role}.pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{role}.key"] = folder / f"{role}.key"
        files[f"{role}.key"].write_bytes(_key_pem(key))
    return PKI(files["ca.pem"], files["server.pem"], files["server.key"], files["client.pem"],
               files["client.key"], files["other-ca.pem"])


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return _make_pki(tmp_path)


class _Served:
    """A listener and its echo service, closed at the end."""

    def __init__(self, url: str, options: ListenOptions) -> None:
        self.url, self.options = url, options
        self.service = EchoService()
        self.listener: Listener | None = None

    async def __aenter__(self) -> _Served:
        self.listener = await listen(self.url, self.service.serve, options=self.options)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.listener is not None
        self.listener.close()
        self.listener.close_clients()
        await asyncio.wait_for(self.listener.wait_closed(), 10)

    @property
    def bound(self) -> str:
        assert self.listener is not None
        return self.listener.url


@pytest.fixture
async def plain() -> AsyncIterator[_Served]:
    async with _Served("tcp://127.0.0.1:0", ListenOptions(token=TOKEN)) as served:
        yield served


async def _raw_exchange(url_port: int, payload: bytes) -> list[dict[str, object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", url_port)
    writer.write(payload)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)  # until the server closes
    writer.close()
    return [json.loads(line) for line in data.splitlines() if line.strip()]


async def test_loopback_with_token(plain: _Served) -> None:
    """On loopback, a client with the token is admitted: the server's hello handler sees the
    hello (replayed after the check), the token the client stream added, and the authenticated
    flag."""
    stream = await connect(plain.bound, options=ConnectOptions(token=TOKEN))
    hello, echoed = await hello_and_echo(stream, {"nested": [1, 2]})
    assert echoed == {"nested": [1, 2]}
    assert hello["authenticated"] is True
    assert hello["token_seen"] is True
    assert plain.service.connections[0].hellos == [{**HELLO, "token": TOKEN}]


async def test_wrong_or_missing_token_is_refused(plain: _Served) -> None:
    """A wrong token, or none, gets error -32010 in reply to hello and the handler never sees
    the connection."""
    for options, reason in ((ConnectOptions(token=generate_token()), "wrong token"),
                            (ConnectOptions(), "no token")):
        stream = await connect(plain.bound, options=options)
        async with Endpoint(stream) as endpoint:
            with pytest.raises(RemoteError) as caught:
                await endpoint.call("hello", HELLO, timeout=10)
        assert caught.value.code == ErrorCode.UNAUTHORIZED
        assert reason in caught.value.message
    assert plain.service.connections == []


async def test_first_message_must_be_hello(plain: _Served) -> None:
    """A connection that starts with anything but hello (another method, garbage) is answered
    with -32010 and closed."""
    port = int(plain.bound.rsplit(":", 1)[1])
    echo_first = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "echo",
                             "params": {"value": 1, "token": TOKEN}}).encode() + b"\n"
    [reply] = await _raw_exchange(port, echo_first)
    assert reply["id"] == 7
    assert reply["error"]["code"] == -32010  # type: ignore[index]
    assert "must be a hello" in reply["error"]["message"]  # type: ignore[index]
    [reply] = await _raw_exchange(port, b"GET / HTTP/1.0\r\n\r\n")
    assert reply["error"]["code"] == -32010  # type: ignore[index]
    assert plain.service.connections == []


async def test_silent_connection_is_dropped() -> None:
    """A connection that says nothing within auth_timeout is refused and closed."""
    async with _Served("tcp://127.0.0.1:0",
                       ListenOptions(token=TOKEN, auth_timeout=0.3)) as served:
        port = int(served.bound.rsplit(":", 1)[1])
        [reply] = await _raw_exchange(port, b"")
        assert "no hello" in reply["error"]["message"]  # type: ignore[index]


async def test_tls_end_to_end(pki: PKI) -> None:
    """tcps:// with a server certificate signed by a CA the client trusts carries JSON-RPC; a
    client that does not trust that CA refuses the server."""
    options = ListenOptions(token=TOKEN, tls_cert=pki.server_cert, tls_key=pki.server_key)
    async with _Served("tcps://127.0.0.1:0", options) as served:
        assert served.bound.startswith("tcps://")
        stream = await connect(served.bound, options=ConnectOptions(token=TOKEN, tls_ca=pki.ca))
        assert stream.extra["tls"] is True
        hello, echoed = await hello_and_echo(stream, "secret")
        assert echoed == "secret"
        assert hello["authenticated"] is True
        with pytest.raises(TransportError, match="not trusted"):
            await connect(served.bound, options=ConnectOptions(token=TOKEN, tls_ca=pki.other_ca))
        same = served.bound.replace("tcps://", "tcp://") + "?tls=1"
        _, echoed = await hello_and_echo(
            await connect(same, options=ConnectOptions(token=TOKEN, tls_ca=pki.ca)), 1)
        assert echoed == 1


async def test_mutual_tls(pki: PKI) -> None:
    """With a client CA configured, a client presenting a certificate it signed is admitted
    (the server sees the certificate); one without a certificate never reaches the handler."""
    options = ListenOptions(token=TOKEN, tls_cert=pki.server_cert, tls_key=pki.server_key,
                            tls_client_ca=pki.ca)
    async with _Served("tcps://127.0.0.1:0", options) as served:
        good = ConnectOptions(token=TOKEN, tls_ca=pki.ca, tls_cert=pki.client_cert,
                              tls_key=pki.client_key)
        _, echoed = await hello_and_echo(await connect(served.bound, options=good), "mtls")
        assert echoed == "mtls"
        subject = served.service.connections[0].stream.extra["tls_peer_cert"]["subject"]
        assert (("commonName", "ralph client"),) in subject
        no_cert = ConnectOptions(token=TOKEN, tls_ca=pki.ca)
        with pytest.raises(TransportError):
            await hello_and_echo(await connect(served.bound, options=no_cert), "no cert")
        assert len(served.service.connections) == 1


async def test_unsafe_listeners_are_refused(pki: PKI) -> None:
    """A non-loopback listener needs TLS and a token, a loopback one a token: each refusal
    says what to configure; TLS needs its certificate files."""
    with pytest.raises(UserError, match="without TLS"):
        await listen("tcp://0.0.0.0:0", EchoService().serve, options=ListenOptions(token=TOKEN))
    with pytest.raises(UserError, match="without a token"):
        await listen("tcps://0.0.0.0:0", EchoService().serve,
                     options=ListenOptions(tls_cert=pki.server_cert, tls_key=pki.server_key))
    with pytest.raises(UserError, match="without a token"):
        await listen("tcp://127.0.0.1:0", EchoService().serve, options=ListenOptions())
    with pytest.raises(UserError, match="certificate and key"):
        await listen("tcps://127.0.0.1:0", EchoService().serve,
                     options=ListenOptions(token=TOKEN))
    with pytest.raises(UserError, match="does not exist"):
        await listen("tcps://127.0.0.1:0", EchoService().serve,
                     options=ListenOptions(token=TOKEN, tls_cert=pki.ca.with_name("nope.pem"),
                                           tls_key=pki.server_key))


async def test_token_file_and_no_token_in_logs(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A listener reads its token from a 0600 file; refusals are logged without the token."""
    caplog.set_level(logging.DEBUG)
    token_file = tmp_path / "token"
    token = write_token_file(token_file)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    async with _Served("tcp://127.0.0.1:0", ListenOptions(token_file=token_file)) as served:
        _, echoed = await hello_and_echo(
            await connect(served.bound, options=ConnectOptions(token_file=token_file)), 5)
        assert echoed == 5
        wrong = generate_token()
        stream = await connect(served.bound, options=ConnectOptions(token=wrong))
        async with Endpoint(stream) as endpoint:
            with pytest.raises(RemoteError):
                await endpoint.call("hello", HELLO, timeout=10)
    assert "wrong token" in caplog.text
    assert token not in caplog.text
    assert wrong not in caplog.text


async def test_connection_refused_is_a_transport_error() -> None:
    """Nothing listening on the port is a TransportError that says so."""
    async with _Served("tcp://127.0.0.1:0", ListenOptions(token=TOKEN)) as served:
        url = served.bound
    with pytest.raises(TransportError, match="connection refused"):
        await connect(url, options=ConnectOptions(token=TOKEN))
