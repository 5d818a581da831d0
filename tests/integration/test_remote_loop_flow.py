"""A remote loop from start to end against a real ralphd in its own RALPH_HOME (standing in for
the remote machine, reached over its Unix socket): the local branch is bundled over, the loop
runs in a checkout of the workspace with a scripted agent that really commits, and its branch
comes back into the local repository without touching local work. Also origin mode (pushes
every N iterations, a refused push only reported), and the clean-up of finished checkouts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import async_wait_until
from tests.integration.daemon_harness import Ralphd, git, kill_runners, make_task, write_config

from ralph_uv.client.daemon import DaemonClient, connect_daemon
from ralph_uv.client.sync import pull_loop_branch, push_branch_bundle, sync_from_origin
from ralph_uv.config import paths
from ralph_uv.errors import ErrorCode, RemoteError
from ralph_uv.registry import Registry

pytestmark = pytest.mark.timeout(180)

StartDaemon = Callable[..., Ralphd]


@pytest.fixture
def start_ralphd(monkeypatch: pytest.MonkeyPatch) -> Iterator[StartDaemon]:
    """Start ralphd (the agent commits with the identity set here); stopped at the end."""
    for key, value in (("GIT_AUTHOR_NAME", "Agent"), ("GIT_COMMITTER_NAME", "Agent"),
                       ("GIT_AUTHOR_EMAIL", "agent@example.com"),
                       ("GIT_COMMITTER_EMAIL", "agent@example.com")):
        monkeypatch.setenv(key, value)
    started: list[Ralphd] = []

    def start(**daemon: Any) -> Ralphd:
        write_config({"min_free_space": 1, "allow_local_origins": True, **daemon})
        started.append(Ralphd().start())
        return started[-1]

    yield start
    for daemon in started:
        daemon.stop()
    kill_runners()


@pytest.fixture
async def client(start_ralphd: StartDaemon) -> AsyncIterator[DaemonClient]:
    start_ralphd()
    async with await connect_daemon(autostart=False, client="test") as daemon:
        yield daemon


async def run_remote_loop(client: DaemonClient, project: str, branch: str,
                          **extra: Any) -> dict[str, Any]:
    """start_loop in the workspace with the committing agent; the record once it has ended."""
    options: dict[str, Any] = {"max_iterations": 1, **extra}
    started = await client.start_loop(project=project, branch=branch, task_path="tasks/demo",
                                      agent="work", pause=0, **options)
    loop_id = started.loop_id

    def ended() -> bool:
        with Registry.open() as registry:
            row = registry.get(loop_id)
        return row is not None and row.status.is_terminal

    await async_wait_until(ended, timeout=60)
    with Registry.open() as registry:
        row = registry.get(loop_id)
    assert row is not None
    return row.to_dict()


def loop_events(loop_id: str) -> list[dict[str, Any]]:
    path = paths().loop_dir(loop_id) / "events.ndjson"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_bundle_sync_loop_and_pull_back(client: DaemonClient, tmp_path: Path) -> None:
    """Three loops, one story each, on a local repository's task:

    1. main is bundled over; the loop runs in checkouts/demo-<id> and commits US-001 on the
       prd's branch ralph/demo; pulling creates the local branch without touching the work
       tree (still on main, clean).
    2. With ralph/demo checked out and clean locally, the next loop's commit is pulled and
       fast-forwards it (US-002.txt appears).
    3. With a local uncommitted change, the pulled commit lands only in ralph/ralph/demo; the
       local branch and the change are left alone and the notice says how to merge.
    """
    repo = make_task(tmp_path, stories=3).parent.parent
    await push_branch_bundle(client, repo, "app", "main", None)
    first = await run_remote_loop(client, "app", "main")
    assert first["status"] == "exhausted"
    checkout = paths().workspaces / "app" / "checkouts" / f"demo-{first['loop_id']}"
    assert first["task_dir"] == str(checkout / "tasks" / "demo")
    assert first["branch"] == "ralph/demo"
    notices: list[str] = []
    branch, sha = await pull_loop_branch(client, repo, first["loop_id"], on_notice=notices.append)
    assert branch == "ralph/demo"
    assert git(repo, "rev-parse", "refs/heads/ralph/demo") == sha
    assert git(repo, "log", "-1", "--format=%s", "ralph/demo") == "US-001: implemented"
    assert git(repo, "show", "ralph/demo:US-001.txt") == "implemented US-001"
    assert git(repo, "branch", "--show-current") == "main"
    assert not (repo / "US-001.txt").exists()
    assert git(repo, "status", "--porcelain") == ""
    assert notices == [f"created branch ralph/demo at {sha[:12]}"]

    git(repo, "switch", "-q", "ralph/demo")
    assert await push_branch_bundle(client, repo, "app", "ralph/demo", None) == sha
    second = await run_remote_loop(client, "app", "ralph/demo")
    branch, sha2 = await pull_loop_branch(client, repo, second["loop_id"],
                                          on_notice=notices.append)
    assert git(repo, "rev-parse", "HEAD") == sha2
    assert (repo / "US-002.txt").read_text() == "implemented US-002\n"
    assert notices[-1].startswith("fast-forwarded ralph/demo (checked out in")
    # The first loop's checkout was detached to hand the branch over, its files untouched.
    assert git(checkout, "branch", "--show-current") == ""
    assert (checkout / "US-001.txt").exists()

    (repo / "README.local").write_text("mine\n")
    git(repo, "add", "README.local")
    third = await run_remote_loop(client, "app", "ralph/demo")
    branch, sha3 = await pull_loop_branch(client, repo, third["loop_id"],
                                          on_notice=notices.append)
    assert git(repo, "rev-parse", "HEAD") == sha2
    assert git(repo, "rev-parse", "refs/remotes/ralph/ralph/demo") == sha3
    assert git(repo, "status", "--porcelain") == "A  README.local"
    assert "uncommitted changes" in notices[-1]
    assert "git merge --ff-only ralph/ralph/demo" in notices[-1]
    prd = json.loads(git(repo, "show", "ralph/ralph/demo:tasks/demo/prd.json"))
    assert all(story["passes"] for story in prd["userStories"])


async def test_start_loop_in_a_workspace_checks_before_running(
    client: DaemonClient, tmp_path: Path
) -> None:
    """A project never synced, a branch it lacks, a task path not on the branch and a bad
    task path are refused before anything runs, with their codes; no checkout is left
    behind and no loop is recorded."""
    repo = make_task(tmp_path).parent.parent
    base = {"project": "app", "branch": "main", "task_path": "tasks/demo", "agent": "work"}
    call = client.endpoint.call
    with pytest.raises(RemoteError) as never:
        await call("start_loop", base)
    assert never.value.wire_code == ErrorCode.BRANCH_NOT_FOUND
    assert "sync" in never.value.message
    await push_branch_bundle(client, repo, "app", "main", None)
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({**base, "branch": "nope"}, ErrorCode.BRANCH_NOT_FOUND, "sync it first"),
        ({**base, "task_path": "tasks/other"}, ErrorCode.INVALID_PARAMS, "commit the task"),
        ({**base, "task_path": "../x"}, ErrorCode.INVALID_NAME, "task path"),
        ({**base, "push_every": 2}, ErrorCode.INVALID_PARAMS, "origin"),
        ({**base, "sync": "origin"}, ErrorCode.INVALID_PARAMS, "no origin"),
        ({**base, "agent": "nosuch"}, ErrorCode.AGENT_NOT_FOUND, "unknown agent"),
        ({"project": "app", "branch": "main"}, ErrorCode.INVALID_PARAMS, "task_path"),
    ]
    for params, code, words in cases:
        with pytest.raises(RemoteError) as caught:
            await call("start_loop", params)
        assert caught.value.wire_code == code, params
        assert words in caught.value.message, caught.value.message
    checkouts = paths().workspaces / "app" / "checkouts"
    assert not checkouts.exists() or not any(checkouts.iterdir())
    assert await client.list_loops(all=True) == []
    assert git(paths().workspaces / "app" / "bare.git", "worktree", "list").count("\n") == 0


async def test_origin_mode_pushes_and_survives_a_refused_push(
    client: DaemonClient, tmp_path: Path
) -> None:
    """In origin mode ralphd fetches the branch from the origin; with push_every = 1 the loop's
    branch reaches the origin after its iteration. When the origin refuses pushes, the loop
    still completes its story and the refusal is an `error` event in the loop's journal."""
    repo = make_task(tmp_path, stories=2).parent.parent
    origin = tmp_path / "origin.git"
    git(tmp_path, "clone", "-q", "--bare", str(repo), str(origin))
    url = f"file://{origin}"
    await sync_from_origin(client, "app", url, "main")
    first = await run_remote_loop(client, "app", "main", sync="origin", push_every=1)
    assert first["status"] == "exhausted"
    pushed = git(origin, "rev-parse", "refs/heads/ralph/demo")
    assert git(origin, "log", "-1", "--format=%s", pushed) == "US-001: implemented"
    assert not [e for e in loop_events(first["loop_id"]) if e["type"] == "error"]

    hook = origin / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'pushes are closed today' >&2\nexit 1\n")
    hook.chmod(0o755)
    second = await run_remote_loop(client, "app", "ralph/demo", sync="origin", push_every=1)
    assert second["status"] == "completed"
    errors = [e["data"] for e in loop_events(second["loop_id"]) if e["type"] == "error"]
    assert errors
    assert all(e.get("push") for e in errors)
    assert "pushes are closed today" in errors[0]["message"]
    assert "the loop goes on" in errors[0]["message"]
    assert git(origin, "rev-parse", "refs/heads/ralph/demo") == pushed


async def test_finished_checkouts_are_cleaned_up_and_the_branch_stays(
    start_ralphd: StartDaemon, tmp_path: Path
) -> None:
    """With checkout_retention "after_days = 0", a restarted ralphd removes a finished loop's
    checkout (its only change is the loop's progress.txt summary) but keeps one with a file the
    person left there; get_prd and pull_bundle still work from the workspace's branch (which
a later loop has moved on), and get_progress says the progress log went with the checkout."""
    daemon = start_ralphd(checkout_retention="after_days = 0")
    repo = make_task(tmp_path, stories=2).parent.parent
    async with await connect_daemon(autostart=False, client="test") as client:
        await push_branch_bundle(client, repo, "app", "main", None)
        done = await run_remote_loop(client, "app", "main")
        kept = await run_remote_loop(client, "app", "ralph/demo")
    done_dir = Path(done["task_dir"]).parent.parent
    kept_dir = Path(kept["task_dir"]).parent.parent
    assert (done_dir / "tasks" / "demo" / "progress.txt").exists()
    (kept_dir / "notes-for-later.txt").write_text("do not lose me\n")
    daemon.stop()
    start_ralphd(checkout_retention="after_days = 0")
    await async_wait_until(lambda: not done_dir.exists(), timeout=30)
    assert (kept_dir / "notes-for-later.txt").read_text() == "do not lose me\n"
    async with await connect_daemon(autostart=False, client="test") as client:
        prd = await client.endpoint.call("get_prd", {"loop": done["loop_id"]})
        assert prd["userStories"][0]["passes"] is True
        # progress.txt was never committed (the loop's summary was its only change): gone.
        with pytest.raises(RemoteError) as caught:
            await client.get_progress(done["loop_id"])
        gone = caught.value
        assert gone.wire_code == ErrorCode.BAD_STATE
        assert "checkout was cleaned up" in gone.message
        branch, sha = await pull_loop_branch(client, repo, done["loop_id"])
    assert branch == "ralph/demo"
    # The branch as it is now: the later loop's commit on top of this loop's.
    assert git(repo, "log", "--format=%s", sha).splitlines()[:2] == [
        "US-002: implemented", "US-001: implemented"]


async def test_push_every_n_iterations(client: DaemonClient, tmp_path: Path) -> None:
    """push_every = 2 over three iterations pushes after the second and once more at the end:
    the origin's branch moves twice (its reflog says so) and ends at the loop's last commit."""
    repo = make_task(tmp_path, stories=3).parent.parent
    origin = tmp_path / "origin.git"
    git(tmp_path, "clone", "-q", "--bare", str(repo), str(origin))
    git(origin, "config", "core.logAllRefUpdates", "always")
    await sync_from_origin(client, "app", f"file://{origin}", "main")
    record = await run_remote_loop(client, "app", "main", sync="origin", push_every=2,
                                   max_iterations=3)
    assert record["status"] == "completed"
    moves = git(origin, "reflog", "show", "--format=%H", "refs/heads/ralph/demo").splitlines()
    assert len(moves) == 2
    assert git(origin, "log", "-1", "--format=%s", "ralph/demo") == "US-003: implemented"
    assert git(origin, "log", "-1", "--format=%s", moves[1]) == "US-002: implemented"


async def test_the_same_task_runs_again_from_main_after_a_finished_loop(
    client: DaemonClient, tmp_path: Path
) -> None:
    """Starting the same task again from main, after an earlier remote loop of it finished on
    the prd's branch, works: the finished loop's checkout hands the branch over (it is detached,
    its files untouched) and the second loop goes on from the first one's commit."""
    repo = make_task(tmp_path, stories=2).parent.parent
    await push_branch_bundle(client, repo, "app", "main", None)
    first = await run_remote_loop(client, "app", "main")
    assert first["status"] == "exhausted"
    second = await run_remote_loop(client, "app", "main")
    assert second["status"] == "completed", second["reason"]
    first_checkout = Path(first["task_dir"]).parent.parent
    assert git(first_checkout, "branch", "--show-current") == ""
    assert (first_checkout / "US-001.txt").exists()
