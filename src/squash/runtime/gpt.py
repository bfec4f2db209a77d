"""Batch-1 KV-cache decoding for the LayerNorm families with learned position tables: GPT-2 and OPT.

    h = E[ids] + P(pos)                  P: GPT-2's wpe[pos]; OPT's table at pos + 2 (its module's own forward)
    pre-norm layer:   h += o(attn(LN₁(h)));   h += fc2(act(fc1(LN₂(h))))
    post-norm layer:  h = LN₁(h + o(attn(h))); h = LN₂(h + fc2(act(fc1(h))))   (OPT-350m: do_layer_norm_before off)
    logits = lm_head(LN_f(h))            (OPT: project_in after E, project_out before the head, where present)
    attn(x) = softmax(q·Kᵀ·scaling + causal)·V over the cache, scaling read from the attention module

Every projection is whatever module the model holds (packed, reference or float): q, k and v are one fused
product (GPT-2 stores them fused; OPT's three are concatenated by rows once, like the LLaMA decoder's).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from squash.errors import SquashError
from squash.runtime.llama import KVDecoder, _attention, _linear, fuse


class PositionalDecoder(KVDecoder):
    def __init__(self, module: nn.Module, max_len: int = 2048):
        cfg = getattr(module, "config", None)
        lm_head = getattr(module, "lm_head", None)
        gpt2 = getattr(module, "transformer", None)
        opt = getattr(getattr(module, "model", None), "decoder", None)
        if cfg is None or lm_head is None:
            raise SquashError("the positional decoder runs GPT-2- and OPT-style causal LMs with an lm_head")
        self.lm_head = lm_head
        self.layers = []
        if gpt2 is not None and hasattr(gpt2, "wpe") and hasattr(gpt2, "h"):
            self.embed, self.pos_table, self.final_norm = gpt2.wte, gpt2.wpe, gpt2.ln_f
            self.positions = lambda pos, T: self.pos_table(torch.arange(pos, pos + T))
            self.project_in = self.project_out = None
            self.pre_norm = True
            for blk in gpt2.h:
                a, m = blk.attn, blk.mlp
                if getattr(a, "is_cross_attention", False):
                    raise SquashError("cross-attention GPT-2 layers are not supported by the positional decoder")
                self.layers.append(dict(n1=blk.ln_1, n2=blk.ln_2, qkv=a.c_attn, o=a.c_proj, up=m.c_fc, act=m.act,
                                        down=m.c_proj, scaling=_gpt2_scaling(a)))
            self.n_heads = cfg.n_head
        elif opt is not None and hasattr(opt, "embed_positions") and hasattr(opt, "layers"):
            self.embed, self.pos_table, self.final_norm = opt.embed_tokens, opt.embed_positions, opt.final_layer_norm
            # the table's own forward (offset 2), as OPTDecoder calls it: a mask over the whole context
            self.positions = lambda pos, T: self.pos_table(torch.ones(1, pos + T, dtype=torch.long), pos)[0]
            self.project_in, self.project_out = opt.project_in, opt.project_out
            self.pre_norm = bool(cfg.do_layer_norm_before)
            for blk in opt.layers:
                a = blk.self_attn
                self.layers.append(dict(n1=blk.self_attn_layer_norm, n2=blk.final_layer_norm,
                                        qkv=fuse([a.q_proj, a.k_proj, a.v_proj]), o=a.out_proj, up=blk.fc1,
                                        act=blk.activation_fn, down=blk.fc2, scaling=float(a.scaling)))
            self.n_heads = cfg.num_attention_heads
        else:
            raise SquashError("the positional decoder runs GPT-2 (transformer.wpe, transformer.h) and OPT "
                              "(model.decoder.embed_positions) layouts; this model has neither")
        hidden = cfg.hidden_size
        self.head_dim = hidden // self.n_heads
        self.max_len = min(max_len, _table_rows(self.pos_table))
        self.k_cache = self.v_cache = torch.zeros(len(self.layers), self.n_heads, 0, self.head_dim)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: int, last_only: bool = True) -> torch.Tensor:
        """Logits for `ids` (T,) at positions pos … pos+T−1; the cache keeps their keys and values."""
        T = ids.shape[0]
        if pos + T > self.max_len:
            raise SquashError(f"context of {pos + T} tokens exceeds the model's {self.max_len} positions")
        if pos + T > self.k_cache.shape[2]:
            self._grow(pos + T)
        H, D = self.n_heads, self.head_dim
        h = self.embed(ids).float()  # (T, C)
        if self.project_in is not None:
            h = _linear(self.project_in, h)
        h = h + self.positions(pos, T).float()
        for i, L in enumerate(self.layers):
            x = L["n1"](h) if self.pre_norm else h
            qkv = _linear(L["qkv"], x).view(T, 3, H, D)  # (T, q/k/v, H, D)
            self.k_cache[i, :, pos:pos + T] = qkv[:, 1].transpose(0, 1)
            self.v_cache[i, :, pos:pos + T] = qkv[:, 2].transpose(0, 1)
            q = qkv[:, 0].transpose(0, 1) * (L["scaling"] * math.sqrt(D))  # (H, T, D); _attention divides by √D
            K, V = self.k_cache[i, :, :pos + T], self.v_cache[i, :, :pos + T]  # (H, S, D)
            att = _attention(q.contiguous(), K, V, T, pos).transpose(0, 1).reshape(T, H * D)
            h = h + _linear(L["o"], att)
            if not self.pre_norm:
                h = L["n1"](h)
            x = L["n2"](h) if self.pre_norm else h
            h = h + _linear(L["down"], L["act"](_linear(L["up"], x)))
            if not self.pre_norm:
                h = L["n2"](h)
        h = h[-1:] if last_only else h
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.project_out is not None:
            h = _linear(self.project_out, h)
        return _linear(self.lm_head, h).float()  # (1 or T, vocab)


def _table_rows(table: nn.Module) -> int:
    """Positions a learned table holds (OPT's first two rows are its offset)."""
    w = getattr(table, "weight", None)
    rows = w.shape[0] if w is not None else getattr(table, "num_embeddings", 0)
    return rows - getattr(table, "offset", 0)


def _gpt2_scaling(attn: nn.Module) -> float:
    """The factor on q·kᵀ: the module's own `scaling` where transformers has it, else from its flags
    (1/√D when scale_attn_weights, divided by layer_idx + 1 when scale_attn_by_inverse_layer_idx)."""
    if getattr(attn, "scaling", None) is not None:
        return float(attn.scaling)
    s = attn.head_dim ** -0.5 if getattr(attn, "scale_attn_weights", True) else 1.0
    if getattr(attn, "scale_attn_by_inverse_layer_idx", False):
        s /= float(attn.layer_idx + 1)
    return s
