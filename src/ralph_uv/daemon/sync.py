"""ralphd's code-sync methods for remote loops, and the glue between workspaces and loops.

Methods (every name, branch and URL is checked by :mod:`ralph_uv.validation` first):

- ``sync_refs {project}`` → ``{project, exists, refs: {"refs/heads/<b>": sha}, origin}``
- ``sync_upload {project, branch, bundle, final, upload?, origin?, offset?, size?, force?}``:
  a git bundle in chunks of at most 1 MiB (decoded); the first call (without ``upload``)
  returns ``{upload, received}``; the final one verifies the bundle and makes it bare.git's
  ``refs/heads/<branch>`` → ``{project, branch, sha}``. Chunks go to a file in the project's
  staging folder as they come, so a bundle is never held in memory.
- ``sync_origin {project, origin, branch, force?}`` → ralphd fetches ``branch`` from the
  origin → ``{project, branch, sha}``
- ``pull_bundle {loop, have?, limit?, download?, offset?}`` → ``{loop_id, branch, sha, bundle,
  offset, next, end, download?}``: a bundle of the loop's branch without what the commits in
  ``have`` hold; an empty ``bundle`` when there is nothing new. A bundle bigger than ``limit``
  comes in chunks: pass the ``download`` id and ``offset = next`` until ``next == end``.
- ``get_prd {loop}`` → the loop's prd.json; ``set_story_notes {loop, story, notes}``
- ``get_progress {loop, limit?}`` → ``{loop_id, text, truncated}``: the task's progress log
  (archives, then progress.txt), its newest ``limit`` characters (at most 512 Ki); once a
  loop's checkout is cleaned up, progress.txt as its branch holds it (no archives)
- ``get_http_auth {loop}`` → ``{username, password, url}`` of the loop's opencode server

Transfers left idle for 15 minutes are dropped, and so is everything in transit when ralphd
restarts: a client then starts again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ralph_uv.config import Paths
from ralph_uv.daemon.config import DaemonConfig
from ralph_uv.daemon.workspaces import Checkout, CheckoutState, Workspaces, read_checkout
from ralph_uv.errors import ErrorCode, RalphError, UserError
from ralph_uv.prd import load_prd, set_story_notes
from ralph_uv.progress import LOG_READ_LIMIT, read_log
from ralph_uv.protocol import Dispatcher
from ralph_uv.protocol.dispatch import InvalidParams
from ralph_uv.registry import LOCAL, Registry, SessionRecord
from ralph_uv.runner.host import new_loop_id
from ralph_uv.runner.http_info import HttpInfo, read_http_info
from ralph_uv.tasks import PROGRESS_FILE
from ralph_uv.validation import (
    validate_branch_name,
    validate_origin_url,
    validate_project_name,
    validate_task_name,
    validate_task_path,
)

__all__ = [
    "MAX_CHUNK",
    "MAX_PROGRESS_TEXT",
    "Transfers",
    "active_checkouts",
    "discard_checkout",
    "http_target",
    "maintain",
    "open_checkout",
    "register",
]

log = logging.getLogger("ralph_uv.daemon.sync")

MAX_CHUNK = 1024 * 1024
MAX_PROGRESS_TEXT = LOG_READ_LIMIT  # characters of a progress log one get_progress sends
TRANSFER_IDLE = 900.0
MAINTENANCE_INTERVAL = 3600.0
_MAX_NOTES = 64 * 1024
_MAX_HAVE = 1024


class _Supervisor(Protocol):
    def resolve(self, loop: str) -> SessionRecord: ...


class _Daemon(Protocol):
    """What these methods use of the daemon."""

    dirs: Paths
    settings: DaemonConfig
    workspaces: Workspaces
    transfers: Transfers

    @property
    def registry(self) -> Registry: ...

    @property
    def supervisor(self) -> _Supervisor: ...


class _Connection(Protocol):
    @property
    def server(self) -> _Daemon: ...


# ------------------------------------------------------------------------------ transfers


@dataclass(slots=True)
class _Upload:
    id: str
    project: str
    branch: str
    origin: str | None
    force: bool
    path: Path
    received: int = 0
    touched: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(slots=True)
class _Download:
    id: str
    loop_id: str
    branch: str
    sha: str
    path: Path
    size: int
    touched: float = field(default_factory=time.monotonic)


class Transfers:
    """Bundles in transit, each in a file of its project's staging folder."""

    def __init__(self, workspaces: Workspaces) -> None:
        self.workspaces = workspaces
        self.uploads: dict[str, _Upload] = {}
        self.downloads: dict[str, _Download] = {}

    def new_file(self, project: str, kind: str) -> tuple[str, Path]:
        ident = secrets.token_hex(8)
        path = self.workspaces.staging(project) / f"{kind}-{ident}.bundle"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as exc:
            raise RalphError(f"cannot create {path}: {exc.strerror or exc}") from exc
        return ident, path

    def drop_upload(self, upload: _Upload) -> None:
        self.uploads.pop(upload.id, None)
        upload.path.unlink(missing_ok=True)

    def drop_download(self, download: _Download) -> None:
        self.downloads.pop(download.id, None)
        download.path.unlink(missing_ok=True)

    def expire(self, now: float | None = None) -> None:
        """Drop transfers nobody touched for 15 minutes."""
        now = time.monotonic() if now is None else now
        for upload in list(self.uploads.values()):
            if now - upload.touched > TRANSFER_IDLE and not upload.lock.locked():
                log.info("dropping upload %s of %s: idle", upload.id, upload.project)
                self.drop_upload(upload)
        for download in list(self.downloads.values()):
            if now - download.touched > TRANSFER_IDLE:
                self.drop_download(download)

    def close(self) -> None:
        for upload in list(self.uploads.values()):
            self.drop_upload(upload)
        for download in list(self.downloads.values()):
            self.drop_download(download)


# ----------------------------------------------------------------- workspaces and loops


def active_checkouts(server: _Daemon) -> list[Path]:
    """The checkouts of loops that have not ended, and of loops being started."""
    found = list(server.workspaces.reserved)
    for record in server.registry.find(location=LOCAL, active_only=True):
        checkout = read_checkout(server.dirs.loop_dir(record.loop_id))
        if checkout is not None:
            found.append(checkout.path)
    return found


def checkout_states(server: _Daemon) -> list[CheckoutState]:
    """Every checkout on disk with what the registry says of its loop."""
    states = []
    active = {str(p) for p in active_checkouts(server)}
    for project, path in server.workspaces.checkout_dirs():
        record = _loop_of(server.registry, path.name)
        checkout = read_checkout(server.dirs.loop_dir(record.loop_id)) if record else None
        states.append(CheckoutState(
            path=path, project=project, loop_id=record.loop_id if record else None,
            active=str(path) in active or (record is not None and record.is_active),
            ended_at=(record.finished_at or record.updated_at) if record else None,
            task_path=checkout.task_path if checkout else None,
        ))
    return states


def _loop_of(registry: Registry, name: str) -> SessionRecord | None:
    # A checkout is named <task>-<loop id>, and loop ids hold '-' too: try each suffix.
    for index, char in enumerate(name):
        if char == "-":
            record = registry.get(name[index + 1:])
            if record is not None and record.is_local:
                return record
    return None


async def maintain(server: _Daemon, *, interval: float = MAINTENANCE_INTERVAL) -> None:
    """At start and then every ``interval`` seconds: forget vanished worktrees, remove old
    checkouts by the retention policy, drop idle transfers."""
    while True:
        try:
            await asyncio.to_thread(server.workspaces.prune_all)
            states = checkout_states(server)
            removed = await asyncio.to_thread(server.workspaces.clean, states)
            if removed:
                log.info("removed %d finished checkout(s)", len(removed))
        except RalphError as exc:
            log.warning("workspace maintenance failed: %s", exc.message)
        except Exception:  # it must keep running: the next round may succeed
            log.exception("workspace maintenance failed")
        server.transfers.expire()
        await asyncio.sleep(interval)


def _prd_branch(task_dir: Path) -> str | None:
    """The ``branchName`` of the task's prd.json, if it can be read (start_loop reports a
    broken prd.json itself)."""
    try:
        return load_prd(task_dir / "prd.json").branch_name or None
    except RalphError:
        return None


def _task_name(task_path: str) -> str:
    parts = task_path.split("/")
    return "/".join(parts[1:]) if parts[0] == "tasks" and len(parts) > 1 else parts[-1]


async def open_checkout(
    server: _Daemon, *, project: str, branch: str, task_path: str, task_name: str | None,
    sync: str, push_every: int | None,
) -> tuple[str, str, Checkout]:
    """A new checkout for a loop: ``(loop_id, task_name, checkout)``. The caller starts the
    loop, or calls :func:`discard_checkout` when it does not."""
    validate_project_name(project)
    validate_branch_name(branch)
    task_path = validate_task_path(task_path)
    name = validate_task_name(task_name or _task_name(task_path))
    workspaces = server.workspaces
    if not workspaces.exists(project):
        raise RalphError(
            f"project {project!r} has no workspace on this machine; sync its code first",
            code=ErrorCode.BRANCH_NOT_FOUND,
        )
    if push_every is not None and sync != "origin":
        raise InvalidParams("'push_every' needs sync = \"origin\" (pushes go to the origin)",
                            param="push_every")
    if sync == "origin" and await asyncio.to_thread(workspaces.origin, project) is None:
        raise UserError(f"project {project!r} has no origin; sync it with sync_origin first")
    loop_id = new_loop_id(name)
    folder = f"{name.replace('/', '-')}-{loop_id}"
    active = active_checkouts(server)
    path = await asyncio.to_thread(workspaces.add_checkout, project, branch, folder, active)
    workspaces.reserved.add(path)
    # The loop switches its checkout to the prd's own branch; a finished loop's checkout that
    # still holds that branch must hand it over (a running one's refuses).
    loop_branch = await asyncio.to_thread(_prd_branch, path / task_path)
    if loop_branch and loop_branch != branch:
        try:
            await asyncio.to_thread(workspaces.release_branch, project, loop_branch, active)
        except RalphError:
            workspaces.reserved.discard(path)
            await asyncio.to_thread(workspaces.remove_new_checkout, project, path)
            raise
    checkout = Checkout(project, branch, path, task_path, sync, push_every)
    log.info("loop %s: checkout %s of %s on %s", loop_id, path, project, branch)
    return loop_id, name, checkout


async def discard_checkout(server: _Daemon, checkout: Checkout) -> None:
    """Remove the checkout of a loop that did not start."""
    server.workspaces.reserved.discard(checkout.path)
    await asyncio.to_thread(server.workspaces.remove_new_checkout, checkout.project,
                            checkout.path)


# -------------------------------------------------------------------------------- methods


@dataclass(frozen=True, slots=True)
class _Project:
    project: str


@dataclass(frozen=True, slots=True)
class _SyncUpload:
    project: str
    branch: str
    bundle: str
    final: bool = False
    upload: str | None = None
    origin: str | None = None
    offset: int | None = None
    size: int | None = None
    force: bool = False


@dataclass(frozen=True, slots=True)
class _SyncOrigin:
    project: str
    origin: str
    branch: str
    force: bool = False


@dataclass(frozen=True, slots=True)
class _PullBundle:
    loop: str
    have: list[str] = field(default_factory=list)
    limit: int = MAX_CHUNK
    download: str | None = None
    offset: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_CHUNK:
            raise ValueError(f"'limit' must be from 1 to {MAX_CHUNK} bytes")
        if self.offset < 0:
            raise ValueError("'offset' must be 0 or more")
        if len(self.have) > _MAX_HAVE:
            raise ValueError(f"'have' may list at most {_MAX_HAVE} commits")


@dataclass(frozen=True, slots=True)
class _Loop:
    loop: str


@dataclass(frozen=True, slots=True)
class _Progress:
    loop: str
    limit: int = MAX_PROGRESS_TEXT

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_PROGRESS_TEXT:
            raise ValueError(f"'limit' must be 1 to {MAX_PROGRESS_TEXT} characters")


@dataclass(frozen=True, slots=True)
class _StoryNotes:
    loop: str
    story: str
    notes: str

    def __post_init__(self) -> None:
        if len(self.notes) > _MAX_NOTES:
            raise ValueError(f"'notes' may hold at most {_MAX_NOTES} characters")


def _origin(server: _Daemon, origin: str | None) -> str | None:
    if origin is None:
        return None
    return validate_origin_url(origin, allow_local=server.settings.allow_local_origins)


async def _sync_refs(conn: _Connection, params: _Project) -> dict[str, Any]:
    workspaces = conn.server.workspaces
    project = validate_project_name(params.project)
    refs = await asyncio.to_thread(workspaces.refs, project)
    origin = await asyncio.to_thread(workspaces.origin, project)
    return {"project": project, "exists": workspaces.exists(project), "refs": refs,
            "origin": origin}


def _decode(text: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidParams("'bundle' must be base64", param="bundle") from exc
    if len(data) > MAX_CHUNK:
        raise RalphError(
            f"a chunk holds {len(data)} bytes; send at most {MAX_CHUNK} bytes per call",
            code=ErrorCode.MESSAGE_TOO_LARGE,
        )
    return data


async def _sync_upload(conn: _Connection, params: _SyncUpload) -> dict[str, Any]:
    server = conn.server
    transfers, workspaces = server.transfers, server.workspaces
    project = validate_project_name(params.project)
    branch = validate_branch_name(params.branch)
    origin = _origin(server, params.origin)
    chunk = _decode(params.bundle)
    if params.upload is None:
        transfers.expire()
        await asyncio.to_thread(workspaces.check_origin, project, origin)
        await asyncio.to_thread(workspaces.check_free_space, max(params.size or 0, len(chunk)))
        ident, path = transfers.new_file(project, "upload")
        upload = _Upload(ident, project, branch, origin, params.force, path)
        transfers.uploads[ident] = upload
    else:
        found = transfers.uploads.get(params.upload)
        if found is None:
            raise RalphError(
                f"no upload {params.upload!r} here (it was idle for 15 minutes, or ralphd "
                "restarted); start again without 'upload'",
                code=ErrorCode.BAD_STATE,
            )
        if (found.project, found.branch) != (project, branch):
            raise InvalidParams(f"upload {found.id} is for {found.project} {found.branch}",
                                param="upload")
        upload = found
    async with upload.lock:
        try:
            if params.offset is not None and params.offset != upload.received:
                raise InvalidParams(
                    f"'offset' is {params.offset} but {upload.received} bytes have arrived; "
                    "send the chunks in order", param="offset")
            size = max(params.size or 0, upload.received + len(chunk))
            await asyncio.to_thread(workspaces.check_free_space, size)
            await asyncio.to_thread(_append, upload.path, chunk)
            upload.received += len(chunk)
            upload.touched = time.monotonic()
            if not params.final:
                return {"upload": upload.id, "received": upload.received}
            sha = await asyncio.to_thread(
                workspaces.receive_bundle, project, upload.path, branch, origin=upload.origin,
                force=upload.force, active=active_checkouts(server),
            )
        except BaseException:
            transfers.drop_upload(upload)
            raise
    transfers.drop_upload(upload)
    log.info("project %s: %s is now %s (%d bytes uploaded)", project, branch, sha[:12],
             upload.received)
    return {"project": project, "branch": branch, "sha": sha}


def _append(path: Path, data: bytes) -> None:
    try:
        with open(path, "ab") as file:
            file.write(data)
    except OSError as exc:
        code = ErrorCode.DISK_FULL if exc.errno == 28 else ErrorCode.INTERNAL_ERROR
        raise RalphError(f"cannot store the upload in {path}: {exc.strerror or exc}",
                         code=code) from exc


async def _sync_origin(conn: _Connection, params: _SyncOrigin) -> dict[str, Any]:
    server = conn.server
    project = validate_project_name(params.project)
    branch = validate_branch_name(params.branch)
    origin = _origin(server, params.origin)
    assert origin is not None
    await asyncio.to_thread(server.workspaces.check_free_space)
    sha = await asyncio.to_thread(
        server.workspaces.fetch_origin, project, origin, branch, force=params.force,
        active=active_checkouts(server),
    )
    return {"project": project, "branch": branch, "sha": sha}


def _checkout_of(server: _Daemon, record: SessionRecord) -> Checkout:
    checkout = read_checkout(server.dirs.loop_dir(record.loop_id))
    if checkout is None:
        raise RalphError(
            f"loop {record.loop_id} runs on a task folder of this machine ({record.task_dir}), "
            "not in a synced workspace: there is nothing to pull",
            code=ErrorCode.BAD_STATE,
        )
    return checkout


async def _pull_bundle(conn: _Connection, params: _PullBundle) -> dict[str, Any]:
    server = conn.server
    transfers = server.transfers
    record = server.supervisor.resolve(params.loop)
    if params.download is not None:
        download = transfers.downloads.get(params.download)
        if download is None or download.loop_id != record.loop_id:
            raise RalphError(
                f"no download {params.download!r} of loop {record.loop_id} (it was idle for "
                "15 minutes, or ralphd restarted); start again without 'download'",
                code=ErrorCode.BAD_STATE,
            )
        return await _serve(transfers, download, params.offset, params.limit)
    checkout = _checkout_of(server, record)
    branch = validate_branch_name(record.branch or checkout.branch)
    ident, path = transfers.new_file(checkout.project, "pull")
    try:
        sha, written = await asyncio.to_thread(
            server.workspaces.create_bundle, checkout.project, branch, params.have, path)
        size = path.stat().st_size if written else 0
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    download = _Download(ident, record.loop_id, branch, sha, path, size)
    transfers.downloads[ident] = download
    return await _serve(transfers, download, 0, params.limit)


async def _serve(transfers: Transfers, download: _Download, offset: int,
                 limit: int) -> dict[str, Any]:
    if offset > download.size:
        raise InvalidParams(f"'offset' is past the end ({download.size})", param="offset")
    data = await asyncio.to_thread(_read_slice, download.path, offset, limit)
    following = offset + len(data)
    download.touched = time.monotonic()
    reply: dict[str, Any] = {
        "loop_id": download.loop_id, "branch": download.branch, "sha": download.sha,
        "bundle": base64.b64encode(data).decode("ascii"), "offset": offset,
        "next": following, "end": download.size,
    }
    if following >= download.size:
        transfers.drop_download(download)
    else:
        reply["download"] = download.id
    return reply


def _read_slice(path: Path, offset: int, limit: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(limit)


async def _committed_task_file(server: _Daemon, record: SessionRecord, name: str) -> str | None:
    """``name`` of the loop's task as its branch holds it (the loop ran in a checkout that has
    been cleaned up since), or ``None``."""
    checkout = read_checkout(server.dirs.loop_dir(record.loop_id))
    if checkout is None:
        return None
    return await asyncio.to_thread(
        server.workspaces.show_file, checkout.project, record.branch or checkout.branch,
        f"{checkout.task_path}/{name}")


async def _get_prd(conn: _Connection, params: _Loop) -> Any:
    server = conn.server
    record = server.supervisor.resolve(params.loop)
    prd_file = Path(record.task_dir) / "prd.json"
    text: str | None
    try:
        text = await asyncio.to_thread(prd_file.read_text, encoding="utf-8")
    except FileNotFoundError:
        text = await _committed_task_file(server, record, "prd.json")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {prd_file}: {exc}") from exc
    if text is None:
        raise RalphError(f"loop {record.loop_id}: {prd_file} is gone",
                         code=ErrorCode.BAD_STATE)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise RalphError(f"{prd_file} is not valid JSON right now: {exc}",
                         code=ErrorCode.INVALID_PRD) from exc


async def _get_progress(conn: _Connection, params: _Progress) -> dict[str, Any]:
    server = conn.server
    record = server.supervisor.resolve(params.loop)
    folder = Path(record.task_dir)
    if await asyncio.to_thread(folder.is_dir):
        text, truncated = await asyncio.to_thread(read_log, folder, params.limit)
    else:
        # The checkout is gone: the branch may hold progress.txt (not its archives).
        committed = await _committed_task_file(server, record, PROGRESS_FILE)
        if committed is None:
            cleaned = read_checkout(server.dirs.loop_dir(record.loop_id)) is not None
            raise RalphError(
                f"loop {record.loop_id}: {folder} is gone"
                + (f" (its checkout was cleaned up) and its branch holds no {PROGRESS_FILE}"
                   if cleaned else ""), code=ErrorCode.BAD_STATE)
        text, truncated = committed[-params.limit:], len(committed) > params.limit
    return {"loop_id": record.loop_id, "text": text, "truncated": truncated}


async def _set_story_notes(conn: _Connection, params: _StoryNotes) -> dict[str, Any]:
    record = conn.server.supervisor.resolve(params.loop)
    prd_file = Path(record.task_dir) / "prd.json"
    if not prd_file.is_file():
        raise RalphError(
            f"loop {record.loop_id}: {prd_file} is gone (its checkout was cleaned up); "
            "notes can only be set while the checkout exists",
            code=ErrorCode.BAD_STATE,
        )
    await asyncio.to_thread(set_story_notes, prd_file, params.story, params.notes)
    return {"loop_id": record.loop_id, "story": params.story, "notes": params.notes}


async def _get_http_auth(conn: _Connection, params: _Loop) -> dict[str, Any]:
    record = conn.server.supervisor.resolve(params.loop)
    info = http_target(conn.server, record)
    return {"loop_id": record.loop_id, "username": info.username, "password": info.password,
            "url": info.url}


def http_target(server: _Daemon, record: SessionRecord) -> HttpInfo:
    """The loop's agent HTTP server (:class:`~ralph_uv.runner.http_info.HttpInfo`), or
    ``BAD_STATE`` saying why there is none."""
    info = read_http_info(server.dirs.loop_dir(record.loop_id)) if record.is_active else None
    if info is None or info.port is None:
        raise RalphError(
            f"loop {record.loop_id} has no agent HTTP server running now (only opencode loops "
            "have one, while they run)",
            code=ErrorCode.BAD_STATE,
        )
    if not info.is_loopback:
        raise RalphError(f"loop {record.loop_id}'s agent server is not on loopback; refused",
                         code=ErrorCode.BAD_STATE)
    return info


def register(methods: Dispatcher[Any]) -> None:
    """Add the code-sync methods to ralphd's dispatcher."""
    methods.add("sync_refs", _sync_refs)
    methods.add("sync_upload", _sync_upload)
    methods.add("sync_origin", _sync_origin)
    methods.add("pull_bundle", _pull_bundle)
    methods.add("get_prd", _get_prd)
    methods.add("get_progress", _get_progress)
    methods.add("set_story_notes", _set_story_notes)
    methods.add("get_http_auth", _get_http_auth)

