"""Bounded checks of a file's layout before any reader trusts it: GGUF (check_gguf) and safetensors
(check_safetensors), the two containers squash reads from strangers (.squash files are safetensors too).

Safetensors is: a u64 little-endian header length N, N bytes of JSON {name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {str: str}}, then the data. The safetensors library validates this too; checking
it here first gives the same message on every run (the library names whichever tensor its hash map visits first)
and keeps the bound explicit: the header may not exceed the file or 100 MB, every extent must be dtype size ×
shape, and the extents must tile the data section exactly.

GGUF:

GGUF (llama.cpp's format, versions 2 and 3) is: magic "GGUF", u32 version, u64 tensor count, u64 key-value count;
the key-values (a string key, a u32 type, a value; strings are a u64 length and bytes; arrays a u32 item type, a
u64 count and the items); the tensor infos (a string name, u32 n_dims, u64 dims, u32 ggml type, u64 offset into
the data section); padding to `general.alignment` (32 by default); the tensor data.

Readers that trust those numbers can be driven to allocate terabytes or loop for hours (llama.cpp's parser has had
heap-overflow CVEs from such fields). Here every length and count is checked against the bytes left in the file
before it is used, so the walk reads at most the file and takes time linear in its size; tensor extents are checked
to lie inside the data section, aligned and without overlap. A file that passes is then read by `gguf`/transformers.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path

from squash.errors import FormatError

SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType → bytes
STRING, ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS


class _Cursor:
    def __init__(self, data: memoryview, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise FormatError(f"{self.path}: truncated or corrupt GGUF ({what} needs {n:,} bytes at offset "
                              f"{self.pos:,}; the file has {len(self.data) - self.pos:,} left)")

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        value = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self, what: str) -> bytes:
        n = self.unpack("<Q", f"the length of {what}")
        self.need(n, what)
        s = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return s


def check_gguf(path: str | os.PathLike) -> dict:
    """Raise FormatError unless `path` is a structurally sound GGUF file; returns a small summary
    ({"version", "tensors", "kv", "architecture", "elements": the weights its tensors hold})."""
    import gguf

    path = Path(path)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 24 or f.read(4) != b"GGUF":
                f.seek(0)
                if f.read(4) != b"GGUF":
                    raise FormatError(f"{path}: not a GGUF file (no GGUF magic at the start)")
                raise FormatError(f"{path}: truncated GGUF file ({os.fstat(f.fileno()).st_size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:  # mapped, never read whole
                view = memoryview(mapped)
                try:
                    return _walk(_Cursor(view, path), gguf)
                finally:
                    view.release()
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from e


def _walk(c: "_Cursor", gguf) -> dict:
    path, data = c.path, c.data
    c.pos = 4
    version = c.unpack("<I", "the version")
    if version not in (2, 3):
        raise FormatError(f"{path}: GGUF version {version}; squash reads versions 2 and 3")
    n_tensors, n_kv = c.unpack("<QQ", "the counts")
    # every key-value takes at least 8 + 4 + 1 bytes and every tensor info at least 8 + 4 + 4 + 8
    if n_kv * 13 > len(data) or n_tensors * 24 > len(data):
        raise FormatError(f"{path}: corrupt GGUF header ({n_kv:,} key-values and {n_tensors:,} tensors cannot fit "
                          f"in {len(data):,} bytes)")
    keys: dict[str, object] = {}
    for i in range(n_kv):
        key = _text(c.string(f"key {i}"), path, f"key {i}")
        if key in keys:
            raise FormatError(f"{path}: corrupt GGUF header (key {key!r} appears twice)")
        keys[key] = _value(c, c.unpack("<I", f"the type of {key}"), key, top=True)
    alignment = keys.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
        raise FormatError(f"{path}: corrupt GGUF header (general.alignment {alignment!r} is not a power of two)")
    sizes = gguf.GGML_QUANT_SIZES
    infos, names, elements = [], set(), 0
    for i in range(n_tensors):
        name = _text(c.string(f"tensor name {i}"), path, f"tensor name {i}")
        if name in names:
            raise FormatError(f"{path}: corrupt GGUF header (tensor {name!r} appears twice)")
        names.add(name)
        n_dims = c.unpack("<I", f"the dimension count of {name}")
        if n_dims > MAX_DIMS:
            raise FormatError(f"{path}: corrupt GGUF tensor {name!r} ({n_dims} dimensions; at most {MAX_DIMS})")
        dims = [c.unpack("<Q", f"a dimension of {name}") for _ in range(n_dims)]
        if any(d >= 1 << 62 for d in dims) or math.prod(dims) >= 1 << 62:
            raise FormatError(f"{path}: corrupt GGUF tensor {name!r} (dimensions {dims})")
        ttype, offset = c.unpack("<IQ", f"the type and offset of {name}")
        try:
            block, type_size = sizes[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise FormatError(f"{path}: GGUF tensor {name!r} has unknown type {ttype}") from None
        n = math.prod(dims)
        if dims and dims[0] % block:
            raise FormatError(f"{path}: corrupt GGUF tensor {name!r} (a row of {dims[0]} is not whole blocks of {block})")
        infos.append((name, offset, n // block * type_size))
        elements += n
    start = c.pos + (-c.pos % alignment)
    data_size = len(data) - start
    end = 0
    for name, offset, nbytes in sorted(infos, key=lambda t: t[1]):
        if offset % alignment:
            raise FormatError(f"{path}: corrupt GGUF tensor {name!r} (offset {offset} not aligned to {alignment})")
        if offset < end:
            raise FormatError(f"{path}: corrupt GGUF tensor {name!r} (its data overlaps another tensor's)")
        if offset + nbytes > data_size:
            raise FormatError(f"{path}: truncated or corrupt GGUF (tensor {name!r} needs bytes {offset:,} to "
                              f"{offset + nbytes:,} of a data section of {max(data_size, 0):,})")
        end = offset + nbytes
    arch = keys.get("general.architecture")
    return {"version": version, "tensors": n_tensors, "kv": n_kv, "architecture": arch, "elements": elements}


ST_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
             "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
             "F64": 8, "C64": 8}  # (F4, two per byte, is not read here)
MAX_ST_HEADER = 100_000_000  # the safetensors library's own limit


def check_safetensors(path: str | os.PathLike) -> dict:
    """Raise FormatError unless `path` is a well-formed safetensors file; returns its parsed header."""
    import json

    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: truncated ({size} bytes; not a safetensors file)")
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, MAX_ST_HEADER):
                raise FormatError(f"{path}: truncated or not a safetensors file (a header of {n:,} bytes in a file "
                                  f"of {size:,})")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise FormatError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    extents = []
    for name in sorted(k for k in header if k != "__metadata__"):
        e = header[name]
        if not isinstance(e, dict) or e.get("dtype") not in ST_DTYPES:
            raise FormatError(f"{path}: corrupt safetensors entry {name!r} (unknown dtype)")
        shape, offsets = e.get("shape"), e.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62
                                                 for d in shape)):
            raise FormatError(f"{path}: corrupt safetensors entry {name!r} (shape {shape!r})")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise FormatError(f"{path}: corrupt safetensors entry {name!r} (data_offsets {offsets!r})")
        if offsets[1] - offsets[0] != math.prod(shape) * ST_DTYPES[e["dtype"]]:
            raise FormatError(f"{path}: corrupt safetensors entry {name!r} (its extent does not fit its shape)")
        extents.append((offsets[0], offsets[1], name))
    pos = 0
    for begin, end, name in sorted(extents):
        if begin != pos:
            raise FormatError(f"{path}: corrupt safetensors entry {name!r} (its data "
                              f"{'overlaps another' if begin < pos else 'leaves a gap'})")
        pos = end
    if pos != size - 8 - n:
        raise FormatError(f"{path}: truncated or corrupt safetensors file (the tensors cover {pos:,} bytes, "
                          f"the data section has {size - 8 - n:,})")
    return header


def _text(raw: bytes, path: Path, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{path}: corrupt GGUF header ({what} is not UTF-8)") from None


def _value(c: _Cursor, vtype: int, key: str, top: bool):
    """Read one value; scalars are returned (for general.alignment and the architecture), arrays skipped over."""
    if vtype in SCALARS:
        fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
        if vtype == 7:
            c.need(1, key)
            if c.data[c.pos] > 1:
                raise FormatError(f"{c.path}: corrupt GGUF value for {key!r} (a bool of {c.data[c.pos]})")
        return c.unpack(fmt[vtype], key)
    if vtype == STRING:
        return _text(c.string(key), c.path, f"the value of {key!r}")
    if vtype == ARRAY and top:
        item = c.unpack("<I", f"the item type of {key}")
        count = c.unpack("<Q", f"the length of {key}")
        if item in SCALARS:
            c.need(count * SCALARS[item], f"{count:,} items of {key}")
            c.pos += count * SCALARS[item]
            return None
        if item == STRING:
            c.need(count * 8, f"{count:,} strings of {key}")
            for _ in range(count):
                n = c.unpack("<Q", f"a string length in {key}")
                c.need(n, f"a string in {key}")
                c.pos += n
            return None
        raise FormatError(f"{c.path}: corrupt GGUF value for {key!r} (arrays of type {item} are not supported)")
    raise FormatError(f"{c.path}: corrupt GGUF value for {key!r} (unknown type {vtype})")
