"""Entropy coding of what is stored: the codes of the kept weights and the pruning mask.

A stream of n symbols from an alphabet of size A, with empirical frequencies p_a = count_a / n, cannot be
stored losslessly (by a code that knows p) in fewer than the entropy bound

    n · H(p) / 8 bytes,   H(p) = −Σ_a p_a · log2 p_a   bits a symbol.

Huffman coding (the Deep Compression choice) loses up to 1 bit a symbol against this bound; asymmetric numeral
systems (ANS, Duda 2013) come within a fraction of a percent. squash uses the ANS coder of `constriction`
(Bamler 2022) with a static categorical model built from the stored counts, so decoding is exact and needs
nothing but the counts table and the coded words.

Streams of a compressed tensor:
    codes  the codes of the kept weights in row-major order, alphabet 2^bits;
    mask   the mask in groups of four consecutive weights of a row-major stream, alphabet 16 (a nibble: bit i =
           weight i of the group kept). A 2:4 pattern then has 6 possible symbols, log2 6 / 4 ≈ 0.65 bits a weight
           at most; an unstructured mask at density d costs about H(d) bits a weight.
Stored per stream: counts (uint32, A) and the coded words (uint32); both are counted in the size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class CodedStream:
    """n symbols of an alphabet of `len(counts)`, ANS-coded into `words`."""

    counts: np.ndarray  # uint32 (A,)
    words: np.ndarray  # uint32 (m,)
    n: int

    def nbytes(self) -> int:
        return 4 * (self.counts.size + self.words.size)

    def bound_bytes(self) -> float:
        """n·H(p)/8 for the stream's own frequencies (the counts table not included)."""
        return self.n * entropy_bits(self.counts) / 8


def entropy_bits(counts: np.ndarray) -> float:
    """H(p) in bits a symbol for p = counts / Σ counts."""
    c = counts[counts > 0].astype(np.float64)
    if c.size == 0:
        return 0.0
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def _model(counts: np.ndarray):
    import constriction

    p = counts.astype(np.float64) / max(int(counts.sum()), 1)  # the same float64 on both sides: exact decoding
    return constriction.stream.model.Categorical(p, perfect=False)


def encode(symbols: np.ndarray, alphabet: int) -> CodedStream:
    """ANS-code `symbols` (integers in [0, alphabet))."""
    import constriction

    s = np.ascontiguousarray(symbols, dtype=np.int32).reshape(-1)
    counts = np.bincount(s, minlength=alphabet).astype(np.uint32)
    if counts.size != alphabet:
        raise ValueError(f"a symbol is outside the alphabet of {alphabet}")
    if s.size == 0:
        return CodedStream(counts, np.zeros(0, np.uint32), 0)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(s, _model(counts))
    return CodedStream(counts, coder.get_compressed().astype(np.uint32), int(s.size))


def decode(stream: CodedStream) -> np.ndarray:
    """The symbols again, int32 (n,)."""
    import constriction

    if stream.n == 0:
        return np.zeros(0, np.int32)
    if int(stream.counts.sum()) != stream.n:
        raise ValueError("the counts table does not add up to the stream length")
    coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(stream.words, dtype=np.uint32))
    out = coder.decode(_model(stream.counts), stream.n)
    if not coder.is_empty():
        raise ValueError("coded words left over after decoding: the stream is corrupt")
    return out


def mask_nibbles(mask: torch.Tensor) -> np.ndarray:
    """Row-major mask bits → one symbol per four weights (the last group zero-padded)."""
    bits = mask.reshape(-1).to(torch.uint8).cpu().numpy()
    bits = np.concatenate([bits, np.zeros((-bits.size) % 4, np.uint8)]).reshape(-1, 4)
    return (bits * np.array([1, 2, 4, 8], np.uint8)).sum(1)


def nibbles_to_mask(symbols: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    n = math.prod(shape)
    bits = (symbols[:, None].astype(np.uint8) >> np.arange(4, dtype=np.uint8)) & 1  # (groups, 4)
    return torch.from_numpy(bits.reshape(-1)[:n].astype(bool).copy()).reshape(shape)


def kept_codes(ct) -> np.ndarray:
    """The codes of the kept weights, row-major."""
    codes = ct.codes if ct.mask is None else ct.codes[ct.mask]
    return codes.reshape(-1).cpu().numpy()


def coded_streams(ct) -> dict[str, CodedStream]:
    """The entropy-coded streams of a CompressedTensor: "codes" and/or "mask"."""
    out = {}
    if ct.codes is not None:
        out["codes"] = encode(kept_codes(ct), 2**ct.bits)
    if ct.mask is not None:
        out["mask"] = encode(mask_nibbles(ct.mask), 16)
    return out
