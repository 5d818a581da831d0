"""The loop commands: ``status``, ``attach``, ``stop``, ``checkpoint``, ``inject``, ``logs``,
``send``, ``clean`` and ``completion``; each a thin shell over :mod:`ralph_uv.client.loops`.

They talk to this machine's ralphd, which is started on demand (the CLI says so when it does).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import click
from click.shell_completion import CompletionItem, get_completion_class
from rich import box
from rich.console import Console
from rich.table import Table

from ralph_uv.cli import cli
from ralph_uv.cli.attach_extra import attach_with_tmux, opencode_attach
from ralph_uv.client.attach import AttachResult, attach
from ralph_uv.client.keys import parse_prefix
from ralph_uv.client.loops import LoopEvent, Loops, clean_loops, client_name
from ralph_uv.client.mirror import LoopTarget, RemoteView, gather_remotes, resolve_loop
from ralph_uv.client.remotes import STATUS_TIMEOUT, close_remote_connections, remote_loops
from ralph_uv.config import load_config, paths
from ralph_uv.errors import RalphError, UserError
from ralph_uv.journal import TextDecoder
from ralph_uv.registry import Registry, SessionRecord
from ralph_uv.status import STATUS_STYLE, LoopStatus
from ralph_uv.tasks import git_root, list_tasks, resolve_task
from ralph_uv.transports.base import Stream

__all__ = [
    "EXIT_STATUS",
    "TerminalText",
    "ago",
    "attach_loop",
    "complete_loop",
    "complete_task",
    "loop_ref",
    "loop_target",
    "report_attach",
    "with_loops",
]

T = TypeVar("T")

# Exit statuses when a loop ends under the command, documented in the README.
EXIT_STATUS = {
    LoopStatus.COMPLETED: 0,
    LoopStatus.CHECKPOINTED: 0,
    LoopStatus.STOPPED: 0,
    LoopStatus.EXHAUSTED: 3,
    LoopStatus.STALLED: 4,
}


_CONTROL = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC
    r"|\x1b[PX^_][^\x1b]*\x1b\\"  # DCS, SOS, PM, APC
    r"|\x1b[ -/]*[0-~]"  # other escapes
    r"|[\x00-\x08\x0b-\x1f\x7f]"  # other controls (tab and newline stay)
)
_UNFINISHED = re.compile(  # an escape sequence cut off at the end of a chunk
    r"\x1b(?:\[[0-?]*[ -/]*|\][^\x07\x1b]*\x1b?|[PX^_][^\x1b]*\x1b?|[ -/]*)\Z"
)


def _notice(text: str) -> None:
    click.echo(f"[ralph-uv] {text}", err=True)


def with_loops(action: Callable[[Loops], Awaitable[T]], *, kind: str = "ralph-uv",
               remote: str | None = None) -> T:
    """Run ``action`` with a connection to the local ralphd (started if needed), or to the
    ralphd of ``remote``."""

    async def main() -> T:
        try:
            if remote is None:
                loops = await Loops.connect(kind=kind, on_notice=_notice)
            else:
                loops = await remote_loops(remote, kind=kind)
            try:
                return await action(loops)
            finally:
                await loops.close()
        finally:
            await close_remote_connections()

    return asyncio.run(main())


def loop_ref(task: str) -> str:
    """What ralphd is asked for: a loop id or task name as given; a task *path* becomes the
    task's name."""
    if task.startswith(("/", "./", "../", "~", "tasks/")) or task.endswith(".json"):
        return resolve_task(task).name
    return task


def loop_target(task: str, on: str | None) -> LoopTarget:
    """Where TASK's loop runs: this machine, or the remote its registry row names (``--on``
    forces one)."""
    return resolve_loop(loop_ref(task), on)


_ON = click.option("--on", "on", metavar="REMOTE",
                   help="The remote the loop runs on (default: found in the registry).")


async def attach_loop(loops: Loops, loop: str) -> AttachResult:
    """Attach this terminal to ``loop`` through ralphd, reconnecting through it when needed."""
    prefix = parse_prefix(load_config().attach_prefix)

    async def connect(loop_id: str | None) -> Stream:
        return await loops.loop_stream(loop_id or loop)

    return await attach(connect, client=client_name("attach"), prefix=prefix)


def report_attach(result: AttachResult) -> int:
    """Say how the attach ended; the exit status for it."""
    if result.detached:
        _notice(
            f"detached from {result.task_name} ({result.loop_id}); the loop goes on. "
            f"Attach again: ralph-uv attach {result.task_name}"
        )
        return 0
    if result.status is None:
        _notice(f"attach ended: {result.reason or 'the loop is gone'}")
        return 1
    _notice(
        f"loop {result.loop_id} {result.status.value}"
        f"{': ' + result.reason if result.reason else ''}"
    )
    return EXIT_STATUS.get(result.status, 1)


# ----------------------------------------------------------------------------------- completion


def complete_task(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Task names under ``tasks/`` of the current repository."""
    try:
        names = {task.name for task in list_tasks(git_root())}
    except (RalphError, OSError):
        names = set()
    return [CompletionItem(name) for name in sorted(names) if name.startswith(incomplete)]


def complete_loop(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Task names and loop ids: this repository's tasks and the loops in the registry."""
    items = {item.value: item for item in complete_task(ctx, param, incomplete)}
    try:
        if paths().registry.exists():
            with Registry.open() as registry:
                for record in registry.find():
                    items.setdefault(record.task_name, CompletionItem(record.task_name))
                    items[record.loop_id] = CompletionItem(
                        record.loop_id, help=f"{record.task_name}, {record.status.value}"
                    )
    except (RalphError, OSError):
        pass
    return [items[key] for key in sorted(items) if key.startswith(incomplete)]


# ------------------------------------------------------------------------------------- commands


def _age(record: SessionRecord, now: float) -> str:
    seconds = max(0.0, now - record.started_at)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def ago(stamp: float | None, now: float | None = None) -> str:
    """``5m ago``-style age of a timestamp; ``never`` for ``None``."""
    if stamp is None:
        return "never"
    seconds = max(0.0, (now or time.time()) - stamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _table(records: list[SessionRecord], stale: frozenset[str] = frozenset()) -> Table:
    now = time.time()
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("TASK", "LOOP", "WHERE", "STATUS", "ITER", "STORY", "AGENT", "AGE"):
        table.add_column(column, no_wrap=column != "TASK")
    for r in records:
        status = LoopStatus(r.status)
        where = r.location
        if r.location in stale:
            where = f"[yellow]{r.location} (seen {ago(r.remote_seen_at, now)})[/]"
        table.add_row(
            r.task_name,
            r.loop_id,
            where,
            f"[{STATUS_STYLE.get(status, '')}]{status.value}[/]",
            f"{r.iteration}/{r.max_iterations}",
            r.current_story or "-",
            r.agent,
            _age(r, now),
        )
    return table


def _combine(local: list[SessionRecord], views: list[RemoteView]) -> list[SessionRecord]:
    found = {r.loop_id: r for r in local}
    for view in views:
        found.update((r.loop_id, r) for r in view.loops)
    return sorted(found.values(), key=lambda r: r.started_at, reverse=True)


@cli.command("status")
@click.option("--all", "show_all", is_flag=True, help="Also finished loops and other machines'.")
@click.option("--json", "as_json", is_flag=True, help="Print the loops' records as JSON.")
@click.option("--timeout", type=click.FloatRange(0.1), default=STATUS_TIMEOUT, show_default=True,
              help="Seconds to wait for each remote.")
def status_command(show_all: bool, as_json: bool, timeout: float) -> None:
    """List running loops, here and on every remote (asked in parallel): task, loop id, where,
    status, iteration, story, agent, age. A remote that does not answer shows its loops as
    last seen, and when."""

    async def go(loops: Loops) -> tuple[list[SessionRecord], list[RemoteView]]:
        local = await loops.list(include_finished=show_all)
        return local, await gather_remotes(include_finished=show_all, timeout=timeout,
                                           client=loops.client)

    local, views = with_loops(go)
    records = _combine(local, views)
    stale = frozenset(v.remote.name for v in views if not v.reachable)
    if as_json:
        click.echo(json.dumps([{**r.to_dict(), "stale": r.location in stale} for r in records],
                              indent=2, ensure_ascii=False))
        return
    for view in views:
        if not view.reachable:
            _notice(f"{view.remote.name} is unreachable ({view.error}); its loops as last seen "
                    f"{ago(view.seen_at)}")
    if not records:
        click.echo(
            "No loops recorded yet; start one with `ralph-uv run TASK`."
            if show_all
            else "No loops running; start one with `ralph-uv run TASK` "
            "(`ralph-uv status --all` lists finished ones)."
        )
        return
    Console().print(_table(records, stale))


@cli.command("attach")
@click.argument("task", required=False, shell_complete=complete_loop)
@_ON
@click.option("--tmux", "use_tmux", is_flag=True,
              help="Plain tmux on the loop's session (loops run with --backend tmux); "
              "over ssh -t for a remote loop.")
@click.option("--ssh-via", metavar="URL",
              help="With --tmux: reach the remote's sshd through this ziti:// or tcp:// URL.")
@click.option("--transcript", is_flag=True,
              help="For an opencode loop: this view of its transcript, not opencode attach.")
@click.pass_context
def attach_command(ctx: click.Context, task: str | None, on: str | None, use_tmux: bool,
                   ssh_via: str | None, transcript: bool) -> None:
    """Show a running loop's agent terminal, full screen, with a status bar.

    TASK is a task name or a loop id; without it, the most recently started running loop.
    An opencode loop opens the real `opencode attach` on the loop's server instead (unless
    --transcript); --tmux replaces this with `tmux attach` on the loop's tmux session.

    \b
    Keys after the prefix (Ctrl-] unless attach_prefix is set in config.toml):
      i  interactive mode on/off (your keys go to the agent)   I  take it over
      s  stop after this iteration (asks y/n)    c  checkpoint
      p  inject a prompt for the next iteration  d  detach (the loop goes on)
      ?  help on the status bar                  Ctrl-] Ctrl-]  send Ctrl-] itself
    """

    target = loop_target(task, on) if task else None
    remote = target.remote if target else None
    if use_tmux:
        attach_with_tmux(target.loop if target else None, remote, ssh_via=ssh_via)

    async def go(loops: Loops) -> AttachResult | int:
        loop = target.loop if target else (await loops.most_recent_running()).loop_id
        if not transcript and (status := await opencode_attach(loops, loop)) is not None:
            return status
        return await attach_loop(loops, loop)

    result = with_loops(go, kind="attach", remote=remote)
    ctx.exit(result if isinstance(result, int) else report_attach(result))


@cli.command("stop")
@click.argument("task", shell_complete=complete_loop)
@click.option("--now", is_flag=True, help="Stop at once instead of after the current iteration.")
@_ON
def stop_command(task: str, now: bool, on: str | None) -> None:
    """Stop TASK's loop after its current iteration (or --now)."""
    target = loop_target(task, on)
    record = with_loops(lambda loops: loops.stop(target.loop, now=now), remote=target.remote)
    name = f"{record.task_name} ({record.loop_id})"
    if record.status.is_terminal:
        click.echo(f"{name} has already ended: {record.status.value}")
    elif now:
        click.echo(f"{name}: stopping now")
    else:
        click.echo(f"{name}: stops after the current iteration")


@cli.command("checkpoint")
@click.argument("task", shell_complete=complete_loop)
@_ON
def checkpoint_command(task: str, on: str | None) -> None:
    """Checkpoint TASK's loop: the current iteration finishes, then the loop stops as
    `checkpointed`, ready to run again."""
    target = loop_target(task, on)
    record = with_loops(lambda loops: loops.checkpoint(target.loop), remote=target.remote)
    name = f"{record.task_name} ({record.loop_id})"
    if record.status.is_terminal:
        click.echo(f"{name} has already ended: {record.status.value}")
    else:
        click.echo(f"{name}: checkpoints after the current iteration")


@cli.command("inject")
@click.argument("task", shell_complete=complete_loop)
@click.argument("text")
@_ON
def inject_command(task: str, text: str, on: str | None) -> None:
    """Add TEXT to the prompt of TASK's next iteration (TEXT `-` reads it from stdin)."""
    prompt = sys.stdin.read() if text == "-" else text
    target = loop_target(task, on)

    async def go(loops: Loops) -> Mapping[str, Any]:
        return await loops.inject(target.loop, prompt)

    iteration = with_loops(go, remote=target.remote).get("iteration")
    click.echo(f"{task}: prompt queued" + (f" for iteration {iteration}" if iteration else ""))


class TerminalText:
    """Terminal output as plain text: control sequences removed, line ends as ``\\n``, even
    when a sequence is cut between two chunks."""

    def __init__(self) -> None:
        self._decoder = TextDecoder()
        self._tail = ""

    def feed(self, data: bytes) -> str:
        """The text of ``data``; a sequence or line end cut off at its end waits for the
        next chunk."""
        text = self._tail + self._decoder.feed(data)
        cut = len(text)
        unfinished = _UNFINISHED.search(text)
        if unfinished is not None and cut - unfinished.start() < 256:
            cut = unfinished.start()
        elif text.endswith("\r"):
            cut -= 1  # maybe the first half of \r\n
        text, self._tail = text[:cut], text[cut:]
        return self._clean(text)

    def finish(self) -> str:
        """What was held back, at the end of the output."""
        text, self._tail = self._tail + self._decoder.finish(), ""
        return self._clean(text)

    @staticmethod
    def _clean(text: str) -> str:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        return _CONTROL.sub("", text)


@cli.command("logs")
@click.argument("task", shell_complete=complete_loop)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the loop ends.")
@click.option("--since", type=click.IntRange(0), default=0, help="Start at this byte offset.")
@click.option("--raw", is_flag=True, help="The bytes as the agent wrote them, escape codes too.")
@_ON
@click.pass_context
def logs_command(ctx: click.Context, task: str, follow: bool, since: int, raw: bool,
                 on: str | None) -> None:
    """Print the output of TASK's loop (its most recent one; or a loop id) from its journal,
    also after the loop has ended."""
    out = sys.stdout.buffer
    cleaner = TerminalText()
    target = loop_target(task, on)

    async def go(loops: Loops) -> LoopEvent | None:
        last: LoopEvent | None = None
        async for item in loops.logs(target.loop, since=since, follow=follow):
            if isinstance(item, bytes):
                out.write(item if raw else cleaner.feed(item).encode())
                out.flush()
            elif item.type == "gap":
                _notice(f"output {item.data.get('from')}..{item.data.get('to')} was dropped")
            elif item.type == "loop_finished":
                last = item
        return last

    try:
        finished = with_loops(go, remote=target.remote)
    except KeyboardInterrupt:
        ctx.exit(130)
    if not raw:
        out.write(cleaner.finish().encode())
        out.flush()
    if finished is not None:
        data = finished.data
        _notice(f"loop {data.get('status')}: {data.get('reason') or ''}".rstrip(": "))


@cli.command("send")
@click.argument("task", shell_complete=complete_loop)
@click.argument("text")
@click.option("--no-enter", is_flag=True, help="Type TEXT without pressing Enter after it.")
@_ON
def send_command(task: str, text: str, no_enter: bool, on: str | None) -> None:
    """Type TEXT (and Enter) into the agent's terminal of TASK's loop.

    It takes interactive mode for the moment and gives it back; it is refused, naming the
    holder, while someone else holds interactive mode.
    """
    target = loop_target(task, on)
    state = with_loops(lambda loops: loops.send(target.loop, text, enter=not no_enter),
                       remote=target.remote)
    click.echo(f"typed into {state.task_name} ({state.loop_id})")


@cli.command("clean")
@click.option("--all", "include_failed", is_flag=True, help="Also failed and crashed loops.")
@click.option("--json", "as_json", is_flag=True, help="Print the removed loops as JSON.")
def clean_command(include_failed: bool, as_json: bool) -> None:
    """Forget finished loops (completed, exhausted, stopped, checkpointed): their registry rows
    and their journals. Running loops are never touched."""
    removed = clean_loops(include_failed=include_failed)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in removed], indent=2, ensure_ascii=False))
        return
    for record in removed:
        click.echo(f"removed {record.loop_id} ({record.task_name}, {record.status.value})")
    count = len(removed)
    click.echo(f"{count} loop{'s' if count != 1 else ''} removed" if count else "nothing to clean")


@cli.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion_command(shell: str) -> None:
    """Print the shell completion script for SHELL.

    \b
    bash:  eval "$(ralph-uv completion bash)"      (in ~/.bashrc)
    zsh:   eval "$(ralph-uv completion zsh)"       (in ~/.zshrc)
    fish:  ralph-uv completion fish > ~/.config/fish/completions/ralph-uv.fish
    """
    completion_class = get_completion_class(shell)
    if completion_class is None:  # click knows all three; a guard for older clicks
        raise UserError(f"no completion for {shell}; use bash, zsh or fish")
    script = completion_class(cli, {}, "ralph-uv", "_RALPH_UV_COMPLETE").source()
    click.echo(script)
