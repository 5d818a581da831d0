"""`ralph-uv logs` text: terminal output turned into plain lines, however it was chunked."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from ralph_uv.cli.loops import TerminalText

SAMPLE = (
    b"\x1b]0;claude \xe2\x9c\xb3 title\x07\x1b[?25l\x1b[2K\x1b[1G\x1b[38;5;208mWorking\x1b[0m on"
    b" US-001\r\n\x1b[1A\x1b[2KDone: caf\xc3\xa9 \xe2\x9c\x93\r\nprogress 10%\rprogress 100%\r\n"
    b"\x1bP1$r0m\x1b\\end\x1b(B\x1b=\n"
)
EXPECTED = "Working on US-001\nDone: caf\u00e9 \u2713\nprogress 10%\nprogress 100%\nend\n"


def test_escape_sequences_removed_and_line_ends_unified() -> None:
    """Colours, cursor moves, titles and device strings go; text and line breaks stay, with
    CR LF and lone CR as one newline each; UTF-8 is decoded."""
    text = TerminalText()
    assert text.feed(SAMPLE) + text.finish() == EXPECTED


@given(st.lists(st.integers(min_value=1, max_value=len(SAMPLE) - 1), max_size=12))
def test_any_chunking_gives_the_same_text(cuts: list[int]) -> None:
    """Sequences, UTF-8 characters and CR LF pairs cut between chunks give the same text."""
    bounds = [0, *sorted(set(cuts)), len(SAMPLE)]
    text = TerminalText()
    out = "".join(text.feed(SAMPLE[a:b]) for a, b in itertools.pairwise(bounds))
    assert out + text.finish() == EXPECTED
