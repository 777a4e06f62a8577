// rnnkit's own GEMM for the per-step product of a recurrence, C[m, n] (+)= A[m, k] op(W), with
// W fixed for the whole sequence and m (the batch rows of one thread) small. Written for the
// CPUs where MKL takes its generic code path (on an AMD EPYC, MKL's sgemv runs its `def`
// kernel, 5.2 us for a [1, 128] x [128, 512] product that this one does in about half that),
// it was also measured faster than MKL's packed GEMM on an Intel Xeon with AVX-512, so it runs
// the single-thread step products on every CPU (blas.h). op(W) is packed once into panels that
// a register tile walks with unit stride; the tiles keep their sums in registers across the
// whole k loop.
#pragma once

#include "activations.h"

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
  PanelGemm(const T* w, int64_t ldw, bool trans_w, int64_t n, int64_t k)
      : n_(n), k_(k), panels_((n + kNR - 1) / kNR) {
    const int64_t size = std::max<int64_t>(panels_ * k * kNR, 1);
    data_.reset(static_cast<T*>(::operator new[](size * sizeof(T), std::align_val_t(64))));
    for (int64_t p = 0; p < panels_; ++p) {
      T* dst = data_.get() + p * k * kNR;
      for (int64_t kk = 0; kk < k; ++kk) {
        for (int64_t j = 0; j < kNR; ++j) {
          const int64_t col = p * kNR + j;
          T v = T(0);
          if (col < n) v = trans_w ? w[col * ldw + kk] : w[kk * ldw + col];
          dst[kk * kNR + j] = v;
        }
      }
    }
  }

  // C = A op(W) + beta C (beta 0 never reads C).
  void operator()(int64_t m, const T* a, int64_t lda, T beta, T* c, int64_t ldc) const {
    // Panels outer, rows inner: each panel (k * kNR values, 16 KB at k = 256 in float32)
    // comes from memory once per step and stays in L1 while every row block uses it.
    for (int64_t p = 0; p < panels_; p += kGroup) {
      const int64_t np = std::min(kGroup, panels_ - p);
      int64_t r = 0;
      for (; r + 6 <= m; r += 6) panels<6, 1>(p, np, a + r * lda, lda, beta, c + r * ldc, ldc);
      switch (m - r) {
        case 5: panels<5, 1>(p, np, a + r * lda, lda, beta, c + r * ldc, ldc); break;
        case 4: panels<4, 1>(p, np, a + r * lda, lda, beta, c + r * ldc, ldc); break;
        case 3: panels<3, 2>(p, np, a + r * lda, lda, beta, c + r * ldc, ldc); break;
        case 2: panels<2, 2>(p, np, a + r * lda, lda, beta, c + r * ldc, ldc); break;
        case 1: panels<1, 4>(p, np, a + r * lda, lda, beta, c + r * ldc, ldc); break;
        default: break;
      }
    }
  }

 private:
  // Panels walked together by the outer loop: the widest tile (1 row, 4 panels) spans them.
  static constexpr int64_t kGroup = 4;

  struct Free {
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };

  // Rows [0, MR) of C over the np panels from panel p, NP panels per tile, the rest one by one.
  template <int MR, int NP>
  void panels(int64_t p, int64_t np, const T* a, int64_t lda, T beta, T* c, int64_t ldc) const {
    int64_t q = 0;
    if constexpr (NP > 1) {
      for (; q + NP <= np; q += NP) tile<MR, NP>(p + q, a, lda, beta, c, ldc);
    }
    for (; q < np; ++q) tile<MR, 1>(p + q, a, lda, beta, c, ldc);
  }

  // C[0:MR, cols of panels p .. p + NP) (+)= A[0:MR, :] op(W)[:, those cols]: MR x 2NP vector
  // sums, each A value broadcast once per k and each panel vector loaded once per k. Never
  // inlined: inlined into a caller's loop (the time loops), GCC kept the sums on the stack and
  // the tile ran at half speed (measured on an Intel Xeon, 6 x 32 x 1024: 5.2 us inlined,
  // 2.5 us as its own function, whose k loop holds every sum in a register).
  template <int MR, int NP>
  __attribute__((noinline)) void tile(int64_t p, const T* a, int64_t lda, T beta, T* c, int64_t ldc) const {
    constexpr int NV = 2 * NP;
    const T* b = data_.get() + p * k_ * kNR;
    const int64_t stride = k_ * kNR;
    Vec<T> acc[MR][NV];
    for (int r = 0; r < MR; ++r) {
      for (int j = 0; j < NV; ++j) acc[r][j] = Vec<T>(T(0));
    }
    for (int64_t kk = 0; kk < k_; ++kk) {
      Vec<T> bv[NV];
      for (int q = 0; q < NP; ++q) {
        bv[2 * q] = Vec<T>::loadu(b + q * stride + kk * kNR);
        bv[2 * q + 1] = Vec<T>::loadu(b + q * stride + kk * kNR + kV);
      }
      for (int r = 0; r < MR; ++r) {
        const Vec<T> av(a[r * lda + kk]);
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
