"""ralphd, the per-machine daemon (DESIGN §2): starts, adopts and watches loops' runners,
relays clients to them, and keeps a numbered log of daemon events.

The pieces: :mod:`~ralph_uv.daemon.server` (the control socket and its methods),
:mod:`~ralph_uv.daemon.supervisor` (runners), :mod:`~ralph_uv.daemon.events` (the event log),
:mod:`~ralph_uv.daemon.relay` and :mod:`~ralph_uv.daemon.archive` (``connect_loop``),
:mod:`~ralph_uv.daemon.lifecycle` (pid file, background start, stop),
:mod:`~ralph_uv.daemon.config` (daemon.toml), :mod:`~ralph_uv.daemon.check` and
:mod:`~ralph_uv.daemon.service_unit` (``ralphd check`` and ``install-service``).
"""

from __future__ import annotations

from ralph_uv.daemon.config import DaemonConfig, load_daemon_config
from ralph_uv.daemon.lifecycle import run_daemon, running_pid, start_background, stop_daemon

__all__ = [
    "DaemonConfig",
    "load_daemon_config",
    "run_daemon",
    "running_pid",
    "start_background",
    "stop_daemon",
]
