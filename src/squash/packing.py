"""Bit packing of codes: n codes of b bits each → ceil(n·b / 8) bytes.

Codes are laid out as one little-endian bit stream: code i occupies stream bits [i·b, (i+1)·b), least
significant bit first, and stream bit k is bit (k mod 8) of byte k // 8. For b = 4 that is two codes a byte,
the first in the low nibble:

    byte 0 = c1 c1 c1 c1 c0 c0 c0 c0      (bit 7 … bit 0)

For b = 3 codes straddle bytes:

    byte 0 = c2 c2 c1 c1 c1 c0 c0 c0      byte 1 = c5 c4 c4 c4 c3 c3 c3 c2 …

The last byte is zero-padded. b = 8 is the identity.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def packed_size(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten uint8 `codes` (each < 2^bits) into the packed byte stream (uint8, 1-D)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits = {bits}: packing supports 1 to 8")
    c = codes.detach().reshape(-1).to(torch.uint8).cpu().numpy()
    if c.size and int(c.max()) >= 2**bits:
        raise ValueError(f"a code {int(c.max())} does not fit in {bits} bits")
    if bits == 8:
        return torch.from_numpy(c.copy())
    stream = np.unpackbits(c[:, None], axis=1, count=bits, bitorder="little")  # (n, bits), LSB first
    return torch.from_numpy(np.packbits(stream.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_codes: the first n codes of the stream, uint8, 1-D."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits = {bits}: packing supports 1 to 8")
    p = packed.detach().reshape(-1).to(torch.uint8).cpu().numpy()
    if p.size != packed_size(n, bits):
        raise ValueError(f"{p.size} packed bytes cannot hold exactly {n} codes of {bits} bits")
    if bits == 8:
        return torch.from_numpy(p.copy())
    stream = np.unpackbits(p, bitorder="little", count=n * bits).reshape(n, bits)  # (n, bits)
    return torch.from_numpy(np.packbits(stream, axis=1, bitorder="little").reshape(-1))
