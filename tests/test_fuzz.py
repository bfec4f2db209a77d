"""A seeded slice of the fuzz corpus (bench/fuzz.py runs all of it): bad files, recipes and command lines, every
command that reads them, each run twice. Nothing may crash, print a traceback, hang, leave a file, change an input,
print more than one error line, or answer differently the second time."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

SLICE = 90


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from fuzz import build_cases, make_seeds

    work = tmp_path_factory.mktemp("fuzz")
    return work, build_cases(make_seeds(work / "seeds"), seed=0)


def test_the_corpus_is_large_and_covers_every_family(corpus):
    _, cases = corpus
    families = {c.name.split("/")[0] for c in cases}
    assert len(cases) >= 500
    assert families == {"digits-int8", "digits-entropy", "digits-lowrank", "digits-2of4", "llama", "gguf", "hf",
                        "recipe", "misuse"}
    commands = {c.argv[0] for c in cases if c.argv}
    assert commands == {"inspect", "eval", "generate", "export", "compress", "curve"}


def test_a_slice_of_the_corpus(corpus):
    from fuzz import run_cases, select_slice, summary_line

    work, cases = corpus
    picked = select_slice(cases, SLICE, seed=1)
    summary = run_cases(picked, work, timeout=120)
    bad = [(r["case"], r["bad"], r["message"][:200], (r.get("traceback") or "")[-600:]) for r in summary["rows"]
           if r.get("bad")]
    assert not bad, summary_line(summary) + "\n" + "\n".join(map(str, bad))
    assert summary["cases"] == len(picked) >= SLICE - 10
    refused = sum(r["returncode"] not in (0, None) for r in summary["rows"])
    assert refused >= 0.7 * len(picked)  # most inputs are broken: refused, with one error line
