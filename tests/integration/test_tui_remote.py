"""The dashboard on a loop whose task folder is on another machine: a real sshd on 127.0.0.1
whose logins run this checkout's ralph-uv in a RALPH_HOME of their own (the remote "box"),
driven with Textual's Pilot. Everything the detail shows and every action on the task's files
goes through box's ralphd: starting the task there (its code sent as a git bundle), reading
prd.json and progress.txt, writing a story's notes, pulling the loop's branch back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.fixtures.sshd import (  # noqa: F401 - fixtures, used by name
    SSHServer,
    ssh_home_fixture,
    sshd_fixture,
)
from tests.integration.remote_harness import (  # noqa: F401 - box_fixture: used by name
    add_box,
    box_fixture,
    git,
    remote_loop,
    task_repo,
)
from tests.integration.test_tui import SIZE, notices, wait_for
from textual.widgets import Label, Select, TextArea

from ralph_uv.client.remotes import get_remote
from ralph_uv.status import LoopStatus
from ralph_uv.tui.app import RalphTui
from ralph_uv.tui.locations import LocationState, remote_location
from ralph_uv.tui.screens.detail import DetailScreen
from ralph_uv.tui.screens.dialogs import TextScreen
from ralph_uv.tui.screens.new_loop import NewLoopScreen

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CLIENT = "tui-remote-test"


async def test_a_task_started_on_a_remote_from_the_dashboard(box: SSHServer,
                                                             tmp_path: Path) -> None:
    """`n` with box as the place: the branch goes over as a bundle and the loop runs in a
    checkout on box (the scripted agent commits one story per iteration); its detail shows
    the stories as box's prd.json has them; `e` writes the story's notes into box's prd.json,
    and the detail then shows them with box's progress.txt entries about the story; notes that
    cannot be saved come back in the editor; `b` brings the loop's branch into this
    repository without touching its work tree."""
    repo = task_repo(tmp_path, stories=2)
    add_box(repo, box)
    app = RalphTui([remote_location(get_remote("box"), CLIENT)], client=CLIENT,
                   tasks_root=repo)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.source.location_infos()[0].state
                       is LocationState.ONLINE, timeout=60)
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, NewLoopScreen))
        form = app.screen
        assert isinstance(form, NewLoopScreen)
        assert not form.query_one("#sync", Select).disabled  # box's files are not here
        form.query_one("#task", Select).value = "demo"
        await wait_for(pilot, lambda: "work" in form.agent_names, timeout=30)
        form.query_one("#agent", Select).value = "work"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, DetailScreen), timeout=90)
        screen = app.screen
        assert isinstance(screen, DetailScreen)
        assert "sending main to box (bundle)" in notices(app)
        key = screen.key
        assert key.location == "box"

        def completed() -> bool:
            row = app.source.row(key)
            return row is not None and row.status is LoopStatus.COMPLETED

        await wait_for(pilot, completed, timeout=90)
        # The stories as box's prd.json has them now: the agent passed both over there.
        await wait_for(pilot, lambda: screen.snapshot is not None and screen.snapshot.prd
                       is not None and all(s.story.passes for s in screen.snapshot.stories),
                       timeout=30)
        record = remote_loop(box.remote_home, key.loop_id)
        remote_task = Path(record.task_dir)
        assert not remote_task.is_relative_to(repo)  # a checkout of box's, not this repo
        assert str(screen.snapshot.task_dir) == record.task_dir  # type: ignore[union-attr]
        screen.stories.focus()
        await pilot.press("home")
        await wait_for(pilot, lambda: screen.stories.selected_story == "US-001")
        assert "progress.txt (0)" in screen.story_text
        # An entry about US-001 in box's progress.txt, as an agent writes them; the save
        # below makes the detail read the task again.
        progress = remote_task / "progress.txt"
        progress.write_text(progress.read_text()
                            + "\n## 2026-11-21 10:00 - US-001\n- box has no cache: mind it\n")

        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, TextScreen))
        await pilot.press(*"check on box")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: "US-001: notes saved to prd.json on box" in notices(app))
        prd = json.loads((remote_task / "prd.json").read_text())
        assert prd["userStories"][0]["notes"] == "check on box"
        await wait_for(pilot, lambda: "check on box" in screen.story_text)
        assert "progress.txt (1)" in screen.story_text
        assert "box has no cache: mind it" in screen.story_text

        # The checkout's prd.json gone (as after a clean-up): the editor still opens (prd.json
        # is read from the loop's branch), the save is refused, and the typed text comes back
        # in the editor, which says it was not saved.
        (remote_task / "prd.json").rename(remote_task / "prd.json.away")
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, TextScreen))
        await pilot.press(*" - keep me")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: "US-001: notes not saved" in notices(app))
        await wait_for(pilot, lambda: isinstance(app.screen, TextScreen)
                       and "NOT SAVED" in str(app.screen.query_one(Label).render()))
        assert app.screen.query_one(TextArea).text.endswith(" - keep me")
        await pilot.press("escape")
        (remote_task / "prd.json.away").rename(remote_task / "prd.json")

        await pilot.press("b")
        await wait_for(pilot, lambda: "pulled ralph/demo at " in notices(app), timeout=60)
    assert git(repo, "log", "--format=%s", "ralph/demo").splitlines()[:2] == [
        "US-002: implemented", "US-001: implemented"]
    assert git(repo, "branch", "--show-current") == "main"
    assert git(repo, "status", "--porcelain") == ""
