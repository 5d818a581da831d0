"""The runner's start-up file: what loop to run, written by whoever starts the runner.

ralphd writes ``<loop_dir>/spec.json`` (mode 0600) and starts
``python -m ralph_uv.runner --spec <loop_dir>/spec.json``. The file holds no secrets (agents'
keys come from the ``<config>/env`` file), only the task, the agent and setting overrides::

    {"loop_id": "demo-1a2b3c", "task_dir": "/src/app/tasks/demo", "task_name": "demo",
     "agent": "claude", "model": null, "base_branch": null, "first_run_setup": false,
     "push_every": null, "backend": "pty", "config": {"max_iterations": 20, "pause": 1.0}}

``push_every`` (remote loops in origin mode) pushes the loop's branch to the origin of its
checkout after every N iterations. ``backend`` says where a terminal-based agent runs: ``"pty"``
(a pseudo-terminal of the runner, the default) or ``"tmux"`` (a pane of the tmux session
``ralph-<task>``, see :mod:`ralph_uv.runner.tmux`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ralph_uv.config import Config
from ralph_uv.errors import UserError
from ralph_uv.runner.engine import LoopSpec
from ralph_uv.runner.terminal import TERMINAL_BACKENDS

__all__ = ["RunnerSpec", "read_spec", "write_spec"]

_LOOP_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# Custom agents are defined in config.toml, never smuggled through a spec file.
_NOT_OVERRIDABLE = frozenset({"agents"})


@dataclass(frozen=True, slots=True)
class RunnerSpec:
    """One loop to run, as the runner process receives it."""

    loop_id: str
    task_dir: Path
    task_name: str
    agent: str
    model: str | None = None
    base_branch: str | None = None
    first_run_setup: bool = False
    config: Mapping[str, Any] = field(default_factory=dict)
    push_every: int | None = None
    backend: str = "pty"

    def __post_init__(self) -> None:
        if not _LOOP_ID.match(self.loop_id):
            raise UserError(
                f"loop id {self.loop_id!r} is not valid: use letters, digits, '-', '_' and '.' "
                "(at most 64 characters)"
            )
        if not self.agent:
            raise UserError("the spec names no agent; set \"agent\" (claude, opencode, ...)")
        _check_overrides(self.config)
        if self.push_every is not None and (
            isinstance(self.push_every, bool) or not isinstance(self.push_every, int)
            or self.push_every < 1
        ):
            raise UserError("spec: 'push_every' must be a whole number of iterations, 1 or more")
        if self.backend not in TERMINAL_BACKENDS:
            raise UserError(f"spec: 'backend' must be one of {', '.join(TERMINAL_BACKENDS)}, "
                            f"not {self.backend!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to spec.json."""
        return {
            "loop_id": self.loop_id,
            "task_dir": str(self.task_dir),
            "task_name": self.task_name,
            "agent": self.agent,
            "model": self.model,
            "base_branch": self.base_branch,
            "first_run_setup": self.first_run_setup,
            "push_every": self.push_every,
            "backend": self.backend,
            "config": dict(self.config),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "spec") -> RunnerSpec:
        """Parse the JSON form; :class:`UserError` naming the bad field when it is not one."""

        def text(name: str, *, optional: bool = False) -> Any:
            value = data.get(name)
            if value is None and optional:
                return None
            if not isinstance(value, str) or (not optional and not value):
                raise UserError(f"{source}: {name!r} must be a non-empty string")
            return value

        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}")
        config = data.get("config") or {}
        if not isinstance(config, dict):
            raise UserError(f"{source}: 'config' must be an object of setting overrides")
        first_run = data.get("first_run_setup", False)
        if not isinstance(first_run, bool):
            raise UserError(f"{source}: 'first_run_setup' must be true or false")
        return cls(
            loop_id=text("loop_id"),
            task_dir=Path(text("task_dir")),
            task_name=data.get("task_name") or "",
            agent=text("agent"),
            model=text("model", optional=True),
            base_branch=text("base_branch", optional=True),
            first_run_setup=first_run,
            config=dict(config),
            push_every=data.get("push_every"),
            backend=data.get("backend") or "pty",
        )

    def apply(self, config: Config) -> Config:
        """``config`` with this spec's overrides applied."""
        values = {
            name: tuple(value) if isinstance(value, list) else value
            for name, value in self.config.items()
        }
        return config.with_overrides(**values)

    def loop_spec(self, env: Mapping[str, str] | None = None) -> LoopSpec:
        """The engine's view of this spec; ``env`` holds extra variables for the agent."""
        return LoopSpec(
            loop_id=self.loop_id,
            task_dir=self.task_dir,
            agent=self.agent,
            task_name=self.task_name or self.task_dir.name,
            model=self.model,
            base_branch=self.base_branch,
            first_run_setup=self.first_run_setup,
            env=dict(env or {}),
            backend=self.backend,
        )


def _check_overrides(config: Mapping[str, Any]) -> None:
    for name, value in config.items():
        spec_field = _CONFIG_FIELDS.get(name)
        if spec_field is None or name in _NOT_OVERRIDABLE:
            raise UserError(f"spec: {name!r} is not a setting a loop can override")
        if value is None:
            continue
        kind = str(spec_field.type)
        if "tuple" in kind:
            ok = isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        elif "bool" in kind:
            ok = isinstance(value, bool)
        elif "float" in kind:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif "int" in kind:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise UserError(f"spec: setting {name!r} has a value of the wrong type: {value!r}")


def write_spec(
    path: Path,
    *,
    loop_id: str,
    task_dir: Path,
    task_name: str,
    agent: str,
    model: str | None = None,
    base_branch: str | None = None,
    first_run_setup: bool = False,
    config: Mapping[str, Any] | None = None,
    push_every: int | None = None,
    backend: str = "pty",
) -> RunnerSpec:
    """Validate and write a spec file atomically, readable by this user only; return it."""
    spec = RunnerSpec(
        loop_id=loop_id,
        task_dir=Path(task_dir),
        task_name=task_name,
        agent=agent,
        model=model,
        base_branch=base_branch,
        first_run_setup=first_run_setup,
        config=dict(config or {}),
        push_every=push_every,
        backend=backend,
    )
    payload = (json.dumps(spec.to_dict(), indent=2) + "\n").encode("utf-8")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(payload)
        os.replace(temporary, path)
    except OSError as exc:
        raise UserError(f"cannot write the loop spec {path}: {exc.strerror or exc}") from exc
    return spec


def read_spec(path: Path) -> RunnerSpec:
    """Read a spec file; :class:`UserError` that says what is wrong when it is unusable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UserError(f"no loop spec at {path}; pass the spec.json ralphd wrote") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the loop spec {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return RunnerSpec.from_dict(data, str(path))
