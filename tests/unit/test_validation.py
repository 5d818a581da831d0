"""Names and URLs a client sends to ralphd: what is accepted, what is refused, and that every
refusal is an INVALID_NAME error saying what is accepted."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ralph_uv.errors import ErrorCode, UserError
from ralph_uv.validation import (
    display_url,
    validate_branch_name,
    validate_origin_url,
    validate_project_name,
    validate_task_name,
    validate_task_path,
)


@pytest.mark.parametrize(
    "url",
    [
        "ssh://git@example.com/org/app.git",
        "ssh://git@example.com:2222/org/app.git",
        "ssh://[::1]:22/srv/app.git",
        "https://example.com/org/app.git",
        "https://user:token@example.com/org/app.git",
        "git://example.com/app.git",
        "git@github.com:org/app.git",
        "deploy@10.0.0.5:repos/app",
    ],
)
def test_network_origins_are_accepted(url: str) -> None:
    """ssh://, https://, git:// and scp-like user@host:path come back unchanged."""
    assert validate_origin_url(url) == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ext::sh -c touch% /tmp/pwned", "spaces"),
        ("ext::ssh-evil", "helpers"),
        ("file:///srv/app.git", "scheme 'file'"),
        ("/srv/app.git", "local paths"),
        ("../app", "local paths"),
        ("-uhelp", "option"),
        ("--upload-pack=touch /tmp/x", "spaces"),
        ("ssh://-oProxyCommand=touch%20x/a", "host"),
        ("ssh://-oProxyCommand=x@host/a", "user name"),
        ("ssh://host:notaport/a", "port"),
        ("http://example.com/app.git", "scheme 'http'"),
        ("https://example.com", "repository path"),
        ("https://example.com/", "repository path"),
        ("git@github.com:-oops", "path starts with '-'"),
        ("https://exa mple.com/x", "spaces"),
        ("https://example.com/x\n", "control"),
        ("fd::17", "helpers"),
        ("", "empty"),
        ("github.com:org/app", "local paths"),
    ],
)
def test_dangerous_or_local_origins_are_refused(url: str, why: str) -> None:
    """Remote helpers, file URLs, local paths, option-looking values, bad hosts and ports, and
    control characters are refused with INVALID_NAME, the reason, and the accepted forms."""
    with pytest.raises(UserError) as caught:
        validate_origin_url(url)
    assert caught.value.code == ErrorCode.INVALID_NAME
    assert why in caught.value.message
    assert "user@host:path" in caught.value.message


def test_file_origins_only_with_the_test_switch() -> None:
    """allow_local accepts file:///absolute paths (and says so when refusing others), never
    relative file URLs or plain paths."""
    assert validate_origin_url("file:///srv/app.git", allow_local=True) == "file:///srv/app.git"
    for url in ("file://host/srv/app.git", "file:app.git", "/srv/app.git"):
        with pytest.raises(UserError, match="file:///path") as caught:
            validate_origin_url(url, allow_local=True)
        assert caught.value.code == ErrorCode.INVALID_NAME


def test_refusal_messages_hide_passwords() -> None:
    """A refused URL with a password is shown without it; display_url hides it everywhere."""
    with pytest.raises(UserError) as caught:
        validate_origin_url("http://me:s3cret@example.com/app.git")
    assert "s3cret" not in caught.value.message
    assert display_url("https://me:s3cret@example.com/a") == "https://me:***@example.com/a"
    assert display_url("https://me@example.com/a") == "https://me@example.com/a"
    assert display_url("git@github.com:org/a") == "git@github.com:org/a"


@pytest.mark.parametrize("name", ["main", "ralph/feature-1", "release/2.0", "a_b.c"])
def test_good_branch_names(name: str) -> None:
    """Branch names git accepts come back unchanged."""
    assert validate_branch_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "-x", "HEAD", "a..b", "a b", "a~1", "a^", "a:b", "a?", "a*", "a[", "a\\b",
     "a/", "/a", "a//b", ".a", "a/.b", "a.lock", "a.", "a@{1}", "x\x01"],
)
def test_bad_branch_names(name: str) -> None:
    """Names git check-ref-format --branch refuses are refused with INVALID_NAME and an
    example of a good name."""
    with pytest.raises(UserError) as caught:
        validate_branch_name(name)
    assert caught.value.code == ErrorCode.INVALID_NAME
    assert "ralph/my-feature" in caught.value.message


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab/.-_@{}~^:?*[\\ \x01HEADlock"), max_size=12))
def test_branch_names_agree_with_git(name: str) -> None:
    """For any name, validate_branch_name accepts exactly what `git check-ref-format --branch`
    accepts (git is the final word)."""
    done = subprocess.run(["git", "check-ref-format", "--branch", name], capture_output=True,
                          text=True, check=False) if name else None
    git_accepts = bool(done and done.returncode == 0 and done.stdout.strip() == name)
    try:
        validate_branch_name(name)
    except UserError:
        accepted = False
    else:
        accepted = True
    assert accepted == git_accepts


@pytest.mark.parametrize("name", ["app", "my-app", "my_app.v2", "A1"])
def test_good_project_names(name: str) -> None:
    """Folder-safe project names come back unchanged."""
    assert validate_project_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "-x", "a/b", "a b", "x" * 65, "a\x00"])
def test_bad_project_names(name: str) -> None:
    """Names that are not one plain folder name are refused with INVALID_NAME."""
    with pytest.raises(UserError) as caught:
        validate_project_name(name)
    assert caught.value.code == ErrorCode.INVALID_NAME
    assert "letters, digits" in caught.value.message


def test_task_names_are_checked_by_the_task_rules() -> None:
    """Task names follow ralph_uv.tasks' rules (nested names allowed, '..' not)."""
    assert validate_task_name("backend/login") == "backend/login"
    with pytest.raises(UserError) as caught:
        validate_task_name("../etc")
    assert caught.value.code == ErrorCode.INVALID_NAME


@pytest.mark.parametrize(
    ("path", "expected"),
    [("tasks/demo", "tasks/demo"), ("tasks/demo/", "tasks/demo"), ("work/my task", "work/my task")],
)
def test_good_task_paths(path: str, expected: str) -> None:
    """Relative task folders inside a repository are accepted (normalised)."""
    assert validate_task_path(path) == expected


@pytest.mark.parametrize(
    "path", ["", "/etc", "../x", "tasks/../../x", "-x", "~/x", "a\\b", ".git/hooks", "a\nb"]
)
def test_bad_task_paths(path: str) -> None:
    """Absolute paths, escapes from the repository, .git and control characters are refused."""
    with pytest.raises(UserError) as caught:
        validate_task_path(path)
    assert caught.value.code == ErrorCode.INVALID_NAME
    assert "relative to the repository" in caught.value.message
