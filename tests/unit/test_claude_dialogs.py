"""How the Claude Code backend picks an option in a first-run dialog: by the option's label,
whatever order or numbering the installed version's menu uses."""

from __future__ import annotations

from ralph_uv.agents.claude import _DOWN, _ENTER, _MENU_CURSOR, _UP, _find_dialog, _menu_keys

C = _MENU_CURSOR  # the cursor Claude Code draws before the selected option

_UNNUMBERED_NO_FIRST = [
    " Quick safety check: Is this a project you created or one you trust?",
    "",
    f" {C} No, exit",
    "   Yes, I trust this folder",
    "",
    " Enter to confirm · Esc to cancel",
]
_NUMBERED_YES_FIRST = [
    " Do you trust the files in this folder?",
    f" {C} 1. Yes, proceed",
    "   2. No, exit",
]


def test_moves_down_to_an_option_listed_after_the_cursor() -> None:
    """With "No, exit" selected and the wanted option below it, the next key is Down."""
    assert _menu_keys(_UNNUMBERED_NO_FIRST, "Yes, I trust this folder") == _DOWN


def test_confirms_when_the_cursor_is_on_the_option() -> None:
    """Once the cursor is on the wanted option (numbered or not) the key is Enter."""
    moved = [line.replace(C, " ") for line in _UNNUMBERED_NO_FIRST]
    moved[3] = f" {C} Yes, I trust this folder"
    assert _menu_keys(moved, "Yes, I trust this folder") == _ENTER
    assert _menu_keys(_NUMBERED_YES_FIRST, "Yes, proceed") == _ENTER


def test_moves_up_to_an_option_listed_before_the_cursor() -> None:
    """A cursor below the wanted option moves up."""
    lines = ["   1. Yes", f" {C} 2. No (recommended)"]
    assert _menu_keys(lines, "Yes") == _UP


def test_a_label_only_matches_a_whole_option() -> None:
    """"Yes" is not found inside "Yes, I trust this folder", and a menu without the option
    (or without a cursor: not drawn yet) gives no key."""
    assert _menu_keys(_UNNUMBERED_NO_FIRST, "Yes") is None
    no_cursor = [line.replace(C, " ") for line in _UNNUMBERED_NO_FIRST]
    assert _menu_keys(no_cursor, "Yes, I trust this folder") is None


def test_a_dialog_without_a_choice_is_confirmed() -> None:
    """Dialogs that only need confirming (theme, security notes) get Enter."""
    assert _menu_keys(["Security notes:", "Press Enter to continue"], None) == _ENTER


def test_an_option_inside_a_dialog_border_is_found() -> None:
    """Options drawn inside a box (│ ... │) are matched by their label all the same."""
    boxed = ["│ Do you trust the files in this folder? │",
             f"│ {C} 1. Yes, proceed                   │",
             "│   2. No, exit                        │"]
    assert _menu_keys(boxed, "Yes, proceed") == _ENTER


def test_the_dialog_shown_is_the_lowest_and_its_menu_the_last() -> None:
    """With an answered trust dialog still drawn above the bypass-permissions menu, the
    bypass dialog is the one shown, and its own cursor (not the stale one, which sits on the
    trust option) decides: Down towards "Yes, I accept", not Enter on "No, exit"."""
    screen = [
        " Quick safety check: Is this a project you created or one you trust?",
        "   No, exit",
        f" {C} Yes, I trust this folder",
        "",
        " WARNING: Claude Code running in Bypass Permissions mode",
        f" {C} 1. No, exit",
        "   2. Yes, I accept",
    ]
    found = _find_dialog(screen)
    assert found is not None
    dialog, line = found
    assert (dialog.name, line) == ("bypass-permissions", 6)
    assert _menu_keys(screen, dialog.choice) == _DOWN


def test_the_prompt_box_is_not_a_menu_cursor() -> None:
    """Claude Code's empty input line (the cursor glyph with nothing after it) is not taken
    for a menu's selection, and an option far from any cursor is not a menu."""
    screen = ["   Yes, I trust this folder", *[""] * 12, f"{C} ", ""]
    assert _menu_keys(screen, "Yes, I trust this folder") is None
    far = ["   Yes, I trust this folder", *[""] * 12, f"{C} No, exit"]
    assert _menu_keys(far, "Yes, I trust this folder") is None
