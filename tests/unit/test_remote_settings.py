"""The settings and files remote loops add: daemon.toml's checkout_retention, min_free_space
and allow_local_origins, the runner spec's push_every, and the runner's http.json."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from ralph_uv.agents import get_backend
from ralph_uv.agents.opencode import OpenCodeBackend
from ralph_uv.config import Config
from ralph_uv.daemon.config import load_daemon_config
from ralph_uv.errors import UserError
from ralph_uv.runner.http_info import (
    HttpInfo,
    publishing_backends,
    read_http_info,
    write_http_info,
)
from ralph_uv.runner.spec import read_spec, write_spec


def _daemon_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "daemon.toml"
    path.write_text(text)
    return path


def test_remote_loop_defaults(tmp_path: Path) -> None:
    """Without daemon.toml: checkouts go 7 days after their loop, 1 GiB stays free, and
    file:// origins are refused."""
    settings = load_daemon_config(tmp_path / "missing.toml")
    assert settings.checkout_retention_days == 7.0
    assert settings.min_free_space == 1 << 30
    assert settings.allow_local_origins is False


@pytest.mark.parametrize(
    ("text", "days"),
    [
        ('checkout_retention = "keep"', None),
        ("checkout_retention = { after_days = 3 }", 3.0),
        ("[checkout_retention]\nafter_days = 0.5", 0.5),
        ('checkout_retention = "after_days = 0"', 0.0),
    ],
)
def test_checkout_retention_forms(tmp_path: Path, text: str, days: float | None) -> None:
    """"keep", an inline or full table with after_days, and the "after_days = N" string."""
    settings = load_daemon_config(_daemon_toml(tmp_path, text + "\n"))
    assert settings.checkout_retention_days == days


@pytest.mark.parametrize(
    "text",
    [
        'checkout_retention = "forever"',
        "checkout_retention = { after_days = -1 }",
        "checkout_retention = { days = 3 }",
        "checkout_retention = 3",
        'allow_local_origins = "yes"',
        "min_free_space = 0",
    ],
)
def test_bad_remote_settings(tmp_path: Path, text: str) -> None:
    """Wrong values are refused naming the setting and what it accepts."""
    with pytest.raises(UserError) as caught:
        load_daemon_config(_daemon_toml(tmp_path, text + "\n"))
    assert text.split(" ", 1)[0].strip("[]") in caught.value.message


def test_allow_local_origins_switch(tmp_path: Path) -> None:
    """The test-only switch is read as a boolean."""
    settings = load_daemon_config(_daemon_toml(tmp_path, "allow_local_origins = true\n"))
    assert settings.allow_local_origins is True


def test_spec_carries_push_every(tmp_path: Path) -> None:
    """push_every and first_run_setup survive write_spec/read_spec; a spec without
    push_every reads as None; zero, a string or a boolean are refused."""
    path = tmp_path / "spec.json"
    write_spec(path, loop_id="demo-1", task_dir=tmp_path, task_name="demo", agent="claude",
               first_run_setup=True, push_every=3)
    spec = read_spec(path)
    assert (spec.push_every, spec.first_run_setup) == (3, True)
    write_spec(path, loop_id="demo-1", task_dir=tmp_path, task_name="demo", agent="claude")
    assert read_spec(path).push_every is None
    for bad in (0, "3", True):
        path.write_text(
            '{"loop_id": "demo-1", "task_dir": "/x", "agent": "claude", "push_every": '
            + ('"3"' if bad == "3" else str(bad).lower()) + "}")
        with pytest.raises(UserError, match="push_every"):
            read_spec(path)


def test_http_file_round_trip(tmp_path: Path) -> None:
    """http.json is written 0600 and read back; only loopback addresses count as loopback;
    a missing or broken file reads as None."""
    write_http_info(tmp_path, HttpInfo("http://127.0.0.1:4096", "pw"))
    assert stat.S_IMODE((tmp_path / "http.json").stat().st_mode) == 0o600
    info = read_http_info(tmp_path)
    assert info == HttpInfo("http://127.0.0.1:4096", "pw")
    assert info is not None
    assert (info.host, info.port, info.is_loopback) == ("127.0.0.1", 4096, True)
    assert not HttpInfo("http://10.0.0.1:80", "pw").is_loopback
    assert HttpInfo("http://[::1]:80", "pw").is_loopback
    (tmp_path / "http.json").write_text("{broken")
    assert read_http_info(tmp_path) is None
    assert read_http_info(tmp_path / "nowhere") is None


def test_opencode_backends_publish_their_server(tmp_path: Path) -> None:
    """The runner's backend factory hooks opencode backends so that their server is written
    to http.json when it answers and removed when it stops; PTY backends are left as they are."""
    make = publishing_backends(tmp_path, get_backend)
    opencode = make("opencode", Config())
    assert isinstance(opencode, OpenCodeBackend)
    hook = opencode.on_server
    assert hook is not None
    hook("http://127.0.0.1:5000", opencode.password)
    assert read_http_info(tmp_path) == HttpInfo("http://127.0.0.1:5000", opencode.password)
    hook(None, opencode.password)
    assert not (tmp_path / "http.json").exists()
    claude = make("claude", Config())
    assert getattr(claude, "on_server", None) is None
