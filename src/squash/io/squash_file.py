"""The .squash file: a safetensors container for the arrays plus a JSON header (docs/FORMAT.md).

Anyone with safetensors can read it: the header is the metadata entry "squash", a JSON document; each
compressed tensor NAME stores NAME.codes (uint8, bit-packed), NAME.scale (and NAME.zero when asymmetric); float
tensors are stored under their own names. Writes are atomic: a temporary file in the target folder, then rename.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from squash import __version__
from squash.atomic import atomic_output
from squash.checks import check_safetensors
from squash.errors import FormatError, SquashError
from squash.entropy import CodedStream, coded_streams, decode, nibbles_to_mask
from squash.layers import Form, layer_form
from squash.models import KINDS, Model, rebuild, tokenizer_files
from squash.packing import pack_codes, packed_size, unpack_codes
from squash.recipe import _set_module, float_state
from squash.runtime.modules import CompressedWeight, compressed_module
from squash.tensor import CompressedTensor, matrix_shape

FORMAT_VERSION = 2  # 2: masks, pruned values, per-row grids, entropy-coded streams
MAGIC = "squash"
ASSET_PREFIX = "__asset__/"  # files the model needs to run (its tokenizer), stored as uint8 arrays


def arrays_of(model: Model) -> tuple[dict[str, torch.Tensor], dict]:
    """The arrays to store and the header describing them."""
    arrays, entries = {}, {}
    for name, ct in model.tensors.items():
        present = [f for f in CompressedTensor.ARRAYS if getattr(ct, f) is not None]
        arrays.update(tensor_arrays(name, ct))
        entries[name] = {"encoding": _encoding(ct), "shape": list(ct.shape), "bits": ct.bits,
                         "block": list(ct.block), "symmetric": ct.symmetric, "arrays": present,
                         "zero": None if ct.zero is None else ("float" if ct.zero.dtype.is_floating_point else "int"),
                         "zero_frac": ct.zero_frac, "stored_bytes": ct.stored_bytes(), "extra": ct.extra,
                         "kept": ct.kept, "entropy": ct.entropy}
    state, aliases = float_state(model.module)
    for name, t in state.items():
        arrays[name] = t.detach().contiguous()
    assets = model.assets or (tokenizer_files(model.tokenizer, model.module) if model.kind in ("causal-lm", "encoder")
                              else {})
    for name, data in assets.items():  # zlib: a tokenizer.json of 262k tokens is 33 MB of text, 7 MB coded
        arrays[ASSET_PREFIX + name] = torch.frombuffer(bytearray(zlib.compress(data, 6)), dtype=torch.uint8)
    header = {
        "format": MAGIC,
        "format_version": FORMAT_VERSION,
        "squash_version": __version__,
        "model": {"kind": model.kind, "name": model.name, "config": model.config},
        "source": model.source,
        "recipe": model.recipe,
        "tensors": entries,
        "tied": model.tied,
        "float": sorted(state),
        "float_aliases": aliases,
        "layers": model.layers,
        "assets": {name: "zlib" for name in sorted(assets)},
        "arrays_sha256": _digest(arrays),
    }
    return arrays, header


def tensor_arrays(name: str, ct: CompressedTensor) -> dict[str, torch.Tensor]:
    """The stored arrays of one tensor: codes of the kept weights bit-packed (or ANS-coded: .counts and .words),
    the mask as a bitmap (or ANS-coded nibbles), kept float values only, everything else as it is."""
    out = {}
    streams = coded_streams(ct) if ct.entropy else {}
    for f in CompressedTensor.ARRAYS:
        t = getattr(ct, f)
        if t is None:
            continue
        if f in streams:
            out[f"{name}.{f}.counts"] = torch.from_numpy(streams[f].counts.view(np.int32).copy())
            out[f"{name}.{f}.words"] = torch.from_numpy(streams[f].words.view(np.int32).copy())
            continue
        if f == "codes":
            t = pack_codes(t if ct.mask is None else t[ct.mask], ct.bits)
        elif f == "mask":
            t = pack_codes(t.to(torch.uint8), 1)
        elif f == "dense":
            t = t[ct.mask]
        elif f == "zero" and not t.dtype.is_floating_point:  # fixed-point zero points, packed like codes
            t = pack_codes(t, ct.bits + ct.zero_frac)
        out[f"{name}.{f}"] = t.contiguous()
    return out


def save(model: Model, path: str | os.PathLike) -> Path:
    """Write `model` (compressed) to `path` atomically; returns the path."""
    path = Path(path)
    if not model.compressed:
        raise SquashError("only a compressed model can be saved as .squash; run compress() first")
    if path.suffix != ".squash":
        raise SquashError(f"{path}: the output name must end in .squash")
    if not path.parent.is_dir():
        raise SquashError(f"{path.parent}: the output folder does not exist")
    arrays, header = arrays_of(model)
    with atomic_output(path) as tmp:
        save_file(arrays, tmp, metadata={MAGIC: json.dumps(header, allow_nan=False)})
    return path


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header alone, validated (format, version)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    meta = check_safetensors(path).get("__metadata__", {})  # the layout, bounded by the file, checked first
    if MAGIC not in meta:
        raise FormatError(f"{path}: a safetensors file without a squash header; not a .squash file")
    try:
        header = json.loads(meta[MAGIC])
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: corrupt squash header ({e})") from e
    if not isinstance(header, dict) or header.get("format") != MAGIC:
        raise FormatError(f"{path}: corrupt squash header (no format field)")
    version = header.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise FormatError(f"{path}: corrupt squash header (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise FormatError(f"{path}: written in .squash format {version}, newer than this squash reads "
                          f"({FORMAT_VERSION}); upgrade squash")
    problem = _header_problem(header)
    if problem:
        raise FormatError(f"{path}: corrupt squash header ({problem})")
    return header


def _header_problem(h: dict) -> str | None:
    """What is structurally wrong with a header, or None."""
    expect = {"model": dict, "source": dict, "tensors": dict, "tied": dict, "float": list, "float_aliases": dict}
    for key, kind in expect.items():
        if not isinstance(h.get(key), kind):
            return f"{key} must be a {kind.__name__}"
    if "recipe" not in h or not isinstance(h["recipe"], (dict, type(None))):
        return "recipe must be a table"
    if not isinstance(h.get("layers", {}), dict):
        return "layers must be a table"
    if not isinstance(h["model"].get("name", ""), str):
        return "model.name must be a string"
    if not isinstance(h["model"].get("kind"), str) or not isinstance(h["model"].get("config"), dict):
        return "model needs a kind and a config"
    for name, e in h["tensors"].items():
        if not isinstance(e, dict):
            return f"tensor {name!r} is not a table"
        shape, block, bits = e.get("shape"), e.get("block"), e.get("bits")
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
            return f"tensor {name!r} has no valid shape"
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            return f"tensor {name!r} has no valid block"
        if not (isinstance(bits, int) and 0 <= bits <= 8) or not isinstance(e.get("symmetric"), bool):
            return f"tensor {name!r} has invalid bits or symmetric"
        if e.get("encoding") not in ("uniform", "grid", "lowrank", "pruned"):
            return f"tensor {name!r} has unknown encoding {e.get('encoding')!r}"
        arrays = e.get("arrays", [])
        if not (isinstance(arrays, list) and set(arrays) <= set(CompressedTensor.ARRAYS)):
            return f"tensor {name!r} lists unknown arrays"
        if not isinstance(e.get("stored_bytes", 0), int) or not isinstance(e.get("extra", {}), dict):
            return f"tensor {name!r} has invalid stored_bytes or extra"
        kept, frac = e.get("kept", 0), e.get("zero_frac", 0)
        if not (isinstance(kept, int) and 0 <= kept <= math.prod(shape)) or not (isinstance(frac, int) and 0 <= frac <= 8):
            return f"tensor {name!r} has invalid kept or zero_frac"
    resized = h["model"]["config"].get("resized", {})
    if not (isinstance(resized, dict) and all(isinstance(v, list) and len(v) >= 2 and all(
            isinstance(d, int) and d > 0 for d in v) for v in resized.values())):
        return "model.config.resized must map layer names to weight shapes"
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in
               {**h["tied"], **h["float_aliases"], **h.get("layers", {})}.items()):
        return "tied, float_aliases and layers must map names to names"
    if not (isinstance(h.get("assets", {}), dict) and all(v == "zlib" for v in h.get("assets", {}).values())):
        return "assets must map file names to their encoding (zlib)"
    return None


def load_squash(path: str | os.PathLike, module: nn.Module | None = None) -> Model:
    """Rebuild a runnable compressed model from a .squash file (architecture from the stored config, or the
    given `module` skeleton for a plain torch module). Checks every array against the header's checksum."""
    path = Path(path)
    header = read_header(path)
    # a low-rank-only tensor stores rank·(rows + cols) values for rows·cols weights: allowed 16× the density
    weights = sum(math.prod(e["shape"]) / (16 if e["encoding"] == "lowrank" else 1) for e in header["tensors"].values())
    if weights > MAX_WEIGHTS_PER_BYTE * path.stat().st_size:  # before anything is allocated for them
        raise FormatError(f"{path}: the header describes {weights:,} weights, more than a file of "
                          f"{path.stat().st_size:,} bytes can hold; the file is corrupt")
    try:
        with safe_open(path, framework="pt") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FormatError(f"{path}: truncated or corrupt arrays ({_first_line(e)})") from e
    if _digest(arrays) != header.get("arrays_sha256"):
        raise FormatError(f"{path}: the arrays do not match the header's checksum; the file is corrupt")
    try:
        return _assemble(header, arrays, module)
    except SquashError as e:
        raise FormatError(f"{path}: {e}") from e
    except Exception as e:  # the file is untrusted: whatever its header makes the rebuild raise, one line
        raise FormatError(f"{path}: the header does not fit the arrays or the model ({_first_line(e)})") from e


# At least 1/8 bit per weight: 90% pruned and entropy-coded still costs ~0.5 bit. A header claiming more weights
# than that for its file's size would make a reader allocate memory the file cannot justify.
MAX_WEIGHTS_PER_BYTE = 64


def _assemble(header: dict, arrays: dict[str, torch.Tensor], module: nn.Module | None) -> Model:
    kind = header["model"]["kind"]
    if kind not in KINDS:
        raise FormatError(f"unknown model kind {kind!r} in the header")
    kept_float = set(header["float"])
    for name, t in arrays.items():  # a float buffer may hold -inf (a causal mask); nothing may hold NaN
        ok = (~torch.isnan(t)) if name in kept_float else torch.isfinite(t)
        if t.dtype.is_floating_point and not bool(ok.all()):
            raise FormatError(f"array {name!r} holds NaN or Inf; squash never writes those, the file is corrupt")
    if module is None:
        _check_rebuild_size(kind, header, arrays)
        module = rebuild(kind, header["model"]["config"])
    tensors = {name: _tensor_from(name, e, arrays) for name, e in header["tensors"].items()}
    weights = {name: CompressedWeight(ct) for name, ct in tensors.items()}
    for name, target in {**{n: n for n in tensors}, **header["tied"]}.items():
        if target not in weights:
            raise FormatError(f"tied weight {name!r} points at {target!r}, which is not stored")
        mod_name = name.removesuffix(".weight")
        try:
            original = module.get_submodule(mod_name)
        except AttributeError:
            raise FormatError(f"the file holds a weight for layer {mod_name!r}, which the model does not have") from None
        form = layer_form(original)
        stored = header["tensors"][target].get("extra", {}).get("form")  # absent: a plain layer (or an older file)
        if not isinstance(form, Form):
            raise FormatError(f"layer {mod_name!r} is a {type(original).__name__}, which squash cannot hold "
                              f"compressed ({form})")
        tied_pair = name != target and {form.kind, stored.get("kind") if stored else "linear"} <= {"linear", "embedding"}
        if isinstance(stored, dict) and form.kind != stored.get("kind") and not tied_pair:
            raise FormatError(f"layer {mod_name!r} is held as {stored.get('kind')} in the file but the model's "
                              f"{type(original).__name__} computes a {form.kind} layer")
        _set_module(module, mod_name, compressed_module(original, weights[target], form))
    state = {name: arrays[name] for name in header["float"]}
    for alias, stored in header["float_aliases"].items():
        state[alias] = state[stored]
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FormatError(f"the stored float tensors do not fit the model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    for p in module.parameters():
        p.requires_grad_(False)
    m = header["model"]
    assets = {name: _inflate(name, arrays[ASSET_PREFIX + name]) for name in header.get("assets", {})}
    return Model(module=module.eval(), kind=kind, name=m["name"], config=m["config"], source=header["source"],
                 tensors=tensors, tied=dict(header["tied"]), recipe=header["recipe"],
                 layers=dict(header.get("layers", {})), assets=assets)


def _check_rebuild_size(kind: str, header: dict, arrays: dict[str, torch.Tensor]) -> None:
    """The architecture the header's config describes, built on the meta device (no memory), must not need more
    parameters than the file stores: a hostile config (hidden size 2^20) is refused before it is allocated."""
    try:
        with torch.device("meta"):
            skeleton = rebuild(kind, header["model"]["config"])
    except SquashError:
        raise
    except Exception as e:
        if kind == "module":  # a user's constructor that cannot run on the meta device: built for real below
            return
        raise FormatError(f"the stored config cannot be built ({_first_line(e)})") from e
    need = sum(p.numel() for p in skeleton.parameters())
    have = sum(math.prod(e["shape"]) for e in header["tensors"].values())
    have += sum(arrays[n].numel() for n in header["float"] if n in arrays)
    if need > have:
        raise FormatError(f"the stored config describes {need:,} parameters but the file holds {have:,}")


MAX_ASSET_BYTES = 1 << 28


def _inflate(name: str, coded: torch.Tensor) -> bytes:
    """A stored asset decoded, refusing one that would inflate past MAX_ASSET_BYTES (a zlib bomb)."""
    d = zlib.decompressobj()
    try:
        data = d.decompress(coded.numpy().tobytes(), MAX_ASSET_BYTES)
    except zlib.error as e:
        raise FormatError(f"the stored file {name!r} cannot be decoded ({e})") from e
    if d.unconsumed_tail or not d.eof:
        raise FormatError(f"the stored file {name!r} is truncated or larger than {MAX_ASSET_BYTES >> 20} MB")
    return data


def _encoding(ct: CompressedTensor) -> str:
    if ct.codes is None:
        return "pruned" if ct.dense is not None else "lowrank"
    return "uniform" if ct.grid is None else "grid"


def _tensor_from(name: str, entry: dict, arrays: dict[str, torch.Tensor]) -> CompressedTensor:
    if entry.get("encoding") not in ("uniform", "grid", "lowrank", "pruned"):
        raise FormatError(f"tensor {name!r}: unknown encoding {entry.get('encoding')!r}")
    present = entry.get("arrays", ["codes", "scale"] + ([] if entry["symmetric"] else ["zero"]))
    unknown = set(present) - set(CompressedTensor.ARRAYS)
    if unknown:
        raise FormatError(f"tensor {name!r}: unknown array(s) {sorted(unknown)}")
    shape, bits = tuple(int(x) for x in entry["shape"]), int(entry["bits"])
    rows, cols = matrix_shape(shape)
    entropy = bool(entry.get("entropy", False))
    n = math.prod(shape)
    kept = int(entry.get("kept", n))
    fields = {f: arrays[f"{name}.{f}"] for f in present if f not in ("codes", "mask") or not entropy}
    for f, t in fields.items():
        want = (t.dtype == torch.uint8 if f in ("codes", "mask") or (f == "zero" and entry.get("zero") == "int")
                else t.dtype in (torch.int32, torch.int64) if f == "sparse_index" else t.dtype.is_floating_point)
        if not want:
            raise FormatError(f"tensor {name!r}: {f} is stored as {t.dtype}, which squash never writes")
    if entropy:
        for f in ("codes", "mask"):
            for part in ("counts", "words"):
                t = arrays.get(f"{name}.{f}.{part}")
                if f in present and (t is None or t.dtype != torch.int32 or t.dim() != 1):
                    raise FormatError(f"tensor {name!r}: the entropy-coded {f} needs a 1-d int32 {part} array")

    def stream(f: str) -> np.ndarray:
        alphabet = 16 if f == "mask" else 2**bits
        if arrays[f"{name}.{f}.counts"].numel() != alphabet:
            raise FormatError(f"tensor {name!r}: the {f} stream's count table does not have {alphabet} entries")
        try:
            return decode(CodedStream(arrays[f"{name}.{f}.counts"].numpy().view(np.uint32),
                                      arrays[f"{name}.{f}.words"].numpy().view(np.uint32),
                                      math.ceil(n / 4) if f == "mask" else kept))
        except KeyError:
            raise
        except Exception as e:  # the coder's own errors on a damaged stream
            raise FormatError(f"tensor {name!r}: the entropy-coded {f} cannot be decoded ({_first_line(e)})") from e

    mask = None
    if "mask" in present:
        mask = (nibbles_to_mask(stream("mask"), (rows, cols)) if entropy
                else unpack_codes(fields["mask"], 1, n).reshape(rows, cols).bool())
        if int(mask.sum()) != kept:
            raise FormatError(f"tensor {name!r}: the mask keeps {int(mask.sum())} weights, the header says {kept}")
        fields["mask"] = mask
    if "codes" in present:
        if entropy:
            codes = torch.from_numpy(stream("codes").astype(np.uint8))
        else:
            packed = fields["codes"]
            if packed.numel() != packed_size(kept, bits):
                raise FormatError(f"tensor {name!r}: {packed.numel()} code bytes do not fit {kept} weights at {bits} bits")
            codes = unpack_codes(packed, bits, kept)
        fields["codes"] = _scatter_kept(codes, mask, rows, cols)
    if "dense" in present:
        fields["dense"] = _scatter_kept(fields["dense"], mask, rows, cols)
    if entry.get("zero") == "int":
        n = fields["scale"].numel()
        fields["zero"] = unpack_codes(fields["zero"], bits + int(entry.get("zero_frac", 0)), n).reshape(fields["scale"].shape)
    fields.setdefault("codes", None)
    fields.setdefault("scale", None)
    _check_shapes(name, fields, shape, tuple(entry["block"]), bits)
    return CompressedTensor(shape=shape, bits=bits, block=tuple(entry["block"]), extra=entry.get("extra", {}),
                            zero_frac=int(entry.get("zero_frac", 0)), entropy=entropy, **fields)


def _scatter_kept(values: torch.Tensor, mask: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor:
    """Stored values of the kept weights → the (rows, cols) matrix, zero where pruned."""
    if mask is None:
        return values.reshape(rows, cols)
    if values.numel() != int(mask.sum()):
        raise FormatError(f"{values.numel()} stored values for {int(mask.sum())} kept weights")
    out = torch.zeros(rows, cols, dtype=values.dtype)
    out[mask] = values
    return out


def _check_shapes(name: str, f: dict, shape: tuple, block: tuple, bits: int) -> None:
    """Every array has the shape the header implies, so a damaged header fails here, not in a forward pass."""
    rows, cols = matrix_shape(shape)
    blocks = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    want = {"scale": blocks, "zero": blocks, "grid": (2**bits,), "col_scale": (cols,)}
    if f.get("grid") is not None and f["grid"].dim() == 2:
        want["grid"] = (rows, 2**bits)  # one grid per row
    for key, expected in want.items():
        if f.get(key) is not None and tuple(f[key].shape) != expected:
            raise FormatError(f"tensor {name!r}: {key} has shape {list(f[key].shape)}, expected {list(expected)}")
    if f["codes"] is not None and f["codes"].numel() and int(f["codes"].max()) >= 2**bits:
        raise FormatError(f"tensor {name!r}: a code does not fit in {bits} bits")
    if f["codes"] is not None and f["scale"] is None:
        raise FormatError(f"tensor {name!r}: codes without scales")
    if (f.get("u") is None) != (f.get("v") is None):
        raise FormatError(f"tensor {name!r}: a low-rank term needs both u and v")
    if f.get("u") is not None:
        k = f["u"].shape[-1]
        if tuple(f["u"].shape) != (rows, k) or tuple(f["v"].shape) != (k, cols):
            raise FormatError(f"tensor {name!r}: u, v shapes {list(f['u'].shape)}, {list(f['v'].shape)} do not fit {rows}×{cols}")
    idx = f.get("sparse_index")
    if idx is not None and (idx.numel() != f["sparse_value"].numel() or (idx.numel() and (idx.min() < 0 or idx.max() >= rows * cols))):
        raise FormatError(f"tensor {name!r}: sparse outliers point outside the tensor")


def _digest(arrays: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        t = arrays[name].detach().reshape(-1).contiguous()
        h.update(name.encode())
        h.update(f"{t.dtype}{list(arrays[name].shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
