// LSTM time loops of one direction (gate order i, f, g, o; optional projection W_hr).
#include "kernels.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace rnnkit {

// The cell on the units [u, u + n) from their pre-activations b_i..b_o: the bias added (gate
// blocks H apart in `bias`, if any), then c_t, h_t from c_prev; with `p_act` the activations
// are stored there, H apart (what training keeps for backward).
template <typename T>
inline void lstm_cell(Vec<T> b_i, Vec<T> b_f, Vec<T> b_g, Vec<T> b_o, const T* bias, int64_t H,
                      int64_t u, int64_t n, const Vec<T>& c_prev, T* p_act, Vec<T>& b_c,
                      Vec<T>& b_h) {
  if (bias) {
    b_i = b_i + load(bias + u, n);
    b_f = b_f + load(bias + H + u, n);
    b_g = b_g + load(bias + 2 * H + u, n);
    b_o = b_o + load(bias + 3 * H + u, n);
  }
  b_i = vsigmoid(b_i);
  b_f = vsigmoid(b_f);
  b_g = vtanh(b_g);
  b_o = vsigmoid(b_o);
  b_c = b_f * c_prev + b_i * b_g;
  b_h = b_o * vtanh(b_c);
  if (p_act) {
    store(p_act + u, b_i, n);
    store(p_act + H + u, b_f, n);
    store(p_act + 2 * H + u, b_g, n);
    store(p_act + 3 * H + u, b_o, n);
  }
}

// Whether a batch-1 LSTM splits each step by hidden units over the threads (lstm_forward_units):
// at batch 1 there are no rows to split, and one thread's step is bound by reading W_hh from its
// core's caches. Measured on 2 cores of an AMD EPYC (Zen 4), a step of a C++ loop with one
// barrier a step: H = 128 2.85 -> 2.1 us, H = 256 15.5 -> 7.5 us, H = 64 no gain. Needs no
// projection (h_t is then all of r_t W_hr^T), no resets, and the input projected beforehand.
// RNNKIT_UNIT_SPLIT=on|off (read at every call, so that a test runs both) overrides the sizes.
template <typename T>
bool split_units(const Plan& p, int64_t H, const LSTMForward<T>& a) {
  if (p.N != 1 || a.w_hr || a.w_hr16 || a.restart.codes || a.x || at::in_parallel_region()) {
    return false;
  }
  if (at::get_num_threads() < 2) return false;
  const char* choice = std::getenv("RNNKIT_UNIT_SPLIT");
  if (choice && std::strcmp(choice, "off") == 0) return false;
  if (choice && std::strcmp(choice, "on") == 0) return true;
  return H >= 128;
}

// lstm_forward at batch 1 with the hidden units split over the threads: thread t owns the
// units [u0, u1), packs the rows of W_hh of its four gate blocks, and at each step computes its
// units' gates from the whole h_{t-1} (the previous output row, which no thread writes any
// more), then their c and h. One barrier a step, after the writes of h_t. Each output value
// sums the same products in the same order as lstm_forward's: the results are identical.
template <typename T>
void lstm_forward_units(const Plan& p, int64_t H, const LSTMForward<T>& a) {
  const int64_t G = 4 * H, V = Vec<T>::size();
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (H + V - 1) / V);
#pragma omp parallel num_threads(threads)
  {
    const int64_t team = omp_get_num_threads(), t = omp_get_thread_num();
    // whole vectors of units per thread
    const int64_t per = (H + V * team - 1) / (V * team) * V;
    const int64_t u0 = std::min(H, t * per), u1 = std::min(H, u0 + per), nu = u1 - u0;
    // rows g * H + u of W_hh (of w, a.w_hh or a.w_hh16) for this thread's units, gate by
    // gate: [4 * nu, H], packed
    const auto pack = [&](const auto* w) {
      using W = std::remove_cv_t<std::remove_pointer_t<decltype(w)>>;
      std::vector<W> rows(4 * nu * H);
      for (int64_t g = 0; g < 4; ++g) {
        std::copy_n(w + (g * H + u0) * H, nu * H, rows.data() + g * nu * H);
      }
      using Panels = std::conditional_t<std::is_same_v<W, T>, PanelGemm<T>, Bf16Gemm>;
      return std::make_shared<const Panels>(rows.data(), H, true, 4 * nu, H);
    };
    // the part of the weights cache's key: this thread's units
    const int64_t part = u0 * (H + 1) + u1;
    std::shared_ptr<const PanelGemm<T>> gemm_hh;
    std::shared_ptr<const Bf16Gemm> gemm_hh16;
    if (a.w_hh16) {
      const auto make = [&] { return pack(a.w_hh16); };
      gemm_hh16 = a.id_hh ? cached<Bf16Gemm>(*a.id_hh, part, true, 4 * nu, H, make) : make();
    } else {
      const auto make = [&] { return pack(a.w_hh); };
      gemm_hh = a.id_hh ? cached_panels<T>(*a.id_hh, part, true, 4 * nu, H, make) : make();
    }
    std::vector<T> local(4 * nu);
    for (int64_t s = 0; s < p.steps(); ++s) {
      const int64_t o = p.off[s];
      const T* p_prev = s == 0 ? a.h : a.out + p.off[s - 1] * a.ld_out;
      if constexpr (std::is_same_v<T, float>) {
        if (nu > 0 && gemm_hh16) (*gemm_hh16)(1, p_prev, H, T(0), local.data(), 4 * nu);
      }
      if (nu > 0 && gemm_hh) (*gemm_hh)(1, p_prev, H, T(0), local.data(), 4 * nu);
      T* p_g = a.gates + o * G;
      T* p_out = a.out + o * a.ld_out;
      T* p_cs = a.cs ? a.cs + o * H : nullptr;
      for_vec<T>(u0, u1, [&](int64_t u, int64_t n) {
        const T* p_l = local.data() + (u - u0);
        // product + x W_ih^T, then the bias: lstm_forward's order of the sums
        Vec<T> b_c, b_h;
        lstm_cell(load(p_l, n) + load(p_g + u, n), load(p_l + nu, n) + load(p_g + H + u, n),
                  load(p_l + 2 * nu, n) + load(p_g + 2 * H + u, n),
                  load(p_l + 3 * nu, n) + load(p_g + 3 * H + u, n), a.bias, H, u, n,
                  load(a.c + u, n), a.train ? p_g : nullptr, b_c, b_h);
        store(a.c + u, b_c, n);
        if (p_cs) store(p_cs + u, b_c, n);
        store(p_out + u, b_h, n);
      });
#pragma omp barrier
    }
  }
  if (p.steps() > 0) std::memcpy(a.h, a.out + p.off[p.steps() - 1] * a.ld_out, H * sizeof(T));
}

// Per step: the rows that restart there (Restart, kernels.h) take zeros or h0, c0 as their
// state; with `x`, gates = x_t W_ih^T for the step's rows (one GEMM against W_ih packed once);
// gates += h_{t-1} W_hh^T (one GEMM on the rows of the active batch), then one pass that
// applies the activations, updates c and writes h. With proj_size the pass writes r_t =
// o * tanh(c_t) and a second GEMM gives h_t = r_t W_hr^T. Training keeps the
// activations in place of the pre-activations, the c_t and the r_t: all that backward needs.
template <typename T>
void lstm_forward(const Plan& p, int64_t H, int64_t H_out, const LSTMForward<T>& a) {
  if (split_units(p, H, a)) return lstm_forward_units(p, H, a);
  const int64_t G = 4 * H;
  const bool proj = a.w_hr != nullptr || a.w_hr16 != nullptr;
  // (bfloat16 products run on the calling thread at every size)
  const bool small = a.w_hh16 || split_step_gemm(p.N * G * H_out);
  // pack with the thread count that computes, as MKL advises
  const SingleThreadBlas blas(small);
  const StepGemm<T> gemm_hh(a.w_hh, H_out, true, G, H_out, p.N, small, a.id_hh, a.w_hh16);
  const StepGemm<T> gemm_hr(a.w_hr, H, true, H_out, H, proj ? p.N : 0, small, a.id_hr,
                            a.w_hr16);
  const bool per_step = a.x != nullptr;
  const StepGemm<T> gemm_ih(a.w_ih, a.H_in, true, G, a.H_in, per_step ? p.N : 0, small, a.id_ih,
                            a.w_ih16);
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
          Vec<T> b_c, b_h;
          lstm_cell(load(p_g + u, n), load(p_g + H + u, n), load(p_g + 2 * H + u, n),
                    load(p_g + 3 * H + u, n), a.bias, H, u, n, load(p_c + u, n),
                    a.train ? p_g : nullptr, b_c, b_h);
          store(p_c + u, b_c, n);
          if (p_cs) store(p_cs + u, b_c, n);
          store(p_hdst + u, b_h, n);
          if (p_hstate) store(p_hstate + u, b_h, n);
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
  const bool proj = a.w_hr != nullptr || a.w_hr16 != nullptr;
  const bool small = a.w_hh16 || split_step_gemm(p.N * G * H_out);
  // pack with the thread count that computes, as MKL advises
  const SingleThreadBlas blas(small);
  const StepGemm<T> gemm_hh(a.w_hh, H_out, false, H_out, G, p.N, small, nullptr, a.w_hh16);
  const StepGemm<T> gemm_hr(a.w_hr, H, false, H, H_out, proj ? p.N : 0, small, nullptr,
                            a.w_hr16);
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
