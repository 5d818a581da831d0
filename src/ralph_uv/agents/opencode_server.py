"""One ``opencode serve`` process: started on loopback, reached with a password, stopped whole.

The server runs in the loop's working directory, in a process group of its own (its shells and
language servers go with it when it is stopped), with ``--hostname 127.0.0.1 --port 0``. With
port 0 opencode tries 4096 and falls back to a port the OS assigns; either way it prints
``opencode server listening on http://HOST:PORT``. That line is read from the server's log
(stdout and stderr are appended to ``<loop_dir>/opencode-server.log``), so no port is guessed and
none can be taken by another program between choosing and binding. The server is ready when
``GET /global/health`` answers. The password reaches it only through
``OPENCODE_SERVER_PASSWORD`` in its environment — never its command line, never a log — and
every request carries it as HTTP basic auth (user ``opencode``).

Stopping sends TERM to the group, then KILL after a grace period; on Linux the server also gets
TERM when the process that started it dies, so a killed runner leaves no server behind.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from ralph_uv.errors import ErrorCode, RalphError

__all__ = ["SERVER_LOG", "USERNAME", "OpenCodeServer", "OpenCodeServerError", "basic_auth"]

log = logging.getLogger("ralph_uv.agents.opencode")

SERVER_LOG = "opencode-server.log"
USERNAME = "opencode"

_LISTENING = re.compile(rb"opencode server listening on (http://\S+)")
_REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)


def basic_auth(password: str, username: str = USERNAME) -> str:
    """The ``Authorization`` header value for the server's basic auth."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


class OpenCodeServerError(RalphError):
    """``opencode serve`` could not be started or reached; the message says where its log is."""


_PR_SET_PDEATHSIG = 1
_prctl: Any = None
if sys.platform == "linux":
    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:  # runs in the child between fork and exec: keep it tiny
    # If the runner is killed outright, its server gets TERM instead of living on unwatched.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _read_from(path: Path, offset: int, limit: int = 64 * 1024) -> bytes:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read(limit)
    except OSError:
        return b""


def _tail(path: Path, limit: int = 600) -> str:
    try:
        start = max(0, path.stat().st_size - limit)
    except OSError:
        return ""
    text = _read_from(path, start, limit).decode("utf-8", "replace").strip()
    return f"; it ends with:\n{text}" if text else ""


class OpenCodeServer:
    """A ``opencode serve`` process. ``program`` is the command that takes ``serve …``."""

    def __init__(
        self,
        program: Sequence[str],
        *,
        cwd: Path,
        loop_dir: Path,
        password: str,
        env: Mapping[str, str],
        startup_timeout: float = 60.0,
    ) -> None:
        self.argv = [*program, "serve", "--hostname", "127.0.0.1", "--port", "0"]
        self.cwd = cwd.resolve()
        self.log_path = loop_dir / SERVER_LOG
        self.startup_timeout = startup_timeout
        self._password = password
        self._env = {
            **env,
            "OPENCODE_SERVER_PASSWORD": password,
            "OPENCODE_SERVER_USERNAME": USERNAME,
        }
        self.url = ""
        self.pid: int | None = None  # also its process group id; kept after it stopped
        self._proc: asyncio.subprocess.Process | None = None
        self._http: aiohttp.ClientSession | None = None
        self.exited: asyncio.Future[int] | None = None

    @property
    def running(self) -> bool:
        return bool(self.url) and self._proc is not None and self._proc.returncode is None

    @property
    def returncode(self) -> int | None:
        if self._proc is not None:
            return self._proc.returncode
        if self.exited is not None and self.exited.done() and not self.exited.cancelled():
            return self.exited.result()
        return None

    def describe_exit(self) -> str:
        return (
            f"opencode serve exited with status {self.returncode}; "
            f"its output is in {self.log_path}"
        )

    async def start(self) -> None:
        """Spawn the server and wait until it answers; stop it again if that fails."""
        offset = await asyncio.to_thread(self._open_log)
        try:
            with self.log_path.open("ab") as log_file:
                self._proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    cwd=self.cwd,
                    env={**os.environ, **self._env},
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    start_new_session=True,
                    preexec_fn=_die_with_parent if _prctl is not None else None,
                )
        except OSError as exc:
            raise OpenCodeServerError(
                f"cannot start {self.argv[0]} serve in {self.cwd}: {exc.strerror or exc}"
            ) from exc
        self.pid = self._proc.pid
        log.info("started opencode serve (pid %d) in %s; log %s", self.pid, self.cwd, self.log_path)
        self.exited = asyncio.ensure_future(self._proc.wait())
        try:
            await self._await_ready(offset)
        except BaseException:
            await self.stop(grace=1.0)
            raise
        log.info("opencode serve is ready at %s", self.url)

    def _open_log(self) -> int:
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("ab") as log_file:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                header = f"--- {stamp} ralph-uv starts opencode serve in {self.cwd}\n"
                log_file.write(header.encode())
                return log_file.tell()
        except OSError as exc:
            raise OpenCodeServerError(
                f"cannot write the opencode server log {self.log_path}: {exc.strerror or exc}"
            ) from exc

    async def _await_ready(self, offset: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        url = ""
        while not url:
            found = _LISTENING.search(await asyncio.to_thread(_read_from, self.log_path, offset))
            if found is not None:
                url = found.group(1).decode().rstrip("/")
            else:
                self._check_alive(deadline)
                await asyncio.sleep(0.05)
        self._http = aiohttp.ClientSession(
            headers={"Authorization": basic_auth(self._password)}, timeout=_REQUEST_TIMEOUT
        )
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with self._http.get(
                    f"{url}/global/health", timeout=aiohttp.ClientTimeout(total=5)
                ) as resp:
                    if resp.status == 200 and (await resp.json()).get("healthy"):
                        break
            self._check_alive(deadline)
            await asyncio.sleep(0.1)
        self.url = url

    def _check_alive(self, deadline: float) -> None:
        if self.returncode is not None:
            raise OpenCodeServerError(
                f"opencode serve exited with status {self.returncode} before it was ready; "
                f"its output is in {self.log_path}{_tail(self.log_path)}"
            )
        if time.monotonic() > deadline:
            raise OpenCodeServerError(
                f"opencode serve did not become ready within {self.startup_timeout:g}s "
                f"(GET /global/health did not answer); its output is in {self.log_path}"
                f"{_tail(self.log_path)}",
                code=ErrorCode.TIMEOUT,
            )

    async def stop(self, grace: float = 5.0) -> None:
        """TERM the process group, KILL it after ``grace`` seconds; idempotent."""
        proc, self._proc, self.url = self._proc, None, ""
        http, self._http = self._http, None
        try:
            if proc is not None and proc.returncode is None:
                _signal_group(proc.pid, signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(proc.wait()), grace)
        finally:
            if proc is not None:
                # The group may still hold shells the agent started, even once the server is gone.
                _signal_group(proc.pid, signal.SIGKILL)
                if proc.returncode is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(proc.wait()), 5.0)
                log.info("opencode serve (pid %d) stopped (status %s)", proc.pid, proc.returncode)
            if http is not None:
                await http.close()

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: object = None,
        limit: float | None = None,
    ) -> Any:
        """One API call; its JSON answer (None when empty). Failures become OpenCodeServerError."""
        if self._http is None:
            raise OpenCodeServerError("opencode serve is not running")
        timeout = aiohttp.ClientTimeout(total=limit) if limit else _REQUEST_TIMEOUT
        try:
            async with self._http.request(
                method, self.url + path, params=params, json=body, timeout=timeout
            ) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise OpenCodeServerError(
                        f"opencode serve refused {method} {path} with HTTP {resp.status}: "
                        f"{text[:300]}"
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise OpenCodeServerError(
                f"cannot reach opencode serve for {method} {path}: {exc or type(exc).__name__}"
            ) from exc
        try:
            return json.loads(text) if text.strip() else None
        except ValueError as exc:
            raise OpenCodeServerError(
                f"opencode serve answered {method} {path} with something that is not JSON"
            ) from exc

    @contextlib.asynccontextmanager
    async def stream(
        self, path: str, params: Mapping[str, str]
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """``GET path`` as a long-lived response (for ``/event``)."""
        if self._http is None:
            raise OpenCodeServerError("opencode serve is not running")
        # opencode sends a heartbeat every few seconds; a silent minute means the stream is dead.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
        async with self._http.get(self.url + path, params=params, timeout=timeout) as resp:
            if resp.status != 200:
                raise OpenCodeServerError(
                    f"opencode serve refused GET {path} with HTTP {resp.status}"
                )
            yield resp
