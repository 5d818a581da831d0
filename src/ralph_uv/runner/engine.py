"""The loop engine: runs a task's agent iteration after iteration until every story passes or a
limit is hit.

Each iteration reads prd.json, picks the next story, builds the prompt, runs the agent, records
the result (journal events, registry row, progress.txt) and pauses. prd.json is the authority on
completion: ``<promise>COMPLETE</promise>`` in the agent's final answer only makes the engine
read prd.json again, so a marker echoed from the prompt can never end a loop early.

Invariants:
- Every end of the loop goes through :meth:`LoopEngine._finish`, which writes exactly one
  ``loop_finished`` event and one progress.txt summary line, and stops the agent's backend.
- The engine never discards work: it runs no git command that touches the work tree except
  creating/switching to the loop's branch on a clean tree.
- Rate-limit waits do not count as iterations; other failed iterations do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ralph_uv import git
from ralph_uv.agents import get_backend
from ralph_uv.agents.base import (
    AgentBackend,
    AgentResult,
    AgentSession,
    FailureKind,
    IterationRequest,
)
from ralph_uv.agents.failures import backoff_delay
from ralph_uv.config import Config
from ralph_uv.errors import RalphError, UserError
from ralph_uv.journal import LoopJournal
from ralph_uv.prd import Prd, PrdError, load_prd
from ralph_uv.progress import append_summary
from ralph_uv.prompt import PromptContext, build_prompt
from ralph_uv.status import LoopStatus, check_transition

__all__ = ["LoopEngine", "LoopOutcome", "LoopSpec", "StopWhen"]

log = logging.getLogger("ralph_uv.runner.engine")

BackendFactory = Callable[[str, Config], AgentBackend]
# Awaited after every iteration (final=False) and once before the loop ends (final=True).
IterationHook = Callable[["LoopEngine", bool], Awaitable[None]]


class StopWhen(StrEnum):
    NOW = "now"
    AFTER_ITERATION = "after_iteration"


@dataclass(frozen=True, slots=True)
class LoopSpec:
    """What to run: the task, where, and with which agent(s)."""

    loop_id: str
    task_dir: Path
    agent: str
    task_name: str = ""
    model: str | None = None
    base_branch: str | None = None
    first_run_setup: bool = False
    env: dict[str, str] = field(default_factory=dict)
    backend: str = "pty"  # where a terminal-based agent runs: "pty" or "tmux"


@dataclass(frozen=True, slots=True)
class LoopOutcome:
    status: LoopStatus
    reason: str
    iterations: int
    stories_done: int
    stories_total: int
    agent: str
    pull_request: str | None = None


class _Stop(Exception):
    """Raised inside the loop to end it with a status and a reason."""

    def __init__(self, status: LoopStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class LoopEngine:
    """One loop. Create it, then ``await run()``; control it with the ``request_*`` methods from
    the same event loop (the runner's service, a signal handler)."""

    def __init__(
        self,
        spec: LoopSpec,
        config: Config,
        journal: LoopJournal,
        *,
        backend_factory: BackendFactory = get_backend,
        on_status: Callable[[LoopEngine], None] | None = None,
        on_output: Callable[[bytes], None] | None = None,
    ) -> None:
        self.spec = spec
        self.config = config
        self.journal = journal
        self._backend_factory = backend_factory
        self._on_status = on_status
        self._on_output = on_output
        self.task_dir = spec.task_dir.resolve()
        self.prd_file = self.task_dir / "prd.json"
        self.progress_file = self.task_dir / "progress.txt"
        self.repo_root = git.repo_root(self.task_dir)
        self.status = LoopStatus.STARTING
        self.reason = ""
        self.iteration = 0
        self.current_story: str | None = None
        self.stories_done = 0
        self.stories_total = 0
        self.branch = ""
        self.started_at = time.time()
        self._agents = _agent_chain(spec.agent, config.failover)
        self.agent = self._agents[0]
        self._backends: dict[str, AgentBackend] = {}
        self._session: AgentSession | None = None
        self._stop_when: StopWhen | None = None
        self._checkpoint = False
        self._wake = asyncio.Event()
        self._resume = asyncio.Event()
        self._injected: list[str] = []
        self._closing: list[asyncio.Task[None]] = []
        self._cols, self._rows = 120, 40
        self.after_iteration: IterationHook | None = None

    # ------------------------------------------------------------------ control (same loop)

    def request_stop(self, when: StopWhen = StopWhen.AFTER_ITERATION) -> None:
        """Stop now (the agent is terminated) or once the current iteration ends."""
        if self._stop_when != StopWhen.NOW:
            self._stop_when = when
        self._wake.set()
        self._resume.set()
        if when == StopWhen.NOW and self._session is not None:
            asyncio.get_running_loop().create_task(
                self._session.terminate(self.config.terminate_grace)
            )

    def request_checkpoint(self) -> None:
        """Let the current iteration finish, then stop as ``checkpointed``."""
        self._checkpoint = True
        self._wake.set()
        self._resume.set()

    def resume(self) -> None:
        """Leave ``paused``/``stalled`` and go on with the next iteration."""
        self._resume.set()

    def inject_prompt(self, text: str) -> None:
        """Prepend ``text`` once to the next iteration's prompt."""
        if not text.strip():
            raise UserError("the prompt to inject is empty")
        self._injected.append(text)
        self._event("prompt_injected", {"chars": len(text)})

    @property
    def session(self) -> AgentSession | None:
        """The running iteration's agent session (for keystrokes and resizes), if any."""
        return self._session

    def resize(self, cols: int, rows: int) -> None:
        self._cols, self._rows = cols, rows
        if self._session is not None:
            self._session.resize(cols, rows)

    # ------------------------------------------------------------------ the loop

    async def run(self) -> LoopOutcome:
        """Run until the loop ends; return how it ended. Bad input (a broken prd.json, a dirty
        tree on the wrong branch) raises :class:`UserError` before anything is changed."""
        prd = load_prd(self.prd_file)
        prd.next_story()  # dependency cycles and unknown blockers fail here, before any change
        self.stories_done, self.stories_total = prd.counts()
        self.branch = prd.branch_name
        await asyncio.to_thread(
            git.ensure_branch, self.repo_root, prd.branch_name, self.spec.base_branch
        )
        self._set_status(LoopStatus.RUNNING)
        pull_request: str | None = None
        try:
            await self._iterate()
        except _Stop as stop:
            if stop.status == LoopStatus.COMPLETED:
                pull_request = await self._deliver()
            await self._finish(stop.status, stop.reason)
        except asyncio.CancelledError:
            await self._finish(LoopStatus.STOPPED, "the runner was cancelled")
            raise
        except RalphError as exc:
            await self._finish(LoopStatus.FAILED, exc.message)
        except Exception as exc:
            log.exception("loop %s failed", self.spec.loop_id)
            await self._finish(LoopStatus.FAILED, f"internal error: {exc}")
        return LoopOutcome(
            self.status,
            self.reason,
            self.iteration,
            self.stories_done,
            self.stories_total,
            self.agent,
            pull_request,
        )

    async def _iterate(self) -> None:
        failures = 0
        stalls = 0
        rate_limited = 0
        while True:
            self._check_requests()
            prd = self._reload()
            if prd.all_passing:
                raise _Stop(LoopStatus.COMPLETED, "every story passes")
            if self.iteration >= self.config.max_iterations:
                raise _Stop(
                    LoopStatus.EXHAUSTED,
                    f"reached the maximum of {self.config.max_iterations} iterations",
                )
            self._check_runtime()
            story = prd.next_story()
            if story is None:
                waiting = "; ".join(
                    f"{k} waits for {', '.join(v)}" for k, v in prd.waiting().items()
                )
                raise _Stop(LoopStatus.FAILED, f"no story can run: {waiting}")

            self.iteration += 1
            self.current_story = story.id
            self._status_changed()
            before = await asyncio.to_thread(git.progress_snapshot, self.repo_root, [self.prd_file])
            result = await self._run_agent(prd, story.id, story.agent, story.model)
            after_prd = self._reload()
            newly_passed = self._record_passed(prd, after_prd)

            if result.failure == FailureKind.RATE_LIMIT and not self._stopping_now():
                rate_limited += 1
                self.iteration -= 1  # a rate limit does not burn an iteration
                if rate_limited > self.config.rate_limit_max_retries:
                    raise _Stop(
                        LoopStatus.FAILED,
                        f"{self.agent} stayed rate limited after {rate_limited - 1} waits",
                    )
                await self._rate_limit_wait(rate_limited, result)
                continue
            rate_limited = 0

            if self._stopping_now():
                raise _Stop(LoopStatus.STOPPED, "stopped by request")
            if after_prd.all_passing:
                raise _Stop(LoopStatus.COMPLETED, "every story passes")
            if result.completion_claimed:
                done, total = after_prd.counts()
                self._event(
                    "error",
                    {
                        "message": f"the agent claimed completion but {total - done} of {total} "
                        "stories still fail in prd.json; going on"
                    },
                )

            if result.failure is not None:
                failures += 1
                if failures >= self.config.max_consecutive_failures:
                    failures = 0
                    self._failover(result)
            else:
                failures = 0

            # Failed iterations are the failover's business; the circuit breaker counts only
            # iterations where the agent ran fine and still changed nothing.
            after = await asyncio.to_thread(git.progress_snapshot, self.repo_root, [self.prd_file])
            if after != before:
                stalls = 0
            elif result.failure is None:
                stalls += 1
            if stalls >= self.config.stall_iterations:
                stalls = 0
                await self._stall()

            await self._after_iteration(final=False)
            self._check_requests()
            if newly_passed and after_prd.pause_between_stories:
                await self._hold(
                    LoopStatus.PAUSED,
                    f"{', '.join(newly_passed)} passed and pauseBetweenStories is set; "
                    "resume to go on",
                )
            else:
                await self._pause()

    async def _run_agent(
        self, prd: Prd, story_id: str, story_agent: str | None, story_model: str | None
    ) -> AgentResult:
        # A story may name its own agent; the loop's agent (after any failover) runs the rest.
        agent = story_agent if story_agent and story_agent != self.agent else self.agent
        backend = self._ensure_backend(agent)
        context = PromptContext(
            task_dir=self.task_dir,
            prd_file=self.prd_file,
            progress_file=self.progress_file,
            branch_name=prd.branch_name,
            agent=agent,
            iteration=self.iteration,
            story_id=story_id,
            notes=prd.notes,
            repo_root=self.repo_root,
            first_run_setup=self.spec.first_run_setup and self.iteration == 1,
        )
        injected = "\n\n".join(self._injected) if self._injected else None
        prompt = build_prompt(context, injected)
        self._injected.clear()
        request = IterationRequest(
            prompt=prompt,
            cwd=self.repo_root,
            loop_dir=self.journal.loop_dir,
            iteration=self.iteration,
            model=story_model or self.spec.model or self.config.model,
            yolo=self.config.yolo,
            env=self.spec.env,
            cols=self._cols,
            rows=self._rows,
        )
        self._event(
            "iteration_started",
            {"iteration": self.iteration, "story": story_id, "agent": agent},
        )
        started = time.monotonic()
        try:
            self._session = await backend.start(request, self._output)
        except RalphError as exc:
            result = AgentResult(exit_code=None, failure=FailureKind.CRASH, detail=exc.message)
        else:
            if self._stopping_now():  # the stop came while the agent was starting
                await self._session.terminate(self.config.terminate_grace)
            result = await self._wait_session(self._session)
        finally:
            self._session = None
        self._event(
            "iteration_finished",
            {
                "iteration": self.iteration,
                "story": story_id,
                "agent": agent,
                "exit_code": result.exit_code,
                "failure": result.failure.value if result.failure else None,
                "detail": result.detail[-500:],
                "completion_claimed": result.completion_claimed,
                "duration": round(time.monotonic() - started, 3),
                "usage": _usage(result),
            },
        )
        return result

    async def _wait_session(self, session: AgentSession) -> AgentResult:
        timeout = self.config.iteration_timeout
        try:
            return await asyncio.wait_for(asyncio.shield(session.wait()), timeout)
        except TimeoutError:
            self._event(
                "error", {"message": f"iteration timed out after {timeout:g}s; stopping the agent"}
            )
            await session.terminate(self.config.terminate_grace)
            result = await session.wait()
            return AgentResult(
                exit_code=result.exit_code,
                final_text=result.final_text,
                failure=FailureKind.TIMEOUT,
                detail=f"no end of the iteration within {timeout:g}s",
                usage=result.usage,
                output_bytes=result.output_bytes,
            )
        except asyncio.CancelledError:
            await session.terminate(self.config.terminate_grace)
            raise

    def _ensure_backend(self, agent: str) -> AgentBackend:
        backend = self._backends.get(agent)
        if backend is None:
            backend = self._backends[agent] = self._backend_factory(agent, self.config)
        return backend

    def _failover(self, result: AgentResult) -> None:
        index = self._agents.index(self.agent)
        if index + 1 >= len(self._agents):
            raise _Stop(
                LoopStatus.FAILED,
                f"{self.agent} failed {self.config.max_consecutive_failures} times in a row "
                f"({result.failure.value if result.failure else 'failure'}: {result.detail[:200]})"
                + ("; every configured agent has failed" if len(self._agents) > 1 else ""),
            )
        previous, self.agent = self.agent, self._agents[index + 1]
        old_backend = self._backends.pop(previous, None)
        if old_backend is not None:
            self._closing.append(asyncio.get_running_loop().create_task(old_backend.aclose()))
        self._event(
            "agent_failover",
            {"from": previous, "to": self.agent, "reason": result.detail[:500]},
        )
        self._status_changed()

    async def _rate_limit_wait(self, attempt: int, result: AgentResult) -> None:
        delay = backoff_delay(
            attempt,
            self.config.rate_limit_initial_wait,
            self.config.rate_limit_max_wait,
            result.retry_after,
        )
        self._event(
            "rate_limit_wait",
            {
                "agent": self.agent,
                "attempt": attempt,
                "seconds": delay,
                "detail": result.detail[:300],
            },
        )
        self._output(
            f"\r\n[ralph-uv] {self.agent} is rate limited; waiting {delay:.0f}s\r\n".encode()
        )
        await self._sleep(delay)

    async def _stall(self) -> None:
        reason = (
            f"no progress in {self.config.stall_iterations} iterations in a row "
            "(no new commit, no change to prd.json, no changed file); "
            "look at the agent's output, fix the task, then resume or stop the loop"
        )
        self._event("stalled", {"reason": reason, "iteration": self.iteration})
        await self._hold(LoopStatus.STALLED, reason)

    async def _hold(self, status: LoopStatus, reason: str) -> None:
        """Rest in ``paused`` or ``stalled`` until resumed, stopped or checkpointed."""
        self._set_status(status, reason)
        self._resume.clear()
        self._output(f"\r\n[ralph-uv] loop {status.value}: {reason}\r\n".encode())
        await self._resume.wait()
        self._check_requests()
        self._set_status(LoopStatus.RUNNING, "resumed")

    async def _pause(self) -> None:
        if self.config.pause > 0:
            await self._sleep(self.config.pause)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once for a stop or checkpoint request."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._check_requests()

    def _check_requests(self) -> None:
        if self._stop_when is not None:
            raise _Stop(LoopStatus.STOPPED, "stopped by request")
        if self._checkpoint:
            raise _Stop(LoopStatus.CHECKPOINTED, "checkpointed by request")

    def _stopping_now(self) -> bool:
        return self._stop_when == StopWhen.NOW

    def _check_runtime(self) -> None:
        limit = self.config.max_runtime
        if limit is not None and time.time() - self.started_at >= limit:
            raise _Stop(LoopStatus.STOPPED, f"reached the maximum run time of {limit:g}s")

    def _reload(self) -> Prd:
        try:
            prd = load_prd(self.prd_file)
        except PrdError as exc:
            raise _Stop(LoopStatus.FAILED, f"prd.json became invalid: {exc.message}") from exc
        self.stories_done, self.stories_total = prd.counts()
        return prd

    def _record_passed(self, before: Prd, after: Prd) -> list[str]:
        was = {s.id for s in before.stories if s.passes}
        passed = [s for s in after.stories if s.passes and s.id not in was]
        for story in passed:
            self._event("story_passed", {"story": story.id, "title": story.title})
        self._status_changed()
        return [s.id for s in passed]

    async def _deliver(self) -> str | None:
        """On completion: push and open a pull request when prd.json names a merge target."""
        # git push and gh talk to the network: keep them off the event loop.
        url, problem = await asyncio.to_thread(self._deliver_blocking)
        if problem:
            self._event("error", {"message": problem})
        return url

    def _deliver_blocking(self) -> tuple[str | None, str | None]:
        """(pull request URL, problem to report); runs in a worker thread."""
        prd = load_prd(self.prd_file)
        if not prd.merge_target:
            return None, None
        try:
            if not git.has_remote(self.repo_root, "origin"):
                return None, "mergeTarget is set but there is no origin remote to push to"
            git.push(self.repo_root, prd.branch_name)
            if not git.gh_available():
                return None, "pushed the branch; install the GitHub CLI (gh) to open a pull request"
            title = f"{prd.project or self.spec.task_name}: {prd.description or prd.branch_name}"
            url = git.open_pull_request(
                self.repo_root,
                prd.branch_name,
                prd.merge_target,
                title[:200],
                "Opened by ralph-uv after every story in prd.json passed.",
            )
            if prd.auto_merge:
                git.merge_pull_request(self.repo_root, url)
            return url, None
        except RalphError as exc:
            return None, f"delivering the branch failed: {exc.message}"

    async def _after_iteration(self, *, final: bool) -> None:
        if self.after_iteration is None or self.iteration == 0:
            return
        try:
            await self.after_iteration(self, final)
        except Exception as exc:  # a hook's failure is reported, never fatal to the loop
            log.exception("the after-iteration hook failed")
            self._event("error", {"message": f"after iteration {self.iteration}: {exc}"})

    async def _finish(self, status: LoopStatus, reason: str) -> None:
        await self._after_iteration(final=True)
        self._set_status(status, reason)
        self.current_story = None
        backends, self._backends = list(self._backends.values()), {}
        for backend in backends:
            try:
                await backend.aclose()
            except Exception:
                log.exception("stopping the %s backend failed", backend.name)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        try:
            append_summary(
                self.progress_file,
                iteration=self.iteration,
                max_iterations=self.config.max_iterations,
                done=self.stories_done,
                total=self.stories_total,
                agent=self.agent,
                reason=f"{status.value}: {reason}",
                max_lines=self.config.progress_max_lines,
                max_archives=self.config.progress_max_archives,
            )
        except (OSError, RalphError) as exc:
            log.warning("could not write the progress summary: %s", exc)
        self._event(
            "loop_finished",
            {
                "status": status.value,
                "reason": reason,
                "iterations": self.iteration,
                "stories_done": self.stories_done,
                "stories_total": self.stories_total,
            },
        )
        self._status_changed()

    # ------------------------------------------------------------------ recording

    def _output(self, data: bytes) -> None:
        self.journal.append_output(data)
        if self._on_output is not None:
            self._on_output(data)

    def _event(self, type_: str, data: dict[str, Any]) -> None:
        self.journal.append_event(type_, data)

    def _set_status(self, status: LoopStatus, reason: str = "") -> None:
        check_transition(self.status, status)
        if status != self.status:
            self._event(
                "state_change", {"from": self.status.value, "to": status.value, "reason": reason}
            )
        self.status = status
        self.reason = reason
        self._status_changed()

    def _status_changed(self) -> None:
        if self._on_status is not None:
            self._on_status(self)


def _agent_chain(first: str, failover: tuple[str, ...]) -> list[str]:
    chain = [first]
    chain.extend(name for name in failover if name not in chain)
    return chain


def _usage(result: AgentResult) -> dict[str, Any] | None:
    if result.usage is None:
        return None
    return {
        "input_tokens": result.usage.input_tokens,
        "output_tokens": result.usage.output_tokens,
        "cost_usd": result.usage.cost_usd,
    }
