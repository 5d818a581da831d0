"""ralphd's code-sync methods against a real ralphd (its own RALPH_HOME, reached over its Unix
socket, standing in for a remote machine) and real git repositories: bundle uploads in chunks,
fetches from an origin, bad input refused with the right codes, and the per-loop methods
(prd.json, story notes, the opencode server relay)."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.integration.daemon_harness import Ralphd, git, kill_runners, make_task, write_config

from ralph_uv.client.daemon import DaemonClient, connect_daemon
from ralph_uv.client.sync import push_branch_bundle, sync_from_origin
from ralph_uv.config import paths
from ralph_uv.errors import ErrorCode, RemoteError
from ralph_uv.protocol.messages import Params
from ralph_uv.rpc import Endpoint
from ralph_uv.runner.http_info import HttpInfo, write_http_info
from ralph_uv.transports.unix import open_unix

pytestmark = pytest.mark.timeout(120)

StartDaemon = Callable[..., Ralphd]


@pytest.fixture
def start_ralphd() -> Iterator[StartDaemon]:
    """Start ralphd with daemon.toml settings; stopped, and its runners killed, at the end."""
    started: list[Ralphd] = []

    def start(**daemon: Any) -> Ralphd:
        write_config({"min_free_space": 1, **daemon})
        started.append(Ralphd().start())
        return started[-1]

    yield start
    for daemon in started:
        daemon.stop()
    kill_runners()


@pytest.fixture
async def client(start_ralphd: StartDaemon) -> AsyncIterator[DaemonClient]:
    start_ralphd(allow_local_origins=True)
    async with await connect_daemon(autostart=False, client="test") as daemon:
        yield daemon


class CountingEndpoint(Endpoint):
    """A real endpoint that also remembers every call it makes."""

    calls: list[tuple[str, Any]]

    async def call(self, method: str, params: Params = None, *,
                   timeout: float | None = 30.0) -> Any:  # noqa: ASYNC109 - Endpoint's API
        self.calls.append((method, params))
        return await super().call(method, params, timeout=timeout)


async def counting_endpoint() -> CountingEndpoint:
    endpoint = CountingEndpoint(await open_unix(paths().daemon_socket))
    endpoint.calls = []
    endpoint.start()
    await endpoint.call("hello", {"protocol": "1.0", "client": "test"})
    return endpoint


def commit_file(repo: Path, name: str, data: bytes) -> str:
    (repo / name).write_bytes(data)
    git(repo, "add", name)
    git(repo, "commit", "-qm", f"add {name}")
    return git(repo, "rev-parse", "HEAD")


def uploaded_bytes(calls: list[tuple[str, Any]]) -> int:
    return sum(len(base64.b64decode(p["bundle"])) for m, p in calls if m == "sync_upload")


async def code_of(call: Any) -> RemoteError:
    with pytest.raises(RemoteError) as caught:
        await call
    return caught.value


async def test_push_sends_only_what_the_workspace_lacks(
    client: DaemonClient, tmp_path: Path
) -> None:
    """The first push sends the whole branch in ≤ chunk_size chunks (offsets in order); after
    one more commit, the next push sends a bundle a fraction of the size; pushing again with
    nothing new sends nothing; sync_refs lists the branch at the local sha."""
    repo = make_task(tmp_path).parent.parent
    commit_file(repo, "big.bin", random.Random(7).randbytes(512 * 1024))  # incompressible
    endpoint = await counting_endpoint()
    try:
        first = await push_branch_bundle(endpoint, repo, "app", "main", None, chunk_size=64_000)
        uploads = [p for m, p in endpoint.calls if m == "sync_upload"]
        assert len(uploads) >= 8
        assert all(len(base64.b64decode(p["bundle"])) <= 64_000 for p in uploads)
        assert [p["final"] for p in uploads] == [False] * (len(uploads) - 1) + [True]
        offsets = [p["offset"] for p in uploads]
        assert offsets == sorted(offsets)
        assert offsets[0] == 0
        full = uploaded_bytes(endpoint.calls)
        assert first == git(repo, "rev-parse", "HEAD")

        endpoint.calls.clear()
        second_sha = commit_file(repo, "small.txt", b"one more line\n")
        assert await push_branch_bundle(endpoint, repo, "app", "main", None) == second_sha
        assert 0 < uploaded_bytes(endpoint.calls) < full // 10

        endpoint.calls.clear()
        assert await push_branch_bundle(endpoint, repo, "app", "main", None) == second_sha
        assert [m for m, _ in endpoint.calls] == ["sync_refs"]
    finally:
        await endpoint.close()
    refs = await client.endpoint.call("sync_refs", {"project": "app"})
    assert refs == {"project": "app", "exists": True, "refs": {"refs/heads/main": second_sha},
                    "origin": None}
    assert not any((paths().workspaces / "app" / "staging").iterdir())


async def test_push_refuses_to_drop_remote_commits_unless_forced(
    client: DaemonClient, tmp_path: Path
) -> None:
    """A push whose branch lacks commits the workspace's branch has is refused with BAD_STATE
    (saying to pull first); with force it replaces the branch."""
    repo = make_task(tmp_path).parent.parent
    base = git(repo, "rev-parse", "HEAD")
    commit_file(repo, "a.txt", b"a\n")
    await push_branch_bundle(client, repo, "app", "main", None)
    git(repo, "reset", "-q", "--hard", base)
    rewritten = commit_file(repo, "b.txt", b"b\n")
    error = await code_of(push_branch_bundle(client, repo, "app", "main", None))
    assert error.wire_code == ErrorCode.BAD_STATE
    assert "pull" in error.message
    assert await push_branch_bundle(client, repo, "app", "main", None, force=True) == rewritten


async def test_upload_protocol_errors(client: DaemonClient, tmp_path: Path) -> None:
    """Bad names and URLs are INVALID_NAME; a chunk over 1 MiB is MESSAGE_TOO_LARGE; bad
    base64 and a chunk out of order are INVALID_PARAMS (and drop the upload); an unknown
    upload id is BAD_STATE; a different origin than the recorded one is ORIGIN_MISMATCH. Each
    message says what to do, and nothing is left in the staging folder."""
    repo = make_task(tmp_path).parent.parent
    await push_branch_bundle(client, repo, "app", "main", "https://example.com/app.git")
    call = client.endpoint.call
    ok = base64.b64encode(b"x").decode()
    base = {"project": "app", "branch": "main", "bundle": ok}
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({**base, "project": "../etc"}, ErrorCode.INVALID_NAME, "project name"),
        ({**base, "branch": "a..b"}, ErrorCode.INVALID_NAME, "branch name"),
        ({**base, "origin": "ext::sh -c id"}, ErrorCode.INVALID_NAME, "user@host:path"),
        ({**base, "origin": "/srv/app.git"}, ErrorCode.INVALID_NAME, "local paths"),
        ({**base, "origin": "--upload-pack=x"}, ErrorCode.INVALID_NAME, "option"),
        ({**base, "bundle": base64.b64encode(b"\0" * (1024 * 1024 + 1)).decode()},
         ErrorCode.MESSAGE_TOO_LARGE, "at most 1048576"),
        ({**base, "bundle": "***"}, ErrorCode.INVALID_PARAMS, "base64"),
        ({**base, "upload": "feedface"}, ErrorCode.BAD_STATE, "start again"),
        ({**base, "origin": "https://example.com/other.git"}, ErrorCode.ORIGIN_MISMATCH,
         "another project name"),
    ]
    for params, code, words in cases:
        error = await code_of(call("sync_upload", params))
        assert error.wire_code == code, params
        assert words in error.message, error.message
    first = await call("sync_upload", {**base, "offset": 0})
    error = await code_of(call("sync_upload", {**base, "upload": first["upload"], "offset": 5}))
    assert error.wire_code == ErrorCode.INVALID_PARAMS
    assert "in order" in error.message
    gone = await code_of(call("sync_upload", {**base, "upload": first["upload"], "offset": 1}))
    assert gone.wire_code == ErrorCode.BAD_STATE
    junk = await code_of(call("sync_upload", {**base, "final": True}))
    assert junk.wire_code == ErrorCode.INVALID_PARAMS
    assert "not a git bundle" in junk.message
    assert not any((paths().workspaces / "app" / "staging").iterdir())
    bad_project = await code_of(call("sync_refs", {"project": "a/b"}))
    assert bad_project.wire_code == ErrorCode.INVALID_NAME


async def test_disk_full_is_refused_before_anything_is_stored(
    start_ralphd: StartDaemon, tmp_path: Path
) -> None:
    """With less free space than ralphd keeps (min_free_space), an upload is refused with
    DISK_FULL saying how much is needed, and no workspace is created."""
    start_ralphd(min_free_space=1 << 60)
    repo = make_task(tmp_path).parent.parent
    async with await connect_daemon(autostart=False, client="test") as daemon:
        error = await code_of(push_branch_bundle(daemon, repo, "app", "main", None))
    assert error.wire_code == ErrorCode.DISK_FULL
    assert "free" in error.message
    assert not (paths().workspaces / "app" / "bare.git").exists()


async def test_sync_from_origin(client: DaemonClient, tmp_path: Path) -> None:
    """sync_origin fetches the branch from the origin (a file:// origin, accepted because the
    test's daemon.toml sets allow_local_origins) and records it; a branch the origin lacks is
    BRANCH_NOT_FOUND; a different origin for the same project is ORIGIN_MISMATCH."""
    repo = make_task(tmp_path).parent.parent
    origin = tmp_path / "origin.git"
    git(tmp_path, "clone", "-q", "--bare", str(repo), str(origin))
    url = f"file://{origin}"
    sha = await sync_from_origin(client, "app", url, "main")
    assert sha == git(repo, "rev-parse", "HEAD")
    refs = await client.endpoint.call("sync_refs", {"project": "app"})
    assert refs["origin"] == url
    assert refs["refs"] == {"refs/heads/main": sha}
    missing = await code_of(sync_from_origin(client, "app", url, "nope"))
    assert missing.wire_code == ErrorCode.BRANCH_NOT_FOUND
    other = await code_of(sync_from_origin(client, "app", f"file://{tmp_path}/x.git", "main"))
    assert other.wire_code == ErrorCode.ORIGIN_MISMATCH


async def test_local_origins_are_refused_by_default(
    start_ralphd: StartDaemon, tmp_path: Path
) -> None:
    """Without allow_local_origins, a file:// origin is INVALID_NAME and nothing is fetched."""
    start_ralphd()
    async with await connect_daemon(autostart=False, client="test") as daemon:
        error = await code_of(sync_from_origin(daemon, "app", f"file://{tmp_path}", "main"))
    assert error.wire_code == ErrorCode.INVALID_NAME
    assert "ssh://" in error.message
    assert not (paths().workspaces / "app").exists()


async def test_prd_and_story_notes_of_a_loop(client: DaemonClient, tmp_path: Path) -> None:
    """first_run_setup reaches the runner's spec; get_prd returns the loop's prd.json;
    set_story_notes rewrites it keeping every other key; an unknown story is INVALID_PRD; an
    unknown loop is LOOP_NOT_FOUND; a loop without a workspace has nothing to pull
    (BAD_STATE)."""
    task = make_task(tmp_path, stories=2)
    record = await client.start_loop(task, agent="sleep", first_run_setup=True)
    spec = json.loads((paths().loop_dir(record.loop_id) / "spec.json").read_text())
    assert spec["first_run_setup"] is True
    prd = await client.endpoint.call("get_prd", {"loop": record.loop_id})
    assert [s["id"] for s in prd["userStories"]] == ["US-001", "US-002"]
    reply = await client.endpoint.call(
        "set_story_notes", {"loop": "demo", "story": "US-002", "notes": "use the helper"})
    assert reply == {"loop_id": record.loop_id, "story": "US-002", "notes": "use the helper"}
    on_disk = json.loads((task / "prd.json").read_text())
    assert on_disk["userStories"][1]["notes"] == "use the helper"
    assert on_disk["description"] == "daemon test"
    unknown = await code_of(client.endpoint.call(
        "set_story_notes", {"loop": "demo", "story": "US-404", "notes": "x"}))
    assert unknown.wire_code == ErrorCode.INVALID_PRD
    nowhere = await code_of(client.endpoint.call("get_prd", {"loop": "nope"}))
    assert nowhere.wire_code == ErrorCode.LOOP_NOT_FOUND
    no_pull = await code_of(client.endpoint.call("pull_bundle", {"loop": record.loop_id}))
    assert no_pull.wire_code == ErrorCode.BAD_STATE
    assert "nothing to pull" in no_pull.message
    await client.stop_loop(record.loop_id, "now")


async def test_progress_log_of_a_loop(client: DaemonClient, tmp_path: Path) -> None:
    """get_progress sends the task's archives (oldest first) and then progress.txt; with a
    limit only the newest characters, saying that older text was left out; a limit of 0 or
    above 512 Ki is INVALID_PARAMS, naming the parameter."""
    task = make_task(tmp_path, stories=1)
    record = await client.start_loop(task, agent="sleep")
    (task / "progress-2.txt").write_text("second archive\n")
    (task / "progress-1.txt").write_text("first archive\n")
    (task / "progress.txt").write_text("## 2026-11-21 - US-001\nnow ü\n")
    reply = await client.endpoint.call("get_progress", {"loop": record.loop_id})
    assert reply == {"loop_id": record.loop_id, "truncated": False,
                     "text": "first archive\n\nsecond archive\n\n## 2026-11-21 - US-001\nnow ü\n"}
    assert await client.get_progress("demo", limit=6) == "now ü\n"
    tail = await client.endpoint.call("get_progress", {"loop": "demo", "limit": 6})
    assert tail["truncated"] is True
    for limit in (0, 512 * 1024 + 1):
        bad = await code_of(client.endpoint.call("get_progress", {"loop": "demo",
                                                                  "limit": limit}))
        assert bad.wire_code == ErrorCode.INVALID_PARAMS
        assert "'limit'" in bad.message
    await client.stop_loop(record.loop_id, "now")


async def _http_server() -> tuple[asyncio.Server, list[bytes]]:
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        seen.append(request)
        body = b'{"healthy":true}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0), seen


async def _raw_call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ident: int,
                    method: str, params: dict[str, Any]) -> dict[str, Any]:
    writer.write(json.dumps({"jsonrpc": "2.0", "id": ident, "method": method,
                             "params": params}).encode() + b"\n")
    await writer.drain()
    reply: dict[str, Any] = json.loads(await reader.readline())
    return reply


async def test_opencode_server_relay_and_password(client: DaemonClient, tmp_path: Path) -> None:
    """For a running loop whose runner published http.json, get_http_auth returns the password
    and connect_http turns the connection into a byte relay to that loopback port (an HTTP
    request goes through and its answer comes back). Without http.json both are BAD_STATE;
    a file pointing off loopback is refused."""
    task = make_task(tmp_path)
    record = await client.start_loop(task, agent="sleep")
    none = await code_of(client.endpoint.call("get_http_auth", {"loop": record.loop_id}))
    assert none.wire_code == ErrorCode.BAD_STATE
    assert "opencode" in none.message
    server, seen = await _http_server()
    port = server.sockets[0].getsockname()[1]
    loop_dir = paths().loop_dir(record.loop_id)
    write_http_info(loop_dir, HttpInfo(f"http://127.0.0.1:{port}", "s3cret"))
    assert stat.S_IMODE((loop_dir / "http.json").stat().st_mode) == 0o600
    auth = await client.endpoint.call("get_http_auth", {"loop": "demo"})
    assert auth["password"] == "s3cret"
    assert auth["username"] == "opencode"
    reader, writer = await asyncio.open_unix_connection(str(paths().daemon_socket))
    try:
        await _raw_call(reader, writer, 1, "hello", {"protocol": "1.0", "client": "test"})
        reply = await _raw_call(reader, writer, 2, "connect_http", {"loop": record.loop_id})
        assert reply["result"] == {"loop_id": record.loop_id}
        writer.write(b"GET /global/health HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        server.close()
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert answer.endswith(b'{"healthy":true}')
    assert seen == [b"GET /global/health HTTP/1.1\r\nHost: x\r\n\r\n"]
    write_http_info(loop_dir, HttpInfo("http://192.0.2.1:80", "x"))
    far = await code_of(client.endpoint.call("connect_http", {"loop": record.loop_id}))
    assert far.wire_code == ErrorCode.BAD_STATE
    assert "loopback" in far.message
    await client.stop_loop(record.loop_id, "now")


async def test_install_agents_refuses_what_npm_cannot_install(
    client: DaemonClient, tmp_path: Path
) -> None:
    """start_loop with install_agents for a missing custom agent is AGENT_NOT_FOUND saying it
    cannot be installed automatically; no loop is recorded."""
    task = make_task(tmp_path)
    error = await code_of(client.endpoint.call(
        "start_loop", {"task_dir": str(task), "agent": "missing", "install_agents": True}))
    assert error.wire_code == ErrorCode.AGENT_NOT_FOUND
    assert "cannot be installed automatically" in error.message
    assert await client.list_loops(all=True) == []

