"""ralphd's network listeners in daemon.toml: ``[[listeners]]`` tables with their token and TLS
files, what is refused when the file is read, and what ``ralphd check`` says about each one
(real files in the test's RALPH_HOME)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ralph_uv.config import paths
from ralph_uv.daemon.check import Level, run_checks
from ralph_uv.daemon.config import load_daemon_config
from ralph_uv.errors import UserError


def _write(text: str) -> Path:
    file = paths().daemon_config_file
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)
    return file


def _token(folder: Path, mode: int = 0o600) -> Path:
    file = folder / "listener.token"
    file.write_text("k" * 43 + "\n")
    file.chmod(mode)
    return file


def test_listener_tables_carry_their_files(tmp_path: Path) -> None:
    """A [[listeners]] table gives the URL, token file, certificate, key and client CA (with
    ~ expanded); the listen options carry them; a plain URL string is still accepted."""
    file = _write(
        '[[listeners]]\nurl = "tcp://0.0.0.0:7420?tls=1"\ntoken_file = "~/t.token"\n'
        f'tls_cert = "{tmp_path}/c.pem"\ntls_key = "{tmp_path}/k.pem"\n'
        f'client_ca = "{tmp_path}/ca.pem"\n'
        '[[listeners]]\nurl = "ziti://ralph-control-box?identity=/etc/ziti/box.json"\n'
        'token_file = "/etc/ralph/t.token"\n'
    )
    tcp, ziti = load_daemon_config(file).listeners
    assert (tcp.scheme, tcp.host, tcp.port, tcp.tls) == ("tcp", "0.0.0.0", 7420, True)
    assert tcp.token_file == Path("~/t.token").expanduser()
    options = tcp.options()
    assert (options.tls_cert, options.tls_key, options.tls_client_ca) == (
        tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem")
    assert options.token_file == tcp.token_file
    assert (ziti.scheme, ziti.token_file) == ("ziti", Path("/etc/ralph/t.token"))
    _write('listeners = ["tcp://127.0.0.1:7420"]\n')
    [plain] = load_daemon_config(paths().daemon_config_file).listeners
    assert (plain.loopback, plain.token_file) == (True, None)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[[listeners]]\nurl = "tcp://0.0.0.0:7420"\ntoken_file = "/t"\n', "must use TLS"),
        ('[[listeners]]\nurl = "tcp://0.0.0.0:7420?tls=1"\ntoken_file = "/t"\n',
         "give its certificate and key"),
        ('[[listeners]]\nurl = "tcp://127.0.0.1:7420"\ntoken = "inline"\n', "unknown: token"),
        ('[[listeners]]\ntoken_file = "/t"\n', "needs url"),
        ('[[listeners]]\nurl = "tcp://127.0.0.1:7420"\ntoken_file = 5\n', "must be a path"),
        ("listeners = [1]\n", "list of URLs"),
    ],
)
def test_bad_listener_tables_are_refused(text: str, words: str) -> None:
    """A listener off loopback without TLS, TLS without its files, an inline token, a table
    without url, a non-path file and a list of other things are refused naming daemon.toml."""
    file = _write(text)
    with pytest.raises(UserError, match=words) as caught:
        load_daemon_config(file)
    assert str(file) in caught.value.message


def test_check_reports_each_listener_by_its_files(tmp_path: Path) -> None:
    """`ralphd check`: a listener without a token file, with one others can read, or with a
    missing certificate is a problem with a fix; one whose files are in place is ok."""
    token = _token(tmp_path)
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    base = f'[[listeners]]\nurl = "tcp://0.0.0.0:7420?tls=1"\ntls_cert = "{cert}"\n' \
           f'tls_key = "{key}"\n'

    def listener() -> tuple[Level, str, str | None]:
        [found] = [c for c in run_checks() if c.name == "listener"]
        return found.level, found.detail, found.fix

    _write('listeners = ["tcp://127.0.0.1:7420"]\n')
    level, _, fix = listener()
    assert level == Level.PROBLEM
    assert fix is not None
    assert "token_file" in fix
    _write(base + f'token_file = "{token}"\n')
    level, detail, _ = listener()
    assert level == Level.PROBLEM
    assert "does not exist" in detail
    cert.write_text("pem")
    key.write_text("pem")
    assert listener()[0] == Level.OK
    token.chmod(0o644)
    level, detail, _ = listener()
    assert level == Level.PROBLEM
    assert "can be read by other users" in detail
