// The fused engine's products for bfloat16 layers: C[m, n] = bf16(A)[m, k] op(W) + beta C with
// W bfloat16, A and C float32, every product of two bfloat16 values and every sum in float32.
// That is what AVX-512-BF16's vdpbf16ps computes, two products a lane at a time, twice the
// multiply-adds of a float32 FMA per instruction, from weights half the bytes: on an AMD EPYC
// (Zen 4) torch.nn's bfloat16 LSTM (oneDNN) runs its products this way, and the fused engine's
// float32 products left it 1.1-2.0x slower. A (the layer's input, or h_{t-1}, which the time
// loops keep in float32) is rounded to bfloat16 (nearest even) row by row on the way in.
//
// Two kernels give the same bits: the AVX-512-BF16 one, where the CPU has the instructions,
// and a portable one in plain C++ that repeats vdpbf16ps's arithmetic (for each pair of k, the
// odd product added first, each sum rounded to nearest even, denormal inputs and sums
// flushed to zero), which the tests run on any CPU (RNNKIT_BF16_KERNEL=portable).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

namespace rnnkit {

// Whether this CPU runs vdpbf16ps (and the AVX-512 it needs).
inline bool cpu_has_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return has;
}

// Whether the products run the AVX-512-BF16 kernel; RNNKIT_BF16_KERNEL=portable (read per
// product, so that one process runs and tests both) runs the portable one.
inline bool bf16_native() {
  const char* forced = std::getenv("RNNKIT_BF16_KERNEL");
  if (forced && std::strcmp(forced, "portable") == 0) return false;
  return cpu_has_bf16();
}

// v rounded to bfloat16, nearest even (NaN stays NaN): c10's conversion, as torch rounds.
inline uint16_t bf16_bits(float v) { return c10::BFloat16(v).x; }

class Bf16Gemm {
 public:
  // Columns of one panel: two vectors of 16 float32 sums.
  static constexpr int64_t kNR = 32;

  // op(W) = W^T when trans_w; W is row-major with leading dimension ldw; op(W) is [k, n].
  // Panel p holds op(W)[2q + e, p * kNR + j] at p * kq * 2kNR + q * 2kNR + 2j + e: the two
  // values of a pair of k adjacent, as vdpbf16ps multiplies them; zero past column n and
  // past row k (an odd k's last pair).
  Bf16Gemm(const c10::BFloat16* w, int64_t ldw, bool trans_w, int64_t n, int64_t k,
           bool parallel = false)
      : n_(n), k_(k), kq_((k + 1) / 2), panels_((n + kNR - 1) / kNR) {
    data_.reset(static_cast<uint16_t*>(
        ::operator new[](packed_bytes(n, k), std::align_val_t(64))));
    const auto pack = [&](int64_t p_lo, int64_t p_hi) {
      for (int64_t p = p_lo; p < p_hi; ++p) pack_panel(p, w, ldw, trans_w);
    };
    if (parallel && n * k >= (int64_t(1) << 19)) {
      at::parallel_for(0, panels_, 1, pack);
    } else {
      pack(0, panels_);
    }
  }

  // Bytes of the panels of an [k, n] op(W).
  static int64_t packed_bytes(int64_t n, int64_t k) {
    return std::max<int64_t>((n + kNR - 1) / kNR * ((k + 1) / 2) * 2 * kNR, 1) * 2;
  }

  // C = bf16(A) op(W) + beta C (beta 0 never reads C): a per-step product, on the calling
  // thread.
  void operator()(int64_t m, const float* a, int64_t lda, float beta, float* c,
                  int64_t ldc) const {
    block(0, m, 0, panels_, a, lda, beta, c, ldc);
  }

  // The same over a whole sequence, over torch's threads: each a block of rows of C, or of
  // panels where C has fewer rows than columns.
  void run(int64_t m, const float* a, int64_t lda, float beta, float* c, int64_t ldc) const {
    if (m == 0) return;
    const int64_t threads = at::in_parallel_region() || m * n_ * k_ < (int64_t(1) << 19)
                                ? 1
                                : at::get_num_threads();
    const bool by_rows = m >= n_;
    const int64_t units = by_rows ? (m + kMR - 1) / kMR : panels_;
    const int64_t per = (units + threads - 1) / threads;
    at::parallel_for(0, units, per, [&](int64_t lo, int64_t hi) {
      if (by_rows) {
        block(lo * kMR, std::min(m, hi * kMR), 0, panels_, a, lda, beta, c, ldc);
      } else {
        block(0, m, lo, hi, a, lda, beta, c, ldc);
      }
    });
  }

 private:
  // Rows of the widest tile, and the rows rounded at a time (a block of A's pairs that stays
  // in L1 beside the panels).
  static constexpr int64_t kMR = 6;
  static constexpr int64_t kRows = 48;

  struct Free {
    void operator()(uint16_t* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };

  void pack_panel(int64_t p, const c10::BFloat16* w, int64_t ldw, bool trans_w) {
    uint16_t* dst = data_.get() + p * kq_ * 2 * kNR;
    for (int64_t kk = 0; kk < 2 * kq_; ++kk) {
      uint16_t* pair = dst + (kk / 2) * 2 * kNR + (kk % 2);
      for (int64_t j = 0; j < kNR; ++j) {
        const int64_t col = p * kNR + j;
        uint16_t v = 0;
        if (col < n_ && kk < k_) v = (trans_w ? w[col * ldw + kk] : w[kk * ldw + col]).x;
        pair[2 * j] = v;
      }
    }
  }

  // Rows [r_lo, r_hi) of C over the panels [p_lo, p_hi): A's rows rounded to pairs of
  // bfloat16 kRows at a time, then the tiles, panels outer and rows inner (each panel's
  // slice read from memory once for all the block's rows).
  void block(int64_t r_lo, int64_t r_hi, int64_t p_lo, int64_t p_hi, const float* a,
             int64_t lda, float beta, float* c, int64_t ldc) const {
    thread_local std::vector<uint32_t> pairs;
    const bool native = bf16_native();
    for (int64_t r0 = r_lo; r0 < r_hi; r0 += kRows) {
      const int64_t r1 = std::min(r_hi, r0 + kRows);
      pairs.resize((r1 - r0) * kq_);
      for (int64_t r = r0; r < r1; ++r) {
        const float* row = a + r * lda;
        uint32_t* dst = pairs.data() + (r - r0) * kq_;
        if (native) {
          round_native(row, dst);
          continue;
        }
        for (int64_t q = 0; q < kq_; ++q) {
          const uint32_t lo = bf16_bits(row[2 * q]);
          const uint32_t hi = 2 * q + 1 < k_ ? bf16_bits(row[2 * q + 1]) : 0;
          dst[q] = lo | hi << 16;
        }
      }
      const uint32_t* a2 = pairs.data();
      float* c_r = c + r0 * ldc;
      for (int64_t p = p_lo; p < p_hi; p += 2) {
        const int64_t np = std::min<int64_t>(2, p_hi - p);
        if (native) {
          rows_native(r1 - r0, p, np, a2, beta, c_r, ldc);
        } else {
          rows_portable(r1 - r0, p, np, a2, beta, c_r, ldc);
        }
      }
    }
  }

#define RNNKIT_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

  // A row of k values rounded to bfloat16 (nearest even, as bf16_bits), 32 at a time: the
  // pairs that the tiles broadcast (a scalar loop was 8% of a step at 16 x 1024 x 512).
  RNNKIT_BF16 void round_native(const float* row, uint32_t* dst) const {
    for (int64_t kk = 0; kk < k_; kk += 32) {
      const int64_t lo_n = std::min<int64_t>(16, k_ - kk);
      const int64_t hi_n = std::max<int64_t>(0, std::min<int64_t>(16, k_ - kk - 16));
      const __m512 lo = _mm512_maskz_loadu_ps(__mmask16((1u << lo_n) - 1), row + kk);
      const __m512 hi = _mm512_maskz_loadu_ps(__mmask16((1u << hi_n) - 1), row + kk + 16);
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
      const int64_t n = std::min<int64_t>(16, kq_ - kk / 2);
      _mm512_mask_storeu_epi32(dst + kk / 2, __mmask16((1u << n) - 1), both);
    }
  }

  // The m rows of a block (A's pairs a2, kq_ per row) over the np (1 or 2) panels from p.
  RNNKIT_BF16 void rows_native(int64_t m, int64_t p, int64_t np, const uint32_t* a2,
                               float beta, float* c, int64_t ldc) const {
    int64_t r = 0;
    if (np == 2) {
      // 6-row tiles, but for the last 7 to 11 rows, in two tiles of 4 to 6 (a tile of 1 or 2
      // rows runs at a fraction of the speed: its panel loads feed too few products)
      for (; m - r >= 12 || m - r == kMR; r += kMR) {
        tile_native<kMR, 2>(p, a2 + r * kq_, beta, c + r * ldc, ldc);
      }
      if (m - r > kMR) {
        const int64_t half = (m - r + 1) / 2;
        if (half == 6) tile_native<6, 2>(p, a2 + r * kq_, beta, c + r * ldc, ldc);
        if (half == 5) tile_native<5, 2>(p, a2 + r * kq_, beta, c + r * ldc, ldc);
        if (half == 4) tile_native<4, 2>(p, a2 + r * kq_, beta, c + r * ldc, ldc);
        r += half;
      }
      switch (m - r) {
        case 5: tile_native<5, 2>(p, a2 + r * kq_, beta, c + r * ldc, ldc); break;
        case 4: tile_native<4, 2>(p, a2 + r * kq_, beta, c + r * ldc, ldc); break;
        case 3: tile_native<3, 2>(p, a2 + r * kq_, beta, c + r * ldc, ldc); break;
        case 2: tile_native<2, 2>(p, a2 + r * kq_, beta, c + r * ldc, ldc); break;
        case 1: tile_native<1, 2>(p, a2 + r * kq_, beta, c + r * ldc, ldc); break;
        default: break;
      }
      return;
    }
    for (; r + kMR <= m; r += kMR) tile_native<kMR, 1>(p, a2 + r * kq_, beta, c + r * ldc, ldc);
    for (; r < m; ++r) tile_native<1, 1>(p, a2 + r * kq_, beta, c + r * ldc, ldc);
  }

  // C[0:MR, the columns of panels p .. p + NP) (+)= the MR rows' pairs times those panels:
  // MR x 2NP vectors of sums (at most 24 of the 32 registers), each broadcast pair feeding
  // 2NP vdpbf16ps and each panel vector MR. Never inlined, as PanelGemm's tile.
  template <int MR, int NP>
  RNNKIT_BF16 __attribute__((noinline)) void tile_native(int64_t p, const uint32_t* a2,
                                                         float beta, float* c,
                                                         int64_t ldc) const {
    constexpr int NV = 2 * NP;
    const uint16_t* b = data_.get() + p * kq_ * 2 * kNR;
    const int64_t stride = kq_ * 2 * kNR;
    __m512 acc[MR][NV];
    for (int r = 0; r < MR; ++r) {
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_ps();
    }
    for (int64_t q = 0; q < kq_; ++q) {
      __m512bh bv[NV];
      for (int j = 0; j < NV; ++j) {
        const uint16_t* src = b + (j / 2) * stride + q * 2 * kNR + (j % 2) * kNR;
        bv[j] = (__m512bh)_mm512_loadu_si512(src);
      }
      for (int r = 0; r < MR; ++r) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a2[r * kq_ + q]));
        for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], av, bv[j]);
      }
    }
    for (int j = 0; j < NV; ++j) {
      const int64_t col = p * kNR + j * 16;
      if (col >= n_) break;
      const int64_t cnt = std::min<int64_t>(16, n_ - col);
      const __mmask16 mask = cnt == 16 ? __mmask16(0xFFFF) : __mmask16((1u << cnt) - 1);
      for (int r = 0; r < MR; ++r) {
        float* dst = c + r * ldc + col;
        __m512 v = acc[r][j];
        if (beta != 0.0f) {
          v = _mm512_fmadd_ps(_mm512_set1_ps(beta), _mm512_maskz_loadu_ps(mask, dst), v);
        }
        _mm512_mask_storeu_ps(dst, mask, v);
      }
    }
  }

#undef RNNKIT_BF16

  // A bfloat16 value as vdpbf16ps reads it: a denormal is zero.
  static float widen(uint32_t bits) {
    if ((bits & 0x7F80u) == 0) bits &= 0x8000u;
    const uint32_t wide = bits << 16;
    float v;
    std::memcpy(&v, &wide, sizeof(v));
    return v;
  }

  // acc + x * y rounded once (the product of two bfloat16 values is exact in float32), a
  // denormal sum flushed to zero: one half of a vdpbf16ps lane.
  static float dot_add(float acc, float x, float y) {
    const float s = std::fma(x, y, acc);
    return std::fabs(s) < 1.17549435e-38f ? std::copysign(0.0f, s) : s;
  }

  // The native kernel's arithmetic, one lane at a time.
  void rows_portable(int64_t m, int64_t p, int64_t np, const uint32_t* a2, float beta,
                     float* c, int64_t ldc) const {
    const int64_t stride = kq_ * 2 * kNR;
    std::vector<float> acc(np * kNR);
    for (int64_t r = 0; r < m; ++r) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t q = 0; q < kq_; ++q) {
        const uint32_t pair = a2[r * kq_ + q];
        const float a_lo = widen(pair & 0xFFFFu), a_hi = widen(pair >> 16);
        for (int64_t j = 0; j < np * kNR; ++j) {
          const uint16_t* w = data_.get() + p * stride + (j / kNR) * stride + q * 2 * kNR +
                              2 * (j % kNR);
          acc[j] = dot_add(dot_add(acc[j], a_hi, widen(w[1])), a_lo, widen(w[0]));
        }
      }
      for (int64_t j = 0; j < np * kNR; ++j) {
        const int64_t col = p * kNR + j;
        if (col >= n_) break;
        float* dst = c + r * ldc + col;
        *dst = beta != 0.0f ? std::fma(beta, *dst, acc[j]) : acc[j];
      }
    }
  }

  int64_t n_, k_, kq_, panels_;
  std::unique_ptr<uint16_t[], Free> data_;
};

}  // namespace rnnkit
