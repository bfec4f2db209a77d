"""A lean LLaMA forward with a KV cache, for batch-1 generation from packed (or float) weights.

transformers' generate spends about as long in Python per token as smollm2's matmuls take; this loop is
the model and nothing else (gpt-fast's shape). Per layer, for T new tokens at positions p … p+T−1:

    x  = h · rsqrt(mean(h²) + ε) · g₁                      # RMSNorm, (T, C)
    q, k, v = x·W_qkvᵀ  split                              # one fused matmul, (T, H·D), (T, Hkv·D) ×2
    q, k = rope(q, p), rope(k, p);  K[p:p+T], V[p:p+T] = k, v
    h = h + softmax(q·Kᵀ/√D + causal) · V · W_oᵀ          # grouped-query attention over the cache
    x  = h · rsqrt(mean(h²) + ε) · g₂
    h = h + (silu(x·W_gateᵀ) ⊙ x·W_upᵀ) · W_downᵀ          # gate and up fused into one matmul

The weights are whatever modules the model holds (nn.Linear, the reference QLinear, or PackedLinear);
projections that read the same input are fused when their storage allows (rows concatenated).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from squash.errors import SquashError
from squash.layers import rms_gain


class _FloatLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class _Split(nn.Module):
    """Several projections of one input that could not be fused: run each, concatenate."""

    def __init__(self, mods: list[nn.Module]):
        super().__init__()
        self.mods = nn.ModuleList(mods)

    def forward(self, x):
        return torch.cat([m(x) for m in self.mods], dim=-1)


def fuse(mods: list[nn.Module]) -> nn.Module:
    """One module computing cat([m(x) for m in mods], -1): rows of the weights concatenated when possible."""
    from squash.runtime.packed import PackedLinear, concat_packed

    if all(type(m) is nn.Linear for m in mods):
        bias = None if all(m.bias is None for m in mods) else torch.cat(
            [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in mods])
        return _FloatLinear(torch.cat([m.weight for m in mods]).contiguous(), bias)
    if all(isinstance(m, PackedLinear) for m in mods):
        pw = concat_packed([m.pw for m in mods])
        if pw is not None:
            bias = None if all(m.bias is None for m in mods) else torch.cat(
                [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in mods])
            return PackedLinear(pw, bias)
    return _Split(mods)


@dataclass
class Timing:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    per_token_s: list = field(default_factory=list)

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else float("nan")

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else float("nan")


class KVDecoder:
    """What every batch-1 decoder shares: a KV cache (layers, heads, positions, D) grown on demand, and the
    generation loop. A subclass sets k_cache, v_cache and max_len and implements forward(ids, pos, last_only)."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    max_len: int

    def _grow(self, need: int) -> None:
        """Room for `need` positions (doubling, at most max_len): the cache is sized by the text, not the limit."""
        cap = min(self.max_len, max(need, 2 * self.k_cache.shape[2], 256))
        grow = lambda c: torch.cat([c, c.new_zeros(c.shape[0], c.shape[1], cap - c.shape[2], c.shape[3])], 2)
        self.k_cache, self.v_cache = grow(self.k_cache), grow(self.v_cache)

    def generate(self, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, eos: int | None = None,
                 generator: torch.Generator | None = None, repetition_penalty: float = 1.0
                 ) -> tuple[list[int], Timing]:
        """Greedy (temperature 0) or sampled continuation of `ids` (T,); returns the new ids and timings.
        repetition_penalty p: logits of tokens already seen are divided by p when positive, multiplied when
        negative (transformers' rule)."""
        timing = Timing()
        t0 = time.perf_counter()
        logits = self.forward(ids, 0)
        timing.prefill_tokens, timing.prefill_s = len(ids), time.perf_counter() - t0
        out: list[int] = []
        pos = len(ids)
        for _ in range(max_new_tokens):
            last = logits[-1]
            if repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(ids.tolist()) | set(out)))
                vals = last[seen]
                last = last.clone()
                last[seen] = torch.where(vals > 0, vals / repetition_penalty, vals * repetition_penalty)
            nxt = _pick(last, temperature, generator)
            out.append(nxt)
            if (eos is not None and nxt == eos) or len(out) == max_new_tokens:
                break
            t = time.perf_counter()
            logits = self.forward(torch.tensor([nxt]), pos)
            timing.per_token_s.append(time.perf_counter() - t)
            pos += 1
        timing.decode_tokens, timing.decode_s = len(timing.per_token_s), sum(timing.per_token_s)
        return out, timing


_EMPTY = torch.empty(0)


class Decoder(KVDecoder):
    """Batch-1 inference over a transformers decoder's (possibly compressed) modules: the LLaMA family and its
    relatives, read from the module graph rather than a list of names of architectures.

    What varies between them, and where it is read from:
      norms       RMSNorm gains g, or Gemma's (1 + w), found by probing each norm module (norm_gain)
      post-norms  Gemma 2/3 norm the attention and MLP outputs too (post_attention_layernorm applied to the
                  attention output when pre_feedforward_layernorm exists)
      q/k norms   Qwen3, Gemma 3: an RMSNorm over each head of q and k before rope
      scale       the attention module's own `scaling` (Gemma: query_pre_attn_scalar^−½)
      soft-cap    Gemma 2: scores = c·tanh(scores / c); final logits likewise
      windows     sliding-window layers attend to the last `sliding_window` positions only (Mistral, Gemma)
      rope        one θ per layer type (Gemma 3: 10⁴ local, 10⁶ global); scaled rope types are refused
      MLP         the MLP's own activation (SiLU, tanh-GELU), gate and up fused (Phi-3 stores them fused)
    Plain LLaMA-style models (none of the above) take squash's fused C++ steps; the rest the PyTorch path.
    """

    def __init__(self, module: nn.Module, max_len: int = 2048):
        cfg = getattr(module, "config", None)
        m = getattr(module, "model", None)
        if cfg is None or m is None or not hasattr(m, "layers") or not hasattr(module, "lm_head"):
            raise SquashError("the fast decoder runs decoder-only transformers with model.layers and lm_head "
                              "(LLaMA, Mistral, Qwen, Gemma, Phi-3)")
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.embed = m.embed_tokens
        self.lm_head = module.lm_head
        self.norm = norm_gain(m.norm)
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        thetas = _rope_thetas(cfg)
        self.layers = []
        for i, layer in enumerate(m.layers):
            a, f = layer.self_attn, layer.mlp
            if not hasattr(layer, "input_layernorm") or not hasattr(a, "o_proj") or not hasattr(f, "down_proj"):
                raise SquashError(f"layer {i} is not a pre-norm attention + gated MLP block the decoder knows")
            gemma_style = hasattr(layer, "pre_feedforward_layernorm")
            kind = (getattr(cfg, "layer_types", None) or ["full_attention"] * len(m.layers))[i]
            window = getattr(a, "sliding_window", None) or (getattr(cfg, "sliding_window", None)
                                                            if kind == "sliding_attention" or cfg.model_type == "mistral"
                                                            else None)
            qkv = a.qkv_proj if hasattr(a, "qkv_proj") else fuse([a.q_proj, a.k_proj, a.v_proj])
            gate_up = f.gate_up_proj if hasattr(f, "gate_up_proj") else fuse([f.gate_proj, f.up_proj])
            self.layers.append(dict(
                n1=norm_gain(layer.input_layernorm),
                n2=norm_gain(layer.pre_feedforward_layernorm if gemma_style else layer.post_attention_layernorm),
                post_attn=norm_gain(layer.post_attention_layernorm) if gemma_style else None,
                post_mlp=norm_gain(layer.post_feedforward_layernorm) if gemma_style else None,
                q_norm=norm_gain(a.q_norm) if hasattr(a, "q_norm") else None,
                k_norm=norm_gain(a.k_norm) if hasattr(a, "k_norm") else None,
                scaling=float(getattr(a, "scaling", self.head_dim ** -0.5)),
                softcap=getattr(a, "attn_logit_softcapping", None) or getattr(cfg, "attn_logit_softcapping", None),
                window=window, theta=thetas[kind], act=getattr(f, "act_fn", None) or f.activation_fn,
                qkv=qkv, o=a.o_proj, gate_up=gate_up, down=f.down_proj))
        self.max_len = max_len
        self.rope = {theta: _rope_tables(theta, self.head_dim, max_len) for theta in set(thetas.values())}
        self.cos, self.sin = self.rope[self.layers[0]["theta"]]
        self.k_cache = self.v_cache = torch.zeros(len(self.layers), self.n_kv, 0, self.head_dim)  # grown on demand
        self.inter = cfg.intermediate_size
        self.embed_factor = _embed_factor(module, self.embed)
        # squash's fused C++ steps implement plain LLaMA: RMSNorm gains, SiLU, 1/√D, one θ, no windows
        self.plain = (all(L["post_attn"] is None and L["q_norm"] is None and L["softcap"] is None and L["window"] is None
                          and _is_silu(L["act"]) and abs(L["scaling"] * math.sqrt(self.head_dim) - 1) < 1e-6
                          for L in self.layers)
                      and len(self.rope) == 1 and self.final_softcap is None and self.embed_factor == 1.0)

    def _rms(self, h, g):
        return F.rms_norm(h, g.shape, g, self.eps)  # h · rsqrt(mean(h²) + ε) · g


    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: int, last_only: bool = True, fused: bool = True) -> torch.Tensor:
        """Logits for `ids` (T,) placed at positions pos … pos+T−1; the cache keeps their keys and values.
        fused: squash's fused C++ steps (rms norm, rope + cache write, silu·up) where the kernel is built;
        False runs the same math as plain PyTorch calls (the reference they are tested against)."""
        T = ids.shape[0]
        if pos + T > self.max_len:
            raise SquashError(f"context of {pos + T} tokens exceeds the decoder's {self.max_len}")
        if pos + T > self.k_cache.shape[2]:
            self._grow(pos + T)
        ext = _fused_ops() if fused and self.plain else None
        h = self.embed(ids).float()  # (T, C)  (an embedding module applies its own row scale)
        h = (h if self.embed_factor == 1.0 else h * self.embed_factor).contiguous()  # Gemma 2 scales in the model
        if ext is None:
            return self._forward_torch(h, pos, last_only)
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        cos, sin = self.cos[pos:pos + T], self.sin[pos:pos + T]
        x = ext.add_rmsnorm(h, _EMPTY, self.layers[0]["n1"], self.eps)
        own_attention = T <= ATTEND_UPTO and D % 16 == 0 and ext.has_avx512()
        for i, L in enumerate(self.layers):
            qkv = _linear(L["qkv"], x)  # (T, (H + 2·Hkv)·D)
            q = ext.rope_cache(qkv, cos, sin, self.k_cache[i], self.v_cache[i], pos, H, Hkv)  # (H, T, D)
            if own_attention:  # decoding: squash's loop over the cache, already (T, H·D)
                att = ext.attend(q, self.k_cache[i], self.v_cache[i], pos)
            else:
                K, V = self.k_cache[i, :, :pos + T], self.v_cache[i, :, :pos + T]  # (Hkv, S, D)
                att = _attention(q, K, V, T, pos).transpose(0, 1).reshape(T, H * D)
            x = ext.add_rmsnorm(h, _linear(L["o"], att), L["n2"], self.eps)
            gu = _linear(L["gate_up"], x)
            # the C++ step's scalar exp is cheaper than two PyTorch calls for a few tokens, 10× dearer for 128
            act = ext.silu_mul(gu) if own_attention else F.silu(gu[:, :gu.shape[1] // 2]) * gu[:, gu.shape[1] // 2:]
            down = _linear(L["down"], act)
            g = self.layers[i + 1]["n1"] if i + 1 < len(self.layers) else self.norm
            x = ext.add_rmsnorm(h, down, g, self.eps)  # h += down; x = the next layer's input (or the final norm)
        return _linear(self.lm_head, x[-1:] if last_only else x).float()  # (1 or T, vocab)

    def _forward_torch(self, h: torch.Tensor, pos: int, last_only: bool) -> torch.Tensor:
        T = h.shape[0]
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        for i, L in enumerate(self.layers):
            x = self._rms(h, L["n1"])
            qkv = _linear(L["qkv"], x).view(T, H + 2 * Hkv, D)  # (T, H + 2·Hkv, D)
            q, k = qkv[:, :H], qkv[:, H:H + Hkv]
            if L["q_norm"] is not None:  # per-head RMSNorm of q and k (Qwen3, Gemma 3)
                q, k = self._rms(q, L["q_norm"]), self._rms(k, L["k_norm"])
            cos, sin = self.rope[L["theta"]]
            qk = _rope(torch.cat([q, k], 1), cos, sin, pos, D)  # q and k rotated together
            q, k = qk[:, :H].transpose(0, 1), qk[:, H:].transpose(0, 1)  # (H, T, D), (Hkv, T, D)
            self.k_cache[i, :, pos:pos + T] = k
            self.v_cache[i, :, pos:pos + T] = qkv[:, H + Hkv:].transpose(0, 1)
            K, V = self.k_cache[i, :, :pos + T], self.v_cache[i, :, :pos + T]  # (Hkv, S, D)
            if L["softcap"] is None and L["window"] is None and L["scaling"] == D ** -0.5:
                att = _attention(q.contiguous(), K, V, T, pos)  # (H, T, D)
            else:
                att = _attention_general(q, K, V, T, pos, L["scaling"], L["softcap"], L["window"])
            o = _linear(L["o"], att.transpose(0, 1).reshape(T, H * D))
            h = h + (o if L["post_attn"] is None else self._rms(o, L["post_attn"]))
            x = self._rms(h, L["n2"])
            gate, up = _linear(L["gate_up"], x).split([self.inter, self.inter], dim=-1)
            down = _linear(L["down"], L["act"](gate) * up)
            h = h + (down if L["post_mlp"] is None else self._rms(down, L["post_mlp"]))
        h = self._rms(h[-1:] if last_only else h, self.norm)
        logits = _linear(self.lm_head, h).float()  # (1 or T, vocab)
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


def make_decoder(module: nn.Module, max_len: int = 2048) -> KVDecoder:
    """The lean batch-1 decoder for `module`: Decoder (RMSNorm + rope families) or PositionalDecoder (LayerNorm
    + learned positions: GPT-2, OPT). One SquashError naming both when neither fits."""
    from squash.runtime.gpt import PositionalDecoder

    try:
        return Decoder(module, max_len)
    except SquashError as first:
        try:
            return PositionalDecoder(module, max_len)
        except SquashError as second:
            raise SquashError(f"{first}; {second}") from None


def norm_gain(norm: nn.Module) -> torch.Tensor:
    """The gain g with norm(x) = x·rsqrt(mean(x²) + ε)·g: its weight w (LLaMA) or 1 + w (Gemma), found by
    probing (layers.rms_gain). A norm that is neither (a LayerNorm with a bias, mean subtraction) is refused."""
    g = rms_gain(norm)
    if g is None:
        raise SquashError(f"{type(norm).__name__} is not an RMSNorm the fast decoder knows (weight or 1 + weight)")
    return g


def _is_silu(act) -> bool:
    x = torch.linspace(-6, 6, 49)
    with torch.no_grad():
        return torch.allclose(act(x), F.silu(x), atol=1e-6)


class _Stop(Exception):
    pass


def _embed_factor(module: nn.Module, embed: nn.Module) -> float:
    """c in (first block's input) = c·embed(ids), found by running the model up to its first block on four
    tokens: 1 for most models, √hidden for Gemma 2, which scales in the model's forward rather than the
    embedding. Anything else added before the first block (learned positions) is refused."""
    seen = {}

    def grab(_, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    ids = torch.arange(1, 5)[None] % module.config.vocab_size
    handle = module.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            module(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    with torch.inference_mode():
        e = embed(ids[0]).float()
    h = seen["h"][0].float()
    c = float((h * e).sum() / e.pow(2).sum().clamp(min=1e-30))
    if not torch.allclose(h, c * e, rtol=1e-4, atol=1e-5 * float(h.abs().max())):
        raise SquashError("the model adds more than a scale to its token embeddings before the first block")
    return 1.0 if abs(c - 1.0) < 1e-6 else c


def _rope_thetas(cfg) -> dict[str, float]:
    """θ of rope per layer type; scaled rope types (linear, YaRN, longrope…) are refused."""
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    per_type = rope if rope and all(isinstance(v, dict) for v in rope.values()) else {"full_attention": rope}
    out = {}
    for kind, params in per_type.items():
        if params.get("rope_type", params.get("type", "default")) != "default":
            raise SquashError(f"rope type {params.get('rope_type')!r} is not supported by the fast decoder")
        if getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
            raise SquashError("partial rotary embeddings are not supported by the fast decoder")
        out[kind] = float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    for kind in set(getattr(cfg, "layer_types", None) or []) | {"full_attention", "sliding_attention"}:
        out.setdefault(kind, out.get("full_attention", next(iter(out.values()))))
    return out


def _rope_tables(theta: float, D: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, (max_len, D). rope(x) = x·cos + rotate_half(x)·sin, rotate_half(x) = [−x₂, x₁] =
    roll(x, D/2)·[−1…, +1…]: the sign is folded into sin so rope is one roll, two products and a sum."""
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)  # (max_len, D/2)
    return torch.cat([ang.cos()] * 2, -1), torch.cat([-ang.sin(), ang.sin()], -1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int, D: int) -> torch.Tensor:
    T = x.shape[0]  # x (T, heads, D)
    return x * cos[pos:pos + T, None] + x.roll(D // 2, -1) * sin[pos:pos + T, None]


def _attention_general(q, K, V, T: int, pos: int, scaling: float, softcap, window) -> torch.Tensor:
    """softmax(cap(q·Kᵀ·scaling) + mask)·V, (H, T, D): soft-capped scores cap(s) = c·tanh(s/c) (Gemma 2) and a
    sliding window (position t sees p with t − window < p ≤ t)."""
    H, Hkv = q.shape[0], K.shape[0]
    K, V = K.repeat_interleave(H // Hkv, 0), V.repeat_interleave(H // Hkv, 0)  # (H, S, D)
    scores = (q @ K.transpose(1, 2)) * scaling  # (H, T, S)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    t = pos + torch.arange(T)[:, None]
    p = torch.arange(pos + T)[None, :]
    allowed = p <= t
    if window:
        allowed = allowed & (p > t - window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ V


ATTEND_UPTO = 8  # new tokens: up to here ext.attend (no buffers to allocate); beyond, PyTorch's flash attention


def _fused_ops():
    from squash.runtime import kernels

    return kernels.extension() if kernels.available() else None


def _attention(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, T: int, pos: int) -> torch.Tensor:
    """softmax(q·Kᵀ/√D + causal)·V with grouped-query heads: (H, T, D) from the cache (Hkv, S, D)."""
    return F.scaled_dot_product_attention(q[None], K[None], V[None], is_causal=T > 1 and pos == 0,
                                          attn_mask=_causal(T, pos) if T > 1 and pos > 0 else None,
                                          enable_gqa=True)[0]


def _linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mod(x) without nn.Module's call machinery for the packed and float cases (≈ 10 µs a call, 200 a token)."""
    from squash.runtime.packed import PackedLinear, packed_matmul

    if type(mod) is PackedLinear:
        y = packed_matmul(x, mod.pw)
        return y if mod.bias is None else y + mod.bias
    if type(mod) in (_FloatLinear, nn.Linear):
        return F.linear(x, mod.weight, mod.bias)
    return mod(x)


def _causal(T: int, pos: int) -> torch.Tensor:
    """(T, pos+T) boolean mask: new token t sees positions ≤ pos + t."""
    return torch.arange(pos + T)[None, :] <= (pos + torch.arange(T))[:, None]


def _pick(logits: torch.Tensor, temperature: float, generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, -1)
    return int(torch.multinomial(probs, 1, generator=generator))
