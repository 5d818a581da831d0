"""Remote loops from the command line, against a real sshd on 127.0.0.1 whose logins run this
checkout's ralph-uv in a RALPH_HOME of their own (and, for TCP/TLS, a real ralphd with a TLS
listener): ``remote add/list/check/remove``, ``run --on``, ``status`` across machines (also
when a remote does not answer), completions caught up without attaching, ``logs``/``stop``/
``pull`` of remote loops, and the refusals that happen before anything is sent."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fixtures.sshd import (  # noqa: F401 - fixtures, used by name
    SSHServer,
    ssh_home_fixture,
    sshd_fixture,
    start_sshd,
)
from tests.helpers import wait_until
from tests.integration.remote_harness import (  # noqa: F401 - box_fixture: used by name
    RALPHD,
    add_box,
    box_fixture,
    cleanup,
    git,
    local_rows,
    ok,
    ralph,
    remote_loop,
    remote_paths,
    status_rows,
    task_repo,
    write_remote_config,
)

from ralph_uv.registry import Registry

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _ended(home: Path, loop_id: str) -> bool:
    return remote_loop(home, loop_id).status.is_terminal


def _started(stderr: str) -> str:
    """The remote loop id from `run --on`'s "loop ID started on" line."""
    for line in stderr.splitlines():
        if " started on " in line:
            return line.split("loop ", 1)[1].split()[0]
    raise AssertionError(f"no start line in:\n{stderr}")


def test_remote_add_list_check_and_remove(box: SSHServer, tmp_path: Path) -> None:
    """`remote add` connects once (starting ralphd there) and stores the remote; `remote list`
    says it is reachable with its version, loops and a round-trip time; `remote check` shows
    the remote machine's `ralphd check`; a second add of the name is refused; `remote remove`
    forgets it."""
    out = ok(ralph(tmp_path, "remote", "add", "box", box.url, "--identity", str(box.identity)))
    assert "added box" in out
    assert "ralphd 0.1.0" in out
    listed = json.loads(ok(ralph(tmp_path, "remote", "list", "--json", "--timeout", "20")))
    assert [(r["name"], r["reachable"], r["version"], r["loops_active"]) for r in listed] == [
        ("box", True, "0.1.0", 0)]
    assert listed[0]["rtt_ms"] > 0
    checked = ralph(tmp_path, "remote", "check", "box")
    assert checked.returncode in (0, 1), checked.stderr
    assert f"{box.remote_home}/config/config.toml" in checked.stdout
    assert "listeners" in checked.stdout
    again = ralph(tmp_path, "remote", "add", "box", box.url, "--identity", str(box.identity))
    assert again.returncode == 2
    assert "exists already" in again.stderr
    assert "removed box" in ok(ralph(tmp_path, "remote", "remove", "box"))
    assert json.loads(ok(ralph(tmp_path, "remote", "list", "--json"))) == []


def test_run_on_a_remote_then_status_logs_and_pull(box: SSHServer, tmp_path: Path) -> None:
    """`run --on box` bundles the branch over and starts the loop in a checkout there (the
    scripted agent commits one story per iteration); `status --all` lists it with location box
    next to local loops; once it has ended (nobody attached), `status` records it as completed;
    `logs` reads its journal there; `pull` brings both commits into a local branch without
    touching the work tree."""
    repo = task_repo(tmp_path)
    add_box(repo, box)
    started = ralph(repo, "run", "demo", "--on", "box", "--agent", "work", "--detach")
    ok(started)
    loop_id = _started(started.stderr)
    wait_until(lambda: _ended(box.remote_home, loop_id), timeout=60)
    [row] = [r for r in status_rows(repo, "--timeout", "20") if r["task_name"] == "demo"]
    assert (row["loop_id"], row["location"], row["remote_loop_id"]) == (
        f"box:{loop_id}", "box", loop_id)
    assert row["status"] == "completed"
    assert row["stale"] is False
    logs = ok(ralph(repo, "logs", "demo"))
    assert "Implemented US-001" in logs
    assert "Implemented US-002" in logs
    assert git(repo, "status", "--porcelain") == ""
    pulled = ok(ralph(repo, "pull", "demo"))
    assert pulled.startswith("pulled ralph/demo at ")
    assert git(repo, "log", "--format=%s", "ralph/demo").splitlines()[:2] == [
        "US-002: implemented", "US-001: implemented"]
    assert git(repo, "branch", "--show-current") == "main"
    assert git(repo, "status", "--porcelain") == ""


def test_completion_is_caught_up_through_the_event_cursor(box: SSHServer,
                                                         tmp_path: Path) -> None:
    """A remote loop that ends while no client is connected is recorded here as completed by
    the next `status` (no --all, nobody attached); the remote's events cursor moves to the end
    of its daemon event log, so the next catch-up starts there."""
    repo = task_repo(tmp_path)
    add_box(repo, box)
    loop_id = _started(ok_stderr(ralph(repo, "run", "demo", "--on", "box", "--agent", "work",
                                       "--detach")))
    [mirror] = local_rows(remote_loop_id=loop_id)
    assert mirror.location == "box"
    wait_until(lambda: _ended(box.remote_home, loop_id), timeout=60)
    assert local_rows(remote_loop_id=loop_id)[0].status.is_active  # not seen yet
    ok(ralph(repo, "status", "--timeout", "20"))
    [mirror] = local_rows(remote_loop_id=loop_id)
    assert mirror.status.value == "completed"
    assert mirror.remote_seen_at is not None
    events = remote_paths(box.remote_home).state / "daemon" / "events.ndjson"
    last_seq = json.loads(events.read_text().splitlines()[-1])["seq"]
    with Registry.open() as registry:
        remote = registry.get_remote("box")
    assert remote is not None
    assert remote.events_cursor == last_seq + 1


def ok_stderr(done: subprocess.CompletedProcess[str]) -> str:
    ok(done)
    return done.stderr


def test_unreachable_remote_shows_last_known_state_then_catches_up(
    box: SSHServer, tmp_path: Path
) -> None:
    """With the remote's sshd gone, `status` answers within its timeout and shows the remote
    loop as last seen (marked stale, with how long ago) and says the remote is unreachable.
    When sshd is back, `stop` reaches the loop, and `status` records it as stopped."""
    repo = task_repo(tmp_path)
    add_box(repo, box)
    loop_id = _started(ok_stderr(ralph(repo, "run", "demo", "--on", "box", "--agent", "tick",
                                       "--detach")))
    [row] = status_rows(repo, "--timeout", "20")
    assert (row["status"], row["stale"]) == ("running", False)
    box.kill_sessions()
    box.process.kill()
    box.process.wait(5)
    began = time.monotonic()
    done = ralph(repo, "status", "--timeout", "2")
    assert time.monotonic() - began < 20
    ok(done)
    assert "box is unreachable" in done.stderr
    assert "its loops as last seen" in done.stderr
    assert "(seen " in done.stdout
    assert " ago)" in done.stdout
    [row] = status_rows(repo, "--timeout", "2")
    assert (row["status"], row["stale"]) == ("running", True)
    again = start_sshd(box.root, port=box.port)
    box.process = again.process
    assert f"({loop_id})" in ok(ralph(repo, "stop", "demo", "--now"))
    wait_until(lambda: _ended(box.remote_home, loop_id), timeout=30)
    [row] = status_rows(repo, "--timeout", "20")
    assert (row["status"], row["stale"]) == ("stopped", False)


# ------------------------------------------------------------------------- refused up front


@pytest.fixture
def unreachable(tmp_path: Path, ssh_home: Path) -> Path:
    """A repository and a remote `far` added without a check at a port where nothing
    listens: whatever these tests see is refused before any connection is tried."""
    repo = task_repo(tmp_path)
    ok(ralph(repo, "remote", "add", "far", "ssh://nobody@127.0.0.1:9", "--no-check"))
    return repo


def test_bad_input_is_refused_before_anything_is_sent(unreachable: Path) -> None:
    """`run --on` refuses, with a message saying what is accepted and exit status 2: an origin
    URL using git's ext:: helper, a branch to send that starts with '-', a prd branchName with
    '..', --push-every without --sync origin, and an unknown remote name. None of them tried to
    reach the remote (whose port has no listener)."""
    repo = unreachable
    git(repo, "remote", "add", "origin", "ext::sh -c touch% /tmp/ralph-pwned")
    cases = [
        ((), "ext::"),
        (("--base-branch=-evil",), "cannot start with '-'"),
        (("--sync", "bundle", "--push-every", "2"), "--sync origin"),
    ]
    for extra, words in cases:
        done = ralph(repo, "run", "demo", "--on", "far", "--detach", *extra)
        assert done.returncode == 2, (extra, done.stderr)
        assert words in done.stderr, done.stderr
    git(repo, "remote", "remove", "origin")
    prd_file = repo / "tasks" / "demo" / "prd.json"
    prd = json.loads(prd_file.read_text())
    prd["branchName"] = "ralph/../escape"
    prd_file.write_text(json.dumps(prd))
    git(repo, "commit", "-qam", "bad branch")
    done = ralph(repo, "run", "demo", "--on", "far", "--detach")
    assert done.returncode == 2
    assert "'..'" in done.stderr
    unknown = ralph(repo, "run", "demo", "--on", "nowhere", "--detach")
    assert unknown.returncode == 2
    assert "no remote named 'nowhere' (known: far)" in unknown.stderr
    assert "remote add nowhere" in unknown.stderr
    for command in (("attach", "demo"), ("stop", "demo"), ("logs", "demo"), ("pull", "demo")):
        refused = ralph(repo, *command, "--on", "nowhere")
        assert refused.returncode == 2, command
        assert "no remote named" in refused.stderr


def test_unknown_host_key_is_refused_and_nothing_is_stored(sshd: SSHServer, ssh_home: Path,
                                                         tmp_path: Path) -> None:
    """`remote add` to a server whose host key is not in known_hosts is refused with the
    key's fingerprint and how to trust it; the remote is not stored."""
    done = ralph(tmp_path, "remote", "add", "box", sshd.url, "--identity", str(sshd.identity))
    assert done.returncode == 2
    assert "is not known" in done.stderr
    assert "SHA256:" in done.stderr
    assert "known_hosts" in done.stderr
    assert json.loads(ok(ralph(tmp_path, "remote", "list", "--json"))) == []


# --------------------------------------------------------------------------------- TCP / TLS


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    folder.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test ca")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "key.pem", "-out", "req.csr", "-subj", "/CN=127.0.0.1")
    (folder / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "req.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "cert.pem", "-days", "2", "-extfile", "ext")
    return folder / "ca.pem", folder / "cert.pem", folder / "key.pem"


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ralphd(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RALPHD, *args], capture_output=True, text=True, timeout=90,
                          check=False, env={**os.environ, "RALPH_HOME": str(home)})


@pytest.fixture
def other_home() -> Iterator[Path]:
    """A short, empty RALPH_HOME for a ralphd standing in for another machine."""
    home = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def tls_home(tmp_path: Path, ssh_home: Path,
             other_home: Path) -> Iterator[tuple[Path, str, Path, Path]]:
    """A ralphd in its own RALPH_HOME with a TLS listener on 127.0.0.1 and a token:
    (home, url, token file, CA certificate)."""
    home = other_home
    ca, cert, key = _certificates(tmp_path / "tls")
    token_file = home / "config" / "listener.token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text(secrets.token_urlsafe(32) + "\n")
    token_file.chmod(0o600)
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}?tls=1"
    write_remote_config(home, daemon_toml=(
        f'[[listeners]]\nurl = "{url}"\ntoken_file = "{token_file}"\n'
        f'tls_cert = "{cert}"\ntls_key = "{key}"\n'))
    with cleanup(home):
        started = _ralphd(home, "start")
        assert started.returncode == 0, started.stderr
        try:
            yield home, url, token_file, ca
        finally:
            _ralphd(home, "stop")


def test_tcp_tls_remote_end_to_end(tls_home: tuple[Path, str, Path, Path],
                                   tmp_path: Path) -> None:
    """ralphd listens on TCP with TLS and a token (`ralphd check` and its health list the
    listener); `remote add` with the token on stdin and the CA checks it; `run --on` sends the
    branch over TLS and the loop completes; `status` shows it with its location. A wrong token
    and an untrusted certificate are refused with what to do, and nothing is stored."""
    home, url, token_file, ca = tls_home
    checked = _ralphd(home, "check")
    assert f"ok       listener        {url} (TLS)" in checked.stdout
    health = json.loads(_ralphd(home, "status", "--json").stdout)
    assert health["listeners"][1] == url.replace("tcp://", "tcps://").replace("?tls=1", "")
    repo = task_repo(tmp_path)
    token = token_file.read_text().strip()
    untrusted = ralph(repo, "remote", "add", "lan", url, "--token", "-", stdin=token + "\n")
    assert untrusted.returncode == 2
    assert "not trusted" in untrusted.stderr
    assert "tls_ca" in untrusted.stderr
    wrong = ralph(repo, "remote", "add", "lan", url, "--token", "-", "--tls-ca", str(ca),
                  stdin=secrets.token_urlsafe(32) + "\n")
    assert wrong.returncode == 2
    assert "Unauthorized: wrong token" in wrong.stderr
    assert json.loads(ok(ralph(repo, "remote", "list", "--json"))) == []
    added = ok(ralph(repo, "remote", "add", "lan", url, "--token", "-", "--tls-ca", str(ca),
                     stdin=token + "\n"))
    assert "added lan (tcps://127.0.0.1:" in added
    stored = (Path(os.environ["RALPH_HOME"]) / "config" / "remotes" / "lan.token")
    assert stored.read_text().strip() == token
    assert stored.stat().st_mode & 0o777 == 0o600
    with Registry.open() as registry:
        remote = registry.get_remote("lan")
    assert remote is not None
    assert remote.token_ref == f"file:{stored}"
    listed = json.loads(ok(ralph(repo, "remote", "list", "--json", "--timeout", "20")))
    assert listed[0]["reachable"] is True
    loop_id = _started(ok_stderr(ralph(repo, "run", "demo", "--on", "lan", "--agent", "work",
                                       "--detach")))
    wait_until(lambda: _ended(home, loop_id), timeout=60)
    [row] = status_rows(repo, "--timeout", "20")
    assert (row["location"], row["status"], row["transport"]) == ("lan", "completed", "tcps")


def test_network_listeners_without_tls_or_token_are_refused(tmp_path: Path, ssh_home: Path,
                                                           other_home: Path) -> None:
    """ralphd refuses to start with a plain TCP listener on a non-loopback address or a
    listener without a token, saying why; `ralphd check` reports the tokenless one as a
    problem. The client refuses plain TCP to a non-loopback address unless --tunnel."""
    home = other_home
    port = _free_port()
    write_remote_config(home, daemon_toml=f'listeners = ["tcp://0.0.0.0:{port}"]\n')
    refused = _ralphd(home, "start")
    assert refused.returncode != 0
    assert "must use TLS and a token" in refused.stderr
    write_remote_config(home, daemon_toml=f'listeners = ["tcp://127.0.0.1:{port}"]\n')
    refused = _ralphd(home, "start")
    assert refused.returncode != 0
    assert "refusing to listen on tcp://127.0.0.1" in refused.stderr
    assert "without a token" in refused.stderr
    checked = _ralphd(home, "check")
    assert "problem  listener" in checked.stdout
    assert "token_file" in checked.stdout
    token = tmp_path / "token"
    token.write_text(secrets.token_urlsafe(32))
    token.chmod(0o600)
    plain = ralph(tmp_path, "remote", "add", "lan", "tcp://10.0.0.9:7777", "--token-file",
                  str(token))
    assert plain.returncode == 2
    assert "refusing plain TCP to 10.0.0.9" in plain.stderr
    assert "--tunnel" in plain.stderr
    tunneled = ok(ralph(tmp_path, "remote", "add", "lan", "tcp://10.0.0.9:7777",
                        "--token-file", str(token), "--tunnel", "--no-check"))
    assert "added lan" in tunneled
