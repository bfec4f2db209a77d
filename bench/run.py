"""The bench, one command: set up the peers, then measure squash and every peer that runs on the same models,
text and machine in one run, and regenerate every table, plot and the README's results and fact-check.

    .venv/bin/python bench/run.py             # the full run (under 2 hours): bench/results/ and the README
    .venv/bin/python bench/run.py --quick     # under 15 minutes on 2 cores: fewer widths, rows and repeats,
                                              # written to bench/results/quick/; the README is left as it is
    make bench / make bench-quick             # the same, with the set-up of .venv and the peers first

Parts (each writes bench/results/…):
  quality   bench/quality.py   every method × bit width: size, quality, compress time and memory
  speed     bench/speed.py     decode / prefill / encode speed and resident memory, squash vs float32 vs llama.cpp
  export    bench/export_check.py   squash's GGUF export scored by llama.cpp against squash's own perplexity
  pruning   bench/pruning_table.py  steps 4-6 before and after fine-tuning (digits-cnn and minilm-l6 rerun;
                                    smollm2's rows, 20 minutes of fine-tuning, are reused from their last run
                                    and dated as such)
  factcheck the five int8 claims, each with the measured figure and a verdict (factcheck.md / .json)
Then bench/update_readme.py copies the full run's tables into the README.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import results_dir  # noqa: E402

RESULTS = results_dir.FULL  # main() points it (and every part, through the environment) at QUICK for --quick

MODELS = ("digits-cnn", "minilm-l6", "smollm2-135m")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _load(name: str) -> dict | None:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.exists() else None


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the fact-check


def _rows(q: dict | None, method: str, bits: int | None = None) -> list[dict]:
    if not q:
        return []
    return [r for r in q["rows"] if r["method"] == method and (bits is None or r["bits"] == bits)
            and r.get("status") == "ok"]


def _speed_row(s: dict | None, label: str) -> dict | None:
    if not s:
        return None
    return next((r for r in s["rows"] if r["label"] == label and "error" not in r), None)


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _lm_change(r: dict) -> float:
    q = r["quality"]
    return q["perplexity"] / q["perplexity_float"] - 1


def _holds(model_kind: str, r: dict) -> bool:
    """"Keeps holding": perplexity within +5%, cosine ≥ 0.99, accuracy within 1 point of float."""
    q = r["quality"]
    if model_kind == "lm":
        return _lm_change(r) <= 0.05
    if model_kind == "encoder":
        return q["cosine"] >= 0.99
    return q["accuracy"] >= q["accuracy_float"] - 0.01


def _best(q: dict | None, bits: int, kind: str) -> dict | None:
    """squash's best row at this width (lowest perplexity / highest cosine or accuracy)."""
    rows = _rows(q, "squash", bits)
    if not rows:
        return None
    key = {"lm": lambda r: r["quality"]["perplexity"], "encoder": lambda r: -r["quality"]["cosine"],
           "classifier": lambda r: -r["quality"]["accuracy"]}[kind]
    return min(rows, key=key)


def _quality_text(kind: str, r: dict) -> str:
    q = r["quality"]
    if kind == "lm":
        return f"perplexity {_pct(_lm_change(r))} (KL {q['kl']:.4f})"
    if kind == "encoder":
        return f"cosine {q['cosine']:.4f}"
    return f"accuracy {100 * q['accuracy']:.2f}% vs {100 * q['accuracy_float']:.2f}%"


def factcheck() -> tuple[list[dict], str]:
    """The five claims from bench/results/*.json; each row: claim, measured, verdict, rule."""
    qs = {m: _load(f"quality-{m}.json") for m in MODELS}
    sp = {m: _load(f"speed-{m}.json") for m in MODELS}
    pruning = _load("pruning.json")
    kinds = {"smollm2-135m": "lm", "minilm-l6": "encoder", "digits-cnn": "classifier"}
    out = []

    # 1. memory ×4
    parts, disk_ok, res_ok = [], [], []
    for m in MODELS:
        r = next(iter(_rows(qs[m], "squash", 8)), None)
        if r and r.get("file_bytes"):
            n = qs[m]["meta"]["weights"]
            ratio = 4 * n / r["file_bytes"]
            parts.append(f"{m}: file {ratio:.2f}× smaller than float32 weights")
            disk_ok.append(ratio >= 3.5)
    s = _speed_row(sp["smollm2-135m"], "squash int8")
    f = _speed_row(sp["smollm2-135m"], "float32 (transformers)")
    if s and f:
        parts.append(f"smollm2 resident {s['resident_mb']:.0f} MB vs {f['resident_mb']:.0f} MB "
                     f"({f['resident_mb'] / s['resident_mb']:.2f}× less)")
        res_ok.append(f["resident_mb"] / s["resident_mb"] >= 3.3)
    lc = _speed_row(sp["smollm2-135m"], "llama.cpp Q8_0")
    if lc and f:
        parts.append(f"llama.cpp Q8_0 resident {lc['resident_mb']:.0f} MB")
    out.append(_claim("Compressing weights from float to int8 cuts the memory footprint about 4×", parts,
                      disk_ok + res_ok, "holds when file and resident memory are each ≥ 3.3–3.5× smaller"))

    # 2. computation
    parts, ok = [], []
    if s and f:
        parts.append(f"smollm2 decode {s['decode_tps']['median']:.1f} vs {f['decode_tps']['median']:.1f} tokens/s "
                     f"({s['decode_tps_x']:.2f}×), prefill {s['prefill_tps_x']:.2f}×")
        ok += [s["decode_tps_x"] >= 1.5, s["prefill_tps_x"] >= 1.0]
    for label in ("llama.cpp Q8_0",):
        r = _speed_row(sp["smollm2-135m"], label)
        if r:
            parts.append(f"{label} {r['decode_tps_x']:.2f}× decode")
    for m, label in (("minilm-l6", "squash w8a8"), ("minilm-l6", "squash int8"), ("digits-cnn", "squash int8")):
        r = _speed_row(sp[m], label)
        if r and r.get("items_per_s_x"):
            parts.append(f"{m} {label.split()[-1]} {r['items_per_s_x']:.2f}× items/s")
            ok.append(r["items_per_s_x"] >= 1.0)
    peers = [r for r in (sp["smollm2-135m"] or {}).get("rows", []) if r.get("kind") == "peer" and "error" not in r]
    for r in peers:
        parts.append(f"{r['label']} {r['decode_tps_x']:.2f}× decode")
        if r.get("bits") == 8:  # the claim is int8's: a peer's int8 path counts too
            ok.append(r["decode_tps_x"] >= 1.0)
    for m in ("minilm-l6", "digits-cnn"):
        for r in (sp[m] or {}).get("rows", []):
            if r.get("kind") == "peer" and r.get("items_per_s_x"):
                parts.append(f"{m} {r['label'].rsplit(' (', 1)[0]} {r['items_per_s_x']:.2f}× items/s")
                if r.get("bits") == 8:
                    ok.append(r["items_per_s_x"] >= 1.0)
    out.append(_claim("It significantly reduces the computational requirements", parts, ok,
                      "holds when squash's int8 decodes ≥ 1.5× float32 and no int8 runtime measured (squash's or "
                      "a peer's) is slower than float32"))

    # 3. works surprisingly well
    parts, ok = [], []
    for m in MODELS:
        kind = kinds[m]
        r8 = _best(qs[m], 8, kind)
        if not r8:
            continue
        ok.append(_holds(kind, r8))
        widths = sorted({r["bits"] for r in _rows(qs[m], "squash")}, reverse=True)
        lowest = None
        for b in widths:
            r = _best(qs[m], b, kind)
            if r and _holds(kind, r):
                lowest = (b, r)
        low = f"; holds down to {lowest[0]} bits ({_quality_text(kind, lowest[1])})" if lowest else ""
        parts.append(f"{m} int8 {_quality_text(kind, r8)}{low}")
    out.append(_claim("It works surprisingly well", parts, ok,
                      "holds when int8 keeps perplexity within +5%, cosine ≥ 0.99, accuracy within 1 point"))

    # 4. pruning, codebooks, low-rank
    parts, ok = [], []
    for run in (pruning or {}).get("runs", []):
        b, kind = run["before"], kinds.get(run["model"], "lm")
        rr = {"quality": b["quality"]}
        parts.append(f"{run['model']} {run['recipe']}: {1 / b['size_ratio']:.1f}× smaller, "
                     f"{b['bits_per_weight']:.2f} bits/weight, before fine-tuning {_quality_text(kind, rr)}")
        ok.append(_holds(kind, rr))
    for m in MODELS:
        lr = [r for r in _rows(qs[m], "squash") if "lowrank" in r.get("variant", "")]
        for r in lr:
            parts.append(f"{m} {r['variant']}: {r['bits_per_weight']:.2f} bits/weight, {_quality_text(kinds[m], r)}")
    out.append(_claim("Pruning, codebooks and low-rank decomposition compress further", parts, ok,
                      "size always falls; holds when quality also stays within the claim-3 limits"))

    # 5. fine-tuning recovers
    parts, ok = [], []
    for run in (pruning or {}).get("runs", []):
        kind = kinds.get(run["model"], "lm")
        before, after = {"quality": run["before"]["quality"]}, {"quality": run["after"]["quality"]}
        parts.append(f"{run['model']} {run['recipe']}: {_quality_text(kind, before)} → {_quality_text(kind, after)}")
        ok.append(_holds(kind, after))
    out.append(_claim("Fine-tuning after compression recovers the accuracy", parts, ok,
                      "holds when the fine-tuned model is back within the claim-3 limits"))

    lines = ["| claim | measured here | verdict | rule |", "|---|---|---|---|"]
    for c in out:
        lines.append(f"| “{c['claim']}” | {'; '.join(c['measured']) or 'not measured'} | **{c['verdict']}** | {c['rule']} |")
    return out, "\n".join(lines) + "\n"


def _claim(claim: str, measured: list[str], ok: list[bool], rule: str) -> dict:
    verdict = ("not measured" if not ok else "holds" if all(ok) else "holds partly" if any(ok) else
               "does not hold here")
    return {"claim": claim, "measured": measured, "checks": ok, "verdict": verdict, "rule": rule}


# ---------------------------------------------------------------- the run


def meta_line(quick: bool) -> str:
    """Command, date and machine, written beside the tables."""
    import platform

    import torch

    from speed import machine

    return (f"Measured {time.strftime('%Y-%m-%d')} on {machine()}, torch {torch.__version__}, Python "
            f"{platform.python_version()}, by `.venv/bin/python bench/run.py{' --quick' if quick else ''}` "
            f"(each table also names the script that wrote it).\n")


def _python() -> str:
    return sys.executable


def run_part(args: list[str], what: str) -> bool:
    log(what)
    t = time.perf_counter()
    rc = subprocess.call([_python(), *args], cwd=ROOT)
    log(f"{what}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t:.0f} s")
    return rc == 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="squash's bench: peers set up, measured, tables and README regenerated")
    ap.add_argument("--quick", action="store_true", help="about 15 minutes on 2 cores")
    ap.add_argument("--skip-setup", action="store_true", help="do not run bench/setup.sh first")
    ap.add_argument("--only", nargs="+", choices=["quality", "speed", "export", "pruning", "factcheck"],
                    help="run only these parts (the fact-check and README are always rebuilt from the results)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = ap.parse_args(argv)
    started = time.perf_counter()
    global RESULTS
    RESULTS = results_dir.QUICK if args.quick else results_dir.FULL
    RESULTS.mkdir(parents=True, exist_ok=True)
    os.environ["SQUASH_BENCH_RESULTS"] = str(RESULTS)  # the parts below write there
    parts = set(args.only or ["quality", "speed", "export", "pruning", "factcheck"])
    quick = ["--quick"] if args.quick else []
    if not args.skip_setup:
        subprocess.call(["bash", str(HERE / "setup.sh")], cwd=ROOT)
    ok = True
    if "pruning" in parts:
        ok &= run_part([str(HERE / "pruning_table.py"), "--only", "digits-cnn"] + ([] if args.quick else ["minilm-l6"]),
                       "pruning, codebooks, fine-tuning (steps 4-6)")
    for m in args.models:
        if "quality" in parts:
            ok &= run_part([str(HERE / "quality.py"), "--model", m, *quick], f"quality: {m}")
        if "speed" in parts:
            ok &= run_part([str(HERE / "speed.py"), "--model", m, *quick], f"speed: {m}")
            if m == "smollm2-135m" and not args.quick:  # what decoding with int8 activations costs (~1 min)
                ok &= run_part([str(HERE / "int8_activations.py")], "int8 activations: perplexity")
    if "export" in parts and "smollm2-135m" in args.models:
        # quick: gguf-q8_0 over 8 windows; full: also gguf-q4_0 and int4 (GPTQ, minutes), 16 windows
        recipes = ["--recipes", "gguf-q8_0", "--windows", "8"] if args.quick else []
        ok &= run_part([str(HERE / "export_check.py"), *recipes], "export: GGUF in llama.cpp vs squash")
    _atomic(RESULTS / "bench-meta.md", meta_line(args.quick))
    claims, table = factcheck()
    meta = {"date": time.strftime("%Y-%m-%d"), "command": f"bench/run.py{' --quick' if args.quick else ''}"}
    _atomic(RESULTS / "factcheck.json", json.dumps({"meta": meta, "claims": claims}, indent=1))
    _atomic(RESULTS / "factcheck.md", table)
    if args.quick:
        log(f"quick run: tables and plots in {RESULTS.relative_to(ROOT)}/ (the README shows the full run's)")
    else:
        run_part([str(HERE / "update_readme.py")], "README tables")
    log(f"bench finished in {(time.perf_counter() - started) / 60:.1f} min{'' if ok else ' (some parts failed: see above)'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
