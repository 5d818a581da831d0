"""``ralph-uv run``: start a Ralph loop on a task."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import click

from ralph_uv.cli import cli
from ralph_uv.cli.loops import EXIT_STATUS, attach_loop, complete_task, report_attach, with_loops
from ralph_uv.client.loops import LoopEvent, Loops, RunOptions
from ralph_uv.client.remote_run import SYNC_MODES, RemotePlan, plan_remote_run, start_remote_loop
from ralph_uv.config import Config, load_config, load_env_file, paths
from ralph_uv.errors import UserError
from ralph_uv.prd import load_prd
from ralph_uv.runner.engine import LoopOutcome, LoopSpec, StopWhen
from ralph_uv.runner.host import LoopHost, new_loop_id
from ralph_uv.status import LoopStatus
from ralph_uv.tasks import TaskRef, git_root, list_tasks, resolve_task

__all__ = ["pick_task", "run_foreground"]


def pick_task(cwd: Path | None = None) -> TaskRef:
    """Ask which task to run, listing ``tasks/**/prd.json`` under the git root."""
    root = git_root(cwd)
    tasks = list_tasks(root)
    if not tasks:
        raise UserError(
            f"no tasks under {root / 'tasks'} — create one with `ralph-uv init NAME`, "
            "or name a task folder: `ralph-uv run path/to/task`"
        )
    if not sys.stdin.isatty():
        listing = "\n".join(f"  {t.label}" for t in tasks)
        raise UserError(f"name the task to run; found:\n{listing}")
    for number, task in enumerate(tasks, start=1):
        click.echo(f"{number:>3}. {task.label}")
    choice = click.prompt("Task", type=click.IntRange(1, len(tasks)))
    return resolve_task(str(tasks[choice - 1].dir), cwd)


def _terminal_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except OSError:
        return 120, 40
    return size.columns, size.lines


def run_foreground(ref: TaskRef, config: Config, spec_overrides: dict[str, object]) -> LoopOutcome:
    """Run the loop in this process, its output on this terminal; Ctrl-C checkpoints."""
    prd = load_prd(ref.prd_file)  # a broken prd.json stops here, before anything changes
    agent = str(spec_overrides.get("agent") or prd.agent or config.agent)
    env = load_env_file(paths().env_file)
    spec = LoopSpec(
        loop_id=new_loop_id(ref.name),
        task_dir=ref.dir,
        agent=agent,
        task_name=ref.name,
        model=spec_overrides.get("model"),  # type: ignore[arg-type]
        base_branch=spec_overrides.get("base_branch"),  # type: ignore[arg-type]
        env=env,
    )
    out = sys.stdout.buffer

    def show(data: bytes) -> None:
        out.write(data)
        out.flush()

    return asyncio.run(_run(spec, config, show))


async def _run(spec: LoopSpec, config: Config, show: Callable[[bytes], None]) -> LoopOutcome:
    host = LoopHost(spec, config, on_output=show)
    engine = host.engine
    engine.resize(*_terminal_size())
    loop = asyncio.get_running_loop()
    interrupts = 0

    def interrupt() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            click.echo(
                "\r\n[ralph-uv] checkpointing: the current iteration finishes, then the loop "
                "stops (Ctrl-C again to stop now)",
                err=True,
            )
            engine.request_checkpoint()
        else:
            click.echo("\r\n[ralph-uv] stopping now", err=True)
            engine.request_stop(StopWhen.NOW)

    loop.add_signal_handler(signal.SIGINT, interrupt)
    loop.add_signal_handler(signal.SIGTERM, engine.request_checkpoint)
    loop.add_signal_handler(signal.SIGWINCH, lambda: engine.resize(*_terminal_size()))
    click.echo(
        f"[ralph-uv] loop {spec.loop_id}: task {spec.task_name} with {spec.agent} "
        f"(max {config.max_iterations} iterations); Ctrl-C checkpoints",
        err=True,
    )
    try:
        return await host.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGWINCH):
            loop.remove_signal_handler(sig)
        host.close()


@cli.command()
@click.argument("task", required=False, shell_complete=complete_task)
@click.option(
    "--foreground", is_flag=True, help="Run the loop in this terminal (Ctrl-C checkpoints)."
)
@click.option(
    "--detach", is_flag=True, help="Start the loop and return; attach later with `ralph-uv attach`."
)
@click.option("--agent", help="Agent to run: claude, claude-print, opencode or one from config.")
@click.option("--model", help="Model for the agent (a story's own `model` still wins).")
@click.option(
    "--max-iterations", type=click.IntRange(1), help="Stop as `exhausted` after N iterations [10]."
)
@click.option("--base-branch", help="Create the task's branch from this branch [the current one].")
@click.option("--yolo", is_flag=True, default=None, help="Let the agent skip permission prompts.")
@click.option("--pause", type=click.FloatRange(0), help="Seconds between iterations [2].")
@click.option(
    "--timeout", type=click.FloatRange(1), help="Per-iteration timeout in seconds [3600]."
)
@click.option(
    "--max-runtime", type=click.FloatRange(1), help="Stop the loop after this many seconds."
)
@click.option("--failover", help="Agents to switch to after repeated failures, comma separated.")
@click.option("--on", "on", metavar="REMOTE",
              help="Run the loop on this remote (`ralph-uv remote add`): the branch is sent "
                   "there and the loop runs in a fresh checkout.")
@click.option("--sync", type=click.Choice(SYNC_MODES), default="bundle", show_default=True,
              help="With --on: send the branch as a git bundle, or push it to origin and let "
                   "the remote fetch it.")
@click.option("--push-every", type=click.IntRange(1), metavar="N",
              help="With --on --sync origin: the remote pushes the loop's branch to origin "
                   "every N iterations.")
@click.option("--install-agents", is_flag=True,
              help="With --on: install the agent CLI on the remote (npm) if it is missing.")
@click.option("--backend", type=click.Choice(["pty", "tmux"]), default=None,
              help="Where a terminal agent runs: a PTY of the loop [pty], or a tmux session "
                   "ralph-TASK that `ralph-uv attach --tmux` (or tmux itself) reaches.")
def run(
    task: str | None,
    foreground: bool,
    detach: bool,
    agent: str | None,
    model: str | None,
    max_iterations: int | None,
    base_branch: str | None,
    yolo: bool | None,
    pause: float | None,
    timeout: float | None,
    max_runtime: float | None,
    failover: str | None,
    on: str | None,
    sync: str,
    push_every: int | None,
    install_agents: bool,
    backend: str | None,
) -> None:
    """Run a Ralph loop on TASK until every story in its prd.json passes.

    TASK is a folder holding prd.json, or a bare name meaning tasks/NAME under the git root;
    without it, a picker lists the tasks found.

    The loop runs under this machine's ralphd (started if needed) and this terminal attaches
    to it: Ctrl-] d detaches and the loop goes on (`ralph-uv attach TASK` to come back).
    With --detach the command returns at once; with --foreground the loop runs inside this
    process instead, its output on this terminal. With --on REMOTE it runs on that machine
    (its branch is sent first; `ralph-uv pull TASK` brings the commits back).

    \b
    Exit status: 0 completed, checkpointed or stopped (or detached); 1 failed; 2 bad input
    (broken prd.json, dirty tree on the wrong branch); 3 exhausted; 4 stalled.
    """
    if foreground and detach:
        raise click.UsageError("--foreground and --detach exclude each other; pick one")
    if on is None and (push_every is not None or install_agents or sync != "bundle"):
        raise click.UsageError("--sync, --push-every and --install-agents go with --on REMOTE")
    if on is not None and foreground:
        raise click.UsageError("--foreground runs the loop here; leave it out with --on")
    if backend == "tmux" and foreground:
        raise click.UsageError("--backend tmux runs the loop under ralphd; leave out "
                               "--foreground")
    config = load_config().with_overrides(
        max_iterations=max_iterations,
        yolo=yolo,
        pause=pause,
        iteration_timeout=timeout,
        max_runtime=max_runtime,
        failover=tuple(p.strip() for p in failover.split(",") if p.strip()) if failover else None,
    )
    ref = resolve_task(task) if task else pick_task()
    plan = None
    if on is not None:  # every check before anything is sent or started
        plan = plan_remote_run(on, ref, sync="origin" if sync == "origin" else "bundle",
                               base_branch=base_branch, push_every=push_every)
    if not foreground:
        load_prd(ref.prd_file)  # a broken prd.json stops here, with its problems listed
        options = RunOptions(
            agent=agent,
            model=model or config.model,
            max_iterations=config.max_iterations,
            base_branch=base_branch,
            yolo=config.yolo,
            pause=config.pause,
            iteration_timeout=config.iteration_timeout,
            max_runtime=config.max_runtime,
            failover=config.failover or None,
            backend=backend,
        )
        sys.exit(_run_through_ralphd(ref, options, detach=detach, plan=plan,
                                     install_agents=install_agents))
    outcome = run_foreground(
        ref, config, {"agent": agent, "model": model, "base_branch": base_branch}
    )
    click.echo(
        f"\r\n[ralph-uv] loop {outcome.status.value}: {outcome.reason} "
        f"({outcome.stories_done}/{outcome.stories_total} stories, "
        f"{outcome.iterations} iterations, agent {outcome.agent})",
        err=True,
    )
    if outcome.pull_request:
        click.echo(f"[ralph-uv] pull request: {outcome.pull_request}", err=True)
    sys.exit(EXIT_STATUS.get(outcome.status, 1))


def _notice(text: str) -> None:
    click.echo(f"[ralph-uv] {text}", err=True)


def _run_through_ralphd(ref: TaskRef, options: RunOptions, *, detach: bool,
                        plan: RemotePlan | None = None, install_agents: bool = False) -> int:
    """Start the loop under ralphd (the remote's with ``plan``), then attach (a terminal),
    follow its output (no terminal) or return (``detach``); the exit status."""
    attachable = sys.stdin.isatty() and sys.stdout.isatty()

    async def go(loops: Loops) -> int:
        if plan is None:
            record = await loops.start(ref, options)
        else:
            record = await start_remote_loop(loops.daemon, plan, options,
                                             install_agents=install_agents, on_notice=_notice)
        where = f" on {plan.remote.name}" if plan is not None else ""
        click.echo(
            f"[ralph-uv] loop {record.loop_id} started{where}: task {record.task_name} with "
            f"{record.agent} (max {record.max_iterations} iterations)",
            err=True,
        )
        if detach:
            click.echo(f"[ralph-uv] attach to it with: ralph-uv attach {record.task_name}",
                       err=True)
            return 0
        if attachable:
            return report_attach(await attach_loop(loops, record.loop_id))
        return await _follow(loops, record.loop_id)

    try:
        return with_loops(go, remote=plan.remote.name if plan is not None else None)
    except KeyboardInterrupt:
        click.echo(
            f"\n[ralph-uv] the loop goes on; stop it with `ralph-uv stop {ref.name}`", err=True
        )
        return 130


async def _follow(loops: Loops, loop_id: str) -> int:
    """Copy the loop's output to stdout until it ends; its exit status."""
    out = sys.stdout.buffer
    finished: LoopEvent | None = None
    async for item in loops.logs(loop_id, follow=True):
        if isinstance(item, bytes):
            out.write(item)
            out.flush()
        elif item.type == "loop_finished":
            finished = item
    if finished is None:
        click.echo("\n[ralph-uv] the connection to the loop ended before the loop did", err=True)
        return 1
    status = str(finished.data.get("status"))
    click.echo(f"\r\n[ralph-uv] loop {status}: {finished.data.get('reason') or ''}", err=True)
    try:
        return EXIT_STATUS.get(LoopStatus(status), 1)
    except ValueError:
        return 1
