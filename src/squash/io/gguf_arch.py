"""Which llama.cpp architecture a transformers language model is, the hyper-parameters llama.cpp reads for it,
and how each parameter is named and laid out in the GGUF file.

Tensor names come from the `gguf` package's own tables (gguf.get_tensor_name_map, the ones llama.cpp's
convert_hf_to_gguf.py uses), so nothing here maps names by hand. What differs between architectures is
mechanism, not naming:

    rope rows   llama.cpp's LLaMA rotates interleaved pairs (rope NORM): attn_q / attn_k rows are permuted
                within each head (convert_hf_to_gguf's LlamaModel.permute). Qwen, Gemma, Phi-3 rotate halves
                (NEOX), as transformers does: rows stay.
    norm gains  llama.cpp multiplies by the stored gain g. Gemma's RMSNorm computes x̂·(1 + w): the gain each
                norm module really applies is found by probing it (layers.rms_gain) and written.
    transposed  GPT-2's Conv1D holds W as (in, out): a float one is turned back to (out, in) (compressed
                tensors are stored as (out, in) already).
    hparams     the keys llama.cpp's loader reads for the architecture (src/models/<arch>.cpp load_arch_hparams):
                sliding windows and which layers use them, soft-caps, the local rope θ.

A feature llama.cpp's architecture does not compute (a different attention scale, scaled rope) is refused with
one line rather than written as a file that runs a different model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from squash.errors import SquashError


@dataclass(frozen=True)
class Arch:
    """One llama.cpp architecture as a transformers model_type maps onto it."""

    gguf: str                      # general.architecture
    interleave_qk: bool            # LLaMA's rope NORM: attn_q / attn_k rows permuted (see rope_permutation)
    activations: tuple[str, ...]   # transformers activations llama.cpp's graph computes for this architecture
    rms: bool = True               # RMSNorm (else LayerNorm with bias: GPT-2)


SILU = ("silu", "swish")
GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
ARCHS = {
    "llama": Arch("llama", True, SILU),
    "mistral": Arch("llama", True, SILU),        # convert_hf_to_gguf writes MistralForCausalLM as llama
    "qwen2": Arch("qwen2", False, SILU),
    "qwen3": Arch("qwen3", False, SILU),
    "gemma2": Arch("gemma2", False, GELU_TANH),
    "gemma3_text": Arch("gemma3", False, GELU_TANH),
    "phi3": Arch("phi3", False, SILU),
    "gpt2": Arch("gpt2", False, GELU_TANH, rms=False),
}
# layer counts llama.cpp treats as Gemma's 27B, whose attention scale is 1/√(hidden/heads) (load_arch_hparams)
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def arch_of(model) -> Arch:
    """The llama.cpp architecture of a squash Model; one clear error for anything llama.cpp cannot run."""
    hf = (model.config or {}).get("hf_config") or {}
    mtype = hf.get("model_type")
    if model.kind != "causal-lm" or mtype not in ARCHS:
        what = f"a {model.kind} model" + (f" of type {mtype!r}" if mtype else "")
        raise SquashError(f"{model.name}: GGUF export writes the decoder language models llama.cpp runs "
                          f"(transformers model_type {', '.join(sorted(ARCHS))}); this is {what}"
                          + ("; export encoders and CNNs with --to onnx" if model.kind != "causal-lm" else ""))
    if (model.config or {}).get("resized"):
        raise SquashError(f"{model.name}: structured pruning changed layer shapes; llama.cpp needs every layer "
                          "the shape the config gives")
    arch = ARCHS[mtype]
    cfg = model.module.config
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None) or \
        getattr(cfg, "activation_function", None)
    if act not in arch.activations:
        raise SquashError(f"{model.name}: llama.cpp's {arch.gguf} computes {arch.activations[0]}; this model's "
                          f"activation is {act!r}")
    for kind, params in rope_parameters(cfg).items():
        rtype = params.get("rope_type", params.get("type", "default"))
        if rtype not in (None, "default"):
            raise SquashError(f"{model.name}: rope scaling {rtype!r} is not supported by the GGUF export yet")
    if getattr(cfg, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise SquashError(f"{model.name}: partial rotary embeddings are not supported by the GGUF export yet")
    if arch.gguf in GEMMA_27B_LAYERS:
        head_dim = cfg.head_dim
        llama_cpp = (cfg.hidden_size // cfg.num_attention_heads
                     if cfg.num_hidden_layers == GEMMA_27B_LAYERS[arch.gguf] else head_dim)
        scalar = getattr(cfg, "query_pre_attn_scalar", None) or head_dim
        if scalar != llama_cpp:
            raise SquashError(f"{model.name}: attention scale 1/√{scalar}, while llama.cpp's {arch.gguf} uses "
                              f"1/√{llama_cpp} for a model of {cfg.num_hidden_layers} layers; its GGUF would "
                              "run a different model")
    return arch


def rope_parameters(cfg) -> dict[str, dict]:
    """Rope parameters per layer type ({'full_attention': {...}}); θ falls back on cfg.rope_theta."""
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    per_type = rope if rope and all(isinstance(v, dict) for v in rope.values()) else {"full_attention": rope}
    theta = getattr(cfg, "rope_theta", None)
    return {k: ({"rope_theta": theta, **v} if theta is not None else dict(v)) for k, v in per_type.items()}


def hyperparameters(arch: Arch, cfg) -> dict[str, tuple[str, object]]:
    """The {arch}.* keys llama.cpp reads, from the model's own config: key → (GGUF value type, value).
    A list value is written as an array of that type."""
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    out: dict[str, tuple[str, object]] = {
        "context_length": ("UINT32", cfg.max_position_embeddings),
        "embedding_length": ("UINT32", hidden),
        "block_count": ("UINT32", cfg.num_hidden_layers),
        "attention.head_count": ("UINT32", heads),
        "vocab_size": ("UINT32", cfg.vocab_size),
    }
    if arch.gguf == "gpt2":
        out["feed_forward_length"] = ("UINT32", getattr(cfg, "n_inner", None) or 4 * hidden)
        out["attention.layer_norm_epsilon"] = ("FLOAT32", float(cfg.layer_norm_epsilon))
        return {f"{arch.gguf}.{k}": v for k, v in out.items()}
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    out["feed_forward_length"] = ("UINT32", cfg.intermediate_size)
    out["attention.head_count_kv"] = ("UINT32", getattr(cfg, "num_key_value_heads", None) or heads)
    out["attention.layer_norm_rms_epsilon"] = ("FLOAT32", float(cfg.rms_norm_eps))
    out["rope.dimension_count"] = ("UINT32", head_dim)
    rope = rope_parameters(cfg)
    full = rope.get("full_attention") or next(iter(rope.values()), {})
    out["rope.freq_base"] = ("FLOAT32", float(full.get("rope_theta") or 10000.0))
    if head_dim != hidden // heads or arch.gguf.startswith("gemma"):
        out["attention.key_length"] = ("UINT32", head_dim)
        out["attention.value_length"] = ("UINT32", head_dim)
    if arch.gguf.startswith("gemma"):
        window = getattr(cfg, "sliding_window", None)
        types = layer_types(arch, cfg)
        if window and "sliding_attention" in types:
            out["attention.sliding_window"] = ("UINT32", int(window))
            out["attention.sliding_window_pattern"] = ("BOOL", [t == "sliding_attention" for t in types])
            # transformers 4.x kept Gemma 3's local θ apart (rope_local_base_freq), 5.x per layer type
            local = rope.get("sliding_attention") or {"rope_theta": getattr(cfg, "rope_local_base_freq", None)
                                                      or full.get("rope_theta")}
            out["rope.freq_base_swa"] = ("FLOAT32", float(local.get("rope_theta") or 10000.0))
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(cfg, key, None):
                out[key] = ("FLOAT32", float(getattr(cfg, key)))
    return {f"{arch.gguf}.{k}": v for k, v in out.items()}


def layer_types(arch: Arch, cfg) -> list[str]:
    """"sliding_attention" / "full_attention" per layer: the config's list, or from its pattern (transformers
    4.x: every n-th layer global, Gemma 2 alternating), or all full."""
    n = cfg.num_hidden_layers
    types = list(getattr(cfg, "layer_types", None) or [])
    if len(types) == n:
        return types
    every = getattr(cfg, "sliding_window_pattern", None) or getattr(cfg, "_sliding_window_pattern", None) or \
        (2 if arch.gguf == "gemma2" else None)
    if every and getattr(cfg, "sliding_window", None):
        return ["full_attention" if (i + 1) % int(every) == 0 else "sliding_attention" for i in range(n)]
    return ["full_attention"] * n


def ignored_features(arch: Arch, cfg) -> list[str]:
    """What the model computes that llama.cpp's architecture leaves out (said in the export's notes)."""
    notes = []
    window = getattr(cfg, "sliding_window", None)
    if arch.gguf in ("llama", "phi3", "qwen2", "qwen3") and window and window < cfg.max_position_embeddings \
            and getattr(cfg, "use_sliding_window", True):
        notes.append(f"the model attends within a sliding window of {window} tokens; llama.cpp's {arch.gguf} "
                     "attends to the whole context (the same up to that length)")
    return notes


def name_map(arch: Arch, blocks: int):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf.upper()], blocks)


def allowed_tensors(arch: Arch) -> set[str]:
    """The GGUF tensor name stems (token_embd, attn_q, …) llama.cpp's architecture has."""
    import gguf

    kinds = gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.gguf.upper()]]
    return {gguf.TENSOR_NAMES[k].replace("blk.{bid}.", "") for k in kinds}


def rope_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's LLaMA stores attn_q / attn_k in: within each head, the two halves interleaved
    (convert_hf_to_gguf's LlamaModel.permute, applied to row indices): gguf_rows = hf_rows[perm]."""
    idx = np.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def same_value(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    return a == b
