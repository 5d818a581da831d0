"""Which agent CLIs are installed on this machine, where, and at which version.

A program is looked for on ``PATH`` first, then in the places agent CLIs are commonly installed
without being on ``PATH``: the project-local ``.tools/node/node_modules/.bin`` (``make agents``
puts claude and opencode there) of the current git repository and of ralph-uv's own source
checkout, ``~/.local/bin`` (pipx, the claude native installer) and npm's global ``bin``.

Versions come from ``<program> --version`` with a short timeout, once per program per process.
Only the agents ralph-uv knows are asked for their version: a custom command may not understand
``--version`` and could start working instead.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import ralph_uv
from ralph_uv.config import Config, CustomAgent

__all__ = [
    "KNOWN_AGENTS",
    "AgentInfo",
    "KnownAgent",
    "agent_version",
    "detect_agents",
    "find_binary",
    "search_dirs",
]

log = logging.getLogger("ralph_uv.agents.detect")

_VERSION_TIMEOUT = 5.0
_NPM_TIMEOUT = 5.0
_LOCAL_BIN = Path(".tools") / "node" / "node_modules" / ".bin"
_VERSION = re.compile(r"\d+\.\d+(?:\.\d+)?(?:[-+][0-9A-Za-z.-]+)?")


@dataclass(frozen=True, slots=True)
class KnownAgent:
    """An agent CLI ralph-uv knows how to install and run."""

    name: str
    binary: str
    install_hint: str
    backend_kind: str  # "claude", "opencode" or "custom"


KNOWN_AGENTS: dict[str, KnownAgent] = {
    agent.name: agent
    for agent in (
        KnownAgent("claude", "claude", "npm install -g @anthropic-ai/claude-code", "claude"),
        KnownAgent("opencode", "opencode", "npm install -g opencode-ai", "opencode"),
        KnownAgent("codex", "codex", "npm install -g @openai/codex", "custom"),
        KnownAgent("gemini", "gemini", "npm install -g @google/gemini-cli", "custom"),
        KnownAgent("aider", "aider", "pipx install aider-chat", "custom"),
    )
}
_BUILT_IN = ("claude", "opencode")


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """One agent as ``ralph-uv agents`` shows it."""

    name: str
    installed: bool
    path: Path | None
    version: str | None
    install_hint: str | None
    backend_kind: str

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path) if self.path else None
        return data


def _git_root(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        if (folder / ".git").exists():
            return folder
    return None


def _source_checkout() -> Path | None:
    # src/ralph_uv/__init__.py → the checkout's top folder, when running from one.
    top = Path(ralph_uv.__file__).resolve().parents[2]
    return top if (top / "pyproject.toml").is_file() else None


@lru_cache(maxsize=1)
def _npm_global_bin() -> Path | None:
    prefix = os.environ.get("NPM_CONFIG_PREFIX")
    if not prefix:
        npm = shutil.which("npm")
        if npm is None:
            return None
        try:
            done = subprocess.run(
                [npm, "prefix", "-g"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                timeout=_NPM_TIMEOUT, check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        prefix = done.stdout.strip() if done.returncode == 0 else ""
    return Path(prefix) / "bin" if prefix else None


def search_dirs(cwd: Path | None = None) -> list[Path]:
    """The folders searched after ``PATH``, in order, without duplicates."""
    here = (cwd or Path.cwd()).resolve()
    candidates: list[Path | None] = []
    root = _git_root(here)
    candidates.append(root / _LOCAL_BIN if root else None)
    checkout = _source_checkout()
    candidates.append(checkout / _LOCAL_BIN if checkout else None)
    candidates.append(Path.home() / ".local" / "bin")
    candidates.append(_npm_global_bin())
    result: list[Path] = []
    for folder in candidates:
        if folder is not None and folder not in result:
            result.append(folder)
    return result


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_binary(name: str, *, cwd: Path | None = None) -> Path | None:
    """Where the program ``name`` is: a path (with a ``/``) as given, else ``PATH`` first,
    then :func:`search_dirs`. None when it is nowhere."""
    if os.sep in name:
        path = Path(name).expanduser()
        if not path.is_absolute():
            path = (cwd or Path.cwd()) / path
        return path if _executable(path) else None
    found = shutil.which(name)
    if found:
        return Path(found)
    for folder in search_dirs(cwd):
        path = folder / name
        if _executable(path):
            return path
    return None


_versions: dict[tuple[str, int], str | None] = {}
_versions_lock = threading.Lock()


def agent_version(path: Path, timeout: float = _VERSION_TIMEOUT) -> str | None:
    """The version ``path --version`` prints (cached per program for the process), or None
    when it prints none in ``timeout`` seconds."""
    try:
        key = (str(path), path.stat().st_mtime_ns)
    except OSError:
        return None
    with _versions_lock:
        if key in _versions:
            return _versions[key]
    version = _ask_version(path, timeout)
    with _versions_lock:
        _versions[key] = version
    return version


def _ask_version(path: Path, timeout: float) -> str | None:
    try:
        done = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, errors="replace",
            stdin=subprocess.DEVNULL, timeout=timeout, check=False, start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        log.warning("%s --version did not answer within %gs", path, timeout)
        return None
    except OSError as exc:
        log.warning("cannot run %s --version: %s", path, exc)
        return None
    text = (done.stdout.strip() or done.stderr.strip()) if done.returncode == 0 else ""
    if not text:
        return None
    match = _VERSION.search(text)
    return match.group(0) if match else text.splitlines()[0][:60]


def _known_for(command0: str) -> KnownAgent | None:
    return KNOWN_AGENTS.get(Path(command0).name)


def _entry(name: str, program: str, known: KnownAgent | None, kind: str) -> AgentInfo:
    path = find_binary(program)
    hint = known.install_hint if known else None
    if path is None and hint is None:
        hint = f"install {program!r} or fix [agents.{name}].command in config.toml"
    return AgentInfo(name, path is not None, path, None, None if path else hint, kind)


def detect_agents(config: Config | None = None, *, versions: bool = True) -> list[AgentInfo]:
    """claude and opencode, then every agent defined in the config's ``[agents.*]`` tables.

    ``versions=False`` skips running ``--version`` (fast). Blocking: call it from a thread in
    async code.
    """
    entries: list[AgentInfo] = []
    custom = dict(config.agents) if config is not None else {}
    for name in _BUILT_IN:
        if name not in custom:
            known = KNOWN_AGENTS[name]
            entries.append(_entry(name, known.binary, known, known.backend_kind))
    for name, agent in custom.items():
        entries.append(_entry(name, agent.command[0], _known_for(agent.command[0]), "custom"))
    if not versions:
        return entries
    askable = [e for e in entries if e.path is not None and _asks_version(e, custom)]
    with ThreadPoolExecutor(max_workers=max(1, len(askable))) as pool:
        found = dict(zip(
            (e.name for e in askable),
            pool.map(lambda e: agent_version(e.path) if e.path else None, askable),
            strict=True,
        ))
    return [replace(e, version=found[e.name]) if found.get(e.name) else e for e in entries]


def _asks_version(entry: AgentInfo, custom: dict[str, CustomAgent]) -> bool:
    if entry.name not in custom:
        return True
    return _known_for(custom[entry.name].command[0]) is not None

