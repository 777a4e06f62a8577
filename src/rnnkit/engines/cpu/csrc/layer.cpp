// Launchers of the fused CPU engine: one layer (both directions) forward or backward. They
// allocate every buffer once, run the input projection and the weight and input gradients as
// one GEMM each over all steps, and hand the recurrent part to the per-cell time loops.
#include "kernels.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <vector>

namespace rnnkit {
namespace {

using at::Tensor;

enum Mode : int64_t { LSTM = 0, GRU = 1, RNN_TANH = 2, RNN_RELU = 3 };

int64_t gate_blocks(int64_t mode) { return mode == LSTM ? 4 : mode == GRU ? 3 : 1; }

// The weights of one direction, in torch's _flat_weights order.
struct Weights {
  Tensor w_ih, w_hh, b_ih, b_hh, w_hr;
};

std::vector<Weights> split_weights(at::TensorList weights, int64_t D, bool has_bias) {
  const int64_t per_dir = static_cast<int64_t>(weights.size()) / D;
  const int64_t base = has_bias ? 4 : 2;
  TORCH_CHECK(per_dir * D == static_cast<int64_t>(weights.size()) &&
                  (per_dir == base || per_dir == base + 1),
              "rnnkit fused engine: unexpected number of weights ", weights.size());
  std::vector<Weights> out(D);
  for (int64_t d = 0; d < D; ++d) {
    const at::TensorList w = weights.slice(d * per_dir, per_dir);
    out[d].w_ih = w[0].contiguous();
    out[d].w_hh = w[1].contiguous();
    if (has_bias) {
      out[d].b_ih = w[2].contiguous();
      out[d].b_hh = w[3].contiguous();
    }
    if (per_dir == base + 1) out[d].w_hr = w[base].contiguous();
  }
  return out;
}

template <typename T>
T* ptr(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

Tensor none_like(const Tensor& x) { return at::empty({0}, x.options()); }

// dW_hh = sum over steps of dA_s^T h_{s-1}, one GEMM over all rows. Padded input: the
// previous states are the output shifted by one time step (and h0 for the first step), two
// GEMMs on views. Packed input: gather them into [R, H_out] first, since the batch changes.
template <typename T>
void weight_grad_hh(const Plan& p, int64_t GH, const T* dG, int64_t ldG, const T* h0,
                    const T* out, int64_t ld_out, int64_t H_out, T* dw) {
  const int64_t N = p.N, R = p.rows;
  if (p.uniform) {
    const bool forward = p.off[0] == 0;
    gemm<T>(true, false, GH, H_out, N, T(1), dG + p.off[0] * ldG, ldG, h0, H_out, T(0), dw, H_out);
    const T* p_dG = forward ? dG + N * ldG : dG;
    const T* p_prev = forward ? out : out + N * ld_out;
    gemm<T>(true, false, GH, H_out, R - N, T(1), p_dG, ldG, p_prev, ld_out, T(1), dw, H_out);
    return;
  }
  std::vector<T> prev(R * H_out);
  for (int64_t s = 0; s < p.steps(); ++s) {
    for (int64_t j = 0; j < p.bs[s]; ++j) {
      const T* src = prev_row(p, s, j, out, ld_out, h0, H_out);
      std::memcpy(prev.data() + (p.off[s] + j) * H_out, src, H_out * sizeof(T));
    }
  }
  gemm<T>(true, false, GH, H_out, R, T(1), dG, ldG, prev.data(), H_out, T(0), dw, H_out);
}

// Returns [out [R, D*H_out], h_n [D, N, H_out], c_n [D, N, H] (LSTM; else empty), then the
// buffers backward needs, per direction: LSTM activations, cell states and r_t (empty
// without proj); GRU r|z|n|h_n; RNN none. Nothing is saved unless `train`.
template <typename T>
std::vector<Tensor> forward_impl(int64_t mode, const Tensor& x, const Tensor& h0,
                                 const std::optional<Tensor>& c0, at::TensorList weights,
                                 at::IntArrayRef batch_sizes, bool has_bias, bool train) {
  const int64_t D = h0.size(0), N = h0.size(1), H_out = h0.size(2);
  const int64_t R = x.size(0), H_in = x.size(1);
  const std::vector<Weights> ws = split_weights(weights, D, has_bias);
  const int64_t G = gate_blocks(mode), H = ws[0].w_hh.size(0) / G;
  const bool proj = ws[0].w_hr.defined();

  Tensor out = at::empty({R, D * H_out}, x.options());
  Tensor h_n = h0.clone(at::MemoryFormat::Contiguous);
  Tensor c_n = mode == LSTM ? c0->clone(at::MemoryFormat::Contiguous) : none_like(x);
  // A training GRU projects into the first 3H columns of its [R, 4H] saved buffer, which the
  // step pass then overwrites in place with r|z|n|h_n: no separate [R, 3H] projection.
  const int64_t ld_gates = mode == GRU && train ? 4 * H : G * H;
  std::vector<Tensor> gates(D), bias(D), cs(D), rs(D), hw(D);
  for (int64_t d = 0; d < D; ++d) {
    // [R, G*H] = x W_ih^T for all steps at once; the biases join in the step pass
    gates[d] = at::empty({R, ld_gates}, x.options());
    gemm<T>(false, true, R, G * H, H_in, T(1), ptr<T>(x), H_in, ptr<T>(ws[d].w_ih), H_in, T(0),
            ptr<T>(gates[d]), ld_gates);
    if (has_bias && mode != GRU) bias[d] = at::add(ws[d].b_ih, ws[d].b_hh);
    if (mode == LSTM && train) cs[d] = at::empty({R, H}, x.options());
    if (mode == LSTM && proj) rs[d] = at::empty({train ? R : N, H}, x.options());
    if (mode == GRU) hw[d] = at::empty({N, 3 * H}, x.options());
  }
  std::vector<Plan> plans(D);
  for (int64_t d = 0; d < D; ++d) plans[d] = make_plan(batch_sizes, d == 1);

  for (int64_t d = 0; d < D; ++d) {
    const Plan& p = plans[d];
    T* p_out = ptr<T>(out) + d * H_out;
    T* p_h = ptr<T>(h_n) + d * N * H_out;
    if (mode == LSTM) {
      T* p_c = ptr<T>(c_n) + d * N * H;
      LSTMForward<T> a{ptr<T>(gates[d]), ptr<T>(bias[d]), ptr<T>(ws[d].w_hh), ptr<T>(ws[d].w_hr),
                       p_h, p_c, p_out, D * H_out, ptr<T>(cs[d]), ptr<T>(rs[d]), train};
      lstm_forward<T>(p, H, H_out, a);
    } else if (mode == GRU) {
      GRUForward<T> a{ptr<T>(gates[d]), ld_gates, ptr<T>(ws[d].b_ih), ptr<T>(ws[d].b_hh),
                      ptr<T>(ws[d].w_hh), p_h, p_out, D * H_out, ptr<T>(hw[d]),
                      train ? ptr<T>(gates[d]) : nullptr};
      gru_forward<T>(p, H, a);
    } else {
      RNNForward<T> a{ptr<T>(gates[d]), ptr<T>(bias[d]), ptr<T>(ws[d].w_hh), p_h, p_out,
                      D * H_out, mode == RNN_RELU};
      rnn_forward<T>(p, H, a);
    }
  }

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
// `weights` in their order].
template <typename T>
std::vector<Tensor> backward_impl(int64_t mode, const Tensor& grad_out, const Tensor& grad_hn,
                                  const std::optional<Tensor>& grad_cn, const Tensor& x,
                                  const Tensor& h0, const std::optional<Tensor>& c0,
                                  at::TensorList weights, const Tensor& out,
                                  at::TensorList saved, at::IntArrayRef batch_sizes,
                                  bool has_bias, bool need_dx) {
  const int64_t D = h0.size(0), N = h0.size(1), H_out = h0.size(2);
  const int64_t R = x.size(0), H_in = x.size(1);
  const std::vector<Weights> ws = split_weights(weights, D, has_bias);
  const int64_t G = gate_blocks(mode), H = ws[0].w_hh.size(0) / G;
  const bool proj = ws[0].w_hr.defined();
  // GRU keeps the input-side n gradient as a fourth block, see gru.cpp
  const int64_t ldG = mode == GRU ? 4 * H : G * H;

  const Tensor gout = grad_out.contiguous();
  Tensor dh = grad_hn.clone(at::MemoryFormat::Contiguous);
  Tensor dc = mode == LSTM ? grad_cn->clone(at::MemoryFormat::Contiguous) : none_like(x);
  std::vector<Tensor> dG(D), dhs(D), dr(D);
  for (int64_t d = 0; d < D; ++d) {
    dG[d] = at::empty({R, ldG}, x.options());
    if (proj) {
      dhs[d] = at::empty({R, H_out}, x.options());
      dr[d] = at::empty({N, H}, x.options());
    }
  }
  std::vector<Plan> plans(D);
  for (int64_t d = 0; d < D; ++d) plans[d] = make_plan(batch_sizes, d == 1);
  const int64_t per_dir = mode == LSTM ? 3 : mode == GRU ? 1 : 0;
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == per_dir * D,
              "rnnkit fused engine: backward without the saved forward buffers");

  for (int64_t d = 0; d < D; ++d) {
    const Plan& p = plans[d];
    const T* p_gout = ptr<T>(gout) + d * H_out;
    T* p_dh = ptr<T>(dh) + d * N * H_out;
    if (mode == LSTM) {
      LSTMBackward<T> a{ptr<T>(saved[3 * d]), ptr<T>(saved[3 * d + 1]),
                        ptr<T>(*c0) + d * N * H, ptr<T>(ws[d].w_hh), ptr<T>(ws[d].w_hr),
                        p_gout, D * H_out, p_dh, ptr<T>(dc) + d * N * H, ptr<T>(dG[d]),
                        ptr<T>(dhs[d]), ptr<T>(dr[d])};
      lstm_backward<T>(p, H, H_out, a);
    } else if (mode == GRU) {
      GRUBackward<T> a{ptr<T>(saved[d]), ptr<T>(out) + d * H_out, D * H_out,
                       ptr<T>(h0) + d * N * H, ptr<T>(ws[d].w_hh), p_gout, D * H_out, p_dh,
                       ptr<T>(dG[d])};
      gru_backward<T>(p, H, a);
    } else {
      RNNBackward<T> a{ptr<T>(out) + d * H_out, D * H_out, ptr<T>(ws[d].w_hh), p_gout,
                       D * H_out, p_dh, ptr<T>(dG[d]), mode == RNN_RELU};
      rnn_backward<T>(p, H, a);
    }
  }

  Tensor dx = need_dx ? at::empty({R, H_in}, x.options()) : none_like(x);
  std::vector<Tensor> result{dx, dh, dc};
  for (int64_t d = 0; d < D; ++d) {
    const T* p_dG = ptr<T>(dG[d]);
    const T* p_wih = ptr<T>(ws[d].w_ih);
    const T beta = d == 0 ? T(0) : T(1);
    Tensor dw_ih = at::empty({G * H, H_in}, x.options());
    if (mode == GRU) {
      // input side: blocks r, z (columns 0..2H) and n (columns 3H..4H)
      if (need_dx) {
        gemm<T>(false, false, R, H_in, 2 * H, T(1), p_dG, ldG, p_wih, H_in, beta, ptr<T>(dx), H_in);
        gemm<T>(false, false, R, H_in, H, T(1), p_dG + 3 * H, ldG, p_wih + 2 * H * H_in, H_in,
                T(1), ptr<T>(dx), H_in);
      }
      gemm<T>(true, false, 2 * H, H_in, R, T(1), p_dG, ldG, ptr<T>(x), H_in, T(0),
              ptr<T>(dw_ih), H_in);
      gemm<T>(true, false, H, H_in, R, T(1), p_dG + 3 * H, ldG, ptr<T>(x), H_in, T(0),
              ptr<T>(dw_ih) + 2 * H * H_in, H_in);
    } else {
      if (need_dx) {
        gemm<T>(false, false, R, H_in, G * H, T(1), p_dG, ldG, p_wih, H_in, beta, ptr<T>(dx), H_in);
      }
      gemm<T>(true, false, G * H, H_in, R, T(1), p_dG, ldG, ptr<T>(x), H_in, T(0),
              ptr<T>(dw_ih), H_in);
    }
    Tensor dw_hh = at::empty({G * H, H_out}, x.options());
    weight_grad_hh<T>(plans[d], G * H, p_dG, ldG, ptr<T>(h0) + d * N * H_out,
                      ptr<T>(out) + d * H_out, D * H_out, H_out, ptr<T>(dw_hh));
    result.push_back(dw_ih);
    result.push_back(dw_hh);
    if (has_bias) {
      const Tensor colsum = dG[d].sum(0);
      if (mode == GRU) {
        result.push_back(at::cat({colsum.narrow(0, 0, 2 * H), colsum.narrow(0, 3 * H, H)}));
        result.push_back(colsum.narrow(0, 0, 3 * H).clone());
      } else {
        result.push_back(colsum);
        result.push_back(colsum.clone());
      }
    }
    if (proj) {
      // dW_hr = sum_t dh_t^T r_t
      Tensor dw_hr = at::empty({H_out, H}, x.options());
      gemm<T>(true, false, H_out, H, R, T(1), ptr<T>(dhs[d]), H_out, ptr<T>(saved[3 * d + 2]), H,
              T(0), ptr<T>(dw_hr), H);
      result.push_back(dw_hr);
    }
    // this direction's gate gradients are spent: free them before the next one's GEMMs
    dG[d] = Tensor();
    dhs[d] = Tensor();
  }
  return result;
}

void check_dtype(const Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "rnnkit fused engine: float32 or float64 only, got ", x.scalar_type());
}

std::vector<Tensor> layer_forward(int64_t mode, const Tensor& x, const Tensor& h0,
                                  const std::optional<Tensor>& c0, at::TensorList weights,
                                  at::IntArrayRef batch_sizes, bool has_bias, bool train) {
  check_dtype(x);
  const Tensor xc = x.contiguous();
  if (x.scalar_type() == at::kFloat) {
    return forward_impl<float>(mode, xc, h0, c0, weights, batch_sizes, has_bias, train);
  }
  return forward_impl<double>(mode, xc, h0, c0, weights, batch_sizes, has_bias, train);
}

std::vector<Tensor> layer_backward(int64_t mode, const Tensor& grad_out, const Tensor& grad_hn,
                                   const std::optional<Tensor>& grad_cn, const Tensor& x,
                                   const Tensor& h0, const std::optional<Tensor>& c0,
                                   at::TensorList weights, const Tensor& out,
                                   at::TensorList saved, at::IntArrayRef batch_sizes,
                                   bool has_bias, bool need_dx) {
  check_dtype(x);
  const Tensor xc = x.contiguous();
  if (x.scalar_type() == at::kFloat) {
    return backward_impl<float>(mode, grad_out, grad_hn, grad_cn, xc, h0, c0, weights, out,
                                saved, batch_sizes, has_bias, need_dx);
  }
  return backward_impl<double>(mode, grad_out, grad_hn, grad_cn, xc, h0, c0, weights, out,
                               saved, batch_sizes, has_bias, need_dx);
}

}  // namespace
}  // namespace rnnkit

// Schemas here, kernels under the CPU key: a key of their own lets torch.compile and
// torch.export trace the ops through their fake implementations (fake.py).
TORCH_LIBRARY(rnnkit_cpu, m) {
  m.def("blas_available() -> bool", &rnnkit::blas_available);
  m.def(
      "layer_forward(int mode, Tensor x, Tensor h0, Tensor? c0, Tensor[] weights, "
      "int[] batch_sizes, bool has_bias, bool train) -> Tensor[]");
  m.def(
      "layer_backward(int mode, Tensor grad_out, Tensor grad_hn, Tensor? grad_cn, Tensor x, "
      "Tensor h0, Tensor? c0, Tensor[] weights, Tensor out, Tensor[] saved, int[] batch_sizes, "
      "bool has_bias, bool need_dx) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(rnnkit_cpu, CPU, m) {
  m.impl("layer_forward", &rnnkit::layer_forward);
  m.impl("layer_backward", &rnnkit::layer_backward);
}
