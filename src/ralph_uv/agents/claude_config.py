"""A Claude Code config folder in which the TUI starts offline, without any dialog.

For ``CLAUDE_CONFIG_DIR`` in the demo and the tests only: a person's own config is never touched.
Claude Code 2.1 keeps its first-run answers in ``.claude.json`` (onboarding, approved API keys,
trusted folders) and the bypass-permissions acceptance in ``settings.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ralph_uv.errors import UserError

__all__ = ["prepare_offline_claude_config"]


def prepare_offline_claude_config(
    config_dir: Path, api_key: str, project_dirs: Iterable[Path]
) -> Path:
    """Make ``config_dir`` (for ``CLAUDE_CONFIG_DIR``) start Claude Code without any dialog.

    Writes ``.claude.json`` (onboarding done, bypass-permissions mode accepted, ``api_key``
    approved, each of ``project_dirs`` trusted) and ``settings.json`` (no bypass-permissions
    prompt), keeping whatever else those files hold. For the demo and tests only: never point
    it at a person's own config folder. Returns the ``.claude.json`` path.
    """
    state_file = config_dir / ".claude.json"
    settings_file = config_dir / "settings.json"
    try:
        config_dir.mkdir(parents=True, exist_ok=True)
        state = _load_json_object(state_file)
        state["hasCompletedOnboarding"] = True
        state["bypassPermissionsModeAccepted"] = True
        responses = state.setdefault("customApiKeyResponses", {"approved": [], "rejected": []})
        approved = responses.setdefault("approved", [])
        if api_key and api_key[-20:] not in approved:
            approved.append(api_key[-20:])
        projects = state.setdefault("projects", {})
        for folder in project_dirs:
            for name in {str(folder), str(Path(folder).resolve())}:
                projects.setdefault(name, {})["hasTrustDialogAccepted"] = True
        state_file.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        settings = _load_json_object(settings_file)
        settings["skipDangerousModePermissionPrompt"] = True
        settings_file.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write Claude Code's config in {config_dir}: {exc.strerror}") \
            from exc
    return state_file


def _load_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); remove it and try again") from exc
    return data if isinstance(data, dict) else {}
