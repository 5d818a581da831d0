"""Imports every command module so that each registers its commands on the group."""

from __future__ import annotations

from ralph_uv.cli import agents as _agents  # noqa: F401
from ralph_uv.cli import bridge as _bridge  # noqa: F401
from ralph_uv.cli import daemon as _daemon  # noqa: F401
from ralph_uv.cli import demo as _demo  # noqa: F401
from ralph_uv.cli import loops as _loops  # noqa: F401
from ralph_uv.cli import remote as _remote  # noqa: F401
from ralph_uv.cli import run as _run  # noqa: F401
from ralph_uv.cli import setup_ssh as _setup_ssh  # noqa: F401
from ralph_uv.cli import tasks as _tasks  # noqa: F401
from ralph_uv.cli import tui as _tui  # noqa: F401
