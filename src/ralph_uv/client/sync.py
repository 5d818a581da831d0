"""The client side of code sync: send a branch to a remote ralphd, bring a loop's branch back.

:func:`push_branch_bundle` asks the remote what its workspace holds (``sync_refs``), builds an
incremental ``git bundle`` of the branch against it and streams it in chunks of at most 1 MiB
(``sync_upload``), so neither side holds a whole bundle in memory.

:func:`pull_loop_branch` fetches a loop's branch (``pull_bundle``) into the local repository
without ever touching uncommitted work: the commits always land in ``refs/remotes/ralph/<b>``,
and ``refs/heads/<b>`` is created, or moved forward when that is a fast-forward; a branch that
is checked out is fast-forwarded only when its work tree is clean, otherwise ``on_notice`` says
how to merge.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ralph_uv.client.daemon import DaemonClient
from ralph_uv.errors import ErrorCode, GitError, RalphError, UserError
from ralph_uv.rpc import Endpoint
from ralph_uv.validation import display_url, validate_branch_name, validate_project_name

__all__ = [
    "CHUNK_SIZE",
    "TRACKING_PREFIX",
    "local_origin",
    "pull_loop_branch",
    "push_branch_bundle",
    "sync_from_origin",
]

log = logging.getLogger("ralph_uv.client.sync")

CHUNK_SIZE = 1024 * 1024
TRACKING_PREFIX = "refs/remotes/ralph/"
_CALL_TIMEOUT = 120.0
_FINAL_TIMEOUT = 900.0  # the remote verifies and indexes the whole bundle
_MAX_HAVE = 1000

Client = DaemonClient | Endpoint
Notice = Callable[[str], None]


def _endpoint(client: Client) -> Endpoint:
    return client if isinstance(client, Endpoint) else client.endpoint


def _git(root: Path, *args: str, check: bool = True,
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", LC_ALL="C")
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], env=env, input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL, capture_output=True,
            text=True, errors="replace", timeout=600, check=False,
        )
    except FileNotFoundError as exc:
        raise UserError("git is not installed; install git") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GitError(f"cannot run git {args[0]}: {exc}") from exc
    if check and done.returncode != 0:
        words = done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}"
        raise GitError(f"`git {args[0]}` failed in {root}: {words[-1500:]}")
    return done


def _commit(root: Path, rev: str) -> str | None:
    done = _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    return done.stdout.strip() or None


def _is_ancestor(root: Path, ancestor: str, descendant: str) -> bool:
    return _git(root, "merge-base", "--is-ancestor", ancestor, descendant,
                check=False).returncode == 0


def local_origin(repo_root: Path) -> str | None:
    """The URL of the repository's ``origin`` remote, if it has one."""
    done = _git(repo_root, "remote", "get-url", "origin", check=False)
    return done.stdout.strip() or None


# ------------------------------------------------------------------------------------ push


def _prerequisites(root: Path, tip: str, remote_shas: list[str]) -> list[str]:
    """The remote's commits this repository has, minus those that already contain ``tip``
    (leaving those out keeps the bundle non-empty)."""
    wanted = list(dict.fromkeys(remote_shas))
    if not wanted:
        return []
    checked = _git(root, "cat-file", "--batch-check", check=False,
                   stdin="".join(f"{sha}\n" for sha in wanted))
    known = [f[0] for f in (line.split() for line in checked.stdout.splitlines())
             if len(f) >= 2 and f[1] == "commit"]
    return [sha for sha in known if not _is_ancestor(root, tip, sha)]


async def push_branch_bundle(
    client: Client, repo_root: Path, project: str, branch: str, origin: str | None,
    *, force: bool = False, chunk_size: int = CHUNK_SIZE,
) -> str:
    """Make ``branch`` of the remote workspace ``project`` what it is here; return its sha.

    Only what the workspace lacks travels. The remote refuses (``BAD_STATE``) to move its
    branch backwards or sideways (a loop's commits you have not pulled) unless ``force``.
    """
    validate_project_name(project)
    validate_branch_name(branch)
    if not 1 <= chunk_size <= CHUNK_SIZE:
        raise UserError(f"chunk_size must be from 1 to {CHUNK_SIZE} bytes")
    endpoint = _endpoint(client)
    tip = await asyncio.to_thread(_commit, repo_root, f"refs/heads/{branch}")
    if tip is None:
        raise RalphError(f"{repo_root} has no branch {branch!r}; create it or name another",
                         code=ErrorCode.BRANCH_NOT_FOUND)
    state = await endpoint.call("sync_refs", {"project": project}, timeout=_CALL_TIMEOUT)
    refs: dict[str, str] = dict(state.get("refs") or {}) if isinstance(state, dict) else {}
    recorded = state.get("origin") if isinstance(state, dict) else None
    if origin is not None and recorded and recorded != origin:
        raise RalphError(
            f"the remote workspace {project!r} holds {display_url(str(recorded))}, not "
            f"{display_url(origin)}; use another project name",
            code=ErrorCode.ORIGIN_MISMATCH,
        )
    if refs.get(f"refs/heads/{branch}") == tip:
        log.info("%s of %s is up to date on the remote", branch, project)
        return tip
    negatives = await asyncio.to_thread(_prerequisites, repo_root, tip, list(refs.values()))
    process = await asyncio.create_subprocess_exec(
        "git", "-C", str(repo_root), "bundle", "create", "--quiet", "-", f"refs/heads/{branch}",
        *(f"^{sha}" for sha in negatives),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=dict(os.environ, LC_ALL="C"),
    )
    assert process.stdout is not None
    assert process.stderr is not None
    errors = asyncio.create_task(process.stderr.read())
    params: dict[str, Any] = {"project": project, "branch": branch, "force": force}
    if origin is not None:
        params["origin"] = origin
    try:
        sha = await _stream_upload(endpoint, process.stdout, params, chunk_size)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        raise
    finally:
        await process.wait()
        stderr = (await errors).decode("utf-8", errors="replace").strip()
    if process.returncode != 0:
        raise GitError(f"git bundle create failed: {stderr[-1500:]}")
    return sha


async def _read_chunk(stream: asyncio.StreamReader, size: int) -> bytes:
    parts: list[bytes] = []
    wanted = size
    while wanted:
        data = await stream.read(wanted)
        if not data:
            break
        parts.append(data)
        wanted -= len(data)
    return b"".join(parts)


async def _stream_upload(endpoint: Endpoint, stream: asyncio.StreamReader,
                         params: dict[str, Any], chunk_size: int) -> str:
    upload: str | None = None
    offset = 0
    chunk = await _read_chunk(stream, chunk_size)
    if not chunk:
        raise GitError("git bundle create wrote nothing")
    while True:
        following = await _read_chunk(stream, chunk_size)
        final = not following
        call = {**params, "bundle": base64.b64encode(chunk).decode("ascii"), "final": final,
                "offset": offset}
        if upload is not None:
            call["upload"] = upload
        reply = await endpoint.call("sync_upload", call,
                                    timeout=_FINAL_TIMEOUT if final else _CALL_TIMEOUT)
        key = "sha" if final else "upload"
        if not isinstance(reply, dict) or not isinstance(reply.get(key), str):
            raise RalphError(f"the remote sent a sync_upload reply without {key!r}; is its "
                             "ralph-uv the same version as this one?")
        offset += len(chunk)
        if final:
            return str(reply["sha"])
        upload = str(reply["upload"])
        chunk = following


async def sync_from_origin(client: Client, project: str, origin: str, branch: str,
                           *, force: bool = False) -> str:
    """Have the remote fetch ``branch`` from ``origin`` into its workspace; return its sha."""
    validate_project_name(project)
    validate_branch_name(branch)
    reply = await _endpoint(client).call(
        "sync_origin", {"project": project, "origin": origin, "branch": branch, "force": force},
        timeout=_FINAL_TIMEOUT)
    return str(reply["sha"]) if isinstance(reply, dict) else ""


# ------------------------------------------------------------------------------------ pull


def _have(root: Path) -> list[str]:
    done = _git(root, "for-each-ref", "--sort=-committerdate", f"--count={_MAX_HAVE}",
                "--format=%(objectname)", "refs/heads", "refs/remotes")
    return list(dict.fromkeys(done.stdout.split()))


def _git_dir(root: Path) -> Path:
    text = _git(root, "rev-parse", "--git-common-dir").stdout.strip()
    path = Path(text)
    return path if path.is_absolute() else root / path


async def pull_loop_branch(client: Client, repo_root: Path, loop: str,
                           *, on_notice: Notice | None = None) -> tuple[str, str]:
    """Bring ``loop``'s branch into the repository at ``repo_root``; ``(branch, sha)``.

    ``on_notice`` hears what happened to ``refs/heads/<branch>`` and, when it was left alone
    (checked out with changes, or diverged), how to merge ``ralph/<branch>``.
    """
    endpoint = _endpoint(client)
    have = await asyncio.to_thread(_have, repo_root)
    folder = await asyncio.to_thread(_git_dir, repo_root)
    fd, name = tempfile.mkstemp(prefix="ralph-pull-", suffix=".bundle", dir=folder)
    bundle = Path(name)
    try:
        with os.fdopen(fd, "wb") as file:
            reply = await endpoint.call("pull_bundle", {"loop": loop, "have": have},
                                        timeout=_FINAL_TIMEOUT)
            try:
                branch, sha = str(reply["branch"]), str(reply["sha"])
                validate_branch_name(branch)
                while True:
                    file.write(base64.b64decode(reply["bundle"], validate=True))
                    if int(reply["next"]) >= int(reply["end"]):
                        break
                    reply = await endpoint.call(
                        "pull_bundle",
                        {"loop": loop, "download": reply["download"], "offset": reply["next"]},
                        timeout=_CALL_TIMEOUT)
            except (KeyError, TypeError, ValueError, binascii.Error) as exc:
                raise RalphError(f"the remote sent a pull_bundle reply that cannot be read "
                                 f"({exc!r}); is its ralph-uv the same version as this "
                                 "one?") from exc
            written = file.tell()
        notice = await asyncio.to_thread(_land, repo_root, bundle if written else None,
                                         branch, sha)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(bundle)
    log.info("pulled %s at %s: %s", branch, sha[:12], notice)
    if on_notice is not None:
        on_notice(notice)
    return branch, sha


def _land(root: Path, bundle: Path | None, branch: str, sha: str) -> str:
    """Put ``sha`` in ``ralph/<branch>`` and move ``branch`` if that is safe; say what it did."""
    tracking = TRACKING_PREFIX + branch
    if bundle is not None:
        checked = _git(root, "bundle", "verify", str(bundle), check=False)
        if checked.returncode != 0:
            raise GitError(f"the loop's bundle cannot be used here: {checked.stderr.strip()}")
        _git(root, "fetch", "--quiet", "--no-tags", str(bundle), f"+refs/heads/{branch}:{tracking}")
    elif _commit(root, sha) is None:
        raise GitError(f"the remote sent no commits, but {sha[:12]} is not here; pull again")
    else:
        _git(root, "update-ref", tracking, sha)
    local = _commit(root, f"refs/heads/{branch}")
    short = sha[:12]
    if local == sha:
        return f"{branch} is up to date ({short})"
    if local is None:
        _git(root, "update-ref", f"refs/heads/{branch}", sha, "")
        return f"created branch {branch} at {short}"
    if _is_ancestor(root, sha, local):
        return f"{branch} already contains the loop's commits ({short})"
    if not _is_ancestor(root, local, sha):
        return (f"{branch} and the loop's branch have diverged; the loop's commits are in "
                f"ralph/{branch}: merge them with `git merge ralph/{branch}`")
    holder = _holder(root, branch)
    if holder is None:
        _git(root, "update-ref", f"refs/heads/{branch}", sha, local)
        return f"fast-forwarded {branch} to {short}"
    dirty = _git(holder, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    if dirty:
        return (f"{branch} is checked out in {holder} with uncommitted changes, so it was left "
                f"alone; the loop's commits are in ralph/{branch}: commit or stash your "
                f"changes, then run `git merge --ff-only ralph/{branch}`")
    merged = _git(holder, "merge", "--ff-only", "--quiet", tracking, check=False)
    if merged.returncode != 0:
        return (f"could not fast-forward {branch} in {holder} ({merged.stderr.strip()[:300]}); "
                f"the loop's commits are in ralph/{branch}: `git merge --ff-only ralph/{branch}`")
    return f"fast-forwarded {branch} (checked out in {holder}) to {short}"


def _holder(root: Path, branch: str) -> Path | None:
    done = _git(root, "worktree", "list", "--porcelain")
    path: Path | None = None
    for line in done.stdout.splitlines():
        if line.startswith("worktree "):
            path = Path(line[len("worktree "):])
        elif line == f"branch refs/heads/{branch}":
            return path
    return None
