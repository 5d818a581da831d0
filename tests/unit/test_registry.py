"""The SQLite registry: migrations, WAL, typed records, filters, remotes, concurrent writers."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ralph_uv.config import paths
from ralph_uv.errors import ErrorCode, UserError
from ralph_uv.registry import (
    MIGRATIONS,
    Registry,
    RegistryError,
    RemoteRecord,
    SessionRecord,
)
from ralph_uv.status import LoopStatus


def _record(loop_id: str, **fields: object) -> SessionRecord:
    values: dict[str, object] = {
        "loop_id": loop_id,
        "task_name": "auth",
        "task_dir": "/src/app/tasks/auth",
        "agent": "claude",
    }
    values.update(fields)
    return SessionRecord.from_dict(values)


def test_open_creates_a_private_wal_database_with_migrations_recorded(ralph_home: Path) -> None:
    """The default registry lives at paths().registry, in a 0700 folder, file 0600, WAL mode,
    foreign keys on, with every migration recorded once in order."""
    with Registry.open() as registry:
        assert registry.path == paths().registry
        assert registry.migrations_applied() == [m.__name__ for m in MIGRATIONS]
    assert stat.S_IMODE(paths().registry.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(paths().registry.stat().st_mode) == 0o600
    db = sqlite3.connect(paths().registry)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    with Registry.open() as registry:
        assert registry._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert registry._db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000


def test_reopening_applies_nothing_twice(tmp_path: Path) -> None:
    """Opening an existing registry again keeps its data and does not re-run migrations."""
    path = tmp_path / "sessions.db"
    with Registry.open(path) as registry:
        registry.upsert(_record("a1"))
    with Registry.open(path) as registry:
        assert registry.get("a1") is not None
        rows = registry._db.execute("SELECT name, COUNT(*) FROM _migrations GROUP BY name")
        assert all(count == 1 for _, count in rows)
        assert len(registry.migrations_applied()) == len(MIGRATIONS)


def test_a_new_migration_is_applied_on_the_next_open(tmp_path: Path) -> None:
    """A migration appended to the list runs once on the next open, after the older ones."""
    path = tmp_path / "sessions.db"
    Registry.open(path).close()

    def m999_add_note(db: sqlite3.Connection) -> None:
        db.execute("ALTER TABLE remotes ADD COLUMN note TEXT")

    MIGRATIONS.append(m999_add_note)
    try:
        with Registry.open(path) as registry:
            assert registry.migrations_applied()[-1] == "m999_add_note"
        with Registry.open(path) as registry:  # would fail "duplicate column" if re-run
            assert registry.migrations_applied().count("m999_add_note") == 1
    finally:
        MIGRATIONS.remove(m999_add_note)


def test_upsert_get_and_update(tmp_path: Path) -> None:
    """Records round-trip through the database; update changes only the given columns,
    stamps updated_at and returns the new record."""
    with Registry.open(tmp_path / "r.db") as registry:
        stored = registry.upsert(_record("a1", max_iterations=10, branch="ralph/auth"))
        assert registry.get("a1") == stored
        assert registry.get("missing") is None
        before = stored.updated_at
        updated = registry.update("a1", status=LoopStatus.RUNNING, iteration=3, pid=4242)
        assert (updated.status, updated.iteration, updated.pid) == (LoopStatus.RUNNING, 3, 4242)
        assert updated.branch == "ralph/auth"
        assert updated.updated_at >= before
        assert registry.get("a1") == updated
        again = registry.upsert(updated.__class__.from_dict({**updated.to_dict(), "agent": "x"}))
        assert registry.get("a1") == again


def test_update_rejects_unknown_columns_bad_types_and_missing_loops(tmp_path: Path) -> None:
    """update() refuses columns the table does not have, wrongly typed values and unknown
    loops, each with a UserError naming the problem."""
    with Registry.open(tmp_path / "r.db") as registry:
        registry.upsert(_record("a1"))
        with pytest.raises(UserError, match="no column"):
            registry.update("a1", colour="red")
        with pytest.raises(UserError, match="no column"):
            registry.update("a1", loop_id="b2")
        with pytest.raises(UserError, match="iteration must be int"):
            registry.update("a1", iteration="3")
        with pytest.raises(UserError, match="unknown loop status"):
            registry.update("a1", status="sleeping")
        with pytest.raises(UserError) as missing:
            registry.update("zz", iteration=1)
        assert missing.value.code == ErrorCode.LOOP_NOT_FOUND


def test_status_changes_follow_the_state_machine(tmp_path: Path) -> None:
    """Reaching a terminal status sets finished_at; leaving a terminal status is refused."""
    with Registry.open(tmp_path / "r.db") as registry:
        registry.upsert(_record("a1"))
        registry.update("a1", status=LoopStatus.RUNNING)
        done = registry.update("a1", status=LoopStatus.COMPLETED, reason="all stories pass")
        assert done.finished_at is not None
        assert done.reason == "all stories pass"
        with pytest.raises(UserError) as refused:
            registry.update("a1", status=LoopStatus.CRASHED)
        assert refused.value.code == ErrorCode.BAD_STATE
        assert registry.get("a1") == done


def test_find_filters_and_latest_for_task(tmp_path: Path) -> None:
    """find() combines its filters and lists newest first; latest_for_task picks the newest."""
    now = time.time()
    with Registry.open(tmp_path / "r.db") as registry:
        registry.upsert(_record("l1", started_at=now - 30, status=LoopStatus.COMPLETED))
        registry.upsert(_record("l2", started_at=now - 20, status=LoopStatus.RUNNING))
        registry.upsert(_record("r1", started_at=now - 10, location="vps", remote_loop_id="x9"))
        registry.upsert(_record("o1", task_name="docs", started_at=now, status="paused"))

        assert [r.loop_id for r in registry.find()] == ["o1", "r1", "l2", "l1"]
        assert [r.loop_id for r in registry.find(task_name="auth")] == ["r1", "l2", "l1"]
        assert [r.loop_id for r in registry.find(location="vps")] == ["r1"]
        assert [r.loop_id for r in registry.find(status=LoopStatus.COMPLETED)] == ["l1"]
        both = registry.find(status=[LoopStatus.RUNNING, LoopStatus.PAUSED])
        assert [r.loop_id for r in both] == ["o1", "l2"]
        active = registry.find(task_name="auth", active_only=True)
        assert [r.loop_id for r in active] == ["r1", "l2"]
        assert [r.loop_id for r in registry.find(location="local", active_only=True)] == [
            "o1",
            "l2",
        ]
        latest = registry.latest_for_task("auth")
        assert latest is not None
        assert latest.loop_id == "r1"
        local = registry.latest_for_task("auth", location="local")
        assert local is not None
        assert local.loop_id == "l2"
        assert registry.latest_for_task("nothing") is None


def test_delete_finished_and_delete(tmp_path: Path) -> None:
    """Only finished loops are cleaned, optionally only old ones; delete removes one row."""
    now = time.time()
    with Registry.open(tmp_path / "r.db") as registry:
        registry.upsert(_record("old", status="completed", finished_at=now - 7200))
        registry.upsert(_record("new", status="failed", finished_at=now - 10))
        registry.upsert(_record("live", status="running"))
        assert registry.delete_finished(older_than=3600) == ["old"]
        assert sorted(r.loop_id for r in registry.find()) == ["live", "new"]
        assert registry.delete_finished() == ["new"]
        assert registry.delete("live") is True
        assert registry.delete("live") is False
        assert registry.find() == []


def test_remotes_crud(tmp_path: Path) -> None:
    """Remotes are added, listed, updated and deleted; names are validated; a token must be
    referenced, never stored."""
    with Registry.open(tmp_path / "r.db") as registry:
        vps = registry.add_remote(RemoteRecord("vps", "ssh://me@vps", token_ref="env:VPS_TOKEN"))
        registry.add_remote(RemoteRecord("lan-box", "tcp://10.0.0.2:7420?tls=1"))
        assert [r.name for r in registry.list_remotes()] == ["lan-box", "vps"]
        assert registry.get_remote("vps") == vps
        with pytest.raises(UserError, match="exists already"):
            registry.add_remote(RemoteRecord("vps", "ssh://other"))
        with pytest.raises(UserError, match="cannot name a remote"):
            registry.add_remote(RemoteRecord("local", "ssh://x"))
        with pytest.raises(UserError, match="cannot name a remote"):
            registry.add_remote(RemoteRecord("a b", "ssh://x"))
        with pytest.raises(UserError, match="not the token"):
            registry.add_remote(RemoteRecord("t", "tcp://h:1", token_ref="s3cr3t-token"))

        moved = registry.update_remote("vps", events_cursor=42, version="0.2.0")
        assert (moved.events_cursor, moved.version, moved.url) == (42, "0.2.0", "ssh://me@vps")
        assert registry.get_remote("vps") == moved
        with pytest.raises(UserError, match="no field"):
            registry.update_remote("vps", token="abc")
        with pytest.raises(UserError, match="no remote"):
            registry.update_remote("nope", version="1")
        assert registry.delete_remote("vps") is True
        assert registry.get_remote("vps") is None
        assert registry.delete_remote("vps") is False


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    """A garbage registry file gives a RegistryError that says what to do, not a sqlite3 error."""
    path = tmp_path / "sessions.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RegistryError, match="move it away"):
        Registry.open(path)


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from ralph_uv.registry import Registry, SessionRecord

    path, me, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    with Registry.open(path) as registry:
        registry.upsert(SessionRecord(me, "task", "/t", "claude", iteration=0))
        if registry.get("shared") is None:
            registry.upsert(SessionRecord("shared", "task", "/t", "claude"))
        for i in range(1, rounds + 1):
            registry.update(me, iteration=i, current_story=f"US-{i}")
            registry.update("shared", iteration=i, last_output_at=float(i))
            registry.find(active_only=True)
    """
)


def test_concurrent_writers_in_several_processes(tmp_path: Path) -> None:
    """Several processes opening a fresh registry at once and updating rows concurrently all
    succeed (no "database is locked"), and every row ends with its last write."""
    path = tmp_path / "sessions.db"
    with Registry.open(path) as registry:
        registry.upsert(SessionRecord("shared", "task", "/t", "claude"))
    fresh = tmp_path / "fresh.db"  # migrations raced by every child
    rounds = 150
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(target), f"w{n}", str(rounds)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
        for target in (path, fresh)
    ]
    results = [(child.communicate(timeout=120)[1], child.returncode) for child in children]
    assert results == [("", 0)] * len(children)
    with Registry.open(path) as registry:
        for n in range(4):
            record = registry.get(f"w{n}")
            assert record is not None
            assert (record.iteration, record.current_story) == (rounds, f"US-{rounds}")
        shared = registry.get("shared")
        assert shared is not None
        assert shared.iteration == rounds
    with Registry.open(fresh) as registry:
        assert sorted(r.loop_id for r in registry.find()) == ["shared", "w0", "w1", "w2", "w3"]
        assert len(registry.migrations_applied()) == len(MIGRATIONS)
