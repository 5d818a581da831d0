"""The attach client's terminal: raw mode, the alternate screen, and a status line that the
agent's output cannot overwrite.

The agent's bytes go to the terminal as they are (a pass-through, not an emulator), on a screen
whose last line is reserved for the status bar:

- :class:`Terminal` puts the terminal in raw mode on the alternate screen and sets a scroll
  region over every line but the last; the agent is told it has ``rows - 1`` rows.
  :meth:`Terminal.restore` undoes all of it and is idempotent; it runs on leaving the ``with``
  block, at interpreter exit, and is safe to call from any exit path.
- :class:`ScreenFilter` rewrites the few sequences in the agent's output that would reach the
  last line or leave the alternate screen (a scroll region reset, alternate-screen switches, a
  full reset), and says when output may have erased the status line so it is drawn again.
- :func:`status_bytes` draws a line on the last row and puts the cursor back where it was.
- :func:`replay_start` picks where in the journal's tail to begin rebuilding the screen.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import select
import termios
import tty
from types import TracebackType
from typing import Any

from rich.cells import cell_len, set_cell_size

from ralph_uv.errors import UserError

__all__ = [
    "RESTORE_SEQUENCE",
    "ScreenFilter",
    "Terminal",
    "fit_line",
    "replay_start",
    "status_bytes",
    "terminal_size",
]

log = logging.getLogger("ralph_uv.client.terminal")

_ESC = 0x1B
_CSI = re.compile(rb"\x1b\[([\x30-\x3f]*)([\x20-\x2f]*)([\x40-\x7e])")
_MAX_HELD = 256  # an unterminated escape sequence longer than this is passed on as it is
_STRING_STARTS = frozenset(b"]P_^X")  # OSC, DCS, APC, PM, SOS: text up to BEL or ESC \
_ALT_SCREEN_MODES = frozenset({b"47", b"1047", b"1049"})
_FULL_CLEARS = (b"\x1b[2J", b"\x1b[?1049h", b"\x1b[?1047h", b"\x1bc")

# Everything an agent may have switched on that would outlive the attach client.
RESTORE_SEQUENCE = (
    b"\x1b[?2026l"  # synchronized output off
    b"\x1b[0m"  # attributes
    b"\x1b[r"  # scroll region: whole screen
    b"\x1b[?25h"  # cursor visible
    b"\x1b[?2004l"  # bracketed paste
    b"\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1006l\x1b[?1015l"  # mouse reporting
    b"\x1b[?1004l"  # focus reporting
    b"\x1b[?1l\x1b>"  # cursor and keypad application modes
    b"\x1b[<u"  # kitty keyboard flags pushed by the agent
    b"\x1b[?1049l"  # back to the normal screen, cursor where it was
)


def replay_start(data: bytes, start: int) -> int:
    """Where in ``data`` (the journal from offset ``start``) to begin replaying the screen:
    at the last full-screen clear, else after the first line break (``data`` may begin in the
    middle of an escape sequence or character), else at the beginning of the output."""
    last = max(data.rfind(marker) for marker in _FULL_CLEARS)
    if last >= 0:
        return last
    if start == 0:
        return 0
    newline = data.find(b"\n")
    return newline + 1 if newline >= 0 else len(data)


def terminal_size(fd: int) -> tuple[int, int]:
    """``(columns, rows)`` of the terminal on ``fd``; 80x24 when it has none."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 80, 24
    return max(size.columns, 1), max(size.lines, 2)


def fit_line(left: str, right: str, width: int) -> str:
    """``left`` and ``right`` on one line of exactly ``width`` cells; ``left`` is cut first,
    then ``right``."""
    right = set_cell_size(right, min(cell_len(right), width))
    room = width - cell_len(right)
    return set_cell_size(left, room) + right


def status_bytes(text: str, rows: int, cols: int, *, attention: bool = False) -> bytes:
    """Draw ``text`` (cut or padded to ``cols``) on row ``rows`` in reverse video (yellow on
    black when ``attention``), then put the cursor and its attributes back."""
    style = b"\x1b[0;30;43m" if attention else b"\x1b[0;7m"
    line = set_cell_size(text, cols).encode("utf-8", errors="replace")
    return (
        b"\x1b[?2026h\x1b7"
        + f"\x1b[{rows};1H".encode()
        + style
        + line
        + b"\x1b[0m\x1b8\x1b[?2026l"
    )


class ScreenFilter:
    """Rewrites agent output for a screen whose last line belongs to the status bar.

    :meth:`feed` returns the bytes to write and whether the status line must be drawn again.
    Escape sequences split across calls are held back (at most a few hundred bytes) until
    complete, so they are recognised wherever the output was cut.
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self._held = b""
        self._in_string = False

    @property
    def agent_rows(self) -> int:
        return max(self.rows - 1, 1)

    def region(self) -> bytes:
        """The scroll region over the agent's rows (it also moves the cursor home)."""
        return f"\x1b[1;{self.agent_rows}r".encode()

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        data = self._held + data if self._held else data
        self._held = b""
        out = bytearray()
        redraw = False
        i = 0
        size = len(data)
        while i < size:
            if self._in_string:
                i = self._skip_string(data, i, out)
                continue
            j = data.find(b"\x1b", i)
            if j < 0:
                out += data[i:]
                break
            out += data[i:j]
            if j + 1 >= size:
                self._held = data[j:]
                break
            second = data[j + 1]
            if second == ord("["):
                match = _CSI.match(data, j)
                if match is None:
                    if _incomplete_csi(data, j) and size - j < _MAX_HELD:
                        self._held = data[j:]
                        break
                    out += data[j : j + 2]
                    i = j + 2
                    continue
                replacement, needs_redraw = self._csi(match)
                out += replacement
                redraw |= needs_redraw
                i = match.end()
            elif second in _STRING_STARTS:
                out += data[j : j + 2]
                self._in_string = True
                i = j + 2
            elif second == ord("c"):  # full reset: keep our screen, scroll region and status
                out += b"\x1b[!p\x1b[0m\x1b[2J" + self.region()
                redraw = True
                i = j + 2
            else:
                out += data[j : j + 2]
                i = j + 2
        return bytes(out), redraw

    def _skip_string(self, data: bytes, i: int, out: bytearray) -> int:
        """Pass an OSC/DCS string's bytes through up to its terminator."""
        bel = data.find(b"\x07", i)
        st = data.find(b"\x1b\\", i)
        ends = [e for e in (bel, st) if e >= 0]
        if not ends:
            if data.endswith(b"\x1b"):  # maybe the first half of ESC \
                out += data[i:-1]
                self._held = b"\x1b"
            else:
                out += data[i:]
            return len(data)
        end = min(ends) + (1 if min(ends) == bel else 2)
        out += data[i:end]
        self._in_string = False
        return end

    def _csi(self, match: re.Match[bytes]) -> tuple[bytes, bool]:
        params, intermediates, final = match.group(1), match.group(2), match.group(3)
        if intermediates:
            return match.group(0), False
        private = params.startswith((b"?", b">", b"<", b"="))
        if final == b"r" and not private:
            return self._margins(params), False
        if final in b"Hfd" and not private:
            return self._clamp_row(params, final), False
        if final == b"J":
            # Erase below or all reaches the last line; erase above and scrollback do not.
            return match.group(0), params.lstrip(b"?") in (b"", b"0", b"2")
        if final in b"hl" and params.startswith(b"?"):
            modes = params[1:].split(b";")
            if _ALT_SCREEN_MODES.isdisjoint(modes):
                return match.group(0), False
            # The client already is on the alternate screen and stays there: switching would
            # show the user's shell screen, so a switch becomes a clear.
            kept = [m for m in modes if m not in _ALT_SCREEN_MODES]
            rest = b"\x1b[?" + b";".join(kept) + final if kept else b""
            return rest + b"\x1b[2J", True
        return match.group(0), False

    def _clamp_row(self, params: bytes, final: bytes) -> bytes:
        """Cursor moves to an absolute row (``CSI 999;1H`` means "the bottom") stop above the
        status line."""
        row, sep, rest = params.partition(b";")
        if not row.isdigit() or int(row) <= self.agent_rows:
            return b"\x1b[" + params + final
        return b"\x1b[" + str(self.agent_rows).encode() + sep + rest + final

    def _margins(self, params: bytes) -> bytes:
        parts = params.split(b";") if params else []
        try:
            top = int(parts[0]) if parts and parts[0] else 1
            bottom = int(parts[1]) if len(parts) > 1 and parts[1] else self.agent_rows
        except ValueError:
            return self.region()
        bottom = min(bottom, self.agent_rows)
        top = min(max(top, 1), bottom)
        return f"\x1b[{top};{bottom}r".encode()


def _incomplete_csi(data: bytes, start: int) -> bool:
    """True when ``data[start:]`` is a CSI sequence cut short (every byte still fits one)."""
    return all(0x20 <= b <= 0x3F for b in data[start + 2 :])


class Terminal:
    """The user's terminal while attached: raw mode, alternate screen, reserved last line.

    Use as a context manager; :meth:`restore` is idempotent and also registered with
    :mod:`atexit` while the terminal is set up.
    """

    def __init__(self, in_fd: int = 0, out_fd: int = 1) -> None:
        if not (os.isatty(in_fd) and os.isatty(out_fd)):
            raise UserError(
                "attach needs a terminal on stdin and stdout; to follow a loop's output from a "
                "script use `ralph-uv logs -f TASK`"
            )
        self.in_fd = in_fd
        self.out_fd = out_fd
        self._saved: list[Any] | None = None
        self.cols, self.rows = terminal_size(out_fd)

    def __enter__(self) -> Terminal:
        self.enter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()

    def enter(self) -> None:
        """Raw mode, alternate screen, cleared, scroll region over all rows but the last."""
        try:
            self._saved = termios.tcgetattr(self.in_fd)
            tty.setraw(self.in_fd, termios.TCSANOW)
        except termios.error as exc:
            raise UserError(f"cannot put the terminal in raw mode: {exc}") from exc
        atexit.register(self.restore)
        self.cols, self.rows = terminal_size(self.out_fd)
        self.write(b"\x1b[?1049h\x1b[0m\x1b[H\x1b[2J" + self.region())

    def region(self) -> bytes:
        return f"\x1b[1;{max(self.rows - 1, 1)}r".encode()

    def update_size(self) -> bool:
        """Read the size again (after SIGWINCH); True when it changed. The scroll region is
        set again either way (which moves the cursor home)."""
        size = terminal_size(self.out_fd)
        changed = size != (self.cols, self.rows)
        self.cols, self.rows = size
        self.write(b"\x1b7" + self.region() + b"\x1b8")
        return changed

    def write(self, data: bytes) -> None:
        """Write everything, waiting while the terminal is slow."""
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.out_fd, view)
            except BlockingIOError:
                select.select([], [self.out_fd], [], 1.0)
                continue
            except InterruptedError:
                continue
            except OSError as exc:  # the terminal went away (hang-up): nothing left to show
                log.debug("terminal write failed: %s", exc)
                return
            view = view[written:]

    def restore(self) -> None:
        """Leave the terminal as it was before :meth:`enter`."""
        saved, self._saved = self._saved, None
        if saved is None:
            return
        atexit.unregister(self.restore)
        self.write(RESTORE_SEQUENCE)
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(self.in_fd, termios.TCSADRAIN, saved)
