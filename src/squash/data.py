"""Text for calibration and evaluation: English prose CPython ships in `pydoc_data.topics`.

The topics are sorted by name and split once: every third topic (index % 3 == 2) is evaluation text, the rest
calibration text. Some paragraphs recur across topics, so an evaluation paragraph that also occurs in the
calibration part (whitespace aside) is dropped from evaluation: the two parts never share a paragraph.
"""
from __future__ import annotations

import re
from functools import lru_cache

_BLANK_LINE = re.compile(r"\n\s*\n")


def _normal(block: str) -> str:
    return " ".join(block.split())


@lru_cache(maxsize=1)
def _split() -> tuple[str, str]:
    from pydoc_data.topics import topics

    calib, evals = [], []
    for i, key in enumerate(sorted(topics)):
        (evals if i % 3 == 2 else calib).extend(b for b in _BLANK_LINE.split(topics[key]) if b.strip())
    seen = {_normal(b) for b in calib}
    kept = []
    for b in evals:
        if _normal(b) not in seen:
            seen.add(_normal(b))
            kept.append(b)
    return "\n\n".join(calib), "\n\n".join(kept)


def calibration_text() -> str:
    return _split()[0]


def evaluation_text() -> str:
    return _split()[1]


def paragraphs(text: str, min_chars: int = 40) -> list[str]:
    """Blank-line separated paragraphs, whitespace collapsed, short fragments dropped."""
    return [p for p in map(_normal, _BLANK_LINE.split(text)) if len(p) >= min_chars]
