// LSTM time loops of one direction (gate order i, f, g, o; optional projection W_hr).
#include "kernels.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cstring>

namespace rnnkit {

// Per step: the rows that restart there (Restart, kernels.h) take zeros or h0, c0 as their
// state; with `x`, gates = x_t W_ih^T for the step's rows (one GEMM against W_ih packed once);
// gates += h_{t-1} W_hh^T (one GEMM on the rows of the active batch), then one pass that
// applies the activations, updates c and writes h. With proj_size the pass writes r_t =
// o * tanh(c_t) and a second GEMM gives h_t = r_t W_hr^T. Training keeps the
// activations in place of the pre-activations, the c_t and the r_t: all that backward needs.
template <typename T>
void lstm_forward(const Plan& p, int64_t H, int64_t H_out, const LSTMForward<T>& a) {
  const int64_t G = 4 * H;
  const bool proj = a.w_hr != nullptr;
  const bool small = split_step_gemm(p.N * G * H_out);
  // pack with the thread count that computes, as MKL advises
  const SingleThreadBlas blas(small);
  const StepGemm<T> gemm_hh(a.w_hh, H_out, true, G, H_out, p.N, small);
  const StepGemm<T> gemm_hr(a.w_hr, H, true, H_out, H, proj ? p.N : 0, small);
  const bool per_step = a.x != nullptr;
  const StepGemm<T> gemm_ih(a.w_ih, a.H_in, true, G, a.H_in, per_step ? p.N : 0, small);
  for_blocks(p.N, small, [&](int64_t lo, int64_t hi) {
    // inference projecting each step: this thread's rows of one step's gates, [hi - lo, 4H]
    const at::Tensor scratch = at::empty(
        {a.gates ? 0 : (hi - lo) * G}, at::TensorOptions(c10::CppTypeToScalarType<T>::value));
    for (int64_t s = 0; s < p.steps(); ++s) {
      const int64_t o = p.off[s], b = std::min(p.bs[s], hi);
      if (b <= lo) continue;
      a.restart.state(p, s, lo, b, a.h, H_out, a.h0);
      a.restart.state(p, s, lo, b, a.c, H, a.c0);
      // row lo of this step's gates
      T* p_gates = a.gates ? a.gates + (o + lo) * G : scratch.data_ptr<T>();
      if (per_step) gemm_ih(b - lo, a.x + (o + lo) * a.H_in, a.H_in, T(0), p_gates, G);
      gemm_hh(b - lo, a.h + lo * H_out, H_out, T(1), p_gates, G);
      T* p_r = proj ? (a.train ? a.rs + o * H : a.rs) : nullptr;
      for (int64_t j = lo; j < b; ++j) {
        T* p_g = p_gates + (j - lo) * G;
        T* p_c = a.c + j * H;
        T* p_hdst = proj ? p_r + j * H : a.out + (o + j) * a.ld_out;
        T* p_hstate = proj ? nullptr : a.h + j * H_out;
        T* p_cs = a.cs ? a.cs + (o + j) * H : nullptr;
        for_vec<T>(0, H, [&](int64_t u, int64_t n) {
          Vec<T> b_i = load(p_g + u, n), b_f = load(p_g + H + u, n);
          Vec<T> b_g = load(p_g + 2 * H + u, n), b_o = load(p_g + 3 * H + u, n);
          if (a.bias) {
            b_i = b_i + load(a.bias + u, n);
            b_f = b_f + load(a.bias + H + u, n);
            b_g = b_g + load(a.bias + 2 * H + u, n);
            b_o = b_o + load(a.bias + 3 * H + u, n);
          }
          b_i = vsigmoid(b_i);
          b_f = vsigmoid(b_f);
          b_g = vtanh(b_g);
          b_o = vsigmoid(b_o);
          const Vec<T> b_c = b_f * load(p_c + u, n) + b_i * b_g;
          store(p_c + u, b_c, n);
          if (p_cs) store(p_cs + u, b_c, n);
          const Vec<T> b_h = b_o * vtanh(b_c);
          store(p_hdst + u, b_h, n);
          if (p_hstate) store(p_hstate + u, b_h, n);
          if (a.train) {
            store(p_g + u, b_i, n);
            store(p_g + H + u, b_f, n);
            store(p_g + 2 * H + u, b_g, n);
            store(p_g + 3 * H + u, b_o, n);
          }
        });
      }
      if (proj) {
        T* p_out = a.out + o * a.ld_out;
        gemm_hr(b - lo, p_r + lo * H, H, T(0), p_out + lo * a.ld_out, a.ld_out);
        for (int64_t j = lo; j < b; ++j) {
          std::memcpy(a.h + j * H_out, p_out + j * a.ld_out, H_out * sizeof(T));
        }
      }
    }
  });
}

// Backward through time. With a = pre-activations, i, f, g, o the activations, c_{t-1} the
// previous cell, and dh_t = dL/dh_t from the output plus the step above (dh_state):
//
//   with proj:  h_t = r_t W_hr^T      =>  dr_t = dh_t W_hr,   dW_hr = sum_t dh_t^T r_t
//   r_t = o * tanh(c_t)               =>  do = dr_t * tanh(c_t)
//                                         dc_t = dc_state + dr_t * o * (1 - tanh^2(c_t))
//   c_t = f * c_{t-1} + i * g         =>  di = dc_t * g,  df = dc_t * c_{t-1},  dg = dc_t * i
//                                         dc_{t-1} = dc_t * f
//   sigmoid' = s (1 - s), tanh' = 1 - t^2:
//     dA_i = di i (1-i),  dA_f = df f (1-f),  dA_g = dg (1-g^2),  dA_o = do o (1-o)
//   a = x W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh
//                                     =>  dh_{t-1} = dA W_hh  (one GEMM per step)
//
// A row that restarted at step t read zeros or h0, c0 there instead of the previous step's
// state: its dh_{t-1}, dc_{t-1} go to dh0, dc0 or nowhere, and the earlier step gets none.
// Only dh_{t-1} feeds the next step; dW_ih = dA^T X, dW_hh = dA^T H_prev, dX = dA W_ih and
// db = sum_rows dA need all steps' dA at once and are one GEMM each in layer.cpp.
template <typename T>
void lstm_backward(const Plan& p, int64_t H, int64_t H_out, const LSTMBackward<T>& a) {
  const int64_t G = 4 * H;
  const bool proj = a.w_hr != nullptr;
  const bool small = split_step_gemm(p.N * G * H_out);
  // pack with the thread count that computes, as MKL advises
  const SingleThreadBlas blas(small);
  const StepGemm<T> gemm_hh(a.w_hh, H_out, false, H_out, G, p.N, small);
  const StepGemm<T> gemm_hr(a.w_hr, H, false, H, H_out, proj ? p.N : 0, small);
  for_blocks(p.N, small, [&](int64_t lo, int64_t hi) {
    for (int64_t s = p.steps() - 1; s >= 0; --s) {
      const int64_t o = p.off[s], b = std::min(p.bs[s], hi);
      if (b <= lo) continue;
      if (proj) {
        T* p_dhs = a.dhs + o * H_out;
        for (int64_t j = lo; j < b; ++j) {
          const T* p_go = a.gout + (o + j) * a.ld_gout;
          const T* p_dh = a.dh + j * H_out;
          T* p_dst = p_dhs + j * H_out;
          for_vec<T>(0, H_out, [&](int64_t u, int64_t n) {
            store(p_dst + u, load(p_dh + u, n) + load(p_go + u, n), n);
          });
        }
        gemm_hr(b - lo, p_dhs + lo * H_out, H_out, T(0), a.dr + lo * H, H);
      }
      for (int64_t j = lo; j < b; ++j) {
        const T* p_g = a.gates + (o + j) * G;
        const T* p_ct = a.cs + (o + j) * H;
        const T* p_cp = a.restart.prev(p, s, j, a.cs, H, a.c0, H);
        const T* p_dr = proj ? a.dr + j * H : nullptr;
        const T* p_dh = a.dh + j * H_out;
        const T* p_go = a.gout + (o + j) * a.ld_gout;
        T* p_dc = a.dc + j * H;
        T* p_dG = a.dG + (o + j) * G;
        const Vec<T> one(T(1));
        for_vec<T>(0, H, [&](int64_t u, int64_t n) {
          const Vec<T> b_dr = proj ? load(p_dr + u, n) : load(p_dh + u, n) + load(p_go + u, n);
          const Vec<T> b_i = load(p_g + u, n), b_f = load(p_g + H + u, n);
          const Vec<T> b_gg = load(p_g + 2 * H + u, n), b_o = load(p_g + 3 * H + u, n);
          const Vec<T> b_tc = vtanh(load(p_ct + u, n));
          const Vec<T> b_dc = load(p_dc + u, n) + b_dr * b_o * (one - b_tc * b_tc);
          store(p_dc + u, b_dc * b_f, n);
          store(p_dG + u, b_dc * b_gg * b_i * (one - b_i), n);
          store(p_dG + H + u, b_dc * load(p_cp + u, n) * b_f * (one - b_f), n);
          store(p_dG + 2 * H + u, b_dc * b_i * (one - b_gg * b_gg), n);
          store(p_dG + 3 * H + u, b_dr * b_tc * b_o * (one - b_o), n);
        });
      }
      gemm_hh(b - lo, a.dG + (o + lo) * G, G, T(0), a.dh + lo * H_out, H_out);
      a.restart.cut(p, s, lo, b, a.dh, H_out, a.dh0);
      a.restart.cut(p, s, lo, b, a.dc, H, a.dc0);
    }
  });
}

template void lstm_forward<float>(const Plan&, int64_t, int64_t, const LSTMForward<float>&);
template void lstm_forward<double>(const Plan&, int64_t, int64_t, const LSTMForward<double>&);
template void lstm_backward<float>(const Plan&, int64_t, int64_t, const LSTMBackward<float>&);
template void lstm_backward<double>(const Plan&, int64_t, int64_t, const LSTMBackward<double>&);

}  // namespace rnnkit
