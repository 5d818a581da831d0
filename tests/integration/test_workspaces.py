"""Workspaces for remote loops with real git: bare repositories fed by bundles and origins,
worktree checkouts per loop, branch hand-over between loops, and the clean-up policy that never
removes work."""

from __future__ import annotations

import dataclasses
import os
import stat
import time
from pathlib import Path

import pytest
from tests.integration.daemon_harness import git, make_task

from ralph_uv.config import paths
from ralph_uv.daemon.config import DaemonConfig
from ralph_uv.daemon.workspaces import (
    Checkout,
    CheckoutState,
    Workspaces,
    read_checkout,
    write_checkout,
)
from ralph_uv.errors import ErrorCode, GitError, RalphError, UserError

DAY = 86400.0


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A client repository with a committed task on main."""
    return make_task(tmp_path).parent.parent


@pytest.fixture
def spaces() -> Workspaces:
    return Workspaces(paths().workspaces, DaemonConfig(min_free_space=1, allow_local_origins=True))


def bundle(repo: Path, dest: Path, *revs: str) -> Path:
    git(repo, "bundle", "create", "--quiet", str(dest), *revs)
    return dest


def commit(repo: Path, name: str) -> str:
    (repo / name).write_text(f"{name}\n")
    git(repo, "add", name)
    git(repo, "commit", "-qm", name)
    return git(repo, "rev-parse", "HEAD")


def receive(spaces: Workspaces, path: Path, branch: str = "main", *, force: bool = False,
            origin: str | None = None, active: list[Path] | None = None) -> str:
    return spaces.receive_bundle("app", path, branch, origin=origin, force=force,
                                 active=active or [])


def test_bundles_create_and_move_the_branch_forward(
    spaces: Workspaces, repo: Path, tmp_path: Path
) -> None:
    """A full bundle creates bare.git and its branch; an incremental bundle (built against
    what refs() lists) fast-forwards it; refs() reports the new tip."""
    first = git(repo, "rev-parse", "HEAD")
    assert receive(spaces, bundle(repo, tmp_path / "a.bundle", "refs/heads/main")) == first
    assert spaces.refs("app") == {"refs/heads/main": first}
    second = commit(repo, "two.txt")
    incremental = bundle(repo, tmp_path / "b.bundle", "refs/heads/main", f"^{first}")
    assert receive(spaces, incremental) == second
    assert spaces.branch_sha("app", "main") == second
    assert stat.S_IMODE(spaces.project_dir("app").stat().st_mode) == 0o700


def test_a_branch_never_moves_back_or_sideways_without_force(
    spaces: Workspaces, repo: Path, tmp_path: Path
) -> None:
    """When the workspace's branch holds commits the upload lacks (a loop's work), the upload
    is refused with BAD_STATE and the branch keeps them; an older upload leaves the newer
    branch alone; force replaces it."""
    base = git(repo, "rev-parse", "HEAD")
    receive(spaces, bundle(repo, tmp_path / "a.bundle", "refs/heads/main"))
    ahead = commit(repo, "ahead.txt")
    receive(spaces, bundle(repo, tmp_path / "b.bundle", "refs/heads/main", f"^{base}"))
    git(repo, "reset", "-q", "--hard", base)
    other = commit(repo, "other.txt")
    sideways = bundle(repo, tmp_path / "c.bundle", "refs/heads/main", f"^{base}")
    with pytest.raises(RalphError) as caught:
        receive(spaces, sideways)
    assert caught.value.code == ErrorCode.BAD_STATE
    assert "ralph-uv pull" in caught.value.message
    assert spaces.branch_sha("app", "main") == ahead
    git(repo, "reset", "-q", "--hard", base)
    assert receive(spaces, bundle(repo, tmp_path / "d.bundle", "refs/heads/main")) == ahead
    git(repo, "reset", "-q", "--hard", other)
    assert receive(spaces, sideways, force=True) == other


def test_bad_bundles_are_refused(spaces: Workspaces, repo: Path, tmp_path: Path) -> None:
    """A file that is no bundle, a bundle without the named branch, and a bundle needing
    commits the workspace lacks are refused, each saying what to send instead."""
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"not a bundle")
    with pytest.raises(UserError, match="not a git bundle"):
        receive(spaces, junk)
    with pytest.raises(UserError, match="no refs/heads/other"):
        receive(spaces, bundle(repo, tmp_path / "a.bundle", "refs/heads/main"), "other")
    base = git(repo, "rev-parse", "HEAD")
    commit(repo, "two.txt")
    thin = bundle(repo, tmp_path / "thin.bundle", "refs/heads/main", f"^{base}")
    with pytest.raises(GitError, match="sync_refs") as caught:
        spaces.receive_bundle("fresh", thin, "main", origin=None, force=False, active=[])
    assert caught.value.code == ErrorCode.GIT_ERROR


def test_origin_is_recorded_and_checked(spaces: Workspaces, repo: Path, tmp_path: Path) -> None:
    """The first sync records the client's origin; a sync naming another origin is refused
    with ORIGIN_MISMATCH (and the message hides passwords); one naming none is accepted."""
    full = bundle(repo, tmp_path / "a.bundle", "refs/heads/main")
    receive(spaces, full, origin="https://example.com/org/app.git")
    assert spaces.origin("app") == "https://example.com/org/app.git"
    with pytest.raises(RalphError) as caught:
        receive(spaces, full, origin="https://me:pw@example.com/other.git")
    assert caught.value.code == ErrorCode.ORIGIN_MISMATCH
    assert "pw" not in caught.value.message
    assert "another" in caught.value.message
    receive(spaces, full)


def test_fetch_from_origin(spaces: Workspaces, repo: Path, tmp_path: Path) -> None:
    """sync_origin's fetch: the branch comes from the origin (a file:// origin, allowed by the
    test switch); a missing branch is BRANCH_NOT_FOUND; without the switch git itself refuses
    the file transport."""
    origin = tmp_path / "origin.git"
    git(tmp_path, "clone", "-q", "--bare", str(repo), str(origin))
    url = f"file://{origin}"
    sha = spaces.fetch_origin("app", url, "main", force=False, active=[])
    assert sha == git(repo, "rev-parse", "HEAD")
    assert spaces.origin("app") == url
    with pytest.raises(RalphError) as caught:
        spaces.fetch_origin("app", url, "nope", force=False, active=[])
    assert caught.value.code == ErrorCode.BRANCH_NOT_FOUND
    strict = Workspaces(spaces.root, DaemonConfig(min_free_space=1))
    with pytest.raises(GitError, match=r"not allowed|transport"):
        strict.fetch_origin("app", url, "main", force=False, active=[])


def test_checkouts_share_branches_safely(spaces: Workspaces, repo: Path, tmp_path: Path) -> None:
    """A checkout is a worktree on the branch; a second one on the same branch is refused
    while the first belongs to a running loop; once that loop has ended, its checkout is
    detached (files untouched) and the new one gets the branch. A branch the workspace does
    not have is BRANCH_NOT_FOUND."""
    receive(spaces, bundle(repo, tmp_path / "a.bundle", "refs/heads/main"))
    first = spaces.add_checkout("app", "main", "demo-one", [])
    assert (first / "tasks" / "demo" / "prd.json").is_file()
    assert git(first, "branch", "--show-current") == "main"
    with pytest.raises(RalphError) as caught:
        spaces.add_checkout("app", "main", "demo-two", [first])
    assert caught.value.code == ErrorCode.BAD_STATE
    assert "running loop" in caught.value.message
    (first / "scratch.txt").write_text("left behind\n")
    second = spaces.add_checkout("app", "main", "demo-two", [])
    assert git(second, "branch", "--show-current") == "main"
    assert git(first, "branch", "--show-current") == ""  # detached
    assert (first / "scratch.txt").read_text() == "left behind\n"
    with pytest.raises(RalphError) as missing:
        spaces.add_checkout("app", "nope", "demo-three", [])
    assert missing.value.code == ErrorCode.BRANCH_NOT_FOUND


def test_prune_forgets_vanished_checkouts(spaces: Workspaces, repo: Path, tmp_path: Path) -> None:
    """A checkout folder deleted by hand no longer holds its branch after prune."""
    receive(spaces, bundle(repo, tmp_path / "a.bundle", "refs/heads/main"))
    path = spaces.add_checkout("app", "main", "demo-one", [])
    git(path, "switch", "-q", "-c", "side")
    assert spaces.holders("app")["side"] == path
    for child in sorted(path.rglob("*"), reverse=True):
        child.unlink() if child.is_file() or child.is_symlink() else child.rmdir()
    path.rmdir()
    spaces.prune("app")
    assert "side" not in spaces.holders("app")


def test_free_space_is_checked(repo: Path, tmp_path: Path) -> None:
    """Less free space than min_free_space (or twice the bundle) is DISK_FULL, and the
    message says how much is needed."""
    greedy = Workspaces(paths().workspaces, DaemonConfig(min_free_space=1 << 60))
    with pytest.raises(RalphError) as caught:
        greedy.check_free_space(10)
    assert caught.value.code == ErrorCode.DISK_FULL
    assert "free" in caught.value.message
    modest = Workspaces(paths().workspaces, DaemonConfig(min_free_space=1))
    modest.check_free_space(1024)
    with pytest.raises(RalphError) as huge:
        modest.check_free_space(1 << 60)
    assert huge.value.code == ErrorCode.DISK_FULL


def test_bundles_for_pulling(spaces: Workspaces, repo: Path, tmp_path: Path) -> None:
    """create_bundle leaves out what the client has, says when there is nothing to send,
    and ignores commits it does not know."""
    base = git(repo, "rev-parse", "HEAD")
    receive(spaces, bundle(repo, tmp_path / "a.bundle", "refs/heads/main"))
    checkout = spaces.add_checkout("app", "main", "demo-one", [])
    tip = commit(checkout, "loop-work.txt")
    out = tmp_path / "pull.bundle"
    sha, written = spaces.create_bundle("app", "main", [base, "f" * 40, "junk"], out)
    assert (sha, written) == (tip, True)
    listed = git(repo, "bundle", "list-heads", str(out))
    assert listed == f"{tip} refs/heads/main"
    assert base in git(repo, "bundle", "verify", str(out))  # the prerequisite
    assert spaces.create_bundle("app", "main", [tip], tmp_path / "none.bundle") == (tip, False)


def test_checkout_record_round_trip(tmp_path: Path) -> None:
    """workspace.json is private (0600) and reads back as written; a folder without one is a
    loop on a task folder (None)."""
    record = Checkout("app", "main", tmp_path / "co", "tasks/demo", "origin", 3)
    write_checkout(tmp_path / "loop", record)
    assert stat.S_IMODE((tmp_path / "loop" / "workspace.json").stat().st_mode) == 0o600
    assert read_checkout(tmp_path / "loop") == record
    assert read_checkout(tmp_path / "other") is None


def _state(spaces: Workspaces, path: Path, *, active: bool = False,
           ended: float | None = None) -> CheckoutState:
    return CheckoutState(path, "app", "loop-1", active, ended, "tasks/demo")


def test_cleanup_removes_only_old_finished_checkouts_without_work(
    spaces: Workspaces, repo: Path, tmp_path: Path
) -> None:
    """With after_days = 7: an old finished clean checkout is removed (the loop's own
    progress.txt summary does not count as work); a recent one, a running one, one with an
    uncommitted change, one with an untracked file and one whose commit no branch holds are
    kept; with "keep", nothing is removed."""
    receive(spaces, bundle(repo, tmp_path / "a.bundle", "refs/heads/main"))
    now = time.time()
    old = now - 8 * DAY
    made = {}
    for name in ("clean", "progress", "recent", "running", "dirty", "untracked", "orphaned"):
        git(spaces.bare("app"), "branch", name, "main")
        made[name] = spaces.add_checkout("app", name, f"demo-{name}", [])
    (made["progress"] / "tasks" / "demo" / "progress.txt").write_text("[..] Iteration 1/3\n")
    (made["dirty"] / "tasks" / "demo" / "prd.json").write_text("{}\n")
    (made["untracked"] / "notes.txt").write_text("mine\n")
    git(made["orphaned"], "switch", "-q", "--detach")
    commit(made["orphaned"], "only-here.txt")
    states = [
        _state(spaces, made["clean"], ended=old),
        _state(spaces, made["progress"], ended=old),
        _state(spaces, made["recent"], ended=now - DAY),
        _state(spaces, made["running"], active=True, ended=old),
        _state(spaces, made["dirty"], ended=old),
        _state(spaces, made["untracked"], ended=old),
        _state(spaces, made["orphaned"], ended=old),
    ]
    keep = Workspaces(spaces.root, dataclasses.replace(spaces.settings,
                                                       checkout_retention_days=None))
    assert keep.clean(states, now) == []
    assert "uncommitted" in (spaces.keeps_work(states[4]) or "")
    assert "on no branch" in (spaces.keeps_work(states[6]) or "")
    removed = spaces.clean(states, now)
    assert removed == [made["clean"], made["progress"]]
    assert not made["clean"].exists()
    assert not made["progress"].exists()
    for name in ("recent", "running", "dirty", "untracked", "orphaned"):
        assert made[name].is_dir(), name
    assert spaces.branch_sha("app", "clean") is not None  # the branch and its commits stay


def test_cleanup_of_an_unclaimed_checkout_uses_its_age(
    spaces: Workspaces, repo: Path, tmp_path: Path
) -> None:
    """A checkout no loop claims is judged by its folder's age."""
    receive(spaces, bundle(repo, tmp_path / "a.bundle", "refs/heads/main"))
    path = spaces.add_checkout("app", "main", "stray-abc123", [])
    state = CheckoutState(path, "app", None, False, None, None)
    assert spaces.clean([state]) == []
    old = time.time() - 30 * DAY
    os.utime(path, (old, old))
    assert spaces.clean([state]) == [path]
