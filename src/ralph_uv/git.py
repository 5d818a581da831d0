"""Typed wrappers over the git (and gh) command line.

Each function runs one ``git -C <root> …`` command and returns a plain Python value; a failure
becomes :class:`GitError` carrying git's own words, and a missing ``git`` a :class:`UserError`.

Nothing here discards work: no ``reset --hard``, no ``checkout -f``, no ``clean``, no forced
push without a lease. Switching branches goes through ``git switch``, which refuses to overwrite
local changes, and :func:`ensure_branch` refuses to switch at all on a tree with uncommitted
changes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ralph_uv.errors import ErrorCode, GitError, UserError

__all__ = [
    "Commit",
    "Snapshot",
    "branch_exists",
    "check_ref_format",
    "checkout",
    "commits_between",
    "create_branch",
    "current_branch",
    "dirty_files",
    "ensure_branch",
    "gh_available",
    "has_remote",
    "head",
    "is_clean",
    "merge_pull_request",
    "open_pull_request",
    "progress_snapshot",
    "push",
    "repo_root",
]

log = logging.getLogger("ralph_uv.git")

_LOCAL_TIMEOUT = 60.0
_NETWORK_TIMEOUT = 300.0
_HASH_LIMIT = 8 * 1024 * 1024  # bigger changed files are fingerprinted by size and mtime
_URL = re.compile(r"https?://\S+")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Never wait for a password prompt nobody will answer, and keep messages parseable.
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["GH_PROMPT_DISABLED"] = "1"
    env["LC_ALL"] = "C"
    return env


def _run(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    program: str = "git",
    check: bool = True,
    timeout: float = _LOCAL_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    argv = [program, *(["-C", str(cwd)] if cwd is not None and program == "git" else []), *args]
    try:
        done = subprocess.run(
            argv,
            cwd=str(cwd) if cwd is not None and program != "git" else None,
            env=_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        hint = "install git" if program == "git" else "install the GitHub CLI (https://cli.github.com)"
        raise UserError(f"{program} is not installed; {hint}") from exc
    except subprocess.TimeoutExpired as exc:
        raise GitError(f"`{program} {' '.join(args)}` did not finish within {timeout:g}s") from exc
    except OSError as exc:
        raise GitError(f"cannot run {program}: {exc.strerror or exc}") from exc
    if check and done.returncode != 0:
        words = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}")
        raise GitError(f"`{program} {' '.join(args)}` failed: {words}")
    return done


def _git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(args, cwd=root, check=check)


# --- repository and branches ------------------------------------------------------------------


def repo_root(path: Path) -> Path:
    """The top folder of the git repository holding ``path`` (a folder or a file)."""
    folder = path if path.is_dir() else path.parent
    if not folder.is_dir():
        raise UserError(f"{path} does not exist")
    done = _run(["rev-parse", "--show-toplevel"], cwd=folder, check=False)
    if done.returncode != 0:
        words = done.stderr.strip()
        if words and "not a git repository" not in words:
            raise UserError(f"{path}: git cannot use this repository: {words}")
        raise UserError(f"{path} is not inside a git repository — run git init")
    return Path(done.stdout.strip()).resolve()


def current_branch(root: Path) -> str | None:
    """The checked-out branch (also in an empty repository), or None when HEAD is detached."""
    done = _git(root, "symbolic-ref", "--quiet", "--short", "HEAD", check=False)
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def head(root: Path) -> str | None:
    """The commit HEAD points at, or None in a repository without commits."""
    done = _git(root, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False)
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def check_ref_format(name: str) -> bool:
    """Whether ``name`` is a valid branch name (``git check-ref-format --branch``)."""
    if not name or name.startswith("-") or "@{" in name:
        return False
    done = _run(["check-ref-format", "--branch", name], check=False)
    return done.returncode == 0 and done.stdout.strip() == name


def _require_branch_name(name: str) -> None:
    if not check_ref_format(name):
        raise UserError(
            f"{name!r} is not a valid git branch name; use letters, digits, '-', '_', '/' "
            "(for example ralph/my-feature)",
            code=ErrorCode.INVALID_NAME,
        )


def branch_exists(root: Path, name: str, *, remote: str | None = None) -> bool:
    """Whether the local branch ``name`` (or ``remote``'s tracking branch) exists."""
    ref = f"refs/remotes/{remote}/{name}" if remote else f"refs/heads/{name}"
    return _git(root, "show-ref", "--verify", "--quiet", ref, check=False).returncode == 0


def create_branch(root: Path, name: str, base: str | None = None) -> None:
    """Create branch ``name`` at ``base`` (default: HEAD) without switching to it."""
    _require_branch_name(name)
    _git(root, "branch", name, *([base] if base else []))


def checkout(root: Path, name: str) -> None:
    """Switch to the existing branch ``name``; git refuses if local changes would be lost."""
    _require_branch_name(name)
    _git(root, "switch", name)


def _status(root: Path, *, untracked: bool) -> list[tuple[str, str]]:
    """(XY status, path) pairs from ``git status --porcelain -z``."""
    done = _git(
        root, "status", "--porcelain=v1", "-z",
        "--untracked-files=all" if untracked else "--untracked-files=no",
    )
    entries: list[tuple[str, str]] = []
    fields = iter(done.stdout.split("\0"))
    for field in fields:
        if len(field) < 4:
            continue
        code, path = field[:2], field[3:]
        entries.append((code, path))
        if code[0] in "RC":
            next(fields, None)  # a rename's second field is its old path
    return entries


def dirty_files(root: Path, *, include_untracked: bool = True) -> list[str]:
    """Paths (relative to ``root``) with uncommitted changes, untracked ones too by default."""
    return [path for _, path in _status(root, untracked=include_untracked)]


def is_clean(root: Path, *, include_untracked: bool = True) -> bool:
    """True when nothing is modified, staged or (by default) untracked."""
    return not dirty_files(root, include_untracked=include_untracked)


def _resolve_base(root: Path, base: str) -> str:
    found = _git(root, "rev-parse", "--verify", "--quiet", f"{base}^{{commit}}", check=False)
    if found.returncode == 0:
        return base
    if branch_exists(root, base, remote="origin"):
        return f"origin/{base}"
    raise UserError(
        f"base branch {base!r} does not exist here; fetch it or pass an existing branch",
        code=ErrorCode.BRANCH_NOT_FOUND,
    )


def ensure_branch(root: Path, name: str, base: str | None = None) -> bool:
    """Be on branch ``name``: create it from ``base`` (default: HEAD) or switch to it.

    Already on it: nothing is touched, even with uncommitted changes. A switch (or a creation)
    needs a tree without uncommitted changes to tracked files — untracked files such as a new
    task's prd.json are carried over by git — and otherwise raises :class:`UserError`. Returns
    True when the branch changed.
    """
    _require_branch_name(name)
    current = current_branch(root)
    if current == name:
        return False
    if head(root) is None:
        # An empty repository: point the unborn branch elsewhere; no file is touched.
        _git(root, "symbolic-ref", "HEAD", f"refs/heads/{name}")
        return True
    changed = dirty_files(root, include_untracked=False)
    if changed:
        more = len(changed) - 5
        shown = ", ".join(changed[:5]) + (f" and {more} more" if more > 0 else "")
        raise UserError(
            f"cannot switch {root} from {current or 'a detached HEAD'} to branch {name!r}: "
            f"uncommitted changes in {shown}; commit or stash your changes first"
        )
    if branch_exists(root, name):
        log.info("switching %s to branch %s", root, name)
        _git(root, "switch", name)
    else:
        start = _resolve_base(root, base) if base else "HEAD"
        log.info("creating branch %s from %s in %s", name, start, root)
        _git(root, "switch", "--no-track", "-c", name, start)
    return True


# --- progress ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a repository looks like, for telling whether an iteration changed anything.

    Two snapshots are equal when HEAD, every uncommitted file's content and every watched
    file's content are the same.
    """

    head: str | None
    status_digest: str
    watched: tuple[tuple[str, str | None], ...]


def _fingerprint(path: Path) -> str | None:
    try:
        info = path.stat()
        if not path.is_file():
            return f"not-a-file:{info.st_mode:o}"
        if info.st_size > _HASH_LIMIT:
            return f"size:{info.st_size}:mtime:{info.st_mtime_ns}"
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"unreadable:{exc.errno}"


def progress_snapshot(root: Path, watched_files: Iterable[Path] = ()) -> Snapshot:
    """HEAD, a digest of ``git status`` and the content of every uncommitted file, and the
    content of each watched file (prd.json) — compared between iterations to detect stalls."""
    digest = hashlib.sha256()
    for code, path in sorted(_status(root, untracked=True), key=lambda entry: entry[1]):
        digest.update(f"{code}\0{path}\0{_fingerprint(root / path)}\0".encode())
    watched = tuple((str(file), _fingerprint(file)) for file in watched_files)
    return Snapshot(head(root), digest.hexdigest(), watched)


@dataclass(frozen=True, slots=True)
class Commit:
    sha: str
    subject: str


def commits_between(root: Path, a: str | None, b: str = "HEAD") -> list[Commit]:
    """Commits reachable from ``b`` but not from ``a`` (all of ``b``'s when ``a`` is None),
    oldest first."""
    spec = f"{a}..{b}" if a else b
    done = _git(root, "log", "--reverse", "--format=%H%x00%s", spec, "--")
    commits = []
    for line in done.stdout.splitlines():
        sha, _, subject = line.partition("\0")
        if sha:
            commits.append(Commit(sha, subject))
    return commits


# --- remotes and pull requests ----------------------------------------------------------------


def has_remote(root: Path, name: str = "origin") -> bool:
    """Whether the repository has a remote called ``name``."""
    return name in _git(root, "remote").stdout.split()


def push(
    root: Path, branch: str, *, force_with_lease: bool = False, remote: str = "origin"
) -> None:
    """Push ``branch`` to ``remote`` and track it there. ``force_with_lease`` replaces the
    remote branch only if nobody else moved it since the last fetch."""
    _require_branch_name(branch)
    args = ["push", "--set-upstream", *(["--force-with-lease"] if force_with_lease else [])]
    _run([*args, remote, f"refs/heads/{branch}:refs/heads/{branch}"], cwd=root,
         timeout=_NETWORK_TIMEOUT)


def gh_available() -> bool:
    """Whether the GitHub CLI ``gh`` is on PATH."""
    return shutil.which("gh") is not None


def open_pull_request(root: Path, branch: str, base: str, title: str, body: str) -> str:
    """Open a pull request from ``branch`` into ``base`` with ``gh``; return its URL. When one
    is already open for the branch, return that one's URL."""
    done = _run(
        ["pr", "create", "--head", branch, "--base", base, "--title", title, "--body", body],
        cwd=root, program="gh", check=False, timeout=_NETWORK_TIMEOUT,
    )
    if done.returncode == 0:
        urls = _URL.findall(done.stdout)
        if urls:
            return str(urls[-1])
        raise GitError(f"gh created a pull request but printed no URL: {done.stdout.strip()}")
    if "already exists" in done.stderr:
        urls = _URL.findall(done.stderr)
        if urls:
            return str(urls[-1])
    raise GitError(f"gh pr create failed: {done.stderr.strip() or done.stdout.strip()}")


def merge_pull_request(
    root: Path, pull_request: str, *, method: str = "merge", delete_branch: bool = False
) -> None:
    """Merge a pull request (URL, number or branch) with ``gh pr merge``; ``method`` is
    ``merge``, ``squash`` or ``rebase``."""
    if method not in {"merge", "squash", "rebase"}:
        raise UserError(f"unknown merge method {method!r}; use merge, squash or rebase")
    args = ["pr", "merge", pull_request, f"--{method}"]
    if delete_branch:
        args.append("--delete-branch")
    _run(args, cwd=root, program="gh", timeout=_NETWORK_TIMEOUT)
