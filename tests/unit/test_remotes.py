"""Remotes and mirrored remote loops in the local registry (a real SQLite file in the test's
RALPH_HOME; nothing here connects anywhere): remote names and settings, what ``remote add``
refuses before connecting, the mirrored rows, and where a TASK argument points."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from ralph_uv.client.mirror import LoopTarget, mirror_id, mirror_records, resolve_loop
from ralph_uv.client.remotes import (
    RemoteSettings,
    add_remote,
    get_remote,
    load_settings,
    remote_opener,
    remote_options,
    remove_remote,
    validate_remote_name,
)
from ralph_uv.config import paths
from ralph_uv.errors import UserError
from ralph_uv.registry import Registry, RemoteRecord, SessionRecord
from ralph_uv.status import LoopStatus


def _loop(loop_id: str, task: str, status: LoopStatus, started: float) -> SessionRecord:
    return SessionRecord(loop_id=loop_id, task_name=task, task_dir=f"/w/{task}", agent="claude",
                         status=status, started_at=started, pid=4242,
                         socket_path=f"/run/{loop_id}.sock")


def _token_file(tmp_path: Path, mode: int = 0o600) -> Path:
    file = tmp_path / "token"
    file.write_text("t" * 40 + "\n")
    file.chmod(mode)
    return file


def test_remote_names_follow_the_registry_rule() -> None:
    """Letters, digits, '.', '_' and '-' (starting with a letter or digit, at most 63) make a
    name; 'local', slashes, colons, spaces and leading dots are refused with the rule."""
    for name in ("box", "gpu-1", "a.b_c", "X" * 63):
        assert validate_remote_name(name) == name
    for name in ("local", "", "-x", ".x", "a/b", "a:b", "a b", "X" * 64, "é"):
        with pytest.raises(UserError, match="cannot name a remote"):
            validate_remote_name(name)


def test_settings_round_trip_through_their_file() -> None:
    """Settings are written as TOML (only those set) and read back equal; unknown keys and
    wrong types in the file are refused naming the file."""
    settings = RemoteSettings(tls_ca=Path("/etc/ca.pem"), remote_ralph="~/.local/bin/ralph-uv",
                              tunnel=True, tls_server_name="ralph.lan")
    text = settings.to_toml()
    assert "tls_cert" not in text
    folder = paths().config / "remotes"
    folder.mkdir(parents=True)
    (folder / "box.toml").write_text(text)
    assert load_settings("box") == settings
    assert load_settings("other") == RemoteSettings()
    (folder / "box.toml").write_text('colour = "red"\n')
    with pytest.raises(UserError, match="unknown setting"):
        load_settings("box")
    (folder / "box.toml").write_text("tunnel = 1\n")
    with pytest.raises(UserError, match=r"box\.toml: tunnel must be true or false"):
        load_settings("box")


async def test_add_refuses_bad_combinations_before_connecting(tmp_path: Path) -> None:
    """Without connecting anywhere, `add` refuses: a token for an SSH remote, a TCP remote
    without a token, an identity file for a TCP remote, two tokens at once, a token file that
    others can read, plain TCP off loopback (unless tunnel), a bad URL; and nothing is stored."""
    token = _token_file(tmp_path)
    (tmp_path / "shared").mkdir()
    readable = _token_file(tmp_path / "shared", 0o644)
    cases: list[tuple[dict[str, object], str]] = [
        ({"url": "ssh://me@host", "token": "x" * 20}, "authenticates with your SSH keys"),
        ({"url": "tcp://127.0.0.1:7420"}, "needs the listener's token"),
        ({"url": "tcp://127.0.0.1:7420", "token_file": token,
          "identity_file": token}, "only applies to ssh://"),
        ({"url": "tcp://127.0.0.1:7420", "token": "x" * 20, "token_file": token},
         "not both"),
        ({"url": "tcp://127.0.0.1:7420", "token_file": readable}, "can be read by other users"),
        ({"url": "tcp://192.168.1.9:7420", "token_file": token}, "refusing plain TCP"),
        ({"url": "ziti://svc?identity=/x.json"}, "OpenZiti remote needs"),
        ({"url": "ftp://host"}, "unknown scheme"),
        ({"url": "tcp://127.0.0.1:7420", "token": "short"}, "shorter than 16"),
    ]
    for values, words in cases:
        kwargs = dict(values)
        url = str(kwargs.pop("url"))
        with pytest.raises(UserError, match=words):
            await add_remote("box", url, check=False, **kwargs)  # type: ignore[arg-type]
    assert not paths().registry.exists() or Registry.open().list_remotes() == []
    assert not (paths().config / "remotes" / "box.token").exists()


async def test_added_token_is_kept_in_a_private_file_and_removed_with_the_remote() -> None:
    """A token given directly goes to <config>/remotes/NAME.token (0600); the registry keeps
    only a file: reference; the connect options carry it; removing the remote deletes the
    file and the settings, and a second remove says the remote is unknown."""
    record, probe = await add_remote(
        "lan", "tcp://127.0.0.1:7420?tls=1", token="s3cret-token-0123456789",
        settings=RemoteSettings(tls_ca=Path("/etc/ssl/ca.pem")), check=False)
    assert probe is None
    stored = paths().config / "remotes" / "lan.token"
    assert record.url == "tcps://127.0.0.1:7420"
    assert record.token_ref == f"file:{stored}"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert get_remote("lan") == record
    options = remote_options(record)
    assert options.token == "s3cret-token-0123456789"
    assert options.tls_ca == Path("/etc/ssl/ca.pem")
    assert "s3cret" not in repr(options)
    remove_remote("lan")
    assert not stored.exists()
    assert not (paths().config / "remotes" / "lan.toml").exists()
    with pytest.raises(UserError, match="no remote named 'lan'"):
        remove_remote("lan")


def test_env_token_refs_and_plain_tcp_at_connect_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token_ref env:NAME is read from the environment (and missing, says which variable);
    a stored plain-TCP remote off loopback is refused when a connection is made, not only
    when it is added."""
    with Registry.open() as registry:
        registry.add_remote(RemoteRecord("env", "tcp://127.0.0.1:1", token_ref="env:LAN_TOKEN"))
        registry.add_remote(RemoteRecord("far", "tcp://10.1.2.3:7420", token_ref="env:X"))
    with pytest.raises(UserError, match=r"\$LAN_TOKEN, which is not set"):
        remote_options(get_remote("env"))
    monkeypatch.setenv("LAN_TOKEN", "from-the-environment")
    assert remote_options(get_remote("env")).token == "from-the-environment"
    with pytest.raises(UserError, match=r"refusing plain TCP to 10\.1\.2\.3"):
        remote_opener(get_remote("far"))


def test_mirrored_rows_carry_the_remote_id_and_drop_its_pid() -> None:
    """A remote's record is stored as <remote>:<id> with location, remote_loop_id,
    remote_seen_at, transport and endpoint set and the remote machine's pid and socket
    cleared; the remote's own mirrors of other machines are not copied."""
    remote = RemoteRecord("box", "ssh://me@box.example:2222")
    seen = time.time()
    theirs = _loop("demo-abc123", "demo", LoopStatus.RUNNING, seen - 5)
    third = SessionRecord(loop_id="gpu:x", task_name="t", task_dir="/t", agent="claude",
                          location="gpu", remote_loop_id="x")
    [stored] = mirror_records(remote, [theirs, third], seen)
    assert stored.loop_id == mirror_id("box", "demo-abc123") == "box:demo-abc123"
    assert (stored.location, stored.remote_loop_id, stored.remote_seen_at) == (
        "box", "demo-abc123", seen)
    assert (stored.transport, stored.endpoint) == ("ssh", "ssh://me@box.example:2222")
    assert (stored.pid, stored.socket_path) == (None, None)
    assert (stored.task_name, stored.status, stored.started_at) == (
        "demo", LoopStatus.RUNNING, seen - 5)
    with Registry.open() as registry:
        assert [r.loop_id for r in registry.find()] == ["box:demo-abc123"]


def test_a_task_resolves_to_where_its_loop_runs() -> None:
    """An exact id (local, mirrored or the remote's own) wins; by task name an active loop
    beats a finished one and, among active ones, this machine's beats a remote's; with only
    finished loops the newest; --on restricts to that remote; unknown names go to this
    machine's ralphd, which will say so."""
    now = time.time()
    with Registry.open() as registry:
        registry.add_remote(RemoteRecord("box", "ssh://box"))
        registry.add_remote(RemoteRecord("gpu", "ssh://gpu"))
        registry.upsert(_loop("web-111111", "web", LoopStatus.COMPLETED, now - 100))
        registry.upsert(_loop("api-222222", "api", LoopStatus.RUNNING, now - 50))
        registry.upsert(_loop("old-333333", "old", LoopStatus.STOPPED, now - 300))
    mirror_records(RemoteRecord("box", "ssh://box"), [
        _loop("web-aaaaaa", "web", LoopStatus.RUNNING, now - 10),
        _loop("api-bbbbbb", "api", LoopStatus.RUNNING, now - 5),
        _loop("old-cccccc", "old", LoopStatus.FAILED, now - 20),
    ])
    mirror_records(RemoteRecord("gpu", "ssh://gpu"), [
        _loop("old-dddddd", "old", LoopStatus.COMPLETED, now - 400),
    ])

    def where(task: str, on: str | None = None) -> tuple[str | None, str]:
        target = resolve_loop(task, on)
        return target.remote, target.loop

    assert where("web-111111") == (None, "web-111111")
    assert where("box:web-aaaaaa") == ("box", "web-aaaaaa")
    assert where("web-aaaaaa") == ("box", "web-aaaaaa")
    assert where("web") == ("box", "web-aaaaaa")  # the local one has ended
    assert where("api") == (None, "api-222222")  # both run: this machine's first
    assert where("api", "box") == ("box", "api-bbbbbb")
    assert where("old") == ("box", "old-cccccc")  # none active: the newest
    assert where("old", "gpu") == ("gpu", "old-dddddd")
    assert where("old", "local") == (None, "old-333333")
    assert where("web", "gpu") == ("gpu", "web")  # gpu's ralphd is asked, and answers
    assert resolve_loop("nothing") == LoopTarget(None, "nothing")
    with pytest.raises(UserError, match="no remote named 'nowhere'"):
        resolve_loop("web", "nowhere")

