"""The attach client's keyboard: a prefix-key state machine without I/O.

Bytes read from the terminal go in with :meth:`KeyReader.feed`; what comes out is a list of
actions: bytes to forward to the agent, commands (interactive mode, stop, checkpoint, detach),
a prompt to inject, and what the status bar should show while a prompt is being typed.

States (:class:`KeyMode`) and their invariants:

- ``NORMAL``: every byte except the prefix is forwarded untouched and at once, whatever it is
  (escape sequences split across reads stay intact because nothing is held back). The prefix
  byte moves to ``PREFIX``.
- ``PREFIX``: the next *key* (one byte, one UTF-8 character or one whole escape sequence, even
  when it arrives split across reads) picks a command; the prefix again forwards the prefix
  byte itself; any other key is reported as :class:`Unbound` and dropped. Back to ``NORMAL``
  afterwards, except ``s`` (to ``CONFIRM``) and ``p`` (to ``PROMPT``).
- ``CONFIRM``: ``y`` confirms the stop, any other key cancels; back to ``NORMAL``.
- ``PROMPT``: a one-line editor; Enter injects the text, Escape, Ctrl-C, Ctrl-G or the prefix
  cancel; escape sequences (arrows, function keys) are ignored; a bracketed paste is inserted
  with its line breaks as spaces.
- Outside ``NORMAL``, an incomplete escape sequence or UTF-8 character at the end of a read is
  held until more bytes arrive. A lone Escape cannot be told from the start of a sequence, so
  the caller calls :meth:`KeyReader.flush` after a short quiet time (``pending`` says when).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum, StrEnum

from ralph_uv.errors import UserError

__all__ = [
    "DEFAULT_PREFIX",
    "ESCAPE_TIMEOUT",
    "INJECT_LABEL",
    "STOP_LABEL",
    "Action",
    "Cmd",
    "Command",
    "Forward",
    "Inject",
    "KeyMode",
    "KeyReader",
    "Prompt",
    "PromptClosed",
    "Unbound",
    "key_name",
    "parse_prefix",
]

DEFAULT_PREFIX = 0x1D  # Ctrl-]
ESCAPE_TIMEOUT = 0.05  # seconds of quiet after which a held Escape is a key of its own
_MAX_SEQUENCE = 64  # a longer "escape sequence" is garbage: it is released as one key
_ESC = 0x1B
_PASTE_START = b"\x1b[200~"
_PASTE_END = b"\x1b[201~"
_CANCEL = frozenset({b"\x03", b"\x07", b"\x1b"})
_BACKSPACE = frozenset({b"\x7f", b"\x08"})
_ENTER = frozenset({b"\r", b"\n"})
INJECT_LABEL = "inject prompt (Enter sends, Esc cancels)"
STOP_LABEL = "stop the loop after this iteration? (y/n)"


class KeyMode(Enum):
    NORMAL = "normal"
    PREFIX = "prefix"
    CONFIRM = "confirm"
    PROMPT = "prompt"


class Cmd(StrEnum):
    """What a prefixed key asks for."""

    INTERACTIVE = "interactive"  # i: toggle interactive mode
    TAKE_OVER = "take_over"  # I: take interactive mode from whoever holds it
    STOP = "stop"  # s, then y: stop after the current iteration
    CHECKPOINT = "checkpoint"  # c
    DETACH = "detach"  # d: leave; the loop goes on
    HELP = "help"  # ?


@dataclass(frozen=True, slots=True)
class Forward:
    """Bytes for the agent's terminal (sent only in interactive mode)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Command:
    cmd: Cmd


@dataclass(frozen=True, slots=True)
class Inject:
    """A prompt typed after ``p`` and Enter."""

    text: str


@dataclass(frozen=True, slots=True)
class Prompt:
    """The status bar asks something: show ``label`` and the text typed so far."""

    label: str
    text: str


@dataclass(frozen=True, slots=True)
class PromptClosed:
    """The question or prompt is over (answered or cancelled): show the status bar again."""


@dataclass(frozen=True, slots=True)
class Unbound:
    """The prefix was followed by a key with no command; the key was dropped."""

    key: bytes


Action = Forward | Command | Inject | Prompt | PromptClosed | Unbound

_COMMANDS = {
    b"i": Cmd.INTERACTIVE,
    b"I": Cmd.TAKE_OVER,
    b"c": Cmd.CHECKPOINT,
    b"d": Cmd.DETACH,
    b"?": Cmd.HELP,
}

_PREFIX_SPEC = re.compile(r"(?:ctrl-|control-|c-|\^)(.+)", re.IGNORECASE)


def parse_prefix(spec: str) -> int:
    """The byte a prefix setting such as ``ctrl-]``, ``C-a`` or ``^B`` stands for."""
    match = _PREFIX_SPEC.fullmatch(spec.strip())
    key = match.group(1) if match else ""
    if key.lower() == "space":
        key = "@"
    if len(key) == 1 and (key.isascii() and key.upper() in "@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_"):
        return ord(key.upper()) & 0x1F
    raise UserError(
        f"attach_prefix = {spec!r} is not a control key; use ctrl-<key> with a letter or one of "
        "@ [ \\ ] ^ _ (for example ctrl-] or ctrl-b)"
    )


def key_name(byte: int) -> str:
    """How to show a prefix byte to a person: ``Ctrl-]``."""
    if byte < 0x20:
        return f"Ctrl-{chr(byte + 0x40)}"
    return chr(byte)


def _key_length(buf: bytes | bytearray, start: int) -> int:
    """Length of the key starting at ``buf[start]``, or 0 when more bytes are needed."""
    first = buf[start]
    available = len(buf) - start
    if first == _ESC:
        if available < 2:
            return 0
        second = buf[start + 1]
        if second == ord("["):
            for i in range(start + 2, min(len(buf), start + _MAX_SEQUENCE)):
                if 0x40 <= buf[i] <= 0x7E:
                    return i - start + 1
            return available if available >= _MAX_SEQUENCE else 0
        if second == ord("O"):
            return 3 if available >= 3 else 0
        if second == _ESC:
            return 1  # Escape pressed, then another key beginning with Escape
        return 2  # Alt+key
    if first < 0xC0:
        return 1  # ASCII, or a stray continuation byte
    need = 2 if first < 0xE0 else 3 if first < 0xF0 else 4
    return need if available >= need else 0


class KeyReader:
    """The state machine (see the module docstring). ``prefix`` is the prefix byte."""

    def __init__(self, prefix: int = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self._prefix_key = bytes([prefix])
        self.mode = KeyMode.NORMAL
        self._held = bytearray()
        self._text = ""
        self._in_paste = False

    @property
    def pending(self) -> bool:
        """Bytes are held back waiting for the rest of a key; call :meth:`flush` after
        :data:`ESCAPE_TIMEOUT` seconds without input."""
        return bool(self._held)

    def feed(self, data: bytes) -> list[Action]:
        """Process bytes read from the terminal."""
        actions: list[Action] = []
        edited = False
        buf = self._held + data
        self._held = bytearray()
        i = 0
        while i < len(buf):
            if self.mode is KeyMode.NORMAL:
                at = buf.find(self.prefix, i)
                if at < 0:
                    _forward(actions, bytes(buf[i:]))
                    break
                _forward(actions, bytes(buf[i:at]))
                self.mode = KeyMode.PREFIX
                i = at + 1
                continue
            length = _key_length(buf, i)
            if length == 0:
                self._held = bytearray(buf[i:])
                break
            edited |= self._key(bytes(buf[i : i + length]), actions)
            i += length
        if edited and self.mode is KeyMode.PROMPT:
            actions.append(Prompt(INJECT_LABEL, self._text))
        return actions

    def flush(self) -> list[Action]:
        """Treat held bytes as complete keys (a lone Escape is the Escape key)."""
        if not self._held:
            return []
        held, self._held = bytes(self._held), bytearray()
        if self.mode is KeyMode.NORMAL:
            return [Forward(held)]
        actions: list[Action] = []
        if self._key(held[:1], actions) and self.mode is KeyMode.PROMPT:
            actions.append(Prompt(INJECT_LABEL, self._text))
        actions.extend(self.feed(held[1:]))
        return actions

    # -- one key in a non-normal mode ---------------------------------------------------------

    def _key(self, key: bytes, actions: list[Action]) -> bool:
        """Handle one key; True when the prompt's text changed."""
        if self.mode is KeyMode.PREFIX:
            self._after_prefix(key, actions)
            return False
        if self.mode is KeyMode.CONFIRM:
            self.mode = KeyMode.NORMAL
            if key in (b"y", b"Y"):
                actions.append(Command(Cmd.STOP))
            actions.append(PromptClosed())
            return False
        return self._edit(key, actions)

    def _after_prefix(self, key: bytes, actions: list[Action]) -> None:
        self.mode = KeyMode.NORMAL
        if key == self._prefix_key:
            _forward(actions, key)
        elif key == b"s":
            self.mode = KeyMode.CONFIRM
            actions.append(Prompt(STOP_LABEL, ""))
        elif key == b"p":
            self.mode = KeyMode.PROMPT
            self._text = ""
            self._in_paste = False
            actions.append(Prompt(INJECT_LABEL, ""))
        elif key in _COMMANDS:
            actions.append(Command(_COMMANDS[key]))
        else:
            actions.append(Unbound(key))

    def _edit(self, key: bytes, actions: list[Action]) -> bool:
        if key == _PASTE_START:
            self._in_paste = True
            return False
        if key == _PASTE_END:
            self._in_paste = False
            return False
        if self._in_paste and (key in _ENTER or key == b"\t"):
            self._text += " "
            return True
        if key in _ENTER:
            text = self._text.strip()
            self._close()
            if text:
                actions.append(Inject(text))
            actions.append(PromptClosed())
            return False
        if key in _CANCEL or key == self._prefix_key:
            self._close()
            actions.append(PromptClosed())
            return False
        if key in _BACKSPACE:
            self._text = self._text[:-1]
            return True
        if key == b"\x15":  # Ctrl-U
            self._text = ""
            return True
        if key == b"\x17":  # Ctrl-W
            self._text = self._text.rstrip().rpartition(" ")[0]
            if self._text:
                self._text += " "
            return True
        if key[0] == _ESC or key[0] < 0x20:
            return False  # arrows, function keys, other controls: no line editing beyond this
        self._text += key.decode("utf-8", errors="replace")
        return True

    def _close(self) -> None:
        self.mode = KeyMode.NORMAL
        self._text = ""
        self._in_paste = False


def _forward(actions: list[Action], data: bytes) -> None:
    if not data:
        return
    if actions and isinstance(actions[-1], Forward):
        actions[-1] = Forward(actions[-1].data + data)
    else:
        actions.append(Forward(data))
