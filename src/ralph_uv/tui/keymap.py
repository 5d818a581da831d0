"""What a key pressed in the TUI sends to an agent's terminal in interactive mode.

Textual reports keys by name (``enter``, ``up``, ``ctrl+a``, ``f5``) with the character they
produce, if any; a terminal program expects the bytes an xterm would send. :func:`key_bytes`
translates one to the other; keys that have no terminal meaning give ``None``.
"""

from __future__ import annotations

__all__ = ["EXIT_KEY", "EXIT_KEY_LABEL", "key_bytes", "paste_bytes"]

EXIT_KEY = "ctrl+right_square_bracket"
EXIT_KEY_LABEL = "Ctrl-]"

_CSI = "\x1b["
_SPECIAL: dict[str, str] = {
    "enter": "\r",
    "tab": "\t",
    "shift+tab": _CSI + "Z",
    "backspace": "\x7f",
    "ctrl+h": "\x08",
    "escape": "\x1b",
    "up": _CSI + "A",
    "down": _CSI + "B",
    "right": _CSI + "C",
    "left": _CSI + "D",
    "home": _CSI + "H",
    "end": _CSI + "F",
    "insert": _CSI + "2~",
    "delete": _CSI + "3~",
    "pageup": _CSI + "5~",
    "pagedown": _CSI + "6~",
    "f1": "\x1bOP",
    "f2": "\x1bOQ",
    "f3": "\x1bOR",
    "f4": "\x1bOS",
    "f5": _CSI + "15~",
    "f6": _CSI + "17~",
    "f7": _CSI + "18~",
    "f8": _CSI + "19~",
    "f9": _CSI + "20~",
    "f10": _CSI + "21~",
    "f11": _CSI + "23~",
    "f12": _CSI + "24~",
    "ctrl+space": "\x00",
    "ctrl+@": "\x00",
    "ctrl+backslash": "\x1c",
    "ctrl+right_square_bracket": "\x1d",
    "ctrl+circumflex_accent": "\x1e",
    "ctrl+underscore": "\x1f",
}
_MODIFIED_ARROWS = {"up": "A", "down": "B", "right": "C", "left": "D", "home": "H", "end": "F"}
_MODIFIER_CODE = {"shift": 2, "alt": 3, "ctrl": 5, "ctrl+shift": 6}


def key_bytes(key: str, character: str | None) -> bytes | None:
    """The bytes a terminal sends for ``key`` (Textual's name) producing ``character``."""
    special = _SPECIAL.get(key)
    if special is not None:
        return special.encode()
    modifiers, _, base = key.rpartition("+")
    if modifiers and base in _MODIFIED_ARROWS and modifiers in _MODIFIER_CODE:
        return f"{_CSI}1;{_MODIFIER_CODE[modifiers]}{_MODIFIED_ARROWS[base]}".encode()
    if modifiers == "ctrl" and len(base) == 1 and base.isalpha():
        return bytes([ord(base.lower()) - ord("a") + 1])
    if modifiers == "alt" and character:
        return b"\x1b" + character.encode()
    if character:
        return character.encode()
    return None


def paste_bytes(text: str, bracketed: bool = True) -> bytes:
    """Pasted text as a terminal sends it (in bracketed-paste markers when asked)."""
    data = text.replace("\r\n", "\r").replace("\n", "\r").encode()
    return b"\x1b[200~" + data + b"\x1b[201~" if bracketed else data
