"""Pushing a remote loop's branch back to its origin every N iterations (origin mode).

A loop started with ``sync: "origin"`` and ``push_every: N`` runs in a checkout of a workspace
whose bare repository knows the project's origin. After every N-th iteration, and once more
when the loop ends, the runner pushes the loop's branch there with ``--force-with-lease``: the
origin's branch is replaced only if nobody else moved it since ralphd last fetched it. A push
that fails (network down, branch moved, no permission) is recorded as an ``error`` event in the
loop's journal and the loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from pathlib import Path

from ralph_uv.prd import check_branch_name
from ralph_uv.runner.engine import LoopEngine

__all__ = ["OriginPusher", "push_branch"]

log = logging.getLogger("ralph_uv.runner.origin")

_PUSH_TIMEOUT = 300.0


def push_branch(root: Path, branch: str, *, remote: str = "origin",
                timeout: float = _PUSH_TIMEOUT) -> str | None:
    """Push ``branch`` from the repository at ``root`` to ``remote`` with a lease; None when
    it worked, else git's words. Blocks: run it in a worker thread."""
    if check_branch_name(branch) is not None:
        return f"{branch!r} is not a branch name git accepts"
    env = dict(os.environ)
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["LC_ALL"] = "C"
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    argv = ["git", "-C", str(root), "-c", "protocol.ext.allow=never", "push", "--quiet",
            "--force-with-lease", remote, f"refs/heads/{branch}:refs/heads/{branch}"]
    try:
        done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors="replace", timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"git push did not finish within {timeout:g} s"
    except OSError as exc:
        return f"cannot run git push: {exc}"
    if done.returncode != 0:
        return (done.stderr.strip() or done.stdout.strip() or
                f"exit status {done.returncode}")[-1000:]
    return None


class OriginPusher:
    """An engine's ``after_iteration`` hook pushing its branch every ``every`` iterations."""

    def __init__(self, every: int, *, remote: str = "origin") -> None:
        if every < 1:
            raise ValueError("push_every must be at least 1")
        self.every = every
        self.remote = remote
        self.pushes = 0

    async def __call__(self, engine: LoopEngine, final: bool) -> None:
        if not engine.branch or (not final and engine.iteration % self.every):
            return
        problem = await asyncio.to_thread(push_branch, engine.repo_root, engine.branch,
                                          remote=self.remote)
        if problem is None:
            self.pushes += 1
            log.info("pushed %s to %s after iteration %d", engine.branch, self.remote,
                     engine.iteration)
            return
        log.warning("pushing %s to %s failed: %s", engine.branch, self.remote, problem)
        engine.journal.append_event("error", {
            "message": f"pushing {engine.branch} to {self.remote} after iteration "
                       f"{engine.iteration} failed (the loop goes on): {problem}",
            "push": True,
        })
