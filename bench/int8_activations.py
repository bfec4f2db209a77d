"""What decoding with int8 activations costs in quality: smollm2's perplexity over evaluation text fed one token
at a time through the packed decoder (the path `squash generate` and the speed bench take), with x rounded to
int8 per 32-chunk (the default) and with x kept in float32.

    .venv/bin/python bench/int8_activations.py [--tokens 512]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_dir import RESULTS  # noqa: E402


def decode_nll(path, ids: list[int], int8_activations: bool) -> float:
    """Mean negative log-likelihood of ids[1:], each predicted by a decode step (one token at a time)."""
    from squash.runtime.llama import Decoder
    from squash.runtime.packed import load_packed

    dec = Decoder(load_packed(path, int8_activations=int8_activations).module, max_len=len(ids) + 8)
    total = 0.0
    with torch.inference_mode():
        for t in range(len(ids) - 1):
            logits = dec.forward(torch.tensor([ids[t]]), t)[0]
            total -= float(torch.log_softmax(logits.double(), -1)[ids[t + 1]])
    return total / (len(ids) - 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    from speed import _prompt_ids, squash_file

    ids = _prompt_ids(args.tokens)
    lines = ["| model | perplexity, x in float32 | perplexity, x int8 per 32-chunk | change |", "|---|---|---|---|"]
    for recipe in ("int8", "int4", "rtn4"):
        t = time.perf_counter()
        path = squash_file("smollm2-135m", recipe)
        exact, rounded = (math.exp(decode_nll(path, ids, flag)) for flag in (False, True))
        lines.append(f"| smollm2-135m {recipe} | {exact:.3f} | {rounded:.3f} | {100 * (rounded / exact - 1):+.2f}% |")
        print(lines[-1], f"({time.perf_counter() - t:.0f} s)", flush=True)
    out = RESULTS / "int8_activations.md"
    text = (f"Decoding {len(ids)} evaluation tokens one at a time through the packed decoder "
            f"(`bench/int8_activations.py`, {time.strftime('%Y-%m-%d')}):\n\n" + "\n".join(lines) + "\n")
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
