"""Fuzz squash's readers: hundreds of bad inputs made from valid files squash writes itself, every command run on them.

    python bench/fuzz.py            # the full corpus (1530 cases, ~3 min), summary in bench/results/fuzz.{json,md}
    python bench/fuzz.py --slice 60 # a seeded slice (tests/test_fuzz.py runs one in CI)

Seeds (written here, deterministic): digits-cnn compressed four ways (int8; pruned + k-means + entropy-coded; GPTQ int4
plus a low-rank term; 2:4 sparse), a tiny random LLaMA with a byte-level BPE tokenizer as a transformers folder, as a
.squash file and as a GGUF, and a recipe. Mutations: truncations, bit flips in the header length, JSON and arrays,
semantic header edits (wrong types, huge, zero and negative shapes, unknown versions, absurd bits, overlapping and
out-of-range offsets, a zlib bomb), GGUF fields (magic, version, counts, string and array lengths, types, tensor dims
and offsets, alignment), broken transformers folders (config.json, truncated, NaN or Inf safetensors, missing
tensors, pickled weights), every invalid recipe value, and command-line misuse (output equal to the input, an
existing file, a read-only or missing folder).

Each case runs the real CLI (`squash.cli.main`) in a worker process that serves many cases (startup is paid once);
a case that hangs is killed and the worker restarted, one that kills the worker is a crash. For every case:
  crash       the worker died (a signal) or exited with a code squash does not use (not 0, 2, 3 or argparse's 2)
  traceback   an exception escaped main(): the user would see a traceback
  hang        no answer within the time limit
  left        a file appeared that should not have (any new file on failure; on success, anything but the output),
              including stale temporary files in the cache
  modified    an input file changed
  multiline   a failure whose message is not one line
  memory      the worker's peak resident memory passed MAX_RSS_MB (the seeds are under 2 MB each)
  rerun       the same case run again (fresh copy) gave a different exit code, message or output file
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import resource
import select
import shutil
import struct
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 90.0
OK_CODES = {0, 2, 3}
# The worker's peak resident memory may not pass this: every seed is a tiny model (under 2 MB), so a case that needs
# more has allocated what a hostile header asked for rather than what the file holds.
MAX_RSS_MB = 2500


# ------------------------------------------------------------------ seeds


def make_seeds(folder: Path) -> dict[str, Path]:
    """Valid inputs written by squash itself; cached in `folder` (rebuilt when missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "seeds.json"
    if done.is_file():
        return {k: folder / v for k, v in json.loads(done.read_text()).items()}
    import torch

    from squash import compress, load, save
    from squash.recipe import Recipe

    digits = load("digits-cnn")
    recipes = {
        "digits-int8": {"steps": [{"step": "quantize", "bits": 8, "block": "channel"}]},
        "digits-entropy": {"steps": [{"step": "prune", "sparsity": 0.6}, {"step": "codebook", "bits": 4},
                                     {"step": "entropy"}]},
        "digits-lowrank": {"steps": [{"step": "outliers", "fraction": 0.01}, {"step": "quantize", "bits": 4,
                                      "block": 32, "symmetric": False, "zero_dtype": "int", "rounding": "gptq"},
                                     {"step": "lowrank", "rank": 4}]},
        "digits-2of4": {"steps": [{"step": "prune", "pattern": "2:4"}, {"step": "quantize", "bits": 8,
                                                                         "block": "channel"}]},
    }
    seeds = {}
    for name, r in recipes.items():
        small = compress(digits, Recipe.from_dict({"name": name, **r}))
        seeds[name] = save(small, folder / f"{name}.squash")
    seeds["llama-dir"] = _tiny_llama_dir(folder / "tiny-llama")
    llama = load(seeds["llama-dir"])
    small = compress(llama, Recipe.from_dict({"name": "int8", "steps": [{"step": "quantize", "bits": 8,
                                                                           "block": "channel"}]}))
    seeds["llama"] = save(small, folder / "tiny-llama.squash")
    from squash.io.gguf_export import export_gguf

    export_gguf(small, folder / "tiny-llama.gguf", target="q8_0")
    seeds["gguf"] = folder / "tiny-llama.gguf"
    seeds["recipe"] = folder / "recipe.toml"
    seeds["recipe"].write_text('name = "fuzz"\nexclude = []\n\n[[steps]]\nstep = "quantize"\nbits = 8\n'
                               'block = "channel"\nsymmetric = true\nrounding = "nearest"\n')
    del torch
    done.write_text(json.dumps({k: str(Path(v).relative_to(folder)) for k, v in seeds.items()}))
    return {k: Path(v) for k, v in seeds.items()}


def _tiny_llama_dir(folder: Path) -> Path:
    """A 2-layer LLaMA (hidden 64) with a 300-token byte-level BPE tokenizer trained on the calibration text."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from squash.data import calibration_text

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([calibration_text()[:40000]], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------ file structure helpers


def st_split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file → (its JSON header, the data section)."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def st_join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def squash_edit(data: bytes, edit) -> bytes:
    """Apply `edit` to the parsed squash header (the JSON inside the safetensors metadata) and write it back."""
    h, body = st_split(data)
    meta = json.loads(h["__metadata__"]["squash"])
    edit(meta)
    h["__metadata__"]["squash"] = json.dumps(meta)
    return st_join(h, body)


def squash_arrays_edit(data: bytes, edit) -> bytes:
    """Change the arrays with `edit(dict of tensors)` and fix the checksum, so the damage reaches the decoders."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from squash.io.squash_file import _digest

    h, _ = st_split(data)
    arrays = st_load(data)
    edit(arrays)
    meta = json.loads(h["__metadata__"]["squash"])
    meta["arrays_sha256"] = _digest(arrays)
    return st_save(arrays, metadata={"squash": json.dumps(meta)})


@dataclass
class GGUFField:
    kind: str  # "count", "strlen", "type", "arrlen", "ndims", "dim", "ttype", "offset", "version", "magic"
    pos: int
    size: int
    note: str = ""


def gguf_fields(data: bytes) -> list[GGUFField]:
    """The positions of every length, count, type and offset in a (valid) GGUF file."""
    out = [GGUFField("magic", 0, 4), GGUFField("version", 4, 4), GGUFField("count", 8, 8, "tensors"),
           GGUFField("count", 16, 8, "kv")]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    p = 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(p, note):
        out.append(GGUFField("strlen", p, 8, note))
        n = struct.unpack_from("<Q", data, p)[0]
        return p + 8 + n

    for _ in range(n_kv):
        key_at = p
        p = string(p, "key")
        key = data[key_at + 8:p].decode()
        out.append(GGUFField("type", p, 4, key))
        t = struct.unpack_from("<I", data, p)[0]
        p += 4
        if t == 8:
            p = string(p, key)
        elif t == 9:
            out.append(GGUFField("type", p, 4, key + "[]"))
            it = struct.unpack_from("<I", data, p)[0]
            out.append(GGUFField("arrlen", p + 4, 8, key))
            n = struct.unpack_from("<Q", data, p + 4)[0]
            p += 12
            for i in range(n):
                if it == 8:
                    p = string(p, key) if i < 4 else p + 8 + struct.unpack_from("<Q", data, p)[0]
                else:
                    p += sizes[it]
        else:
            if key == "general.alignment":
                out.append(GGUFField("alignment", p, 4))
            p += sizes[t]
    for _ in range(n_tensors):
        p = string(p, "tensor name")
        out.append(GGUFField("ndims", p, 4))
        nd = struct.unpack_from("<I", data, p)[0]
        p += 4
        for _ in range(nd):
            out.append(GGUFField("dim", p, 8))
            p += 8
        out.append(GGUFField("ttype", p, 4))
        out.append(GGUFField("offset", p + 4, 8))
        p += 12
    out.append(GGUFField("end", p, 0))
    return out


# ------------------------------------------------------------------ cases


@dataclass
class Case:
    """One command on one (usually damaged) input. `files` are written into a fresh folder; `argv` may name them
    relative to it; `output` is the file a successful run may create."""

    name: str
    argv: list[str]
    files: dict[str, bytes] = field(default_factory=dict)
    copies: dict[str, Path] = field(default_factory=dict)  # folders copied in
    output: str | None = None
    setup: str | None = None  # "readonly": the case folder is made read-only before the run


SQUASH_COMMANDS = {
    "inspect": lambda f, lm: ["inspect", f],
    "inspect-json": lambda f, lm: ["inspect", f, "--json"],
    "eval": lambda f, lm: ["eval", f, "--quick", "--json"] + (["--against", "tiny-llama"] if lm else []),
    "generate": lambda f, lm: ["generate", f, "Objects are", "--max-new-tokens", "4"],
    "export-gguf": lambda f, lm: ["export", f, "--to", "gguf", "-o", "out.gguf"],
    "export-onnx": lambda f, lm: ["export", f, "--to", "onnx", "-o", "out.onnx"],
}
OUTPUTS = {"export-gguf": "out.gguf", "export-onnx": "out.onnx"}


def squash_cases(name: str, data: bytes, rng: random.Random, lm: bool) -> list[tuple[str, bytes]]:
    """Damaged copies of one .squash file: (label, bytes)."""
    h, body = st_split(data)
    n = 8 + struct.unpack("<Q", data[:8])[0]
    meta = json.loads(h["__metadata__"]["squash"])
    tensors = list(meta["tensors"])
    t0 = tensors[0]
    arrays = [k for k in h if k != "__metadata__"]
    out = []
    for at in sorted({0, 1, 7, 8, 9, n // 2, n - 1, n, n + 1, (n + len(data)) // 2, len(data) - 1}):
        out.append((f"truncate@{at}", data[:at]))
    out.append(("empty", b""))
    out.append(("garbage", bytes(rng.randrange(256) for _ in range(512))))
    out.append(("appended", data + b"\x00" * 100))
    for i in range(8):  # the header length, byte by byte
        for bit in (0, 7):
            b = bytearray(data)
            b[i] ^= 1 << bit
            out.append((f"flip-len-byte{i}-bit{bit}", bytes(b)))
    for k in range(12):  # anywhere in the JSON header
        b = bytearray(data)
        b[rng.randrange(8, n)] ^= 1 << rng.randrange(8)
        out.append((f"flip-json-{k}", bytes(b)))
    for k in range(6):  # the arrays (the checksum must catch these)
        b = bytearray(data)
        b[rng.randrange(n, len(data))] ^= 1 << rng.randrange(8)
        out.append((f"flip-array-{k}", bytes(b)))

    # the safetensors layer
    def st(label, edit):
        hh = json.loads(json.dumps(h))
        edit(hh)
        out.append((label, st_join(hh, body)))

    a0 = arrays[0]
    st("st-offsets-overlap", lambda hh: hh[arrays[1]].__setitem__("data_offsets", hh[a0]["data_offsets"]))
    st("st-offset-past-end", lambda hh: hh[a0].__setitem__("data_offsets", [0, len(body) + 4096]))
    st("st-offset-negative", lambda hh: hh[a0].__setitem__("data_offsets", [-8, 0]))
    st("st-offset-reversed", lambda hh: hh[a0].__setitem__("data_offsets", hh[a0]["data_offsets"][::-1]))
    st("st-dtype-unknown", lambda hh: hh[a0].__setitem__("dtype", "Q99"))
    st("st-dtype-wrong", lambda hh: hh[a0].__setitem__("dtype", "F64"))
    st("st-shape-huge", lambda hh: hh[a0].__setitem__("shape", [2**40, 2**40]))
    st("st-shape-negative", lambda hh: hh[a0].__setitem__("shape", [-1]))
    st("st-shape-string", lambda hh: hh[a0].__setitem__("shape", "big"))
    st("st-metadata-not-string", lambda hh: hh["__metadata__"].__setitem__("squash", 7))
    st("st-no-metadata", lambda hh: hh.pop("__metadata__"))
    st("st-array-missing", lambda hh: hh.pop(arrays[-1]))
    b = bytearray(data)
    b[:8] = struct.pack("<Q", 2**63)
    out.append(("st-header-length-huge", bytes(b)))
    b[:8] = struct.pack("<Q", len(data) + 1)
    out.append(("st-header-length-past-end", bytes(b)))

    # the squash header
    def sq(label, edit):
        out.append((label, squash_edit(data, edit)))

    def tset(key, value):
        return lambda m: m["tensors"][t0].__setitem__(key, value)

    for v in (0, 3, 99, -1, "2", None, 2.0):
        sq(f"format_version={v!r}", lambda m, v=v: m.__setitem__("format_version", v))
    sq("format=other", lambda m: m.__setitem__("format", "gguf"))
    sq("header-is-list", lambda m: (m.clear(), None))
    for key in ("model", "source", "tensors", "tied", "float", "float_aliases", "recipe", "layers", "assets"):
        sq(f"{key}-missing", lambda m, key=key: m.pop(key, None))
        sq(f"{key}-wrong-type", lambda m, key=key: m.__setitem__(key, 42))
    sq("kind-unknown", lambda m: m["model"].__setitem__("kind", "spaceship"))
    sq("kind-number", lambda m: m["model"].__setitem__("kind", 3))
    for v in (-1, 9, 16, 255, 2**40, "8", 8.5, None, True):
        sq(f"bits={v!r}", tset("bits", v))
    for v in ([2**40, 2**40], [0, 4], [-3, 4], [], [1.5, 2], "3x3", [2**62], [10**6, 10**6]):
        sq(f"shape={v!r}", tset("shape", v))
    for v in ([0, 1], [1], [-1, 32], [2**40, 1], "channel", None):
        sq(f"block={v!r}", tset("block", v))
    for key, v in (("symmetric", "yes"), ("encoding", "magic"), ("arrays", ["codes", "scale", "secret"]),
                   ("arrays", "codes"), ("kept", -5), ("kept", 2**50), ("zero_frac", 99), ("zero", "complex"),
                   ("stored_bytes", -1), ("extra", []), ("extra", {"form": {"kind": "conv9d"}}), ("entropy", True)):
        sq(f"{key}={v!r}", tset(key, v))
    sq("arrays_sha256-wrong", lambda m: m.__setitem__("arrays_sha256", "0" * 64))
    sq("arrays_sha256-missing", lambda m: m.pop("arrays_sha256"))
    sq("tensor-renamed", lambda m: m["tensors"].__setitem__("ghost.weight", m["tensors"].pop(t0)))
    sq("tensor-not-in-model", lambda m: m["tensors"].__setitem__("ghost.weight", m["tensors"][t0]))
    sq("tied-to-missing", lambda m: m["tied"].__setitem__(t0, "nowhere.weight"))
    sq("tied-to-self-loop", lambda m: m["tied"].__setitem__("a.weight", "b.weight"))
    sq("float-name-missing", lambda m: m["float"].append("not.there"))
    sq("float-not-strings", lambda m: m.__setitem__("float", [1, 2]))
    sq("alias-to-missing", lambda m: m["float_aliases"].__setitem__("x", "not.there"))
    sq("assets-unknown-coding", lambda m: m.__setitem__("assets", {"tokenizer.json": "lzma"}))
    sq("assets-missing-array", lambda m: m.__setitem__("assets", {"nothing.json": "zlib"}))
    sq("config-resized-huge", lambda m: m["model"]["config"].__setitem__(
        "resized", {t0.removesuffix(".weight"): [2**31, 2**31]}))
    sq("config-resized-bad", lambda m: m["model"]["config"].__setitem__("resized", {"x": [0]}))
    if lm:
        for key, v in (("hidden_size", 2**20), ("hidden_size", -64), ("hidden_size", "64"), ("vocab_size", 2**34),
                       ("num_hidden_layers", 10**7), ("num_hidden_layers", 0), ("num_attention_heads", 0),
                       ("intermediate_size", 2**31), ("model_type", "no-such-model"), ("model_type", None),
                       ("rope_theta", "fast"), ("max_position_embeddings", -1), ("hidden_act", "sigmoid9")):
            sq(f"hf_config.{key}={v!r}",
               lambda m, key=key, v=v: m["model"]["config"]["hf_config"].__setitem__(key, v))
        sq("hf_config-missing", lambda m: m["model"]["config"].pop("hf_config"))
    else:
        sq("arch-huge", lambda m: m["model"]["config"].__setitem__("arch", {"width": 2**30}))
        sq("arch-bad-key", lambda m: m["model"]["config"].__setitem__("arch", {"colour": "red"}))

    # arrays that decode badly, the checksum made to match so the damage reaches the decoders
    import torch

    def arr(label, edit):
        out.append((label, squash_arrays_edit(data, edit)))

    codes = next((k for k in arrays if k.endswith(".codes")), None)
    scale = next((k for k in arrays if k.endswith(".scale")), None)
    if codes:
        arr("codes-short", lambda a: a.__setitem__(codes, a[codes][:-1].clone()))
        arr("codes-long", lambda a: a.__setitem__(codes, torch.cat([a[codes], a[codes][:3]])))
        arr("codes-float", lambda a: a.__setitem__(codes, a[codes].float()))
        arr("codes-2d", lambda a: a.__setitem__(codes, a[codes].reshape(1, -1).clone()))
    if scale:
        arr("scale-nan", lambda a: a[scale].view(-1).__setitem__(0, float("nan")))
        arr("scale-inf", lambda a: a[scale].view(-1).__setitem__(0, float("inf")))
        arr("scale-shape", lambda a: a.__setitem__(scale, a[scale].reshape(-1)[:-1].clone()))
        arr("scale-int", lambda a: a.__setitem__(scale, a[scale].to(torch.int32)))
        arr("scale-missing", lambda a: a.pop(scale))
    floats = [k for k in arrays if k in meta["float"]]
    if floats:
        f0 = floats[0]
        arr("float-nan", lambda a: a[f0].view(-1).__setitem__(0, float("nan")))
        arr("float-shape", lambda a: a.__setitem__(f0, a[f0].reshape(-1)[:-1].clone()))
    for k in arrays:
        if k.endswith((".counts", ".words")):
            arr(f"{k.rsplit('.', 1)[-1]}-garbage", lambda a, k=k: a.__setitem__(
                k, torch.randint(-2**31, 2**31 - 1, a[k].shape, dtype=torch.int32, generator=torch.Generator().manual_seed(5))))
            arr(f"{k.rsplit('.', 1)[-1]}-short", lambda a, k=k: a.__setitem__(k, a[k][: max(1, a[k].numel() // 2)].clone()))
            break
    for k in arrays:
        if k.endswith((".u", ".sparse_index", ".mask")):
            arr(f"{k.rsplit('.', 1)[-1]}-damaged", lambda a, k=k: a.__setitem__(
                k, a[k].reshape(-1)[: max(1, a[k].numel() - 1)].clone()))
            if k.endswith(".sparse_index"):
                arr("sparse_index-out-of-range", lambda a, k=k: a[k].view(-1).__setitem__(0, 2**30))
    assets = [k for k in arrays if k.startswith("__asset__/")]
    if assets:
        import zlib

        bomb = torch.frombuffer(bytearray(zlib.compress(b"\x00" * (300 << 20), 9)), dtype=torch.uint8)
        arr("asset-zlib-bomb", lambda a: a.__setitem__(assets[0], bomb))
        arr("asset-not-zlib", lambda a: a.__setitem__(assets[0], torch.arange(64, dtype=torch.uint8)))
        arr("asset-bad-json", lambda a: a.__setitem__(assets[0], torch.frombuffer(
            bytearray(zlib.compress(b'{"model": [1, 2')), dtype=torch.uint8)))
    return out


def gguf_cases(data: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    fields = gguf_fields(data)
    end = next(f.pos for f in fields if f.kind == "end")
    out = []

    def put(label, pos, fmt, value):
        b = bytearray(data)
        struct.pack_into(fmt, b, pos, value)
        out.append((label, bytes(b)))

    out.append(("magic", b"GGUX" + data[4:]))
    for v in (0, 1, 2, 4, 2**32 - 1):
        put(f"version={v}", 4, "<I", v)
    for note, pos in (("tensors", 8), ("kv", 16)):
        for v in (0, 1, 2**31, 2**63, 2**64 - 1):
            put(f"count-{note}={v}", pos, "<Q", v)
    strlens = [f for f in fields if f.kind == "strlen"]
    for f in rng.sample(strlens, min(6, len(strlens))):
        for v in (2**40, 2**64 - 1, 0):
            put(f"strlen-{f.note}={v}", f.pos, "<Q", v)
    for f in [f for f in fields if f.kind == "type"][:: max(1, len(fields) // 40)][:8]:
        for v in (13, 9, 2**32 - 1):
            put(f"type-{f.note}={v}", f.pos, "<I", v)
    for f in [f for f in fields if f.kind == "arrlen"]:
        for v in (2**62, 2**32, 0):
            put(f"arrlen-{f.note}={v}", f.pos, "<Q", v)
    ndims = [f for f in fields if f.kind == "ndims"]
    for f in ndims[:2]:
        for v in (0, 5, 2**31):
            put(f"ndims={v}", f.pos, "<I", v)
    dims = [f for f in fields if f.kind == "dim"]
    for f in dims[:3]:
        for v in (0, 2**40, 2**63 + 7, 3):
            put(f"dim={v}", f.pos, "<Q", v)
    ttypes = [f for f in fields if f.kind == "ttype"]
    for f in ttypes[:2]:
        for v in (4, 5, 99, 2**31, 0):  # 4 and 5 are retired Q4_2/Q4_3
            put(f"ttype={v}", f.pos, "<I", v)
    offsets = [f for f in fields if f.kind == "offset"]
    for f in offsets[:2] + offsets[-1:]:
        for v in (2**40, 1, len(data), 0):
            put(f"offset={v}", f.pos, "<Q", v)
    for f in [f for f in fields if f.kind == "alignment"]:
        for v in (0, 3, 2**31):
            put(f"alignment={v}", f.pos, "<I", v)
    for at in sorted({0, 3, 4, 12, 23, 24, 100, end // 2, end - 1, end, (end + len(data)) // 2, len(data) - 1}):
        out.append((f"truncate@{at}", data[:at]))
    for k in range(16):
        b = bytearray(data)
        b[rng.randrange(4, end)] ^= 1 << rng.randrange(8)
        out.append((f"flip-header-{k}", bytes(b)))
    for k in range(4):  # tensor data: a valid file whose weights changed (must load or refuse, never crash)
        b = bytearray(data)
        for _ in range(64):
            b[rng.randrange(end, len(data))] = 0xFF
        out.append((f"data-0xff-{k}", bytes(b)))
    return out


def hf_cases(folder: Path, rng: random.Random) -> list[tuple[str, dict[str, bytes | None]]]:
    """Broken transformers folders: (label, {file name: new bytes, or None to delete it})."""
    import torch
    from safetensors.torch import load_file
    from safetensors.torch import save as st_save

    config = json.loads((folder / "config.json").read_text())
    weights = (folder / "model.safetensors").read_bytes()
    state = load_file(folder / "model.safetensors")
    big = next(k for k in state if "mlp.up_proj" in k)
    out = []

    def cfg(label, edit):
        c = json.loads(json.dumps(config))
        edit(c)
        out.append((label, {"config.json": json.dumps(c).encode()}))

    out.append(("config-not-json", {"config.json": b"{\"model_type\": \"llama\", "}))
    out.append(("config-list", {"config.json": b"[1, 2, 3]"}))
    out.append(("config-empty", {"config.json": b""}))
    out.append(("config-binary", {"config.json": bytes(range(256))}))
    out.append(("config-missing", {"config.json": None}))
    for key, v in (("model_type", "no-such-model"), ("model_type", 7), ("hidden_size", -64), ("hidden_size", "64"),
                   ("hidden_size", 2**20), ("vocab_size", 2**34), ("num_hidden_layers", 10**7),
                   ("num_hidden_layers", 0), ("num_attention_heads", 0), ("num_attention_heads", 5),
                   ("intermediate_size", 2**31), ("hidden_act", "sigmoid9"), ("architectures", ["NoSuchForCausalLM"]),
                   ("architectures", "LlamaForCausalLM"), ("rope_scaling", {"rope_type": "warp"}),
                   ("torch_dtype", "float128"), ("tie_word_embeddings", "maybe")):
        cfg(f"config.{key}={v!r}", lambda c, key=key, v=v: c.__setitem__(key, v))
    cfg("config-no-model_type", lambda c: c.pop("model_type"))
    n = 8 + struct.unpack("<Q", weights[:8])[0]
    for at in (0, 5, 8, n // 2, n, (n + len(weights)) // 2, len(weights) - 1):
        out.append((f"weights-truncate@{at}", {"model.safetensors": weights[:at]}))
    out.append(("weights-missing", {"model.safetensors": None}))
    for label, edit in (
            ("weights-nan", lambda s: s[big].view(-1).__setitem__(3, float("nan"))),
            ("weights-inf", lambda s: s[big].view(-1).__setitem__(3, float("-inf"))),
            ("weights-all-nan", lambda s: s[big].fill_(float("nan"))),
            ("tensor-missing", lambda s: s.pop(big)),
            ("tensor-extra", lambda s: s.__setitem__("model.layers.9.ghost.weight", torch.ones(4, 4))),
            ("tensor-wrong-shape", lambda s: s.__setitem__(big, s[big][:, :-1].clone())),
            ("tensor-int", lambda s: s.__setitem__(big, s[big].to(torch.int32))),
            ("tensor-float16", lambda s: s.__setitem__(big, s[big].half())),
            ("tensor-1d", lambda s: s.__setitem__(big, s[big].reshape(-1).clone())),
            ("all-tensors-missing", lambda s: s.clear())):
        s = {k: v.clone() for k, v in state.items()}
        edit(s)
        out.append((label, {"model.safetensors": st_save(s, metadata={"format": "pt"}) if s else
                            st_save({"x": torch.zeros(1)}, metadata={"format": "pt"})}))
    h, body = st_split(weights)
    k0 = next(k for k in h if k != "__metadata__")
    for label, edit in (("st-offset-past-end", lambda hh: hh[k0].__setitem__("data_offsets", [0, len(body) * 2])),
                        ("st-shape-huge", lambda hh: hh[k0].__setitem__("shape", [2**33, 2**33])),
                        ("st-dtype-unknown", lambda hh: hh[k0].__setitem__("dtype", "Z7"))):
        hh = json.loads(json.dumps(h))
        edit(hh)
        out.append((label, {"model.safetensors": st_join(hh, body)}))
    b = bytearray(weights)
    b[:8] = struct.pack("<Q", 2**62)
    out.append(("st-header-length-huge", {"model.safetensors": bytes(b)}))
    for k in range(6):
        b = bytearray(weights)
        b[rng.randrange(8, n)] ^= 1 << rng.randrange(8)
        out.append((f"flip-st-header-{k}", {"model.safetensors": bytes(b)}))
    # pickled weights instead of safetensors: squash must refuse them, never unpickle
    import pickle

    bomb = pickle.dumps({"model.embed_tokens.weight": "never unpickle me"})
    out.append(("pickle-only", {"model.safetensors": None, "pytorch_model.bin": bomb}))
    out.append(("tokenizer-broken", {"tokenizer.json": b"{\"version\": \"1.0\", \"model\": 5}"}))
    out.append(("tokenizer-missing", {"tokenizer.json": None, "tokenizer_config.json": None}))
    out.append(("generation-config-broken", {"generation_config.json": b"{{{"}))
    return out


RECIPE_BASE = {"quantize": {"bits": 8, "block": "channel", "symmetric": True, "rounding": "nearest"}}


def recipe_cases() -> list[tuple[str, bytes]]:
    """Recipes with every invalid value squash's steps can be given (from each step's own fields)."""
    from dataclasses import fields as dc_fields

    from squash.steps import STEPS

    bad_values = [-1, 0, 1e30, -1e30, "nan", "inf", "x", True, [1], {"a": 1}, 2**63, 10**400]
    out = []

    def toml_value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, float):
            return repr(v) if v == v else "nan"
        if isinstance(v, list):
            return "[" + ", ".join(toml_value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
        return str(v)

    seen = set()
    for step, cls in sorted(STEPS.items()):
        for f in dc_fields(cls):
            if f.name.startswith("_"):
                continue
            for v in bad_values:
                text = f'name = "bad"\n[[steps]]\nstep = "{step}"\n{f.name} = {toml_value(v)}\n'
                if text not in seen:
                    seen.add(text)
                    out.append((f"{step}.{f.name}={toml_value(v)[:20]}", text.encode()))
    for label, text in (
            ("empty", ""), ("no-steps", 'name = "x"\n'), ("steps-not-array", 'steps = 3\n'),
            ("steps-table", '[steps]\nstep = "quantize"\n'), ("step-missing", '[[steps]]\nbits = 8\n'),
            ("step-unknown", '[[steps]]\nstep = "sharpen"\n'), ("step-number", '[[steps]]\nstep = 8\n'),
            ("unknown-key", '[[steps]]\nstep = "quantize"\ncolour = "red"\n'),
            ("top-unknown-key", 'flavour = 1\n[[steps]]\nstep = "quantize"\n'),
            ("name-number", 'name = 5\n[[steps]]\nstep = "quantize"\n'),
            ("version-future", 'version = 99\n[[steps]]\nstep = "quantize"\n'),
            ("exclude-string", 'exclude = "fc1"\n[[steps]]\nstep = "quantize"\n'),
            ("exclude-numbers", 'exclude = [1, 2]\n[[steps]]\nstep = "quantize"\n'),
            ("min-weights-negative", 'min_weights = -1\n[[steps]]\nstep = "quantize"\n'),
            ("min-weights-string", 'min_weights = "lots"\n[[steps]]\nstep = "quantize"\n'),
            ("layers-not-tables", 'layers = [1]\n[[steps]]\nstep = "quantize"\n'),
            ("layers-no-match", '[[steps]]\nstep = "quantize"\n[[layers]]\n[[layers.steps]]\nstep = "quantize"\n'),
            ("layers-bad-step", '[[steps]]\nstep = "quantize"\n[[layers]]\nmatch = "fc1"\n[[layers.steps]]\n'
                                'step = "quantize"\nbits = 99\n'),
            ("order-entropy-first", '[[steps]]\nstep = "entropy"\n[[steps]]\nstep = "quantize"\n'),
            ("twice-quantize", '[[steps]]\nstep = "quantize"\n[[steps]]\nstep = "quantize"\n'),
            ("invalid-toml", 'steps = [\n'), ("duplicate-key", 'name = "a"\nname = "b"\n'),
            ("nul-bytes", 'name = "a\x00"\n'), ("huge-string", 'name = "' + "x" * 200000 + '"\n[[steps]]\nstep = "quantize"\n'),
            ("deep-nesting", "a = " + "[" * 5000 + "]" * 5000 + "\n")):
        out.append((label, text.encode()))
    out.append(("non-utf8", b"\xff\xfe\x00name"))
    return out


def build_cases(seeds: dict[str, Path], seed: int = 0) -> list[Case]:
    rng = random.Random(seed)
    cases: list[Case] = []
    for key in ("digits-int8", "digits-entropy", "digits-lowrank", "digits-2of4", "llama"):
        lm = key == "llama"
        data = seeds[key].read_bytes()
        cmds = ["inspect", "eval", "generate", "export-gguf", "export-onnx"] if lm else ["inspect", "eval", "export-onnx"]
        for label, bad in squash_cases(key, data, rng, lm):
            cmd = rng.choice(cmds) if not label.startswith(("truncate", "empty", "garbage")) else cmds[len(cases) % len(cmds)]
            argv = SQUASH_COMMANDS[cmd]("in.squash", lm)
            if lm and cmd == "eval":
                argv = ["eval", "in.squash", "--quick", "--json", "--against", "model"]
            cases.append(Case(f"{key}/{label}/{cmd}", argv, files={"in.squash": bad}, output=OUTPUTS.get(cmd),
                              copies={"model": seeds["llama-dir"]} if lm and cmd == "eval" else {}))
    gguf = seeds["gguf"].read_bytes()
    squash_llama = seeds["llama"].read_bytes()
    for label, bad in gguf_cases(gguf, rng):
        which = rng.random()
        if which < 0.6:
            cases.append(Case(f"gguf/{label}/compress", ["compress", "in.gguf", "-o", "out.squash", "--quick", "--json"],
                              files={"in.gguf": bad}, output="out.squash"))
        elif which < 0.8:
            cases.append(Case(f"gguf/{label}/export-metadata-from",
                              ["export", "model.squash", "--to", "gguf", "-o", "out.gguf", "--metadata-from", "in.gguf"],
                              files={"in.gguf": bad, "model.squash": squash_llama}, output="out.gguf"))
        else:
            cases.append(Case(f"gguf/{label}/curve", ["curve", "in.gguf", "--sweep", "quantize.bits=8", "--quick",
                                                      "--json", "--out", "curve"],
                              files={"in.gguf": bad}, output="curve"))
    for label, changes in hf_cases(seeds["llama-dir"], rng):
        verb = "curve" if rng.random() < 0.2 else "compress"
        argv = (["compress", "model", "-o", "out.squash", "--quick", "--json"] if verb == "compress" else
                ["curve", "model", "--sweep", "quantize.bits=8", "--quick", "--json", "--out", "curve"])
        cases.append(Case(f"hf/{label}/{verb}", argv, copies={"model": seeds["llama-dir"]},
                          files={f"model/{k}": v for k, v in changes.items()},
                          output="out.squash" if verb == "compress" else "curve"))
    for label, text in recipe_cases():
        verb = "curve" if rng.random() < 0.1 else "compress"
        argv = (["compress", "digits-cnn", "--recipe", "r.toml", "-o", "out.squash", "--quick", "--json"]
                if verb == "compress" else ["curve", "digits-cnn", "--recipe", "r.toml", "--sweep", "quantize.bits=8",
                                            "--quick", "--json", "--out", "curve"])
        cases.append(Case(f"recipe/{label}/{verb}", argv, files={"r.toml": text},
                          output="out.squash" if verb == "compress" else "curve"))
    cases += misuse_cases(seeds)
    return cases


# A folder that cannot be written: the case folder made read-only, or, for root (whom permissions do not stop),
# /proc, a filesystem no one can create files in.
READONLY = "/proc" if os.geteuid() == 0 else "."


def misuse_cases(seeds: dict[str, Path]) -> list[Case]:
    sq = seeds["llama"].read_bytes()
    dig = seeds["digits-int8"].read_bytes()
    c = [
        Case("misuse/export-onto-input", ["export", "in.squash", "--to", "gguf", "-o", "in.squash"], {"in.squash": sq}),
        Case("misuse/export-onto-input-gguf-name", ["export", "in.squash", "--to", "onnx", "-o", "in.squash"],
             {"in.squash": dig}),
        Case("misuse/compress-onto-input", ["compress", "in.squash", "-o", "in.squash", "--quick"], {"in.squash": dig}),
        Case("misuse/compress-gguf-onto-itself", ["compress", "in.gguf", "-o", "in.gguf"],
             {"in.gguf": seeds["gguf"].read_bytes()}),
        Case("misuse/output-is-folder", ["compress", "digits-cnn", "-o", "out.squash", "--quick"],
             {"out.squash/keep": b"x"}),
        Case("misuse/output-folder-missing", ["compress", "digits-cnn", "-o", "nowhere/out.squash", "--quick"]),
        Case("misuse/output-parent-is-file", ["compress", "digits-cnn", "-o", "file/out.squash", "--quick"],
             {"file": b"x"}),
        Case("misuse/output-wrong-suffix", ["compress", "digits-cnn", "-o", "out.txt", "--quick"]),
        Case("misuse/output-readonly-folder", ["compress", "digits-cnn", "-o", f"{READONLY}/out.squash", "--quick"],
             setup="readonly"),
        Case("misuse/export-readonly-folder", ["export", "in.squash", "--to", "onnx", "-o", f"{READONLY}/out.onnx"],
             {"in.squash": dig}, setup="readonly"),
        Case("misuse/export-gguf-of-a-cnn", ["export", "in.squash", "--to", "gguf", "-o", "out.gguf"], {"in.squash": dig}),
        Case("misuse/export-type-for-onnx", ["export", "in.squash", "--to", "onnx", "-o", "o.onnx", "--type", "q8_0"],
             {"in.squash": dig}),
        Case("misuse/export-existing-output", ["export", "in.squash", "--to", "onnx", "-o", "out.onnx"],
             {"in.squash": dig, "out.onnx": b"an older export"}, output="out.onnx"),
        Case("misuse/compress-existing-output", ["compress", "digits-cnn", "-o", "out.squash", "--quick", "--json"],
             {"out.squash": dig}, output="out.squash"),
        Case("misuse/eval-a-folder", ["eval", "."]),
        Case("misuse/inspect-missing", ["inspect", "nothing.squash"]),
        Case("misuse/inspect-dev-null", ["inspect", "/dev/null"]),
        Case("misuse/inspect-a-gguf", ["inspect", "in.gguf"], {"in.gguf": seeds["gguf"].read_bytes()}),
        Case("misuse/generate-negative-tokens", ["generate", "in.squash", "hi", "--max-new-tokens", "-5"], {"in.squash": sq}),
        Case("misuse/generate-nan-temperature", ["generate", "in.squash", "hi", "--temperature", "nan"], {"in.squash": sq}),
        Case("misuse/generate-huge-tokens", ["generate", "in.squash", "hi", "--max-new-tokens", str(10**12)], {"in.squash": sq}),
        Case("misuse/generate-cnn", ["generate", "in.squash", "hi"], {"in.squash": dig}),
        Case("misuse/unknown-flag", ["compress", "digits-cnn", "--colour"]),
        Case("misuse/no-command", []),
        Case("misuse/curve-bad-sweep", ["curve", "digits-cnn", "--sweep", "quantize.bits=a,b", "--out", "c"]),
        Case("misuse/curve-unknown-step", ["curve", "digits-cnn", "--sweep", "sharpen.bits=4", "--out", "c"]),
        Case("misuse/curve-out-is-file", ["curve", "digits-cnn", "--sweep", "quantize.bits=8", "--out", "f", "--quick"],
             {"f": b"x"}),
        Case("misuse/curve-negative-budget", ["curve", "digits-cnn", "--budget-bpw", "-3", "--out", "c"]),
        Case("misuse/curve-nan-budget", ["curve", "digits-cnn", "--budget-mb", "nan", "--out", "c"]),
    ]
    return c


# ------------------------------------------------------------------ running


def _snapshot(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(folder)) + "/"] = "dir"
    return out


def prepare(case: Case, folder: Path) -> None:
    if folder.exists():
        _make_writable(folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name, src in case.copies.items():
        shutil.copytree(src, folder / name)
    for name, data in case.files.items():
        p = folder / name
        if data is None:
            p.unlink(missing_ok=True)
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    if case.setup == "readonly":
        folder.chmod(0o555)


def _make_writable(folder: Path) -> None:
    for p in [folder, *folder.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)


class Worker:
    """A `python bench/fuzz.py --worker` process that runs cases one by one (JSON lines in and out)."""

    def __init__(self, env: dict):
        self.env = env
        self.log = open(env["SQUASH_FUZZ_LOG"], "ab")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-X", "faulthandler", __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, env=self.env, cwd=ROOT)

    def run(self, argv: list[str], cwd: Path, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write((json.dumps({"argv": argv, "cwd": str(cwd)}) + "\n").encode())
        self.proc.stdin.flush()
        t0 = time.time()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.kill()
            return {"status": "hang", "seconds": time.time() - t0}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.proc = None
            return {"status": "crash", "returncode": code, "seconds": time.time() - t0}
        return json.loads(line)

    def kill(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
            self.proc = None


def worker_main() -> None:
    """Serve cases: run squash.cli.main(argv) in the case's folder and answer one JSON line per case."""
    real_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything native code prints goes to the log, not into the answers
    from squash.cli import main

    for line in sys.stdin:
        req = json.loads(line)
        os.chdir(req["cwd"])
        out, err = io.StringIO(), io.StringIO()
        t0 = time.time()
        status, code, tb = "ok", None, None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(req["argv"])
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 2
            except BaseException:
                status, tb = "traceback", traceback.format_exc()
        os.chdir(ROOT)
        real_out.write(json.dumps({"status": status, "returncode": code, "stdout": out.getvalue()[-4000:],
                                   "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                   "stderr": err.getvalue()[-4000:], "traceback": tb,
                                   "seconds": time.time() - t0}) + "\n")
        real_out.flush()


def _message(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def judge(case: Case, result: dict, before: dict, after: dict, cache_left: list[str]) -> dict:
    """The case's verdict: which of the summary's counters it adds to."""
    bad = {}
    status = result["status"]
    if status == "hang":
        bad["hang"] = True
    elif status == "crash" or (status == "ok" and result["returncode"] not in OK_CODES):
        bad["crash"] = True
    elif status == "traceback":
        bad["traceback"] = True
    ok = status == "ok" and result["returncode"] == 0
    new = [k for k in after if k not in before]
    if ok and case.output:
        new = [k for k in new if not (k == case.output or k.startswith(case.output + "/") or k == case.output + "/")]
    if new or cache_left:
        bad["left"] = new + cache_left
    changed = [k for k in before if k in after and after[k] != before[k] and not (ok and k == case.output)]
    gone = [k for k in before if k not in after and not (ok and k == case.output)]
    if changed or gone:
        bad["modified"] = changed + gone
    if status == "ok" and result["returncode"] not in (0, None):
        lines = [ln for ln in result["stderr"].strip().splitlines() if ln.strip()]
        usage = result["stderr"].lstrip().startswith("usage:")
        if not lines or (len(lines) != 1 and not usage) or not lines[-1].lstrip().startswith(("error", "squash")):
            bad["multiline"] = lines[:6]
    return bad


def run_cases(cases: list[Case], workdir: Path, timeout: float = TIMEOUT_S, reruns: bool = True,
              progress=None) -> dict:
    env = dict(os.environ, SQUASH_CACHE=str(workdir / "cache"), SQUASH_FUZZ_LOG=str(workdir / "worker.log"),
               PYTHONHASHSEED="0", TQDM_DISABLE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    kernels = _user_cache() / "kernels"
    if kernels.is_dir() and not (workdir / "cache" / "kernels").exists():  # squash's compiled kernels: built once
        shutil.copytree(kernels, workdir / "cache" / "kernels", symlinks=True)
    worker = Worker(env)
    rows = []
    counters = {k: 0 for k in ("crash", "traceback", "hang", "left", "modified", "multiline", "memory", "rerun")}
    cache = workdir / "cache"
    t_start = time.time()
    try:
        for i, case in enumerate(cases):
            answers = []
            for attempt in range(2 if reruns else 1):
                folder = workdir / "cases" / f"{i:04d}"
                prepare(case, folder)
                before = _snapshot(folder)
                result = worker.run(case.argv, folder, timeout)
                _make_writable(folder)
                after = _snapshot(folder)
                cache_left = _stale(cache)
                for p in cache_left:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                cache_left = [str(p.relative_to(workdir)) for p in cache_left]
                verdict = judge(case, result, before, after, cache_left)
                if result.get("max_rss_mb", 0) > MAX_RSS_MB:
                    verdict["memory"] = round(result["max_rss_mb"])
                out_hash = after.get(case.output) if case.output else None
                failed = result.get("returncode") not in (0, None)
                answers.append((result.get("returncode"),
                                _message(result.get("stderr", "")).replace(str(folder), "CASE") if failed else "",
                                out_hash if case.output and case.output.endswith(".squash") else None))
                if attempt == 0:
                    row = {"case": case.name, "argv": case.argv, "status": result["status"],
                           "returncode": result.get("returncode"), "message": _message(result.get("stderr", "")),
                           "seconds": round(result.get("seconds", 0), 3), "max_rss_mb": round(result.get("max_rss_mb", 0)),
                           **({"bad": verdict} if verdict else {})}
                    if result.get("traceback"):
                        row["traceback"] = result["traceback"][-3000:]
                if result["status"] in ("hang", "crash"):
                    break
            if reruns and len(answers) == 2 and answers[0] != answers[1]:
                row.setdefault("bad", {})["rerun"] = [list(a) for a in answers]
            for k in row.get("bad", {}):
                counters[k] += 1
            rows.append(row)
            if progress:
                progress(i + 1, len(cases), case.name, row)
    finally:
        worker.close() if worker.proc and worker.proc.poll() is None else None
    return {"cases": len(cases), **counters, "seconds": round(time.time() - t_start, 1), "rows": rows}


def _user_cache() -> Path:
    from squash.models import cache_dir

    return cache_dir()


def _stale(cache: Path) -> list[Path]:
    """Temporary files and folders (squash names them with a leading dot) left in the cache; the compiled
    kernels' build logs are the compiler's, not squash's."""
    if not cache.exists():
        return []
    return [p for p in cache.glob("**/.*") if "kernels" not in p.relative_to(cache).parts]


def summary_line(s: dict) -> str:
    return (f"{s['cases']} cases: {s['crash']} crashes, {s['traceback']} tracebacks, {s['hang']} hangs, "
            f"{s['left']} left files behind, {s['modified']} modified inputs, {s['multiline']} errors not one line, "
            f"{s['memory']} over {MAX_RSS_MB} MB, {s['rerun']} nondeterministic reruns ({s['seconds']:.0f} s)")


def select_slice(cases: list[Case], n: int, seed: int) -> list[Case]:
    """n cases spread over every family (seeded)."""
    rng = random.Random(seed)
    families: dict[str, list[Case]] = {}
    for c in cases:
        families.setdefault(c.name.split("/")[0], []).append(c)
    picked = []
    per = max(1, n // len(families))
    for fam in families.values():
        picked += rng.sample(fam, min(per, len(fam)))
    return picked[:n]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--slice", type=int, help="run a seeded slice of N cases spread over every family")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", help="run the cases whose name contains this text")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a fresh one under /tmp)")
    p.add_argument("--no-rerun", action="store_true", help="run each case once (no determinism check)")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S)
    args = p.parse_args(argv)
    if args.worker:
        worker_main()
        return 0
    import tempfile

    from rich.console import Console

    console = Console(stderr=True)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="squash-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with console.status("writing the seed files"):
        seeds = make_seeds(workdir / "seeds")
    cases = build_cases(seeds, args.seed)
    if args.only:
        cases = [c for c in cases if args.only in c.name]
    if args.slice:
        cases = select_slice(cases, args.slice, args.seed)

    def progress(done, total, name, row):
        flag = " ".join(row.get("bad", {})) or ""
        console.print(f"[{done}/{total}] {row['status']:9} rc={row['returncode']} {row['seconds']:6.2f}s {name} "
                      f"{flag}", markup=False, highlight=False)

    summary = run_cases(cases, workdir, args.timeout, reruns=not args.no_rerun, progress=progress)
    line = summary_line(summary)
    print(line)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    if not args.slice and not args.only:
        from results_dir import RESULTS

        RESULTS.mkdir(parents=True, exist_ok=True)
        rows = [{k: (v[:300] if isinstance(v, str) else v) for k, v in r.items() if k != "traceback"}
                for r in summary["rows"]]
        (RESULTS / "fuzz.json").write_text(json.dumps({**summary, "rows": rows}, separators=(",", ":")) + "\n")
        fam: dict[str, dict] = {}
        for r in summary["rows"]:
            f = fam.setdefault(r["case"].split("/")[0], {"cases": 0, "refused": 0, "ran": 0, "bad": 0})
            f["cases"] += 1
            f["refused" if r["returncode"] not in (0, None) else "ran"] += 1
            f["bad"] += bool(r.get("bad"))
        md = ["# squash fuzz corpus (`python bench/fuzz.py`)", "", line, "",
              "| family | cases | refused with one error line | ran to the end | problems |", "|---|---|---|---|---|"]
        md += [f"| {k} | {v['cases']} | {v['refused']} | {v['ran']} | {v['bad']} |" for k, v in fam.items()]
        (RESULTS / "fuzz.md").write_text("\n".join(md) + "\n")
    bad = [r for r in summary["rows"] if r.get("bad")]
    for r in bad[:30]:
        console.print(f"{r['case']}: {r['bad']} {r['message'][:200]}", markup=False, highlight=False)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
