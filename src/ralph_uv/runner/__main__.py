"""The runner process: one loop, served on its own socket.

    python -m ralph_uv.runner --spec <loop_dir>/spec.json [--linger 3] [--backend pty|tmux]

ralphd starts it detached (its own session, stdin ``/dev/null``, stdout and stderr appended to
``<loop_dir>/runner.log``), so it outlives a restart of ralphd. It reads the spec, the
configuration (``config.toml`` < ``RALPH_*`` < the spec's overrides) and the ``<config>/env``
file (agents' keys, passed to the agent only), runs the loop with its service on
``paths().loop_socket(loop_id)``, and when the loop has ended serves a little longer (``--linger``
seconds, or until no client is connected) so that watchers receive the end.

Signals: the first SIGTERM or SIGINT checkpoints the loop (the running iteration finishes), a
second one stops it now (the agent is terminated); during the linger either ends it at once.

Exit status: 0 when the loop ran and ended (whatever its status), 1 when it could not start or
the runner failed, 2 when the spec or the configuration is unusable. On every way out the agent
is terminated and the socket removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import resource
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from ralph_uv.agents import get_backend
from ralph_uv.config import Config, Paths, load_config, load_env_file, paths
from ralph_uv.errors import RalphError
from ralph_uv.runner.engine import StopWhen
from ralph_uv.runner.host import LoopHost
from ralph_uv.runner.http_info import publishing_backends
from ralph_uv.runner.origin import OriginPusher
from ralph_uv.runner.service import LoopService
from ralph_uv.runner.spec import RunnerSpec, read_spec
from ralph_uv.runner.terminal import TERMINAL_BACKENDS
from ralph_uv.status import LoopStatus

__all__ = ["DEFAULT_LINGER", "LOG_NAME", "main", "run_runner"]

log = logging.getLogger("ralph_uv.runner")

DEFAULT_LINGER = 3.0
LOG_NAME = "runner.log"
_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(loop_id)s] %(message)s"
_WANTED_FILES = 4096  # sockets for many watchers


class _LoopIdFilter(logging.Filter):
    """Stamps every record with the loop id, so every module's lines say which loop."""

    def __init__(self, loop_id: str) -> None:
        super().__init__()
        self.loop_id = loop_id

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "loop_id"):
            record.loop_id = self.loop_id
        return True


def _configure_logging(loop_id: str, loop_dir: Path | None) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handlers: list[logging.Handler] = []
    if loop_dir is not None:
        try:
            loop_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            handlers.append(logging.FileHandler(loop_dir / LOG_NAME, encoding="utf-8"))
        except OSError:
            pass  # no folder to log in: stderr below is all there is
    # stderr is runner.log itself when ralphd started us; a person running us by hand sees it.
    if not handlers or sys.stderr.isatty():
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        handler.addFilter(_LoopIdFilter(loop_id))
        root.addHandler(handler)


def _raise_file_limit() -> None:
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = _WANTED_FILES if hard == resource.RLIM_INFINITY else min(hard, _WANTED_FILES)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _record_failed_start(host: LoopHost, reason: str) -> None:
    """A loop that never ran still ends its journal the way every loop does."""
    if host.engine.status != LoopStatus.STARTING:
        return
    with contextlib.suppress(RalphError):
        record = host.registry.get(host.engine.spec.loop_id)
        if record is not None and not record.status.is_terminal:
            host.registry.update(
                record.loop_id, status=LoopStatus.FAILED.value, reason=reason
            )
        host.journal.append_event("error", {"message": reason})
        host.journal.append_event(
            "loop_finished",
            {
                "status": LoopStatus.FAILED.value,
                "reason": reason,
                "iterations": 0,
                "stories_done": host.engine.stories_done,
                "stories_total": host.engine.stories_total,
            },
        )


async def run_runner(
    spec: RunnerSpec,
    config: Config,
    *,
    env: dict[str, str] | None = None,
    dirs: Paths | None = None,
    linger: float = DEFAULT_LINGER,
) -> int:
    """Run ``spec``'s loop with its service until the loop has ended and the linger is over;
    return the process exit status."""
    adapter = logging.LoggerAdapter(log, {"loop_id": spec.loop_id})
    loop_dir = (dirs or paths()).loop_dir(spec.loop_id)
    # An opencode server is published in http.json for `opencode attach` through ralphd.
    host = LoopHost(spec.loop_spec(env), config, dirs=dirs,
                    backend_factory=publishing_backends(loop_dir, get_backend))
    service = LoopService(host)
    engine = host.engine
    if spec.push_every is not None:
        engine.after_iteration = OriginPusher(spec.push_every)
    loop = asyncio.get_running_loop()
    done_lingering = asyncio.Event()
    engine_task: asyncio.Task[object] | None = None
    received = 0

    def on_signal(name: str) -> None:
        nonlocal received
        received += 1
        if engine_task is None or engine_task.done():
            adapter.info("%s: ending now", name)
            done_lingering.set()
        elif received == 1:
            adapter.info("%s: checkpointing (send it again to stop now)", name)
            engine.request_checkpoint()
        else:
            adapter.info("%s: stopping now", name)
            engine.request_stop(StopWhen.NOW)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    code = 0
    try:
        await service.start()
        adapter.info("running %s with %s in %s", spec.task_name, spec.agent, spec.task_dir)
        engine_task = asyncio.create_task(host.run(), name=f"loop {spec.loop_id}")
        try:
            outcome = await engine_task
        except RalphError as exc:
            adapter.error("the loop could not start: %s", exc.message)
            _record_failed_start(host, exc.message)
            code = 1
        else:
            adapter.info("loop ended: %s (%s)", outcome.status.value, outcome.reason)
        lingering = asyncio.create_task(service.wait_idle(linger))
        interrupted = asyncio.create_task(done_lingering.wait())
        await asyncio.wait({lingering, interrupted}, return_when=asyncio.FIRST_COMPLETED)
        for task in (lingering, interrupted):
            task.cancel()
    except Exception as exc:
        adapter.exception("the runner failed")
        _record_failed_start(host, f"the runner failed: {exc}")
        code = 1
    finally:
        if engine_task is not None and not engine_task.done():
            # Cancelling the engine terminates the agent and records the end of the loop.
            engine_task.cancel()
            await asyncio.gather(engine_task, return_exceptions=True)
        await service.close()
        host.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        adapter.info("runner exits with status %d", code)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m ralph_uv.runner``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m ralph_uv.runner", description="Run one Ralph loop and serve it."
    )
    parser.add_argument("--spec", required=True, type=Path, help="the loop's spec.json")
    parser.add_argument(
        "--linger", type=float, default=DEFAULT_LINGER,
        help="seconds to keep serving after the loop ends (default %(default)s)",
    )
    parser.add_argument(
        "--backend", choices=TERMINAL_BACKENDS, default=None,
        help="where a terminal-based agent runs (default: the spec's backend, else pty)",
    )
    args = parser.parse_args(argv)
    dirs = paths()
    try:
        spec = read_spec(args.spec)
        if args.backend is not None:
            spec = dataclasses.replace(spec, backend=args.backend)
    except RalphError as exc:
        _configure_logging("?", None)
        log.error("cannot start: %s", exc.message)
        return 2
    _configure_logging(spec.loop_id, dirs.loop_dir(spec.loop_id))
    try:
        config = spec.apply(load_config())
        env = load_env_file(dirs.env_file)
    except RalphError as exc:
        log.error("cannot start: %s", exc.message)
        return 2
    _raise_file_limit()
    try:
        return asyncio.run(run_runner(spec, config, env=env, dirs=dirs, linger=args.linger))
    except RalphError as exc:  # the journal or the registry could not be opened
        log.error("cannot start: %s", exc.message)
        return 1
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    sys.exit(main())
