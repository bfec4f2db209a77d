"""Byte-identical reruns: compress a model with each preset twice, each time in a fresh process, and compare files.

    python bench/determinism.py                          # smollm2-135m, every preset (hours on 2 cores)
    python bench/determinism.py --presets int8 rtn4 int4 # a subset

tests/test_faults.py does the same in-process for every preset on digits-cnn and minilm-l6 (minilm's loops cut);
this runs the presets as shipped, on the language model, across processes. Writes
bench/results/determinism-MODEL.{json,md}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_dir import RESULTS  # noqa: E402

WORKER = """
import sys
from squash import compress, load, load_recipe, save
save(compress(load(sys.argv[1]), load_recipe(sys.argv[2])), sys.argv[3])
"""


def run(model: str, preset: str, out: Path) -> float:
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", WORKER, model, preset, str(out)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{preset}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return time.time() - t0


def main() -> int:
    from squash.recipe import presets

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--presets", nargs="*", default=None, help="default: every preset")
    args = p.parse_args()
    names = args.presets or presets()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in names:
            files = [Path(tmp) / f"{preset}-{i}.squash" for i in range(2)]
            try:
                seconds = [run(args.model, preset, f) for f in files]
            except RuntimeError as e:
                rows.append({"preset": preset, "error": str(e)})
                print(f"{preset}: failed ({e})", flush=True)
                continue
            digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
            rows.append({"preset": preset, "identical": digests[0] == digests[1], "sha256": digests,
                         "bytes": files[0].stat().st_size, "seconds": [round(s, 1) for s in seconds]})
            print(f"{preset}: {'identical' if digests[0] == digests[1] else 'DIFFERENT'} "
                  f"({files[0].stat().st_size:,} bytes, {seconds[0]:.0f} s + {seconds[1]:.0f} s)", flush=True)
            for f in files:
                f.unlink()
            write(args.model, names, rows)  # after every preset: a run cut short still leaves its rows
    return 0 if all(r.get("identical") for r in rows) else 1


def write(model: str, names: list[str], rows: list[dict]) -> None:
    from squash.recipe import presets

    args = argparse.Namespace(model=model)
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = args.model.replace("/", "_")
    (RESULTS / f"determinism-{slug}.json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=1) + "\n")
    md = [f"# Byte-identical reruns on {args.model} (`python bench/determinism.py`)", "",
          "Each preset compressed twice, each time in a fresh process; the two files compared byte for byte.", "",
          "| preset | two runs | file bytes | seconds (run 1, run 2) |", "|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['preset']} | failed: {r['error']} | | |")
        else:
            md.append(f"| {r['preset']} | {'identical' if r['identical'] else '**different**'} | {r['bytes']:,} | "
                      f"{r['seconds'][0]}, {r['seconds'][1]} |")
    skipped = sorted(set(presets()) - {r["preset"] for r in rows})
    if skipped:
        md += ["", f"Not run this time: {', '.join(skipped)}."]
    (RESULTS / f"determinism-{slug}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    sys.exit(main())
