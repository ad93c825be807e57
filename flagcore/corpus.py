"""Real English text that ships with flagcore, the same on every Python version.

The notebooks feed real prose to MiniLM and SmolLM2 and train a small character-level Transformer on
it. The text is the documentation topics of CPython (``pydoc_data.topics``: the language reference
behind ``help('topic')``), but **pinned**: the standard library's copy changes with the Python version
(Python 3.11.7 has 465,126 characters, Colab's 3.12 about 492,000), and a corpus that moves would make
the same notebook give other numbers elsewhere. So flagcore ships the 3.11.7 topics in
``flagcore/texts/pydoc-topics-3.11.7.json.gz`` and reads them from there on any Python.

The text is Python's documentation, © Python Software Foundation, distributed under the PSF License
Agreement (https://docs.python.org/3/license.html), which permits redistribution with this notice.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from importlib import resources

__all__ = ["PROSE_TOPICS", "PYDOC_TOPICS_SHA256", "PYDOC_TOPICS_VERSION", "prose", "pydoc_topics"]

#: The CPython release whose ``pydoc_data.topics`` is shipped.
PYDOC_TOPICS_VERSION = "3.11.7"
#: Topics whose running text is plain English prose, in the order the notebooks feed them to a model.
PROSE_TOPICS = ("exceptions", "execmodel", "numbers", "truth", "while", "if", "assignment", "naming", "import", "try",
                "for", "lambda")
#: SHA-256 of the shipped file: a damaged or replaced copy is refused rather than read.
PYDOC_TOPICS_SHA256 = "ef1c22e964a0b2936677e8e936b6cd5a6206628338bb9706dadda51fbf8eae91"


@functools.cache
def _topics() -> dict[str, str]:
    raw = resources.files("flagcore").joinpath("texts", f"pydoc-topics-{PYDOC_TOPICS_VERSION}.json.gz").read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != PYDOC_TOPICS_SHA256:
        raise ValueError(f"flagcore's pinned pydoc topics file is damaged (SHA-256 {digest}, expected {PYDOC_TOPICS_SHA256})")
    return json.loads(gzip.decompress(raw))


def pydoc_topics() -> dict[str, str]:
    """The documentation topics of CPython 3.11.7 (a fresh dict: topic name -> text), whatever Python runs."""
    return dict(_topics())


def prose(topic: str, min_words: int = 12) -> str:
    """The running text of one topic as a single line: its paragraphs with no indented line (grammar
    rules and code samples are indented) and at least ``min_words`` words, lines joined by spaces."""
    topics = _topics()
    if topic not in topics:
        raise ValueError(f"unknown topic {topic!r}; e.g. {', '.join(PROSE_TOPICS)}")
    paragraphs = [p for p in topics[topic].split("\n\n")
                  if p.strip() and not any(line.startswith(" ") for line in p.split("\n"))]
    return " ".join(" ".join(line.strip() for line in p.split("\n")) for p in paragraphs if len(p.split()) >= min_words)
