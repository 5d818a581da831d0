"""The registry: one SQLite database listing every loop, local and remote, and the remotes.

It lives at ``paths().registry`` (``<data>/sessions.db``). Runners update their own row, ralphd
updates rows of loops it supervises, the client mirrors remote loops into it, and several of
them write at once: the database runs in WAL mode with a busy timeout, every multi-statement
write takes the write lock up front (``BEGIN IMMEDIATE``), and each process (or thread) opens its
own :class:`Registry`.

The schema is the ordered list :data:`MIGRATIONS` of named functions. Each is applied once, in
order, in its own transaction, and recorded in the ``_migrations`` table; never edit one that has
shipped, append a new one.

Records are never deleted except by :meth:`Registry.delete` and
:meth:`Registry.delete_finished`, which only ``ralph-uv clean`` calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ralph_uv.config import paths
from ralph_uv.errors import ErrorCode, RalphError, UserError
from ralph_uv.status import TERMINAL, LoopStatus, check_transition

__all__ = [
    "BUSY_TIMEOUT",
    "LOCAL",
    "MIGRATIONS",
    "Registry",
    "RegistryError",
    "RemoteRecord",
    "SessionRecord",
]

log = logging.getLogger("ralph_uv.registry")

LOCAL = "local"
BUSY_TIMEOUT = 5.0  # seconds a writer waits for another one before giving up
_TOKEN_SCHEMES = ("env", "file", "keyring")
_REMOTE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class RegistryError(RalphError):
    """The registry database could not be read or written."""


# ------------------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One loop, wherever it runs. Times are seconds since the epoch.

    ``location`` is ``"local"`` or the name of the remote it runs on; ``backend`` is how the
    agent is driven (``pty``, ``http`` or ``tmux``); ``reason`` says why a finished loop ended.
    """

    loop_id: str
    task_name: str
    task_dir: str
    agent: str
    status: LoopStatus = LoopStatus.STARTING
    backend: str = "pty"
    pid: int | None = None
    iteration: int = 0
    max_iterations: int = 0
    current_story: str | None = None
    stories_done: int = 0
    stories_total: int = 0
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    location: str = LOCAL
    transport: str | None = None
    endpoint: str | None = None
    socket_path: str | None = None
    branch: str | None = None
    reason: str | None = None
    last_output_at: float | None = None
    remote_loop_id: str | None = None
    remote_seen_at: float | None = None

    @property
    def is_local(self) -> bool:
        return self.location == LOCAL

    @property
    def is_active(self) -> bool:
        return self.status.is_active

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``status`` as its string value)."""
        data = dataclasses.asdict(self)
        data["status"] = LoopStatus(self.status).value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SessionRecord:
        """Build a record from :meth:`to_dict`'s form (unknown keys ignored, e.g. from a newer
        remote); ``UserError`` when a value has the wrong type."""
        values = {k: v for k, v in data.items() if k in _SESSION_COLUMNS}
        for name, value in values.items():
            _check_value(_SESSION_COLUMNS, name, value)
        missing = {"loop_id", "task_name", "task_dir", "agent"} - values.keys()
        if missing:
            raise UserError(f"a loop record needs {', '.join(sorted(missing))}")
        if "status" in values:
            values["status"] = LoopStatus(values["status"])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class RemoteRecord:
    """A machine that runs loops for us.

    ``token_ref`` says where its token is kept (``env:NAME``, ``file:/path`` or
    ``keyring:NAME``), never the token itself. ``events_cursor`` is the next daemon event seq to
    ask it for.
    """

    name: str
    url: str
    identity_file: str | None = None
    token_ref: str | None = None
    events_cursor: int = 0
    last_seen_at: float | None = None
    version: str | None = None
    added_at: float = field(default_factory=time.time)


# Column types for validation: a tuple of accepted Python types, and whether NULL is allowed.
_SESSION_COLUMNS: dict[str, tuple[tuple[type, ...], bool]] = {
    "loop_id": ((str,), False),
    "task_name": ((str,), False),
    "task_dir": ((str,), False),
    "agent": ((str,), False),
    "status": ((str,), False),
    "backend": ((str,), False),
    "pid": ((int,), True),
    "iteration": ((int,), False),
    "max_iterations": ((int,), False),
    "current_story": ((str,), True),
    "stories_done": ((int,), False),
    "stories_total": ((int,), False),
    "started_at": ((int, float), False),
    "updated_at": ((int, float), False),
    "finished_at": ((int, float), True),
    "location": ((str,), False),
    "transport": ((str,), True),
    "endpoint": ((str,), True),
    "socket_path": ((str,), True),
    "branch": ((str,), True),
    "reason": ((str,), True),
    "last_output_at": ((int, float), True),
    "remote_loop_id": ((str,), True),
    "remote_seen_at": ((int, float), True),
}
_REMOTE_COLUMNS: dict[str, tuple[tuple[type, ...], bool]] = {
    "name": ((str,), False),
    "url": ((str,), False),
    "identity_file": ((str,), True),
    "token_ref": ((str,), True),
    "events_cursor": ((int,), False),
    "last_seen_at": ((int, float), True),
    "version": ((str,), True),
    "added_at": ((int, float), False),
}


def _check_value(
    columns: Mapping[str, tuple[tuple[type, ...], bool]], name: str, value: Any
) -> None:
    kinds, nullable = columns[name]
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, kinds):
        wanted = " or ".join(k.__name__ for k in kinds) + (" or None" if nullable else "")
        raise UserError(f"{name} must be {wanted}, not {value!r}")
    if name == "status":
        try:
            LoopStatus(str(value))
        except ValueError:
            known = ", ".join(s.value for s in LoopStatus)
            raise UserError(f"unknown loop status {value!r}; use one of {known}") from None


def _check_remote(remote: RemoteRecord) -> None:
    for name in _REMOTE_COLUMNS:
        _check_value(_REMOTE_COLUMNS, name, getattr(remote, name))
    if not _REMOTE_NAME.fullmatch(remote.name) or remote.name == LOCAL:
        raise UserError(
            f"{remote.name!r} cannot name a remote: use letters, digits, '.', '_' or '-' "
            f"(at most 63, not {LOCAL!r})",
            code=ErrorCode.INVALID_NAME,
        )
    if not remote.url:
        raise UserError(f"remote {remote.name} needs a URL such as ssh://user@host")
    if remote.token_ref is not None and remote.token_ref.partition(":")[0] not in _TOKEN_SCHEMES:
        raise UserError(
            f"remote {remote.name}: store where the token is, not the token: "
            "use env:VARIABLE, file:/path/to/token or keyring:NAME"
        )


# ---------------------------------------------------------------------------------- migrations

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = []


def _migration(function: Migration) -> Migration:
    MIGRATIONS.append(function)
    return function


@_migration
def m001_create_sessions(db: sqlite3.Connection) -> None:
    db.execute(
        """
        CREATE TABLE sessions (
            loop_id TEXT PRIMARY KEY,
            task_name TEXT NOT NULL,
            task_dir TEXT NOT NULL,
            agent TEXT NOT NULL,
            status TEXT NOT NULL,
            backend TEXT NOT NULL DEFAULT 'pty',
            pid INTEGER,
            iteration INTEGER NOT NULL DEFAULT 0,
            max_iterations INTEGER NOT NULL DEFAULT 0,
            current_story TEXT,
            stories_done INTEGER NOT NULL DEFAULT 0,
            stories_total INTEGER NOT NULL DEFAULT 0,
            started_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            finished_at REAL,
            location TEXT NOT NULL DEFAULT 'local',
            transport TEXT,
            endpoint TEXT,
            socket_path TEXT,
            branch TEXT,
            reason TEXT,
            last_output_at REAL,
            remote_loop_id TEXT,
            remote_seen_at REAL
        )
        """
    )
    db.execute("CREATE INDEX sessions_task ON sessions (task_name, started_at)")
    db.execute("CREATE INDEX sessions_status ON sessions (status)")
    db.execute("CREATE INDEX sessions_location ON sessions (location, remote_loop_id)")


@_migration
def m002_create_remotes(db: sqlite3.Connection) -> None:
    db.execute(
        """
        CREATE TABLE remotes (
            name TEXT PRIMARY KEY,
            url TEXT NOT NULL,
            identity_file TEXT,
            token_ref TEXT,
            events_cursor INTEGER NOT NULL DEFAULT 0,
            last_seen_at REAL,
            version TEXT,
            added_at REAL NOT NULL
        )
        """
    )


# ------------------------------------------------------------------------------------ registry


def _translate(path: Path, exc: sqlite3.Error) -> RegistryError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return RegistryError(f"the registry {path} stayed busy for {BUSY_TIMEOUT:g}s; try again")
    if isinstance(exc, sqlite3.DatabaseError) and "not a database" in text:
        return RegistryError(f"{path} is not a ralph-uv registry; move it away and retry")
    if "disk" in text and "full" in text:
        return RegistryError(f"cannot write {path}: the disk is full", code=ErrorCode.DISK_FULL)
    return RegistryError(f"registry {path}: {text}")


class Registry:
    """A connection to the registry. Open one per process or thread with :meth:`open`."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self.path = path

    @classmethod
    def open(cls, path: Path | None = None) -> Registry:
        """Open (creating it, its folder 0700 and the file 0600 if needed) and migrate."""
        path = paths().registry if path is None else path
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            raise RegistryError(f"cannot create the registry {path}: {exc.strerror}") from exc
        try:
            db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
        except sqlite3.Error as exc:
            raise _translate(path, exc) from exc
        registry = cls(db, path)
        try:
            with registry._errors():
                db.row_factory = sqlite3.Row
                db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")
                db.execute("PRAGMA foreign_keys = ON")
                registry._migrate()
        except BaseException:
            db.close()
            raise
        return registry

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise _translate(self.path, exc) from exc

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A transaction holding the write lock from its start, so it never fails half-way on
        another writer's newer snapshot."""
        with self._errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _migrate(self) -> None:
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS _migrations"
            " (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        known = {m.__name__ for m in MIGRATIONS}
        applied = set(self.migrations_applied())
        for migration in MIGRATIONS:
            name = migration.__name__
            if name in applied:
                continue
            with self._write() as db:
                # Another process may have applied it since we looked.
                if db.execute("SELECT 1 FROM _migrations WHERE name = ?", (name,)).fetchone():
                    continue
                migration(db)
                db.execute("INSERT INTO _migrations VALUES (?, ?)", (name, time.time()))
                log.info("registry %s: applied migration %s", self.path, name)
        if applied - known:
            log.warning(
                "registry %s was migrated by a newer ralph-uv (%s)",
                self.path,
                ", ".join(sorted(applied - known)),
            )

    def migrations_applied(self) -> list[str]:
        """The names in ``_migrations``, in the order they were applied."""
        with self._errors():
            rows = self._db.execute("SELECT name FROM _migrations ORDER BY applied_at, rowid")
            return [row["name"] for row in rows]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------- sessions

    def upsert(self, record: SessionRecord) -> SessionRecord:
        """Store ``record`` as given (insert or replace), stamping ``updated_at``; no status
        transition check, so it also serves to mirror a remote's loop. Returns what was stored."""
        record = dataclasses.replace(record, updated_at=time.time())
        values = record.to_dict()
        for name, value in values.items():
            _check_value(_SESSION_COLUMNS, name, value)
        columns = ", ".join(values)
        marks = ", ".join("?" * len(values))
        updates = ", ".join(f"{c} = excluded.{c}" for c in values if c != "loop_id")
        with self._errors():
            self._db.execute(
                f"INSERT INTO sessions ({columns}) VALUES ({marks}) "
                f"ON CONFLICT (loop_id) DO UPDATE SET {updates}",
                tuple(values.values()),
            )
        return record

    def update(self, loop_id: str, /, **fields: Any) -> SessionRecord:
        """Change some columns of a loop's row and return the new record.

        ``updated_at`` is stamped unless given. A status change must be allowed by
        :func:`ralph_uv.status.check_transition` (``UserError`` with ``BAD_STATE`` if not); on
        reaching a terminal status ``finished_at`` is set unless given.
        """
        unknown = set(fields) - (_SESSION_COLUMNS.keys() - {"loop_id"})
        if unknown:
            raise UserError(f"a loop record has no column(s) {', '.join(sorted(unknown))}")
        for name, value in fields.items():
            _check_value(_SESSION_COLUMNS, name, value)
        now = time.time()
        fields.setdefault("updated_at", now)
        with self._write() as db:
            row = db.execute(
                "SELECT status, finished_at FROM sessions WHERE loop_id = ?", (loop_id,)
            )
            current = row.fetchone()
            if current is None:
                raise UserError(
                    f"no loop {loop_id!r} in the registry", code=ErrorCode.LOOP_NOT_FOUND
                )
            if "status" in fields:
                old, new = LoopStatus(current["status"]), LoopStatus(fields["status"])
                fields["status"] = new.value
                if new != old:
                    try:
                        check_transition(old, new)
                    except ValueError as exc:
                        raise UserError(f"loop {loop_id}: {exc}", code=ErrorCode.BAD_STATE) from exc
                if new.is_terminal and current["finished_at"] is None:
                    fields.setdefault("finished_at", now)
            assignments = ", ".join(f"{name} = ?" for name in fields)
            db.execute(
                f"UPDATE sessions SET {assignments} WHERE loop_id = ?",
                (*fields.values(), loop_id),
            )
            stored = db.execute("SELECT * FROM sessions WHERE loop_id = ?", (loop_id,)).fetchone()
        return _session(stored)

    def get(self, loop_id: str) -> SessionRecord | None:
        """The loop's record, or ``None``."""
        with self._errors():
            row = self._db.execute("SELECT * FROM sessions WHERE loop_id = ?", (loop_id,))
            found = row.fetchone()
        return None if found is None else _session(found)

    def find(
        self,
        *,
        task_name: str | None = None,
        status: LoopStatus | Iterable[LoopStatus] | None = None,
        location: str | None = None,
        active_only: bool = False,
    ) -> list[SessionRecord]:
        """Loops matching every given filter, newest first."""
        where: list[str] = []
        args: list[Any] = []
        if task_name is not None:
            where.append("task_name = ?")
            args.append(task_name)
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            statuses = [LoopStatus(s).value for s in wanted]
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            args.extend(statuses)
        if location is not None:
            where.append("location = ?")
            args.append(location)
        if active_only:
            where.append(f"status NOT IN ({', '.join('?' * len(TERMINAL))})")
            args.extend(s.value for s in TERMINAL)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        query = f"SELECT * FROM sessions {clause} ORDER BY started_at DESC, loop_id"
        with self._errors():
            return [_session(row) for row in self._db.execute(query, args)]

    def latest_for_task(
        self, task_name: str, *, location: str | None = None
    ) -> SessionRecord | None:
        """The most recently started loop of ``task_name`` (optionally only at ``location``)."""
        found = self.find(task_name=task_name, location=location)
        return found[0] if found else None

    def delete(self, loop_id: str) -> bool:
        """Remove one record (``ralph-uv clean`` only); ``True`` if it existed."""
        with self._errors():
            cursor = self._db.execute("DELETE FROM sessions WHERE loop_id = ?", (loop_id,))
            return cursor.rowcount > 0

    def delete_finished(self, older_than: float | None = None) -> list[str]:
        """Remove finished loops (``ralph-uv clean`` only), or only those that finished more
        than ``older_than`` seconds ago. Returns the removed loop ids."""
        marks = ", ".join("?" * len(TERMINAL))
        condition = f"status IN ({marks})"
        args: list[Any] = [s.value for s in TERMINAL]
        if older_than is not None:
            condition += " AND COALESCE(finished_at, updated_at) < ?"
            args.append(time.time() - older_than)
        with self._write() as db:
            rows = db.execute(f"SELECT loop_id FROM sessions WHERE {condition}", args).fetchall()
            db.execute(f"DELETE FROM sessions WHERE {condition}", args)
        return [row["loop_id"] for row in rows]

    # ----------------------------------------------------------------------------- remotes

    def add_remote(self, remote: RemoteRecord) -> RemoteRecord:
        """Register a new remote; ``UserError`` if the name is taken."""
        _check_remote(remote)
        values = dataclasses.asdict(remote)
        try:
            with self._errors():
                self._db.execute(
                    f"INSERT INTO remotes ({', '.join(values)}) "
                    f"VALUES ({', '.join('?' * len(values))})",
                    tuple(values.values()),
                )
        except RegistryError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise UserError(
                    f"a remote named {remote.name} exists already; remove it first or pick "
                    "another name",
                    code=ErrorCode.INVALID_NAME,
                ) from exc
            raise
        return remote

    def get_remote(self, name: str) -> RemoteRecord | None:
        with self._errors():
            row = self._db.execute("SELECT * FROM remotes WHERE name = ?", (name,)).fetchone()
        return None if row is None else RemoteRecord(**dict(row))

    def list_remotes(self) -> list[RemoteRecord]:
        """Every remote, by name."""
        with self._errors():
            rows = self._db.execute("SELECT * FROM remotes ORDER BY name").fetchall()
        return [RemoteRecord(**dict(row)) for row in rows]

    def update_remote(self, name: str, /, **fields: Any) -> RemoteRecord:
        """Change some columns of a remote (not its name) and return it."""
        unknown = set(fields) - (_REMOTE_COLUMNS.keys() - {"name"})
        if unknown:
            raise UserError(f"a remote has no field(s) {', '.join(sorted(unknown))}")
        with self._write() as db:
            row = db.execute("SELECT * FROM remotes WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise UserError(f"no remote named {name}; see `ralph-uv remote list`")
            updated = dataclasses.replace(RemoteRecord(**dict(row)), **fields)
            _check_remote(updated)
            if fields:
                assignments = ", ".join(f"{column} = ?" for column in fields)
                db.execute(
                    f"UPDATE remotes SET {assignments} WHERE name = ?", (*fields.values(), name)
                )
        return updated

    def delete_remote(self, name: str) -> bool:
        """Forget a remote (its loops' records stay); ``True`` if it existed."""
        with self._errors():
            return self._db.execute("DELETE FROM remotes WHERE name = ?", (name,)).rowcount > 0


def _session(row: sqlite3.Row) -> SessionRecord:
    values = {key: value for key, value in dict(row).items() if key in _SESSION_COLUMNS}
    values["status"] = LoopStatus(values["status"])
    return SessionRecord(**values)
