"""A tiny JSON-RPC service for transport tests: ``hello`` (reports what the transport said about
the connection) and ``echo``, served by the real :class:`~ralph_uv.rpc.Endpoint` on any stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ralph_uv.protocol import Dispatcher
from ralph_uv.rpc import Endpoint
from ralph_uv.transports.base import Stream

HELLO = {"protocol": "1.0", "client": "transport-test"}


@dataclass
class Connection:
    stream: Stream
    hellos: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EchoService:
    """Serves ``hello``/``echo`` and remembers every connection it served."""

    connections: list[Connection] = field(default_factory=list)

    async def serve(self, stream: Stream) -> None:
        connection = Connection(stream)
        self.connections.append(connection)
        await Endpoint(stream, _methods, context=connection).run()


_methods: Dispatcher[Connection] = Dispatcher()


@_methods.method("hello")
async def _hello(connection: Connection, params: Any) -> dict[str, Any]:
    connection.hellos.append(dict(params or {}))
    return {
        "protocol": "1.0",
        "server": "transport-test",
        "authenticated": bool(connection.stream.extra.get("authenticated")),
        "token_seen": "token" in (params or {}),
        "peer": connection.stream.peer,
    }


@_methods.method("echo")
async def _echo(connection: Connection, params: Any) -> Any:
    return params.get("value") if isinstance(params, dict) else params


async def hello_and_echo(stream: Stream, value: Any = "ping") -> tuple[dict[str, Any], Any]:
    """Say hello and echo ``value`` over ``stream`` with a real endpoint; both replies."""
    async with Endpoint(stream) as endpoint:
        hello = await endpoint.call("hello", HELLO, timeout=20)
        echoed = await endpoint.call("echo", {"value": value}, timeout=20)
    return hello, echoed
