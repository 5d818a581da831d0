"""OpenZiti: ralphd binds a service on the overlay, clients dial it; no port is open anywhere.

``ziti://SERVICE?identity=FILE`` (the identity may also come from the options). The ``openziti``
SDK is an optional extra (``pip install 'ralph-uv[ziti]'``), imported only when a ziti URL is
used; without it a :class:`~ralph_uv.errors.UserError` says what to install.

SDK calls used (openziti 1.x):

- ``openziti.load(path)`` — load an identity; returns a ``ZitiContext`` (1.x releases since 1.1
  return ``(ZitiContext, error_code)``; both forms are accepted) and ``openziti.strerror(code)``
  for a non-zero code;
- ``ctx.connect(service)`` — dial a service; a connected, blocking socket;
- ``ctx.bind(service)``, then ``server.listen(backlog)`` and ``server.accept()`` — host a
  service; ``accept`` blocks and returns ``(socket, peer)``; ``server.close()`` stops it.

The blocking calls never run on the event loop: each runs in a daemon thread (a dial that
hangs cannot hold up the loop's shutdown; a socket it returns after the caller gave up is
closed), and every socket the SDK hands back is detached from the SDK's socket object and
adopted by asyncio as a plain non-blocking socket (:func:`adopt_socket`). That glue takes plain
socket objects and callables, so it is tested with real ``socket.socketpair()`` ends; only
:func:`open_ziti` and :func:`start_ziti_listener` touch the SDK.

A listener admits a connection only after its first message, ``hello``, carried the listener's
token (:func:`~ralph_uv.transports.auth.gate`); a dialing client adds the token to its hello.

Tunneler mode (no SDK in ralph-uv): run ralphd with a TCP listener on ``tcp://127.0.0.1:PORT``
(always ``127.0.0.1``, never ``localhost``, which may resolve to ``::1`` where nothing listens)
and host the service with a ziti tunneler using a ``host.v1`` config whose address is
``127.0.0.1`` and port ``PORT``; clients running a tunneler dial the service's intercept
address with ``tcp://INTERCEPT:PORT`` and the token. Loopback TCP needs a token too (see
:mod:`~ralph_uv.transports.tcp`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import socket
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from ralph_uv.errors import RalphError, TransportError, UserError
from ralph_uv.transports.auth import TokenStream, gate, resolve_token
from ralph_uv.transports.base import AsyncioStream, Stream
from ralph_uv.transports.options import ConnectOptions, ListenOptions
from ralph_uv.transports.urls import ZitiAddress

__all__ = [
    "INSTALL_HINT",
    "ZitiListener",
    "adopt_socket",
    "check_identity_file",
    "default_service_name",
    "import_sdk",
    "open_ziti",
    "run_blocking",
    "sdk_error",
    "start_ziti_listener",
]

log = logging.getLogger("ralph_uv.transports.ziti")

INSTALL_HINT = "pip install 'ralph-uv[ziti]'"
T = TypeVar("T")
OnConnect = Callable[[Stream], Awaitable[None]]
_BACKLOG = 16
_ACCEPT_BACKOFF_MAX = 5.0
_CONTEXTS: dict[Path, Any] = {}
_CONTEXTS_LOCK = threading.Lock()


def import_sdk() -> ModuleType:
    """The ``openziti`` module, or a :class:`~ralph_uv.errors.UserError` saying how to get it."""
    try:
        return importlib.import_module("openziti")
    except ImportError as exc:
        raise UserError(
            f"ziti:// addresses need the OpenZiti SDK, which is not installed: {INSTALL_HINT} "
            "(or use a ziti tunneler and a tcp:// address)"
        ) from exc


def default_service_name() -> str:
    """``ralph-control-<short host name>``: the service a ralphd binds by default."""
    return f"ralph-control-{socket.gethostname().split('.')[0]}"


def check_identity_file(path: Path) -> Path:
    """``path`` if it looks like an enrolled OpenZiti identity (JSON with ``ztAPI`` and
    ``id``); otherwise a :class:`~ralph_uv.errors.UserError` naming the problem."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise UserError(f"the OpenZiti identity file {path} does not exist") from exc
    except IsADirectoryError:
        return path  # the SDK also takes a folder of identity files
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not text"
        raise UserError(f"cannot read the OpenZiti identity file {path}: {reason}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{path} is not an OpenZiti identity: it is not JSON (an enrolled "
                        "identity is the JSON file `ziti edge enroll` writes)") from exc
    if not isinstance(data, dict) or "ztAPI" not in data or "id" not in data:
        raise UserError(f"{path} is not an OpenZiti identity: it lacks ztAPI or id (enroll "
                        "the JWT first: `ziti edge enroll --jwt FILE.jwt`)")
    return path


def sdk_error(exc: BaseException, what: str) -> RalphError:
    """The error to raise when an SDK call for ``what`` failed with ``exc``.

    The SDK raises ``OSError``, or a bare ``Exception(code, message)`` for its own errors.
    """
    if isinstance(exc, RalphError):
        return exc
    if isinstance(exc, TimeoutError):
        return TransportError(f"OpenZiti: {what} timed out")
    if isinstance(exc, OSError):
        return TransportError(f"OpenZiti: {what} failed: {exc.strerror or exc}")
    if isinstance(exc, ValueError | TypeError):
        return UserError(f"OpenZiti: {what} failed: {exc}")
    args = [str(arg) for arg in getattr(exc, "args", ()) if not isinstance(arg, int)]
    return TransportError(f"OpenZiti: {what} failed: {'; '.join(args) or type(exc).__name__}")


async def run_blocking(
    call: Callable[[], T],
    *,
    timeout: float | None,  # noqa: ASYNC109
    what: str,
    discard: Callable[[T], None] | None = None,
) -> T:
    """Run the blocking ``call`` in a daemon thread and wait for it at most ``timeout`` s.

    A result that arrives after the wait gave up is passed to ``discard`` (to close a socket).
    Errors become :func:`sdk_error`'s.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    abandoned = threading.Event()

    def deliver(ok: bool, value: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def throw_away(value: T) -> None:
        if discard is not None:
            with contextlib.suppress(Exception):
                discard(value)

    def worker() -> None:
        try:
            result = call()
        except BaseException as exc:  # handed to the waiting coroutine
            with contextlib.suppress(RuntimeError):  # RuntimeError: the loop has closed
                if not abandoned.is_set():
                    loop.call_soon_threadsafe(deliver, False, exc)
            return
        if abandoned.is_set() or loop.is_closed():
            throw_away(result)
            return
        try:
            loop.call_soon_threadsafe(deliver, True, result)
        except RuntimeError:
            throw_away(result)

    threading.Thread(target=worker, name=f"ziti {what}", daemon=True).start()
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.shield(future)
    except TimeoutError as exc:
        abandoned.set()
        if future.done() and not future.cancelled() and future.exception() is None:
            throw_away(future.result())
        raise TransportError(f"OpenZiti: {what} did not finish within {timeout:g} s") from exc
    except asyncio.CancelledError:
        abandoned.set()
        raise
    except Exception as exc:
        raise sdk_error(exc, what) from exc


async def adopt_socket(sock: socket.socket, *, peer: str,
                       extra: dict[str, Any] | None = None) -> AsyncioStream:
    """Hand a connected socket from the SDK (any ``socket.socket``) to asyncio.

    The descriptor is detached from ``sock`` (so the SDK's object can no longer close it) and
    wrapped in a plain non-blocking socket whose family the kernel reports.
    """
    try:
        descriptor = sock.detach()
        plain = socket.socket(fileno=descriptor)
        plain.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=plain)
    except OSError as exc:
        raise TransportError(f"cannot use the connection to {peer}: {exc.strerror or exc}") \
            from exc
    return AsyncioStream(reader, writer, peer=peer, extra=extra or {})


def _close_socket(sock: Any) -> None:
    with contextlib.suppress(Exception):
        sock.close()


async def _load_context(sdk: ModuleType, identity: Path, timeout: float) -> Any:  # noqa: ASYNC109
    """The SDK context of ``identity`` (an absolute path), loaded once per process."""
    with _CONTEXTS_LOCK:
        if identity in _CONTEXTS:
            return _CONTEXTS[identity]

    def load() -> Any:
        loaded = sdk.load(str(identity))
        if isinstance(loaded, tuple):  # 1.1+: (context, error code)
            context, code = loaded
            if code:
                raise UserError(f"OpenZiti could not load the identity {identity}: "
                                f"{sdk.strerror(code)}; check that it is enrolled and that "
                                "its controller is reachable")
            return context
        return loaded

    context = await run_blocking(load, timeout=timeout, what=f"loading identity {identity}")
    with _CONTEXTS_LOCK:
        return _CONTEXTS.setdefault(identity, context)


def _identity(address: ZitiAddress, configured: Path | None) -> Path:
    identity = address.identity or configured
    if identity is None:
        raise UserError(f"{address.url} needs an OpenZiti identity file: add "
                        "?identity=/path/to/identity.json to the address")
    return check_identity_file(identity).absolute()


async def open_ziti(address: ZitiAddress, options: ConnectOptions | None = None) -> Stream:
    """Dial the service ``address.service`` with the identity; the first ``hello`` written on
    the stream carries the configured token."""
    options = options or ConnectOptions()
    if not address.service:
        raise UserError(f"{address.url} names no service: ziti://SERVICE?identity=FILE")
    sdk = import_sdk()
    identity = _identity(address, options.ziti_identity)
    token = resolve_token(options.token, options.token_file)
    context = await _load_context(sdk, identity, options.timeout)
    sock = await run_blocking(lambda: context.connect(address.service), timeout=options.timeout,
                              what=f"dialing service {address.service!r}",
                              discard=_close_socket)
    stream: Stream = await adopt_socket(sock, peer=f"ziti:{address.service}",
                                        extra={"ziti_service": address.service})
    return TokenStream(stream, token) if token else stream


class ZitiListener:
    """Accepts connections from a blocking ``accept()`` callable in a daemon thread, adopts
    each socket, gates it on the token and runs the handler.

    ``accept`` returns ``(socket, peer)`` and raises once ``close_listener`` has been called;
    nothing here depends on the SDK.
    """

    def __init__(self, url: str, accept: Callable[[], tuple[Any, Any]],
                 close_listener: Callable[[], None], on_connect: OnConnect, *, token: str,
                 auth_timeout: float = 10.0, max_connections: int | None = None,
                 peer_prefix: str = "ziti") -> None:
        self.url = url
        self._accept = accept
        self._close_listener = close_listener
        self._on_connect = on_connect
        self._token = token
        self._auth_timeout = auth_timeout
        self._max_connections = max_connections
        self._peer_prefix = peer_prefix
        self._loop = asyncio.get_running_loop()
        self._closing = threading.Event()
        self._thread_done = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._streams: set[Stream] = set()
        self._thread = threading.Thread(target=self._accept_forever, daemon=True,
                                        name=f"accept {url}")

    def start(self) -> None:
        self._thread.start()

    @property
    def connection_count(self) -> int:
        """Admitted connections being served now."""
        return len(self._streams)

    def _post(self, callback: Callable[..., None], *args: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            return False
        return True

    def _accept_forever(self) -> None:
        delay = 0.1
        try:
            while not self._closing.is_set():
                try:
                    sock, peer = self._accept()
                except Exception as exc:
                    if self._closing.is_set():
                        return
                    log.warning("accepting on %s failed: %s; retrying in %g s",
                                self.url, sdk_error(exc, "accept"), delay)
                    self._closing.wait(delay)
                    delay = min(delay * 2, _ACCEPT_BACKOFF_MAX)
                    continue
                delay = 0.1
                if self._closing.is_set() or not self._post(self._adopt, sock, peer):
                    _close_socket(sock)
                    return
        finally:
            self._post(self._thread_done.set)

    def _adopt(self, sock: Any, peer: Any) -> None:
        if self._closing.is_set():
            _close_socket(sock)
            return
        task = self._loop.create_task(self._serve(sock, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: Any, peer: Any) -> None:
        who = peer[0] if isinstance(peer, tuple) and peer and peer[0] else "?"
        try:
            raw = await adopt_socket(sock, peer=f"{self._peer_prefix}:{who}")
        except TransportError as exc:
            log.warning("dropped a connection on %s: %s", self.url, exc.message)
            return
        stream = await gate(raw, self._token, timeout=self._auth_timeout)
        if stream is None:
            return
        if self._max_connections is not None and len(self._streams) >= self._max_connections:
            log.warning("refused %s: %d connections already", raw.peer, len(self._streams))
            stream.abort()
            return
        self._streams.add(stream)
        try:
            await self._on_connect(stream)
        except Exception:
            log.exception("connection handler for %s failed", stream.peer)
            stream.abort()
        finally:
            stream.close()
            self._streams.discard(stream)

    def close(self) -> None:
        """Stop accepting (closes the listening socket); open connections go on."""
        if self._closing.is_set():
            return
        self._closing.set()
        with contextlib.suppress(Exception):
            self._close_listener()

    def close_clients(self) -> None:
        """Abort every open connection."""
        for stream in list(self._streams):
            stream.abort()

    async def wait_closed(self) -> None:
        """Wait until every handler has returned and the accept thread has ended (bounded:
        an SDK accept that ignores the close is left to die with the process)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._thread.is_alive():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._thread_done.wait()


async def start_ziti_listener(address: ZitiAddress, on_connect: OnConnect,
                              options: ListenOptions) -> ZitiListener:
    """Bind the service (default :func:`default_service_name`) and accept connections that
    open with ``hello`` and the token."""
    token = resolve_token(options.token, options.token_file)
    if not token:
        raise UserError(
            f"refusing to listen on {address.url} without a token: anyone the overlay lets "
            "dial the service could drive your loops; configure a token file (mode 0600) for "
            "this listener and give the same token to clients"
        )
    sdk = import_sdk()
    identity = _identity(address, options.ziti_identity)
    service = address.service or default_service_name()
    context = await _load_context(sdk, identity, 60.0)

    def bind() -> Any:
        server = context.bind(service)
        server.listen(_BACKLOG)
        return server

    server = await run_blocking(bind, timeout=60.0, what=f"binding service {service!r}",
                                discard=_close_socket)
    url = ZitiAddress(service, identity).url
    listener = ZitiListener(url, server.accept, server.close, on_connect, token=token,
                            auth_timeout=options.auth_timeout,
                            max_connections=options.max_connections)
    listener.start()
    log.info("listening on OpenZiti service %s", service)
    return listener
