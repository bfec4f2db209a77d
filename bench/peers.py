"""The methods the quality bench compares, one small adapter each behind one interface.

    Method(name, bits_offered, variants(model, quick) -> [Variant], run(model, variant, ctx) -> Result)

`run` compresses a copy of the float model (never the model itself) and returns a Result: a module that is
called exactly like the float one (same inputs, same outputs), the bytes it stores, and what it is. The caller
(bench/quality.py) times `run` and samples the process's resident memory while it runs (`PeakRSS`), then (untimed)
writes the method's file to measure its size and scores the module with squash's own quality functions.

Bytes are counted from what each method holds, honestly:
  fp32       4 bytes a weight (the reference)
  rtn        codes at their width + float16 scales (+ zero points at the code width), computed; the rest float32
  squash     squash's own accounting (stored_weight_bytes: codes, scales, zeros, outliers, float leftovers)
  peers      every tensor in the quantized module's state_dict, tensor subclasses (torchao, quanto) flattened to
             the tensors inside them, storage shared by several names (tied embeddings) counted once; layers a
             peer leaves in float (embeddings, norms, a tied output head) count at their dtype (float32)
  llama.cpp  the GGUF's tensor bytes (every tensor, quantized or not)

The peers quantize what their ordinary API quantizes: the Linear layers (quanto: Linear and Conv2d), with an
output head tied to the token embedding left in float (quantizing it would untie it and store the embedding
twice). squash, rtn and llama.cpp also quantize embeddings. `quantized_bytes / quantized_weights` is the bits per
weight of the compressed layers alone, the number to compare quantizers by; `stored_bytes` is the whole model.

A peer that fails to import or run raises; the caller records the exception line.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import importlib.metadata
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

import squash
from squash.models import Model, cache_dir

# ---------------------------------------------------------------- the interface


@dataclass(frozen=True)
class Variant:
    bits: int  # the nominal code width: the table's "bits" column and the --bits filter
    label: str  # what runs at that width: a preset, a GGUF type, a config


@dataclass
class Result:
    module: Callable  # runnable like the float module
    stored_bytes: int  # everything stored, float leftovers included
    quantized_weights: int  # weights in the layers the method compressed
    quantized_bytes: int  # bytes those layers store (codes, scales, zeros, tables; biases left out)
    save: Callable[[Path], int] | None = None  # writes the method's own file into a folder, returns its size
    config: str = ""  # what ran, in words
    notes: list[str] = field(default_factory=list)
    close: Callable[[], None] | None = None  # frees native resources (llama.cpp)
    compress_seconds: float | None = None  # when set: the compressing alone, where run() also reads files back


@dataclass
class Context:
    quick: bool
    workdir: Path  # scratch for files written to measure their size (the caller removes it)
    lm_window: int = 512  # tokens per evaluation window (llama.cpp's context is sized to it)


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "reference", "baseline", "squash", "peer"
    bits_offered: tuple[int, ...]
    variants: Callable[[Model, bool], list[Variant]]
    run: Callable[[Model, Variant, Context], Result]
    package: str | None = None  # pip distribution whose version is recorded
    applies: Callable[[Model], str | None] = lambda model: None  # a reason it does not, or None
    description: str = ""
    imports: tuple[str, ...] = ()  # imported before compress is timed (an import error is the row's error)

    def load(self) -> None:
        import importlib

        for name in self.imports:
            importlib.import_module(name)

    def version(self) -> str | None:
        if self.package is None:
            return None
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"


# ---------------------------------------------------------------- measuring


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc malloc_trim), so that the RSS a run starts
    from is live memory and pages an earlier run freed count again when reused."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak resident set size of this process while the block runs: sampled every 2 ms by a thread reading
    /proc/self/statm (native allocations of torch, llama.cpp and the peers included, which tracemalloc misses).
    Free heap memory is handed back first (release_free_memory). `before` is the RSS when the block starts,
    `peak` the highest sample, `rise` = peak − before: the memory compressing took on top of what was loaded."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.before = self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRSS:
        release_free_memory()
        self.before = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def rise(self) -> int:
        return self.peak - self.before


# ---------------------------------------------------------------- counting bytes


def _tensors(t: torch.Tensor):
    """The plain tensors inside `t` (a tensor subclass such as torchao's or quanto's is flattened)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for n in names:
            inner = getattr(t, n)
            if isinstance(inner, torch.Tensor):
                yield from _tensors(inner)
        return
    yield t


def state_bytes(state: dict[str, Any], seen: set | None = None) -> int:
    """Bytes of every tensor in a state dict, shared storage once (`seen` carries that across calls)."""
    seen = set() if seen is None else seen
    total = 0
    for v in state.values():
        if not isinstance(v, torch.Tensor):
            continue
        for t in _tensors(v):
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def module_bytes(module: nn.Module) -> int:
    return state_bytes(module.state_dict())


def layer_bytes(module: nn.Module, names: list[str]) -> int:
    """Bytes the named (quantized) layers store, biases left out."""
    total = 0
    for name in names:
        sd = module.get_submodule(name).state_dict()
        total += state_bytes({k: v for k, v in sd.items() if not k.endswith("bias")})
    return total


def torch_file(module: nn.Module, name: str) -> Callable[[Path], int]:
    """Size of torch.save(state_dict) (what a user of the peer writes), written into a folder and removed."""

    def save(folder: Path) -> int:
        path = folder / f"{name}.pt"
        try:
            torch.save(module.state_dict(), path)
            return path.stat().st_size
        finally:
            path.unlink(missing_ok=True)

    return save


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def linear_targets(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linear layers a peer quantizes: all of them but an output head tied to an embedding."""
    embedded = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear) and id(m.weight) not in embedded]


def _weights(layers) -> int:
    return sum(m.weight.numel() for _, m in layers)


def float_copy(model: Model) -> nn.Module:
    return copy.deepcopy(model.module).eval()


# ---------------------------------------------------------------- fp32: the reference


def _fp32(model: Model, variant: Variant, ctx: Context) -> Result:
    n = sum(p.numel() for p in {id(p): p for p in model.module.parameters()}.values())
    return Result(model.module, 4 * n, 0, 0, None, "the float32 model itself")


# ---------------------------------------------------------------- rtn: round to nearest, the floor


def rtn(w: torch.Tensor, bits: int, group: int = 64) -> tuple[torch.Tensor, int]:
    """Round to nearest: Ŵ and the bytes it stores. 8 bits: symmetric absmax per output channel (row);
    fewer: asymmetric min/max per group of `group` weights along each row. Scales float16, zero points at the
    code width."""
    rows = w.shape[0]
    x = w.detach().reshape(rows, -1).float()
    if bits == 8:
        s = (x.abs().amax(1, keepdim=True) / 127).half().float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        return ((x / s).round().clamp(-127, 127) * s).reshape(w.shape).to(w.dtype), x.numel() + 2 * rows
    cols, qmax = x.shape[1], 2**bits - 1
    g = F.pad(x, (0, -cols % group), mode="replicate").reshape(rows, -1, group)  # (rows, groups, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = ((hi - lo) / qmax).half().float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = (-lo / s).round().clamp(0, qmax)
    w_hat = (((g / s).round() + z).clamp(0, qmax) - z) * s
    n_groups = g.shape[0] * g.shape[1]
    stored = math.ceil(x.numel() * bits / 8) + 2 * n_groups + math.ceil(n_groups * bits / 8)
    return w_hat.reshape(rows, -1)[:, :cols].reshape(w.shape).to(w.dtype), stored


RTN_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def _rtn(model: Model, variant: Variant, ctx: Context) -> Result:
    module = float_copy(model)
    done, q_weights, q_bytes, float_bytes = set(), 0, 0, 0
    for _, m in module.named_modules():
        if isinstance(m, RTN_TYPES) and id(m.weight) not in done:
            done.add(id(m.weight))
            w_hat, stored = rtn(m.weight.data, variant.bits)
            m.weight.data.copy_(w_hat)  # a tied output head shares this tensor: quantized once, used twice
            q_weights += m.weight.numel()
            q_bytes += stored
            float_bytes += 4 * m.weight.numel()
    total = module_bytes(module) - float_bytes + q_bytes
    how = "absmax per output channel, symmetric" if variant.bits == 8 else "min/max per group of 64, asymmetric"
    return Result(module, total, q_weights, q_bytes, None,
                  f"round to nearest, {how}, float16 scales; every Linear, Conv and Embedding weight")


# ---------------------------------------------------------------- squash


def _recipe(name: str, bits: int, calibrated: bool, outliers: bool = False) -> squash.Recipe:
    steps = [{"step": "outliers", "fraction": 0.003}] if outliers else []
    q = {"step": "quantize", "bits": bits, "block": 64, "symmetric": False, "zero_dtype": "int",
         "scale_dtype": "float16"}
    if calibrated:
        q.update(clip="mse", rounding="gptq", act_order=True)
    return squash.Recipe.from_dict({"name": name, "min_weights": 4096 if calibrated else 0, "steps": steps + [q]})


SQUASH = {8: "int8", 6: "int6", 4: "int4", 3: "int3", 2: "int2"}
QUICK_CALIBRATION = 8  # quick mode: calibration samples for GPTQ on models of a million weights or more (default 32)
CHEAP_UNDER = 1_000_000


def squash_recipe(label: str) -> squash.Recipe:
    """A preset, or int6, which the presets lack: GPTQ in groups of 64 like int4, without outliers."""
    if label in squash.presets():
        return squash.load_recipe(label)
    if label == "int6":
        return _recipe(label, 6, calibrated=True)
    raise ValueError(f"no squash recipe {label!r}")


def _squash(model: Model, variant: Variant, ctx: Context) -> Result:
    from squash.calibrate import calibration_batches
    from squash.recipe import stored_weight_bytes

    recipe = squash_recipe(variant.label)
    calib, how = None, f"recipe {variant.label}"
    n = sum(p.numel() for p in model.module.parameters())
    if recipe.needs_calibration:
        if ctx.quick and n >= CHEAP_UNDER:
            calib = calibration_batches(model, samples=QUICK_CALIBRATION)
            how += f", calibrated on {QUICK_CALIBRATION} samples of calibration text (quick mode; full: 32)"
        else:
            how += ", calibrated on 32 samples of calibration text"
    small = squash.compress(model, recipe, calib=calib)
    _, stored = stored_weight_bytes(small)

    def save(folder: Path) -> int:
        path = squash.save(small, folder / f"{variant.label}.squash")
        size = path.stat().st_size
        path.unlink()
        return size

    return Result(small.module, stored, sum(ct.numel for ct in small.tensors.values()),
                  sum(ct.stored_bytes() for ct in small.tensors.values()), save, how)


# ---------------------------------------------------------------- HQQ


def _hqq(model: Model, variant: Variant, ctx: Context) -> Result:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    module = float_copy(model)
    layers = linear_targets(module)
    weights = _weights(layers)  # HQQLinear drops the float weight it replaces
    cfg = BaseQuantizeConfig(nbits=variant.bits, group_size=64)
    for name, lin in layers:
        set_module(module, name, HQQLinear(lin, cfg, compute_dtype=torch.float32, device="cpu"))
    names = [n for n, _ in layers]
    notes = ["HQQ packs 6-bit codes one per byte (8bit_u8)"] if variant.bits in (5, 6) else []
    return Result(module, module_bytes(module), weights, layer_bytes(module, names),
                  torch_file(module, "hqq"),
                  f"HQQLinear nbits={variant.bits} group_size=64 (float32 scale and zero), Linear layers", notes)


def _hqq_variants(model: Model, quick: bool) -> list[Variant]:
    """HQQ's weight optimisation takes about a minute per 20M weights on 2 cores: quick mode runs 4 bits only."""
    return [Variant(b, f"hqq{b}") for b in ((4,) if quick else (8, 6, 4, 3, 2))]


# ---------------------------------------------------------------- optimum-quanto


def _quanto(model: Model, variant: Variant, ctx: Context) -> Result:
    from optimum.quanto import QModuleMixin, freeze, qint2, qint4, qint8, quantize

    module = float_copy(model)
    keep = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)
            and n not in {t for t, _ in linear_targets(module)}]  # a tied output head
    quantize(module, weights={8: qint8, 4: qint4, 2: qint2}[variant.bits], exclude=keep or None)
    freeze(module)
    names = [n for n, m in module.named_modules() if isinstance(m, QModuleMixin)]
    weights = sum(module.get_submodule(n).weight.numel() for n in names)
    return Result(NoInferenceMode(module), module_bytes(module), weights, layer_bytes(module, names),
                  torch_file(module, "quanto"),
                  f"quantize(weights=qint{variant.bits}) + freeze, quanto's default layers (Linear, Conv2d)",
                  ["quanto's packed int4/int2 weights fail under torch.inference_mode (RuntimeError: Cannot set "
                   "version_counter for inference tensor), which squash's quality functions use: quanto's "
                   "forward runs with inference mode off (gradients still off)"])


class NoInferenceMode:
    """Calls a module with torch.inference_mode switched off (and gradients off)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return self.module(*args, **kwargs)

    def __getattr__(self, name):  # .config and the rest, as the wrapped module has them (the speed bench asks)
        if name == "module":
            raise AttributeError(name)
        return getattr(self.module, name)


# ---------------------------------------------------------------- torchao


def _torchao(model: Model, variant: Variant, ctx: Context) -> Result:
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    module = float_copy(model)
    layers = linear_targets(module)
    names = {n for n, _ in layers}
    if variant.bits == 8:
        cfg, how = Int8WeightOnlyConfig(), "Int8WeightOnlyConfig() (per row, symmetric)"
    else:
        cfg = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{variant.bits}"), granularity=PerGroup(64),
                                   mapping_type=MappingType.ASYMMETRIC)
        how = f"IntxWeightOnlyConfig(int{variant.bits}, PerGroup(64), ASYMMETRIC)"
    quantize_(module, cfg, filter_fn=lambda m, fqn: fqn in names)
    notes = [] if variant.bits == 8 else [
        "torchao's IntxWeightOnlyConfig keeps the codes unpacked, one int8 per weight (IntxUnpackedToInt8Tensor), "
        "so it stores about 8.6 bits a weight whatever the code width; no packed int4 path runs on this CPU in "
        "float32 (see torchao-int4)"]
    return Result(module, module_bytes(module), _weights(layers), layer_bytes(module, sorted(names)),
                  torch_file(module, "torchao"), how + ", Linear layers", notes)


def _torchao_int4(model: Model, variant: Variant, ctx: Context) -> Result:
    """torchao's packed int4 weight-only path, as its docs give it; recorded even where it cannot run."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    module = float_copy(model)
    layers = linear_targets(module)
    names = {n for n, _ in layers}
    quantize_(module, Int4WeightOnlyConfig(group_size=64), filter_fn=lambda m, fqn: fqn in names)
    return Result(module, module_bytes(module), _weights(layers), layer_bytes(module, sorted(names)),
                  torch_file(module, "torchao4"),
                  "Int4WeightOnlyConfig(group_size=64), Linear layers")


# ---------------------------------------------------------------- bitsandbytes


def _bnb(model: Model, variant: Variant, ctx: Context) -> Result:
    import bitsandbytes as bnb

    module = float_copy(model)
    layers = linear_targets(module)
    for name, lin in layers:
        if variant.bits == 8:
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      has_fp16_weights=False, threshold=6.0, device="cpu")
            new.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    compute_dtype=torch.float32, quant_type="nf4", device="cpu")
            new.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                           blocksize=64)
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        set_module(module, name, new.to("cpu"))  # .to() is where bitsandbytes quantizes
    names = [n for n, _ in layers]
    how = ("Linear8bitLt (LLM.int8: int8 per row, threshold 6.0 outlier columns in float at run time)"
           if variant.bits == 8 else "Linear4bit nf4, blocks of 64, double-quantized absmax")
    return Result(module, module_bytes(module), _weights(layers), layer_bytes(module, names),
                  torch_file(module, "bnb"), how + ", Linear layers")


# ---------------------------------------------------------------- llama.cpp


LLAMA_TYPES = {"F32": 32, "Q8_0": 8, "Q6_K": 6, "Q4_K_M": 4, "Q4_0": 4, "Q3_K_M": 3, "Q2_K": 2}


def _llama_applies(model: Model) -> str | None:
    hf = (model.config or {}).get("hf_config") or {}
    if model.kind != "causal-lm" or hf.get("model_type") != "llama":
        return "llama.cpp runs LLaMA-architecture language models here (written through squash's GGUF export)"
    return None


@contextlib.contextmanager
def captured_stderr():
    """C-level stderr (llama.cpp logs there) into a temporary file; yields a function returning its text."""
    fd = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: (tmp.seek(0), tmp.read().decode(errors="replace"))[1]
        finally:
            os.dup2(fd, 2)
            os.close(fd)


def float_gguf(model: Model) -> tuple[Path, float | None]:
    """The float model as an F32 GGUF (squash's exporter: llama.cpp's names, q/k rows permuted for its rotary
    embedding, the tokenizer from the publisher's GGUF), cached by the weights' sha256; and the seconds it took
    (None when cached)."""
    from squash.io.gguf_export import export_gguf

    path = cache_dir() / "bench" / f"{model.name}-F32-{model.source['sha256'][:12]}.gguf"
    if path.is_file():
        return path, None
    path.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    export_gguf(model, path, target="f32")
    return path, time.perf_counter() - t


def gguf_bytes(path: Path) -> tuple[int, int, int, str]:
    """From the GGUF's tensor table: bytes of all tensors, bytes and weights of the quantized ones, and the
    types of the matrices (share of their weights)."""
    from gguf import GGUFReader

    total = q_bytes = q_weights = 0
    counts: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        total += int(t.n_bytes)
        if t.tensor_type.name not in ("F32", "F16", "BF16"):
            q_bytes += int(t.n_bytes)
            q_weights += int(t.n_elements)
        if len(t.shape) > 1:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
    n = sum(counts.values())
    types = ", ".join(f"{k} {100 * v / n:.0f}%" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return total, q_bytes, q_weights, types


def llama_quantize(src: Path, dst: Path, ftype_name: str, threads: int = 2) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = threads
    with captured_stderr() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        text = log()
    if rc != 0:
        last = [line for line in text.splitlines() if line.strip()][-3:]
        raise RuntimeError(f"llama_model_quantize({ftype_name}) returned {rc}: {' | '.join(last)}")


class LlamaLogits:
    """llama.cpp behind the call squash's lm_quality makes: module(ids (1, T)).logits → (1, T, vocab), computed
    by llama.cpp on exactly those token ids (no BOS added)."""

    def __init__(self, path: Path, n_ctx: int):
        self.path, self.n_ctx, self.llm = path, n_ctx, None

    def __call__(self, ids: torch.Tensor, **kwargs):
        if self.llm is None:  # loaded on first use: loading is running, not compressing
            import numpy as np

            self._np = np
            with captured_stderr():
                self.llm = _load_llama(self.path, self.n_ctx)
        tokens = ids[0].tolist()
        self.llm.reset()
        self.llm.eval(tokens)
        scores = self._np.array(self.llm.scores[: len(tokens)], dtype=self._np.float32)
        return SimpleNamespace(logits=torch.from_numpy(scores)[None])

    def close(self) -> None:
        if self.llm is not None and hasattr(self.llm, "close"):
            self.llm.close()
        self.llm = None


def _load_llama(path: Path, n_ctx: int):
    """bench/export_check.py's loader: llama.cpp with its weight-repacking buffer types off (an illegal
    instruction on some CPUs), 2 threads, logits for every position."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from export_check import load_llama
    finally:
        sys.path.pop(0)
    return load_llama(path, n_ctx)


def _llama(model: Model, variant: Variant, ctx: Context) -> Result:
    src, convert_s = float_gguf(model)
    notes = [] if convert_s is None else [f"float model written as an F32 GGUF first: {convert_s:.1f} s (cached)"]
    t = time.perf_counter()
    if variant.label == "F32":
        path = src
    else:
        path = ctx.workdir / f"{variant.label}.gguf"
        llama_quantize(src, path, variant.label)
    seconds = time.perf_counter() - t + (convert_s or 0.0)
    total, q_bytes, q_weights, types = gguf_bytes(path)  # parsing the tokenizer's metadata takes seconds
    module = LlamaLogits(path, ctx.lm_window)
    how = "the F32 GGUF itself" if variant.label == "F32" else f"llama_model_quantize {variant.label}"
    return Result(module, total, q_weights, q_bytes, lambda folder: path.stat().st_size, f"{how}: {types}", notes,
                  close=module.close, compress_seconds=seconds)


# ---------------------------------------------------------------- the registry


def _fixed(pairs) -> Callable[[Model, bool], list[Variant]]:
    return lambda model, quick: [Variant(b, label) for b, label in pairs]


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("fp32", "reference", (32,), _fixed([(32, "float32")]), _fp32,
           description="the float model, the reference every row is scored against"),
    Method("rtn", "baseline", (8, 6, 4, 3, 2), _fixed([(b, f"rtn{b}") for b in (8, 6, 4, 3, 2)]), _rtn,
           description="plain round to nearest in a few lines: the floor"),
    Method("squash", "squash", (8, 6, 4, 3, 2), _fixed(SQUASH.items()), _squash, package="squash",
           description="squash's best preset per width"),
    Method("hqq", "peer", (8, 6, 4, 3, 2), _hqq_variants, _hqq, package="hqq",
           imports=("hqq.core.quantize",)),
    Method("quanto", "peer", (8, 4, 2), _fixed([(b, f"qint{b}") for b in (8, 4, 2)]), _quanto,
           package="optimum-quanto", imports=("optimum.quanto",)),
    Method("torchao", "peer", (8, 6, 4, 3, 2),
           _fixed([(8, "int8wo")] + [(b, f"int{b}wo-g64") for b in (6, 4, 3, 2)]), _torchao, package="torchao",
           imports=("torchao.quantization",)),
    Method("torchao-int4", "peer", (4,), _fixed([(4, "int4wo-g64")]), _torchao_int4, package="torchao",
           imports=("torchao.quantization",)),
    Method("bnb", "peer", (8, 4), _fixed([(8, "int8"), (4, "nf4")]), _bnb, package="bitsandbytes",
           imports=("bitsandbytes",)),
    Method("llama.cpp", "peer", (32, 8, 6, 4, 3, 2), _fixed([(b, t) for t, b in LLAMA_TYPES.items()]), _llama,
           package="llama_cpp_python", applies=_llama_applies, imports=("llama_cpp", "gguf")),
]}
