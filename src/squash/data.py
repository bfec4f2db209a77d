"""Text for calibration and evaluation: English prose CPython ships in `pydoc_data.topics`.

The topics are sorted by name and split once: every fourth topic (index % 4 == 3) is evaluation text, the rest
calibration text. The two parts never share a topic, so no paragraph is in both.
"""
from __future__ import annotations

import re
from functools import lru_cache


@lru_cache(maxsize=1)
def _split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from pydoc_data.topics import topics

    calib, evals = [], []
    for i, key in enumerate(sorted(topics)):
        (evals if i % 4 == 3 else calib).append(topics[key])
    return tuple(calib), tuple(evals)


def calibration_text() -> str:
    return "\n\n".join(_split()[0])


def evaluation_text() -> str:
    return "\n\n".join(_split()[1])


def paragraphs(text: str, min_chars: int = 40) -> list[str]:
    """Blank-line separated paragraphs of prose, whitespace collapsed, short fragments dropped."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        if len(para) >= min_chars:
            out.append(para)
    return out
