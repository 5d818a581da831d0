"""Workspaces for remote loops: one bare repository per project, one checkout per loop.

::

    <data>/workspaces/<project>/bare.git                 the project's code, as clients sent it
    <data>/workspaces/<project>/checkouts/<task>-<loop>   a git worktree per loop
    <data>/workspaces/<project>/staging/                 bundles being uploaded or downloaded

A client sends its branch as a git bundle (or ralphd fetches it from the project's origin); a
loop then runs in a new worktree of bare.git, so its commits land straight in bare.git's
branches, from where a client pulls them back as a bundle. Each loop records its checkout in
``<loop_dir>/workspace.json``.

Invariants:
- bare.git remembers the origin URL of the client that created it; a client naming another
  origin is refused (``ORIGIN_MISMATCH``), so two repositories never share a workspace.
- A branch moves only forward (a fast-forward) unless the client asks for ``force``, and never
  while a running loop has it checked out.
- Cleaning up never removes a checkout that holds uncommitted changes (other than the loop's
  own progress.txt summary) or a commit that no branch of bare.git holds.

Every method here blocks (it runs git): call them from a worker thread in async code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ralph_uv.daemon.config import DaemonConfig
from ralph_uv.errors import ErrorCode, GitError, RalphError, UserError
from ralph_uv.validation import display_url

__all__ = [
    "CHECKOUT_FILE",
    "Checkout",
    "CheckoutState",
    "Workspaces",
    "read_checkout",
    "write_checkout",
]

log = logging.getLogger("ralph_uv.daemon.workspaces")

CHECKOUT_FILE = "workspace.json"
_LOCAL_TIMEOUT = 600.0  # bundles of big repositories take a while to index
_NETWORK_TIMEOUT = 600.0
_PROGRESS_FILE = re.compile(r"progress(-\d+)?\.txt")


@dataclass(frozen=True, slots=True)
class Checkout:
    """A loop's checkout, as ``<loop_dir>/workspace.json`` records it."""

    project: str
    branch: str  # the branch the checkout was created on
    path: Path  # the worktree
    task_path: str  # the task folder, relative to the worktree
    sync: str = "bundle"  # "bundle" or "origin"
    push_every: int | None = None

    @property
    def task_dir(self) -> Path:
        return self.path / self.task_path

    def to_dict(self) -> dict[str, Any]:
        return {"project": self.project, "branch": self.branch, "path": str(self.path),
                "task_path": self.task_path, "sync": self.sync, "push_every": self.push_every}


def write_checkout(loop_dir: Path, checkout: Checkout) -> None:
    """Record ``checkout`` in the loop's folder (mode 0600)."""
    try:
        loop_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = loop_dir / CHECKOUT_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(checkout.to_dict(), file)
    except OSError as exc:
        raise RalphError(f"cannot record the loop's checkout in {loop_dir}: {exc}") from exc


def read_checkout(loop_dir: Path) -> Checkout | None:
    """The checkout recorded in ``loop_dir``, or None for a loop that runs on a task folder."""
    try:
        data = json.loads((loop_dir / CHECKOUT_FILE).read_text(encoding="utf-8"))
        push_every = data.get("push_every")
        return Checkout(
            project=str(data["project"]), branch=str(data["branch"]), path=Path(data["path"]),
            task_path=str(data["task_path"]), sync=str(data.get("sync", "bundle")),
            push_every=int(push_every) if push_every is not None else None,
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("cannot read %s: %s", loop_dir / CHECKOUT_FILE, exc)
        return None


@dataclass(frozen=True, slots=True)
class CheckoutState:
    """A checkout on disk and what the registry says of its loop, for the clean-up policy."""

    path: Path
    project: str
    loop_id: str | None  # None: no loop in the registry claims it
    active: bool
    ended_at: float | None
    task_path: str | None


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["GIT_TERMINAL_PROMPT"] = "0"  # nobody is there to type a password
    env["LC_ALL"] = "C"
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    return env


def _git(cwd: Path, *args: str, timeout: float = _LOCAL_TIMEOUT,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """``git -C cwd args``; :class:`GitError` with git's own words when it fails."""
    try:
        done = subprocess.run(
            ["git", "-C", str(cwd), *args], env=_env(), stdin=subprocess.DEVNULL,
            capture_output=True, text=True, errors="replace", timeout=timeout, check=False,
        )
    except FileNotFoundError as exc:
        raise UserError("git is not installed on this machine; install git") from exc
    except subprocess.TimeoutExpired as exc:
        raise GitError(f"`git {args[0]}` did not finish within {timeout:g} s") from exc
    except OSError as exc:
        raise GitError(f"cannot run git: {exc.strerror or exc}") from exc
    if check and done.returncode != 0:
        words = done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}"
        raise GitError(f"`git {args[0]}` failed in {cwd}: {words[-2000:]}")
    return done


class Workspaces:
    """The workspaces under ``root`` (``paths().workspaces``), with ralphd's settings."""

    def __init__(self, root: Path, settings: DaemonConfig) -> None:
        self.root = root
        self.settings = settings
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        # Checkouts made for loops that are starting (not yet in the registry).
        self.reserved: set[Path] = set()

    # ------------------------------------------------------------------ places

    def project_dir(self, project: str) -> Path:
        return self.root / project

    def bare(self, project: str) -> Path:
        return self.root / project / "bare.git"

    def checkouts(self, project: str) -> Path:
        return self.root / project / "checkouts"

    def staging(self, project: str) -> Path:
        """A private folder for bundles in transit (emptied when ralphd starts)."""
        folder = self.root / project / "staging"
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise RalphError(f"cannot create {folder}: {exc.strerror or exc}") from exc
        return folder

    def exists(self, project: str) -> bool:
        return (self.bare(project) / "HEAD").is_file()

    @contextlib.contextmanager
    def locked(self, project: str) -> Iterator[None]:
        """One change to a project's bare.git at a time."""
        with self._locks_lock:
            lock = self._locks.setdefault(project, threading.Lock())
        with lock:
            yield

    # ------------------------------------------------------------------ the bare repository

    def origin(self, project: str) -> str | None:
        """The origin URL bare.git recorded, if any."""
        if not self.exists(project):
            return None
        done = _git(self.bare(project), "config", "--get", "remote.origin.url", check=False)
        return done.stdout.strip() or None

    def refs(self, project: str) -> dict[str, str]:
        """``{"refs/heads/<branch>": sha}`` of bare.git (empty when there is none)."""
        if not self.exists(project):
            return {}
        done = _git(self.bare(project), "for-each-ref", "--format=%(refname) %(objectname)",
                   "refs/heads")
        pairs = (line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
        return {name: sha for name, sha in pairs}

    def branch_sha(self, project: str, branch: str) -> str | None:
        if not self.exists(project):
            return None
        done = _git(self.bare(project), "rev-parse", "--verify", "--quiet",
                   f"refs/heads/{branch}^{{commit}}", check=False)
        return done.stdout.strip() or None

    def show_file(self, project: str, branch: str, path: str) -> str | None:
        """The text of ``path`` on ``branch`` of bare.git, or None when it is not there."""
        if not self.exists(project):
            return None
        done = _git(self.bare(project), "show", f"refs/heads/{branch}:{path}", check=False)
        return done.stdout if done.returncode == 0 else None

    def check_origin(self, project: str, origin: str | None) -> None:
        """Refuse ``origin`` when bare.git recorded another one (``ORIGIN_MISMATCH``)."""
        recorded = self.origin(project)
        if origin is not None and recorded is not None and origin != recorded:
            raise RalphError(
                f"project {project!r} on this machine holds the code of "
                f"{display_url(recorded)}, not {display_url(origin)}; sync under another "
                "project name, or remove the old workspace "
                f"({self.project_dir(project)}) on this machine",
                code=ErrorCode.ORIGIN_MISMATCH,
            )

    def ensure_bare(self, project: str, origin: str | None) -> Path:
        """bare.git of ``project``, created (recording ``origin``) when it does not exist."""
        bare = self.bare(project)
        self.check_origin(project, origin)
        if not self.exists(project):
            try:
                bare.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                raise RalphError(f"cannot create {bare.parent}: {exc.strerror or exc}") from exc
            _git(bare.parent, "init", "--quiet", "--bare", bare.name)
            log.info("created the workspace of project %s", project)
        if origin is not None and self.origin(project) is None:
            _git(bare, "config", "remote.origin.url", origin)
            # Tracking refs make pushes with --force-with-lease protect the origin's branch.
            _git(bare, "config", "remote.origin.fetch", "+refs/heads/*:refs/remotes/origin/*")
        return bare

    def check_free_space(self, bundle_size: int = 0) -> None:
        """Refuse (``DISK_FULL``) when less than max(min_free_space, 2 x bundle) is free."""
        folder = self.root
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            free = shutil.disk_usage(folder).free
        except OSError as exc:
            raise RalphError(f"cannot tell the free space of {folder}: {exc}") from exc
        needed = max(self.settings.min_free_space, 2 * bundle_size)
        if free < needed:
            raise RalphError(
                f"only {_size(free)} free on {folder}; ralphd keeps at least {_size(needed)} "
                f"free{f' for a {_size(bundle_size)} bundle' if bundle_size else ''}: free some "
                "space there (finished checkouts go with checkout_retention in daemon.toml)",
                code=ErrorCode.DISK_FULL,
            )

    def _move_branch(self, project: str, branch: str, new: str, *, force: bool,
                     active: Sequence[Path], what: str) -> str:
        """Point ``branch`` at ``new``: create it, fast-forward it, or (``force``) replace it.
        A branch that already contains ``new`` stays where it is. Returns the branch's sha."""
        bare = self.bare(project)
        old = self.branch_sha(project, branch)
        if old == new:
            return new
        if old is not None and not force:
            if self.is_ancestor(project, new, old):
                return old  # it holds more already (a loop's commits): keep them
            if not self.is_ancestor(project, old, new):
                raise RalphError(
                    f"branch {branch!r} of project {project!r} has commits that {what} lacks "
                    "(a loop's work?); pull them first (`ralph-uv pull`), or force the sync "
                    "to replace the branch",
                    code=ErrorCode.BAD_STATE,
                )
        self.release_branch(project, branch, active)
        _git(bare, "update-ref", "-m", f"ralph-uv: {what}", f"refs/heads/{branch}", new,
            old or "")
        return new

    def is_ancestor(self, project: str, ancestor: str, descendant: str) -> bool:
        done = _git(self.bare(project), "merge-base", "--is-ancestor", ancestor, descendant,
                   check=False)
        return done.returncode == 0

    def receive_bundle(self, project: str, bundle: Path, branch: str, *, origin: str | None,
                       force: bool, active: Sequence[Path]) -> str:
        """Verify ``bundle`` and make it bare.git's ``branch``; return the branch's sha."""
        with self.locked(project):
            bare = self.ensure_bare(project, origin)
            heads = _git(bare, "bundle", "list-heads", str(bundle), check=False)
            if heads.returncode != 0:
                raise UserError("the upload is not a git bundle; send `git bundle create` output")
            ref = f"refs/heads/{branch}"
            found = [line.split(" ", 1)[0] for line in heads.stdout.splitlines()
                     if line.endswith(" " + ref)]
            if not found:
                raise UserError(f"the bundle holds no {ref}; bundle the branch you name")
            checked = _git(bare, "bundle", "verify", str(bundle), check=False)
            if checked.returncode != 0:
                raise GitError(
                    "the bundle needs commits this workspace does not have; ask sync_refs what "
                    f"it holds and bundle against that ({checked.stderr.strip()[-500:]})"
                )
            _git(bare, "bundle", "unbundle", str(bundle))
            return self._move_branch(project, branch, found[0], force=force, active=active,
                                     what="the upload")

    def fetch_origin(self, project: str, origin: str, branch: str, *, force: bool,
                     active: Sequence[Path]) -> str:
        """Fetch ``branch`` from the project's origin into bare.git; return the branch's sha."""
        with self.locked(project):
            bare = self.ensure_bare(project, origin)
            done = _git(bare, *self.protocol_options(), "fetch", "--quiet", "--no-tags",
                       "origin", f"+refs/heads/{branch}:refs/remotes/origin/{branch}",
                       timeout=_NETWORK_TIMEOUT, check=False)
            if done.returncode != 0:
                words = done.stderr.strip()
                if "couldn't find remote ref" in words:
                    raise RalphError(
                        f"{display_url(origin)} has no branch {branch!r}; push it there first "
                        "or name an existing branch",
                        code=ErrorCode.BRANCH_NOT_FOUND,
                    )
                raise GitError(f"fetching {branch!r} from {display_url(origin)} failed: "
                               f"{words[-1500:]}")
            new = _git(bare, "rev-parse", f"refs/remotes/origin/{branch}").stdout.strip()
            return self._move_branch(project, branch, new, force=force, active=active,
                                     what="the origin's branch")

    def protocol_options(self) -> list[str]:
        """``-c`` options allowing only network transports (and file:// for tests)."""
        allowed = ["ssh", "https", "git", *(["file"] if self.settings.allow_local_origins else [])]
        options = ["-c", "protocol.allow=never"]
        for name in allowed:
            options += ["-c", f"protocol.{name}.allow=always"]
        return options

    def create_bundle(self, project: str, branch: str, have: Sequence[str],
                      dest: Path) -> tuple[str, bool]:
        """Write a bundle of ``branch`` to ``dest``, leaving out what the commits in ``have``
        already hold; ``(sha, True)`` or ``(sha, False)`` when there is nothing to send."""
        bare = self.bare(project)
        sha = self.branch_sha(project, branch)
        if sha is None:
            raise RalphError(f"project {project!r} has no branch {branch!r} any more",
                             code=ErrorCode.BRANCH_NOT_FOUND)
        known = self._known_commits(project, have)
        count = _git(bare, "rev-list", "--count", sha, "--not", *known, "--").stdout.strip()
        if count == "0":
            return sha, False
        _git(bare, "bundle", "create", "--quiet", str(dest), f"refs/heads/{branch}",
            *(f"^{c}" for c in known))
        return sha, True

    def _known_commits(self, project: str, shas: Sequence[str]) -> list[str]:
        wanted = [s for s in dict.fromkeys(shas) if re.fullmatch(r"[0-9a-f]{40,64}", s)]
        if not wanted:
            return []
        try:
            done = subprocess.run(
                ["git", "-C", str(self.bare(project)), "cat-file", "--batch-check"],
                input="".join(f"{s}\n" for s in wanted), env=_env(), capture_output=True,
                text=True, timeout=_LOCAL_TIMEOUT, check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise GitError(f"cannot run git cat-file: {exc}") from exc
        fields = (line.split() for line in done.stdout.splitlines())
        return [f[0] for f in fields if len(f) >= 2 and f[1] == "commit"]

    # ------------------------------------------------------------------ checkouts

    def prune(self, project: str) -> None:
        """Forget worktrees whose folders are gone."""
        if self.exists(project):
            _git(self.bare(project), "worktree", "prune")

    def holders(self, project: str) -> dict[str, Path]:
        """Which worktree has which branch checked out: ``{branch: path}``."""
        done = _git(self.bare(project), "worktree", "list", "--porcelain")
        result: dict[str, Path] = {}
        path: Path | None = None
        for line in done.stdout.splitlines():
            if line.startswith("worktree "):
                path = Path(line[len("worktree "):])
            elif line.startswith("branch refs/heads/") and path is not None:
                result[line[len("branch refs/heads/"):]] = path
        return result

    def release_branch(self, project: str, branch: str, active: Sequence[Path]) -> None:
        """Make ``branch`` free to check out or move: a running loop's checkout holding it is
        refused (``BAD_STATE``); a finished one's is detached (its files stay as they are)."""
        holder = self.holders(project).get(branch)
        if holder is None or holder == self.bare(project):
            return
        if any(_same(holder, path) for path in active):
            raise RalphError(
                f"branch {branch!r} of project {project!r} is checked out by a running loop "
                f"({holder.name}); stop that loop first, or use another branch",
                code=ErrorCode.BAD_STATE,
            )
        log.info("detaching %s from branch %s (its loop has ended)", holder, branch)
        _git(holder, "switch", "--quiet", "--detach")

    def add_checkout(self, project: str, branch: str, name: str,
                     active: Sequence[Path]) -> Path:
        """A new worktree ``checkouts/<name>`` on ``branch``."""
        with self.locked(project):
            if self.branch_sha(project, branch) is None:
                raise RalphError(
                    f"project {project!r} has no branch {branch!r} on this machine; sync it "
                    "first (sync_upload or sync_origin)",
                    code=ErrorCode.BRANCH_NOT_FOUND,
                )
            self.check_free_space()
            self.prune(project)
            self.release_branch(project, branch, active)
            path = self.checkouts(project) / name
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                raise RalphError(f"cannot create {path.parent}: {exc.strerror or exc}") from exc
            _git(self.bare(project), "worktree", "add", "--quiet", str(path), branch)
            return path

    def remove_new_checkout(self, project: str, path: Path) -> None:
        """Remove a checkout made for a loop that then did not start (nothing was done in it)."""
        with self.locked(project):
            done = _git(self.bare(project), "worktree", "remove", "--force", str(path),
                       check=False)
            if done.returncode != 0:
                log.warning("cannot remove %s: %s", path, done.stderr.strip())

    def checkout_dirs(self) -> list[tuple[str, Path]]:
        """Every ``(project, checkout folder)`` on disk."""
        found: list[tuple[str, Path]] = []
        with contextlib.suppress(OSError):
            for project in sorted(self.root.iterdir()):
                folder = project / "checkouts"
                if folder.is_dir():
                    found.extend((project.name, p) for p in sorted(folder.iterdir()) if p.is_dir())
        return found

    def clean(self, states: Sequence[CheckoutState], now: float | None = None) -> list[Path]:
        """Remove the checkouts of loops that ended longer ago than ``checkout_retention``
        and hold no work (see the module docstring); return the ones removed."""
        days = self.settings.checkout_retention_days
        if days is None:
            return []
        now = time.time() if now is None else now
        removed: list[Path] = []
        for state in states:
            if state.active:
                continue
            ended = state.ended_at
            if ended is None:
                with contextlib.suppress(OSError):
                    ended = state.path.stat().st_mtime
            if ended is None or now - ended < days * 86400:
                continue
            why = self.keeps_work(state)
            if why:
                log.info("keeping %s: %s", state.path, why)
                continue
            with self.locked(state.project):
                done = _git(self.bare(state.project), "worktree", "remove", "--force",
                           str(state.path), check=False)
            if done.returncode == 0:
                log.info("removed the checkout %s", state.path)
                removed.append(state.path)
            else:
                log.warning("cannot remove %s: %s", state.path, done.stderr.strip())
        return removed

    def keeps_work(self, state: CheckoutState) -> str | None:
        """Why the checkout must stay (uncommitted changes, a commit no branch holds), or None."""
        done = _git(state.path, "status", "--porcelain=v1", "-z", "--untracked-files=all",
                   check=False)
        if done.returncode != 0:
            return f"git status fails there: {done.stderr.strip()[:200]}"
        changed = [entry[3:] for entry in done.stdout.split("\0") if len(entry) > 3]
        changed = [p for p in changed if not _own_progress_file(p, state.task_path)]
        if changed:
            return f"uncommitted changes in {', '.join(changed[:3])}"
        head = _git(state.path, "rev-parse", "--verify", "--quiet", "HEAD", check=False)
        sha = head.stdout.strip()
        if not sha:
            return None
        holders = _git(self.bare(state.project), "for-each-ref", "--count=1", "--contains", sha,
                      "refs/heads")
        if not holders.stdout.strip():
            return f"commit {sha[:12]} is on no branch of the workspace"
        return None

    def clear_staging(self) -> None:
        """Remove bundles left in transit by a previous ralphd."""
        for project in self._projects():
            folder = self.root / project / "staging"
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)

    def _projects(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if (p / "bare.git").is_dir())
        except OSError:
            return []

    def prune_all(self) -> None:
        """``git worktree prune`` in every project (at start)."""
        for project in self._projects():
            try:
                self.prune(project)
            except RalphError as exc:
                log.warning("project %s: %s", project, exc.message)


def _own_progress_file(path: str, task_path: str | None) -> bool:
    """The loop's summary in progress.txt is written after its last commit: not work."""
    if task_path is None:
        return False
    folder, _, name = path.rpartition("/")
    return folder == task_path.rstrip("/") and _PROGRESS_FILE.fullmatch(name) is not None


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b


def _size(count: int) -> str:
    value = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} bytes"
