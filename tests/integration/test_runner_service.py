"""The per-loop service, through real runner processes and their real Unix sockets: status,
subscriptions as journal cursors, interactive mode, keystrokes, steering, and bad input.

Each runner runs a real loop whose agent is tests/fixtures/interactive_agent.py in a PTY (it
waits at its terminal, answers lines and floods output on request)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import async_wait_until
from tests.integration.runner_harness import (
    Client,
    StartRunner,
    connect_when_ready,
    process_alive,
    rss_kib,
    wait_status,
)

from ralph_uv.config import Config
from ralph_uv.errors import ErrorCode, RemoteError
from ralph_uv.runner.engine import LoopSpec
from ralph_uv.runner.host import LoopHost
from ralph_uv.runner.service import LoopService
from ralph_uv.transports.base import Stream
from ralph_uv.transports.unix import open_unix

pytestmark = pytest.mark.timeout(120)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def _type(client: Client, text: bytes) -> Any:
    return await client.call("write_pty", {"data": _b64(text)})


async def _error_of(call: Any) -> RemoteError:
    with pytest.raises(RemoteError) as caught:
        await call
    return caught.value


async def _read_reply(stream: Stream, timeout: float = 10) -> dict[str, Any]:  # noqa: ASYNC109
    line = b""
    async with asyncio.timeout(timeout):
        while not line.endswith(b"\n"):
            chunk = await stream.read(1)
            assert chunk, f"connection closed after {line!r}"
            line += chunk
    reply: dict[str, Any] = json.loads(line)
    return reply


async def test_hello_and_status_describe_the_loop(runners: StartRunner) -> None:
    """hello names the runner, the protocol and the loop; get_status reports the running loop,
    its agent with a terminal, nobody in interactive mode and the runner's pid."""
    runner = runners()
    client = await connect_when_ready(runner)
    hello = await client.call("hello", {"protocol": "1.0", "client": "again"})
    assert hello["protocol"] == "1.0"
    assert hello["server"] == "ralph-uv-runner"
    assert hello["loop_id"] == runner.loop_id
    assert {"get_status", "subscribe", "write_pty", "set_interactive_mode"} <= set(
        hello["capabilities"]
    )
    status = await wait_status(client, lambda s: s["iteration"] == 1)
    assert status["loop_id"] == runner.loop_id
    assert status["status"] == "running"
    assert status["agent"] == "cat"
    assert status["backend"] == "pty"
    assert status["interactive"] is True
    assert status["interactive_holder"] is None
    assert status["pid"] == runner.pid
    assert status["story"] == "US-001"
    assert status["stories_total"] == 2
    error = await _error_of(client.call("hello", {"protocol": "2.0", "client": "future"}))
    assert error.code == ErrorCode.UNSUPPORTED_PROTOCOL
    assert "1.0" in error.message
    await client.close()


async def test_subscribe_from_zero_gets_every_byte_and_event(runners: StartRunner) -> None:
    """A subscriber from offset 0 receives the whole output, contiguous and equal to the
    journal, and the loop's events from seq 0."""
    runner = runners("flood")
    client = await connect_when_ready(runner)
    reply = await client.call("subscribe", {"since": {"output": 0, "events": 0}})
    assert reply["output_start"] == 0
    await client.wait_output(b"FLOOD-END", timeout=60)
    assert bytes(client.output) == runner.journal_output()[: len(client.output)]
    assert len(client.output) > 4_000_000
    kinds = [e["type"] for e in client.events if e["type"] != "output"]
    assert kinds[:2] == ["state_change", "iteration_started"]
    assert next(e["seq"] for e in client.events if e["type"] == "state_change") == 0
    await client.close()


async def test_reconnect_with_since_gets_every_byte_exactly_once(runners: StartRunner) -> None:
    """A client that drops mid-stream and resubscribes with since = last seq + length ends up
    with exactly the journal's bytes (same sha256), none twice, none missing."""
    runner = runners("bigflood")
    first = await connect_when_ready(runner, "first")
    await first.call("subscribe", {"streams": ["output"], "since": {"output": 0}})
    await async_wait_until(lambda: len(first.output) > 2_000_000, timeout=60)
    first.endpoint._stream.abort()  # an abrupt drop, whatever was in flight is lost
    await first.close()
    received = bytes(first.output)
    resume_at = first.next_offset
    assert resume_at == len(received)

    second = await Client.connect(runner.socket_path, "second")
    second.next_offset = resume_at
    await second.call("subscribe", {"streams": ["output"], "since": {"output": resume_at}})
    await async_wait_until(lambda: b"FLOOD-END" in second.output[-64:], timeout=90)
    everything = received + bytes(second.output)
    journal = runner.journal_output()
    assert hashlib.sha256(everything).hexdigest() == hashlib.sha256(journal).hexdigest()
    assert second.gaps == []
    await second.close()


async def test_live_subscription_starts_at_the_end(runners: StartRunner) -> None:
    """Subscribing without since gives only what is written afterwards, starting exactly at
    the output_end the reply names; an offset beyond the end is refused."""
    runner = runners()
    client = await connect_when_ready(runner)
    await wait_status(client, lambda s: s["output_end"] > 0)
    reply = await client.call("subscribe")
    client.next_offset = reply["output_end"]
    await client.call("set_interactive_mode", {"enabled": True})
    await _type(client, b"later\r")
    await client.wait_output(b"got: later")
    assert not client.output.startswith(b"agent ready")
    error = await _error_of(client.call("subscribe", {"since": {"output": 10**9}}))
    assert error.code == ErrorCode.INVALID_PARAMS
    assert "outside this loop's output" in error.message
    await client.close()


async def test_get_output_pages_through_the_journal(runners: StartRunner) -> None:
    """get_output returns base64 pages with start/next/end that chain into the whole
    journal; a limit above the maximum is refused."""
    runner = runners("flood")
    client = await connect_when_ready(runner)
    await wait_status(client, lambda s: s["output_end"] > 4_000_000)
    pages, since = [], 0
    while True:
        page = await client.call("get_output", {"since": since, "limit": 1_000_000})
        assert page["start"] == since
        assert page["gap"] is None
        data = base64.b64decode(page["data"])
        if not data:
            break
        pages.append(data)
        since = page["next"]
    assert b"".join(pages) == runner.journal_output()[:since]
    error = await _error_of(client.call("get_output", {"since": 0, "limit": 50_000_000}))
    assert error.code == ErrorCode.INVALID_PARAMS
    await client.close()


async def test_bytes_dropped_by_retention_are_reported_as_a_gap(runners: StartRunner) -> None:
    """With a small journal retention, a subscriber from 0 first gets a gap event naming the
    dropped range, then every kept byte from where the gap ends; get_output says the same."""
    runner = runners("flood", overrides={"journal_retention": 1_000_000})
    client = await connect_when_ready(runner)
    await wait_status(client, lambda s: s["output_end"] > 4_000_000)
    reply = await client.call("subscribe", {"streams": ["output"], "since": {"output": 0}})
    kept_from = reply["output_start"]
    assert kept_from > 0
    await client.wait_output(b"FLOOD-END", timeout=30)
    first = client.events[0]
    assert first["type"] == "gap"
    assert first["data"] == {"from": 0, "to": kept_from}
    assert client.events[1]["type"] == "output"
    assert client.events[1]["seq"] == kept_from
    page = await client.call("get_output", {"since": 0, "limit": 1000})
    assert page["gap"] == {"from": 0, "to": page["start"]}
    assert page["start"] >= kept_from
    await client.close()


async def test_write_pty_to_an_agent_without_a_terminal_says_so(
    task: Path, tmp_path: Path
) -> None:
    """For an agent driven over HTTP (opencode), keystrokes from the interactive holder are
    refused with -32013 and a message pointing to inject_prompt; get_status says the agent has
    no terminal. (Served in this process: the loop need not run.)"""
    host = LoopHost(
        LoopSpec(loop_id="http-1", task_dir=task, agent="opencode", task_name="demo"), Config()
    )
    service = LoopService(host)
    await service.start()
    try:
        client = await Client.connect(service.socket_path, "typist")
        status = await client.call("get_status")
        assert status["interactive"] is False
        assert status["backend"] == "http"
        await client.call("set_interactive_mode", {"enabled": True})
        error = await _error_of(_type(client, b"hello"))
        assert error.code == ErrorCode.NOT_INTERACTIVE
        assert "without a terminal" in error.message
        assert "inject_prompt" in error.message
        await client.close()
    finally:
        await service.close()
        host.close()
    assert not service.socket_path.exists()


async def test_interactive_mode_is_held_by_one_client(runners: StartRunner) -> None:
    """One client holds interactive mode; another's request and keystrokes are refused with
    -32013 naming the holder; everyone sees the holder in get_status and as an event; the
    holder's disconnect releases it, and force takes it over."""
    runner = runners()
    alice = await connect_when_ready(runner, "alice")
    bob = await Client.connect(runner.socket_path, "bob")
    await bob.call("subscribe", {"streams": ["events"]})
    taken = await alice.call("set_interactive_mode", {"enabled": True})
    assert taken["enabled"] is True
    assert taken["holder"].startswith("alice")

    refused = await _error_of(bob.call("set_interactive_mode", {"enabled": True}))
    assert refused.code == ErrorCode.NOT_INTERACTIVE == -32013
    assert "alice" in refused.message
    keys = await _error_of(_type(bob, b"x"))
    assert keys.code == ErrorCode.NOT_INTERACTIVE
    assert "alice" in keys.message
    assert "not in interactive mode" in keys.message
    status = await bob.call("get_status")
    assert status["interactive_holder"].startswith("alice")
    await async_wait_until(lambda: bob.loop_events("interactive_mode"))
    assert bob.loop_events("interactive_mode")[0]["data"]["holder"].startswith("alice")

    await alice.close()
    await wait_status(bob, lambda s: s["interactive_holder"] is None)
    await async_wait_until(lambda: len(bob.loop_events("interactive_mode")) == 2)
    assert bob.loop_events("interactive_mode")[1]["data"]["enabled"] is False
    mine = await bob.call("set_interactive_mode", {"enabled": True})
    assert mine["holder"].startswith("bob")

    carol = await Client.connect(runner.socket_path, "carol")
    forced = await carol.call("set_interactive_mode", {"enabled": True, "force": True})
    assert forced["holder"].startswith("carol")
    assert (await _error_of(_type(bob, b"x"))).code == ErrorCode.NOT_INTERACTIVE
    await bob.close()
    await carol.close()


async def test_keystrokes_reach_the_agent_in_order(runners: StartRunner) -> None:
    """write_pty bytes reach the agent's terminal: the terminal's echo and the agent's answer
    come back as output, in the order they were typed."""
    runner = runners()
    client = await connect_when_ready(runner)
    await client.call("subscribe", {"since": {"output": 0}})
    await client.wait_output(b"agent ready")
    await client.call("set_interactive_mode", {"enabled": True})
    words = [f"word{i}" for i in range(20)]
    await asyncio.gather(*(_type(client, f"{w}\r".encode()) for w in words))
    await client.wait_output(b"got: word19")
    # The terminal's echo of the next word may land inside an answer's line (the kernel
    # interleaves echo with the agent's writes), so the answers are picked out by pattern.
    answers = re.findall(rb"got: (word\d+)", bytes(client.output))
    assert answers == [w.encode() for w in words]
    bad = await _error_of(client.call("write_pty", {"data": "not base64!"}))
    assert bad.code == ErrorCode.INVALID_PARAMS
    await client.close()


async def test_between_iterations_keystrokes_are_refused_and_resize_is_kept(
    runners: StartRunner,
) -> None:
    """A resize applies to the running agent's terminal and to the next iteration's; while
    the loop pauses between iterations, keystrokes are refused with a message saying so."""
    runner = runners(overrides={"pause": 3.0})
    client = await connect_when_ready(runner)
    await client.call("subscribe", {"since": {"output": 0}})
    await client.wait_output(b"agent ready")
    await client.call("set_interactive_mode", {"enabled": True})
    resized = await client.call("resize", {"cols": 100, "rows": 30})
    assert resized["applied"] is True
    await _type(client, b"size\r")
    await client.wait_output(b"size=100x30")
    await _type(client, b"done\r")
    await client.wait_output(b"agent done")

    async def refused_between() -> bool:
        try:
            await _type(client, b"x")
        except RemoteError as exc:
            return exc.code == ErrorCode.BAD_STATE and "between iterations" in exc.message
        return False

    await async_wait_until(refused_between, timeout=10)
    await client.wait_output(b"iteration=2", timeout=20)
    second = bytes(client.output).split(b"iteration=2")[0].rsplit(b"agent ready", 1)[1]
    assert b"size=100x30" in second
    bad = await _error_of(client.call("resize", {"cols": 0, "rows": "x"}))
    assert bad.code == ErrorCode.INVALID_PARAMS
    await client.close()


async def test_stop_now_ends_the_loop_and_the_agent(runners: StartRunner) -> None:
    """stop {when: now} terminates the waiting agent at once and ends the loop as stopped."""
    runner = runners()
    client = await connect_when_ready(runner)
    await client.call("subscribe", {"since": {"output": 0, "events": 0}})
    await client.wait_output(b"agent ready")
    agent_pid = int(bytes(client.output).split(b"pid=")[1].split()[0])
    await client.call("stop", {"when": "now"})
    await async_wait_until(lambda: client.loop_events("loop_finished"), timeout=20)
    assert client.loop_events("loop_finished")[0]["data"]["status"] == "stopped"
    assert not process_alive(agent_pid)
    assert await runner.wait_exit() == 0


@pytest.mark.parametrize(
    ("method", "params", "final"),
    [
        ("stop", {"when": "after_iteration"}, "stopped"),
        ("stop", None, "stopped"),
        ("checkpoint", None, "checkpointed"),
    ],
)
async def test_stop_after_iteration_and_checkpoint_let_the_agent_finish(
    runners: StartRunner, method: str, params: Any, final: str
) -> None:
    """stop after_iteration (the default) and checkpoint leave the running iteration alone;
    when the agent finishes, the loop ends with that status after one iteration."""
    runner = runners()
    client = await connect_when_ready(runner)
    await client.call("subscribe", {"since": {"output": 0, "events": 0}})
    await client.wait_output(b"agent ready")
    await client.call(method, params)
    await client.call("set_interactive_mode", {"enabled": True})
    await _type(client, b"still here\r")
    await client.wait_output(b"got: still here")  # the agent was not interrupted
    await _type(client, b"done\r")
    await async_wait_until(lambda: client.loop_events("loop_finished"), timeout=20)
    finished = client.loop_events("loop_finished")[0]["data"]
    assert finished["status"] == final
    assert finished["iterations"] == 1
    assert await runner.wait_exit() == 0


async def test_resume_leaves_a_stalled_loop(runners: StartRunner) -> None:
    """A loop stalled by the circuit breaker goes on with its next iteration after resume;
    once the loop has ended, resume is refused with BAD_STATE."""
    runner = runners(overrides={"stall_iterations": 1}, linger=10)
    client = await connect_when_ready(runner)
    await client.call("subscribe", {"since": {"output": 0, "events": 0}})
    await client.wait_output(b"agent ready")
    await client.call("set_interactive_mode", {"enabled": True})
    await _type(client, b"done\r")
    stalled = await wait_status(client, lambda s: s["status"] == "stalled")
    assert "no progress" in stalled["reason"]
    assert (await client.call("resume"))["status"] == "stalled"
    await client.wait_output(b"iteration=2")
    assert (await client.call("get_status"))["status"] == "running"
    await client.call("stop", {"when": "now"})
    await async_wait_until(lambda: client.loop_events("loop_finished"), timeout=20)
    error = await _error_of(client.call("resume"))
    assert error.code == ErrorCode.BAD_STATE
    assert "has ended" in error.message
    await client.close()


async def test_inject_prompt_reaches_the_next_iteration(runners: StartRunner) -> None:
    """Injected text appears in the next iteration's prompt file, once, and is announced as
    a prompt_injected event; an empty text is refused."""
    runner = runners()
    client = await connect_when_ready(runner)
    await client.call("subscribe", {"since": {"output": 0, "events": 0}})
    await client.wait_output(b"agent ready")
    reply = await client.call("inject_prompt", {"text": "Please focus on the parser."})
    assert reply["iteration"] == 2
    empty = await _error_of(client.call("inject_prompt", {"text": "  "}))
    assert empty.code == ErrorCode.INVALID_PARAMS
    await async_wait_until(lambda: client.loop_events("prompt_injected"))
    await client.call("set_interactive_mode", {"enabled": True})
    await _type(client, b"done\r")
    await client.wait_output(b"iteration=2")
    prompt = (runner.loop_dir / "agent-prompt.md").read_text()
    assert prompt.startswith("# Ralph loop — iteration 2")
    assert prompt.count("Please focus on the parser.") == 1
    await client.close()


async def test_garbage_gets_error_replies_and_others_are_served(runners: StartRunner) -> None:
    """Invalid JSON, JSON that is not a request, wrong parameter types, a 10 MiB line and
    random binary each get an error reply (or are dropped) without closing the connection,
    and a second client is served meanwhile."""
    runner = runners()
    good = await connect_when_ready(runner, "good")
    raw = await open_unix(runner.socket_path)

    raw.write(b'{"jsonrpc": "2.0", "id": 1, "method": \n')
    assert (await _read_reply(raw))["error"]["code"] == ErrorCode.PARSE_ERROR
    raw.write(b'{"jsonrpc": "2.0", "id": 2}\n')
    assert (await _read_reply(raw))["error"]["code"] == ErrorCode.INVALID_REQUEST
    raw.write(b"[1, 2]\n")
    replies = json.loads(await _read_reply_line(raw))
    assert [r["error"]["code"] for r in replies] == [ErrorCode.INVALID_REQUEST] * 2
    raw.write(b'{"jsonrpc": "2.0", "id": 3, "method": "get_output", "params": {"since": "x"}}\n')
    wrong = await _read_reply(raw)
    assert wrong["id"] == 3
    assert wrong["error"]["code"] == ErrorCode.INVALID_PARAMS
    assert "since" in wrong["error"]["message"]
    raw.write(b'{"jsonrpc": "2.0", "id": 4, "method": "nope"}\n')
    assert (await _read_reply(raw))["error"]["code"] == ErrorCode.METHOD_NOT_FOUND

    huge = b'{"jsonrpc": "2.0", "id": 5, "method": "inject_prompt", "params": {"text": "'
    raw.write(huge + b"a" * (10 * 1024 * 1024) + b'"}}\n')
    sending = asyncio.create_task(raw.drain())
    # While the 10 MiB line streams in, the other client is answered.
    assert (await good.call("get_status"))["loop_id"] == runner.loop_id
    await sending
    too_large = await _read_reply(raw, timeout=30)
    assert too_large["error"]["code"] == ErrorCode.MESSAGE_TOO_LARGE

    rng = random.Random(7)
    noise = bytes(rng.randrange(256) for _ in range(64 * 1024)).replace(b"\n", b"")
    raw.write(noise + b"\n")
    await raw.drain()
    assert (await _read_reply(raw))["error"]["code"] == ErrorCode.PARSE_ERROR
    raw.write(b'{"jsonrpc": "2.0", "id": 6, "method": "get_status"}\n')
    assert (await _read_reply(raw))["result"]["loop_id"] == runner.loop_id
    assert (await good.call("get_status"))["status"] == "running"
    raw.close()
    await good.close()


async def _read_reply_line(stream: Stream) -> bytes:
    line = b""
    async with asyncio.timeout(10):
        while not line.endswith(b"\n"):
            chunk = await stream.read(1)
            assert chunk
            line += chunk
    return line


async def test_many_idle_connections_do_not_block_a_new_client(runners: StartRunner) -> None:
    """500 connections that say nothing leave the runner answering a new client at once."""
    runner = runners()
    first = await connect_when_ready(runner)
    idle = [await open_unix(runner.socket_path) for _ in range(500)]
    fresh = await Client.connect(runner.socket_path, "fresh")
    async with asyncio.timeout(5):
        status = await fresh.call("get_status")
    assert status["loop_id"] == runner.loop_id
    for stream in idle:
        stream.close()
    await fresh.close()
    await first.close()


async def test_a_client_that_never_reads_costs_bounded_memory(runners: StartRunner) -> None:
    """A subscriber that never reads, while the agent writes 48 MB, does not make the runner's
    memory grow with the output, does not slow the agent, and does not stop another
    subscriber from receiving every byte."""
    runner = runners("bigflood")
    watcher = await connect_when_ready(runner, "watcher")
    await wait_status(watcher, lambda s: s["iteration"] == 1)
    baseline = rss_kib(runner.pid)
    stalled = await open_unix(runner.socket_path)
    stalled.write(
        b'{"jsonrpc":"2.0","id":1,"method":"subscribe","params":{"since":{"output":0}}}\n'
        + b"".join(
            b'{"jsonrpc":"2.0","id":%d,"method":"get_output","params":{"since":0,'
            b'"limit":1000000}}\n' % i
            for i in range(2, 200)
        )
    )
    await stalled.drain()
    await watcher.call("subscribe", {"streams": ["output"], "since": {"output": 0}})
    await async_wait_until(lambda: b"FLOOD-END" in watcher.output[-64:], timeout=90)
    assert bytes(watcher.output) == runner.journal_output()[: len(watcher.output)]
    peak = rss_kib(runner.pid)
    assert len(watcher.output) > 48_000_000
    assert peak - baseline < 40_000, f"runner RSS grew by {peak - baseline} KiB"
    assert (await watcher.call("get_status"))["status"] == "running"
    stalled.abort()
    await watcher.close()


async def test_methods_need_the_right_params(runners: StartRunner) -> None:
    """Unknown params, wrong types and missing required params are refused with -32602 naming
    the parameter; unknown subscriptions are refused too."""
    runner = runners()
    client = await connect_when_ready(runner)
    cases: list[tuple[str, Any, str]] = [
        ("stop", {"when": "later"}, "when"),
        ("set_interactive_mode", {"enabled": "yes"}, "enabled"),
        ("inject_prompt", {}, "text"),
        ("subscribe", {"streams": ["video"]}, "streams"),
        ("get_status", {"extra": 1}, "takes no parameters"),
        ("unsubscribe", {"subscription": "9.9"}, "9.9"),
    ]
    for method, params, mentioned in cases:
        error = await _error_of(client.call(method, params))
        assert error.code == ErrorCode.INVALID_PARAMS, (method, error.message)
        assert mentioned in error.message, (method, error.message)
    reply = await client.call("subscribe", {"streams": ["events"]})
    assert (await client.call("unsubscribe", {"subscription": reply["subscription"]})) == {
        "unsubscribed": [reply["subscription"]]
    }
    await client.close()

