"""``ralph-uv tui``: one live dashboard for the loops of this machine and of every remote.

The data layer (:mod:`.locations`, :mod:`.source`, :mod:`.feed`, :mod:`.taskdata`) knows
nothing of Textual; :class:`RalphTui` (in :mod:`.app`) is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ralph_uv.tui.feed import FeedState, LoopFeed
from ralph_uv.tui.locations import (
    Location,
    LocationInfo,
    LocationState,
    default_locations,
    local_location,
    remote_location,
    unix_location,
)
from ralph_uv.tui.source import LoopKey, LoopRow, LoopSource

if TYPE_CHECKING:
    from ralph_uv.tui.app import RalphTui

__all__ = [
    "FeedState",
    "Location",
    "LocationInfo",
    "LocationState",
    "LoopFeed",
    "LoopKey",
    "LoopRow",
    "LoopSource",
    "RalphTui",
    "default_locations",
    "local_location",
    "remote_location",
    "unix_location",
]


def __getattr__(name: str) -> Any:
    if name == "RalphTui":
        from ralph_uv.tui.app import RalphTui

        return RalphTui
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
