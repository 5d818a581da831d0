"""Shared fixtures: every test gets its own short ``RALPH_HOME`` so nothing touches ``$HOME``
and socket paths stay under the 100-byte limit."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def ralph_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    tmp_mode = os.stat("/tmp").st_mode
    home = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))
    monkeypatch.setenv("RALPH_HOME", str(home))
    for name in list(os.environ):
        if name.startswith("RALPH_") and name != "RALPH_HOME":
            monkeypatch.delenv(name)
    yield home
    shutil.rmtree(home, ignore_errors=True)
    # A socket server must never change the mode of a shared folder it was given.
    assert os.stat("/tmp").st_mode == tmp_mode, "the test changed the mode of /tmp"
