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


def test_hostile_sizes_are_refused_before_anything_is_allocated(corpus, tmp_path):
    """Headers that ask for terabytes (a .squash config with hidden size 2^20, a tensor of 2^20 × 2^20, a GGUF array
    of 2^40 items or a tensor dimension of 2^40, a config.json with a vocabulary of 2^30) are refused, and the
    process's peak resident memory does not move by more than a tiny model's worth."""
    import json
    import resource
    import shutil
    import struct

    from fuzz import gguf_fields, squash_edit

    from squash import load
    from squash.errors import FormatError
    from squash.io.squash_file import load_squash

    work, _ = corpus
    seeds = work / "seeds"
    llama = (seeds / "tiny-llama.squash").read_bytes()
    gguf = (seeds / "tiny-llama.gguf").read_bytes()

    def hidden(m):
        m["model"]["config"]["hf_config"]["hidden_size"] = 2**20

    def shape(m):
        m["tensors"][next(iter(m["tensors"]))]["shape"] = [2**20, 2**20]

    files = {"hidden.squash": squash_edit(llama, hidden), "shape.squash": squash_edit(llama, shape)}
    fields = gguf_fields(gguf)
    for kind, value in (("arrlen", 2**40), ("dim", 2**40)):
        f = next(f for f in fields if f.kind == kind)
        b = bytearray(gguf)
        struct.pack_into("<Q", b, f.pos, value)
        files[f"{kind}.gguf"] = bytes(b)
    folder = tmp_path / "vocab"
    shutil.copytree(seeds / "tiny-llama", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = 2**30
    (folder / "config.json").write_text(json.dumps(cfg))

    load(seeds / "tiny-llama")  # the imports and one real load, so the peak below is what the hostile files add
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(FormatError):
            load_squash(tmp_path / name) if name.endswith(".squash") else load(tmp_path / name)
    with pytest.raises(FormatError, match="parameters"):
        load(folder)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 256, f"peak memory grew by {grown_mb:.0f} MB"
