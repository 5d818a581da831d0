"""``ralph-uv run TASK --on REMOTE`` and ``ralph-uv pull TASK``: a loop on another machine.

:func:`plan_remote_run` checks everything that can be checked here before anything runs or is
sent: the remote's name, the task and its prd.json, the branch to send and the prd's branch
(git's branch-name rules), the task's folder inside the repository, and the origin URL (only
``ssh://``, ``https://``, ``git://`` and ``user@host:path``; ``ext::`` and other helpers,
local paths and option-looking values are refused). :func:`start_remote_loop` then sends the
code and starts the loop:

- ``bundle`` (default): the branch travels as an incremental git bundle over the remote's own
  connection (:func:`~ralph_uv.client.sync.push_branch_bundle`): nothing else is needed;
- ``origin``: the branch is pushed to the repository's ``origin`` here, and the remote fetches
  it from there (:func:`~ralph_uv.client.sync.sync_from_origin`); with ``push_every`` the
  remote pushes the loop's branch back to the origin every N iterations.

The loop runs in a fresh checkout on the remote (its first iteration is told to install the
project's dependencies), and its record is mirrored into this machine's registry.
:func:`pull_remote_loop` brings the loop's branch back into a local repository, also after the
loop has ended, without touching uncommitted work.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ralph_uv.client.daemon import DaemonClient
from ralph_uv.client.loops import RunOptions
from ralph_uv.client.mirror import mirror_records
from ralph_uv.client.remotes import get_remote
from ralph_uv.client.sync import (
    local_origin,
    pull_loop_branch,
    push_branch_bundle,
    sync_from_origin,
)
from ralph_uv.errors import ErrorCode, GitError, RalphError, UserError
from ralph_uv.git import current_branch, dirty_files, push, repo_root
from ralph_uv.prd import load_prd
from ralph_uv.registry import RemoteRecord, SessionRecord
from ralph_uv.tasks import TaskRef
from ralph_uv.validation import (
    display_url,
    validate_branch_name,
    validate_origin_url,
    validate_project_name,
    validate_task_name,
    validate_task_path,
)

__all__ = ["SYNC_MODES", "RemotePlan", "plan_remote_run", "pull_remote_loop",
           "start_remote_loop"]

log = logging.getLogger("ralph_uv.client.remote_run")

SyncMode = Literal["bundle", "origin"]
SYNC_MODES: tuple[SyncMode, ...] = ("bundle", "origin")
Notice = Callable[[str], None]
_START_TIMEOUT = 180.0
_INSTALL_TIMEOUT = 900.0  # npm installs the agents first
_GIT_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class RemotePlan:
    """A checked ``run --on``: what goes where (nothing has run yet)."""

    remote: RemoteRecord
    task: TaskRef
    repo_root: Path
    project: str  # the workspace on the remote
    branch: str  # the branch sent (the loop's checkout starts on it)
    loop_branch: str  # the prd's branchName, where the loop commits
    task_path: str  # the task folder, relative to the repository's top
    sync: SyncMode
    origin: str | None  # the origin URL sent along (bundle: only a network URL)
    push_every: int | None
    uncommitted: tuple[str, ...] = ()  # files changed here that the remote will not see


def _git_text(root: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=_GIT_TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise UserError("git is not installed; install git") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GitError(f"cannot run git {args[0]}: {exc}") from exc
    if done.returncode != 0:
        raise GitError(f"`git {' '.join(args)}` failed in {root}: "
                       f"{done.stderr.strip() or done.returncode}")
    return done.stdout.strip()


def project_name(root: Path) -> str:
    """The remote workspace of the repository at ``root``: its folder's name and the start of
    its first commit's id, so clones of one repository share a workspace and two different
    repositories with the same folder name do not."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", root.name).strip(".-")[:40] or "repo"
    roots = sorted(_git_text(root, "rev-list", "--max-parents=0", "HEAD").split())
    first = roots[0] if roots else hashlib.sha256(str(root).encode()).hexdigest()
    return validate_project_name(f"{stem}-{first[:8]}")


def _is_local_path(url: str) -> bool:
    return url.startswith("file:") or ("://" not in url and "::" not in url
                                        and not url.startswith("-") and "@" not in url)


def _origin_for(root: Path, sync: SyncMode) -> str | None:
    origin = local_origin(root)
    if sync == "origin":
        if origin is None:
            raise UserError(f"{root} has no `origin` remote to push to and fetch from; add one "
                            "(`git remote add origin URL`) or use --sync bundle")
        # The remote decides whether a file:// origin is allowed (tests only).
        return validate_origin_url(origin, allow_local=True)
    if origin is None:
        return None
    try:
        return validate_origin_url(origin)
    except UserError:
        if _is_local_path(origin):  # a path on this machine means nothing over there
            log.info("origin %s is local; the remote workspace records no origin",
                     display_url(origin))
            return None
        raise


def plan_remote_run(
    remote_name: str,
    task: TaskRef,
    *,
    sync: SyncMode = "bundle",
    base_branch: str | None = None,
    push_every: int | None = None,
) -> RemotePlan:
    """Check a ``run --on`` before anything runs (see the module docstring). Blocking."""
    remote = get_remote(remote_name)
    if sync not in SYNC_MODES:
        raise UserError(f"--sync {sync!r}: use bundle or origin")
    if push_every is not None and sync != "origin":
        raise UserError("--push-every pushes the loop's branch to the origin: it needs "
                        "--sync origin")
    if push_every is not None and push_every < 1:
        raise UserError("--push-every must be 1 or more iterations")
    name = validate_task_name(task.name)
    prd = load_prd(task.prd_file)  # a broken prd.json stops here, its problems listed
    loop_branch = validate_branch_name(prd.branch_name)
    root = repo_root(task.dir)
    if base_branch is not None:
        branch = validate_branch_name(base_branch)
    else:
        found = current_branch(root)
        if found is None:
            raise UserError(f"{root}: HEAD is not on a branch; check out the branch to send, "
                            "or name it with --base-branch")
        branch = validate_branch_name(found)
    try:
        _git_text(root, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}^{{commit}}")
    except GitError:
        raise RalphError(f"{root} has no branch {branch!r} with commits; commit the task "
                         "first, or name another branch with --base-branch",
                         code=ErrorCode.BRANCH_NOT_FOUND) from None
    relative = task.dir.resolve().relative_to(root) if task.dir.resolve() != root else Path(".")
    task_path = validate_task_path(relative.as_posix())
    origin = _origin_for(root, sync)
    changed = tuple(dirty_files(root, include_untracked=False))
    return RemotePlan(
        remote=remote, task=TaskRef(name, task.dir, root), repo_root=root,
        project=project_name(root), branch=branch, loop_branch=loop_branch,
        task_path=task_path, sync=sync, origin=origin, push_every=push_every,
        uncommitted=changed,
    )


async def start_remote_loop(
    daemon: DaemonClient,
    plan: RemotePlan,
    options: RunOptions,
    *,
    install_agents: bool = False,
    on_notice: Notice | None = None,
) -> SessionRecord:
    """Send the code (by ``plan.sync``), start the loop on the remote and mirror its record
    here; the remote's record (its ``loop_id`` is the remote's)."""
    say = on_notice or (lambda text: None)
    if plan.uncommitted:
        say(f"{len(plan.uncommitted)} file(s) have uncommitted changes; the remote gets the "
            f"last commit of {plan.branch} only")
    if plan.sync == "origin":
        assert plan.origin is not None
        say(f"pushing {plan.branch} to {display_url(plan.origin)}")
        await asyncio.to_thread(push, plan.repo_root, plan.branch)
        sha = await sync_from_origin(daemon, plan.project, plan.origin, plan.branch)
    else:
        sha = await push_branch_bundle(daemon, plan.repo_root, plan.project, plan.branch,
                                       plan.origin)
    say(f"{plan.remote.name} has {plan.branch} at {sha[:12]} (workspace {plan.project})")
    params: dict[str, Any] = {
        **{k: v for k, v in options.params().items() if k != "base_branch"},
        "project": plan.project, "branch": plan.branch, "task_path": plan.task_path,
        "task_name": plan.task.name, "sync": plan.sync, "first_run_setup": True,
        "install_agents": install_agents,
    }
    if plan.push_every is not None:
        params["push_every"] = plan.push_every
    reply = await daemon.endpoint.call(
        "start_loop", params, timeout=_INSTALL_TIMEOUT if install_agents else _START_TIMEOUT)
    if not isinstance(reply, dict):
        raise RalphError(f"{plan.remote.name} sent a loop record that is not an object")
    record = SessionRecord.from_dict(reply)
    await asyncio.to_thread(mirror_records, plan.remote, [record])
    return record


async def pull_remote_loop(daemon: DaemonClient, repo: Path, loop: str,
                           *, on_notice: Notice | None = None) -> tuple[str, str]:
    """Bring the branch of ``loop`` (the remote's id or task name) into the repository that
    holds ``repo``; ``(branch, sha)``. Uncommitted work here is never touched."""
    root = await asyncio.to_thread(repo_root, repo)
    return await pull_loop_branch(daemon, root, loop, on_notice=on_notice)
