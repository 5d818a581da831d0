"""The dashboard (``ralph-uv tui``) driven with Textual's Pilot against real loops: a real
ralphd (started by the test, or several in different RALPH_HOMEs standing in for remote
machines), real runners, and stand-in agents in real PTYs (tests/fixtures/long_agent.py ticks,
tui_agent.py writes a banner and a progress.txt entry and answers what is typed at it).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.helpers import async_wait_until
from tests.integration.tui_harness import (
    Daemon,
    PtyApp,
    journal_bytes,
    make_repo,
    stable_lines,
    svg_lines,
    write_config,
)
from textual.pilot import Pilot

from ralph_uv.client.loops import LoopConnection
from ralph_uv.registry import Registry, RemoteRecord, SessionRecord
from ralph_uv.status import LoopStatus
from ralph_uv.tui.app import RalphTui
from ralph_uv.tui.locations import LocationState, default_locations, local_location
from ralph_uv.tui.screens.detail import DetailScreen
from ralph_uv.tui.screens.dialogs import ConfirmScreen, TextScreen
from ralph_uv.tui.screens.help import HelpScreen
from ralph_uv.tui.screens.log import LogScreen
from ralph_uv.tui.screens.loops import LoopsScreen
from ralph_uv.tui.screens.new_loop import NewLoopScreen
from ralph_uv.tui.source import LoopKey
from ralph_uv.tui.widgets.loops_table import LoopsTable
from ralph_uv.tui.widgets.status_bar import StatusBar

pytestmark = pytest.mark.timeout(180)

CLIENT = "tui-test"
SIZE = (140, 40)
SNAPSHOTS = Path(__file__).parent / "__snapshots__" / "test_tui"


@dataclass
class Env:
    home: Path
    repo: Path
    daemon: Daemon

    def task(self, name: str) -> Path:
        return self.repo / "tasks" / name


@pytest.fixture
def env(ralph_home: Path, tmp_path: Path) -> Iterator[Env]:
    """A repository with tasks alpha and beta, the test agents, and a ralphd; every runner
    is killed afterwards."""
    repo = make_repo(tmp_path)
    write_config(ralph_home)
    daemon = Daemon(ralph_home).start()
    yield Env(ralph_home, repo, daemon)
    daemon.stop()
    daemon.kill_runners()


def make_app(env: Env, **kwargs: object) -> RalphTui:
    return RalphTui(
        [local_location(CLIENT, autostart=False)], client=CLIENT, tasks_root=env.repo,
        **kwargs,  # type: ignore[arg-type]
    )


def table(app: RalphTui) -> LoopsTable:
    return app.screen.query_one(LoopsTable)


def cells(app: RalphTui) -> list[list[str]]:
    """The loops table as text, row by row."""
    t = table(app)
    return [t.row_text(i) for i in range(t.row_count)]


def notices(app: RalphTui) -> str:
    return "\n".join(f"{n.severity}: {n.message}" for n in app.notices)


async def wait_for(
    pilot: Pilot[None], cond: object, timeout: float = 20.0  # noqa: ASYNC109 - a polling deadline
) -> None:
    """Poll ``cond`` while the app runs (Pilot's pause lets it process messages)."""

    async def check() -> object:
        await pilot.pause()
        return cond() if callable(cond) else cond

    try:
        await async_wait_until(check, timeout=timeout, interval=0.05)
    except AssertionError as exc:
        app = pilot.app
        said = notices(app) if isinstance(app, RalphTui) else ""
        raise AssertionError(f"{exc}\nscreen: {app.screen!r}\nnotices:\n{said}") from None


async def open_detail(pilot: Pilot[None], app: RalphTui, key: LoopKey) -> DetailScreen:
    await wait_for(pilot, lambda: table(app).select(key))
    table(app).focus()
    await pilot.press("enter")
    await wait_for(pilot, lambda: isinstance(app.screen, DetailScreen))
    screen = app.screen
    assert isinstance(screen, DetailScreen)
    await wait_for(pilot, lambda: screen.feed is not None and screen.snapshot is not None)
    return screen


def terminal_text(screen: DetailScreen) -> str:
    return "\n".join(screen.terminal.emulator.lines_text())


# ------------------------------------------------------------------------------ the loops


async def test_loops_screen_lists_loops_live_filters_and_sorts(env: Env) -> None:
    """Every loop shows with task, location, coloured status, iteration, story, stories
    done/total, agent and times; a loop started or stopped while the dashboard runs changes
    its row through events; the text and status filters keep matching rows; `o` and a
    header click sort by a column, `O` reverses."""
    alpha = await env.daemon.start_loop(env.task("alpha"), "tick", max_iterations=4)
    app = make_app(env)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: len(cells(app)) == 1)
        [row] = cells(app)
        assert row[:7] == ["alpha", "local", "running", "1/4", "US-001", "0/3", "tick"]
        assert row[9] == alpha.loop_id
        await wait_for(pilot, lambda: cells(app)[0][8].endswith("ago"))

        beta = await env.daemon.start_loop(env.task("beta"), "sleep", max_iterations=2)
        await wait_for(pilot, lambda: len(cells(app)) == 2)
        assert [r[0] for r in cells(app)] == ["beta", "alpha"]  # newest first

        await pilot.press("o")  # the first column: task
        assert table(app).sort_column == "task"
        assert [r[0] for r in cells(app)] == ["alpha", "beta"]
        await pilot.press("O")
        assert [r[0] for r in cells(app)] == ["beta", "alpha"]
        await pilot.click(LoopsTable, offset=(table(app).column_x("status") + 1, 0))
        await wait_for(pilot, lambda: table(app).sort_column == "status")

        await pilot.press("slash", *"alp")
        await wait_for(pilot, lambda: [r[0] for r in cells(app)] == ["alpha"])
        await pilot.press("escape")
        await wait_for(pilot, lambda: len(cells(app)) == 2)

        await pilot.press("f", "f")  # all -> active -> finished
        await wait_for(pilot, lambda: table(app).status_filter == "finished")
        assert cells(app) == []
        async with await env.daemon.client() as daemon:
            await daemon.stop_loop(beta.loop_id, "now")
        await wait_for(pilot, lambda: [r[0] for r in cells(app)] == ["beta"])
        assert cells(app)[0][2] == "stopped"
        bar = app.screen.query_one(StatusBar)
        assert "local" in bar.plain
        assert "1 running" in bar.plain


async def test_detail_shows_stories_story_progress_events_and_live_terminal(env: Env) -> None:
    """The detail screen shows the stories (current, pending, blocked, per-criterion
    progress), the current story's description, notes and its progress.txt entry, the loop's
    events, and the agent's real output in the terminal as it is written."""
    record = await env.daemon.start_loop(env.task("alpha"), "tui", max_iterations=3)
    app = make_app(env)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_detail(pilot, app, LoopKey("local", record.loop_id))
        await wait_for(pilot, lambda: "TUI agent ready working on US-001" in terminal_text(screen))
        stories = screen.stories
        marks = [str(stories.get_option_at_index(i).prompt).split("\n")[0]
                 for i in range(stories.option_count)]
        assert marks[0].startswith("▶ US-001 Story 1  [0/2]")
        assert marks[1].startswith("· US-002")
        assert marks[2].startswith("⊘ US-003")
        assert "waits for US-002" in marks[2]
        assert "As a tester, I want story 1 done." in screen.story_text
        # progress.txt is read again on loop events; the agent wrote its entry in the middle
        # of the iteration, so the test asks for the read the next event would cause.
        await wait_for(pilot, lambda: "started US-001 from the TUI test agent"
                       in screen.story_text or screen.reload_task())
        events = "\n".join(str(line.text) for line in screen.query_one("#events").lines)
        assert "iteration 1 started: US-001 (tui)" in events
        # Colours reach the terminal: the banner's first word is bold green.
        [banner] = [i for i, t in enumerate(screen.terminal.emulator.lines_text())
                    if "TUI agent ready" in t]
        text, attrs = screen.terminal.emulator.runs(banner)[0]
        assert text == "TUI agent ready"
        assert (attrs[0], attrs[2]) == ("green", True)  # fg, bold


async def test_interactive_mode_types_into_the_agent_and_says_who_holds_it(env: Env) -> None:
    """`i` takes interactive mode: the status bar says so, every key goes to the agent (its
    answer appears in the terminal), another client sees this one as the holder; Ctrl-]
    gives it back. While another client holds it, `i` is refused with the holder's name."""
    record = await env.daemon.start_loop(env.task("beta"), "tui", max_iterations=2)
    app = make_app(env)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_detail(pilot, app, LoopKey("local", record.loop_id))
        await wait_for(pilot, lambda: "TUI agent ready" in terminal_text(screen))
        bar = screen.query_one("#status-bar", StatusBar)
        await pilot.press("i")
        await wait_for(pilot, lambda: "INTERACTIVE: you hold it" in bar.plain)
        assert screen.terminal.interactive
        assert screen.terminal.has_focus
        await pilot.press(*"hello q", "enter")  # q and s are keys, not app commands, now
        await wait_for(pilot, lambda: "typed: hello q" in terminal_text(screen))

        async with await env.daemon.client() as daemon:
            other = await LoopConnection.open(await daemon.connect_loop(record.loop_id),
                                              client="other-client")
            try:
                assert (await other.status()).interactive_holder.startswith(CLIENT)
                await pilot.press("ctrl+right_square_bracket")
                await wait_for(pilot, lambda: "observe" in bar.plain)
                assert (await other.status()).interactive_holder is None

                await other.set_interactive(True)
                await wait_for(pilot, lambda: "other-client" in bar.plain)
                await pilot.press("i")
                await wait_for(pilot, lambda: "interactive mode is held by other-client"
                               in notices(app))
                assert not screen.terminal.interactive
            finally:
                await other.close()


async def test_stop_checkpoint_inject_from_any_screen(env: Env) -> None:
    """From the loops table: `p` injects a prompt (the loop records prompt_injected), `c`
    checkpoints (the loop ends checkpointed after its iteration); from the detail screen `S`
    asks, then stops the loop at once; `s` on an ended loop says it has ended."""
    first = await env.daemon.start_loop(env.task("alpha"), "sleepwork", max_iterations=3)
    second = await env.daemon.start_loop(env.task("beta"), "tick", max_iterations=3)
    app = make_app(env)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: table(app).select(LoopKey("local", first.loop_id)))
        await pilot.press("p")
        await wait_for(pilot, lambda: isinstance(app.screen, TextScreen))
        await pilot.press(*"focus on tests")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: "prompt queued" in notices(app))
        await pilot.press("c")
        await wait_for(pilot, lambda: "checkpoints after this iteration" in notices(app))
        await wait_for(
            pilot, lambda: (app.source.row(LoopKey("local", first.loop_id)) or 0)
            and app.source.row(LoopKey("local", first.loop_id)).status  # type: ignore[union-attr]
            is LoopStatus.CHECKPOINTED, timeout=60,
        )
        events = (env.home / "state" / "loops" / first.loop_id / "events.ndjson").read_text()
        assert '"prompt_injected"' in events

        screen = await open_detail(pilot, app, LoopKey("local", second.loop_id))
        await pilot.press("S")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: "stopping now" in notices(app))
        key = LoopKey("local", second.loop_id)
        await wait_for(pilot, lambda: app.source.row(key).status  # type: ignore[union-attr]
                       is LoopStatus.STOPPED, timeout=30)
        assert app.screen is screen
        await pilot.press("s")
        await wait_for(pilot, lambda: "has already ended: stopped" in notices(app))


async def test_edit_notes_writes_prd_json_and_remote_only_actions_say_why(env: Env) -> None:
    """`e` opens the highlighted story's notes; saving writes them into prd.json (every other
    key kept) and the story panel shows them; `b` on a local loop says there is nothing to
    pull; a failing action (checkpoint of an ended loop) says why."""
    record = await env.daemon.start_loop(env.task("alpha"), "tui", max_iterations=2)
    app = make_app(env)
    prd_file = env.task("alpha") / "prd.json"
    before = json.loads(prd_file.read_text())
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_detail(pilot, app, LoopKey("local", record.loop_id))
        screen.stories.focus()
        await pilot.press("down")  # US-002
        await wait_for(pilot, lambda: screen.stories.selected_story == "US-002")
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, TextScreen))
        await pilot.press(*"mind the cache")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: "US-002: notes saved" in notices(app))
        after = json.loads(prd_file.read_text())
        assert after["userStories"][1]["notes"] == "mind the cache"
        after["userStories"][1]["notes"] = ""
        assert after == before
        await wait_for(pilot, lambda: "mind the cache" in screen.story_text)

        await pilot.press("b")
        await wait_for(pilot, lambda: "nothing to pull" in notices(app))
        await pilot.press("S", "y")
        await wait_for(pilot, lambda: app.source.row(screen.key).status  # type: ignore[union-attr]
                       is LoopStatus.STOPPED, timeout=30)
        await pilot.press("c")
        await wait_for(pilot, lambda: "has already ended" in notices(app))


async def test_new_loop_form_starts_a_loop_and_opens_its_detail(env: Env) -> None:
    """`n` lists the repository's tasks with stories done/total; picking one, an agent and
    an iteration limit starts the loop through ralphd and opens its detail, whose terminal
    shows the agent's output."""
    app = make_app(env)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.source.location_infos()[0].state
                       is LocationState.ONLINE)
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, NewLoopScreen))
        form = app.screen
        assert isinstance(form, NewLoopScreen)
        assert [t.label for t in form.tasks] == ["[0/3] alpha", "[0/1] beta"]
        await wait_for(pilot, lambda: "tick" in form.agent_names)
        await pilot.press("enter", "down", "down", "enter")  # task: beta
        await pilot.press("tab", "tab", "enter")  # agent list
        await pilot.press(*["down"] * form.agent_names.index("tick"), "enter")
        await pilot.press("tab", "end", "backspace", "backspace", "backspace", "2")
        assert form.query_one("#max-iterations").value == "2"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, DetailScreen), timeout=60)
        screen = app.screen
        assert isinstance(screen, DetailScreen)
        row = app.source.row(screen.key)
        assert row is not None
        assert (row.task_name, row.agent, row.max_iterations) == (
            "beta", "tick", 2)
        await wait_for(pilot, lambda: "tick 3" in terminal_text(screen))


async def test_log_screen_shows_the_journal_text(env: Env) -> None:
    """`l` shows the loop's output as plain text (escape sequences removed), also for a loop
    that has ended."""
    record = await env.daemon.start_loop(env.task("beta"), "tui", max_iterations=1)
    app = make_app(env)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: table(app).select(LoopKey("local", record.loop_id)))
        await wait_for(pilot, lambda: b"lines typed here" in journal_bytes(env.home,
                                                                           record.loop_id))
        async with await env.daemon.client() as daemon:
            await daemon.stop_loop(record.loop_id, "now")
        await wait_for(pilot, lambda: cells(app)[0][2] == "stopped", timeout=30)
        await pilot.press("l")
        await wait_for(pilot, lambda: isinstance(app.screen, LogScreen))
        log = app.screen.query_one("#log")
        await wait_for(pilot, lambda: log.line_count > 1)
        text = "\n".join(log.lines)
        assert "TUI agent ready working on US-001" in text
        assert "\x1b" not in text
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, LoopsScreen))


async def test_terminal_resumes_without_gap_after_the_connection_drops(env: Env) -> None:
    """When ralphd dies (the relay to the runner drops) and comes back, the detail screen's
    feed reconnects by itself and subscribes from the next byte: the bytes shown are the
    journal's, each once, in order, before and after the drop; the search finds old lines."""
    record = await env.daemon.start_loop(env.task("alpha"), "tick", max_iterations=2)
    app = make_app(env)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_detail(pilot, app, LoopKey("local", record.loop_id))
        feed = screen.feed
        assert feed is not None
        received = bytearray()
        start = feed.output_next or 0
        feed.add_output_sink(received.extend)
        await wait_for(pilot, lambda: received.count(b"tick") >= 3)
        env.daemon.kill9()
        await wait_for(pilot, lambda: feed.status.value != "live")
        env.daemon.start()
        await wait_for(pilot, lambda: feed.reconnects >= 1 and feed.status.value == "live",
                       timeout=30)
        mark = len(received)
        await wait_for(pilot, lambda: received[mark:].count(b"tick") >= 3)
        journal = journal_bytes(env.home, record.loop_id)
        assert bytes(received) == journal[start : start + len(received)]
        numbers = [int(n) for n in re.findall(rb"tick (\d+)", bytes(received))]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        screen.terminal.flush_all()
        shown = terminal_text(screen)
        assert f"tick {numbers[-1]}" in shown
        screen.action_search()
        await pilot.press(*f"tick {numbers[0]}", "enter")
        match = screen.terminal.match_line
        assert match is not None
        assert screen.terminal.emulator.text(match) == f"tick {numbers[0]}"


async def test_several_locations_and_unreachable_ones(env: Env, tmp_path: Path) -> None:
    """Remotes from the registry are more locations. "east" (a second ralphd in another
    RALPH_HOME, reached over its Unix socket, standing in for a remote machine) has its loops
    listed with its name next to the local ones and followed live like them; when it cannot be
    reached any more the status bar says so, its loops keep their last known state and actions
    on them say why they fail. "west" (a TCP URL where nothing listens) is unreachable from the
    start: its loops show as the local registry last recorded them, by the ids west uses."""
    east_home = Path(str(env.home) + "-east")
    write_config(east_home)
    east = Daemon(east_home).start()
    with socket.socket() as probe:  # a loopback port where nothing listens
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    try:
        with Registry.open() as registry:
            registry.add_remote(RemoteRecord("east", f"unix://{east.socket}"))
            registry.add_remote(RemoteRecord("west", f"tcp://127.0.0.1:{closed_port}"))
            registry.upsert(SessionRecord(
                loop_id="west:gamma-0a0b0c", remote_loop_id="gamma-0a0b0c",  # as run --on has it
                task_name="gamma", task_dir="/srv/gamma",
                agent="claude", status=LoopStatus.RUNNING, iteration=4, max_iterations=9,
                current_story="G-2", stories_done=1, stories_total=3, location="west",
            ))
        local = await env.daemon.start_loop(env.task("alpha"), "sleep", max_iterations=2)
        remote = await east.start_loop(env.task("beta"), "tick", max_iterations=5)
        app = RalphTui(default_locations(CLIENT), client=CLIENT, tasks_root=env.repo)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: len(cells(app)) == 3)
            by_id = {r[9]: r for r in cells(app)}
            assert by_id[local.loop_id][:3] == ["alpha", "local", "running"]
            assert by_id[remote.loop_id][:3] == ["beta", "east", "running"]
            assert by_id["gamma-0a0b0c"][:6] == [
                "gamma", "west", "running (unreachable)", "4/9", "G-2", "1/3"]
            bar = app.screen.query_one(StatusBar)
            await wait_for(pilot, lambda: "west unreachable" in bar.plain)
            key = LoopKey("east", remote.loop_id)
            await wait_for(pilot, lambda: (app.source.row(key).last_output_at or 0) > 0)

            east.kill9()
            await wait_for(pilot, lambda: "east unreachable" in bar.plain, timeout=30)
            row = next(r for r in cells(app) if r[9] == remote.loop_id)
            assert row[1:4] == ["east", "running (unreachable)", "1/5"]
            assert table(app).select(key)
            await pilot.press("s")
            await wait_for(pilot, lambda: "east is unreachable" in notices(app))
            assert table(app).select(LoopKey("west", "gamma-0a0b0c"))
            await pilot.press("e")
            await wait_for(pilot, lambda: "prd.json of west:gamma-0a0b0c cannot be read: west "
                           "is unreachable" in notices(app))
    finally:
        east.stop()
        east.kill_runners()


async def test_a_loop_named_on_the_command_line_opens_at_once(env: Env) -> None:
    """`ralph-uv tui TASK` opens the detail of TASK's most recent loop; a name that matches
    no loop says so and leaves the loops table up."""
    record = await env.daemon.start_loop(env.task("beta"), "tick", max_iterations=2)
    app = make_app(env, open_loop="beta")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, DetailScreen))
        assert app.screen.key == LoopKey("local", record.loop_id)  # type: ignore[attr-defined]
    app = make_app(env, open_loop="no-such-task")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: "no loop 'no-such-task'" in notices(app))
        assert isinstance(app.screen, LoopsScreen)


# ------------------------------------------------------------------------------ snapshots


def _check_snapshot(name: str, svg: str) -> None:
    """Compare the screenshot's text layout with the stored one (``UPDATE_SNAPSHOTS=1``
    stores it anew)."""
    path = SNAPSHOTS / f"{name}.svg"
    if os.environ.get("UPDATE_SNAPSHOTS") or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(svg, encoding="utf-8")
        if not os.environ.get("UPDATE_SNAPSHOTS"):
            pytest.fail(f"snapshot {path} was missing; stored it, run again")
    assert stable_lines(svg) == stable_lines(path.read_text(encoding="utf-8"))


async def test_snapshots_of_the_main_screens(env: Env) -> None:
    """SVG screenshots of the loops screen, a loop's detail and the help screen keep their
    layout and words (ids, times and paths masked)."""
    record = await env.daemon.start_loop(env.task("alpha"), "tui", max_iterations=3)
    app = make_app(env)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: len(cells(app)) == 1)
        await wait_for(pilot, lambda: cells(app)[0][8] != "-")
        loops_svg = app.export_screenshot()
        assert any("alpha" in line and "running" in line for line in svg_lines(loops_svg))
        _check_snapshot("loops", loops_svg)

        screen = await open_detail(pilot, app, LoopKey("local", record.loop_id))
        await wait_for(pilot, lambda: "lines typed here" in terminal_text(screen))
        await wait_for(pilot, lambda: "started US-001" in screen.story_text
                       or screen.reload_task())
        await wait_for(pilot, lambda: screen.query_one("#events").lines)
        screen.terminal.flush_all()
        await pilot.pause()
        _check_snapshot("detail", app.export_screenshot())

        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        await pilot.pause()
        _check_snapshot("help", app.export_screenshot())
        await pilot.press("escape")
        await asyncio.sleep(0)


def test_attach_from_the_dashboard_and_back(env: Env) -> None:
    """In a real terminal, `a` suspends the dashboard and runs the attach client on the
    selected loop (its status bar and the agent's output fill the screen); Ctrl-] d detaches
    and the dashboard comes back, saying so; q quits it, leaving the loop running."""
    record = asyncio.run(env.daemon.start_loop(env.task("alpha"), "tick", max_iterations=3))
    app = PtyApp([sys.executable, "-m", "ralph_uv.cli.__main__", "tui"], cwd=env.repo)
    try:
        app.wait_for("alpha", "running", "Last output")
        app.type(b"a")
        screen = app.wait_for("observe", "alpha │ running", "tick ")
        assert "Last output" not in screen
        app.type(b"\x1d")
        app.type(b"d")
        app.wait_for("Last output", f"detached from {record.loop_id}")
        app.type(b"q")
        assert app.process.wait(15) == 0
    finally:
        app.close()
    assert env.daemon.process is not None
    with Registry.open() as registry:
        row = registry.get(record.loop_id)
    assert row is not None
    assert row.status is LoopStatus.RUNNING
