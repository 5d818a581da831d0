"""Claude Code backends (DESIGN §7).

Two ways to run one iteration of the real ``claude`` CLI:

- :class:`ClaudeInteractiveBackend` (``claude``) runs the interactive TUI in a PTY, which is what
  a person who attaches expects to see and type into. The prompt is the positional argument (or,
  when it is large, a file the agent is asked to read). The end of the turn is reported by a
  ``Stop`` hook passed with ``--settings`` (a file in the loop's folder; the user's own settings
  are never edited): the hook saves its input, which names the session transcript and carries
  the final answer. The backend then asks Claude Code to ``/exit``. First-run dialogs (trusting
  the folder, using the API key from the environment, bypass-permissions mode) are answered, and
  a line saying so is added to the output; a login prompt ends the iteration as an ``AUTH``
  failure.
- :class:`ClaudePrintBackend` (``claude-print``) runs ``claude --print --output-format
  stream-json`` with the prompt on stdin and renders the event stream into a readable transcript
  (:mod:`ralph_uv.agents.transcript`).

Both remove ``CLAUDECODE`` from the environment (it makes Claude Code refuse to start inside
another session), turn off Claude Code's non-essential traffic (update checks, telemetry), and
set ``IS_SANDBOX=1`` when running as root with ``--dangerously-skip-permissions``, which Claude
Code otherwise refuses.

:func:`prepare_offline_claude_config` (from :mod:`ralph_uv.agents.claude_config`) writes a config
folder for ``CLAUDE_CONFIG_DIR`` in which the TUI starts without any dialog; the demo and the
tests use it, never the user's own config.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import shlex
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyte

from ralph_uv.agents.base import (
    AgentBackend,
    AgentResult,
    AgentSession,
    FailureKind,
    IterationRequest,
    OutputSink,
    Usage,
)
from ralph_uv.agents.claude_config import prepare_offline_claude_config
from ralph_uv.agents.detect import KNOWN_AGENTS, find_binary
from ralph_uv.agents.failures import classify, parse_retry_after
from ralph_uv.agents.transcript import TranscriptRenderer, read_session_transcript
from ralph_uv.errors import AgentNotFoundError, UserError
from ralph_uv.runner.terminal import AgentTerminal, TerminalSpawner, spawn_pty

__all__ = [
    "PROMPT_ARG_LIMIT",
    "ClaudeInteractiveBackend",
    "ClaudePrintBackend",
    "claude_env",
    "prepare_offline_claude_config",
]

log = logging.getLogger("ralph_uv.agents.claude")

PROMPT_ARG_LIMIT = 100_000  # bytes; larger prompts go through a file (argv is capped at 128 KiB)
_TAIL = 16 * 1024  # output kept for failure classification
_POLL = 0.1  # seconds between looks at the hook file and the screen
_AUTH_HINT = (
    "log in with `claude /login`, or set ANTHROPIC_API_KEY in ralph-uv's env file"
)
_QUIET_ENV = {
    # Update checks, telemetry and error reports: an unattended loop must not depend on them.
    "DISABLE_AUTOUPDATER": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "CLAUDE_CODE_DISABLE_FEEDBACK_SURVEY": "1",
    "CLAUDE_CODE_IDE_SKIP_AUTO_INSTALL": "1",
}
_API_STATUS_KINDS = {401: FailureKind.AUTH, 403: FailureKind.AUTH,
                     429: FailureKind.RATE_LIMIT, 529: FailureKind.RATE_LIMIT}
_HOOK_ERROR_KINDS = {  # the ``error`` field of Claude Code's StopFailure hook input
    "rate_limit": FailureKind.RATE_LIMIT,
    "overloaded": FailureKind.RATE_LIMIT,
    "authentication_failed": FailureKind.AUTH,
    "billing_error": FailureKind.AUTH,
    "connection_error": FailureKind.NETWORK,
}


def claude_env(request: IterationRequest, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment ``claude`` runs in: ``base`` (default ``os.environ``) plus the request's
    variables, without ``CLAUDECODE``, with non-essential traffic off."""
    env = dict(os.environ if base is None else base)
    env.update(request.env)
    env.pop("CLAUDECODE", None)
    for name, value in _QUIET_ENV.items():
        env.setdefault(name, value)
    if request.yolo and os.geteuid() == 0 and env.get("IS_SANDBOX") != "1":
        log.info("running as root with --dangerously-skip-permissions: setting IS_SANDBOX=1, "
                 "without which Claude Code refuses that flag for root")
        env["IS_SANDBOX"] = "1"
    return env


def _claude_binary(binary: Path | None, cwd: Path) -> Path:
    if binary is not None:
        return binary
    found = find_binary("claude", cwd=cwd)
    if found is None:
        raise AgentNotFoundError(
            f"Claude Code (claude) is not installed; install it with: "
            f"{KNOWN_AGENTS['claude'].install_hint}"
        )
    return found


def _common_args(request: IterationRequest) -> list[str]:
    args = ["--model", request.model] if request.model else []
    if request.yolo:
        args.append("--dangerously-skip-permissions")
    return args


def _classify(
    exit_code: int | None,
    *,
    failed: bool,
    api_status: int | None = None,
    error_text: str = "",
    output_tail: str = "",
    stderr_tail: str = "",
    said_anything: bool = True,
) -> tuple[FailureKind | None, str, float | None]:
    """Why the iteration failed (kind, detail, retry_after); ``(None, "", None)`` if it did not.

    Structured evidence (the API status Claude Code reports) decides first; otherwise the text
    goes to the shared classifier.
    """
    kind = _API_STATUS_KINDS.get(api_status or 0)
    if kind is not None:
        detail = f"API error {api_status}: {error_text.strip()}"
    elif not failed and exit_code in (0, None):
        if said_anything:
            return None, "", None
        return FailureKind.EMPTY_OUTPUT, "Claude Code ended without saying anything", None
    else:
        verdict = classify(exit_code if exit_code else 1, output_tail + "\n" + error_text,
                           stderr_tail)
        kind = verdict.kind or FailureKind.CRASH
        detail = verdict.detail or error_text.strip() or "Claude Code failed"
    if kind == FailureKind.AUTH:
        detail = f"{detail} — {_AUTH_HINT}"
    retry = parse_retry_after(error_text) if kind == FailureKind.RATE_LIMIT else None
    return kind, detail, retry


async def _signal_group(
    proc_pid: int, wait: Callable[[], Awaitable[object]], grace: float
) -> None:
    """TERM the process group, KILL it after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc_pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc_pid, signal.SIGKILL)
        await wait()


# --- headless: claude --print --output-format stream-json ------------------------------------


class _PrintSession(AgentSession):
    def __init__(self, proc: asyncio.subprocess.Process, prompt: bytes,
                 on_output: OutputSink) -> None:
        self._proc = proc
        self._on_output = on_output
        self._renderer = TranscriptRenderer()
        self._tail = bytearray()
        self._stderr_tail = bytearray()
        self._sent = 0
        self._stopped = False
        self._result: AgentResult | None = None
        self._tasks = [
            asyncio.create_task(self._feed_stdin(prompt)),
            asyncio.create_task(self._pump_stdout()),
            asyncio.create_task(self._pump_stderr()),
        ]

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        self._sent += len(data)
        self._tail.extend(data)
        del self._tail[:-_TAIL]
        self._on_output(data)

    async def _feed_stdin(self, prompt: bytes) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            stdin.write(prompt)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            log.warning("claude closed its input before reading the whole prompt")
        finally:
            stdin.close()

    async def _pump_stdout(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        while chunk := await stdout.read(65536):
            self._emit(self._renderer.feed(chunk))
        self._emit(self._renderer.finish())

    async def _pump_stderr(self) -> None:
        stderr = self._proc.stderr
        assert stderr is not None
        while chunk := await stderr.read(65536):
            self._stderr_tail.extend(chunk)
            del self._stderr_tail[:-_TAIL]
            self._emit(chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))

    async def wait(self) -> AgentResult:
        if self._result is None:
            code = await self._proc.wait()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._result = self._build_result(code)
        return self._result

    def _build_result(self, code: int) -> AgentResult:
        summary = self._renderer.summary()
        error_text = (summary.result_text or "") if summary.is_error else ""
        kind, detail, retry = _classify(
            code,
            failed=summary.is_error or self._stopped,
            api_status=summary.api_error_status,
            error_text=error_text,
            output_tail=self._tail.decode("utf-8", "replace"),
            stderr_tail=self._stderr_tail.decode("utf-8", "replace"),
            said_anything=summary.assistant_messages > 0 or summary.result_text is not None,
        )
        if self._stopped and kind == FailureKind.CRASH:
            detail = "stopped before the end of its turn"
        if summary.is_error:
            final = ""
        elif summary.result_text is not None:
            final = summary.result_text
        else:
            final = summary.last_assistant_text
        return AgentResult(
            exit_code=code,
            final_text=final,
            failure=kind,
            detail=detail,
            retry_after=retry,
            usage=summary.usage,
            output_bytes=self._sent,
        )

    async def terminate(self, grace: float = 5.0) -> None:
        if self._proc.returncode is None:
            self._stopped = True
            await _signal_group(self._proc.pid, self._proc.wait, grace)


class ClaudePrintBackend(AgentBackend):
    """``claude --print --output-format stream-json``, rendered as a transcript."""

    name = "claude-print"

    def __init__(self, binary: Path | None = None, *, extra_args: Sequence[str] = ()) -> None:
        self._binary = binary
        self._extra_args = list(extra_args)

    def command(self, request: IterationRequest) -> list[str]:
        """The argv of one iteration (the prompt travels on stdin)."""
        binary = _claude_binary(self._binary, request.cwd)
        return [str(binary), "--print", "--output-format", "stream-json", "--verbose",
                *_common_args(request), *self._extra_args]

    async def start(self, request: IterationRequest, on_output: OutputSink) -> AgentSession:
        argv = self.command(request)
        log.info("starting %s in %s", shlex.join(argv), request.cwd)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=str(request.cwd),
                env=claude_env(request),
                start_new_session=True,
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            raise UserError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from exc
        return _PrintSession(proc, request.prompt.encode(), on_output)


# --- interactive: the TUI in a PTY ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Dialog:
    name: str
    marker: str  # text on the screen that identifies it
    choice: str | None  # the option to pick (by its label), or None: just confirm


@dataclass(frozen=True, slots=True)
class _Outcome:
    """How the turn ended, as far as the hook file or the screen tell."""

    kind: FailureKind | None = None
    detail: str = ""
    retry_after: float | None = None
    final_text: str = ""
    usage: Usage | None = None
    transcript: Path | None = None  # the session's JSONL transcript, named by the hook


# An option is picked by its label, not its number or position: Claude Code versions differ in
# both (some number their options, some list "No" first). See _menu_keys.
_DIALOGS = (
    _Dialog("trust-folder", "Yes, I trust this folder", "Yes, I trust this folder"),
    _Dialog("trust-folder", "Do you trust the files in this folder?", "Yes, proceed"),
    _Dialog("api-key", "Do you want to use this API key?", "Yes"),
    _Dialog("bypass-permissions", "Yes, I accept", "Yes, I accept"),
    _Dialog("theme", "Choose the text style that looks best", None),
    _Dialog("security-notes", "Security notes:", None),
)
_MENU_CURSOR = "\u276f"  # the heavy right-pointing angle Claude Code draws at the selection
_ENTER, _UP, _DOWN = b"\r", b"\x1b[A", b"\x1b[B"
_AUTH_MARKERS = ("Select login method", "Please run /login", "Not logged in", "Invalid API key")
_NETWORK_MARKERS = ("Unable to connect to Anthropic services",)
_DIALOG_RETRY = 2.0  # seconds before answering a dialog again that is still on the screen
_MENU_STEP = 0.3  # seconds between two moves of a dialog's menu cursor
_STUCK_AFTER = 30.0  # seconds a dialog may stay unanswerable before the output says so


_BOX = " \t│┃║|"  # what may stand around an option: spaces, a dialog's border
_MENU_ABOVE = 6  # lines above a dialog's marker that may hold its options
_MENU_SPAN = 8  # the most lines between the cursor and the option it moves to


def _find_dialog(lines: Sequence[str]) -> tuple[_Dialog, int] | None:
    """The dialog shown now: the one whose marker is lowest on the screen (text of a dialog
    answered before may still be drawn above it), with the line of that marker."""
    found: tuple[_Dialog, int] | None = None
    for dialog in _DIALOGS:
        line = next((i for i in range(len(lines) - 1, -1, -1) if dialog.marker in lines[i]),
                    None)
        if line is not None and (found is None or line > found[1]):
            found = (dialog, line)
    return found


def _menu_keys(lines: Sequence[str], choice: str | None) -> bytes | None:
    """The next key that picks ``choice`` in the menu on the screen ``lines`` (its dialog's
    marker and what follows it): an arrow towards it, or Enter when the cursor is on it (or
    when there is nothing to choose). ``None`` while no such menu is drawn."""
    if choice is None:
        return _ENTER
    label = re.compile(
        rf"^[{_BOX}]*(?:{_MENU_CURSOR}\s*)?(?:\d+\.\s*)?{re.escape(choice)}[{_BOX}]*$")
    cursors = [i for i, line in enumerate(lines)
               if line.lstrip(_BOX).startswith(_MENU_CURSOR)
               and line.lstrip(_BOX)[len(_MENU_CURSOR):].strip(_BOX)]  # an option, not a prompt
    targets = [i for i, line in enumerate(lines) if label.match(line)]
    if not cursors or not targets:
        return None
    cursor, target = cursors[-1], targets[-1]  # the menu drawn last is the one shown
    if abs(cursor - target) > _MENU_SPAN:
        return None
    if cursor == target:
        return _ENTER
    return _DOWN if target > cursor else _UP


def _hook_settings(stop_file: Path) -> dict[str, Any]:
    tmp = stop_file.with_suffix(".tmp")
    # Written then renamed, so the file never appears half-written.
    command = f"cat > {shlex.quote(str(tmp))} && mv {shlex.quote(str(tmp))} " \
              f"{shlex.quote(str(stop_file))}"
    hook = [{"hooks": [{"type": "command", "command": command}]}]
    return {"hooks": {"Stop": hook, "StopFailure": hook}}


class _InteractiveSession(AgentSession):
    def __init__(self, request: IterationRequest, on_output: OutputSink, stop_file: Path,
                 exit_grace: float, answer_dialogs: bool) -> None:
        self._request = request
        self._on_output = on_output
        self._stop_file = stop_file
        self._exit_grace = exit_grace
        self._answer_dialogs = answer_dialogs
        self._screen = pyte.Screen(request.cols, request.rows)
        self._stream = pyte.ByteStream(self._screen)
        self._dirty = False
        self._tail = bytearray()
        self._answered: dict[str, float] = {}
        self._stuck_since: float | None = None
        self._stuck_told: set[str] = set()
        self._pty: AgentTerminal | None = None
        self._outcome: _Outcome | None = None  # set when the turn has ended, either way
        self._stopped = False
        self._result: AgentResult | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def spawn(self, argv: Sequence[str], env: Mapping[str, str],
                    spawn_terminal: TerminalSpawner = spawn_pty) -> None:
        self._pty = await spawn_terminal(
            argv, cwd=self._request.cwd, env=env, on_output=self._output,
            cols=self._request.cols, rows=self._request.rows,
        )
        self._watcher = asyncio.create_task(self._watch())

    def _output(self, data: bytes) -> None:
        self._on_output(data)
        self._tail.extend(data)
        del self._tail[:-_TAIL]
        self._stream.feed(data)
        self._dirty = True

    def _say(self, text: str) -> None:
        self._on_output(f"\r\n[ralph-uv] {text}\r\n".encode())

    @property
    def interactive(self) -> bool:
        return True

    async def write(self, data: bytes) -> None:
        assert self._pty is not None
        await self._pty.write(data)

    def resize(self, cols: int, rows: int) -> None:
        if self._pty is not None:
            self._pty.resize(cols, rows)
        self._screen.resize(rows, cols)

    # -- watching the turn ------------------------------------------------------------------

    async def _watch(self) -> None:
        assert self._pty is not None
        while self._pty.returncode is None and self._outcome is None:
            if self._stop_file.exists() and self._read_stop_file():
                break
            if self._dirty:
                self._dirty = False
                await self._look_at_screen()
            await asyncio.sleep(_POLL)
        if self._outcome is not None and self._pty.returncode is None:
            await self._exit_claude()

    async def _look_at_screen(self) -> None:
        assert self._pty is not None
        text = "\n".join(self._screen.display)
        for marker in _AUTH_MARKERS:
            if marker in text:
                self._outcome = _Outcome(
                    FailureKind.AUTH,
                    f"Claude Code is not logged in ({marker!r} on screen) — {_AUTH_HINT}")
                self._say(f"Claude Code asks for a login; {_AUTH_HINT}")
                return
        for marker in _NETWORK_MARKERS:
            if marker in text:
                self._outcome = _Outcome(FailureKind.NETWORK, f"Claude Code says: {marker}")
                return
        if not self._answer_dialogs:
            return
        now = time.monotonic()
        lines = self._screen.display
        found = _find_dialog(lines)
        if found is None:
            self._stuck_since = None
            return
        dialog, at = found
        keys = _menu_keys(lines[max(0, at - _MENU_ABOVE):], dialog.choice)
        if keys is None:
            self._not_found(dialog, now)
        wait = _DIALOG_RETRY if keys == _ENTER else _MENU_STEP
        if keys is None or now - self._answered.get(dialog.name, -1e9) <= wait:
            self._dirty = True  # look again at the next poll, even if nothing is redrawn
            return
        self._answered[dialog.name] = now
        self._stuck_since = None
        try:
            await self._pty.write(keys)
        except UserError:
            return  # the terminal closed: claude is exiting, the wait() reports how
        if keys == _ENTER:
            answer = dialog.choice or "continue"
            log.info("answering Claude Code's %s dialog: %s", dialog.name, answer)
            self._say(f"answered Claude Code's {dialog.name} dialog: {answer}")

    def _not_found(self, dialog: _Dialog, now: float) -> None:
        """A dialog whose option is not where it is expected: say so once it has lasted, so a
        person can attach and answer it (the iteration's timeout still applies)."""
        if self._stuck_since is None:
            self._stuck_since = now
        elif now - self._stuck_since > _STUCK_AFTER and dialog.name not in self._stuck_told:
            self._stuck_told.add(dialog.name)
            log.warning("Claude Code's %s dialog: option %r not found on the screen",
                        dialog.name, dialog.choice)
            self._say(f"cannot answer Claude Code's {dialog.name} dialog (no option "
                      f"{dialog.choice!r}); attach and answer it (ralph-uv attach, then "
                      "Ctrl-] i)")

    def _read_stop_file(self) -> bool:
        try:
            hook = json.loads(self._stop_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            log.debug("the stop hook file is not readable yet: %s", exc)
            return False
        if not isinstance(hook, dict):
            hook = {}
        # The transcript is read once claude has exited: at hook time its last lines may not
        # be written yet.
        path = hook.get("transcript_path")
        transcript = Path(path) if isinstance(path, str) and path else None
        last = hook.get("last_assistant_message")
        final = last if isinstance(last, str) else ""
        if hook.get("hook_event_name") == "StopFailure":
            error = str(hook.get("error") or "unknown")
            kind = _HOOK_ERROR_KINDS.get(error)
            if kind is None:
                kind, detail, retry = _classify(1, failed=True, error_text=final)
            else:
                detail = f"{error}: {final}".strip(": ")
                if kind == FailureKind.AUTH:
                    detail = f"{detail} — {_AUTH_HINT}"
                retry = parse_retry_after(final) if kind == FailureKind.RATE_LIMIT else None
            self._outcome = _Outcome(kind, detail, retry, transcript=transcript)
        else:
            self._outcome = _Outcome(final_text=final, transcript=transcript)
        return True

    async def _exit_claude(self) -> None:
        """Ask Claude Code to quit, as a person would; signal it if it does not."""
        assert self._pty is not None
        with contextlib.suppress(UserError):
            await self._pty.write(b"\x1b")  # close any menu or autocomplete first
            await asyncio.sleep(0.2)
            await self._pty.write(b"/exit")
            await asyncio.sleep(0.3)
            await self._pty.write(b"\r")
        try:
            await asyncio.wait_for(self._pty.wait(), self._exit_grace)
        except TimeoutError:
            log.info("Claude Code did not exit after /exit; terminating it")
            await self._pty.terminate(self._exit_grace)

    # -- the result -------------------------------------------------------------------------

    async def wait(self) -> AgentResult:
        assert self._pty is not None
        assert self._watcher is not None
        if self._result is None:
            code = await self._pty.wait()
            (watched,) = await asyncio.gather(self._watcher, return_exceptions=True)
            if isinstance(watched, Exception):
                log.warning("watching Claude Code's turn failed: %r", watched)
            if self._outcome is None and self._stop_file.exists():
                self._read_stop_file()
            self._result = self._build_result(code)
        return self._result

    def _build_result(self, code: int) -> AgentResult:
        assert self._pty is not None
        outcome = self._outcome
        if outcome is None:
            if self._stopped:
                outcome = _Outcome(FailureKind.CRASH, "stopped before the end of its turn")
            else:
                kind, detail, retry = _classify(
                    code, failed=True, output_tail=self._tail.decode("utf-8", "replace"),
                )
                if code == 0:
                    detail = "Claude Code exited before the end of its turn"
                outcome = _Outcome(kind, detail, retry)
        if outcome.transcript is not None:
            final, usage = read_session_transcript(outcome.transcript)
            final = outcome.final_text or ("" if outcome.kind else final)
            outcome = dataclasses.replace(outcome, final_text=final, usage=usage)
        return AgentResult(
            exit_code=code,
            final_text=outcome.final_text,
            failure=outcome.kind,
            detail=outcome.detail,
            retry_after=outcome.retry_after,
            usage=outcome.usage,
            output_bytes=self._pty.bytes_read,
        )

    async def terminate(self, grace: float = 5.0) -> None:
        assert self._pty is not None
        if self._pty.returncode is None:
            self._stopped = True
            await self._pty.terminate(grace)
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)


class ClaudeInteractiveBackend(AgentBackend):
    """Claude Code's TUI in a PTY; the turn's end comes from a ``Stop`` hook."""

    name = "claude"

    def __init__(
        self,
        binary: Path | None = None,
        *,
        extra_args: Sequence[str] = (),
        exit_grace: float = 5.0,
        answer_dialogs: bool = True,
    ) -> None:
        self._binary = binary
        self._extra_args = list(extra_args)
        self._exit_grace = exit_grace
        self._answer_dialogs = answer_dialogs
        # The runner swaps this to run Claude Code elsewhere (a tmux pane) instead of a PTY.
        self.spawn_terminal: TerminalSpawner = spawn_pty

    def _prompt_argument(self, request: IterationRequest) -> str:
        if len(request.prompt.encode()) < PROMPT_ARG_LIMIT:
            return request.prompt
        path = request.loop_dir / f"prompt-{request.iteration}.md"
        path.write_text(request.prompt, encoding="utf-8")
        return (f"Your instructions for this iteration are in the file {path} (too long to "
                "type here). Read the whole file first, then follow it.")

    async def start(self, request: IterationRequest, on_output: OutputSink) -> AgentSession:
        binary = _claude_binary(self._binary, request.cwd)
        try:
            request.loop_dir.mkdir(parents=True, exist_ok=True)
            stop_file = request.loop_dir / f"claude-stop-{request.iteration}.json"
            stop_file.unlink(missing_ok=True)
            settings = request.loop_dir / "claude-settings.json"
            settings.write_text(json.dumps(_hook_settings(stop_file), indent=2) + "\n")
            prompt = self._prompt_argument(request)
        except OSError as exc:
            raise UserError(
                f"cannot write Claude Code's hook settings in {request.loop_dir}: {exc.strerror}"
            ) from exc
        if prompt.startswith("-"):
            prompt = " " + prompt  # not an option
        argv = [str(binary), *_common_args(request), "--settings", str(settings),
                *self._extra_args, prompt]
        env = claude_env(request)
        env.setdefault("TERM", "xterm-256color")
        log.info("starting %s in %s", shlex.join(argv[:-1]), request.cwd)
        session = _InteractiveSession(request, on_output, stop_file, self._exit_grace,
                                      self._answer_dialogs)
        await session.spawn(argv, env, self.spawn_terminal)
        return session
