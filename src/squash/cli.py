"""The squash command line: a thin layer over the Python API. Errors print one line (traceback with --debug)."""
from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from squash.atomic import fault_point
from squash.errors import QualityError, SquashError

out = Console()
err = Console(stderr=True)


@contextmanager
def progress_bar(description: str, quiet: bool = False):
    """Yields a callback (done, total, what) that drives a progress bar on stderr."""
    if quiet:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[what]}", markup=False), console=err, transient=True) as bar:
        task = bar.add_task(description, total=None, what="")

        def update(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, what=what)

        yield update


@contextmanager
def status(message: str, quiet: bool = False):
    if quiet:
        yield
        return
    with err.status(Text(message)):  # user text (paths, names) is never read as markup
        yield


# ---------------------------------------------------------------- verbs


def cmd_models(args) -> int:
    from squash.models import BUNDLED, bundled_info

    rows = [{"name": b.name, **bundled_info(b.name), "description": b.description, "origin": b.origin}
            for b in BUNDLED.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="bundled models")
    for col in ("name", "parameters", "float32 size", "shipped file", "description", "comes from"):
        table.add_column(col, overflow="fold")
    for r in rows:
        params = f"{r['parameters'] / 1e6:.2f} M" if r.get("parameters") else "?"
        f32 = _mb(4 * r["parameters"]) if r.get("parameters") else "?"
        shipped = _mb(r["file_bytes"]) if r.get("file_bytes") else r.get("status", "")
        table.add_row(r["name"], params, f32, shipped, r["description"], r["origin"])
    out.print(table)
    return 0


def cmd_compress(args) -> int:
    from squash import compress, evaluate, load, load_recipe, save
    from squash.eval.guard import refusal

    recipe = load_recipe(args.recipe)  # validate everything before the slow part
    output = Path(args.output) if args.output else Path(f"{Path(str(args.model)).stem}-{recipe.name}.squash")
    _check_output(output)
    if _same_file(output, Path(str(args.model))):
        raise SquashError(f"{output}: the output would replace the input; choose another name")
    with status(f"loading {args.model}", args.json):
        model = load(args.model)
    fault_point("loaded")
    # an interrupted fine-tune resumes from here when the same command is run again
    checkpoint = Path(args.checkpoint) if args.checkpoint else output.with_name(f".{output.name}.finetune")
    with progress_bar(f"compressing ({recipe.name})", args.json) as cb:
        small = compress(model, recipe, progress=cb, checkpoint=checkpoint)
    fault_point("compressed")
    with progress_bar("evaluating", args.json) as cb:
        report = evaluate(small, model, _eval_size(args), progress=cb)
    refused = refusal(report, small)
    if refused and not args.force:
        report["file"], report["file_bytes"] = None, 0
        _print_report(report, args.json)
        raise QualityError(f"{refused}; nothing written (--force writes it anyway)")
    save(small, output)  # last: a run that fails leaves no file behind
    if small.recipe.get("finetune_result"):
        report["finetune"] = small.recipe["finetune_result"]
    report["file"] = str(output)
    report["file_bytes"] = output.stat().st_size
    _print_report(report, args.json)
    if refused:
        err.print(Text("warning: ", style="yellow") + Text(f"{refused}; written because of --force"))
    return 0


def cmd_eval(args) -> int:
    from squash import evaluate, load, load_squash
    from squash.eval.guard import refusal

    small = load_squash(args.file)
    against = args.against or small.source.get("name")
    with status(f"loading the float model {against}", args.json):
        reference = load(against)
    if reference.source["sha256"] != small.source.get("sha256"):
        raise SquashError(f"{args.file} was compressed from different weights than {against!r} "
                          f"(sha256 {small.source.get('sha256', '?')[:12]}… vs {reference.source['sha256'][:12]}…); "
                          "give the model it came from with --against")
    small.tokenizer = reference.tokenizer
    with progress_bar("evaluating", args.json) as cb:
        report = evaluate(small, reference, _eval_size(args), progress=cb)
    report["file"] = str(args.file)
    report["file_bytes"] = Path(args.file).stat().st_size
    _print_report(report, args.json)
    refused = refusal(report, small)
    if refused:
        raise QualityError(refused)
    return 0


def cmd_inspect(args) -> int:
    from squash.io.squash_file import read_header

    header = read_header(args.file)
    rows = [{"name": name, "shape": e["shape"], "encoding": _encoding(e), "bytes": e["stored_bytes"],
             "bits_per_weight": 8 * e["stored_bytes"] / math.prod(e["shape"]), "sqnr_db": e.get("extra", {}).get("sqnr_db")}
            for name, e in header["tensors"].items()]
    for alias, target in header["tied"].items():
        rows.append({"name": alias, "shape": None, "encoding": f"tied to {target}", "bits_per_weight": None,
                     "bytes": 0, "sqnr_db": None})
    layers = header.get("layers", {})
    left_float = {n: why.removeprefix("float: ") for n, why in layers.items() if why.startswith("float")}
    if args.json:
        print(json.dumps({"header": {k: header[k] for k in ("format_version", "squash_version", "source", "recipe")},
                          "tensors": rows, "float": header["float"], "layers": layers,
                          "assets": sorted(header.get("assets", {}))}, indent=2))
        return 0
    out.print(Text(f"{args.file}  format {header['format_version']}, squash {header.get('squash_version')}, "
                   f"recipe {(header['recipe'] or {}).get('name')}, from {header['source'].get('name')} "
                   f"(sha256 {str(header['source'].get('sha256', ''))[:12]}…)"))
    table = Table()
    for col in ("tensor", "shape", "encoding", "bits/weight", "bytes", "SQNR dB"):
        table.add_column(col, justify="left" if col in ("tensor", "encoding") else "right")
    for r in rows:
        table.add_row(Text(r["name"]), "×".join(map(str, r["shape"])) if r["shape"] else "",
                      Text(r["encoding"]), f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] else "",
                      f"{r['bytes']:,}", f"{r['sqnr_db']:.1f}" if r["sqnr_db"] is not None else "")
    out.print(table)
    kept = header["float"]
    out.print(Text(f"float tensors kept: {len(kept)} ({', '.join(map(str, kept[:4]))}{', …' if len(kept) > 4 else ''})"))
    if layers:
        done = sum(why.startswith("compressed") for why in layers.values())
        out.print(Text(f"layers: {done} compressed, {len(left_float)} left float"))
        for name, why in left_float.items():
            out.print(Text(f"  float  {name}: {why}"))
    if header.get("assets"):
        out.print(Text(f"stored with it: {', '.join(sorted(header['assets']))}"))
    return 0


def cmd_generate(args) -> int:
    import torch

    from squash import load_squash
    from squash.models import tokenizer_for

    if args.max_new_tokens < 1:
        raise SquashError(f"--max-new-tokens {args.max_new_tokens}: give at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise SquashError(f"--temperature {args.temperature}: give 0 (greedy) or a positive number")
    if args.reference:
        small = load_squash(args.file)
    else:  # packed weights and squash's kernel; what cannot be packed runs on the reference path
        from squash.runtime.packed import load_packed

        with status("loading (packed runtime)"):
            small = load_packed(args.file, int8_activations=not args.float_activations)
    if small.kind != "causal-lm":
        raise SquashError(f"{args.file} holds a {small.kind} model; generate needs a language model")
    with status("loading the tokenizer"):
        tok = tokenizer_for(small)
    if not args.raw and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    hf = small.config.get("hf_config", {})
    context = hf.get("max_position_embeddings") or hf.get("n_positions")
    if isinstance(context, int) and ids.shape[1] + args.max_new_tokens > context:
        raise SquashError(f"the prompt ({ids.shape[1]} tokens) and --max-new-tokens {args.max_new_tokens} do not fit "
                          f"the model's context of {context} tokens")
    torch.manual_seed(args.seed)
    decoder = None
    if not args.reference:
        from squash.runtime.llama import make_decoder

        try:
            decoder = make_decoder(small.module, max_len=ids.shape[1] + args.max_new_tokens + 1)
        except SquashError as e:  # a layout neither decoder knows: transformers' generate on the packed modules
            err.print(f"fast decoder unavailable ({e}); using transformers' generate")
    if decoder is not None:
        gen = torch.Generator().manual_seed(args.seed)
        new, timing = decoder.generate(ids[0], args.max_new_tokens, temperature=args.temperature,
                                       eos=tok.eos_token_id, generator=gen, repetition_penalty=1.1)
        print(tok.decode(new, skip_special_tokens=True).strip())
        err.print(f"prefill {timing.prefill_tokens} tokens at {timing.prefill_tps:.0f} tokens/s, "
                  f"decode {timing.decode_tokens} tokens at {timing.decode_tps:.1f} tokens/s", style="dim")
        return 0
    with status("generating"), torch.inference_mode():
        gen = small.module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                    do_sample=args.temperature > 0, temperature=args.temperature or None,
                                    top_p=None, top_k=None, repetition_penalty=1.1, pad_token_id=tok.eos_token_id)
    print(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return 0


def cmd_export(args) -> int:
    from squash import load_squash

    output = Path(args.output)
    if not output.parent.resolve().is_dir():
        raise SquashError(f"{output.parent}: the output folder does not exist")
    if _same_file(output, Path(args.file)) or (args.metadata_from and _same_file(output, Path(args.metadata_from))):
        raise SquashError(f"{output}: the output would replace an input; choose another name")
    with status(f"loading {args.file}", args.json):
        small = load_squash(args.file)
    fault_point("loaded")
    if args.to == "gguf":
        from squash.io.gguf_export import export_gguf

        with progress_bar("writing GGUF", args.json) as cb:
            report = export_gguf(small, output, target=args.type, metadata_from=args.metadata_from, progress=cb)
    else:
        if args.type or args.metadata_from:
            raise SquashError("--type and --metadata-from apply to --to gguf only")
        from squash.io.onnx_export import export_onnx

        with status("writing ONNX", args.json):
            report = export_onnx(small, output)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    _print_export(args.to, output, report)
    return 0


def _print_export(fmt: str, output: Path, report: dict) -> None:
    size = report.get("file_bytes") or (output.stat().st_size if output.exists() else 0)
    out.print(f"wrote {output} ({_mb(size)})")
    if fmt == "gguf":
        table = Table(title="GGUF tensors by llama.cpp type")
        for col in ("type", "exact", "refit", "float", "weights", "max |Δ| vs squash", "max output change"):
            table.add_column(col)
        for r in report.get("summary", []):
            table.add_row(r["type"], str(r["exact"]), str(r["refit"]), str(r["float"]), f"{r['weights']:,}",
                          f"{r['max_abs']:.3g}", f"{r.get('output_change_max', 0.0):.1e}")
        out.print(table)
        out.print(Text(f"metadata from {report.get('metadata_from')}"))
        for note in report.get("notes", []):
            out.print(Text(f"note: {note}"))
    else:
        storage = report.get("storage", {})
        out.print("stored as: " + ", ".join(f"{n} {k}" for k, n in storage.items()))
        if report.get("session_config"):
            out.print("for exact results in onnxruntime set: " +
                      ", ".join(f"{k}={v}" for k, v in report["session_config"].items()))


# ---------------------------------------------------------------- helpers


def _one_line(message: str, limit: int = 600) -> str:
    """An error is one line: a library's multi-line message (a config's repr, a parser's context) is joined, and
    one that lists hundreds of choices is cut."""
    text = " ".join(part.strip() for part in message.splitlines() if part.strip())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def _check_output(path: Path) -> None:
    if path.suffix != ".squash":
        raise SquashError(f"{path}: the output name must end in .squash")
    if not path.parent.resolve().is_dir():
        raise SquashError(f"{path.parent}: the output folder does not exist")
    if path.is_dir():
        raise SquashError(f"{path}: is a folder")


def _eval_size(args):
    from squash.eval.quality import QUICK, EvalSize

    return QUICK if args.quick else EvalSize()


def _encoding(e: dict) -> str:
    """One phrase for a tensor's encoding, e.g. 'int4 asymmetric, block 1×64 + 0.3% outliers + rank 8'."""
    arrays = e.get("arrays", ["codes"])
    parts = []
    if "mask" in arrays:
        n = math.prod(e["shape"])
        parts.append(f"{100 * (1 - e.get('kept', n) / n):.0f}% pruned")
    if "dense" in arrays:
        parts.append("float16 values")
    if "codes" in arrays:
        grid = {"uniform": f"int{e['bits']}", "grid": f"{e['bits']}-bit grid"}[e["encoding"]]
        sym = "symmetric" if e["symmetric"] else "asymmetric"
        parts.append(f"{grid} {sym}, block {e['block'][0]}×{e['block'][1]}")
    if e.get("entropy"):
        parts.append("entropy-coded")
    if "col_scale" in arrays:
        parts.append("activation-scaled")
    if "sparse_index" in arrays:
        parts.append("outliers")
    if "u" in arrays:
        parts.append(f"rank {e.get('extra', {}).get('rank', '?')}")
    if e.get("extra", {}).get("activation_bits"):
        parts.append(f"A{e['extra']['activation_bits']}")
    return " + ".join(parts)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB"


def _print_report(r: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(r, indent=2))
        return
    table = Table(title=Text(f"{r['model']}  ·  recipe {r['recipe']}  ·  {r['file']}"))
    table.add_column("")
    table.add_column("float32", justify="right")
    table.add_column("compressed", justify="right")
    table.add_column("change", justify="right")
    table.add_row("weight bytes", _mb(r["float_weight_bytes"]), _mb(r["weight_bytes"]), f"{100 * r['size_ratio']:.1f}%")
    table.add_row("file on disk", "", _mb(r["file_bytes"]), f"{100 * r['file_bytes'] / r['float_weight_bytes']:.1f}%")
    table.add_row("bits per weight", "32", f"{r['bits_per_weight']:.3f}", "all stored bytes counted")
    q = r.get("quality", {})
    if "perplexity" in q:
        table.add_row(f"perplexity ({q['tokens']:,} eval tokens)", f"{q['perplexity_float']:.3f}", f"{q['perplexity']:.3f}",
                      f"{100 * (q['perplexity'] / q['perplexity_float'] - 1):+.2f}%")
        table.add_row("KL to float (nats/token)", "0", f"{q['kl']:.5f}", "")
        table.add_row("top-1 agreement", "100%", f"{100 * q['top1_agreement']:.2f}%", "")
    if "cosine" in q:
        table.add_row(f"cosine to float ({q['paragraphs']} paragraphs)", "1", f"{q['cosine']:.5f}", f"min {q['cosine_min']:.4f}")
    if "accuracy" in q:
        table.add_row(f"test accuracy ({q['images']} images)", f"{100 * q['accuracy_float']:.2f}%",
                      f"{100 * q['accuracy']:.2f}%", f"{100 * (q['accuracy'] - q['accuracy_float']):+.2f} pt")
    ft = r.get("finetune")
    if ft and ft.get("held_out_loss_before") is not None:
        table.add_row(f"held-out distillation loss ({ft['steps']} fine-tune steps)", "",
                      f"{ft['held_out_loss_before']:.4f} → {ft['held_out_loss_after']:.4f}",
                      f"{100 * (ft['held_out_loss_after'] / ft['held_out_loss_before'] - 1):+.1f}%")
    dec = r.get("decode")
    if dec:
        table.add_row(f"decode speed (batch 1, {dec['threads']} threads; {dec['runtime']})",
                      f"{dec['float_tps']:.1f} tok/s", f"{dec['compressed_tps']:.1f} tok/s", f"{dec['speedup']:.2f}× speed")
    lat = r.get("latency")
    if lat and not dec:
        where = "packed" if lat.get("runtime", "").startswith("packed") else "reference path"
        table.add_row(f"forward latency ({lat['threads']} threads, {where})", f"{lat['float']['median_ms']:.1f} ms",
                      f"{lat['compressed']['median_ms']:.1f} ms", f"{lat['speedup']:.2f}× speed")
    out.print(table)


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="squash", description="Compress trained neural networks and measure the cost.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("models", help="the bundled models, their sizes and where they come from")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("compress", help="compress a model and report what it cost and saved")
    s.add_argument("model", help="a bundled name (see `squash models`), a transformers folder or a .gguf file")
    s.add_argument("--recipe", default="int8", help="a preset name or a recipe .toml file (default: int8)")
    s.add_argument("-o", "--output", help="the .squash file to write (default: MODEL-RECIPE.squash here)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.add_argument("--quick", action="store_true", help="evaluate on a small slice of the evaluation data")
    s.add_argument("--force", action="store_true", help="write the file even when the guard finds the compressed "
                   "model broken (see the README's guard section)")
    s.add_argument("--checkpoint", help="fine-tune checkpoint to resume from and write to "
                   "(default: .OUTPUT.finetune beside the output; removed when the run finishes)")
    s.set_defaults(func=cmd_compress)

    s = sub.add_parser("eval", help="measure a .squash file again against its float model")
    s.add_argument("file")
    s.add_argument("--against", help="the float model (default: the source named in the file)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--quick", action="store_true")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("inspect", help="per-tensor encoding, bits per weight and error of a .squash file")
    s.add_argument("file")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("generate", help="continue a prompt with a compressed language model")
    s.add_argument("file")
    s.add_argument("prompt")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--raw", action="store_true", help="no chat template; continue the prompt as plain text")
    s.add_argument("--reference", action="store_true",
                   help="dequantize-then-matmul modules and transformers' generate (slow; for checking)")
    s.add_argument("--float-activations", action="store_true",
                   help="keep activations in float32 when decoding (by default they are rounded to int8 per "
                        "32 values and multiplied as integers where the CPU has VNNI: faster, ~0.5%% perplexity)")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("export", help="write a .squash file as GGUF (llama.cpp, Ollama) or ONNX")
    s.add_argument("file", help="the .squash file")
    s.add_argument("--to", required=True, choices=("gguf", "onnx"), help="the format to write")
    s.add_argument("-o", "--output", required=True, help="the file to write (.gguf for --to gguf)")
    s.add_argument("--type", choices=("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q6_k", "f16", "f32"),
                   help="GGUF: one llama.cpp type for every compressed weight (default: squash's own codes where "
                        "they fit Q8_0/Q5_x/Q4_x exactly, else the smallest type that keeps each layer's output "
                        "within 1%% RMS of squash's, refit weighted by calibration inputs)")
    s.add_argument("--metadata-from", help="GGUF: copy tokenizer, chat template and general.* from this GGUF "
                   "(default: the source model's GGUF when it has one, else its transformers config and tokenizer)")
    s.add_argument("--json", action="store_true", help="print the export report as JSON")
    s.set_defaults(func=cmd_export)

    from squash.eval.curve import add_parser as add_curve_parser

    add_curve_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SquashError as e:
        if args.debug:
            raise
        err.print(Text("error: ", style="red") + Text(_one_line(str(e))), highlight=False, soft_wrap=True)
        return 3 if isinstance(e, QualityError) else 2
    except OSError as e:  # a folder that cannot be written, a disk that is full
        if args.debug:
            raise
        err.print(Text("error: ", style="red") + Text(f"{e.strerror or e}: {e.filename or ''}"), highlight=False,
                  soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
