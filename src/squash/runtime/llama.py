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


class Decoder:
    """Batch-1 LLaMA inference over a transformers LlamaForCausalLM's (possibly compressed) modules."""

    def __init__(self, module: nn.Module, max_len: int = 2048):
        cfg = module.config
        if getattr(cfg, "model_type", None) not in ("llama", "mistral", "qwen2") or not hasattr(module, "model"):
            raise SquashError("the fast decoder runs LLaMA-style models (llama, mistral, qwen2)")
        m = module.model
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise SquashError(f"rope type {rope.get('rope_type')!r} is not supported by the fast decoder")
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        self.embed = m.embed_tokens
        self.lm_head = module.lm_head
        self.norm = m.norm.weight.float()
        self.layers = []
        for layer in m.layers:
            a, f = layer.self_attn, layer.mlp
            self.layers.append(dict(
                n1=layer.input_layernorm.weight.float(), n2=layer.post_attention_layernorm.weight.float(),
                qkv=fuse([a.q_proj, a.k_proj, a.v_proj]), o=a.o_proj,
                gate_up=fuse([f.gate_proj, f.up_proj]), down=f.down_proj))
        self.max_len = max_len
        inv = 1.0 / theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)  # (max_len, D/2)
        # rope(x) = x·cos + rotate_half(x)·sin, rotate_half(x) = [−x₂, x₁] = roll(x, D/2)·[−1…, +1…]: the sign
        # is folded into sin so rope is one roll, two products and a sum
        self.cos = torch.cat([ang.cos()] * 2, -1)  # (max_len, D)
        self.sin = torch.cat([-ang.sin(), ang.sin()], -1)
        self.k_cache = self.v_cache = torch.zeros(len(self.layers), self.n_kv, 0, self.head_dim)  # grown on demand
        self.inter = f.gate_proj.out_features

    def _grow(self, need: int) -> None:
        """Room for `need` positions (doubling, at most max_len): the cache is sized by the text, not the limit."""
        cap = min(self.max_len, max(need, 2 * self.k_cache.shape[2], 256))
        grow = lambda c: torch.cat([c, c.new_zeros(c.shape[0], c.shape[1], cap - c.shape[2], c.shape[3])], 2)
        self.k_cache, self.v_cache = grow(self.k_cache), grow(self.v_cache)

    def _rms(self, h, g):
        return F.rms_norm(h, g.shape, g, self.eps)  # h · rsqrt(mean(h²) + ε) · g

    def _rope(self, x, pos: int):  # x (T, heads, D)
        T = x.shape[0]
        cos, sin = self.cos[pos:pos + T, None], self.sin[pos:pos + T, None]  # (T, 1, D)
        return x * cos + x.roll(self.head_dim // 2, -1) * sin

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
        ext = _fused_ops() if fused else None
        h = self.embed(ids).float().contiguous()  # (T, C)
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
            qk = self._rope(qkv[:, :H + Hkv], pos)  # q and k rotated together
            q, k = qk[:, :H].transpose(0, 1), qk[:, H:].transpose(0, 1)  # (H, T, D), (Hkv, T, D)
            self.k_cache[i, :, pos:pos + T] = k
            self.v_cache[i, :, pos:pos + T] = qkv[:, H + Hkv:].transpose(0, 1)
            K, V = self.k_cache[i, :, :pos + T], self.v_cache[i, :, :pos + T]  # (Hkv, S, D)
            att = _attention(q.contiguous(), K, V, T, pos)  # (H, T, D)
            h = h + _linear(L["o"], att.transpose(0, 1).reshape(T, H * D))
            x = self._rms(h, L["n2"])
            gate, up = _linear(L["gate_up"], x).split([self.inter, self.inter], dim=-1)
            h = h + _linear(L["down"], F.silu(gate) * up)
        h = self._rms(h[-1:] if last_only else h, self.norm)
        return _linear(self.lm_head, h).float()  # (1 or T, vocab)

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
