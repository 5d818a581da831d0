"""What the demo model writes for each story of the sample task.

The sample task (``sample_task/``: a tiny text-utility package, ``textkit``) has three stories;
each has a canned implementation here. Any other story gets a generic deliverable, a note in
``notes/<story-id>.md``, so the demo model can drive a loop over any ``prd.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SAMPLE_STORIES", "Deliverable", "deliverable_for"]


@dataclass(frozen=True, slots=True)
class Deliverable:
    """A file the model writes for a story, and an optional shell check to run before committing."""

    path: str  # relative to the project's working directory
    content: str
    check: str | None = None


_SLUG = '''"""Turn titles into URL slugs."""

from __future__ import annotations

import re
import unicodedata

__all__ = ["slugify"]


def slugify(text: str, separator: str = "-") -> str:
    """Lower-case ASCII words of ``text`` joined by ``separator``.

    >>> slugify("Hello, World!")
    'hello-world'
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    return separator.join(words)
'''

_COUNTS = '''"""Count the words of a text."""

from __future__ import annotations

import re
from collections import Counter

__all__ = ["top_words", "word_count"]

_WORD = re.compile(r"[\\w']+")


def word_count(text: str) -> int:
    """The number of words in ``text``."""
    return len(_WORD.findall(text))


def top_words(text: str, n: int = 3) -> list[tuple[str, int]]:
    """The ``n`` most frequent words (case-insensitive), most frequent first, ties by first use."""
    return Counter(word.lower() for word in _WORD.findall(text)).most_common(n)
'''

_TESTS = '''"""Tests for textkit (run with: python3 -m unittest discover -s tests)."""

import unittest

from textkit.counts import top_words, word_count
from textkit.slug import slugify


class SlugifyTest(unittest.TestCase):
    def test_punctuation_and_case(self) -> None:
        self.assertEqual(slugify("Hello, World!"), "hello-world")

    def test_accents_are_folded(self) -> None:
        self.assertEqual(slugify("Crème brûlée recipe"), "creme-brulee-recipe")

    def test_custom_separator(self) -> None:
        self.assertEqual(slugify("a b c", separator="_"), "a_b_c")


class CountsTest(unittest.TestCase):
    def test_word_count(self) -> None:
        self.assertEqual(word_count("one two  three\\nfour"), 4)
        self.assertEqual(word_count(""), 0)

    def test_top_words(self) -> None:
        self.assertEqual(top_words("b a b c a b", 2), [("b", 3), ("a", 2)])


if __name__ == "__main__":
    unittest.main()
'''

SAMPLE_STORIES: dict[str, Deliverable] = {
    "TEXT-001": Deliverable("textkit/slug.py", _SLUG),
    "TEXT-002": Deliverable("textkit/counts.py", _COUNTS),
    "TEXT-003": Deliverable(
        "tests/test_textkit.py", _TESTS, check="python3 -m unittest discover -s tests -q"
    ),
}


def deliverable_for(story_id: str, iteration: int, prd_file: str) -> Deliverable:
    """The canned file for a sample-task story, or a note describing any other story."""
    known = SAMPLE_STORIES.get(story_id)
    if known is not None:
        return known
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", story_id).strip("-.") or "story"
    note = (
        f"# {story_id}\n\n"
        f"Worked on in iteration {iteration} of a Ralph loop by the ralph-uv demo model.\n\n"
        f"The story itself is described in `{prd_file}`; the demo model knows no implementation "
        "for it, so this note stands in for the work.\n"
    )
    return Deliverable(f"notes/{safe}.md", note)
