"""``opencode serve`` as the opencode backend runs it: the real CLI on loopback, its password,
its health wait, and that stopping it leaves no process behind."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from tests.helpers import async_wait_until

from ralph_uv.agents.detect import find_binary
from ralph_uv.agents.opencode import OpenCodeBackend
from ralph_uv.agents.opencode_server import SERVER_LOG, OpenCodeServerError, basic_auth
from ralph_uv.demo.offline import private_home_env
from ralph_uv.errors import ErrorCode


def _state(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of a process, None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[2])


def _group_alive(pgid: int) -> bool:
    """Whether any live (not zombie) process is in group ``pgid``."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            found = _state(int(entry.name))
            if found is not None and found[1] == pgid and found[0] not in "ZX":
                return True
    return False


def isolated_env(root: Path) -> dict[str, str]:
    """A home and XDG folders of its own, and no fetching of model lists from the internet."""
    return private_home_env(root / "home")


@pytest.fixture
def opencode_binary() -> Path:
    found = find_binary("opencode")
    if found is None:
        pytest.skip("the opencode CLI is not installed (make agents)")
    return found


@pytest.fixture
async def backend(tmp_path: Path, opencode_binary: Path) -> AsyncIterator[OpenCodeBackend]:
    backend = OpenCodeBackend(command=[str(opencode_binary)], env=isolated_env(tmp_path))
    try:
        yield backend
    finally:
        await backend.aclose()


async def test_server_starts_on_loopback_and_requires_the_password(
    backend: OpenCodeBackend, tmp_path: Path
) -> None:
    """The real server becomes healthy on 127.0.0.1; requests without the password or with a
    wrong one are refused with 401, the right one is accepted; the password is in neither the
    command line nor the server's log."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    server = await backend.start_server(workdir, tmp_path / "loop")
    url = backend.server_url
    assert url is not None
    assert url.startswith("http://127.0.0.1:")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/global/health") as resp:
            assert resp.status == 401
        wrong = {"Authorization": basic_auth(backend.password + "x")}
        async with http.get(f"{url}/session", headers=wrong) as resp:
            assert resp.status == 401
        right = {"Authorization": basic_auth(backend.password)}
        async with http.get(f"{url}/global/health", headers=right) as resp:
            assert resp.status == 200
            assert (await resp.json())["healthy"] is True
    assert server.pid is not None
    cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()  # noqa: ASYNC240
    assert b"serve" in cmdline
    assert backend.password.encode() not in cmdline
    log_text = (tmp_path / "loop" / SERVER_LOG).read_bytes()
    assert b"opencode server listening on" in log_text
    assert backend.password.encode() not in log_text


async def test_server_is_reused_and_runs_in_the_working_directory(
    backend: OpenCodeBackend, tmp_path: Path
) -> None:
    """A second start_server returns the same running process, whose cwd is the loop's."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    first = await backend.start_server(workdir, tmp_path / "loop")
    second = await backend.start_server(workdir, tmp_path / "loop")
    assert first is second
    assert first.pid is not None
    assert Path(f"/proc/{first.pid}/cwd").resolve() == workdir.resolve()  # noqa: ASYNC240


async def test_aclose_leaves_no_process_behind(backend: OpenCodeBackend, tmp_path: Path) -> None:
    """After aclose() the server's whole process group is gone and the URL is withdrawn."""
    server = await backend.start_server(tmp_path, tmp_path / "loop")
    pgid = server.pid
    assert pgid is not None
    assert os.getpgid(pgid) == pgid  # a group of its own, so stopping it takes its children
    assert _group_alive(pgid)
    await backend.aclose()
    assert not _group_alive(pgid)
    assert backend.server_url is None


async def test_server_that_never_answers_times_out_with_a_clear_error(tmp_path: Path) -> None:
    """A server that never reports a port fails the start after ``startup_timeout`` with an
    error naming the timeout and the log file; the process is stopped, not left running."""
    sleeper = [sys.executable, "-c", "import time; print('starting up', flush=True); "
               "time.sleep(60)"]
    backend = OpenCodeBackend(command=sleeper, startup_timeout=1.0)
    with pytest.raises(OpenCodeServerError) as caught:
        await backend.start_server(tmp_path, tmp_path / "loop")
    message = str(caught.value)
    log_path = tmp_path / "loop" / SERVER_LOG
    assert "did not become ready within 1s" in message
    assert str(log_path) in message
    assert "starting up" in message  # the end of the log, so the reason is visible at once
    assert caught.value.code == ErrorCode.TIMEOUT
    server = backend.server
    assert server is not None
    assert server.pid is not None
    await async_wait_until(lambda: not _group_alive(server.pid or 0), timeout=10)
    await backend.aclose()


async def test_server_that_exits_early_reports_its_status_and_log(tmp_path: Path) -> None:
    """A server that exits before it is ready fails the start at once with its exit status,
    the log's path and the log's last words."""
    failing = [sys.executable, "-c", "import sys; print('bad config: nope', file=sys.stderr); "
               "sys.exit(3)"]
    backend = OpenCodeBackend(command=failing, startup_timeout=30.0)
    with pytest.raises(OpenCodeServerError, match="exited with status 3") as caught:
        await backend.start_server(tmp_path, tmp_path / "loop")
    assert str(tmp_path / "loop" / SERVER_LOG) in str(caught.value)
    assert "bad config: nope" in str(caught.value)
    await backend.aclose()


async def test_stopping_kills_the_children_of_the_server(tmp_path: Path) -> None:
    """A server that ignores TERM and has started a child of its own is still stopped whole:
    after the grace period the group gets KILL, child included."""
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(f'child {child.pid}', flush=True)\n"
        "print('opencode server listening on http://127.0.0.1:9', flush=True)\n"
        "time.sleep(60)\n"
    )
    backend = OpenCodeBackend(command=[sys.executable, "-c", script], startup_timeout=2.0)
    # Nothing answers health checks on port 9, so the start fails and stops the server.
    with pytest.raises(OpenCodeServerError):
        await backend.start_server(tmp_path, tmp_path / "loop")
    server = backend.server
    assert server is not None
    assert server.pid is not None
    assert not _group_alive(server.pid)
    log_text = (tmp_path / "loop" / SERVER_LOG).read_text()
    child_pid = int(log_text.split("child ", 1)[1].split()[0])
    await async_wait_until(lambda: (_state(child_pid) or ("X", 0))[0] in "ZX", timeout=10)
    await backend.aclose()
