"""squash's own CPU kernel (kernels.cpp), built on first use with the compiler PyTorch extensions use.

Why our own: at batch 1 the matmul ops PyTorch 2.13 ships for packed weights on CPU are slower than float32
here (`_weight_int8pack_mm` 0.2–0.6×, `_weight_int4pack_mm_for_cpu` ~0.1× of `F.linear` on smollm2's shapes;
bench/kernels.py measures it), so a packed model would save memory and lose time. The kernel reads the codes
once, dequantises 16 weights at a time into registers and multiplies them with up to 8 tokens.

    y = qmatmul(x, packed)          # (M, K) float32 → (M, N)

The build lands in the squash cache (one folder per source and torch version) and is reused.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from pathlib import Path

import torch

from squash.errors import SquashError

_SOURCE = Path(__file__).with_name("kernels.cpp")
_lock = threading.Lock()
# -ffp-contract=off: no a·b + c fused behind our back, so the W8A8 passes do the reference's float32 operations
# to the bit (the kernels' own FMAs are written as intrinsics and stay FMAs)
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
_ext = None


def build_dir() -> Path:
    """The kernel's build folder in the squash cache: one per source text, source path, torch version and flags
    (the path too: PyTorch rebuilds when build.ninja names another source file, so two checkouts sharing one
    folder would rebuild each other's kernel in turn)."""
    from squash.models import cache_dir

    digest = hashlib.sha256(_SOURCE.read_bytes() + str(_SOURCE.resolve()).encode() + torch.__version__.encode()
                            + " ".join(_CFLAGS).encode()).hexdigest()[:12]
    return cache_dir() / "kernels" / digest


def extension():
    """The compiled module (compiled once per source text and torch version, then loaded from the cache)."""
    global _ext
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is None:
            from torch.utils import cpp_extension

            build = build_dir()
            build.mkdir(parents=True, exist_ok=True)
            try:
                with open(build / "squash.lock", "w") as held:
                    # one build at a time through a lock the OS drops when its process dies; PyTorch's own
                    # lock file would make every later process wait forever after a build was killed
                    fcntl.flock(held, fcntl.LOCK_EX)
                    (build / "lock").unlink(missing_ok=True)  # only a killed build leaves it while we hold ours
                    _ext = cpp_extension.load(name=f"squash_kernels_{build.name}", sources=[str(_SOURCE)],
                                              build_directory=str(build), extra_cflags=_CFLAGS,
                                              extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:  # no compiler, no ninja: the reference path still works
                raise SquashError(f"could not build squash's CPU kernel ({type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); "
                                  "install g++ and ninja, or load without the fast runtime") from e
    return _ext


_built: bool | None = None


def available() -> bool:
    """Whether the kernel is built (or can be); asked once per process."""
    global _built
    if _built is None:
        try:
            extension()
            _built = True
        except SquashError:
            _built = False
    return _built


_NO_GRID = torch.empty(0, 16)


def qmatmul(x: torch.Tensor, codes: torch.Tensor, bits: int, grid: torch.Tensor | None, scale: torch.Tensor,
            zero: torch.Tensor, block: int, vector: bool = True) -> torch.Tensor:
    """y (M, N) = x (M, K) · Ŵᵀ with Ŵ[n, k] = scale[n, b]·(G[c[n, k]] − zero[n, b]), b = k // block."""
    return (_ext or extension()).qmatmul(x, codes, bits, _NO_GRID if grid is None else grid, scale, zero, block,
                                         vector)


os.environ.setdefault("MAX_JOBS", "2")  # the build uses this machine's 2 cores, no more


def dequantize(K: int, codes: torch.Tensor, bits: int, grid: torch.Tensor | None, scale: torch.Tensor,
               zero: torch.Tensor, block: int, n0: int, n1: int, vector: bool = True,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [n0, n1) of Ŵ as float32 (n1 − n0, K), into `out` when given."""
    empty = grid if grid is not None else _NO_GRID
    return extension().dequantize(K, codes, bits, empty, scale, zero, block, n0, n1, vector,
                                  _NO_OUT if out is None else out)


_NO_OUT = torch.empty(0)


def has_vnni() -> bool:
    """Whether the int8-activation kernel runs here (AVX-512 VNNI), asked once."""
    return available() and (_ext or extension()).has_vnni()


def qmatmul_i8(x: torch.Tensor, codes: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor,
               block: int) -> torch.Tensor:
    """y = x·Ŵᵀ with x rounded to int8 per 32-chunk (d = max|x|/127, q = round(x/d)) and uniform codes
    (G[c] = c) multiplied as integers: kernels.cpp has the formula."""
    return (_ext or extension()).qmatmul_i8(x, codes, bits, scale, zero, block)


def sparse_add(y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
               values: torch.Tensor) -> None:
    """y (M, N) += x (M, K) · Sᵀ in place, S as (row, column, value) triples sorted by row."""
    (_ext or extension()).sparse_add(y, x, rows, cols, values)


_NO_ROWS = torch.empty(0, dtype=torch.long)


def sparse_into(out: torch.Tensor, pw, n0: int = 0, rows: torch.Tensor | None = None) -> None:
    """out (R, K) += S[rows] in place for a PackedWeight's outliers S; without `rows`, out's row i is S's n0 + i."""
    (_ext or extension()).sparse_into(out, pw.sparse_rows, pw.sparse_cols, pw.sparse_value,
                                      _NO_ROWS if rows is None else rows, n0, pw.shape[0])
