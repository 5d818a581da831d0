"""A remote that answers the code-sync calls with replies this client cannot use (an older or
broken ralph-uv over there): pushing and pulling stop with a message saying so, never a
KeyError or a base64 error, and nothing is left behind in the repository. The peer is an
in-memory endpoint playing ralphd; the repository and git are real."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.integration.daemon_harness import make_task

from ralph_uv.client.sync import pull_loop_branch, push_branch_bundle
from ralph_uv.errors import RalphError
from ralph_uv.protocol import Dispatcher
from ralph_uv.rpc import Endpoint
from ralph_uv.transports.base import memory_pair

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def peer(replies: dict[str, Any]) -> AsyncIterator[Endpoint]:
    """A client endpoint whose other side answers each method with ``replies[method]``."""
    methods: Dispatcher[None] = Dispatcher()
    for name, reply in replies.items():
        methods.add(name, _answering(reply), allow_extra=True)
    client_stream, server_stream = memory_pair(1 << 20)
    client, server = Endpoint(client_stream), Endpoint(server_stream, methods)
    async with client, server:
        yield client


@dataclass(frozen=True, slots=True)
class _Whatever:
    """Any parameters (allow_extra keeps them all out)."""


def _answering(reply: Any) -> Callable[[None, _Whatever], Awaitable[Any]]:
    async def answer(conn: None, params: _Whatever) -> Any:
        return reply

    return answer


def _repo(tmp_path: Path) -> Path:
    return make_task(tmp_path).parent.parent


def _stray_bundles(repo: Path) -> list[Path]:
    return list((repo / ".git").glob("ralph-pull-*"))


async def test_a_pull_reply_without_its_fields_is_a_clear_error(tmp_path: Path) -> None:
    """pull_bundle answered without sha, or with a bundle that is not base64: a RalphError
    naming the reply and asking whether both sides run the same version; no bundle file is
    left in .git."""
    repo = _repo(tmp_path)
    for reply in ({"branch": "ralph/demo"},
                  {"branch": "ralph/demo", "sha": "0" * 40, "bundle": "not base64!",
                   "next": 1, "end": 1}):
        async with peer({"pull_bundle": reply}) as client:
            with pytest.raises(RalphError) as caught:
                await pull_loop_branch(client, repo, "demo")
        assert "the remote sent a pull_bundle reply that cannot be read" in caught.value.message
        assert "same version" in caught.value.message
        assert _stray_bundles(repo) == []


async def test_an_upload_reply_without_its_id_is_a_clear_error(tmp_path: Path) -> None:
    """sync_upload answered without the upload id it must give for a bundle sent in chunks:
    a RalphError saying which field is missing."""
    repo = _repo(tmp_path)
    async with peer({"sync_refs": {"project": "app", "exists": False, "refs": {}},
                     "sync_upload": {"received": 1}}) as client:
        with pytest.raises(RalphError) as caught:
            await push_branch_bundle(client, repo, "app", "main", None, chunk_size=64)
    assert caught.value.message == ("the remote sent a sync_upload reply without 'upload'; is "
                                    "its ralph-uv the same version as this one?")
