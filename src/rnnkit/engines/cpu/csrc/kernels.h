// The step plan of one direction and the per-cell time loops (lstm.cpp, gru.cpp, rnn.cpp)
// that layer.cpp launches. A time loop runs on the calling thread: BLAS threads each step's
// GEMM, and the pointwise pass stays whole, since a fork and join per step costs more than
// it saves at recurrent sizes (and stalls whenever a core is busy elsewhere). Where a step's
// GEMM is too small for BLAS threads, the LSTM loops, the GRU loops and the Elman forward
// split the batch instead: the rows of a batch never meet in a time loop, so each thread
// runs every step for its own rows, one fork and join per call (for_blocks).
//
// Layout: every matrix is row-major, one row per (time step, batch element), in the order of
// the padded (time-major) or packed input: the rows of time step t are o_t .. o_t + b_t - 1.
// Gate blocks sit side by side in a row as in torch's weights: LSTM i|f|g|o, GRU r|z|n.
#pragma once

#include "activations.h"
#include "blas.h"

#include <ATen/Parallel.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace rnnkit {

// The steps of one direction in processing order: rnnkit.engines.driver.StepPlan, which the
// tests hold this one to (step_plan in layer.cpp). Padded input is packed input whose batch
// never changes. Forward: time runs up and the batch shrinks (sequences end); reverse: time
// runs down and the batch grows (sequences start from their h0 rows). Either way the state of
// row j lives in row j of one [N, H] buffer, so rows past the active batch keep their value.
struct Plan {
  std::vector<int64_t> off;  // first row of step s
  std::vector<int64_t> bs;   // batch of step s
  int64_t N = 0;             // bs of the widest step
  int64_t rows = 0;          // sum of bs
  bool uniform = true;       // padded: every step has N rows
  bool reverse = false;      // steps run down in time

  int64_t steps() const { return static_cast<int64_t>(bs.size()); }
  // Rows of step s whose previous state is the output of step s - 1; the rest read h0.
  int64_t prev_batch(int64_t s) const { return s == 0 ? 0 : bs[s - 1]; }
  // The rows of steps [s_lo, s_hi) are contiguous in either direction: the first and the count.
  int64_t first_row(int64_t s_lo, int64_t s_hi) const {
    return reverse ? off[s_hi - 1] : off[s_lo];
  }
  int64_t rows_of(int64_t s_lo, int64_t s_hi) const {
    const int64_t last = reverse ? s_lo : s_hi - 1;
    return off[last] + bs[last] - first_row(s_lo, s_hi);
  }
  // First step of the block of steps that ends before s_hi: as many as fit in max_rows rows,
  // and at least one.
  int64_t block_start(int64_t s_hi, int64_t max_rows) const {
    int64_t s = s_hi - 1, n = bs[s];
    while (s > 0 && n + bs[s - 1] <= max_rows) n += bs[--s];
    return s;
  }
};

inline Plan make_plan(c10::ArrayRef<int64_t> batch_sizes, bool reverse) {
  const int64_t T = static_cast<int64_t>(batch_sizes.size());
  std::vector<int64_t> time_off(T);
  Plan p;
  p.reverse = reverse;
  for (int64_t t = 0; t < T; ++t) {
    time_off[t] = p.rows;
    p.rows += batch_sizes[t];
    p.N = std::max(p.N, batch_sizes[t]);
  }
  p.off.resize(T);
  p.bs.resize(T);
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    p.off[s] = time_off[t];
    p.bs[s] = batch_sizes[t];
    p.uniform = p.uniform && batch_sizes[t] == p.N;
  }
  return p;
}

// The batch of every step of R rows whose widest step has N rows (h0's batch). Packed input
// gives its batch sizes; uniform (padded) input gives none, which means R / N steps of N
// rows: the ops then carry no per-step list, which a trace or an exported graph would keep as
// a constant of one sequence length. Either way they are checked against R and N before a
// plan walks the rows: positive, non-increasing, summing to R, the first (the widest) N. An
// empty batch (N = 0, uniform) is one step of no rows.
inline std::vector<int64_t> step_batches(c10::ArrayRef<int64_t> batch_sizes, int64_t R,
                                         int64_t N) {
  // uniform input: [-1] (Python's ops.UNIFORM), or empty
  if (batch_sizes.empty() || (batch_sizes.size() == 1 && batch_sizes[0] < 0)) {
    if (N == 0) {
      TORCH_CHECK(R == 0, "rnnkit fused engine: uniform input of batch N = 0 must have 0 rows, ",
                  "got ", R);
      return {0};
    }
    TORCH_CHECK(R > 0 && R % N == 0, "rnnkit fused engine: uniform input (batch_sizes [-1]) ",
                "must have a positive multiple of N = ", N, " rows (h0's batch), got ", R);
    return std::vector<int64_t>(R / N, N);
  }
  TORCH_CHECK(batch_sizes[0] == N, "rnnkit fused engine: batch_sizes[0] must equal h0's batch N = ",
              N, ", got ", batch_sizes[0]);
  int64_t rows = 0;
  for (size_t t = 0; t < batch_sizes.size(); ++t) {
    TORCH_CHECK(batch_sizes[t] > 0, "rnnkit fused engine: batch_sizes must be positive, got ",
                batch_sizes[t], " at position ", t);
    TORCH_CHECK(t == 0 || batch_sizes[t] <= batch_sizes[t - 1],
                "rnnkit fused engine: batch_sizes must be non-increasing, got ", batch_sizes[t],
                " at position ", t, " after ", t == 0 ? 0 : batch_sizes[t - 1]);
    rows += batch_sizes[t];
  }
  TORCH_CHECK(rows == R, "rnnkit fused engine: batch_sizes sum to ", rows, " but the input has ",
              R, " rows");
  return batch_sizes.vec();
}

// Row j of the state before step s: output row of step s - 1, or row j of h0.
template <typename T>
inline const T* prev_row(const Plan& p, int64_t s, int64_t j, const T* hist, int64_t ld_hist,
                         const T* init, int64_t ld_init) {
  return j < p.prev_batch(s) ? hist + (p.off[s - 1] + j) * ld_hist : init + j * ld_init;
}

// Resets inside a sequence (rnnkit.resets): one code per row, which the time loops apply
// before the row's step. kZero: the state before the step is zeros (a later piece of the
// sequence starts); kInitial: it is the row's initial state (in reverse, the first piece starts
// its run after a later one's); kCarry: the previous step's, as without resets.
constexpr int8_t kCarry = 0, kZero = 1, kInitial = 2;

template <typename T>
struct Restart {
  const int8_t* codes = nullptr;  // [R] this direction's, in row order; null: no resets
  const T* zeros = nullptr;       // a row of zeros as wide as any state

  int8_t at(const Plan& p, int64_t s, int64_t j) const {
    return codes ? codes[p.off[s] + j] : kCarry;
  }
  // Whether any row of the steps [s_lo, s_hi) restarts.
  bool any(const Plan& p, int64_t s_lo, int64_t s_hi) const {
    if (!codes || s_lo >= s_hi) return false;
    const int8_t* c = codes + p.first_row(s_lo, s_hi);
    return std::any_of(c, c + p.rows_of(s_lo, s_hi), [](int8_t v) { return v != kCarry; });
  }
  // Forward, before step s: the state rows [lo, hi) of the rows that restart there, from zeros
  // or from `init`, their initial rows.
  void state(const Plan& p, int64_t s, int64_t lo, int64_t hi, T* state, int64_t width,
             const T* init) const {
    if (!codes) return;
    for (int64_t j = lo; j < hi; ++j) {
      const int8_t code = at(p, s, j);
      if (code == kZero) std::fill_n(state + j * width, width, T(0));
      if (code == kInitial) std::copy_n(init + j * width, width, state + j * width);
    }
  }
  // Backward, after step s: the gradient of the state before it, rows [lo, hi), stops at the
  // rows that restarted there; where they restarted from their initial state it joins that
  // state's gradient, `grad_init` (no gradient flows across a reset).
  void cut(const Plan& p, int64_t s, int64_t lo, int64_t hi, T* grad, int64_t width,
           T* grad_init) const {
    if (!codes) return;
    for (int64_t j = lo; j < hi; ++j) {
      const int8_t code = at(p, s, j);
      if (code == kCarry) continue;
      T* g = grad + j * width;
      if (code == kInitial) {
        T* gi = grad_init + j * width;
        for (int64_t u = 0; u < width; ++u) gi[u] += g[u];
      }
      std::fill_n(g, width, T(0));
    }
  }
  // Row j of the state that step s read: zeros or the initial row where it restarted, else
  // prev_row.
  const T* prev(const Plan& p, int64_t s, int64_t j, const T* hist, int64_t ld_hist,
                const T* init, int64_t ld_init) const {
    const int8_t code = at(p, s, j);
    if (code == kZero) return zeros;
    if (code == kInitial) return init + j * ld_init;
    return prev_row(p, s, j, hist, ld_hist, init, ld_init);
  }
};

// One direction each. Forward: `gates` [R, G*H] holds x W_ih^T on entry; states h [N, H_out]
// (and c [N, H]) hold h0 (c0) on entry and the final state on exit. Backward: dh, dc hold the
// gradient of the final state on entry and that of h0, c0 on exit; dG [R, ...] receives the
// gate gradients that layer.cpp turns into weight and input gradients with one GEMM each.
// When the saved buffers are not needed again (no retain_graph), dG is the saved activation
// buffer itself: a row's activations are all loaded before its gradients are stored over them.

template <typename T>
struct LSTMForward {
  T* gates;          // [R, 4H] x W_ih^T -> saved activations i|f|g|o when train; or null
                     // (inference with x: each step's gates in a scratch block)
  const T* x;        // [R, H_in] or null: each step projects its rows of x by w_ih [4H, H_in]
  const T* w_ih;     // into its gates (project_per_step in layer.cpp); gates then holds no
  int64_t H_in;      // x W_ih^T on entry
  const T* bias;     // [4H] b_ih + b_hh, or null
  const T* w_hh;     // [4H, H_out]
  const T* w_hr;     // [H_out, H] or null
  T* h;              // [N, H_out]
  T* c;              // [N, H]
  T* out;            // [R, ld_out]
  int64_t ld_out;
  T* cs;             // [R, H] saved cell states, or null (inference)
  T* rs;             // [R, H] saved o * tanh(c) with proj when train, else [N, H] scratch
  bool train;
  Restart<T> restart;
  const T* h0;       // [N, H_out] the initial state (read where rows restart from it)
  const T* c0;       // [N, H]
  // inference: what the weights' values are, for the weights cache (weight_cache.h)
  const WeightId* id_ih = nullptr;
  const WeightId* id_hh = nullptr;
  const WeightId* id_hr = nullptr;
  // a bfloat16 layer (T float32): its weights, in place of w_ih, w_hh, w_hr (then null), whose
  // products run in bfloat16 (bf16_gemm.h)
  const c10::BFloat16* w_ih16 = nullptr;
  const c10::BFloat16* w_hh16 = nullptr;
  const c10::BFloat16* w_hr16 = nullptr;
};

template <typename T>
struct LSTMBackward {
  const T* gates;    // [R, 4H] saved activations
  const T* cs;       // [R, H]
  const T* c0;       // [N, H]
  const T* w_hh;     // [4H, H_out]
  const T* w_hr;     // [H_out, H] or null
  const T* gout;     // [R, ld_gout] gradient of the output (ld_gout 0: one row for all)
  int64_t ld_gout;
  T* dh;             // [N, H_out]
  T* dc;             // [N, H]
  T* dG;             // [R, 4H], or `gates` itself
  T* dhs;            // [R, H_out] gradient of each projected h (proj only)
  T* dr;             // [N, H] scratch (proj only)
  Restart<T> restart;
  T* dh0;            // [N, H_out] what reaches h0, c0 at rows that restart from them
  T* dc0;            // [N, H]
  // a bfloat16 layer: w_hh, w_hr in bfloat16, in place of those above (then null), which the
  // per-step products run on
  const c10::BFloat16* w_hh16 = nullptr;
  const c10::BFloat16* w_hr16 = nullptr;
};

// What every op calls first: ATen sets a thread's OpenMP thread count once, at its first
// parallel_for, to MKL's thread count at that moment; inside SingleThreadBlas that is 1, which
// would leave torch at one thread from then on.
inline void init_threads() { at::internal::lazy_init_num_threads(); }

// run(lo, hi) over blocks of [0, n) (batch rows, or the directions of a layer), one block
// per thread when the steps' GEMMs are small (`small`, single-threaded BLAS) and threads are
// free; else run(0, n).
template <typename F>
void for_blocks(int64_t n, bool small, const F& run) {
  const int64_t threads = at::get_num_threads();
  if (small && threads > 1 && n > 1 && !at::in_parallel_region()) {
    const int64_t grain = (n + threads - 1) / threads;
    at::parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) {
      const SingleThreadBlas blas(true);  // per thread
      run(lo, hi);
    });
  } else {
    run(0, n);
  }
}

template <typename T>
void lstm_forward(const Plan& p, int64_t H, int64_t H_out, const LSTMForward<T>& a);
template <typename T>
void lstm_backward(const Plan& p, int64_t H, int64_t H_out, const LSTMBackward<T>& a);

template <typename T>
struct GRUForward {
  const T* xw;       // [R, ld_xw] x W_ih^T in columns 0..3H, or null (x below)
  int64_t ld_xw;
  const T* b_ih;     // [3H] or null
  const T* b_hh;     // [3H] or null
  const T* w_hh;     // [3H, H]
  T* h;              // [N, H]
  T* out;            // [R, ld_out]
  int64_t ld_out;
  T* hw;             // [N, 3H] scratch for h W_hh^T
  T* ws;             // [R, 4H] saved r|z|n|W_hn h + b_hn (may be xw itself), or null
  Restart<T> restart;
  const T* h0;       // [N, H]
  const WeightId* id_hh = nullptr;  // inference: for the weights cache
  // or xw null: each step projects its rows of x [R, H_in] by w_ih [3H, H_in] into the first
  // 3H columns of its ws rows (training) or into xs [N, 3H] (project_per_step in layer.cpp)
  const T* x = nullptr;
  const T* w_ih = nullptr;
  int64_t H_in = 0;
  const WeightId* id_ih = nullptr;
  T* xs = nullptr;
  // a bfloat16 layer: its weights in place of w_hh, w_ih, as LSTMForward's
  const c10::BFloat16* w_hh16 = nullptr;
  const c10::BFloat16* w_ih16 = nullptr;
};

template <typename T>
struct GRUBackward {
  const T* ws;       // [R, 4H]
  const T* out;      // [R, ld_out] forward output: the previous states
  int64_t ld_out;
  const T* h0;       // [N, H]
  const T* w_hh;     // [3H, H]
  const T* gout;     // [R, ld_gout]
  int64_t ld_gout;
  T* dh;             // [N, H]
  T* dG;             // [R, 4H] r|z|n (hidden side, r * da_n)|n (input side, da_n), or `ws`
  Restart<T> restart;
  T* dh0;            // [N, H]
  const c10::BFloat16* w_hh16 = nullptr;  // as LSTMBackward's
};

template <typename T>
void gru_forward(const Plan& p, int64_t H, const GRUForward<T>& a);
template <typename T>
void gru_backward(const Plan& p, int64_t H, const GRUBackward<T>& a);

// The Elman loops work in place of whole-sequence buffers: the forward turns x W_ih^T into the
// output where it lies, and the backward runs one block of steps [s_lo, s_hi) per call, so
// that layer.cpp turns each block's dG into gradients before the next block reuses it.
template <typename T>
struct RNNForward {
  const T* bias;     // [H] b_ih + b_hh, or null
  const T* w_hh;     // [H, H]
  T* h;              // [N, H]
  T* out;            // [R, ld_out] x W_ih^T on entry (unless x), the output on exit
  int64_t ld_out;
  bool relu;
  Restart<T> restart;
  const T* h0;       // [N, H]
  const WeightId* id_hh = nullptr;  // inference: for the weights cache
  // or null: out holds no projection on entry, and each step projects its rows of x [R, H_in]
  // by w_ih [H, H_in] into them (project_per_step in layer.cpp)
  const T* x = nullptr;
  const T* w_ih = nullptr;
  int64_t H_in = 0;
  const WeightId* id_ih = nullptr;
  // a bfloat16 layer: its weights in place of w_hh, w_ih, as LSTMForward's
  const c10::BFloat16* w_hh16 = nullptr;
  const c10::BFloat16* w_ih16 = nullptr;
};

template <typename T>
struct RNNBackward {
  const T* out;      // [R, ld_out] the activations
  int64_t ld_out;
  const StepGemm<T>* gemm_hh;  // dA W_hh, W_hh [H, H] packed once per direction
  const T* gout;     // [R, ld_gout]
  int64_t ld_gout;
  T* dh;             // [N, H]
  T* dG;             // [rows_of(s_lo, s_hi), H] the block's rows, from first_row(s_lo, s_hi)
  bool relu;
  Restart<T> restart;
  T* dh0;            // [N, H]
};

template <typename T>
void rnn_forward(const Plan& p, int64_t H, const RNNForward<T>& a);
template <typename T>
void rnn_backward(const Plan& p, int64_t s_lo, int64_t s_hi, int64_t H, const RNNBackward<T>& a);

}  // namespace rnnkit
