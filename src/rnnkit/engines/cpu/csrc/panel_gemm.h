// rnnkit's own GEMM for the per-step product of a recurrence, C[m, n] (+)= A[m, k] op(W), with
// W fixed for the whole sequence and m (the batch rows of one thread) small. Written for the
// CPUs where MKL takes its generic code path (on an AMD EPYC, MKL's sgemv runs its `def`
// kernel, 5.2 us for a [1, 128] x [128, 512] product that this one does in about half that),
// it was also measured faster than MKL's packed GEMM on an Intel Xeon with AVX-512, so it runs
// the single-thread step products on every CPU (blas.h). op(W) is packed once into panels that
// a register tile walks with unit stride; the tiles keep their sums in registers across the
// whole k loop. On CPUs where MKL runs generic kernels the same tiles also run the products over
// whole sequences (the input projection, the weight and input gradients), blocked for the
// caches and split over threads (PanelGemm::run).
#pragma once

#include "activations.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <new>

namespace rnnkit {

template <typename T>
class PanelGemm {
 public:
  // Columns of one panel: two vectors, so that a tile of 6 rows holds 12 sums and still
  // leaves registers for the panel's two vectors and the broadcast of A (AVX2 has 16).
  static constexpr int64_t kV = Vec<T>::size();
  static constexpr int64_t kNR = 2 * kV;

  // op(W) = W^T when trans_w; W is row-major with leading dimension ldw; op(W) is [k, n].
  // Panel p holds op(W)[kk, p * kNR + j] at p * k * kNR + kk * kNR + j, zero past column n.
  // `parallel`: pack the panels over torch's threads (a large operand of run()).
  PanelGemm(const T* w, int64_t ldw, bool trans_w, int64_t n, int64_t k, bool parallel = false)
      : n_(n), k_(k), panels_((n + kNR - 1) / kNR) {
    const int64_t size = std::max<int64_t>(panels_ * k * kNR, 1);
    data_.reset(static_cast<T*>(::operator new[](size * sizeof(T), std::align_val_t(64))));
    const auto pack = [&](int64_t p_lo, int64_t p_hi) {
      for (int64_t p = p_lo; p < p_hi; ++p) pack_panel(p, w, ldw, trans_w);
    };
    if (parallel && !small_product(n * k)) {
      at::parallel_for(0, panels_, 1, pack);
    } else {
      pack(0, panels_);
    }
  }

  // Bytes of the panels of an [k, n] op(W).
  static int64_t packed_bytes(int64_t n, int64_t k) {
    return std::max<int64_t>((n + kNR - 1) / kNR * k * kNR, 1) * int64_t(sizeof(T));
  }

  // C = A op(W) + beta C (beta 0 never reads C): a per-step product, on the calling thread.
  void operator()(int64_t m, const T* a, int64_t lda, T beta, T* c, int64_t ldc) const {
    rows<false>(0, m, 0, panels_, 0, k_, a, lda, beta, c, ldc);
  }

  // C[m, n] = op(A) op(W) + beta C with op(A) = A^T when trans_a (A [k, m], else [m, k]):
  // a product over a whole sequence, over torch's threads (each a block of rows of C, or of
  // panels where C has fewer rows than columns), k in blocks of kKc.
  void run(bool trans_a, int64_t m, const T* a, int64_t lda, T beta, T* c, int64_t ldc) const {
    if (m == 0) return;
    const int64_t threads =
        at::in_parallel_region() || small_product(m * n_ * k_) ? 1 : at::get_num_threads();
    const bool by_rows = m >= n_;
    const int64_t units = by_rows ? (m + kMR - 1) / kMR : panels_;
    const int64_t per = (units + threads - 1) / threads;
    at::parallel_for(0, units, per, [&](int64_t lo, int64_t hi) {
      const int64_t r_lo = by_rows ? lo * kMR : 0, r_hi = by_rows ? std::min(m, hi * kMR) : m;
      const int64_t p_lo = by_rows ? 0 : lo, p_hi = by_rows ? panels_ : hi;
      for (int64_t k0 = 0; k0 < k_; k0 += kKc) {
        const int64_t k1 = std::min(k_, k0 + kKc);
        const T b = k0 == 0 ? beta : T(1);
        for (int64_t r = r_lo; r < r_hi; r += kMc) {
          const int64_t r1 = std::min(r_hi, r + kMc);
          if (trans_a) {
            rows<true>(r, r1, p_lo, p_hi, k0, k1, a, lda, b, c, ldc);
          } else {
            rows<false>(r, r1, p_lo, p_hi, k0, k1, a, lda, b, c, ldc);
          }
        }
      }
    });
  }

 private:
  // Work too small to pay for waking a second thread (a parallel region costs microseconds,
  // far more where the cores are busy), as small_step_gemm measured for a product.
  static bool small_product(int64_t work) { return work < (int64_t(1) << 19); }

  // Rows of the widest tile.
  static constexpr int64_t kMR = 6;
  // Panels walked together by the outer loop: the widest tile (1 row, 4 panels) spans them.
  static constexpr int64_t kGroup = 4;
  // run()'s blocks: kKc values of k, a panel's slice of which (kKc * kNR: 16 KB in float32
  // on AVX-512) stays in L1 while the tiles of kMc rows use it, whose slice of A (kMc * kKc:
  // 256 KB) stays in L2.
  static constexpr int64_t kKc = 128;
  static constexpr int64_t kMc = 512;

  struct Free {
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };

  void pack_panel(int64_t p, const T* w, int64_t ldw, bool trans_w) {
    T* dst = data_.get() + p * k_ * kNR;
    const int64_t cols = std::min(kNR, n_ - p * kNR);
    for (int64_t kk = 0; kk < k_; ++kk) {
      T* row = dst + kk * kNR;
      if (trans_w) {
        for (int64_t j = 0; j < cols; ++j) row[j] = w[(p * kNR + j) * ldw + kk];
      } else {
        std::copy_n(w + kk * ldw + p * kNR, cols, row);
      }
      std::fill(row + cols, row + kNR, T(0));
    }
  }

  // Rows [r_lo, r_hi) of C over the panels [p_lo, p_hi) and k in [k0, k1): panels outer,
  // rows inner, so that each panel's slice comes from memory once and stays in L1 while every
  // row block uses it (k * kNR values, 16 KB at k = 256 in float32 for a per-step product).
  template <bool TA>
  void rows(int64_t r_lo, int64_t r_hi, int64_t p_lo, int64_t p_hi, int64_t k0, int64_t k1,
            const T* a, int64_t lda, T beta, T* c, int64_t ldc) const {
    for (int64_t p = p_lo; p < p_hi; p += kGroup) {
      const int64_t np = std::min(kGroup, p_hi - p);
      int64_t r = r_lo;
      for (; r + kMR <= r_hi; r += kMR) panels<kMR, 1, TA>(p, np, k0, k1, a, lda, r, beta, c, ldc);
      switch (r_hi - r) {
        case 5: panels<5, 1, TA>(p, np, k0, k1, a, lda, r, beta, c, ldc); break;
        case 4: panels<4, 1, TA>(p, np, k0, k1, a, lda, r, beta, c, ldc); break;
        case 3: panels<3, 2, TA>(p, np, k0, k1, a, lda, r, beta, c, ldc); break;
        case 2: panels<2, 2, TA>(p, np, k0, k1, a, lda, r, beta, c, ldc); break;
        case 1: panels<1, 4, TA>(p, np, k0, k1, a, lda, r, beta, c, ldc); break;
        default: break;
      }
    }
  }

  // Rows [r, r + MR) of C over the np panels from panel p, NP panels per tile, the rest one by
  // one.
  template <int MR, int NP, bool TA>
  void panels(int64_t p, int64_t np, int64_t k0, int64_t k1, const T* a, int64_t lda, int64_t r,
              T beta, T* c, int64_t ldc) const {
    const T* a_r = TA ? a + r : a + r * lda;
    T* c_r = c + r * ldc;
    int64_t q = 0;
    if constexpr (NP > 1) {
      for (; q + NP <= np; q += NP) tile<MR, NP, TA>(p + q, k0, k1, a_r, lda, beta, c_r, ldc);
    }
    for (; q < np; ++q) tile<MR, 1, TA>(p + q, k0, k1, a_r, lda, beta, c_r, ldc);
  }

  // C[0:MR, cols of panels p .. p + NP) (+)= op(A)[0:MR, k0:k1] op(W)[k0:k1, those cols]
  // (op(A)[r, kk] = a[kk * lda + r] when TA, else a[r * lda + kk]): MR x 2NP vector sums,
  // each A value broadcast once per k and each panel vector loaded once per k. Never
  // inlined: inlined into a caller's loop (the time loops), GCC kept the sums on the stack and
  // the tile ran at half speed (measured on an Intel Xeon, 6 x 32 x 1024: 5.2 us inlined,
  // 2.5 us as its own function, whose k loop holds every sum in a register).
  template <int MR, int NP, bool TA>
  __attribute__((noinline)) void tile(int64_t p, int64_t k0, int64_t k1, const T* a,
                                      int64_t lda, T beta, T* c, int64_t ldc) const {
    constexpr int NV = 2 * NP;
    const T* b = data_.get() + p * k_ * kNR;
    const int64_t stride = k_ * kNR;
    Vec<T> acc[MR][NV];
    for (int r = 0; r < MR; ++r) {
      for (int j = 0; j < NV; ++j) acc[r][j] = Vec<T>(T(0));
    }
    for (int64_t kk = k0; kk < k1; ++kk) {
      Vec<T> bv[NV];
      for (int q = 0; q < NP; ++q) {
        bv[2 * q] = Vec<T>::loadu(b + q * stride + kk * kNR);
        bv[2 * q + 1] = Vec<T>::loadu(b + q * stride + kk * kNR + kV);
      }
      for (int r = 0; r < MR; ++r) {
        const Vec<T> av(TA ? a[kk * lda + r] : a[r * lda + kk]);
        for (int j = 0; j < NV; ++j) acc[r][j] = at::vec::fmadd(av, bv[j], acc[r][j]);
      }
    }
    const int64_t col0 = p * kNR;
    for (int j = 0; j < NV; ++j) {
      const int64_t col = col0 + j * kV;
      if (col >= n_) break;
      const int64_t cnt = std::min(kV, n_ - col);
      for (int r = 0; r < MR; ++r) {
        T* dst = c + r * ldc + col;
        Vec<T> v = acc[r][j];
        if (beta != T(0)) v = at::vec::fmadd(Vec<T>(beta), Vec<T>::loadu(dst, cnt), v);
        v.store(dst, cnt);
      }
    }
  }

  int64_t n_, k_, panels_;
  std::unique_ptr<T[], Free> data_;
};

}  // namespace rnnkit
