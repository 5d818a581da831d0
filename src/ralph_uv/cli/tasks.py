"""``ralph-uv validate`` and ``ralph-uv init``: check a task's prd.json, scaffold a new task."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ralph_uv.cli import cli
from ralph_uv.prd import load_prd, validate_prd
from ralph_uv.prompt import builtin_template
from ralph_uv.tasks import resolve_task, scaffold_task

__all__ = ["init_command", "validate_command"]


@cli.command("validate")
@click.argument("task")
@click.option("--json", "as_json", is_flag=True, help="Print {valid, problems} as JSON.")
@click.pass_context
def validate_command(ctx: click.Context, task: str, as_json: bool) -> None:
    """Check TASK's prd.json (TASK: a name under tasks/, a folder or a prd.json).

    Exits 0 when it is valid, 2 when it is not.
    """
    ref = resolve_task(task, must_exist=False)
    problems = validate_prd(ref.prd_file)
    if as_json:
        report = {
            "valid": not problems,
            "file": str(ref.prd_file),
            "problems": [p.to_dict() for p in problems],
        }
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    elif problems:
        for problem in problems:
            click.echo(str(problem))
        count = len(problems)
        click.echo(f"{count} problem{'s' if count != 1 else ''} found", err=True)
    else:
        prd = load_prd(ref.prd_file)
        done, total = prd.counts()
        click.echo(
            f"OK: {_show(ref.prd_file)} is valid (schema {prd.schema_version}, "
            f"{done}/{total} stories pass)"
        )
    ctx.exit(2 if problems else 0)


@cli.command("init")
@click.argument("task")
@click.option("--type", "task_type", default="feature", show_default=True, help="Task type.")
@click.option("--branch", default=None, help="Git branch for the work [default: ralph/TASK].")
@click.option("--force", is_flag=True, help="Overwrite an existing prd.json and prompt.md.")
def init_command(task: str, task_type: str, branch: str | None, force: bool) -> None:
    """Create tasks/TASK/prd.json and prompt.md to edit."""
    ref = resolve_task(task, must_exist=False)
    created = scaffold_task(
        ref, template=builtin_template(), task_type=task_type, branch=branch, force=force
    )
    for path in created:
        click.echo(f"Created {_show(path)}")
    target = ref.name if ref.dir == ref.root / "tasks" / ref.name else _show(ref.dir)
    click.echo(
        f"\nNext: write your stories in {_show(ref.prd_file)} (and adjust "
        f"{_show(ref.prompt_file)} if you like), then run:\n"
        f"  ralph-uv validate {target}\n"
        f"  ralph-uv run {target}"
    )


def _show(path: Path) -> str:
    """``path`` relative to the current folder when it is below it."""
    try:
        return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)
    except (OSError, ValueError):
        return str(path)
