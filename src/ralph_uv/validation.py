"""Checks for the names and URLs a client sends to ralphd before anything runs with them.

Every name that ends up in a path, a git ref or a git command line goes through one of these
functions first. Each returns the value unchanged when it is acceptable and raises
:class:`~ralph_uv.errors.UserError` with code ``INVALID_NAME`` (-32011) otherwise, with a
message that says what is accepted.

Origin URLs are the repositories a remote loop may fetch from and push to. Only network URLs
are accepted: ``ssh://``, ``https://``, ``git://`` and the scp-like ``user@host:path``. Git's
other transports run programs or read this machine's files (``ext::``, ``file://``, plain
paths, ``fd::``), and a value starting with ``-`` would be read as an option, so all of those
are refused. ``allow_local=True`` (daemon.toml ``allow_local_origins``, meant for tests) also
accepts ``file:///absolute/path``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import PurePosixPath
from urllib.parse import urlsplit, urlunsplit

from ralph_uv.errors import ErrorCode, UserError
from ralph_uv.prd import check_branch_name
from ralph_uv.tasks import validate_task_name

__all__ = [
    "ORIGIN_SCHEMES",
    "display_url",
    "validate_branch_name",
    "validate_origin_url",
    "validate_project_name",
    "validate_task_name",
    "validate_task_path",
]

ORIGIN_SCHEMES = ("ssh", "https", "git")
_PROJECT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_SCP_LIKE = re.compile(
    r"(?P<user>[A-Za-z0-9_][A-Za-z0-9_.+-]*)@(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*):(?P<path>.+)"
)
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\]")
_GIT_TIMEOUT = 10.0
_ORIGIN_FORMS = (
    "ssh://[user@]host[:port]/path, https://host/path, git://host/path or user@host:path"
)


def _invalid(message: str) -> UserError:
    return UserError(message, code=ErrorCode.INVALID_NAME)


def _has_control(text: str) -> bool:
    return any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text)


def _has_control_or_space(text: str) -> bool:
    return _has_control(text) or any(ch.isspace() for ch in text)


def validate_branch_name(name: str) -> str:
    """``name`` when git accepts it as a branch name; ``git check-ref-format --branch`` has the
    final word after the quick checks of :func:`ralph_uv.prd.check_branch_name`."""
    if not isinstance(name, str):
        raise _invalid("a branch name must be a string such as ralph/my-feature")
    reason = check_branch_name(name)
    if reason is None:
        reason = _git_refuses_branch(name)
    if reason is not None:
        raise _invalid(
            f"invalid branch name {name[:100]!r}: {reason}; use letters, digits, '-', '_', '.' "
            "and '/' (for example ralph/my-feature)"
        )
    return name


def _git_refuses_branch(name: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "check-ref-format", "--branch", name], capture_output=True, text=True,
            stdin=subprocess.DEVNULL, timeout=_GIT_TIMEOUT, check=False,
        )
    except FileNotFoundError as exc:
        raise UserError("git is not installed on this machine; install git") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"cannot run git check-ref-format: {exc}") from exc
    if done.returncode != 0 or done.stdout.strip() != name:
        return "git check-ref-format refuses it"
    return None


def validate_project_name(name: str) -> str:
    """``name`` when it can name a workspace folder: letters, digits, ``-``, ``_`` and ``.``,
    not starting with ``.`` or ``-``, at most 64 characters, no ``/``."""
    if not isinstance(name, str) or not _PROJECT.fullmatch(name):
        shown = name[:100] if isinstance(name, str) else name
        raise _invalid(
            f"invalid project name {shown!r}: use letters, digits, '-', '_' and '.', not "
            "starting with '.' or '-', at most 64 characters (for example my-app)"
        )
    return name


def validate_task_path(path: str) -> str:
    """``path`` when it is a relative path inside a repository (the task folder, from the
    repository's top): no ``..``, no leading ``/`` or ``-``, no control characters."""
    problem: str | None = None
    if not isinstance(path, str) or not path:
        problem = "it is empty"
    elif _has_control(path) or "\\" in path:
        problem = "it contains control characters or backslashes"
    elif path.startswith(("/", "-", "~")):
        problem = "it must be relative to the repository's top folder"
    elif any(part in ("..", ".git") for part in PurePosixPath(path).parts):
        problem = "it must stay inside the repository"
    if problem is not None:
        shown = path[:100] if isinstance(path, str) else path
        raise _invalid(
            f"invalid task path {shown!r}: {problem}; pass the task folder relative to the "
            "repository's top folder (for example tasks/my-task)"
        )
    return str(PurePosixPath(path))


def validate_origin_url(url: str, *, allow_local: bool = False) -> str:
    """``url`` when it is an origin ralphd may fetch from and push to (see the module
    docstring); ``allow_local`` also accepts ``file:///absolute/path`` (tests only)."""
    problem = _origin_problem(url, allow_local)
    if problem is not None:
        shown = display_url(url[:200]) if isinstance(url, str) else url
        accepted = _ORIGIN_FORMS + (" or file:///path" if allow_local else "")
        raise _invalid(f"origin URL {shown!r} is not accepted: {problem}; use {accepted}")
    return url


def _origin_problem(url: str, allow_local: bool) -> str | None:
    if not isinstance(url, str) or not url:
        return "it is empty"
    if _has_control_or_space(url):
        return "it contains spaces or control characters"
    if url.startswith("-"):
        return "it starts with '-' and would be read as an option"
    if "://" not in url:
        if "::" in url:
            return "git remote helpers (such as ext::) are not allowed"
        match = _SCP_LIKE.fullmatch(url)
        if match is None:
            return "it is neither a URL nor user@host:path (local paths are not allowed)"
        if match.group("path").startswith("-"):
            return "its path starts with '-'"
        return None
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file" and allow_local:
        if parts.netloc or not parts.path.startswith("/"):
            return "a file URL must be file:///absolute/path"
        return None
    if scheme not in ORIGIN_SCHEMES:
        return f"the scheme {scheme or url.split('://', 1)[0]!r} is not allowed"
    host = parts.netloc.rpartition("@")[2]
    if host.startswith("[") and "]" in host:
        host = host[: host.index("]") + 1]
    else:
        host = host.partition(":")[0]
    if not host or not _HOST.fullmatch(host):
        return "it names no valid host"
    user = parts.netloc.rpartition("@")[0]
    if user.startswith("-"):
        return "its user name starts with '-'"
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return "its port is not a number from 1 to 65535"
    if parts.path in ("", "/"):
        return "it names no repository path"
    return None


def display_url(url: str) -> str:
    """``url`` without a password or token, for messages and logs."""
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unreadable URL>"
    if "@" not in parts.netloc:
        return url
    user, _, host = parts.netloc.rpartition("@")
    name = user.partition(":")[0]
    netloc = f"{name}:***@{host}" if ":" in user else f"{name}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
