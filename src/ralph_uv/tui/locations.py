"""Locations: the ralphds whose loops the TUI shows.

A location is this machine's ralphd or a remote's from the registry's ``remotes`` table. Each is
just a daemon connection: :class:`Location` carries the function that makes it, so everything
above works the same on every transport.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from ralph_uv.client.daemon import DaemonClient, connect_daemon
from ralph_uv.client.remotes import remote_opener
from ralph_uv.config import paths
from ralph_uv.errors import RalphError, TransportError, UserError
from ralph_uv.registry import LOCAL, Registry, RemoteRecord
from ralph_uv.transports.base import Stream
from ralph_uv.transports.unix import open_unix

__all__ = [
    "DaemonConnector",
    "Location",
    "LocationInfo",
    "LocationState",
    "default_locations",
    "local_location",
    "remote_location",
    "unix_location",
]

log = logging.getLogger("ralph_uv.tui.locations")

DaemonConnector = Callable[[bool], Awaitable[DaemonClient]]
"""Connects to a location's ralphd; called with ``True`` the first time (a local ralphd may
then be started), ``False`` for every reconnect."""


@dataclass(frozen=True, slots=True)
class Location:
    """A ralphd whose loops the TUI shows. ``local_files``: its task folders are on this
    machine, so prd.json and progress.txt are read (and notes written) directly."""

    name: str
    connect: DaemonConnector
    url: str | None = None
    local_files: bool = True

    @property
    def is_local(self) -> bool:
        return self.name == LOCAL


def local_location(client: str, *, autostart: bool = True) -> Location:
    """This machine's ralphd, started on the first connection when it is not running."""

    async def connect(first: bool) -> DaemonClient:
        return await connect_daemon(autostart=autostart and first, client=client)

    return Location(LOCAL, connect, url=f"unix://{paths().daemon_socket}")


def unix_location(name: str, socket_path: Path, client: str) -> Location:
    """A ralphd listening on ``socket_path`` on this machine (another user's RALPH_HOME, a
    container's socket mounted here): a location like any remote, never started by us."""

    async def opener() -> Stream:
        return await open_unix(socket_path)

    async def connect(first: bool) -> DaemonClient:
        return await DaemonClient.open(opener, client=client)

    return Location(name, connect, url=f"unix://{socket_path}")


def remote_location(remote: RemoteRecord, client: str) -> Location:
    """A remote from the registry, reached with :func:`ralph_uv.transports.connect`. On a
    ``unix://`` URL its task folders are on this machine too (readable here)."""
    if remote.url.startswith("unix://"):
        return unix_location(remote.name, Path(remote.url[len("unix://") :]), client)
    async def connect(first: bool) -> DaemonClient:
        try:
            # The same opener the CLI uses: identity file, token, TLS and tunnel settings.
            return await DaemonClient.open(remote_opener(remote), client=client)
        except UserError as exc:  # a bad URL or options: say so as this location's problem
            raise TransportError(f"remote {remote.name}: {exc.message}") from exc

    return Location(remote.name, connect, url=remote.url, local_files=False)


def default_locations(client: str) -> list[Location]:
    """This machine's ralphd, then every remote in the registry, by name."""
    found = [local_location(client)]
    try:
        if paths().registry.exists():
            with Registry.open() as registry:
                found += [remote_location(r, client) for r in registry.list_remotes()]
    except RalphError as exc:
        log.warning("remotes not listed: %s", exc.message)
    return found


class LocationState(StrEnum):
    CONNECTING = "connecting"
    ONLINE = "online"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class LocationInfo:
    """What the status bar says about one location."""

    name: str
    state: LocationState
    error: str | None
    url: str | None
    loops_active: int
