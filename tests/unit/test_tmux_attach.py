"""Pure parts of the tmux backend and of ``attach --tmux``: the command lines that reach a
loop's tmux session here, over SSH and over OpenZiti; the keystroke commands; the session
records; the spec's ``backend`` field; what ``opencode attach`` is given."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from ralph_uv.client.daemon import HttpAuth
from ralph_uv.client.http_proxy import opencode_attach_argv, opencode_attach_env
from ralph_uv.client.tmux_attach import tmux_attach_argv
from ralph_uv.errors import RalphError, UserError
from ralph_uv.runner.spec import RunnerSpec, write_spec
from ralph_uv.runner.tmux_target import TmuxTarget, key_commands, session_name, tmux_socket
from ralph_uv.transports import ConnectOptions

TARGET = TmuxTarget("ralph-uv", "ralph-demo")
REMOTE = "tmux -L ralph-uv attach-session -t =ralph-demo"


def test_local_attach_is_plain_tmux_on_ralph_uv_socket() -> None:
    """Locally (no URL, or unix://) the command is tmux on ralph-uv's own socket, with an
    exact session match; a socket path uses -S instead of -L."""
    expected = ["tmux", "-L", "ralph-uv", "attach-session", "-t", "=ralph-demo"]
    assert tmux_attach_argv(TARGET) == expected
    assert tmux_attach_argv(TARGET, "unix://") == expected
    assert tmux_attach_argv(TmuxTarget("/run/t/sock", "ralph-x")) == \
        ["tmux", "-S", "/run/t/sock", "attach-session", "-t", "=ralph-x"]


def test_ssh_attach_runs_tmux_with_a_terminal_on_the_host() -> None:
    """ssh://user@host:port becomes `ssh -t -p port user@host <tmux command>`, the remote
    command as one shell-quoted word; the remote's key and known_hosts are passed on."""
    assert tmux_attach_argv(TARGET, "ssh://dev@build.example:2222") == \
        ["ssh", "-t", "-p", "2222", "dev@build.example", REMOTE]
    assert tmux_attach_argv(TARGET, "ssh://build.example") == \
        ["ssh", "-t", "build.example", REMOTE]
    options = ConnectOptions(identity_file=Path("/k/id"), known_hosts=Path("/k/known"),
                             ssh_config=())
    assert tmux_attach_argv(TARGET, "ssh://build.example", options=options) == [
        "ssh", "-t", "-F", "/dev/null", "-i", "/k/id", "-o", "IdentitiesOnly=yes",
        "-o", "UserKnownHostsFile=/k/known", "build.example", REMOTE,
    ]
    odd = TmuxTarget("ralph uv", "ralph-demo")
    assert tmux_attach_argv(odd, "ssh://h")[-1] == \
        "tmux -L 'ralph uv' attach-session -t =ralph-demo"


def test_ziti_attach_goes_through_ralph_uv_dial_to_sshd() -> None:
    """Over OpenZiti, ssh dials through `ralph-uv dial <ssh-via URL>` as ProxyCommand (its
    % escapes doubled, since ssh expands %-tokens there); without --ssh-via it is refused
    with what to pass; --ssh-via must itself be a ziti:// or tcp:// URL."""
    argv = tmux_attach_argv(TARGET, "ziti://ralphd-box?identity=/id/me.json",
                            ssh_via="ziti://box-ssh?identity=/id/my%20id.json",
                            ssh_user="dev", ralph=["ralph-uv"])
    assert argv[:2] == ["ssh", "-t"]
    assert argv[2] == "-o"
    proxy = argv[3].removeprefix("ProxyCommand=")
    assert shlex.split(proxy.replace("%%", "%")) == \
        ["ralph-uv", "dial", "ziti://box-ssh?identity=/id/my%20id.json"]
    assert "%%20" in proxy
    assert argv[4:] == ["dev@box-ssh", REMOTE]
    tcp = tmux_attach_argv(TARGET, "tcps://10.0.0.5:7000", ssh_via="tcp://10.0.0.5:22",
                           ralph=["r"])
    assert tcp[-2:] == ["10.0.0.5", REMOTE]
    assert tcp[2:4] == ["-p", "22"]
    with pytest.raises(UserError, match="--ssh-via"):
        tmux_attach_argv(TARGET, "ziti://ralphd-box")
    with pytest.raises(UserError, match="ziti:// or tcp://"):
        tmux_attach_argv(TARGET, "ziti://ralphd-box", ssh_via="ssh://box")


def test_tmux_target_from_status_is_checked() -> None:
    """A get_status `tmux` field is read back exactly; a missing or strange one is an error
    (a session name with shell or tmux syntax in it is refused)."""
    assert TmuxTarget.from_dict(TARGET.to_dict()) == TARGET
    for bad in (None, {}, {"socket": "s"}, {"socket": "s", "session": "a;b"},
                {"socket": "", "session": "x"}, {"socket": "s", "session": "x:y"}):
        with pytest.raises(RalphError):
            TmuxTarget.from_dict(bad)


def test_session_names_and_socket() -> None:
    """Sessions are ralph-<task> with characters tmux dislikes replaced; the socket is
    ralph-uv unless RALPH_TMUX_SOCKET names another."""
    assert session_name("demo") == "ralph-demo"
    assert session_name("feature/v1.2:x") == "ralph-feature-v1-2-x"
    assert session_name("...") == "ralph-loop"
    assert tmux_socket({}) == "ralph-uv"
    assert tmux_socket({"RALPH_TMUX_SOCKET": "other"}) == "other"


def _typed(calls: list[list[str]]) -> bytes:
    """Replays send-keys commands the way tmux types them."""
    out = bytearray()
    for call in calls:
        words = iter(call)
        for word in words:
            if word == ";":
                continue
            assert word == "send-keys"
            assert next(words) == "-t"
            assert next(words) == "%3"
            mode = next(words)
            if mode == "-l":
                assert next(words) == "--"
                out += next(words).encode()
            else:
                assert mode == "-H"
                out.append(int(next(words), 16))
    return bytes(out)


@pytest.mark.parametrize("data", [
    b"hello\r",
    b"ls; echo done;\r",
    b"\x1b[A\x03\x7f-x --y",
    "caf\u00e9 \u2603 \U0001f600\r".encode(),
    b"\xff\xfe broken \xc3",
    bytes(range(256)) * 3,
    b"x" * 20000,
    "\U0001f600".encode() * 6000,
])
def test_keystrokes_are_typed_exactly(data: bytes) -> None:
    """Whatever bytes are sent, the send-keys commands type exactly them, in order: text
    with -l (never an argument ending in ';', which tmux would take as a separator), the
    rest as raw bytes with -H, in calls small enough for tmux's client messages."""
    calls = key_commands("%3", data)
    assert _typed(calls) == data
    for call in calls:
        assert sum(len(word.encode()) + 1 for word in call) < 16 * 1024
        for word in call:
            assert word == ";" or not word.endswith(";")


def test_spec_backend_field(tmp_path: Path) -> None:
    """spec.json carries backend (pty by default, or tmux) into the engine's LoopSpec;
    anything else is refused naming the choices."""
    path = tmp_path / "spec.json"
    spec = write_spec(path, loop_id="demo-1", task_dir=tmp_path, task_name="demo",
                      agent="claude", backend="tmux")
    assert spec.to_dict()["backend"] == "tmux"
    assert spec.loop_spec().backend == "tmux"
    default = RunnerSpec.from_dict({"loop_id": "a", "task_dir": "/x", "agent": "claude"})
    assert default.backend == "pty"
    with pytest.raises(UserError, match="pty, tmux"):
        RunnerSpec.from_dict({"loop_id": "a", "task_dir": "/x", "agent": "c",
                              "backend": "screen"})


def test_opencode_attach_gets_the_password_only_in_its_environment() -> None:
    """`opencode attach` is given the relay URL and the session on its command line and the
    server's user name and password in its environment only."""
    auth = HttpAuth(loop_id="demo-1", username="opencode", password="s3cret-pw")
    argv = opencode_attach_argv("/bin/opencode", "http://127.0.0.1:5000", "ses_1")
    assert argv == ["/bin/opencode", "attach", "http://127.0.0.1:5000", "--session", "ses_1"]
    assert not any("s3cret" in word for word in argv)
    env = opencode_attach_env(auth, {"PATH": "/bin"})
    assert env == {"PATH": "/bin", "OPENCODE_SERVER_USERNAME": "opencode",
                   "OPENCODE_SERVER_PASSWORD": "s3cret-pw"}
    assert "s3cret" not in repr(auth)
