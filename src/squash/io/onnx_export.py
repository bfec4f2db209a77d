"""Export a compressed squash model to ONNX with its weights stored as integers (docs/FORMAT.md, "ONNX export").

The float graph comes from torch's TorchScript exporter (`torch.onnx.export(..., dynamo=False)`) run on a copy of
the model in which every compressed layer holds its dequantized weight under a known name; the ONNX graph is then
rewritten so that each such weight is stored as integer codes again:

    8-bit codes (and 5–7-bit ones, widened to a byte)
        int8 (symmetric: c − 2^(b−1)) or uint8 codes with uint8 zero points → DequantizeLinear, per tensor,
        per output channel or blocked (opset 21 `block_size`); value = s·(c − z), exactly squash's.
        Embedding tables gather the rows' codes and scales first and dequantize only those rows.
    ≤ 4-bit codes, int4="auto"
        Linear → com.microsoft MatMulNBits (bits 4, or 2 for 2-bit codes; K padded to the block, the padding
        never read); Embedding → com.microsoft GatherBlockQuantized (uint4); Conv → uint4/int4 DequantizeLinear.
    ≤ 4-bit codes, int4="qdq"     int4/uint4 DequantizeLinear everywhere (standard opset-21 operators only)
    ≤ 4-bit codes, int4="uint8"   codes widened to int8/uint8 + DequantizeLinear (runtimes without int4 types)
    custom grids (nf4, log, k-means codebooks), fractional or float zero points that DequantizeLinear cannot hold,
    masks where pruned codes cannot be set to the zero point
        "uint8-codes-graph": the codes as uint8 plus a constant subgraph (Gather on the grid, Sub, Mul, Reshape,
        Slice) that computes s·(G[c] − z); ONNX Runtime folds it to float once, when the session loads.
    extra terms: column scales r, low-rank U·V and sparse outliers S
        on a Linear kept in activation space: x·r before the integer product, (x·Vᵀ)·Uᵀ and a Gather /
        ScatterElements(add) over the outliers' columns after it; elsewhere folded into the constant subgraph.
    pruned tensors without codes ("float16-dense") and pure low-rank factors ("lowrank-float") stay float.

Everything that was not compressed (biases, norms, excluded layers) stays float32. The returned summary says how
each compressed tensor was stored; nothing falls back silently.

ONNX Runtime note: with its default graph optimisations, ONNX Runtime rewrites DequantizeLinear → MatMul into its
own MatMulNBits with `accuracy_level` 4, which rounds the activations to int8 (about 0.5% relative error per
product). For weight-only results identical to squash's, set the session config entry
`session.qdq_matmulnbits_accuracy_level` = "0" (`session_options()` below does).
"""
from __future__ import annotations

import copy
import inspect
import io
import math
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from squash.atomic import write_atomic
from squash.errors import SquashError
from squash.models import Model
from squash.runtime.modules import QConv, QEmbedding, QLinear, quantize_activations
from squash.tensor import CompressedTensor

OPSET = 21  # blocked DequantizeLinear (block_size) and int4/uint4 types
EXPORT_OPSET = 20  # the highest the TorchScript exporter writes; the graph is then declared opset 21
INT4_MODES = ("auto", "qdq", "uint8")
EXACT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}
STUB = "squash_w"  # the parameter name each compressed layer's dequantized weight is exported under


# ---------------------------------------------------------------- public API


def export_onnx(model: Model, path: str | os.PathLike, *, int4: str = "auto") -> dict:
    """Write `model` (a compressed squash Model; a float one is exported all float) to `path` as ONNX.

    int4: how codes of 4 bits or fewer are stored: "auto" (ONNX Runtime's MatMulNBits / GatherBlockQuantized
    where they fit, int4 DequantizeLinear elsewhere), "qdq" (int4/uint4 DequantizeLinear only: standard
    operators) or "uint8" (widened to a byte, for runtimes without int4 types).

    Returns a summary: path, file_bytes, opset, int4, contrib_ops (whether com.microsoft operators are used),
    inputs, outputs, storage (count of compressed tensors per storage kind), tensors (per compressed tensor: kind,
    bits, shape, storage, extras, bytes in the file), float_bytes (the float initializers: biases, norms, layers
    left in float) and session_config (the onnxruntime config entries that keep the results exact).
    The file is written atomically (a temporary file in the target folder, then renamed)."""
    import onnx

    if int4 not in INT4_MODES:
        raise SquashError(f"int4 = {int4!r}: choose one of {', '.join(INT4_MODES)}")
    path = Path(path)
    if not path.parent.is_dir():
        raise SquashError(f"{path.parent}: the output folder does not exist")
    if model.kind == "causal-lm":
        raise SquashError(f"{model.name}: ONNX export supports encoder and classifier models, not causal-lm "
                          "(a generating language model needs a KV-cache graph squash does not write)")
    if model.kind == "module" and not (model.config or {}).get("input"):
        raise SquashError(f"{model.name}: squash does not know this module's input; load it with "
                          "squash.load(module, example_input=<one batch>) to export it")
    if model.kind not in ("encoder", "classifier", "module"):
        raise SquashError(f"{model.name}: ONNX export supports encoder, classifier and torch module models, not "
                          f"{model.kind!r}")

    wrapper, args, names, dynamic = _export_module(model)
    stubs = _install_stubs(wrapper)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, args, buf, dynamo=False, opset_version=EXPORT_OPSET,
                              input_names=names["inputs"], output_names=names["outputs"], dynamic_axes=dynamic,
                              do_constant_folding=True)
    except Exception as e:  # the exporter raises many types on a module it cannot trace
        raise SquashError(f"{model.name}: torch.onnx.export failed ({_first_line(e)})") from e
    proto = onnx.load_from_string(buf.getvalue())
    graph = _Graph(proto)
    report = {}
    for init_name, (tensor_name, kind, stub) in stubs.items():
        report[tensor_name] = _rewrite(graph, init_name, tensor_name, kind, stub, int4)
    graph.finish()

    others = [o for o in proto.opset_import if o.domain not in ("", "ai.onnx", "com.microsoft")]
    del proto.opset_import[:]
    proto.opset_import.extend(others)
    proto.opset_import.append(onnx.helper.make_opsetid("", OPSET))
    if graph.contrib:
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    proto.ir_version = max(proto.ir_version, 10)
    proto.producer_name = "squash"
    meta = {"squash.source": model.source.get("name", model.name),
            "squash.recipe": (model.recipe or {}).get("name", "float"), "squash.int4": int4}
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=str(v))
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise SquashError(f"{model.name}: the rewritten ONNX graph does not validate ({_first_line(e)})") from e

    data = proto.SerializeToString()
    _atomic_write(path, data)
    float_bytes = sum(_nbytes(t) for t in proto.graph.initializer if t.name not in graph.owned)
    return {
        "path": str(path),
        "file_bytes": len(data),
        "opset": OPSET,
        "int4": int4,
        "contrib_ops": graph.contrib,
        "inputs": names["inputs"],
        "outputs": names["outputs"],
        "storage": dict(Counter(r["storage"] for r in report.values())),
        "tensors": report,
        "float_bytes": float_bytes,
        "session_config": dict(EXACT_SESSION_CONFIG),  # onnxruntime settings for results identical to squash's
    }


def session_options(threads: int | None = None):
    """onnxruntime SessionOptions that keep a QDQ weight-only export exact (see the module docstring)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    for k, v in EXACT_SESSION_CONFIG.items():
        so.add_session_config_entry(k, v)
    return so


# ---------------------------------------------------------------- the torch side


class _EncoderExport(nn.Module):
    """(input_ids, attention_mask[, token_type_ids]) → last_hidden_state and the mean-pooled, L2-normalised
    sentence embedding squash's encoder quality compares (squash.eval.quality.sentence_embeddings)."""

    def __init__(self, module: nn.Module, token_types: bool):
        super().__init__()
        self.m = module
        self.token_types = token_types

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw = {"token_type_ids": token_type_ids} if self.token_types else {}
        hidden = self.m(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state  # (B, T, C)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return hidden, F.normalize(pooled, dim=-1)


def _export_module(model: Model):
    module = copy.deepcopy(model.module).eval()
    if model.kind == "encoder":
        params = inspect.signature(module.forward).parameters
        if "input_ids" not in params or "attention_mask" not in params:
            raise SquashError(f"{model.name}: an encoder whose forward takes no input_ids / attention_mask")
        token_types = "token_type_ids" in params
        wrapper = _EncoderExport(module, token_types).eval()
        ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102, 0], [101, 2023, 2003, 102, 0, 0, 0, 0]])
        ids = ids.clamp(max=_vocab_size(module) - 1)
        mask = (ids != 0).long()
        mask[:, 0] = 1
        inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_types else [])
        args = (ids, mask) + ((torch.zeros_like(ids),) if token_types else ())
        outputs = ["last_hidden_state", "sentence_embedding"]
        dynamic = {n: {0: "batch", 1: "sequence"} for n in inputs + ["last_hidden_state"]}
        dynamic["sentence_embedding"] = {0: "batch"}
    elif model.kind == "module":  # a torch module: its example input's shape, the batch left dynamic
        spec = model.config["input"]
        wrapper = module
        args = (torch.zeros(*spec["shape"], dtype=getattr(torch, spec.get("dtype", "float32"))),)
        inputs, outputs = ["input"], ["output"]
        dynamic = {"input": {0: "batch"}, "output": {0: "batch"}}
    else:  # classifier: digits-cnn, images (B, 1, 8, 8)
        wrapper = module
        args = (torch.zeros(2, 1, 8, 8),)
        inputs, outputs = ["input"], ["logits"]
        dynamic = {"input": {0: "batch"}, "logits": {0: "batch"}}
    return wrapper, args, {"inputs": inputs, "outputs": outputs}, dynamic


def _vocab_size(module: nn.Module) -> int:
    cfg = getattr(module, "config", None)
    return int(getattr(cfg, "vocab_size", 30522) or 30522)


class _LinearStub(nn.Module):
    """y = x·Ŵᵀ + b with Ŵᵀ a parameter of shape (in, out), so the exporter writes MatMul(x, <name>.squash_w)."""

    def __init__(self, q: QLinear):
        super().__init__()
        self.ct = q.weight_q.ct
        self.squash_w = nn.Parameter(self.ct.dequantize(torch.float32).t().contiguous(), requires_grad=False)
        self.bias = q.bias
        self.activation_bits = int(self.ct.extra.get("activation_bits") or 0)

    def forward(self, x):
        if self.activation_bits:
            x = quantize_activations(x, self.activation_bits)
        y = torch.matmul(x, self.squash_w)
        return y if self.bias is None else y + self.bias


class _ConvStub(nn.Module):
    def __init__(self, q: QConv):
        super().__init__()
        self.ct = q.weight_q.ct
        self.squash_w = nn.Parameter(self.ct.dequantize(torch.float32), requires_grad=False)
        self.bias = q.bias
        self.op, self.stride, self.padding, self.dilation, self.groups = q.op, q.stride, q.padding, q.dilation, q.groups

    def forward(self, x):
        return self.op(x, self.squash_w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _EmbeddingStub(nn.Module):
    def __init__(self, q: QEmbedding):
        super().__init__()
        self.ct = q.weight_q.ct
        self.squash_w = nn.Parameter(self.ct.dequantize(torch.float32), requires_grad=False)
        self.scale = q.scale  # the layer's constant row factor (Gemma's √hidden), 1 for most models

    def forward(self, ids):
        rows = F.embedding(ids, self.squash_w)
        return rows if self.scale == 1.0 else rows * self.scale


def _install_stubs(wrapper: nn.Module) -> dict:
    """Swap every compressed layer for a stub holding its dequantized weight; returns
    {initializer name: (squash tensor name, kind, stub)}."""
    from squash.recipe import _set_module

    inner = "m." if isinstance(wrapper, _EncoderExport) else ""
    root = wrapper.m if inner else wrapper
    found = {}
    for name, m in list(root.named_modules()):
        if isinstance(m, QLinear):
            stub, kind = _LinearStub(m), "linear"
        elif isinstance(m, QConv):
            stub, kind = _ConvStub(m), "conv"
        elif isinstance(m, QEmbedding):
            stub, kind = _EmbeddingStub(m), "embedding"
        else:
            continue
        _set_module(root, name, stub)
        found[f"{inner}{name}.{STUB}"] = (f"{name}.weight", kind, stub)
    return found


# ---------------------------------------------------------------- the ONNX side


class _Graph:
    """The exported graph plus what the rewrite adds: constant subgraphs run first, node replacements in place."""

    def __init__(self, proto):
        self.proto = proto
        self.g = proto.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.front = []  # nodes computing weights from initializers, placed before everything
        self.replaced: dict[int, list] = {}  # index of an original node → the nodes that stand in for it
        self.added = []  # new initializers
        self.dropped = set()  # float initializers replaced
        self.owned = set()  # names of initializers that hold compressed tensors
        self.contrib = False
        self._names = set(self.inits) | {o for n in self.g.node for o in n.output} | {i.name for i in self.g.input}
        self._bytes = 0

    def name(self, base: str) -> str:
        n, i = base, 1
        while n in self._names:
            n, i = f"{base}_{i}", i + 1
        self._names.add(n)
        return n

    def init(self, base: str, array=None, *, tensor=None) -> str:
        from onnx import numpy_helper

        name = self.name(base)
        t = numpy_helper.from_array(np.ascontiguousarray(array), name) if tensor is None else tensor
        t.name = name
        self.added.append(t)
        self.owned.add(name)
        self._bytes += _nbytes(t)
        return name

    def int4(self, base: str, values: np.ndarray, signed: bool) -> str:
        """An INT4/UINT4 initializer (two values a byte, the first in the low nibble: ONNX's packing)."""
        from onnx import TensorProto, helper

        flat = (values.astype(np.int16).reshape(-1) & 15).astype(np.uint8)
        if flat.size % 2:
            flat = np.append(flat, np.uint8(0))
        packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
        t = helper.make_tensor("x", TensorProto.INT4 if signed else TensorProto.UINT4, list(values.shape),
                               packed.tobytes(), raw=True)
        return self.init(base, tensor=t)

    def node(self, out: list, op: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "",
             base: str = "w", **attrs):
        from onnx import helper

        names = outputs if isinstance(outputs, list) else [self.name(f"{base}/{op}") for _ in range(outputs)]
        out.append(helper.make_node(op, inputs, names, name=self.name(f"{base}/{op}_node"), domain=domain, **attrs))
        if domain == "com.microsoft":
            self.contrib = True
        return names[0] if len(names) == 1 else names

    def const_i64(self, base: str, values) -> str:
        return self.init(base, np.asarray(values, dtype=np.int64))

    def consumers(self, name: str) -> list[tuple[int, object]]:
        return [(i, n) for i, n in enumerate(self.g.node) if name in n.input]

    def start(self) -> None:
        self._bytes = 0

    def taken(self) -> int:
        return self._bytes

    def finish(self) -> None:
        nodes = list(self.front)
        for i, n in enumerate(self.g.node):
            nodes.extend(self.replaced.get(i, [n]))
        self.g.ClearField("node")
        self.g.node.extend(nodes)
        keep = [t for t in self.g.initializer if t.name not in self.dropped]
        self.g.ClearField("initializer")
        self.g.initializer.extend(keep + self.added)
        for coll in (self.g.input, self.g.value_info):  # a replaced initializer is now a node output
            kept = [v for v in coll if v.name not in self.dropped]
            del coll[:]
            coll.extend(kept)


def _rewrite(G: _Graph, init_name: str, tensor_name: str, kind: str, stub: nn.Module, int4: str) -> dict:
    """Store one compressed tensor as integers; returns its report entry."""
    ct: CompressedTensor = stub.ct
    extras = [e for e, t in (("col_scale", ct.col_scale), ("lowrank", ct.u), ("sparse", ct.sparse_index),
                             ("mask", ct.mask)) if t is not None]
    entry = {"kind": kind, "bits": ct.bits, "shape": list(ct.shape), "extras": extras}
    if init_name not in G.inits:  # not in the graph: unused by the outputs (a pooler), tied, or folded
        w = stub.squash_w.detach().numpy()
        same = [t.name for t in G.g.initializer
                if len(t.raw_data) == w.nbytes and t.raw_data in (w.tobytes(), w.T.copy().tobytes())]
        if any(n.endswith(f".{STUB}") for n in same):  # identical to another layer's weight (tied): stored there
            other = next(n for n in same if n.endswith(f".{STUB}"))
            return {**entry, "storage": f"shared with {other.removeprefix('m.').removesuffix('.' + STUB)}",
                    "bytes": 0}
        return {**entry, "storage": "float32 (folded by the exporter)" if same else "unused (not in the graph)",
                "bytes": 0}
    G.start()
    users = G.consumers(init_name)
    u = _uniform(ct)
    base = tensor_name.removesuffix(".weight")

    if kind == "linear" and u is not None and len(users) == 1 and users[0][1].op_type == "MatMul" \
            and list(users[0][1].input) == [users[0][1].input[0], init_name]:
        idx, mm = users[0]
        storage = _linear(G, base, ct, u, mm, idx, int4)
        if storage is not None:
            G.dropped.add(init_name)
            return {**entry, "storage": storage, "bytes": G.taken()}

    if kind == "embedding" and u is not None and u.int_zero and not _has_terms(ct) and users and all(
            n.op_type == "Gather" and n.input[0] == init_name and _attr(n, "axis", 0) == 0 for _, n in users):
        storage = _embedding_rows(G, base, ct, u, users, int4)
        if storage is not None:
            G.dropped.add(init_name)
            return {**entry, "storage": storage, "bytes": G.taken()}

    # anything else: the weight tensor itself, computed from integers, under the initializer's own name
    shape = list(G.inits[init_name].dims)
    storage = _weight(G, base, ct, u, kind, shape, init_name, int4)
    G.dropped.add(init_name)
    return {**entry, "storage": storage, "bytes": G.taken()}


class _Uniform:
    """Codes on the integer grid, normalised to one block row: u (rows, cols) uint8, s and z (rows, C) with
    blocks of bc columns. Pruned positions get the code z (so they dequantize to exactly 0) where z is an integer."""

    def __init__(self, ct: CompressedTensor):
        rows, cols = ct.matrix_shape
        br, bc = ct.block
        self.rows, self.cols, self.bc, self.bits = rows, cols, bc, ct.bits
        self.per_tensor = tuple(ct.scale.shape) == (1, 1)
        self.scale = np.repeat(ct.scale.float().numpy(), br, axis=0)[:rows]  # (rows, C)
        self.zero = np.repeat(ct.zero_point().double().numpy(), br, axis=0)[:rows]  # (rows, C)
        self.symmetric = ct.zero is None
        z = self.zero
        self.int_zero = bool(np.all(z == np.round(z)) and z.min() >= 0 and z.max() < 2**ct.bits)
        u = ct.codes.numpy().astype(np.uint8).copy()
        self.mask_ok = True
        if ct.mask is not None:
            if self.int_zero:
                zfull = np.repeat(self.zero, bc, axis=1)[:, :cols].astype(np.uint8)
                m = ct.mask.numpy().astype(bool)
                u[~m] = zfull[~m]
            else:
                self.mask_ok = False
        self.u = u

    def signed_codes(self) -> np.ndarray:
        """c − 2^(bits−1) for a symmetric tensor (int8 container range)."""
        return self.u.astype(np.int16) - 2 ** (self.bits - 1)

    def expand(self, per_block: np.ndarray, b: int, k_blocks: int) -> np.ndarray:
        """(rows, C) values of blocks of bc columns → (rows, k_blocks) values of blocks of b columns (b | bc)."""
        j = np.minimum((np.arange(k_blocks) * b) // self.bc, per_block.shape[1] - 1)
        return per_block[:, j]


def _uniform(ct: CompressedTensor) -> _Uniform | None:
    if ct.codes is None or ct.grid is not None or ct.dense is not None:
        return None
    return _Uniform(ct)


def _has_terms(ct: CompressedTensor) -> bool:
    return ct.col_scale is not None or ct.u is not None or ct.sparse_index is not None


def _nbits_block(u: _Uniform, limit: int = 128) -> int | None:
    """A power-of-two block (16 … limit) that tiles squash's blocks of bc columns, or None."""
    if u.per_tensor or u.bc >= u.cols:  # one block across the row: any block size tiles it
        return min(limit, max(16, 1 << (u.cols - 1).bit_length()))
    b = limit
    while b >= 16:
        if u.bc % b == 0:
            return b
        b //= 2
    return None


def _pack_rows(values: np.ndarray, nbits: int) -> np.ndarray:
    """(n, m) values < 2^nbits → (n, m·nbits/8) bytes, low bits first (m a multiple of 8 / nbits)."""
    per = 8 // nbits
    v = values.astype(np.uint8)
    out = np.zeros((v.shape[0], v.shape[1] // per), dtype=np.uint8)
    for j in range(per):
        out |= (v[:, j::per] << (nbits * j)).astype(np.uint8)
    return out


def _linear(G: _Graph, base: str, ct: CompressedTensor, u: _Uniform, mm, idx: int, int4: str) -> str | None:
    """MatMul(x, Ŵᵀ) → the integer product on x (·r), plus the low-rank and outlier terms on x. None: not here."""
    b = _nbits_block(u)
    use_nbits = ct.bits <= 4 and int4 == "auto" and b is not None and u.mask_ok
    if not use_nbits and not (u.int_zero and u.mask_ok):
        return None
    x, y = mm.input[0], mm.output[0]
    nodes = []
    xin = x
    if ct.col_scale is not None:  # Ŵ = Q·diag(r) + …: x·diag(r)·Qᵀ
        r = G.init(f"{base}.col_scale", ct.col_scale.numpy())
        if ct.col_scale.dtype != torch.float32:
            r = G.node(nodes, "Cast", [r], base=base, to=1)
        xin = G.node(nodes, "Mul", [x, r], base=base)
    main = y if ct.u is None and ct.sparse_index is None else G.name(f"{base}/main")
    if use_nbits:
        nbits = 2 if ct.bits <= 2 else 4
        N, K = u.rows, u.cols
        kb = math.ceil(K / b)
        zero = u.expand(u.zero, b, kb)  # (N, kb)
        codes = np.empty((N, kb * b), dtype=np.uint8)
        codes[:, :K] = u.u
        codes[:, K:] = np.repeat(zero, b, axis=1)[:, K:].round().astype(np.uint8) if u.int_zero else 0  # never read
        B = G.init(f"{base}.codes", _pack_rows(codes, nbits).reshape(N, kb, b * nbits // 8))
        s = G.init(f"{base}.scale", u.expand(u.scale, b, kb).astype(np.float32))
        inputs = [xin, B, s]
        if u.int_zero:
            if not np.all(zero == 2 ** (nbits - 1)):  # the default zero point is 2^(bits−1)
                per = 8 // nbits
                zpad = np.zeros((N, math.ceil(kb / per) * per), dtype=np.uint8)
                zpad[:, :kb] = zero.astype(np.uint8)
                inputs.append(G.init(f"{base}.zero", _pack_rows(zpad, nbits)))
        else:
            inputs.append(G.init(f"{base}.zero", zero.astype(np.float32)))
        G.node(nodes, "MatMulNBits", inputs, [main], domain="com.microsoft", base=base, K=K, N=N, bits=nbits,
               block_size=b)
        storage = f"matmulnbits-{nbits}"
    else:
        w, storage = _dq(G, base, u, nodes, transpose=True, int4=int4)
        G.node(nodes, "MatMul", [xin, w], [main], base=base)
    if ct.u is not None:  # + x·Vᵀ·Uᵀ
        vt = _float_init(G, f"{base}.lowrank_v", ct.v.t().contiguous(), nodes)
        ut = _float_init(G, f"{base}.lowrank_u", ct.u.t().contiguous(), nodes)
        t = G.node(nodes, "MatMul", [x, vt], base=base)
        lr = G.node(nodes, "MatMul", [t, ut], base=base)
        nxt = y if ct.sparse_index is None else G.name(f"{base}/lowrank_sum")
        G.node(nodes, "Add", [main, lr], [nxt], base=base)
        main = nxt
    if ct.sparse_index is not None:  # y[..., i] += Σ x[..., j]·S_ij over the outliers
        flat = ct.sparse_index.long().numpy()
        rows_i = G.init(f"{base}.sparse_row", (flat // u.cols).astype(np.int32))
        cols_i = G.init(f"{base}.sparse_col", (flat % u.cols).astype(np.int32))
        vals = _float_init(G, f"{base}.sparse_value", ct.sparse_value, nodes)
        xs = G.node(nodes, "Gather", [x, cols_i], base=base, axis=-1)  # (..., n)
        upd = G.node(nodes, "Mul", [xs, vals], base=base)
        shape = G.node(nodes, "Shape", [upd], base=base)
        where = G.node(nodes, "Expand", [rows_i, shape], base=base)
        G.node(nodes, "ScatterElements", [main, where, upd], [y], base=base, axis=-1, reduction="add")
    G.replaced[idx] = nodes
    return storage


def _container(u: _Uniform, int4: str) -> int:
    return 4 if u.bits <= 4 and int4 != "uint8" else 8


def _dq(G: _Graph, base: str, u: _Uniform, nodes: list, *, transpose: bool, int4: str) -> tuple[str, str]:
    """DequantizeLinear of the whole matrix (rows, cols), or its transpose (cols, rows) for MatMul."""
    width = _container(u, int4)
    signed = u.symmetric
    q = u.signed_codes() if signed else u.u
    zero = None if signed else u.zero.astype(np.uint8)
    scale = u.scale.astype(np.float32)
    if u.per_tensor:
        scale, zero = scale[:1, 0].reshape(()), None if zero is None else zero[:1, 0].reshape(())
        attrs = {}
    elif scale.shape[1] == 1:  # per output channel
        scale, zero = scale[:, 0], None if zero is None else zero[:, 0]
        attrs = {"axis": 1 if transpose else 0}
    else:  # blocks of bc along the input axis
        attrs = {"axis": 0 if transpose else 1, "block_size": u.bc}
        if transpose:
            scale, zero = scale.T, None if zero is None else zero.T
    if transpose:
        q = q.T
    if width == 4:
        qn = G.int4(f"{base}.codes", q, signed)
        zn = None if zero is None else G.int4(f"{base}.zero", zero, False)
    else:
        qn = G.init(f"{base}.codes", q.astype(np.int8 if signed else np.uint8))
        zn = None if zero is None else G.init(f"{base}.zero", zero.astype(np.uint8))
    sn = G.init(f"{base}.scale", np.ascontiguousarray(scale))
    w = G.node(nodes, "DequantizeLinear", [qn, sn] + ([zn] if zn else []), base=base, **attrs)
    return w, f"{'int' if signed else 'uint'}{width}-dq"


def _embedding_rows(G: _Graph, base: str, ct: CompressedTensor, u: _Uniform, users, int4: str) -> str | None:
    """Gather(table, ids) → gather the rows' codes (and scales, zero points), dequantize only those."""
    width = _container(u, int4)
    b = _nbits_block(u)
    if width == 4 and int4 == "auto" and b is not None:  # com.microsoft GatherBlockQuantized, uint4 data
        V, D = u.rows, u.cols
        kb = math.ceil(D / b)
        data = G.int4(f"{base}.codes", u.u, False)
        s = G.init(f"{base}.scale", u.expand(u.scale, b, kb).astype(np.float32))
        z = G.int4(f"{base}.zero", u.expand(u.zero, b, kb).astype(np.uint8), False)
        for idx, n in users:
            nodes = []
            G.node(nodes, "GatherBlockQuantized", [data, n.input[1], s, z], [n.output[0]], domain="com.microsoft",
                   base=base, bits=4, block_size=b, quantize_axis=1, gather_axis=0)
            G.replaced[idx] = nodes
        return "gatherblockquantized-4"
    if width == 4:  # int4="qdq": ONNX Gather takes no int4 data: dequantize the table (weight path)
        return None
    signed = u.symmetric
    q = G.init(f"{base}.codes", (u.signed_codes().astype(np.int8) if signed else u.u))
    if u.per_tensor:
        s = G.init(f"{base}.scale", u.scale[:1, 0].reshape(()).astype(np.float32))
        z = None if signed else G.init(f"{base}.zero", u.zero[:1, 0].reshape(()).astype(np.uint8))
    else:
        s = G.init(f"{base}.scale", u.scale.astype(np.float32))  # (V, C)
        z = None if signed else G.init(f"{base}.zero", u.zero.astype(np.uint8))
    for idx, n in users:
        nodes, ids = [], n.input[1]
        qg = G.node(nodes, "Gather", [q, ids], base=base)
        if u.per_tensor:
            G.node(nodes, "DequantizeLinear", [qg, s] + ([z] if z else []), [n.output[0]], base=base)
        else:
            sg = G.node(nodes, "Gather", [s, ids], base=base)
            zg = [G.node(nodes, "Gather", [z, ids], base=base)] if z else []
            G.node(nodes, "DequantizeLinear", [qg, sg] + zg, [n.output[0]], base=base, axis=-1, block_size=u.bc)
        G.replaced[idx] = nodes
    return f"{'int' if signed else 'uint'}8-dq"


def _weight(G: _Graph, base: str, ct: CompressedTensor, u: _Uniform | None, kind: str, shape: list[int],
            out: str, int4: str) -> str:
    """The weight initializer `out` (shape as exported: (in, out) for a Linear stub, the layer's own otherwise)
    recomputed from integers: DequantizeLinear when it can hold the tensor, else the constant subgraph."""
    transpose = kind == "linear"
    nodes = G.front
    if u is not None and u.int_zero and u.mask_ok and not _has_terms(ct):
        w, storage = _dq(G, base, u, nodes, transpose=transpose, int4=int4)
        final = w
    else:
        final, storage = _graph_weight(G, base, ct, nodes)
        if transpose:
            final = G.node(nodes, "Transpose", [final], base=base, perm=[1, 0])
    rows, cols = ct.matrix_shape
    produced = [cols, rows] if transpose else [rows, cols]
    if list(shape) != produced:  # a Conv weight (out, in, kh, kw) from its matrix view
        G.node(nodes, "Reshape", [final, G.const_i64(f"{base}.shape", shape)], [out], base=base)
    else:
        G.node(nodes, "Identity", [final], [out], base=base)
    return storage


def _graph_weight(G: _Graph, base: str, ct: CompressedTensor, nodes: list) -> tuple[str, str]:
    """Ŵ (rows, cols) = ((G[c] − z)·s)·diag(r) ⊙ M + U·V + S as a constant subgraph on stored arrays."""
    rows, cols = ct.matrix_shape
    if ct.codes is not None:
        br, bc = ct.block
        C = ct.scale.shape[1]
        codes = np.zeros((rows, C * bc), dtype=np.uint8)
        codes[:, :cols] = ct.codes.numpy()
        c = G.init(f"{base}.codes", codes)
        if ct.grid is None:
            lv = G.node(nodes, "Cast", [c], base=base, to=1)
        else:
            grid = _float_init(G, f"{base}.grid", ct.grid.float() if ct.grid.dtype == torch.float64 else ct.grid, nodes)
            ci = G.node(nodes, "Cast", [c], base=base, to=7)
            if ct.grid.dim() == 2:  # one grid per row
                lv = G.node(nodes, "GatherElements", [grid, ci], base=base, axis=1)
            else:
                lv = G.node(nodes, "Gather", [grid, ci], base=base)
        s = np.repeat(ct.scale.float().numpy(), br, axis=0)[:rows].reshape(rows, C, 1)
        z = np.repeat(ct.zero_point().float().numpy(), br, axis=0)[:rows].reshape(rows, C, 1)
        lv = G.node(nodes, "Reshape", [lv, G.const_i64(f"{base}.blocks", [rows, C, bc])], base=base)
        if ct.zero is None and ct.midpoint() == 0:
            d = lv
        else:
            d = G.node(nodes, "Sub", [lv, G.init(f"{base}.zero", z)], base=base)
        w = G.node(nodes, "Mul", [d, G.init(f"{base}.scale", s.astype(np.float32))], base=base)
        w = G.node(nodes, "Reshape", [w, G.const_i64(f"{base}.padded", [rows, C * bc])], base=base)
        if C * bc != cols:
            w = G.node(nodes, "Slice", [w, G.const_i64(f"{base}.start", [0]), G.const_i64(f"{base}.end", [cols]),
                                        G.const_i64(f"{base}.axes", [1])], base=base)
        if ct.col_scale is not None:
            w = G.node(nodes, "Mul", [w, _float_init(G, f"{base}.col_scale", ct.col_scale, nodes)], base=base)
        storage = "uint8-codes-graph"
    elif ct.dense is not None:
        w = _float_init(G, f"{base}.dense", ct.dense, nodes)
        storage = "float16-dense" if ct.dense.dtype == torch.float16 else "float32-dense"
    else:
        w = None
        storage = "lowrank-float"
    if ct.mask is not None and ct.codes is not None:
        m = G.init(f"{base}.mask", ct.mask.numpy().astype(bool))
        w = G.node(nodes, "Mul", [w, G.node(nodes, "Cast", [m], base=base, to=1)], base=base)
    if ct.u is not None:
        uv = G.node(nodes, "MatMul", [_float_init(G, f"{base}.lowrank_u", ct.u, nodes),
                                      _float_init(G, f"{base}.lowrank_v", ct.v, nodes)], base=base)
        w = uv if w is None else G.node(nodes, "Add", [w, uv], base=base)
    if w is None:
        w = G.init(f"{base}.zeros", np.zeros((rows, cols), dtype=np.float32))
    if ct.sparse_index is not None:
        flat = G.node(nodes, "Reshape", [w, G.const_i64(f"{base}.flat", [-1])], base=base)
        where = G.init(f"{base}.sparse_index", ct.sparse_index.numpy().astype(np.int32))
        vals = _float_init(G, f"{base}.sparse_value", ct.sparse_value, nodes)
        flat = G.node(nodes, "ScatterElements", [flat, where, vals], base=base, axis=0, reduction="add")
        w = G.node(nodes, "Reshape", [flat, G.const_i64(f"{base}.matrix", [rows, cols])], base=base)
    return w, storage


def _float_init(G: _Graph, base: str, t: torch.Tensor, nodes: list) -> str:
    """A float array stored in its own dtype (float16 or float32); float16 gets a Cast to float32."""
    arr = t.detach().cpu().numpy()
    name = G.init(base, arr)
    return G.node(nodes, "Cast", [name], base=base, to=1) if arr.dtype != np.float32 else name


# ---------------------------------------------------------------- helpers


def _attr(node, name: str, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _nbytes(t) -> int:
    from onnx import TensorProto

    if t.raw_data:
        return len(t.raw_data)
    n = math.prod(t.dims)
    bits = {TensorProto.FLOAT: 32, TensorProto.FLOAT16: 16, TensorProto.INT64: 64, TensorProto.INT32: 32,
            TensorProto.INT8: 8, TensorProto.UINT8: 8, TensorProto.BOOL: 8, TensorProto.INT4: 4,
            TensorProto.UINT4: 4, TensorProto.DOUBLE: 64}.get(t.data_type, 32)
    return math.ceil(n * bits / 8)


def _atomic_write(path: Path, data: bytes) -> None:
    write_atomic(path, data)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
