"""The attach client's prefix-key state machine: bytes in, actions out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ralph_uv.client.keys import (
    INJECT_LABEL,
    STOP_LABEL,
    Action,
    Cmd,
    Command,
    Forward,
    Inject,
    KeyMode,
    KeyReader,
    Prompt,
    PromptClosed,
    Unbound,
    key_name,
    parse_prefix,
)
from ralph_uv.errors import UserError

P = b"\x1d"  # Ctrl-], the default prefix


def forwarded(actions: list[Action]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Forward))


def feed_all(reader: KeyReader, *chunks: bytes) -> list[Action]:
    actions: list[Action] = []
    for chunk in chunks:
        actions += reader.feed(chunk)
    return actions


def test_plain_bytes_are_forwarded_at_once() -> None:
    """Without the prefix every byte is forwarded unchanged, in one action per read."""
    reader = KeyReader()
    assert reader.feed(b"ls -la\r") == [Forward(b"ls -la\r")]
    assert reader.mode is KeyMode.NORMAL


@pytest.mark.parametrize(
    ("key", "cmd"),
    [
        (b"i", Cmd.INTERACTIVE),
        (b"I", Cmd.TAKE_OVER),
        (b"c", Cmd.CHECKPOINT),
        (b"d", Cmd.DETACH),
        (b"?", Cmd.HELP),
    ],
)
def test_prefix_then_key_gives_its_command(key: bytes, cmd: Cmd) -> None:
    """Prefix + i/I/c/d/? gives the matching command and nothing is forwarded."""
    reader = KeyReader()
    assert reader.feed(P + key) == [Command(cmd)]
    assert reader.mode is KeyMode.NORMAL


def test_command_between_typed_text_keeps_the_text_around_it() -> None:
    """Text before and after a prefixed command in the same read is forwarded around it."""
    reader = KeyReader()
    assert reader.feed(b"ab" + P + b"icd") == [
        Forward(b"ab"),
        Command(Cmd.INTERACTIVE),
        Forward(b"cd"),
    ]


def test_prefix_twice_sends_the_prefix_byte() -> None:
    """Prefix, prefix forwards one prefix byte; the state machine is back to normal."""
    reader = KeyReader()
    assert reader.feed(P + P + b"x") == [Forward(P + b"x")]
    assert reader.mode is KeyMode.NORMAL


def test_prefix_split_from_its_key_across_reads() -> None:
    """The prefix at the end of one read and its key at the start of the next still work."""
    reader = KeyReader()
    assert reader.feed(b"abc" + P) == [Forward(b"abc")]
    assert reader.mode is KeyMode.PREFIX
    assert reader.feed(b"d") == [Command(Cmd.DETACH)]


def test_unbound_key_after_prefix_is_reported_and_dropped() -> None:
    """Prefix + a key without a command reports it; the key does not reach the agent."""
    reader = KeyReader()
    assert reader.feed(P + b"zq") == [Unbound(b"z"), Forward(b"q")]


def test_escape_sequence_after_prefix_is_one_key_even_when_split() -> None:
    """Prefix + an arrow key whose bytes arrive in three reads is one unbound key; the bytes
    after it are forwarded, none of the arrow's bytes are."""
    reader = KeyReader()
    actions = feed_all(reader, P + b"\x1b", b"[", b"1;5Ahello")
    assert actions == [Unbound(b"\x1b[1;5A"), Forward(b"hello")]


def test_split_escape_sequence_in_normal_mode_is_forwarded_byte_exact() -> None:
    """In normal mode an escape sequence cut across reads is forwarded intact and in order,
    without being held back."""
    reader = KeyReader()
    first = reader.feed(b"\x1b[")
    assert first == [Forward(b"\x1b[")]
    assert reader.feed(b"A") == [Forward(b"A")]
    assert not reader.pending


def test_lone_escape_after_prefix_waits_for_flush() -> None:
    """Prefix + Escape is held (it may start a sequence) until flush, then is an unbound key."""
    reader = KeyReader()
    assert reader.feed(P + b"\x1b") == []
    assert reader.pending
    assert reader.flush() == [Unbound(b"\x1b")]
    assert reader.mode is KeyMode.NORMAL
    assert reader.feed(b"x") == [Forward(b"x")]


def test_stop_asks_and_y_confirms() -> None:
    """s asks on the status bar; y gives the stop command and closes the question."""
    reader = KeyReader()
    assert reader.feed(P + b"s") == [Prompt(STOP_LABEL, "")]
    assert reader.mode is KeyMode.CONFIRM
    assert reader.feed(b"y") == [Command(Cmd.STOP), PromptClosed()]
    assert reader.mode is KeyMode.NORMAL


@pytest.mark.parametrize("answer", [b"n", b"x", b"\r", b"\x03"])
def test_stop_any_other_answer_cancels(answer: bytes) -> None:
    """Any answer but y cancels the stop without forwarding the answer."""
    reader = KeyReader()
    reader.feed(P + b"s")
    assert reader.feed(answer) == [PromptClosed()]
    assert reader.mode is KeyMode.NORMAL


def test_inject_prompt_is_edited_and_sent_with_enter() -> None:
    """p opens the line editor; typing, backspace and Enter give the edited text once."""
    reader = KeyReader()
    assert reader.feed(P + b"p") == [Prompt(INJECT_LABEL, "")]
    assert reader.feed(b"fix tha") == [Prompt(INJECT_LABEL, "fix tha")]
    assert reader.feed(b"\x7fe tests") == [Prompt(INJECT_LABEL, "fix the tests")]
    assert reader.feed(b"\r") == [Inject("fix the tests"), PromptClosed()]
    assert reader.mode is KeyMode.NORMAL


def test_inject_prompt_ignores_arrow_keys_split_across_reads() -> None:
    """Arrow keys (even cut in pieces) do not put stray characters into the prompt."""
    reader = KeyReader()
    feed_all(reader, P + b"p", b"ab\x1b")
    feed_all(reader, b"[D")
    assert feed_all(reader, b"c\r") == [Inject("abc"), PromptClosed()]


def test_inject_prompt_utf8_split_across_reads() -> None:
    """A UTF-8 character split between reads is added whole."""
    reader = KeyReader()
    reader.feed(P + b"p")
    text = "caf\u00e9 \u2713".encode()
    assert reader.feed(text[:4]) == [Prompt(INJECT_LABEL, "caf")]
    actions = reader.feed(text[4:] + b"\r")
    assert actions == [Inject("caf\u00e9 \u2713"), PromptClosed()]


@pytest.mark.parametrize("cancel", [b"\x03", b"\x07", P])
def test_inject_prompt_cancel_keys(cancel: bytes) -> None:
    """Ctrl-C, Ctrl-G and the prefix cancel the prompt; nothing is injected or forwarded."""
    reader = KeyReader()
    reader.feed(P + b"pabc")
    assert reader.feed(cancel + b"z") == [PromptClosed(), Forward(b"z")]


def test_inject_prompt_escape_cancels_after_flush() -> None:
    """A lone Escape in the prompt cancels it once the quiet time has passed."""
    reader = KeyReader()
    reader.feed(P + b"pabc\x1b")
    assert reader.pending
    assert reader.flush() == [PromptClosed()]
    assert reader.mode is KeyMode.NORMAL


def test_inject_prompt_paste_keeps_line_breaks_as_spaces() -> None:
    """A bracketed paste into the prompt does not submit at its line breaks."""
    reader = KeyReader()
    reader.feed(P + b"p")
    actions = reader.feed(b"\x1b[200~one\ntwo\x1b[201~")
    assert actions == [Prompt(INJECT_LABEL, "one two")]
    assert reader.feed(b"\r") == [Inject("one two"), PromptClosed()]


def test_empty_prompt_injects_nothing() -> None:
    """Enter on an empty (or blank) prompt closes it without an inject."""
    reader = KeyReader()
    reader.feed(P + b"p   ")
    assert reader.feed(b"\r") == [PromptClosed()]


def test_ctrl_u_and_ctrl_w_edit_the_prompt() -> None:
    """Ctrl-W deletes the last word, Ctrl-U the whole line."""
    reader = KeyReader()
    reader.feed(P + b"p")
    assert reader.feed(b"one two\x17") == [Prompt(INJECT_LABEL, "one ")]
    assert reader.feed(b"\x15x") == [Prompt(INJECT_LABEL, "x")]


def test_other_prefix_byte() -> None:
    """A configured prefix (Ctrl-B) works, and Ctrl-] is then an ordinary byte."""
    reader = KeyReader(parse_prefix("ctrl-b"))
    assert reader.feed(b"\x1d\x02d") == [Forward(b"\x1d"), Command(Cmd.DETACH)]


@pytest.mark.parametrize(
    ("spec", "byte"),
    [("ctrl-]", 0x1D), ("C-a", 0x01), ("^B", 0x02), ("Ctrl-Space", 0x00), ("control-_", 0x1F)],
)
def test_parse_prefix(spec: str, byte: int) -> None:
    """Prefix settings in their usual spellings."""
    assert parse_prefix(spec) == byte


@pytest.mark.parametrize("spec", ["a", "ctrl-", "ctrl-ab", "alt-x", "ctrl-1"])
def test_parse_prefix_rejects_what_is_not_a_control_key(spec: str) -> None:
    """A setting that is not a control key is refused with the forms that work."""
    with pytest.raises(UserError, match="ctrl-<key>"):
        parse_prefix(spec)


def test_key_name() -> None:
    """Prefix bytes are shown as people write them."""
    assert key_name(0x1D) == "Ctrl-]"
    assert key_name(0x02) == "Ctrl-B"


@given(st.lists(st.binary(max_size=12), max_size=12))
def test_without_prefix_everything_typed_is_forwarded_unchanged(chunks: list[bytes]) -> None:
    """However input is cut, without a prefix byte the forwarded bytes equal the input."""
    chunks = [c.replace(P, b"") for c in chunks]
    reader = KeyReader()
    actions = feed_all(reader, *chunks)
    assert forwarded(actions) == b"".join(chunks)
    assert all(isinstance(a, Forward) for a in actions)


@given(st.binary(max_size=40), st.integers(min_value=1, max_value=8))
def test_any_chunking_gives_the_same_actions(data: bytes, cut: int) -> None:
    """Feeding the same bytes in pieces gives the same forwarded bytes and commands as in one
    read (forwards may be split differently), once held keys are flushed."""

    def run(pieces: list[bytes]) -> tuple[bytes, list[Action]]:
        reader = KeyReader()
        actions = feed_all(reader, *pieces) + reader.flush()
        others = [a for a in actions if not isinstance(a, Forward | Prompt)]
        return forwarded(actions), others

    whole = run([data])
    pieces = [data[i : i + cut] for i in range(0, len(data), cut)]
    assert run(pieces) == whole
