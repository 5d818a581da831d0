"""The attach client's screen: the output filter that keeps the last line for the status bar,
the status line drawing, and the terminal's raw mode and restore on a real PTY."""

from __future__ import annotations

import os
import pty
import termios
from collections.abc import Iterator

import pyte
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ralph_uv.client.terminal import (
    RESTORE_SEQUENCE,
    ScreenFilter,
    Terminal,
    fit_line,
    status_bytes,
)
from ralph_uv.errors import UserError


def screen_after(*chunks: bytes, cols: int = 40, rows: int = 10) -> pyte.Screen:
    screen = pyte.Screen(cols, rows)
    stream = pyte.ByteStream(screen)
    for chunk in chunks:
        stream.feed(chunk)
    return screen


def test_scroll_region_reset_is_kept_off_the_last_line() -> None:
    """An agent resetting or widening the scroll region gets one that ends above the status
    line."""
    f = ScreenFilter(rows=10)
    assert f.feed(b"a\x1b[rb") == (b"a\x1b[1;9rb", False)
    assert f.feed(b"\x1b[3;40r") == (b"\x1b[3;9r", False)
    assert f.feed(b"\x1b[2;5r") == (b"\x1b[2;5r", False)


@pytest.mark.parametrize(
    ("seq", "out"),
    [(b"\x1b[999;1H", b"\x1b[9;1H"), (b"\x1b[40d", b"\x1b[9d"), (b"\x1b[5;3H", b"\x1b[5;3H"),
     (b"\x1b[H", b"\x1b[H"), (b"\x1b[12f", b"\x1b[9f")],
)
def test_absolute_cursor_rows_stop_above_the_status_line(seq: bytes, out: bytes) -> None:
    """Moves to a row past the agent's last one (``CSI 999;1H``) land on its last row."""
    assert ScreenFilter(rows=10).feed(seq) == (out, False)


def test_private_r_sequences_are_not_margins() -> None:
    """``CSI ? ... r`` (restore private modes) passes unchanged."""
    f = ScreenFilter(rows=10)
    assert f.feed(b"\x1b[?1049r") == (b"\x1b[?1049r", False)


@pytest.mark.parametrize("seq", [b"\x1b[?1049h", b"\x1b[?1049l", b"\x1b[?47h", b"\x1b[?1047l"])
def test_alternate_screen_switches_become_clears(seq: bytes) -> None:
    """The client stays on the alternate screen: the agent's switches become a clear and the
    status line must be drawn again."""
    out, redraw = ScreenFilter(rows=10).feed(seq)
    assert out == b"\x1b[2J"
    assert redraw


def test_alternate_screen_switch_keeps_other_modes_of_the_same_sequence() -> None:
    """Other modes set together with the alternate screen are kept."""
    out, redraw = ScreenFilter(rows=10).feed(b"\x1b[?1049;25h")
    assert out == b"\x1b[?25h\x1b[2J"
    assert redraw


@pytest.mark.parametrize(
    ("seq", "redraw"),
    [(b"\x1b[2J", True), (b"\x1b[J", True), (b"\x1b[0J", True), (b"\x1b[1J", False),
     (b"\x1b[3J", False), (b"\x1b[K", False)],
)
def test_erasures_that_reach_the_last_line_ask_for_a_redraw(seq: bytes, redraw: bool) -> None:
    """Erase-below and erase-all reach the status line; erase-above and line erases do not."""
    assert ScreenFilter(rows=10).feed(b"x" + seq) == (b"x" + seq, redraw)


def test_full_reset_keeps_the_scroll_region() -> None:
    """``ESC c`` becomes a soft reset and clear, with the scroll region set again."""
    out, redraw = ScreenFilter(rows=10).feed(b"\x1bc")
    assert out.endswith(b"\x1b[1;9r")
    assert b"\x1bc" not in out
    assert redraw


def test_sequence_split_across_chunks_is_recognised() -> None:
    """A scroll-region reset cut in three is held until complete, then rewritten."""
    f = ScreenFilter(rows=10)
    assert f.feed(b"ab\x1b") == (b"ab", False)
    assert f.feed(b"[") == (b"", False)
    assert f.feed(b"rcd") == (b"\x1b[1;9rcd", False)


def test_osc_strings_pass_through_even_with_look_alike_bytes() -> None:
    """Inside a window-title string nothing is rewritten, and its end is found across chunks."""
    f = ScreenFilter(rows=10)
    out1, _ = f.feed(b"\x1b]0;title [r\x1b")
    out2, _ = f.feed(b"\\\x1b[r")
    assert out1 + out2 == b"\x1b]0;title [r\x1b\\\x1b[1;9r"


@given(st.binary(max_size=200), st.integers(min_value=1, max_value=17))
def test_filtering_does_not_depend_on_how_output_is_cut(data: bytes, cut: int) -> None:
    """The same output cut in any pieces gives the same bytes as in one piece, and bytes
    without escape sequences pass unchanged."""
    whole = ScreenFilter(rows=10)
    expected, _ = whole.feed(data)
    expected += whole.feed(b"")[0] + whole._held
    pieces = ScreenFilter(rows=10)
    got = b"".join(pieces.feed(data[i : i + cut])[0] for i in range(0, len(data), cut))
    got += pieces._held
    assert got == expected
    if b"\x1b" not in data:
        assert expected == data


def test_output_never_reaches_the_status_line() -> None:
    """A flood of lines, scroll-region resets and cursor jumps past the bottom leave the last
    row as the status bar drew it."""
    f = ScreenFilter(rows=10)
    chunks = [b"\x1b[1;9r"]
    for i in range(50):
        chunks.append(f.feed(f"line {i}\r\n".encode())[0])
        if i % 7 == 0:
            chunks.append(f.feed(b"\x1b[r\x1b[99;1H")[0])
    chunks.insert(1, status_bytes("STATUS", rows=10, cols=40))
    screen = screen_after(*chunks)
    assert screen.display[9].startswith("STATUS")
    assert "line 49" in "\n".join(screen.display[:9])


def test_status_bytes_draw_on_the_last_row_and_put_the_cursor_back() -> None:
    """The status line lands on the last row, cut to the width, and the cursor returns."""
    screen = screen_after(b"\x1b[3;5H", status_bytes("x" * 60, rows=10, cols=40), b"Z")
    assert screen.display[9] == "x" * 40
    assert screen.display[2][4] == "Z"


def test_fit_line_cuts_the_left_part_first() -> None:
    """The right part (mode, help) stays whole while the left part is cut."""
    assert fit_line("abcdefgh", "XYZ", 8) == "abcdeXYZ"
    assert fit_line("ab", "XYZ", 8) == "ab   XYZ"
    assert fit_line("ab", "XYZXYZXYZ", 4) == "XYZX"


@pytest.fixture
def tty_pair() -> Iterator[tuple[int, int]]:
    master, slave = pty.openpty()
    yield master, slave
    os.close(master)
    os.close(slave)


def _drain(fd: int) -> bytes:
    import select

    data = b""
    while select.select([fd], [], [], 0.2)[0]:
        data += os.read(fd, 65536)
    return data


def test_terminal_raw_mode_and_restore(tty_pair: tuple[int, int]) -> None:
    """Entering sets raw mode, the alternate screen and the scroll region; leaving restores
    the exact terminal settings and writes the restore sequence, however the block ends."""
    master, slave = tty_pair
    before = termios.tcgetattr(slave)
    term = Terminal(slave, slave)

    def inside() -> None:
        with term:
            raw = termios.tcgetattr(slave)
            assert not raw[3] & termios.ICANON
            assert not raw[3] & termios.ECHO
            assert term.rows >= 2
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        inside()
    assert termios.tcgetattr(slave) == before
    written = _drain(master)
    assert written.startswith(b"\x1b[?1049h")
    assert written.endswith(RESTORE_SEQUENCE)
    term.restore()  # idempotent
    assert _drain(master) == b""


def test_terminal_refuses_what_is_not_a_terminal(tmp_path: object) -> None:
    """Attach on a pipe says to use logs -f instead."""
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(UserError, match="logs -f"):
            Terminal(read_end, write_end)
    finally:
        os.close(read_end)
        os.close(write_end)
