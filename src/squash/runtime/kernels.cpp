// squash's CPU kernel: y = x · Ŵᵀ computed straight from packed codes, never materialising Ŵ.
//
//   Ŵ[n, k] = s[n, b] · (G[c[n, k]] − z[n, b]),   b = k / block
//   y[m, n] = Σ_b s[n, b] · Σ_{k ∈ b} x[m, k] · (G[c[n, k]] − z[n, b])
//
// Codes are laid out per row:
//   bits = 8: one byte a code, c[n, k] at codes[n, k]; G is the identity (levels 0…255).
//   bits = 4: 32 codes in 16 bytes; byte i of a chunk holds code i in its low nibble and code i + 16 in its
//             high nibble (ggml's Q4_0 order), so one 16-byte load gives two 16-lane vectors with a mask and a
//             shift. G has 16 levels per row (or one row for the whole tensor): uniform, NF4 or a codebook.
// Each block is dequantised into registers 16 weights at a time and used for up to 8 rows of x before the
// next 16 are read (weights stream from memory once per 8 tokens; at batch 1 the kernel is bound by the
// bytes of the codes). Rows of the output are split over threads with at::parallel_for.
//
// A scalar version of the same loop serves CPUs without AVX-512 and is what the vector code is tested against
// (besides the dequantize-then-matmul reference in Python).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>

namespace {

struct Args {
  const float* x; int64_t M, K;      // (M, K)
  const uint8_t* codes; int64_t row_bytes, bits;
  const float* grid; int64_t grid_rows;  // (grid_rows, 16); unused for bits = 8
  const float* scale; const float* zero; int64_t nblocks, block;  // (N, nblocks)
  int64_t zstep;                     // 1: a zero per block; 0: one zero for the tensor (symmetric)
  float* y; int64_t N;               // (M, N)
};

inline float level_scalar(const Args& a, int64_t n, int64_t k) {
  const uint8_t* row = a.codes + n * a.row_bytes;
  if (a.bits == 8) return static_cast<float>(row[k]);
  const int64_t chunk = k / 32, i = k % 32;
  const uint8_t byte = row[chunk * 16 + (i % 16)];
  const int code = i < 16 ? (byte & 0xF) : (byte >> 4);
  const float* g = a.grid + (a.grid_rows == 1 ? 0 : n * 16);
  return g[code];
}

void rows_scalar(const Args& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.x + m * a.K;
      double total = 0.0;  // the scalar path is the exact one: accumulate in double
      for (int64_t b = 0; b < a.nblocks; ++b) {
        const float s = a.scale[n * a.nblocks + b], z = a.zero[(n * a.nblocks + b) * a.zstep];
        const int64_t k1 = std::min(a.K, (b + 1) * a.block);
        double acc = 0.0;
        for (int64_t k = b * a.block; k < k1; ++k) acc += double(x[k]) * (level_scalar(a, n, k) - z);
        total += double(s) * acc;
      }
      a.y[m * a.N + n] = static_cast<float>(total);
    }
  }
}

// ---------------------------------------------------------------- AVX-512

#define SQUASH_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

// 16 dequantised weights s·(G[c] − z) for k ∈ [k, k + 16) of an 8-bit row (masked at the tail).
SQUASH_AVX512 inline __m512 weights8(const uint8_t* row, int64_t k, __mmask16 mask, __m512 s, __m512 zs) {
  const __m128i bytes = _mm_maskz_loadu_epi8(mask, row + k);
  const __m512 lv = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
  return _mm512_fmsub_ps(lv, s, zs);  // G[c]·s − z·s
}

// One FMA chain has a 4-cycle latency: C independent accumulators per token row keep the FMA units busy when
// there are few tokens (C·MB ≥ 4 chains). Whole 64-weight steps run unmasked; a block's ragged end is masked.
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

template <int MB, int C>
SQUASH_AVX512 inline void fma4(const Args& a, int64_t m0, int64_t k, const __m512 (&w)[4], __m512 (&acc)[MB][C]) {
  for (int j = 0; j < MB; ++j) {
    const float* xr = a.x + (m0 + j) * a.K + k;
    for (int u = 0; u < 4; ++u) acc[j][u % C] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16 * u), w[u], acc[j][u % C]);
  }
}

template <int MB, int C>
SQUASH_AVX512 void row8(const Args& a, int64_t n, int64_t m0) {
  const uint8_t* row = a.codes + n * a.row_bytes;
  __m512 acc[MB][C];
  for (int j = 0; j < MB; ++j)
    for (int u = 0; u < C; ++u) acc[j][u] = _mm512_setzero_ps();
  for (int64_t b = 0; b < a.nblocks; ++b) {
    const float sf = a.scale[n * a.nblocks + b];
    const __m512 s = _mm512_set1_ps(sf), zs = _mm512_set1_ps(sf * a.zero[(n * a.nblocks + b) * a.zstep]);
    const int64_t k1 = std::min(a.K, (b + 1) * a.block);
    int64_t k = b * a.block;
    for (; k + 64 <= k1; k += 64) {
      __m512 w[4];
      for (int u = 0; u < 4; ++u) w[u] = weights8(row, k + 16 * u, (__mmask16)0xFFFF, s, zs);
      fma4<MB, C>(a, m0, k, w, acc);
    }
    for (; k < k1; k += 16) {
      const __mmask16 mask = tail_mask(k1 - k);
      const __m512 w = weights8(row, k, mask, s, zs);
      for (int j = 0; j < MB; ++j)
        acc[j][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a.x + (m0 + j) * a.K + k), w, acc[j][0]);
    }
  }
  for (int j = 0; j < MB; ++j) {
    for (int u = 1; u < C; ++u) acc[j][0] = _mm512_add_ps(acc[j][0], acc[j][u]);
    a.y[(m0 + j) * a.N + n] = _mm512_reduce_add_ps(acc[j][0]);
  }
}

// 32 codes (16 bytes) → two vectors of dequantised weights s·(G[c] − z).
SQUASH_AVX512 inline void weights4(const uint8_t* bytes, __m512 g, __m512 s, __m512 zs, __m512& w0, __m512& w1) {
  const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  w0 = _mm512_fmsub_ps(_mm512_permutexvar_ps(_mm512_and_si512(c, _mm512_set1_epi32(0xF)), g), s, zs);
  w1 = _mm512_fmsub_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), g), s, zs);
}

template <int MB, int C>
SQUASH_AVX512 void row4(const Args& a, int64_t n, int64_t m0) {
  const uint8_t* row = a.codes + n * a.row_bytes;
  const __m512 g = _mm512_loadu_ps(a.grid + (a.grid_rows == 1 ? 0 : n * 16));
  __m512 acc[MB][C];
  for (int j = 0; j < MB; ++j)
    for (int u = 0; u < C; ++u) acc[j][u] = _mm512_setzero_ps();
  for (int64_t b = 0; b < a.nblocks; ++b) {
    const float sf = a.scale[n * a.nblocks + b];
    const __m512 s = _mm512_set1_ps(sf), zs = _mm512_set1_ps(sf * a.zero[(n * a.nblocks + b) * a.zstep]);
    const int64_t k1 = std::min(a.K, (b + 1) * a.block);
    int64_t k = b * a.block;  // a multiple of 32: blocks are multiples of 32 or the whole row
    for (; k + 64 <= k1; k += 64) {
      __m512 w[4];
      weights4(row + k / 2, g, s, zs, w[0], w[1]);
      weights4(row + k / 2 + 16, g, s, zs, w[2], w[3]);
      fma4<MB, C>(a, m0, k, w, acc);
    }
    for (; k < k1; k += 32) {  // the last 32 (or fewer) codes of the block
      __m512 w0, w1;
      weights4(row + k / 2, g, s, zs, w0, w1);
      const __mmask16 m0mask = tail_mask(k1 - k), m1mask = tail_mask(k1 - k - 16);
      for (int j = 0; j < MB; ++j) {
        const float* xr = a.x + (m0 + j) * a.K + k;
        acc[j][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m0mask, xr), w0, acc[j][0]);
        acc[j][C - 1] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m1mask, xr + 16), w1, acc[j][C - 1]);
      }
    }
  }
  for (int j = 0; j < MB; ++j) {
    for (int u = 1; u < C; ++u) acc[j][0] = _mm512_add_ps(acc[j][0], acc[j][u]);
    a.y[(m0 + j) * a.N + n] = _mm512_reduce_add_ps(acc[j][0]);
  }
}

template <int MB>
SQUASH_AVX512 void row_any(const Args& a, int64_t n, int64_t m0) {
  constexpr int C = MB >= 4 ? 1 : (MB >= 2 ? 2 : 4);
  if (a.bits == 8) row8<MB, C>(a, n, m0); else row4<MB, C>(a, n, m0);
}

SQUASH_AVX512 void rows_avx512(const Args& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 8 <= a.M; m += 8) row_any<8>(a, n, m);
    switch (a.M - m) {
      case 7: row_any<7>(a, n, m); break;
      case 6: row_any<6>(a, n, m); break;
      case 5: row_any<5>(a, n, m); break;
      case 4: row_any<4>(a, n, m); break;
      case 3: row_any<3>(a, n, m); break;
      case 2: row_any<2>(a, n, m); break;
      case 1: row_any<1>(a, n, m); break;
      default: break;
    }
  }
}

// Rows n0 … n1 of Ŵ written out as float32 (for many tokens at once: tiles of Ŵ go to a float GEMM).
SQUASH_AVX512 void dequant_rows_avx512(const Args& a, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.codes + n * a.row_bytes;
    float* o = out + (n - n0) * a.K;
    const __m512 g = a.bits == 4 ? _mm512_loadu_ps(a.grid + (a.grid_rows == 1 ? 0 : n * 16)) : _mm512_setzero_ps();
    for (int64_t b = 0; b < a.nblocks; ++b) {
      const float sf = a.scale[n * a.nblocks + b];
      const __m512 s = _mm512_set1_ps(sf), zs = _mm512_set1_ps(sf * a.zero[(n * a.nblocks + b) * a.zstep]);
      const int64_t k1 = std::min(a.K, (b + 1) * a.block);
      if (a.bits == 8) {
        for (int64_t k = b * a.block; k < k1; k += 16) {
          const __mmask16 mask = tail_mask(k1 - k);
          _mm512_mask_storeu_ps(o + k, mask, weights8(row, k, mask, s, zs));
        }
      } else {
        for (int64_t k = b * a.block; k < k1; k += 32) {
          __m512 w0, w1;
          weights4(row + k / 2, g, s, zs, w0, w1);
          _mm512_mask_storeu_ps(o + k, tail_mask(k1 - k), w0);
          _mm512_mask_storeu_ps(o + k + 16, tail_mask(k1 - k - 16), w1);
        }
      }
    }
  }
}

void dequant_rows_scalar(const Args& a, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t b = 0; b < a.nblocks; ++b) {
      const float s = a.scale[n * a.nblocks + b], z = a.zero[(n * a.nblocks + b) * a.zstep];
      for (int64_t k = b * a.block; k < std::min(a.K, (b + 1) * a.block); ++k)
        out[(n - n0) * a.K + k] = s * (level_scalar(a, n, k) - z);
    }
}

// ---------------------------------------------------------------- AVX2 + FMA (CPUs without AVX-512)
// The same products 8 weights at a time. Codes are whole 8- or 32-weight chunks here; what a block leaves over
// (a row length that is not a multiple of 8 or 32) goes through the scalar level lookup.

#define SQUASH_AVX2 __attribute__((target("avx2,fma")))

// 8 dequantised weights s·(c − z) of an 8-bit row, k … k + 7.
SQUASH_AVX2 inline __m256 weights8_avx2(const uint8_t* row, int64_t k, __m256 s, __m256 zs) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k));
  return _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), s, zs);
}

// G[c] for 8 codes c ∈ 0 … 15: two 8-entry permutes, bit 3 of c (moved to the sign bit) picks between them.
SQUASH_AVX2 inline __m256 lookup16(__m256i c, __m256 glo, __m256 ghi) {
  const __m256 lo = _mm256_permutevar8x32_ps(glo, c), hi = _mm256_permutevar8x32_ps(ghi, c);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
}

// One 32-code chunk (16 bytes: byte i = c[i] | c[i + 16] << 4) → 4 vectors: weights k … k+7, k+8 … 15,
// k+16 … 23, k+24 … 31.
SQUASH_AVX2 inline void weights4_avx2(const uint8_t* bytes, __m256 glo, __m256 ghi, __m256 s, __m256 zs,
                                      __m256 (&w)[4]) {
  const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
  const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8)));
  const __m256i nib = _mm256_set1_epi32(0xF);
  w[0] = _mm256_fmsub_ps(lookup16(_mm256_and_si256(lo, nib), glo, ghi), s, zs);
  w[1] = _mm256_fmsub_ps(lookup16(_mm256_and_si256(hi, nib), glo, ghi), s, zs);
  w[2] = _mm256_fmsub_ps(lookup16(_mm256_srli_epi32(lo, 4), glo, ghi), s, zs);
  w[3] = _mm256_fmsub_ps(lookup16(_mm256_srli_epi32(hi, 4), glo, ghi), s, zs);
}

SQUASH_AVX2 inline float hsum_avx2(__m256 v) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps(d, d, 1)));
}

template <int MB>
SQUASH_AVX2 void row_avx2(const Args& a, int64_t n, int64_t m0) {
  const uint8_t* row = a.codes + n * a.row_bytes;
  const float* g = a.bits == 4 ? a.grid + (a.grid_rows == 1 ? 0 : n * 16) : nullptr;
  const __m256 glo = g ? _mm256_loadu_ps(g) : _mm256_setzero_ps(), ghi = g ? _mm256_loadu_ps(g + 8) : glo;
  __m256 acc[MB][2];
  float tail[MB];
  for (int j = 0; j < MB; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps(), tail[j] = 0.f;
  for (int64_t b = 0; b < a.nblocks; ++b) {
    const float sf = a.scale[n * a.nblocks + b], z = a.zero[(n * a.nblocks + b) * a.zstep];
    const __m256 s = _mm256_set1_ps(sf), zs = _mm256_set1_ps(sf * z);
    const int64_t k1 = std::min(a.K, (b + 1) * a.block);
    int64_t k = b * a.block;
    if (a.bits == 8) {
      for (; k + 16 <= k1; k += 16) {
        const __m256 w0 = weights8_avx2(row, k, s, zs), w1 = weights8_avx2(row, k + 8, s, zs);
        for (int j = 0; j < MB; ++j) {
          const float* xr = a.x + (m0 + j) * a.K + k;
          acc[j][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w0, acc[j][0]);
          acc[j][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), w1, acc[j][1]);
        }
      }
    } else {  // k is a multiple of 32 here: blocks are multiples of 32 or the whole row
      for (; k + 32 <= k1; k += 32) {
        __m256 w[4];
        weights4_avx2(row + k / 2, glo, ghi, s, zs, w);
        for (int j = 0; j < MB; ++j) {
          const float* xr = a.x + (m0 + j) * a.K + k;
          for (int u = 0; u < 4; ++u) acc[j][u & 1] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8 * u), w[u], acc[j][u & 1]);
        }
      }
    }
    for (; k < k1; ++k) {  // the row's ragged end
      const float wv = sf * (level_scalar(a, n, k) - z);
      for (int j = 0; j < MB; ++j) tail[j] += a.x[(m0 + j) * a.K + k] * wv;
    }
  }
  for (int j = 0; j < MB; ++j) a.y[(m0 + j) * a.N + n] = hsum_avx2(_mm256_add_ps(acc[j][0], acc[j][1])) + tail[j];
}

SQUASH_AVX2 void rows_avx2(const Args& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) row_avx2<4>(a, n, m);
    switch (a.M - m) {
      case 3: row_avx2<3>(a, n, m); break;
      case 2: row_avx2<2>(a, n, m); break;
      case 1: row_avx2<1>(a, n, m); break;
      default: break;
    }
  }
}

SQUASH_AVX2 void dequant_rows_avx2(const Args& a, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.codes + n * a.row_bytes;
    float* o = out + (n - n0) * a.K;
    const float* g = a.bits == 4 ? a.grid + (a.grid_rows == 1 ? 0 : n * 16) : nullptr;
    const __m256 glo = g ? _mm256_loadu_ps(g) : _mm256_setzero_ps(), ghi = g ? _mm256_loadu_ps(g + 8) : glo;
    for (int64_t b = 0; b < a.nblocks; ++b) {
      const float sf = a.scale[n * a.nblocks + b], z = a.zero[(n * a.nblocks + b) * a.zstep];
      const __m256 s = _mm256_set1_ps(sf), zs = _mm256_set1_ps(sf * z);
      const int64_t k1 = std::min(a.K, (b + 1) * a.block);
      int64_t k = b * a.block;
      if (a.bits == 8) {
        for (; k + 8 <= k1; k += 8) _mm256_storeu_ps(o + k, weights8_avx2(row, k, s, zs));
      } else {
        for (; k + 32 <= k1; k += 32) {
          __m256 w[4];
          weights4_avx2(row + k / 2, glo, ghi, s, zs, w);
          for (int u = 0; u < 4; ++u) _mm256_storeu_ps(o + k + 8 * u, w[u]);
        }
      }
      for (; k < k1; ++k) o[k] = sf * (level_scalar(a, n, k) - z);
    }
  }
}

bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

}  // namespace

// Checks the packed arrays and fills Args (x and y left for the caller).
Args check_args(int64_t K, torch::Tensor codes, int64_t bits, torch::Tensor grid, torch::Tensor scale,
                torch::Tensor zero, int64_t block) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kUInt8 && codes.is_contiguous(), "codes: uint8 (N, bytes)");
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  const int64_t N = codes.size(0);
  const int64_t need = bits == 8 ? K : (K + 31) / 32 * 16;
  TORCH_CHECK(codes.size(1) == need, "codes hold ", codes.size(1), " bytes a row; ", need, " expected");
  TORCH_CHECK(block > 0 && (block >= K || block % (bits == 8 ? 16 : 32) == 0), "block ", block, " unsupported");
  const int64_t nblocks = (K + block - 1) / block;
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.dim() == 2 && scale.size(0) == N &&
              scale.size(1) == nblocks, "scale: float32 (N, blocks)");
  TORCH_CHECK(zero.scalar_type() == torch::kFloat32 && zero.is_contiguous() && (zero.sizes() == scale.sizes() || zero.numel() == 1),
              "zero: like scale, or one value");
  if (bits == 4) {
    TORCH_CHECK(grid.scalar_type() == torch::kFloat32 && grid.is_contiguous() && grid.dim() == 2 && grid.size(1) == 16 &&
                (grid.size(0) == 1 || grid.size(0) == N), "grid: float32 (1 or N, 16)");
  }
  return Args{nullptr, 0, K, codes.data_ptr<uint8_t>(), codes.size(1), bits,
              bits == 4 ? grid.data_ptr<float>() : nullptr, bits == 4 ? grid.size(0) : 0,
              scale.data_ptr<float>(), zero.data_ptr<float>(), nblocks, block, zero.numel() == 1 ? 0 : 1, nullptr, N};
}

// y (M, N) = x (M, K) · Ŵᵀ. `vector` = false forces the scalar loop (for tests).
torch::Tensor qmatmul(torch::Tensor x, torch::Tensor codes, int64_t bits, torch::Tensor grid,
                      torch::Tensor scale, torch::Tensor zero, int64_t block, bool vector) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 (M, K)");
  Args a = check_args(x.size(1), codes, bits, grid, scale, zero, block);
  const int64_t M = x.size(0), K = x.size(1), N = a.N;
  auto y = torch::empty({M, N}, x.options());
  a.x = x.data_ptr<float>();
  a.M = M;
  a.y = y.data_ptr<float>();
  const bool simd = vector && has_avx512(), simd2 = vector && !simd && has_avx2();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * M));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    if (simd) rows_avx512(a, n0, n1); else if (simd2) rows_avx2(a, n0, n1); else rows_scalar(a, n0, n1);
  });
  return y;
}

// Rows [n0, n1) of Ŵ as float32 (n1 − n0, K).
// `out`, when given (numel > 0), is written instead of a new tensor: a reused tile is not page-faulted in again.
torch::Tensor dequantize(int64_t K, torch::Tensor codes, int64_t bits, torch::Tensor grid, torch::Tensor scale,
                         torch::Tensor zero, int64_t block, int64_t n0, int64_t n1, bool vector, torch::Tensor out) {
  Args a = check_args(K, codes, bits, grid, scale, zero, block);
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= a.N, "rows out of range");
  if (out.numel() == 0) out = torch::empty({n1 - n0, K}, torch::dtype(torch::kFloat32));
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.dim() == 2 && out.size(0) == n1 - n0 &&
              out.size(1) == K, "out: contiguous float32 (rows, K)");
  float* o = out.data_ptr<float>();
  const bool simd = vector && has_avx512(), simd2 = vector && !simd && has_avx2();
  at::parallel_for(n0, n1, std::max<int64_t>(1, 16384 / K), [&](int64_t r0, int64_t r1) {
    float* dst = o + (r0 - n0) * K;
    if (simd) dequant_rows_avx512(a, r0, r1, dst);
    else if (simd2) dequant_rows_avx2(a, r0, r1, dst);
    else dequant_rows_scalar(a, r0, r1, dst);
  });
  return out;
}

// ---------------------------------------------------------------- the decoder's small fused steps
// Each replaces 4-12 PyTorch calls whose Python and dispatch overhead, not arithmetic, is what they cost at
// batch 1 (a few microseconds each, ~50 per layer). Plain loops; the compiler vectorises them.

// x = h · rsqrt(mean(h²) + ε) · g, per row of h (T, C); with `delta` defined, h += delta first (in place).
torch::Tensor add_rmsnorm(torch::Tensor h, torch::Tensor delta, torch::Tensor g, double eps) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == torch::kFloat32 && h.is_contiguous(), "h: contiguous float32 (T, C)");
  TORCH_CHECK(g.scalar_type() == torch::kFloat32 && g.is_contiguous() && g.numel() == h.size(1), "g: float32 (C,)");
  const bool add = delta.defined() && delta.numel() > 0;
  if (add) TORCH_CHECK(delta.sizes() == h.sizes() && delta.scalar_type() == torch::kFloat32 && delta.is_contiguous(), "delta: like h");
  const int64_t T = h.size(0), C = h.size(1);
  auto x = torch::empty_like(h);
  float* hp = h.data_ptr<float>();
  const float* dp = add ? delta.data_ptr<float>() : nullptr;
  const float* gp = g.data_ptr<float>();
  float* xp = x.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {  // one thread up to 16 rows (decoding)
    for (int64_t t = t0; t < t1; ++t) {
      float* hr = hp + t * C;
      if (add)
        for (int64_t c = 0; c < C; ++c) hr[c] += dp[t * C + c];
      float ss = 0.f;
      for (int64_t c = 0; c < C; ++c) ss += hr[c] * hr[c];
      const float r = 1.f / std::sqrt(ss / C + static_cast<float>(eps));
      for (int64_t c = 0; c < C; ++c) xp[t * C + c] = hr[c] * r * gp[c];
    }
  });
  return x;
}

// out (T, I) = silu(gu[:, :I]) ⊙ gu[:, I:],  silu(a) = a / (1 + e^−a)
torch::Tensor silu_mul(torch::Tensor gu) {
  TORCH_CHECK(gu.dim() == 2 && gu.scalar_type() == torch::kFloat32 && gu.is_contiguous() && gu.size(1) % 2 == 0, "gu: float32 (T, 2I)");
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  auto out = torch::empty({T, I}, gu.options());
  const float* p = gu.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < I; ++i) {
      const float a = p[t * 2 * I + i];
      o[t * I + i] = a / (1.f + std::exp(-a)) * p[t * 2 * I + I + i];
    }
  return out;
}

// From the fused projection qkv (T, (H + 2·Hkv)·D): rotate q and k by position (rope with rotate_half:
// out[d] = x[d]·cos[d] + x[(d + D/2) mod D]·sin[d], sin carrying the sign), write k and v into the layer's
// caches (Hkv, capacity, D) at positions pos … pos+T−1, and return q as (H, T, D).
torch::Tensor rope_cache(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                         torch::Tensor v_cache, int64_t pos, int64_t H, int64_t Hkv) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == torch::kFloat32 && qkv.is_contiguous(), "qkv: float32 (T, ·)");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes(), "caches: (Hkv, cap, D)");
  const int64_t T = qkv.size(0), D = k_cache.size(2), cap = k_cache.size(1), half = D / 2;
  TORCH_CHECK(qkv.size(1) == (H + 2 * Hkv) * D && k_cache.size(0) == Hkv && pos + T <= cap, "shapes do not fit");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(0) >= T && cos.size(1) == D, "cos/sin: (≥T, D)");
  auto q = torch::empty({H, T, D}, qkv.options());
  const float* src = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* kp = k_cache.data_ptr<float>();
  float* vp = v_cache.data_ptr<float>();
  const int64_t W = (H + 2 * Hkv) * D;
  for (int64_t t = 0; t < T; ++t) {
    const float* row = src + t * W;
    const float* c = cp + t * D;
    const float* sn = sp + t * D;
    for (int64_t head = 0; head < H + Hkv; ++head) {
      const float* x = row + head * D;
      float* out = head < H ? qp + (head * T + t) * D : kp + ((head - H) * cap + pos + t) * D;
      for (int64_t d = 0; d < D; ++d) out[d] = x[d] * c[d] + x[d < half ? d + half : d - half] * sn[d];
    }
    for (int64_t j = 0; j < Hkv; ++j)
      std::memcpy(vp + (j * cap + pos + t) * D, row + (H + Hkv + j) * D, D * sizeof(float));
  }
  return q;
}

// ---------------------------------------------------------------- int8 activations × packed codes (VNNI)
// llama.cpp's way of making batch-1 low-bit matmuls cheap: round x to int8 per 32-value chunk j,
//   x[m, k] ≈ d[m, j] · q[m, k],   d = max|x_chunk| / 127,  q = round(x / d)
// and multiply the integer codes with the integer q four at a time (vpdpbusd: u8 code × s8 q → int32):
//   y[m, n] = Σ_b s[n, b] · ( Σ_{j ∈ b} d[m, j] · Σ_{k ∈ j} c[n, k] · q[m, k]  −  z[n, b] · E[m, b] ),
//   E[m, b] = Σ_{j ∈ b} d[m, j] · Σ_{k ∈ j} q[m, k]
// for uniform grids (G[c] = c: 8-bit codes, 4-bit uniform codes). The float kernel above spends ~5 cycles per 16
// weights turning codes into floats; here 64 weights cost one multiply-add instruction per token. The price is
// the activation rounding (relative error ≤ 1/254 of a chunk's largest value), which the tests and the bench
// measure. Requires K and the blocks to be multiples of 32.

namespace {

#define SQUASH_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

struct QX {                 // x rounded to int8 per 32-chunk
  const int8_t* q;          // (M, K)
  const float* dexp;        // (M, K/4): d[m, j] repeated 8 times, so 16 floats at 8j are [d_j ×8, d_j+1 ×8]
  const float* E;           // (M, nblocks)
};

// 64 codes at k (two 32-chunks) as bytes in k order.
template <int BITS>
SQUASH_VNNI inline __m512i codes64(const uint8_t* row, int64_t k) {
  if (BITS == 8) return _mm512_loadu_si512(row + k);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (k >> 1)));
  const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi8(0xF));
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0xF));
  const __m512i c = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);  // [lo_j, lo_j+1, hi_j, hi_j+1]
  return _mm512_shuffle_i64x2(c, c, _MM_SHUFFLE(3, 1, 2, 0));               // [lo_j, hi_j, lo_j+1, hi_j+1]
}

// 32 codes at k (one chunk) in the low half, zeros above.
template <int BITS>
SQUASH_VNNI inline __m512i codes32(const uint8_t* row, int64_t k) {
  if (BITS == 8) return _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k)));
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + (k >> 1)));
  const __m128i lo = _mm_and_si128(v, _mm_set1_epi8(0xF));
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0xF));
  return _mm512_zextsi256_si512(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
}

// acc[j] += float(codes · q_j) · d_j · s for 64 weights at k (two chunks; sv holds each chunk's weight scale).
template <int MB>
SQUASH_VNNI inline void dot64(__m512i c, const int8_t* const (&q)[MB], const float* const (&dx)[MB], int64_t k,
                              __m512 sv, __m512 (&acc)[MB]) {
  for (int j = 0; j < MB; ++j) {
    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, _mm512_loadu_si512(q[j] + k));
    acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(_mm512_loadu_ps(dx[j] + (k >> 2)), sv), acc[j]);
  }
}

// The per-block work is what costs at small blocks (group 32-64), so it is kept to a scale broadcast: blocks of
// 32 take two scales per 64 weights in one vector, and the zero-point term is one dot product over blocks
// after the row.
template <int MB, int BITS>
SQUASH_VNNI void rowq(const Args& a, const QX& x, int64_t n, int64_t m0) {
  const int64_t K = a.K, nb = a.nblocks, blk = a.block;
  const uint8_t* row = a.codes + n * a.row_bytes;
  const float* srow = a.scale + n * nb;
  const int8_t* q[MB];
  const float* dx[MB];
  __m512 acc[MB];
  for (int j = 0; j < MB; ++j) {
    q[j] = x.q + (m0 + j) * K, dx[j] = x.dexp + (m0 + j) * (K >> 2);
    acc[j] = _mm512_setzero_ps();
  }
  if (blk == 32 && K % 64 == 0) {
    for (int64_t k = 0; k < K; k += 64) {
      const __m512 sv = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(srow[k >> 5])),
                                                            _mm256_castps_pd(_mm256_set1_ps(srow[(k >> 5) + 1])), 1));
      dot64<MB>(codes64<BITS>(row, k), q, dx, k, sv, acc);
    }
  } else if (blk >= 64 && (blk & (blk - 1)) == 0 && K % 64 == 0) {  // groups of 64, 128, …: scale index k >> log2
    const int shift = __builtin_ctzll(blk);
    for (int64_t k = 0; k < K; k += 64) dot64<MB>(codes64<BITS>(row, k), q, dx, k, _mm512_set1_ps(srow[k >> shift]), acc);
  } else {
    for (int64_t b = 0; b < nb; ++b) {
      const __m512 sv = _mm512_set1_ps(srow[b]);
      const int64_t k1 = std::min(K, (b + 1) * blk);
      int64_t k = b * blk;
      for (; k + 64 <= k1; k += 64) dot64<MB>(codes64<BITS>(row, k), q, dx, k, sv, acc);
      if (k < k1) {  // one chunk left in the block: the upper 8 lanes are zero codes and zero scales
        const __m512i c = codes32<BITS>(row, k);
        for (int j = 0; j < MB; ++j) {
          const __m512i qj = _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[j] + k)));
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, qj);
          acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(_mm512_maskz_loadu_ps(0xFF, dx[j] + (k >> 2)), sv),
                                   acc[j]);
        }
      }
    }
  }
  // − Σ_b s[b]·z[b]·E[m, b], 16 blocks at a time
  for (int j = 0; j < MB; ++j) {
    const float* E = x.E + (m0 + j) * nb;
    __m512 zacc = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b += 16) {
      const __mmask16 mask = tail_mask(nb - b);
      const __m512 se = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, srow + b), _mm512_maskz_loadu_ps(mask, E + b));
      const __m512 z = a.zstep ? _mm512_maskz_loadu_ps(mask, a.zero + n * nb + b) : _mm512_set1_ps(a.zero[0]);
      zacc = _mm512_fmadd_ps(se, z, zacc);
    }
    a.y[(m0 + j) * a.N + n] = _mm512_reduce_add_ps(acc[j]) - _mm512_reduce_add_ps(zacc);
  }
}

template <int BITS>
SQUASH_VNNI void rowsq_bits(const Args& a, const QX& x, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) rowq<4, BITS>(a, x, n, m);
    switch (a.M - m) {
      case 3: rowq<3, BITS>(a, x, n, m); break;
      case 2: rowq<2, BITS>(a, x, n, m); break;
      case 1: rowq<1, BITS>(a, x, n, m); break;
      default: break;
    }
  }
}

SQUASH_VNNI void rowsq(const Args& a, const QX& x, int64_t n0, int64_t n1) {
  if (a.bits == 8) rowsq_bits<8>(a, x, n0, n1); else rowsq_bits<4>(a, x, n0, n1);
}

// One 32-chunk: q = round(x / d) (0 where d = 0), d written 8 times; returns d · Σ q.
SQUASH_AVX512 float quantize_chunk(const float* x, int8_t* q, float* dexp) {
  const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
  const float d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1))) / 127.f;
  _mm256_storeu_ps(dexp, _mm256_set1_ps(d));
  if (d == 0.f) {
    std::memset(q, 0, 32);
    return 0.f;
  }
  const __m512 dv = _mm512_set1_ps(d);
  const int rn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  // |x / d| ≤ 127 by construction: no clamp needed before the conversion
  const __m512i q0 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(x0, dv), rn));
  const __m512i q1 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(x1, dv), rn));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(q0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtsepi32_epi8(q1));
  return d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
}

bool has_vnni() {
  static const bool ok = has_avx512() && __builtin_cpu_supports("avx512vnni");
  return ok;
}

}  // namespace

// x (M, K) → q (M, K), dexp (M, K/4), E (M, nblocks) for blocks of `block` (see above), into caller's buffers.
// Few tokens (decoding): one thread, no tensors allocated; the per-call overhead is what a 576×576 product costs.
void quantize_into(const float* xp, int64_t M, int64_t K, int64_t block, int8_t* qp, float* dp, float* ep) {
  const int64_t nblocks = (K + block - 1) / block, chunks = K / 32;
  std::fill(ep, ep + M * nblocks, 0.f);
  auto rows = [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t j = 0; j < chunks; ++j)
        ep[m * nblocks + (32 * j) / block] += quantize_chunk(xp + m * K + 32 * j, qp + m * K + 32 * j, dp + m * (K / 4) + 8 * j);
  };
  if (M * K <= (1 << 16)) rows(0, M); else at::parallel_for(0, M, 1, rows);
}

void check_chunked(torch::Tensor x, int64_t block) {
  TORCH_CHECK(has_vnni(), "this CPU has no AVX-512 VNNI");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 (M, K)");
  TORCH_CHECK(block > 0 && x.size(1) % 32 == 0 && (block >= x.size(1) || block % 32 == 0),
              "K and the block must be multiples of 32");
}

// The same as tensors, for tests: (q int8 (M, K), dexp (M, K/4), E (M, nblocks)).
std::vector<torch::Tensor> quantize_chunks(torch::Tensor x, int64_t block) {
  check_chunked(x, block);
  const int64_t M = x.size(0), K = x.size(1), nblocks = (K + block - 1) / block;
  auto q = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto dexp = torch::empty({M, K / 4}, x.options());
  auto E = torch::empty({M, nblocks}, x.options());
  quantize_into(x.data_ptr<float>(), M, K, block, q.data_ptr<int8_t>(), dexp.data_ptr<float>(), E.data_ptr<float>());
  return {q, dexp, E};
}

// y (M, N) = x · Ŵᵀ with x rounded to int8 per 32-chunk (formula above); uniform 8- or 4-bit codes only.
torch::Tensor qmatmul_i8(torch::Tensor x, torch::Tensor codes, int64_t bits, torch::Tensor scale, torch::Tensor zero,
                         int64_t block) {
  check_chunked(x, block);
  static const torch::Tensor identity = torch::arange(16, torch::dtype(torch::kFloat32)).reshape({1, 16});
  Args a = check_args(x.size(1), codes, bits, identity, scale, zero, block);
  const int64_t M = x.size(0), K = x.size(1), N = a.N;
  std::vector<int8_t> q(M * K);
  std::vector<float> dexp(M * K / 4), E(M * a.nblocks);
  quantize_into(x.data_ptr<float>(), M, K, block, q.data(), dexp.data(), E.data());
  auto y = torch::empty({M, N}, x.options());
  a.M = M;
  a.y = y.data_ptr<float>();
  const QX qx{q.data(), dexp.data(), E.data()};
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, a.K * M));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { rowsq(a, qx, n0, n1); });
  return y;
}

// ---------------------------------------------------------------- W8A8: the two passes around torch._int_mm
// y = (q(x)·Cᵀ)·s_x·s_w + b, with q(x) = clamp(round(x / s_x), −127, 127), s_x = max(max|x|, 1e−12) / 127 per row:
// PyTorch's int8 matmul (oneDNN, VNNI) beats float32's GEMM here, but rounding the activations and scaling the
// int32 result with ~10 elementwise PyTorch calls cost more than the matmul saved. These do it in one pass each,
// with the same float32 operations in the same order (round half to even, as torch.round), so the result is the
// reference's to the bit; a GELU fused into the output pass agrees with PyTorch's to ~1e-7 (erf's approximation).

namespace {

SQUASH_AVX512 void quantize_row_avx512(const float* x, int64_t K, int8_t* q, float* sx) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16)
    amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(K - k), x + k)));
  const float s = std::max(_mm512_reduce_max_ps(amax), 1e-12f) / 127.f;
  *sx = s;
  const __m512 sv = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = tail_mask(K - k);
    __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(mask, x + k), sv),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    _mm_mask_storeu_epi8(q + k, mask, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
  }
}

void quantize_row_scalar(const float* x, int64_t K, int8_t* q, float* sx) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float s = std::max(amax, 1e-12f) / 127.f;
  *sx = s;
  for (int64_t k = 0; k < K; ++k) q[k] = static_cast<int8_t>(std::min(std::max(std::nearbyint(x[k] / s), -127.f), 127.f));
}

// GELU fused into the output pass (BERT's intermediate layer): gelu(v) = v/2 · (1 + erf(v/√2)), exact GELU.
// erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7): erf(a) = 1 − t·P(t)·e^(−a²), t = 1/(1 + p·a), a ≥ 0,
// and e^x for x ≤ 0 as 2^n·e^r, x = n·ln2 + r, |r| ≤ ln2/2, e^r by its Taylor series to r⁶ (error ~1e-7).
SQUASH_AVX512 inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 split in two: r stays exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-6f), r);
  __m512 e = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(e, n);
}

SQUASH_AVX512 inline __m512 gelu_avx512(__m512 v) {
  const __m512 a = _mm512_mul_ps(_mm512_abs_ps(v), _mm512_set1_ps(0.70710678118654752f));  // |v|/√2
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.f)));
  __m512 poly = _mm512_set1_ps(1.061405429f);
  for (float c : {-1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f}) poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(c));
  poly = _mm512_mul_ps(poly, t);
  const __m512 erf_abs = _mm512_fnmadd_ps(poly, exp_nonpositive(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), a)),
                                          _mm512_set1_ps(1.f));
  // 1 + erf(v/√2) = 1 ± erf(|v|/√2)
  const __mmask16 neg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 one_plus = _mm512_mask_sub_ps(_mm512_add_ps(_mm512_set1_ps(1.f), erf_abs), neg, _mm512_set1_ps(1.f), erf_abs);
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), one_plus);
}

inline float gelu_scalar(float v) { return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f)); }

SQUASH_AVX512 void scale_row_avx512(const int32_t* acc, float sx, const float* sw, const float* b, int64_t N, float* y,
                                    bool gelu) {
  const __m512 s = _mm512_set1_ps(sx);
  for (int64_t n = 0; n < N; n += 16) {
    const __mmask16 mask = tail_mask(N - n);
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mask, acc + n)), s),
                             _mm512_maskz_loadu_ps(mask, sw + n));
    if (b) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, b + n));
    if (gelu) v = gelu_avx512(v);
    _mm512_mask_storeu_ps(y + n, mask, v);
  }
}

void scale_row_scalar(const int32_t* acc, float sx, const float* sw, const float* b, int64_t N, float* y, bool gelu) {
  for (int64_t n = 0; n < N; ++n) {
    const float v = static_cast<float>(acc[n]) * sx * sw[n];
    const float out = b ? v + b[n] : v;
    y[n] = gelu ? gelu_scalar(out) : out;
  }
}

}  // namespace

// x (M, K) float32 → (q int8 (M, K), s_x float32 (M, 1))
std::vector<torch::Tensor> quantize_rows(torch::Tensor x, bool vector) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 (M, K)");
  const int64_t M = x.size(0), K = x.size(1);
  auto q = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto sx = torch::empty({M, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = sx.data_ptr<float>();
  const bool avx = vector && has_avx512();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      (avx ? quantize_row_avx512 : quantize_row_scalar)(xp + m * K, K, qp + m * K, sp + m);
  });
  return {q, sx};
}

// y (M, N) = float(acc) · s_x · s_w (+ b), written over acc (the same 4 bytes an element): one activation-sized
// buffer fewer to allocate, which at minilm's 4096 × 1536 is a page-faulting 25 MB each call.
torch::Tensor scale_int32(torch::Tensor acc, torch::Tensor sx, torch::Tensor sw, torch::Tensor b, bool vector,
                          bool gelu) {
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == torch::kInt32 && acc.is_contiguous(), "acc: contiguous int32 (M, N)");
  const int64_t M = acc.size(0), N = acc.size(1);
  TORCH_CHECK(sx.scalar_type() == torch::kFloat32 && sx.is_contiguous() && sx.numel() == M, "s_x: float32 (M,)");
  TORCH_CHECK(sw.scalar_type() == torch::kFloat32 && sw.is_contiguous() && sw.numel() == N, "s_w: float32 (N,)");
  const bool bias = b.defined() && b.numel() > 0;
  if (bias) TORCH_CHECK(b.scalar_type() == torch::kFloat32 && b.is_contiguous() && b.numel() == N, "b: float32 (N,)");
  auto y = acc.view(torch::kFloat32);
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* sxp = sx.data_ptr<float>();
  const float* swp = sw.data_ptr<float>();
  const float* bp = bias ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const bool avx = vector && has_avx512();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      (avx ? scale_row_avx512 : scale_row_scalar)(ap + m * N, sxp[m], swp, bp, N, yp + m * N, gelu);
  });
  return y;
}

// Attention of a few new tokens over the cache, out (T, H·D) in the layout the output projection reads:
//   out[t, h] = Σ_s p[s] · V[h / g, s],   p = softmax_s(q[h, t] · K[h / g, s] / √D),  s ≤ pos + t,  g = H / Hkv
// At T = 1 PyTorch's CPU flash attention spends ~75 µs a layer allocating its buffers for ~20 k multiply-adds.
SQUASH_AVX512 void attend_one(const float* qv, const float* K, const float* V, int64_t S, int64_t D, float scale,
                              float* p, float* o) {
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qv + d), _mm512_loadu_ps(K + s * D + d), acc);
    p[s] = _mm512_reduce_add_ps(acc) * scale;
    mx = std::max(mx, p[s]);
  }
  float total = 0.f;
  for (int64_t s = 0; s < S; ++s) total += (p[s] = std::exp(p[s] - mx));
  const __m512 inv = _mm512_set1_ps(1.f / total);
  for (int64_t d = 0; d < D; d += 16) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; ++s) acc = _mm512_fmadd_ps(_mm512_set1_ps(p[s]), _mm512_loadu_ps(V + s * D + d), acc);
    _mm512_storeu_ps(o + d, _mm512_mul_ps(acc, inv));
  }
}

torch::Tensor attend(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, int64_t pos) {
  TORCH_CHECK(has_avx512(), "attend needs AVX-512");
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.is_contiguous(), "q: contiguous float32 (H, T, D)");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes()
              && k_cache.size(2) == q.size(2), "caches: (Hkv, cap, D)");
  const int64_t H = q.size(0), T = q.size(1), D = q.size(2), Hkv = k_cache.size(0), cap = k_cache.size(1);
  TORCH_CHECK(H % Hkv == 0 && pos + T <= cap && D % 16 == 0, "heads, positions or head size (a multiple of 16) out of range");
  auto out = torch::empty({T, H * D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t group = H / Hkv;
  at::parallel_for(0, H * T, T > 1 ? 1 : H * T, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(pos + T);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t h = i / T, t = i % T;
      attend_one(qp + (h * T + t) * D, kp + (h / group) * cap * D, vp + (h / group) * cap * D, pos + t + 1, D, scale,
                 p.data(), op + t * H * D + h * D);
    }
  });
  return out;
}

// ---------------------------------------------------------------- sparse outliers
// The weights kept in float beside the codes, S, as (row, column, value) triples sorted by row (int32, int32,
// float32). About 0.3% of a matrix, one or two a row. The decode pass walks the triples in order with no
// per-row loop: rows hold a random number of values, and a loop over each row's values mispredicts its exit
// branch about once a row, which at batch 1 cost more than the multiply-adds.

void check_sparse(torch::Tensor rows, torch::Tensor cols, torch::Tensor vals) {
  TORCH_CHECK(rows.scalar_type() == torch::kInt32 && cols.scalar_type() == torch::kInt32 &&
              vals.scalar_type() == torch::kFloat32 && rows.is_contiguous() && cols.is_contiguous() && vals.is_contiguous() &&
              rows.numel() == cols.numel() && cols.numel() == vals.numel(), "rows, cols int32 and vals float32, one per value");
}

// y (M, N) += x (M, K) · Sᵀ, in place (few tokens: the decode step's outliers). Positions are trusted: pack
// checks them once (to_sparse), this runs on every token.
void sparse_add(torch::Tensor y, torch::Tensor x, torch::Tensor rows, torch::Tensor cols, torch::Tensor vals) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 (M, K)");
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == torch::kFloat32 && y.is_contiguous() && y.size(0) == x.size(0),
              "y: contiguous float32 (M, N)");
  check_sparse(rows, cols, vals);
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1), nnz = vals.numel();
  const int32_t* r = rows.data_ptr<int32_t>();
  const int32_t* c = cols.data_ptr<int32_t>();
  const float* v = vals.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  auto part = [&](int64_t i0, int64_t i1) {
    // whole rows per thread: both ends move forward to the start of a row
    while (i0 > 0 && i0 < nnz && r[i0] == r[i0 - 1]) ++i0;
    while (i1 < nnz && i1 > 0 && r[i1] == r[i1 - 1]) ++i1;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = xp + m * K;
      float* ym = yp + m * N;
      for (int64_t i = i0; i < i1; ++i) ym[r[i]] += xm[c[i]] * v[i];
    }
  };
  if (nnz * M < (1 << 16)) part(0, nnz); else at::parallel_for(0, nnz, 4096, part);
}

// out (R, K) += S[rows], row i of out being row `rows[i]` of S (or n0 + i when `wanted` is empty): dequantised
// tiles and embedding lookups get their outliers without building S. N: S's row count.
void sparse_into(torch::Tensor out, torch::Tensor rows, torch::Tensor cols, torch::Tensor vals, torch::Tensor wanted,
                 int64_t n0, int64_t N) {
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == torch::kFloat32 && out.is_contiguous(), "out: contiguous float32");
  check_sparse(rows, cols, vals);
  const int64_t R = out.size(0), K = out.size(1), nnz = vals.numel();
  const bool listed = wanted.numel() > 0;
  if (listed) TORCH_CHECK(wanted.scalar_type() == torch::kInt64 && wanted.is_contiguous() && wanted.numel() == R, "rows: int64 (R,)");
  const int64_t* wp = listed ? wanted.data_ptr<int64_t>() : nullptr;
  const int32_t* r = rows.data_ptr<int32_t>();
  const int32_t* c = cols.data_ptr<int32_t>();
  const float* v = vals.data_ptr<float>();
  float* o = out.data_ptr<float>();
  if (!listed) {  // a tile of consecutive rows: one search, then a walk over its triples
    TORCH_CHECK(0 <= n0 && n0 + R <= N, "rows out of range");
    for (int64_t j = std::lower_bound(r, r + nnz, n0) - r; j < nnz && r[j] < n0 + R; ++j) {
      TORCH_CHECK(0 <= c[j] && c[j] < K, "column out of range");
      o[(r[j] - n0) * K + c[j]] += v[j];
    }
    return;
  }
  for (int64_t i = 0; i < R; ++i) {
    const int64_t n = wp[i];
    TORCH_CHECK(0 <= n && n < N, "row ", n, " out of range");
    for (int64_t j = std::lower_bound(r, r + nnz, n) - r; j < nnz && r[j] == n; ++j) {
      TORCH_CHECK(0 <= c[j] && c[j] < K, "column out of range");
      o[i * K + c[j]] += v[j];
    }
  }
}

// ---------------------------------------------------------------- GPTQ's inner loop (compression, not inference)
// Columns [c0, c1) of one lazy batch W1 (rows, B) in visiting order, uniform integer grid, scales fixed:
//   c = clamp(round(w/s + z), lo, hi),  q = s·(c − z),  e = (w − q) / U[i, i],  W1[r, i:] −= e · U[i, i:]
// Each row's rounding error feeds only its own later columns, so rows run in parallel, each a contiguous walk.
// In Python this loop is ~15 tensor calls a column, and smollm2 has about 150 k columns to walk.
void gptq_columns(torch::Tensor W1, torch::Tensor U1, torch::Tensor s, torch::Tensor z, int64_t c0, int64_t c1,
                  double lo, double hi, torch::Tensor codes, torch::Tensor err) {
  TORCH_CHECK(W1.dim() == 2 && W1.scalar_type() == torch::kFloat32 && W1.is_contiguous(), "W1: contiguous float32 (rows, B)");
  const int64_t R = W1.size(0), B = W1.size(1);
  TORCH_CHECK(U1.scalar_type() == torch::kFloat32 && U1.is_contiguous() && U1.dim() == 2 && U1.size(0) == B && U1.size(1) == B,
              "U1: contiguous float32 (B, B)");
  for (auto* t : {&s, &z, &err})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->sizes() == W1.sizes(), "s, z, err: like W1");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && codes.sizes() == W1.sizes(), "codes: uint8 like W1");
  TORCH_CHECK(0 <= c0 && c0 <= c1 && c1 <= B, "columns out of range");
  float* w = W1.data_ptr<float>();
  const float* u = U1.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float* ep = err.data_ptr<float>();
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = w + r * B;
      for (int64_t i = c0; i < c1; ++i) {
        const float sv = sp[r * B + i], zv = zp[r * B + i];
        const float c = std::min(std::max(std::nearbyint(row[i] / sv + zv), flo), fhi);
        const float e = (row[i] - sv * (c - zv)) / u[i * B + i];
        cp[r * B + i] = static_cast<uint8_t>(c);
        ep[r * B + i] = e;
        const float* ui = u + i * B;
        for (int64_t j = i; j < B; ++j) row[j] -= e * ui[j];
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_rmsnorm", &add_rmsnorm);
  m.def("silu_mul", &silu_mul);
  m.def("rope_cache", &rope_cache);
  m.def("attend", &attend, "attention of a few new tokens over the KV cache, (T, H·D)");
  m.def("qmatmul", &qmatmul, "y = x · Ŵᵀ from packed 8- or 4-bit codes (see kernels.cpp)");
  m.def("dequantize", &dequantize, "rows [n0, n1) of Ŵ as float32");
  m.def("has_avx512", &has_avx512);
  m.def("has_avx2", &has_avx2);
  m.def("has_vnni", &has_vnni);
  m.def("quantize_chunks", &quantize_chunks, "x rounded to int8 per 32-chunk: q, d repeated ×8, E per block");
  m.def("qmatmul_i8", &qmatmul_i8, "y = x·Ŵᵀ with int8 activations per 32-chunk (VNNI); uniform codes");
  m.def("quantize_rows", &quantize_rows, "int8 rows and their scales (W8A8 activations)");
  m.def("scale_int32", &scale_int32, "float(acc)·s_x·s_w + b (W8A8 output), then GELU if asked");
  m.def("gptq_columns", &gptq_columns, "GPTQ's column loop for one lazy batch, uniform grid, in place");
  m.def("sparse_add", &sparse_add, "y += x·Sᵀ for outliers S (row-sorted triples), in place");
  m.def("sparse_into", &sparse_into, "out += S[rows] for outliers S (row-sorted triples), in place");
}
