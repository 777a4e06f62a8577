// Row-major GEMM on raw pointers through the BLAS that torch links or rnnkit's own PanelGemm,
// and the per-step GEMM of a recurrence against one fixed weight matrix.
#pragma once

#include "panel_gemm.h"
#include "weight_cache.h"

#include <c10/util/Exception.h>
#include <cpuid.h>
#include <sys/mman.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>

// The Fortran BLAS that torch links (MKL on x86 builds): called on raw pointers it costs well
// under a microsecond per call, where at::mm_out spends microseconds in dispatch, which is the
// whole step time of a small recurrent GEMM. All weak, so that a torch without them still
// loads this library: blas_available() then says the engine cannot run, and the packed GEMM
// and thread-count calls (MKL only) fall back to plain gemm.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
size_t cblas_sgemm_pack_get_size(int, int, int, int) __attribute__((weak));
void cblas_sgemm_pack(int, int, int, int, int, int, float, const float*, int, float*)
    __attribute__((weak));
void cblas_sgemm_compute(int, int, int, int, int, int, const float*, int, const float*, int,
                         float, float*, int) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

namespace rnnkit {

inline bool blas_available() { return sgemm_ != nullptr && dgemm_ != nullptr; }

inline int blas_int(int64_t v) {
  TORCH_CHECK(v <= INT_MAX, "rnnkit fused engine: GEMM dimension ", v, " exceeds BLAS int");
  return static_cast<int>(std::max<int64_t>(v, 1));
}

// MKL picks its kernels by the CPU's vendor: on a CPU that is not Intel's it runs its generic
// `def` kernels (mkl_blas_def_sgemm_kernel_0_zen on an AMD EPYC).
inline bool intel_cpu() {
  static const bool intel = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    return b == 0x756e6547 && d == 0x49656e69 && c == 0x6c65746e;  // "Genu" "ineI" "ntel"
  }();
  return intel;
}

// Which GEMM runs the fused engine's products. rnnkit's own PanelGemm:
// - on every CPU below half a million multiply-adds a step (small_step_gemm), measured faster
//   than MKL's packed GEMM on an AMD EPYC and on an Intel Xeon with AVX-512 (lstm-L1000-N1-H128
//   inference 4.68 -> 4.03 ms there), and per call it saves packing W into a mapped buffer;
// - on a CPU that is not Intel's, at every size: on an AMD EPYC (Zen 4, one thread) it runs
//   16 x 1024 x 256 at 107 GFLOP/s where MKL's packed GEMM runs 59, 64 x 2048 x 512 at 112
//   where MKL runs 84; and the products over whole sequences too (gemm below).
// On an Intel Xeon MKL's packed GEMM was the faster one at 16 x 1024 x 256 (91 against 81
// GMAC/s), so there MKL keeps the larger step products and every whole-sequence product.
// The environment variable RNNKIT_GEMM (read at every product, so that a test can run each
// choice on one machine) overrides: `mkl` runs MKL wherever MKL has it, `own` runs PanelGemm
// for every product that it can run (one thread's step products and the sequence products).
enum class GemmChoice { kByCpu, kMkl, kOwn };

inline GemmChoice gemm_choice() {
  const char* choice = std::getenv("RNNKIT_GEMM");
  if (choice && std::strcmp(choice, "mkl") == 0) return GemmChoice::kMkl;
  if (choice && std::strcmp(choice, "own") == 0) return GemmChoice::kOwn;
  return GemmChoice::kByCpu;
}

// Whether gemm() runs on PanelGemm: on a CPU that is not Intel's, where op(B) is not much
// narrower than a panel (padded to whole panels it stays within twice its size: a B of a few
// columns and many rows, dW of a layer with H_in = 1, stays with BLAS).
template <typename T>
inline bool own_sequence_gemm(int64_t n, int64_t k, T alpha) {
  switch (gemm_choice()) {
    case GemmChoice::kMkl: return false;
    case GemmChoice::kOwn: break;
    default: if (intel_cpu()) return false;
  }
  constexpr int64_t nr = PanelGemm<T>::kNR;
  return alpha == T(1) && k > 0 && (n + nr - 1) / nr * nr <= 2 * n;
}

// Row-major C[m, n] = alpha * op(A) op(B) + beta * C, op(X) = X^T when tX. A column-major
// BLAS sees a row-major matrix as its transpose, so this is C^T = op(B)^T op(A)^T there.
template <typename T>
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                 int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (own_sequence_gemm<T>(n, k, alpha)) {
    // op(B) packed over the threads that then compute
    const PanelGemm<T> panels(b, ldb, tb, n, k, /*parallel=*/true);
    panels.run(ta, m, a, lda, beta, c, ldc);
    return;
  }
  const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
  const int M = blas_int(n), N = blas_int(m), K = static_cast<int>(k);
  const int LA = blas_int(ldb), LB = blas_int(lda), LC = blas_int(ldc);
  TORCH_CHECK(k <= INT_MAX, "rnnkit fused engine: GEMM dimension ", k, " exceeds BLAS int");
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&tra, &trb, &M, &N, &K, &alpha, b, &LA, a, &LB, &beta, c, &LC);
  } else {
    dgemm_(&tra, &trb, &M, &N, &K, &alpha, b, &LA, a, &LB, &beta, c, &LC);
  }
}

// A buffer of anonymous pages, which cost memory only once written. MKL asks for its packed
// weight's buffer with about 7.5 MB of headroom at every size and writes about the weight's
// own size of it (measured with mincore: 1.06 MB resident of 10.6 MB asked for a 1 MB W_hh,
// 45 KB of 7.9 MB for a 4 KB one). A block from torch's allocator would be counted whole.
class MappedBuffer {
 public:
  explicit MappedBuffer(size_t bytes) : bytes_(bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    data_ = p == MAP_FAILED ? nullptr : p;
  }
  ~MappedBuffer() {
    if (data_) munmap(data_, bytes_);
  }
  MappedBuffer(const MappedBuffer&) = delete;
  MappedBuffer& operator=(const MappedBuffer&) = delete;
  void* get() const { return data_; }

 private:
  size_t bytes_;
  void* data_ = nullptr;
};

// Below about half a million multiply-adds a step, a second thread costs more than it saves
// (measured: 1 x 128 x 512 runs in 2.1 us on one MKL thread, 3.3 us on two).
inline bool small_step_gemm(int64_t macs_per_step) { return macs_per_step < (int64_t(1) << 19); }

// C[m, n] = A[m, k] op(W) + beta * C for one weight W used at every step, m <= max_m. W is
// packed once, into PanelGemm's panels or MKL's internal layout (float32): a
// per-step GEMM then skips the repacking of W that every plain call does, 1.5-2x faster at
// recurrent sizes. PanelGemm runs products that one thread computes, as own_step_gemm says;
// larger ones stay with MKL, which threads them itself (splitting a large step's panels over
// threads at every step lost to MKL's threading on an AMD EPYC: lstm-L100-N32-H256 inference
// 1.31x -> 1.60x torch.nn).
inline bool own_step_gemm(bool single_thread, int64_t macs) {
  if (!single_thread) return false;
  switch (gemm_choice()) {
    case GemmChoice::kMkl: return cblas_sgemm_compute == nullptr;
    case GemmChoice::kOwn: return true;
    default: return small_step_gemm(macs) || !intel_cpu() || cblas_sgemm_compute == nullptr;
  }
}

// An LSTM layer splits its batch (and a bidirectional layer its directions) over the threads,
// each running its rows' steps on one BLAS thread, up to about 16 million multiply-adds a step:
// no parallel region per step. Measured on 2 cores of an Intel Xeon against MKL threading each
// step: lstm-L100-N32-H256 (8.4M a step) inference 15.7 -> 13.9 ms, training 45.7 -> 40.5;
// bidirectional L100-N16-H128 6.8 -> 4.8, 16.8 -> 12.8; at 2-layer N64-H512 (67M a step) the
// split lost (105.6 -> 109.0, 299 -> 310). Where PanelGemm runs every single-thread product (a
// CPU that is not Intel's) the split runs at every size: on an AMD EPYC (Zen 4) lstm2-L50-N64-H512
// inference 249 -> 167 ms (interleaved runs, medians). The GRU loops and the Elman forward split
// the same way: there (AMD EPYC, 2 threads, interleaved) gru-L100-N32-H256 inference 37.4 ->
// 13.7 ms, training 60.9 -> 50.8; rnn-tanh-L100-N32-H256 inference 9.7 -> 5.9 (the whole step
// products had gone to MKL's generic threaded kernels). Not yet measured for them on Intel.
inline bool split_step_gemm(int64_t macs_per_step) {
  return macs_per_step < (int64_t(1) << 24) || own_step_gemm(true, macs_per_step) && !intel_cpu();
}

template <typename T>
class StepGemm {
 public:
  // op(W) = W^T when trans_w; W is row-major with leading dimension ldw.
  // single_thread: one thread computes each product (the caller holds SingleThreadBlas).
  // id: what W's values are (an inference call), whose panels are then looked up in the
  // weights cache (weight_cache.h); else W is packed for this call.
  // w16: W in bfloat16 (then w is null, and T float32), whose products run on Bf16Gemm's
  // panels on the calling thread.
  StepGemm(const T* w, int64_t ldw, bool trans_w, int64_t n, int64_t k, int64_t max_m,
           bool single_thread, const WeightId* id = nullptr,
           const c10::BFloat16* w16 = nullptr)
      : w_(w), ldw_(ldw), trans_w_(trans_w), n_(n), k_(k) {
    if (max_m <= 0 || n <= 0 || k <= 0) return;
    if (w16) {
      bf16_ = id ? cached_bf16(*id, w16, ldw, trans_w, n, k)
                 : std::make_shared<const Bf16Gemm>(w16, ldw, trans_w, n, k);
      return;
    }
    if (own_step_gemm(single_thread, max_m * n * k)) {
      panels_ = id ? cached_panels<T>(*id, w, ldw, trans_w, n, k)
                   : std::make_shared<const PanelGemm<T>>(w, ldw, trans_w, n, k);
      return;
    }
    if constexpr (std::is_same_v<T, float>) {
      if (cblas_sgemm_pack_get_size && cblas_sgemm_pack && cblas_sgemm_compute) {
        const size_t bytes = cblas_sgemm_pack_get_size(
            kBMatrix, blas_int(max_m), blas_int(n), blas_int(k));
        auto buffer = std::make_unique<MappedBuffer>(bytes);
        if (buffer->get()) {
          packed_ = std::move(buffer);
          cblas_sgemm_pack(kRowMajor, kBMatrix, trans_w ? kTrans : kNoTrans, blas_int(max_m),
                           blas_int(n), blas_int(k), 1.0f, w, blas_int(ldw),
                           static_cast<float*>(packed_->get()));
        }
      }
    }
  }

  void operator()(int64_t m, const T* a, int64_t lda, T beta, T* c, int64_t ldc) const {
    if (m == 0) return;
    if (panels_) {
      (*panels_)(m, a, lda, beta, c, ldc);
      return;
    }
    if constexpr (std::is_same_v<T, float>) {
      if (bf16_) {
        (*bf16_)(m, a, lda, beta, c, ldc);
        return;
      }
      if (packed_) {
        cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, blas_int(m), blas_int(n_),
                            blas_int(k_), a, blas_int(lda),
                            static_cast<const float*>(packed_->get()), blas_int(n_), beta, c,
                            blas_int(ldc));
        return;
      }
    }
    gemm<T>(false, trans_w_, m, n_, k_, T(1), a, lda, w_, ldw_, beta, c, ldc);
  }

 private:
  // CBLAS enum values (mkl_cblas.h)
  static constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151;
  static constexpr int kBMatrix = 162;
  const T* w_;
  int64_t ldw_;
  bool trans_w_;
  int64_t n_, k_;
  std::shared_ptr<const PanelGemm<T>> panels_;
  std::shared_ptr<const Bf16Gemm> bf16_;
  std::unique_ptr<MappedBuffer> packed_;
};

// Pins the calling thread's BLAS calls to that thread while in scope, when `active` (MKL only;
// elsewhere a no-op): for per-step GEMMs too small to pay for waking more threads.
class SingleThreadBlas {
 public:
  explicit SingleThreadBlas(bool active) : active_(active && MKL_Set_Num_Threads_Local) {
    if (active_) previous_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadBlas() {
    if (active_) MKL_Set_Num_Threads_Local(previous_);
  }
  SingleThreadBlas(const SingleThreadBlas&) = delete;
  SingleThreadBlas& operator=(const SingleThreadBlas&) = delete;

 private:
  bool active_;
  int previous_ = 0;
};

}  // namespace rnnkit
