"""The prompt each iteration gets: which template, and how it is filled in.

The template is the first of these that exists:

1. ``TASK_DIR/prompt.md``
2. ``<config>/prompt.md`` (``~/.config/ralph/prompt.md`` for most users)
3. ``<repository root>/prompt.md``
4. ``<data>/prompt.md``
5. the built-in template shipped with ralph-uv

A template may hold per-agent blocks, ``<!-- agent:NAME -->…<!-- /agent:NAME -->``: the running
agent's blocks are kept (without the markers), every other agent's are removed whole. Then the
variables ``{TASK_DIR}`` ``{PRD_FILE}`` ``{PROGRESS_FILE}`` ``{BRANCH_NAME}`` ``{AGENT}``
``{ITERATION}`` ``{STORY_ID}`` are replaced; any other text in braces is left as it is, so code
samples in a template survive.

The prompt is assembled as: a fixed header (its lines are parsed by other tools and must not
change), a message injected by the operator (when there is one), the PRD's ``notes``, the
``AGENTS.md`` of the repository root and of the task folder, an optional first-run setup
section, and the rendered template.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ralph_uv.config import Paths, paths
from ralph_uv.errors import UserError
from ralph_uv.tasks import git_root

__all__ = [
    "AGENTS_FILE",
    "PROMPT_FILE",
    "VARIABLES",
    "PromptContext",
    "Template",
    "build_prompt",
    "builtin_template",
    "find_template",
    "render_header",
    "render_template",
    "select_agent_blocks",
    "substitute",
    "template_candidates",
]

log = logging.getLogger("ralph_uv.prompt")

PROMPT_FILE = "prompt.md"
AGENTS_FILE = "AGENTS.md"
VARIABLES = (
    "TASK_DIR",
    "PRD_FILE",
    "PROGRESS_FILE",
    "BRANCH_NAME",
    "AGENT",
    "ITERATION",
    "STORY_ID",
)

_VARIABLE = re.compile(r"\{([A-Z][A-Z0-9_]*)\}")
# A block whose markers stand on lines of their own: the marker lines go with it.
_BLOCK_LINES = re.compile(
    r"^[ \t]*<!--\s*agent:(?P<name>[\w.-]+)\s*-->[ \t]*\n"
    r"(?P<body>.*?)"
    r"^[ \t]*<!--\s*/agent:(?P=name)\s*-->[ \t]*(?:\n|\Z)",
    re.DOTALL | re.MULTILINE,
)
_BLOCK_INLINE = re.compile(
    r"<!--\s*agent:(?P<name>[\w.-]+)\s*-->(?P<body>.*?)<!--\s*/agent:(?P=name)\s*-->",
    re.DOTALL,
)

_SETUP = """\
## First-run setup

This is the first iteration in a fresh checkout. Before working on the story, install the
project's dependencies: look for lockfiles and manifests anywhere in the repository
(`uv.lock`, `poetry.lock`, `requirements*.txt`, `package-lock.json`, `pnpm-lock.yaml`,
`yarn.lock`, `Cargo.lock`, `go.sum`, `Gemfile.lock`, ...) and run the matching install command
in each folder that has one, so that the project's checks can run."""


@dataclass(frozen=True, slots=True)
class PromptContext:
    """Everything one iteration's prompt depends on.

    ``repo_root`` defaults to the git top-level of ``task_dir``; ``dirs`` to
    :func:`ralph_uv.config.paths`.
    """

    task_dir: Path
    prd_file: Path
    progress_file: Path
    branch_name: str
    agent: str
    iteration: int
    story_id: str
    notes: str = ""
    repo_root: Path | None = None
    first_run_setup: bool = False
    dirs: Paths | None = None

    def variables(self) -> dict[str, str]:
        """The template variables and their values."""
        return {
            "TASK_DIR": str(self.task_dir),
            "PRD_FILE": str(self.prd_file),
            "PROGRESS_FILE": str(self.progress_file),
            "BRANCH_NAME": self.branch_name,
            "AGENT": self.agent,
            "ITERATION": str(self.iteration),
            "STORY_ID": self.story_id,
        }

    def root(self) -> Path:
        """The repository root: ``repo_root`` when given, else found with git."""
        return self.repo_root if self.repo_root is not None else git_root(self.task_dir)


@dataclass(frozen=True, slots=True)
class Template:
    """A prompt template and where it came from (``path`` is None for the built-in one)."""

    text: str
    path: Path | None

    @property
    def origin(self) -> str:
        return str(self.path) if self.path is not None else "built-in"


def template_candidates(task_dir: Path, repo_root: Path, dirs: Paths | None = None) -> list[Path]:
    """The files searched for a template, in order (the built-in one comes after them)."""
    where = dirs or paths()
    return [
        task_dir / PROMPT_FILE,
        where.config / PROMPT_FILE,
        repo_root / PROMPT_FILE,
        where.data / PROMPT_FILE,
    ]


def builtin_template() -> str:
    """The template shipped with ralph-uv."""
    return resources.files("ralph_uv").joinpath("data", PROMPT_FILE).read_text(encoding="utf-8")


def find_template(task_dir: Path, repo_root: Path, dirs: Paths | None = None) -> Template:
    """The first template found (see the module docstring)."""
    for candidate in template_candidates(task_dir, repo_root, dirs):
        if candidate.is_file():
            log.debug("prompt template: %s", candidate)
            return Template(_read(candidate), candidate)
    return Template(builtin_template(), None)


def select_agent_blocks(text: str, agent: str) -> str:
    """Keep ``agent``'s blocks (markers removed) and drop every other agent's blocks."""

    def keep_or_drop(match: re.Match[str]) -> str:
        return match.group("body") if match.group("name").lower() == agent.lower() else ""

    # Blocks may nest (an agent block inside another one); repeat until nothing changes.
    for _ in range(32):
        new = _BLOCK_INLINE.sub(keep_or_drop, _BLOCK_LINES.sub(keep_or_drop, text))
        if new == text:
            break
        text = new
    return text


def substitute(text: str, variables: Mapping[str, str]) -> str:
    """Replace ``{NAME}`` for the names in ``variables``, in one pass; leave everything else."""

    def value(match: re.Match[str]) -> str:
        return variables.get(match.group(1), match.group(0))

    return _VARIABLE.sub(value, text)


def render_template(text: str, agent: str, variables: Mapping[str, str]) -> str:
    """Select ``agent``'s blocks, then fill in the variables."""
    return substitute(select_agent_blocks(text, agent), variables)


def render_header(ctx: PromptContext) -> str:
    """The fixed header every prompt starts with (other tools parse these lines)."""
    return (
        f"# Ralph loop — iteration {ctx.iteration}\n"
        f"- Task directory: {ctx.task_dir}\n"
        f"- PRD file: {ctx.prd_file}\n"
        f"- Progress file: {ctx.progress_file}\n"
        f"- Branch: {ctx.branch_name}\n"
        f"- Agent: {ctx.agent}\n"
        f"- Story: {ctx.story_id}\n"
    )


def build_prompt(ctx: PromptContext, injected: str | None = None) -> str:
    """The whole prompt for one iteration (see the module docstring for its order)."""
    root = ctx.root()
    parts = [render_header(ctx)]
    if injected and injected.strip():
        parts.append(f"## Message from the operator\n\n{injected.strip()}")
    if ctx.notes.strip():
        parts.append(f"## Notes from the PRD\n\n{ctx.notes.strip()}")
    seen: set[Path] = set()
    for folder, what in ((root, "repository"), (ctx.task_dir, "task")):
        file = folder / AGENTS_FILE
        key = file.resolve()
        if key in seen or not file.is_file():
            continue
        seen.add(key)
        content = _read(file).strip()
        if content:
            parts.append(f"## Instructions for this {what} ({file})\n\n{content}")
    if ctx.first_run_setup:
        parts.append(_SETUP)
    template = find_template(ctx.task_dir, root, ctx.dirs)
    parts.append(render_template(template.text, ctx.agent, ctx.variables()).strip())
    return "\n\n".join(part.rstrip("\n") for part in parts) + "\n"


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc}) — fix or remove the file") from exc
