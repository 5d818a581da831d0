"""Hosting one loop: its files, its registry row and its engine.

:class:`LoopHost` is what a runner process (or ``ralph-uv run --foreground``) creates: it opens
the loop's journal and event log under ``<state>/loops/<loop_id>/``, keeps the loop's row in the
registry in step with the engine, and runs the engine to the end.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from ralph_uv.config import Config, Paths, paths
from ralph_uv.journal import LoopJournal
from ralph_uv.registry import Registry, SessionRecord
from ralph_uv.runner.engine import BackendFactory, LoopEngine, LoopOutcome, LoopSpec
from ralph_uv.runner.tmux import TmuxSession, TmuxTarget, session_name, tmux_backends, tmux_socket
from ralph_uv.status import LoopStatus

__all__ = ["LoopHost", "new_loop_id"]

log = logging.getLogger("ralph_uv.runner.host")

OUTPUT_NOTE_INTERVAL = 2.0  # seconds between registry writes of last_output_at


def new_loop_id(task_name: str) -> str:
    """A short, unique, path-safe id: the task's last name part and 6 random hex digits."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", task_name.rsplit("/", 1)[-1]).strip("-")[:24]
    return f"{stem or 'loop'}-{secrets.token_hex(3)}"


def _backend_kind(agent: str, terminal: str = "pty") -> str:
    return "http" if agent == "opencode" else terminal


class LoopHost:
    """One loop's engine with its journal, event log and registry row."""

    def __init__(
        self,
        spec: LoopSpec,
        config: Config,
        *,
        dirs: Paths | None = None,
        registry: Registry | None = None,
        backend_factory: BackendFactory | None = None,
        on_output: Callable[[bytes], None] | None = None,
    ) -> None:
        self.dirs = dirs or paths()
        self._show_output = on_output
        self._output_noted_at = 0.0
        self.loop_dir = self.dirs.loop_dir(spec.loop_id)
        self.loop_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.journal = LoopJournal(self.loop_dir, retention=config.journal_retention)
        self.registry = registry if registry is not None else Registry.open(self.dirs.registry)
        # With backend "tmux", terminal-based agents run in a tmux session a person can attach.
        self.tmux: TmuxSession | None = None
        if spec.backend == "tmux":
            from ralph_uv.agents import get_backend

            self.tmux = TmuxSession(
                TmuxTarget(tmux_socket(), session_name(spec.task_name or spec.task_dir.name)),
                self.loop_dir, fallback=session_name(spec.loop_id),
            )
            backend_factory = tmux_backends(backend_factory or get_backend, self.tmux)
        kwargs = {} if backend_factory is None else {"backend_factory": backend_factory}
        self.engine = LoopEngine(
            spec,
            config,
            self.journal,
            on_status=self._sync_row,
            on_output=self._on_output,
            **kwargs,
        )
        self._last_row: tuple[object, ...] = ()
        self.registry.upsert(
            SessionRecord(
                loop_id=spec.loop_id,
                task_name=spec.task_name or spec.task_dir.name,
                task_dir=str(self.engine.task_dir),
                status=LoopStatus.STARTING,
                agent=spec.agent,
                backend=_backend_kind(spec.agent, spec.backend),
                pid=os.getpid(),
                iteration=0,
                max_iterations=config.max_iterations,
                started_at=time.time(),
                updated_at=time.time(),
                location="local",
                transport="unix",
                socket_path=str(self.dirs.loop_socket(spec.loop_id)),
            )
        )

    async def run(self) -> LoopOutcome:
        """Run the loop to its end; the registry row follows every change."""
        try:
            return await self.engine.run()
        except BaseException as exc:
            # A loop that never started (broken prd.json, dirty tree) leaves a truthful row.
            if self.engine.status == LoopStatus.STARTING:
                reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                self.registry.update(
                    self.engine.spec.loop_id,
                    status=LoopStatus.FAILED.value,
                    reason=reason,
                )
            raise
        finally:
            self.journal.sync()
            if self.tmux is not None:
                await self.tmux.aclose()

    def close(self) -> None:
        if self.tmux is not None:
            self.tmux.close()
        self.journal.close()

    def _on_output(self, data: bytes) -> None:
        # The row says when the agent last printed (for `status` and the dashboard), written at
        # most every OUTPUT_NOTE_INTERVAL seconds so a flood of output costs no database work.
        now = time.time()
        if now - self._output_noted_at >= OUTPUT_NOTE_INTERVAL:
            self._output_noted_at = now
            self.registry.update(self.engine.spec.loop_id, last_output_at=now)
        if self._show_output is not None:
            self._show_output(data)

    def _sync_row(self, engine: LoopEngine) -> None:
        row = (
            engine.status,
            engine.iteration,
            engine.current_story,
            engine.stories_done,
            engine.stories_total,
            engine.agent,
            engine.reason,
            engine.branch,
        )
        if row == self._last_row:
            return
        self._last_row = row
        fields: dict[str, object] = {
            "status": engine.status.value,
            "iteration": engine.iteration,
            "current_story": engine.current_story,
            "stories_done": engine.stories_done,
            "stories_total": engine.stories_total,
            "agent": engine.agent,
            "backend": _backend_kind(engine.agent, engine.spec.backend),
            "reason": engine.reason,
            "branch": engine.branch,
        }
        self.registry.update(engine.spec.loop_id, **fields)


def loop_dir_for(loop_id: str, dirs: Paths | None = None) -> Path:
    """The folder holding a loop's journal, events and logs."""
    return (dirs or paths()).loop_dir(loop_id)
