// Launchers of the fused CPU engine: one layer (both directions) forward or backward. They
// allocate every buffer once, run the input projection and the weight and input gradients as
// one GEMM each over all steps (the Elman backward: over blocks of steps), and hand the
// recurrent part to the per-cell time loops.
#include "checks.h"
#include "kernels.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/to.h>
#include <ATen/ops/zeros.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace rnnkit {
namespace {

using at::Tensor;

// The weights of one direction, in torch's _flat_weights order.
struct Weights {
  Tensor w_ih, w_hh, b_ih, b_hh, w_hr;
};

std::vector<Weights> split_weights(const LayerShape& s, at::TensorList weights, bool has_bias) {
  const int64_t per_dir = static_cast<int64_t>(weights.size()) / s.D;
  std::vector<Weights> out(s.D);
  for (int64_t d = 0; d < s.D; ++d) {
    const at::TensorList w = weights.slice(d * per_dir, per_dir);
    out[d].w_ih = w[0].contiguous();
    out[d].w_hh = w[1].contiguous();
    if (has_bias) {
      out[d].b_ih = w[2].contiguous();
      out[d].b_hh = w[3].contiguous();
    }
    if (s.proj) out[d].w_hr = w[per_dir - 1].contiguous();
  }
  return out;
}

template <typename T>
T* ptr(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// A weight matrix as the time loops take it: its float32 or float64 values (mat), or a
// bfloat16 layer's bfloat16 ones (mat16); null where it is of the other kind or absent.
template <typename T>
const T* mat(const Tensor& t) {
  return t.defined() && t.scalar_type() != at::kBFloat16 ? t.data_ptr<T>() : nullptr;
}

const c10::BFloat16* mat16(const Tensor& t) {
  return t.defined() && t.scalar_type() == at::kBFloat16 ? t.data_ptr<c10::BFloat16>() : nullptr;
}

Tensor none_like(const Tensor& x) { return at::empty({0}, x.options()); }

// Rows of gate gradients that the Elman backward holds at a time, and of previous states that
// a packed input gathers at a time: a block of that many rows stays in cache between the time
// loop and its GEMMs, and is still tall enough for the GEMMs to run at full speed.
constexpr int64_t kBlockRows = 128;

// dW_hh (+)= sum over the steps [s_lo, s_hi) of dA_s^T h_{s-1}, with dG the rows of those
// steps (from first_row(s_lo, s_hi)); beta 0 overwrites dw, 1 adds. Padded input: the previous
// states are the output rows one step back (N rows before in the forward direction, N after
// in the reverse one), and h0 for step 0: two GEMMs on views. Packed input, or rows that
// restart (zeros or h0 as their previous state): gather them first, kBlockRows rows at a time.
template <typename T>
void weight_grad_hh(const Plan& p, int64_t s_lo, int64_t s_hi, int64_t GH, const T* dG,
                    int64_t ldG, const T* h0, const T* out, int64_t ld_out, int64_t H_out,
                    const Restart<T>& restart, T beta, T* dw) {
  const int64_t r0 = p.first_row(s_lo, s_hi);
  if (p.uniform && !restart.any(p, s_lo, s_hi)) {
    int64_t s = s_lo;
    if (s == 0) {
      gemm<T>(true, false, GH, H_out, p.N, T(1), dG + (p.off[0] - r0) * ldG, ldG, h0, H_out,
              beta, dw, H_out);
      beta = T(1);
      s = 1;
    }
    if (s < s_hi) {
      const int64_t r = p.first_row(s, s_hi), prev = p.reverse ? r + p.N : r - p.N;
      gemm<T>(true, false, GH, H_out, p.rows_of(s, s_hi), T(1), dG + (r - r0) * ldG, ldG,
              out + prev * ld_out, ld_out, beta, dw, H_out);
    }
    return;
  }
  const int64_t max_rows = std::min(p.rows_of(s_lo, s_hi), std::max(kBlockRows, p.N));
  const Tensor buffer =
      at::empty({max_rows, H_out}, at::TensorOptions(c10::CppTypeToScalarType<T>::value));
  T* prev = ptr<T>(buffer);
  for (int64_t top = s_hi; top > s_lo;) {
    const int64_t bottom = std::max(s_lo, p.block_start(top, kBlockRows));
    const int64_t r = p.first_row(bottom, top);
    for (int64_t s = bottom; s < top; ++s) {
      for (int64_t j = 0; j < p.bs[s]; ++j) {
        const T* src = restart.prev(p, s, j, out, ld_out, h0, H_out);
        std::memcpy(prev + (p.off[s] + j - r) * H_out, src, H_out * sizeof(T));
      }
    }
    gemm<T>(true, false, GH, H_out, p.rows_of(bottom, top), T(1), dG + (r - r0) * ldG, ldG,
            prev, H_out, beta, dw, H_out);
    beta = T(1);
    top = bottom;
  }
}

// One direction's gradients that sum over steps, and what they are computed from:
//   dX = dA W_ih,  dW_ih = dA^T X,  dW_hh = dA^T H_prev,  db_hh = sum_rows dA,
// with dA the input-side or hidden-side columns of dG (they differ for GRU only, see
// gru.cpp); db_ih is the input side's sum, which finish_bias copies from db_hh where equal.
template <typename T>
struct StepGrads {
  int64_t mode, H, H_in, H_out;
  const T* x;        // [R, H_in]
  const T* w_ih;     // [G*H, H_in]
  const T* h0;       // [N, H_out]
  const T* out;      // [R, ld_out] this direction's output columns: the previous states
  int64_t ld_out;
  T* dx;             // [R, H_in], or null
  bool dx_add;       // another direction wrote dx first
  const c10::BFloat16* w_ih16 = nullptr;  // a bfloat16 layer: dX's products in bfloat16
  T* dw_ih;          // [G*H, H_in]
  T* dw_hh;          // [G*H, H_out]
  Tensor db_ih, db_hh;  // [G*H] each, or undefined without bias
  Restart<T> restart;   // the previous states of the rows that restart
};

// dst (+)= the column sums of src: the bias gradient of a block of rows.
void add_colsum(const Tensor& src, Tensor dst, bool overwrite) {
  if (overwrite) {
    at::sum_out(dst, src, 0);
  } else {
    dst.add_(src.sum(0));
  }
}

// Adds the gradients of the steps [s_lo, s_hi) to g from dG, their rows (from
// first_row(s_lo, s_hi)); `first`: the direction's first block, which overwrites.
template <typename T>
void add_step_grads(const Plan& p, int64_t s_lo, int64_t s_hi, const T* dG, int64_t ldG,
                    const StepGrads<T>& g, bool first) {
  const int64_t r0 = p.first_row(s_lo, s_hi), rows = p.rows_of(s_lo, s_hi);
  const int64_t H = g.H, H_in = g.H_in, GH = gate_blocks(g.mode) * H;
  const T beta = first ? T(0) : T(1);
  const T* p_x = g.x + r0 * H_in;
  // GRU's input side is blocks r, z (columns 0..2H) and n (columns 3H..4H)
  const int64_t K = g.mode == GRU ? 2 * H : GH;
  if (g.dx && g.w_ih16) {
    if constexpr (std::is_same_v<T, float>) {
      T* p_dx = g.dx + r0 * H_in;
      Bf16Gemm(g.w_ih16, H_in, false, H_in, K, true)
          .run(rows, dG, ldG, g.dx_add ? T(1) : T(0), p_dx, H_in);
      if (g.mode == GRU) {
        Bf16Gemm(g.w_ih16 + 2 * H * H_in, H_in, false, H_in, H, true)
            .run(rows, dG + 3 * H, ldG, T(1), p_dx, H_in);
      }
    }
  } else if (g.dx) {
    T* p_dx = g.dx + r0 * H_in;
    gemm<T>(false, false, rows, H_in, K, T(1), dG, ldG, g.w_ih, H_in, g.dx_add ? T(1) : T(0),
            p_dx, H_in);
    if (g.mode == GRU) {
      gemm<T>(false, false, rows, H_in, H, T(1), dG + 3 * H, ldG, g.w_ih + 2 * H * H_in, H_in,
              T(1), p_dx, H_in);
    }
  }
  gemm<T>(true, false, K, H_in, rows, T(1), dG, ldG, p_x, H_in, beta, g.dw_ih, H_in);
  if (g.mode == GRU) {
    gemm<T>(true, false, H, H_in, rows, T(1), dG + 3 * H, ldG, p_x, H_in, beta,
            g.dw_ih + 2 * H * H_in, H_in);
  }
  weight_grad_hh<T>(p, s_lo, s_hi, GH, dG, ldG, g.h0, g.out, g.ld_out, g.H_out, g.restart, beta,
                    g.dw_hh);
  if (g.db_hh.defined()) {
    const Tensor block =
        at::from_blob(const_cast<T*>(dG), {rows, ldG}, {ldG, 1}, g.db_hh.options());
    add_colsum(block.narrow(1, 0, GH), g.db_hh, first);
    if (g.mode == GRU) add_colsum(block.narrow(1, 3 * H, H), g.db_ih.narrow(0, 2 * H, H), first);
  }
}

// db_ih = db_hh but for GRU's n block, which add_step_grads summed on its own.
template <typename T>
void finish_bias(const StepGrads<T>& g) {
  if (!g.db_hh.defined()) return;
  const int64_t n = g.mode == GRU ? 2 * g.H : g.db_hh.size(0);
  g.db_ih.narrow(0, 0, n).copy_(g.db_hh.narrow(0, 0, n));
}

// Returns [out [R, D*H_out], h_n [D, N, H_out], c_n [D, N, H] (LSTM; else empty), then the
// buffers backward needs, per direction: LSTM activations, cell states and r_t (empty
// without proj); GRU r|z|n|h_n; RNN none. Nothing is saved unless `train`.
// The two directions of a bidirectional layer are independent time loops. Where they split
// (split_directions), each direction runs on its own thread with one BLAS thread (for_blocks).
// Measured on 2 cores of an Intel Xeon, LSTM H_in = H = 128, N = 16, L = 100, bidirectional:
// inference 6.8 -> 4.8 ms, a training step 16.8 -> 12.8 ms.
// Whether a layer's directions run on threads of their own: as the LSTM and GRU time loops
// split their batch (split_step_gemm), else (the Elman layers, whose backward does not split
// its batch) where one step's product is too small for BLAS threads.
inline bool split_directions(int64_t mode, int64_t macs_per_step) {
  return mode == LSTM || mode == GRU ? split_step_gemm(macs_per_step)
                                     : small_step_gemm(macs_per_step);
}

template <typename F>
void for_directions(int64_t D, bool small_steps, const F& run) {
  for_blocks(D, small_steps, [&](int64_t lo, int64_t hi) {
    for (int64_t d = lo; d < hi; ++d) run(d);
  });
}

// Whether the time loops project each step's rows of x themselves, x_t W_ih^T into the gates
// they read next (lstm.cpp, gru.cpp, rnn.cpp), rather than one GEMM over the whole sequence
// first: those gates stay in cache, and inference holds one step's gates instead of [R, G*H].
// Measured on 2 cores of an AMD EPYC (Zen 4), LSTM inference, per-step against whole-sequence
// (ms, interleaved runs): L200-N16-H64 one thread 4.16 / 5.41, two 3.31 / 4.23;
// L100-N32-H256 38.9 / 44.2 and 33.2 / 35.0; 2-layer L50-N64-H512 304 / 323 and 143 / 160;
// training L100-N32-H256 57.8 / 63.7 on two threads; the Elman and GRU loops gain less (RNN
// L200-N16-H64 inference 0.95 -> 0.86 ms on one thread). At batch 1 the whole-sequence GEMM
// wins (LSTM L1000-N1-H128 inference 7.8 / 6.8 ms on one thread): a step's product of one row
// reads all of W_ih for one row of work.
// RNNKIT_PROJECTION=step|sequence (read at every call, so that a test runs both) overrides.
bool project_per_step(int64_t N) {
  const char* choice = std::getenv("RNNKIT_PROJECTION");
  if (choice && std::strcmp(choice, "step") == 0) return true;
  if (choice && std::strcmp(choice, "sequence") == 0) return false;
  return N >= 2;
}

template <typename T>
std::vector<Tensor> forward_impl(int64_t mode, const LayerShape& s, const Tensor& x,
                                 const Tensor& h0, const std::optional<Tensor>& c0,
                                 const std::optional<Tensor>& restart, at::TensorList weights,
                                 bool has_bias, bool train) {
  const int64_t D = s.D, N = s.N, H_out = s.H_out, R = s.R, H_in = s.H_in, G = s.G, H = s.H;
  const bool proj = s.proj;
  std::vector<Weights> ws = split_weights(s, weights, has_bias);
  const std::vector<T> zeros(std::max(H, H_out), T(0));
  // A bfloat16 layer's products run in bfloat16 on its matrices (bf16_gemm.h); its biases are
  // added in float32, as the pointwise math is.
  const bool bf16 = s.wdtype == at::kBFloat16;
  if (bf16) {
    for (Weights& w : ws) {
      if (has_bias) {
        w.b_ih = w.b_ih.to(at::kFloat);
        w.b_hh = w.b_hh.to(at::kFloat);
      }
    }
  }

  Tensor out = at::empty({R, D * H_out}, x.options());
  Tensor h_n = h0.clone(at::MemoryFormat::Contiguous);
  Tensor c_n = mode == LSTM ? c0->clone(at::MemoryFormat::Contiguous) : none_like(x);
  // A training GRU projects into the first 3H columns of its [R, 4H] saved buffer, which the
  // step pass then overwrites in place with r|z|n|h_n: no separate [R, 3H] projection. The
  // Elman cell projects into its output columns, which the step pass turns into h_t.
  const bool elman = mode == RNN_TANH || mode == RNN_RELU;
  const int64_t ld_gates = elman ? D * H_out : mode == GRU && train ? 4 * H : G * H;
  std::vector<Tensor> gates(D), bias(D), cs(D), rs(D), hw(D);
  const bool per_step = project_per_step(N);
  // inference: W_ih, W_hh, W_hr of each direction as the weights cache knows them
  std::vector<std::array<WeightId, 3>> ids(D);
  if (!train) {
    for (int64_t d = 0; d < D; ++d) {
      ids[d] = {WeightId::of(ws[d].w_ih), WeightId::of(ws[d].w_hh), WeightId::of(ws[d].w_hr)};
    }
  }
  for (int64_t d = 0; d < D; ++d) {
    // [R, G*H] = x W_ih^T for all steps at once, unless the time loop projects each step (into
    // the saved buffer when training; in inference the LSTM loop into a scratch block of its
    // own, the GRU loop into [N, 3H] here, the Elman loop into the output); the biases join
    // in the step pass
    if (!elman && (train || !per_step)) gates[d] = at::empty({R, ld_gates}, x.options());
    if (mode == GRU && per_step && !train) gates[d] = at::empty({N, 3 * H}, x.options());
    if (!per_step) {
      T* p_gates = elman ? ptr<T>(out) + d * H_out : ptr<T>(gates[d]);
      if (bf16) {
        if constexpr (std::is_same_v<T, float>) {
          const c10::BFloat16* w = mat16(ws[d].w_ih);
          const auto panels =
              train ? std::make_shared<const Bf16Gemm>(w, H_in, true, G * H, H_in, true)
                    : cached_bf16(ids[d][0], w, H_in, true, G * H, H_in);
          panels->run(R, ptr<T>(x), H_in, T(0), p_gates, ld_gates);
        }
      } else if (!train && own_sequence_gemm<T>(G * H, H_in, T(1))) {
        cached_panels<T>(ids[d][0], ptr<T>(ws[d].w_ih), H_in, true, G * H, H_in)
            ->run(false, R, ptr<T>(x), H_in, T(0), p_gates, ld_gates);
      } else {
        gemm<T>(false, true, R, G * H, H_in, T(1), ptr<T>(x), H_in, ptr<T>(ws[d].w_ih), H_in,
                T(0), p_gates, ld_gates);
      }
    }
    if (has_bias && mode != GRU) bias[d] = at::add(ws[d].b_ih, ws[d].b_hh);
    if (mode == LSTM && train) cs[d] = at::empty({R, H}, x.options());
    if (mode == LSTM && proj) rs[d] = at::empty({train ? R : N, H}, x.options());
    if (mode == GRU) hw[d] = at::empty({N, 3 * H}, x.options());
  }
  std::vector<Plan> plans(D);
  for (int64_t d = 0; d < D; ++d) plans[d] = make_plan(s.batch_sizes, d == 1);

  for_directions(D, split_directions(mode, N * G * H * H_out), [&](int64_t d) {
    const Plan& p = plans[d];
    T* p_out = ptr<T>(out) + d * H_out;
    T* p_h = ptr<T>(h_n) + d * N * H_out;
    const T* p_h0 = ptr<T>(h0) + d * N * H_out;
    const Restart<T> rs_d = direction_restart<T>(restart, d, R, zeros);
    if (mode == LSTM) {
      T* p_c = ptr<T>(c_n) + d * N * H;
      LSTMForward<T> a{ptr<T>(gates[d]), per_step ? ptr<T>(x) : nullptr, mat<T>(ws[d].w_ih),
                       H_in, ptr<T>(bias[d]), mat<T>(ws[d].w_hh), mat<T>(ws[d].w_hr),
                       p_h, p_c, p_out, D * H_out, ptr<T>(cs[d]), ptr<T>(rs[d]), train,
                       rs_d, p_h0, ptr<T>(*c0) + d * N * H};
      if (!train) {
        a.id_ih = &ids[d][0];
        a.id_hh = &ids[d][1];
        a.id_hr = &ids[d][2];
      }
      a.w_ih16 = mat16(ws[d].w_ih);
      a.w_hh16 = mat16(ws[d].w_hh);
      a.w_hr16 = mat16(ws[d].w_hr);
      lstm_forward<T>(p, H, H_out, a);
    } else if (mode == GRU) {
      GRUForward<T> a{ptr<T>(gates[d]), ld_gates, ptr<T>(ws[d].b_ih), ptr<T>(ws[d].b_hh),
                      mat<T>(ws[d].w_hh), p_h, p_out, D * H_out, ptr<T>(hw[d]),
                      train ? ptr<T>(gates[d]) : nullptr, rs_d, p_h0};
      if (!train) a.id_hh = &ids[d][1];
      a.w_hh16 = mat16(ws[d].w_hh);
      if (per_step) {
        a.xw = nullptr;
        a.x = ptr<T>(x);
        a.w_ih = mat<T>(ws[d].w_ih);
        a.w_ih16 = mat16(ws[d].w_ih);
        a.H_in = H_in;
        if (!train) {
          a.id_ih = &ids[d][0];
          a.xs = ptr<T>(gates[d]);
        }
      }
      gru_forward<T>(p, H, a);
    } else {
      RNNForward<T> a{ptr<T>(bias[d]), mat<T>(ws[d].w_hh), p_h, p_out, D * H_out,
                      mode == RNN_RELU, rs_d, p_h0};
      if (!train) a.id_hh = &ids[d][1];
      a.w_hh16 = mat16(ws[d].w_hh);
      if (per_step) {
        a.x = ptr<T>(x);
        a.w_ih = mat<T>(ws[d].w_ih);
        a.w_ih16 = mat16(ws[d].w_ih);
        a.H_in = H_in;
        if (!train) a.id_ih = &ids[d][0];
      }
      rnn_forward<T>(p, H, a);
    }
  });

  std::vector<Tensor> result{out, h_n, c_n};
  if (!train) return result;
  for (int64_t d = 0; d < D; ++d) {
    if (mode == LSTM) {
      result.insert(result.end(), {gates[d], cs[d], proj ? rs[d] : none_like(x)});
    } else if (mode == GRU) {
      result.push_back(gates[d]);
    }
  }
  return result;
}

// Returns [dx (empty unless need_dx), dh0, dc0 (LSTM; else empty), then the gradients of
// `weights` in their order]. `reuse_saved`: the saved buffers are not needed after this call
// (no retain_graph), so the LSTM and GRU time loops write their gate gradients over them.
template <typename T>
std::vector<Tensor> backward_impl(int64_t mode, const LayerShape& s, const Tensor& grad_out,
                                  const Tensor& grad_hn, const std::optional<Tensor>& grad_cn,
                                  const Tensor& x, const Tensor& h0,
                                  const std::optional<Tensor>& c0,
                                  const std::optional<Tensor>& restart, at::TensorList weights,
                                  const Tensor& out, at::TensorList saved, bool has_bias,
                                  bool need_dx, bool reuse_saved) {
  const int64_t D = s.D, N = s.N, H_out = s.H_out, R = s.R, H_in = s.H_in, G = s.G, H = s.H;
  const bool proj = s.proj;
  // A bfloat16 layer: its per-step products and dX run in bfloat16 on its matrices (mat16),
  // the weight gradients (sums over the steps) in float32; its biases are not read here.
  const std::vector<Weights> ws = split_weights(s, weights, has_bias);
  const std::vector<T> zeros(std::max(H, H_out), T(0));
  // with resets: what reaches h0, c0 at the rows that restart from them, added at the end
  const bool resets = present(restart);
  const Tensor dh_init = resets ? at::zeros({D, N, H_out}, x.options()) : none_like(x);
  const Tensor dc_init = resets && mode == LSTM ? at::zeros({D, N, H}, x.options()) : none_like(x);

  // GRU keeps the input-side n gradient as a fourth block, see gru.cpp
  const int64_t ldG = mode == GRU ? 4 * H : G * H;
  const int64_t per_dir = mode == LSTM ? 3 : mode == GRU ? 1 : 0;

  // The kernels read grad_out by rows of unit column stride, at any row stride: a gradient
  // broadcast over the rows (as the output's sum or mean gives) is read as its one row, and a
  // copy is made only of gradients strided otherwise.
  Tensor gout = grad_out;
  if (gout.stride(1) != 1) {
    gout = R > 0 && gout.stride(0) == 0 ? gout.narrow(0, 0, 1).contiguous().expand_as(gout)
                                        : gout.contiguous();
  }
  const int64_t ld_gout = gout.stride(0);
  Tensor dh = grad_hn.clone(at::MemoryFormat::Contiguous);
  Tensor dc = mode == LSTM ? grad_cn->clone(at::MemoryFormat::Contiguous) : none_like(x);
  std::vector<Plan> plans(D);
  for (int64_t d = 0; d < D; ++d) plans[d] = make_plan(s.batch_sizes, d == 1);
  // allocated where first written: the LSTM and GRU time loops run without it
  Tensor dx = none_like(x);
  std::vector<Tensor> result{dx, dh, dc};
  auto allocate_dx = [&] {
    if (need_dx) result[0] = dx = at::empty({R, H_in}, x.options());
  };
  auto finish_initial = [&] {
    if (!resets) return;
    dh.add_(dh_init);
    if (mode == LSTM) dc.add_(dc_init);
  };

  // The gradient tensors of direction d, appended to `result` in the order of `weights`
  // (but for W_hr, which comes last and which the LSTM branch appends itself).
  auto step_grads = [&](int64_t d) {
    StepGrads<T> g{mode, H, H_in, H_out, ptr<T>(x), mat<T>(ws[d].w_ih),
                   ptr<T>(h0) + d * N * H_out, ptr<T>(out) + d * H_out, D * H_out,
                   need_dx ? ptr<T>(dx) : nullptr, d > 0};
    g.restart = direction_restart<T>(restart, d, R, zeros);
    g.w_ih16 = mat16(ws[d].w_ih);
    const Tensor dw_ih = at::empty({G * H, H_in}, x.options());
    const Tensor dw_hh = at::empty({G * H, H_out}, x.options());
    g.dw_ih = ptr<T>(dw_ih);
    g.dw_hh = ptr<T>(dw_hh);
    result.insert(result.end(), {dw_ih, dw_hh});
    if (has_bias) {
      g.db_ih = at::empty({G * H}, x.options());
      g.db_hh = at::empty({G * H}, x.options());
      result.insert(result.end(), {g.db_ih, g.db_hh});
    }
    return g;
  };

  if (mode == RNN_TANH || mode == RNN_RELU) {
    // A block of steps at a time: its dA rows become weight and input gradients before the
    // next block overwrites them, so dG never spans the sequence.
    const Tensor dG = at::empty({std::min(R, std::max(kBlockRows, N)), H}, x.options());
    allocate_dx();
    for (int64_t d = 0; d < D; ++d) {
      const Plan& p = plans[d];
      const StepGrads<T> g = step_grads(d);
      // packed once for all blocks, with the thread count of rnn_backward's loop, as MKL
      // advises (the blocks' gradient GEMMs between them keep every thread)
      // a bfloat16 product runs on one thread: only where BLAS would run one too, elsewhere
      // BLAS's threads on the matrix in float32
      const bool small = small_step_gemm(p.N * H * H);
      const Tensor w_hh = small ? ws[d].w_hh : ws[d].w_hh.to(x.scalar_type());
      const auto gemm_hh = [&] {
        const SingleThreadBlas blas(small);
        return std::make_unique<StepGemm<T>>(mat<T>(w_hh), H, false, H, H, p.N, small, nullptr,
                                             mat16(w_hh));
      }();
      RNNBackward<T> a{ptr<T>(out) + d * H_out, D * H_out, gemm_hh.get(),
                       ptr<T>(gout) + d * H_out, ld_gout, ptr<T>(dh) + d * N * H_out,
                       ptr<T>(dG), mode == RNN_RELU, g.restart,
                       resets ? ptr<T>(dh_init) + d * N * H_out : nullptr};
      for (int64_t s_hi = p.steps(); s_hi > 0;) {
        const int64_t s_lo = p.block_start(s_hi, kBlockRows);
        rnn_backward<T>(p, s_lo, s_hi, H, a);
        add_step_grads<T>(p, s_lo, s_hi, ptr<T>(dG), ldG, g, s_hi == p.steps());
        s_hi = s_lo;
      }
      finish_bias(g);
    }
    finish_initial();
    return result;
  }

  std::vector<Tensor> dG(D), dhs(D), dr(D);
  for (int64_t d = 0; d < D; ++d) {
    dG[d] = reuse_saved ? saved[per_dir * d] : at::empty({R, ldG}, x.options());
    if (proj) {
      dhs[d] = at::empty({R, H_out}, x.options());
      dr[d] = at::empty({N, H}, x.options());
    }
  }
  for_directions(D, split_directions(mode, N * G * H * H_out), [&](int64_t d) {
    const Plan& p = plans[d];
    const T* p_gout = ptr<T>(gout) + d * H_out;
    T* p_dh = ptr<T>(dh) + d * N * H_out;
    const Restart<T> rs_d = direction_restart<T>(restart, d, R, zeros);
    T* p_dh_init = resets ? ptr<T>(dh_init) + d * N * H_out : nullptr;
    if (mode == LSTM) {
      LSTMBackward<T> a{ptr<T>(saved[3 * d]), ptr<T>(saved[3 * d + 1]),
                        ptr<T>(*c0) + d * N * H, mat<T>(ws[d].w_hh), mat<T>(ws[d].w_hr),
                        p_gout, ld_gout, p_dh, ptr<T>(dc) + d * N * H, ptr<T>(dG[d]),
                        ptr<T>(dhs[d]), ptr<T>(dr[d]), rs_d, p_dh_init,
                        resets ? ptr<T>(dc_init) + d * N * H : nullptr};
      a.w_hh16 = mat16(ws[d].w_hh);
      a.w_hr16 = mat16(ws[d].w_hr);
      lstm_backward<T>(p, H, H_out, a);
    } else {
      GRUBackward<T> a{ptr<T>(saved[d]), ptr<T>(out) + d * H_out, D * H_out,
                       ptr<T>(h0) + d * N * H, mat<T>(ws[d].w_hh), p_gout, ld_gout, p_dh,
                       ptr<T>(dG[d]), rs_d, p_dh_init};
      a.w_hh16 = mat16(ws[d].w_hh);
      gru_backward<T>(p, H, a);
    }
  });
  finish_initial();

  // after the time loops, whose packed weights are freed by now
  allocate_dx();
  for (int64_t d = 0; d < D; ++d) {
    const StepGrads<T> g = step_grads(d);
    add_step_grads<T>(plans[d], 0, plans[d].steps(), ptr<T>(dG[d]), ldG, g, true);
    finish_bias(g);
    if (proj) {
      // dW_hr = sum_t dh_t^T r_t
      Tensor dw_hr = at::empty({H_out, H}, x.options());
      gemm<T>(true, false, H_out, H, R, T(1), ptr<T>(dhs[d]), H_out, ptr<T>(saved[3 * d + 2]), H,
              T(0), ptr<T>(dw_hr), H);
      result.push_back(dw_hr);
    }
    // this direction's gate gradients are spent: free them before the next one's GEMMs (as
    // the saved buffers reused, they go with the autograd node instead)
    dG[d] = Tensor();
    dhs[d] = Tensor();
  }
  return result;
}

std::vector<Tensor> layer_forward(int64_t mode, const Tensor& x, const Tensor& h0,
                                  const std::optional<Tensor>& c0, at::TensorList weights,
                                  at::IntArrayRef batch_sizes, bool has_bias, bool train,
                                  const std::optional<Tensor>& restart) {
  init_threads();
  const LayerShape s =
      check_layer_args(mode, x, h0, c0, weights, batch_sizes, has_bias, /*bf16_weights=*/true);
  check_restart(s, restart);
  // the time loops read h0, c0 by rows where rows restart from them
  const Tensor xc = x.contiguous(), h0c = h0.contiguous();
  const std::optional<Tensor> c0c = contiguous(c0), rc = contiguous(restart);
  if (s.dtype == at::kFloat) {
    return forward_impl<float>(mode, s, xc, h0c, c0c, rc, weights, has_bias, train);
  }
  return forward_impl<double>(mode, s, xc, h0c, c0c, rc, weights, has_bias, train);
}

std::vector<Tensor> layer_backward(int64_t mode, const Tensor& grad_out, const Tensor& grad_hn,
                                   const std::optional<Tensor>& grad_cn, const Tensor& x,
                                   const Tensor& h0, const std::optional<Tensor>& c0,
                                   at::TensorList weights, const Tensor& out,
                                   at::TensorList saved, at::IntArrayRef batch_sizes,
                                   bool has_bias, bool need_dx, bool reuse_saved,
                                   const std::optional<Tensor>& restart) {
  init_threads();
  const LayerShape s =
      check_layer_args(mode, x, h0, c0, weights, batch_sizes, has_bias, /*bf16_weights=*/true);
  check_layer_grads(mode, s, grad_out, grad_hn, grad_cn, out, saved);
  check_restart(s, restart);
  // the time loops read these by rows of their sizes (a contiguous saved buffer is the one
  // that reuse_saved writes over)
  const Tensor xc = x.contiguous(), h0c = h0.contiguous(), outc = out.contiguous();
  const std::optional<Tensor> c0c = contiguous(c0), rc = contiguous(restart);
  std::vector<Tensor> sv;
  for (const Tensor& t : saved) sv.push_back(t.contiguous());
  if (s.dtype == at::kFloat) {
    return backward_impl<float>(mode, s, grad_out, grad_hn, grad_cn, xc, h0c, c0c, rc, weights,
                                outc, sv, has_bias, need_dx, reuse_saved);
  }
  return backward_impl<double>(mode, s, grad_out, grad_hn, grad_cn, xc, h0c, c0c, rc, weights,
                               outc, sv, has_bias, need_dx, reuse_saved);
}

}  // namespace

// make_plan as integers, for the tests that hold it to rnnkit.engines.driver.StepPlan: rows,
// N, uniform, then the first row and the batch of every step in processing order.
std::vector<int64_t> step_plan(c10::IntArrayRef batch_sizes, bool reverse) {
  const Plan p = make_plan(batch_sizes, reverse);
  std::vector<int64_t> out{p.rows, p.N, p.uniform ? 1 : 0};
  out.insert(out.end(), p.off.begin(), p.off.end());
  out.insert(out.end(), p.bs.begin(), p.bs.end());
  return out;
}

}  // namespace rnnkit

// The schemas are rnnkit's Python (engines/cpu/ops.py), defined at `import rnnkit` so that
// traced and exported graphs resolve the ops before this library is built: it registers the
// kernels alone, under the CPU key, where torch.compile and torch.export reach them through
// their fake implementations (fake.py). layer_backward writes over `saved` only with
// reuse_saved, which eager autograd passes when the buffers die with the call and a traced
// graph never does (function.py): the schema declares no mutation.
TORCH_LIBRARY_IMPL(rnnkit_cpu, CPU, m) {
  m.impl("layer_forward", &rnnkit::layer_forward);
  m.impl("layer_backward", &rnnkit::layer_backward);
}

// For the tests alone, in a namespace of its own that no graph holds.
TORCH_LIBRARY(rnnkit_cpu_plan, m) {
  m.def("step_plan(int[] batch_sizes, bool reverse) -> int[]", &rnnkit::step_plan);
}

// Asked by the loader (build.py) through ctypes, not as an op: a check that a tracer could
// record into a graph has no place in one.
extern "C" int rnnkit_blas_available() { return rnnkit::blas_available() ? 1 : 0; }

// Which GEMM runs the products on this CPU (blas.h), for benchmark reports: asked the same way.
extern "C" const char* rnnkit_gemm_kernels() {
  switch (rnnkit::gemm_choice()) {
    case rnnkit::GemmChoice::kMkl: return "mkl";
    case rnnkit::GemmChoice::kOwn: return "own";
    default: return rnnkit::intel_cpu() ? "own step products below 2^19 multiply-adds, else mkl"
                                        : "own";
  }
}

// Whether this CPU has the bfloat16 dot products that bfloat16 layers run (bf16_gemm.h).
extern "C" int rnnkit_cpu_has_bf16() { return rnnkit::cpu_has_bf16() ? 1 : 0; }
