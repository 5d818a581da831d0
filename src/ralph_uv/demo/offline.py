"""Environments in which the real agent CLIs talk only to the offline demo model.

Both ``claude`` and ``opencode`` get a private home folder (so a person's own configuration and
login are never read or changed), a prepared configuration that skips first-run dialogs, and the
address of a :class:`~ralph_uv.demo.model_server.ModelServer` on loopback. Used by
``ralph-uv demo`` and by the end-to-end tests.
"""

from __future__ import annotations

import json
from pathlib import Path

from ralph_uv.agents.claude import prepare_offline_claude_config

__all__ = ["DEMO_API_KEY", "offline_agent_env", "private_home_env"]

# Not a secret: the demo model accepts any key; Claude Code only needs one that looks real.
DEMO_API_KEY = "sk-ant-demo-key-0123456789abcdefghijklmnop"


def private_home_env(home: Path) -> dict[str, str]:
    """Variables that give an agent CLI the home folder ``home`` (created) with its XDG folders
    inside it, and keep opencode off the network (no model list, update, LSP or plugin fetch)."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "OPENCODE_DISABLE_MODELS_FETCH": "1",
        "OPENCODE_DISABLE_AUTOUPDATE": "1",
        "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
        # opencode installs its plugin package in the background; keep npm off the network.
        "npm_config_offline": "true",
        "npm_config_registry": "http://127.0.0.1:9/",
    }


def offline_agent_env(root: Path, base_url: str, project_dirs: list[Path]) -> dict[str, str]:
    """Variables that point both agent CLIs at ``base_url`` with a private home under ``root``.

    ``project_dirs`` are the folders the agent will work in (Claude Code's trust dialog is
    answered for them in the prepared configuration).
    """
    home = root / "home"
    claude_config = root / "claude-config"
    private = private_home_env(home)
    for folder in (home / ".config", home / ".local" / "share", home / ".cache"):
        folder.mkdir(parents=True, exist_ok=True)
    prepare_offline_claude_config(claude_config, DEMO_API_KEY, project_dirs)
    opencode_config = {
        "provider": {
            "anthropic": {"options": {"baseURL": f"{base_url}/v1", "apiKey": DEMO_API_KEY}}
        },
        "model": "anthropic/claude-sonnet-4-5",
    }
    return {
        **private,
        "CLAUDE_CONFIG_DIR": str(claude_config),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": DEMO_API_KEY,
        "CLAUDE_CODE_MAX_RETRIES": "1",
        "OPENCODE_CONFIG_CONTENT": json.dumps(opencode_config),
    }
