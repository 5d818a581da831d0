"""Errors nobody expected still reach the user as a message: OS errors translated (a full disk
says what to do), the CLI's last line of defence, and loop records from a newer ralph-uv."""

from __future__ import annotations

import errno

import click
import pytest
from click.testing import CliRunner

from ralph_uv.cli import RalphGroup
from ralph_uv.errors import ErrorCode, UserError, from_os_error
from ralph_uv.registry import SessionRecord


def test_a_full_disk_says_what_to_do() -> None:
    """ENOSPC and EDQUOT become DISK_FULL naming the file and asking for space."""
    for number in (errno.ENOSPC, errno.EDQUOT):
        error = from_os_error(OSError(number, "No space left on device", "/data/x.bundle"))
        assert error.code == ErrorCode.DISK_FULL
        assert error.message == ("/data/x.bundle: no space left on the disk; free some space "
                                 "and try again")


def test_other_os_errors_keep_the_file_and_the_systems_words() -> None:
    """Any other OSError keeps its file name and strerror."""
    error = from_os_error(PermissionError(errno.EACCES, "Permission denied", "/etc/shadow"))
    assert error.message == "/etc/shadow: Permission denied"
    assert error.code == ErrorCode.INTERNAL_ERROR


def test_the_cli_turns_an_unexpected_os_error_into_a_message() -> None:
    """A command that hits an OSError nobody caught ends with exit status 1 and the message,
    not a traceback."""

    @click.group(cls=RalphGroup)
    def group() -> None:
        pass

    @group.command()
    def write() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/journal.seg")

    result = CliRunner().invoke(group, ["write"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "/data/journal.seg: no space left on the disk; free some space" in result.output


def test_a_record_with_a_status_from_a_newer_version_is_refused_clearly() -> None:
    """A loop record whose status this version does not know is a UserError saying so."""
    with pytest.raises(UserError, match=r"unknown loop status 'hibernating'; use one of"):
        SessionRecord.from_dict({"loop_id": "a-1", "task_name": "a", "task_dir": "/t",
                                 "agent": "claude", "status": "hibernating"})
