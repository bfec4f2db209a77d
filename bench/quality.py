"""Quality bench: squash and its peers on one model, same evaluation text, same machine, same run.

    .venv/bin/python bench/quality.py --model smollm2-135m            # full: bits 8 6 4 3 2, all methods
    .venv/bin/python bench/quality.py --model minilm-l6 --quick       # quick: bits 8 4 3, short evaluation
    .venv/bin/python bench/quality.py --model digits-cnn --methods rtn squash --bits 8 4

For every method × bit width (bench/peers.py): compress a copy of the float model (timed; peak resident memory
sampled while it runs), count the bytes it stores, and score it against the float model with squash's own
quality functions (squash.eval.quality) on squash's evaluation text, which never overlaps the calibration text:
  smollm2-135m  perplexity, mean KL(float ‖ method) of the next-token distributions, top-1 agreement, over the
                same token windows (lm_windows) for every method, llama.cpp included (fed the same token ids)
  minilm-l6     cosine of mean-pooled sentence embeddings to the float model's, over evaluation paragraphs
  digits-cnn    accuracy on the 360 held-out digits
The float model's outputs are computed once and reused for every row (CachedReference), so each row costs one
forward pass of the method's model.

Writes OUT/quality-MODEL.json (raw rows and the run's metadata), quality-MODEL.md (the table) and
quality-MODEL.png (quality against bits per weight, one series per method, the Pareto front drawn).
A method that fails to import or run is a row with status "error" and its exception line, never dropped.

Quick mode (--quick) is for the whole bench to finish in minutes. It leaves out: bit widths 6, 3 and 2 (only 8
and 4 run); most of the evaluation text (smollm2: 4 windows of 256 tokens instead of 16 × 512; minilm: 32
paragraphs instead of 256; digits-cnn: all 360 digits either way); most of squash's calibration on models of a
million weights or more (GPTQ on 8 calibration samples instead of 32, the slowest step of the quick run); HQQ at
8 bits (its weight optimisation is the slowest of the peers).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import hashlib
import json
import math
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (bench/peers.py, beside this file)

import squash  # noqa: E402
from squash.eval.quality import EvalSize, classifier_quality, encoder_quality, lm_quality, lm_windows  # noqa: E402
from squash.models import tokenizer_for  # noqa: E402

from results_dir import RESULTS  # noqa: E402
MODELS = ("smollm2-135m", "minilm-l6", "digits-cnn")
FULL_BITS = (8, 6, 4, 3, 2)
QUICK_BITS = (8, 4)
DEFAULT_METHODS = tuple(peers.METHODS)


def eval_size(kind: str, quick: bool) -> EvalSize:
    if not quick:
        return EvalSize()
    return EvalSize(lm_window=256, lm_windows=4, paragraphs=32)


def loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine slows every row (on 2 cores, another busy
    process can make a GPTQ or HQQ run 20 times slower), so each result file records them."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def cpu_name() -> str:
    from presets_table import cpu_name as name  # one reader of /proc/cpuinfo for every bench script

    return name()


# ---------------------------------------------------------------- scoring


class CachedReference:
    """Stands in for the float module in squash's quality functions: the first call on an input runs the float
    model, a later call on an equal input returns the stored output (logits, hidden states or class scores
    only; no KV cache kept)."""

    def __init__(self, module):
        self.module = module
        self.cache: dict[str, object] = {}

    @staticmethod
    def _key(args, kwargs) -> str:
        h = hashlib.sha256()
        for k, v in [(str(i), a) for i, a in enumerate(args)] + sorted(kwargs.items()):
            h.update(k.encode())
            if isinstance(v, torch.Tensor):
                h.update(str((v.dtype, tuple(v.shape))).encode())
                h.update(v.detach().contiguous().numpy().tobytes())
            else:
                h.update(repr(v).encode())
        return h.hexdigest()

    def __call__(self, *args, **kwargs):
        key = self._key(args, kwargs)
        if key not in self.cache:
            out = self.module(*args, **kwargs)
            if hasattr(out, "logits"):
                out = SimpleNamespace(logits=out.logits)
            elif hasattr(out, "last_hidden_state"):
                out = SimpleNamespace(last_hidden_state=out.last_hidden_state)
            self.cache[key] = out
        return self.cache[key]


class Scorer:
    """One model's evaluation: the same data and the same float reference for every method."""

    def __init__(self, model: squash.Model, size: EvalSize):
        self.model, self.size = model, size
        self.reference = CachedReference(model.module)
        self.tokenizer = tokenizer_for(model)
        self.windows = lm_windows(self.tokenizer, size) if model.kind == "causal-lm" else None

    def __call__(self, module, progress=None) -> dict:
        if self.model.kind == "causal-lm":
            return lm_quality(module, self.reference, self.windows, progress)
        if self.model.kind == "encoder":
            return encoder_quality(module, self.reference, self.tokenizer, self.size, progress)
        if self.model.kind == "classifier":
            return classifier_quality(module, self.reference)
        raise ValueError(f"no quality measure for a {self.model.kind} model")

    def describe(self) -> str:
        if self.model.kind == "causal-lm":
            n, t = self.windows.shape
            return f"{n} windows × {t} tokens of evaluation text ({n * (t - 1):,} predictions)"
        if self.model.kind == "encoder":
            return f"{self.size.paragraphs} evaluation paragraphs (up to {self.size.encoder_max_len} tokens)"
        return "the 360 held-out test digits"


def error_line(e: BaseException) -> tuple[str, str]:
    """The exception as one line, and where it was raised (file:line of the innermost frame)."""
    text = str(e).strip().splitlines()
    tb = traceback.extract_tb(e.__traceback__)
    where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": "), where


# ---------------------------------------------------------------- the run


def run_quality(model_name: str, methods=DEFAULT_METHODS, bits_list=None, quick: bool = False,
                out_dir: str | Path = RESULTS, show_progress: bool = True) -> list[dict]:
    """Every method × bit width on one model; writes quality-MODEL.json / .md / .png into out_dir and returns
    the rows (one dict each, JSON-able)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.perf_counter()
    load_start = loadavg()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bits_list = tuple(bits_list or (QUICK_BITS if quick else FULL_BITS))
    unknown = [m for m in methods if m not in peers.METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(peers.METHODS)}")
    console = Console(stderr=True, quiet=not show_progress)

    t = time.perf_counter()
    model = squash.load(model_name)
    load_s = time.perf_counter() - t
    size = eval_size(model.kind, quick)
    scorer = Scorer(model, size)
    n_float = sum(p.numel() for p in {id(p): p for p in model.module.parameters()}.values())
    ctx_dir = Path(tempfile.mkdtemp(prefix="squash-bench-"))
    ctx = peers.Context(quick=quick, workdir=ctx_dir, lm_window=size.lm_window)

    jobs = []
    for name in methods:
        method = peers.METHODS[name]
        reason = method.applies(model)
        if reason is not None:
            jobs.append((method, None, reason))
            continue
        for v in method.variants(model, quick):
            if v.bits == 32 or v.bits in bits_list:
                jobs.append((method, v, None))

    rows = []
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=False)
    try:
        with progress:
            overall = progress.add_task(f"{model_name}", total=len(jobs))
            inner = progress.add_task("float reference", total=None)

            def step(done, total, what):
                progress.update(inner, completed=done, total=total)

            t = time.perf_counter()
            reference_quality = scorer(scorer.reference, step)
            reference_s = time.perf_counter() - t
            for method, variant, reason in jobs:
                label = f"{method.name} {variant.label}" if variant else method.name
                progress.update(overall, description=f"{model_name}: {label}")
                progress.update(inner, description="  compressing", completed=0, total=None)
                row = run_one(model, method, variant, reason, ctx, scorer, n_float,
                              lambda d, n, w: progress.update(inner, description="  scoring", completed=d, total=n))
                rows.append(row)
                progress.advance(overall)
                console.log(summary_line(row))
    finally:
        shutil.rmtree(ctx_dir, ignore_errors=True)

    meta = {
        "model": model_name, "kind": model.kind, "quick": quick, "bits": list(bits_list),
        "methods": list(methods), "weights": n_float,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "versions": {m.package: m.version() for m in map(peers.METHODS.get, methods) if m.package},
        "evaluation": scorer.describe(), "eval_size": dataclasses.asdict(size),
        "reference_quality": reference_quality, "load_seconds": round(load_s, 2),
        "reference_seconds": round(reference_s, 2), "seconds": round(time.perf_counter() - started, 1),
        "loadavg": {"start": load_start, "end": loadavg()},
        "command": "python bench/quality.py " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name == "quality.py"
        else f"run_quality({model_name!r}, quick={quick})",
        "memory": "peak RSS of the bench process while compressing (sampled every 2 ms from /proc/self/statm); "
                  "rise = peak minus the RSS when compressing began (the float model and its cached outputs "
                  "are already resident then)",
    }
    stem = out_dir / f"quality-{model_name}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(meta, rows))
    plot(meta, rows, stem.with_suffix(".png"))
    return rows


def run_one(model, method, variant, reason, ctx, scorer, n_float, progress) -> dict:
    row = {"model": model.name, "method": method.name, "kind": method.kind, "bits": variant.bits if variant else None,
           "variant": variant.label if variant else None, "version": method.version(), "status": "ok"}
    if reason is not None:
        row.update(status="n/a", error=reason)
        return row
    result = None
    try:
        method.load()
        with peers.PeakRSS() as mem, torch.no_grad():
            t = time.perf_counter()
            result = method.run(model, variant, ctx)
            seconds = time.perf_counter() - t
        if result.compress_seconds is not None:
            seconds = result.compress_seconds
        row.update(
            compress_seconds=round(seconds, 3), peak_rss_mb=round(mem.peak / 2**20, 1),
            peak_rise_mb=round(mem.rise / 2**20, 1), stored_bytes=result.stored_bytes,
            bits_per_weight=8 * result.stored_bytes / n_float,
            quantized_weights=result.quantized_weights, quantized_share=result.quantized_weights / n_float,
            quantized_bpw=(8 * result.quantized_bytes / result.quantized_weights) if result.quantized_weights else None,
            config=result.config, notes=result.notes)
        row["file_bytes"] = None
        if result.save is not None:
            try:
                row["file_bytes"] = result.save(ctx.workdir)
            except Exception as e:  # the model still runs; only its file size is missing
                row["file_error"] = error_line(e)[0]
        t = time.perf_counter()
        module = scorer.reference if method.kind == "reference" else result.module  # its outputs are cached
        row["quality"] = scorer(module, progress)
        row["eval_seconds"] = round(time.perf_counter() - t, 2)
    except Exception as e:  # a peer's failure is a result: recorded with its exception line
        row["status"] = "error"
        row["error"], row["error_where"] = error_line(e)
    finally:
        if result is not None and result.close is not None:
            try:
                result.close()
            except Exception:
                pass
        del result
        gc.collect()
    return row


# ---------------------------------------------------------------- outputs


def quality_cells(kind: str, q: dict | None) -> list[str]:
    if kind == "causal-lm":
        if not q:
            return ["", "", ""]
        d = 100 * (q["perplexity"] / q["perplexity_float"] - 1)
        return [f"{q['perplexity']:.3f} ({d:+.1f}%)", f"{q['kl']:.4f}", f"{100 * q['top1_agreement']:.1f}%"]
    if kind == "encoder":
        return ["", ""] if not q else [f"{q['cosine']:.4f}", f"{q['cosine_min']:.4f}"]
    if not q:
        return [""]
    return [f"{100 * q['accuracy']:.2f}% ({100 * (q['accuracy'] - q['accuracy_float']):+.2f} pt)"]


QUALITY_HEADERS = {"causal-lm": ["perplexity (vs float)", "KL to float", "top-1 agree"],
                   "encoder": ["cosine to float", "min cosine"], "classifier": ["accuracy (vs float)"]}


def _load_text(meta: dict) -> str:
    load = meta.get("loadavg") or {}
    if not load.get("start") or not load.get("end"):
        return ""
    return f"; load average {load['start'][0]:.1f} at the start, {load['end'][0]:.1f} at the end"


def _mb(b) -> str:
    if b is None:
        return "—"
    return f"{b / 1e6:.2f}" if b >= 1e5 else f"{b / 1e6:.3f}"


def markdown(meta: dict, rows: list[dict]) -> str:
    kind = meta["kind"]
    ref = meta["reference_quality"]
    if kind == "causal-lm":
        float_line = f"float perplexity {ref['perplexity_float']:.3f}"
    elif kind == "encoder":
        float_line = "float cosine 1"
    else:
        float_line = f"float accuracy {100 * ref['accuracy_float']:.2f}%"
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if k != "squash")
    lines = [
        f"**{meta['model']}** ({meta['weights']:,} weights){' — quick mode' if meta['quick'] else ''}. "
        f"Measured {meta['date'][:10]} on {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}"
        f"{', ' + versions if versions else ''}, by `{meta['command']}` ({meta['seconds']:.0f} s{_load_text(meta)}). "
        f"Quality on {meta['evaluation']}; {float_line}.",
        "",
        "| method | bits | variant | bits/weight (all stored) | bits/weight (quantized layers, share) | stored MB "
        "| file MB | " + " | ".join(QUALITY_HEADERS[kind]) + " | compress s | peak RSS MB (rise) | status |",
        "|---|---:|---|---:|---:|---:|---:|" + "---:|" * len(QUALITY_HEADERS[kind]) + "---:|---:|---|",
    ]
    for r in rows:
        status = "ok" if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"
        cells = [r["method"], "" if r["bits"] is None else str(r["bits"]), r["variant"] or ""]
        if "stored_bytes" in r:
            qbpw = r.get("quantized_bpw")
            cells += [f"{r['bits_per_weight']:.3f}",
                      "—" if qbpw is None else f"{qbpw:.3f} ({100 * r['quantized_share']:.0f}%)",
                      _mb(r["stored_bytes"]), _mb(r["file_bytes"])]
        else:
            cells += [""] * 4
        cells += quality_cells(kind, r.get("quality"))
        if "compress_seconds" in r:
            cells += [f"{r['compress_seconds']:.1f}", f"{r['peak_rss_mb']:.0f} (+{r['peak_rise_mb']:.0f})"]
        else:
            cells += ["", ""]
        cells.append(status.replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    seen = set()
    for r in rows:
        for n in r.get("notes", []):
            if n not in seen:
                seen.add(n)
                notes.append(f"- {r['method']}: {n}")
    lines += [
        "",
        "- bits/weight (all stored) counts every byte the method keeps (codes, scales, zero points, tables, and "
        "the layers it leaves in float at their dtype) over all of the float model's weights; the quantized-layers "
        "column counts only the layers the method compresses (share = their part of all weights). The peers "
        "(hqq, quanto, torchao, bnb) quantize Linear layers only and leave embeddings (and smollm2's tied output "
        "head) in float32; squash, rtn and llama.cpp quantize the embeddings too.",
        "- stored MB: those bytes; file MB: the file the method's own format writes (.squash, GGUF, or "
        "torch.save of the state dict for the torch peers; — where there is none).",
        "- compress s: wall time of compressing a copy of the float model held in memory (llama.cpp: "
        "llama_model_quantize from the F32 GGUF, plus writing that GGUF where it was not cached yet); "
        f"peak RSS: {meta['memory']}.",
    ]
    if kind == "causal-lm":
        lines.append("- llama.cpp is scored by llama.cpp itself (llama-cpp-python, 2 threads) on the same token ids; "
                     "its F32 row checks the GGUF conversion against squash's float model.")
    lines += notes
    return "\n".join(lines) + "\n"


def pareto(points: list[tuple[float, float]], higher_better: bool) -> list[tuple[float, float]]:
    """Points not beaten by one at fewer (or equal) bits per weight, in order of bits."""
    front, best = [], None
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher_better else p[1])):
        if best is None or (y > best if higher_better else y < best):
            front.append((x, y))
            best = y
    return front


def plot(meta: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = meta["kind"]
    good = [r for r in rows if r["status"] == "ok" and "quality" in r and r["method"] != "fp32"
            and r.get("bits") != 32]
    if kind == "causal-lm":
        metrics = [("kl", "KL to float (nats/token)", lambda q: q["kl"], True, False),
                   ("ppl", "perplexity", lambda q: q["perplexity"], True, False)]
    elif kind == "encoder":
        metrics = [("cos", "1 − cosine to float", lambda q: 1 - q["cosine"], True, False)]
    else:
        metrics = [("acc", "accuracy (%)", lambda q: 100 * q["accuracy"], False, True)]
    xs = [("bits_per_weight", "bits per weight (everything stored)"),
          ("quantized_bpw", "bits per weight (quantized layers only)")]
    fig, axes = plt.subplots(len(metrics), 2, figsize=(12, 4.2 * len(metrics)), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in good))
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    markers = "osD^v<>Ph*"
    for i, (_, ylabel, get, logy, higher) in enumerate(metrics):
        for j, (xkey, xlabel) in enumerate(xs):
            ax = axes[i][j]
            pts = []
            for k, m in enumerate(methods):
                mine = sorted([(r[xkey], get(r["quality"]), r["variant"]) for r in good
                               if r["method"] == m and r.get(xkey) is not None])
                if not mine:
                    continue
                ax.plot([p[0] for p in mine], [p[1] for p in mine], marker=markers[k % len(markers)], ls="-",
                        lw=1, color=colors[m], label=m, alpha=0.85)
                if m == "llama.cpp":
                    for x, y, lab in mine:
                        ax.annotate(lab, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
                pts += [(x, y) for x, y, _ in mine]
            front = pareto([p for p in pts if not logy or p[1] > 0], higher)
            if front:
                fx, fy = zip(*front)
                ax.step(fx, fy, where="post", color="black", ls="--", lw=1.2, label="Pareto front", zorder=0)
            ref = meta["reference_quality"]
            if kind == "causal-lm" and ylabel == "perplexity":
                ax.axhline(ref["perplexity_float"], color="grey", lw=0.8, ls=":", label="float")
            if kind == "classifier":
                ax.axhline(100 * ref["accuracy_float"], color="grey", lw=0.8, ls=":", label="float")
            if logy:
                from matplotlib.ticker import FuncFormatter

                ax.set_yscale("log")
                plain = FuncFormatter(lambda v, _: f"{v:g}")
                ax.yaxis.set_major_formatter(plain)
                if ylabel == "perplexity":
                    ax.yaxis.set_minor_formatter(plain)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"{meta['model']}: quality against size{' (quick mode)' if meta['quick'] else ''} — "
                 f"{meta['evaluation']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_line(r: dict) -> str:
    head = f"{r['method']} {r['variant'] or ''}".strip()
    if r["status"] != "ok":
        return f"{head}: {r['status']}: {r.get('error', '')}"
    if "quality" not in r:
        return f"{head}: error while scoring: {r.get('error')}"
    q = r["quality"]
    if "kl" in q:
        what = f"ppl {q['perplexity']:.3f} KL {q['kl']:.4f} top1 {100 * q['top1_agreement']:.1f}%"
    elif "cosine" in q:
        what = f"cosine {q['cosine']:.4f}"
    else:
        what = f"accuracy {100 * q['accuracy']:.2f}%"
    return (f"{head}: {r['bits_per_weight']:.3f} bpw, {what}, compress {r['compress_seconds']:.1f} s, "
            f"eval {r['eval_seconds']:.1f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=MODELS, required=True)
    ap.add_argument("--quick", action="store_true", help="bits 8 4, shorter evaluation, less calibration, HQQ at 4 bits only")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(peers.METHODS))
    ap.add_argument("--bits", nargs="+", type=int, help=f"default {FULL_BITS} ({QUICK_BITS} with --quick)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rows = run_quality(args.model, args.methods, args.bits, args.quick, args.out)
    print((args.out / f"quality-{args.model}.md").read_text())
    return 0 if all(r["status"] != "error" or r["kind"] == "peer" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
