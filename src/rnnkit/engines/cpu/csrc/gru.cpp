// GRU time loops of one direction (gate order r, z, n; b_hn inside the reset product).
#include "kernels.h"

#include <algorithm>

namespace rnnkit {

// Per step: the rows that restart there take zeros or h0 as h_{t-1} (Restart, kernels.h);
// hw = h_{t-1} W_hh^T (one GEMM), then one pass:
//   r = vsigmoid(x_r + h_r), z = vsigmoid(x_z + h_z), n = tanh(x_n + r * h_n),
//   h_t = (h_{t-1} - n) * z + n,
// with x_* = x W_ih^T + b_ih and h_* = h W_hh^T + b_hh, in the op order of the reference
// cell. Training keeps r, z, n and h_n per row, over the row's x W_ih^T when the buffer is
// shared (each piece is loaded before its columns are stored); h_{t-1} is the previous
// output row.
template <typename T>
void gru_forward(const Plan& p, int64_t H, const GRUForward<T>& a) {
  const int64_t G = 3 * H;
  // pack with the thread count that computes, as MKL advises
  // (bfloat16 products run on the calling thread at every size)
  const bool small = a.w_hh16 || split_step_gemm(p.N * G * H);
  const SingleThreadBlas blas(small);
  const StepGemm<T> gemm_hh(a.w_hh, H, true, G, H, p.N, small, a.id_hh, a.w_hh16);
  const StepGemm<T> gemm_ih(a.w_ih, a.H_in, true, G, a.H_in, a.x ? p.N : 0, small, a.id_ih,
                            a.w_ih16);
  for_blocks(p.N, small, [&](int64_t lo, int64_t hi) {
    for (int64_t s = 0; s < p.steps(); ++s) {
      const int64_t o = p.off[s], b = std::min(p.bs[s], hi);
      if (b <= lo) continue;
      a.restart.state(p, s, lo, b, a.h, H, a.h0);
      // this step's rows of x W_ih^T: row j at p_xw + j * ld_xw
      const T* p_xw = a.xw + o * a.ld_xw;
      int64_t ld_xw = a.ld_xw;
      if (a.x) {
        T* dst = a.ws ? a.ws + o * 4 * H : a.xs;
        ld_xw = a.ws ? 4 * H : G;
        gemm_ih(b - lo, a.x + (o + lo) * a.H_in, a.H_in, T(0), dst + lo * ld_xw, ld_xw);
        p_xw = dst;
      }
      gemm_hh(b - lo, a.h + lo * H, H, T(0), a.hw + lo * G, G);
      for (int64_t j = lo; j < b; ++j) {
        const T* p_x = p_xw + j * ld_xw;
        const T* p_hw = a.hw + j * G;
        T* p_h = a.h + j * H;
        T* p_out = a.out + (o + j) * a.ld_out;
        T* p_ws = a.ws ? a.ws + (o + j) * 4 * H : nullptr;
        for_vec<T>(0, H, [&](int64_t u, int64_t n) {
          Vec<T> x_r = load(p_x + u, n), x_z = load(p_x + H + u, n);
          Vec<T> x_n = load(p_x + 2 * H + u, n);
          Vec<T> h_r = load(p_hw + u, n), h_z = load(p_hw + H + u, n);
          Vec<T> h_n = load(p_hw + 2 * H + u, n);
          if (a.b_ih) {
            x_r = x_r + load(a.b_ih + u, n);
            x_z = x_z + load(a.b_ih + H + u, n);
            x_n = x_n + load(a.b_ih + 2 * H + u, n);
          }
          if (a.b_hh) {
            h_r = h_r + load(a.b_hh + u, n);
            h_z = h_z + load(a.b_hh + H + u, n);
            h_n = h_n + load(a.b_hh + 2 * H + u, n);
          }
          const Vec<T> b_r = vsigmoid(h_r + x_r);
          const Vec<T> b_z = vsigmoid(h_z + x_z);
          const Vec<T> b_n = vtanh(x_n + h_n * b_r);
          const Vec<T> b_h = (load(p_h + u, n) - b_n) * b_z + b_n;
          store(p_h + u, b_h, n);
          store(p_out + u, b_h, n);
          if (p_ws) {
            store(p_ws + u, b_r, n);
            store(p_ws + H + u, b_z, n);
            store(p_ws + 2 * H + u, b_n, n);
            store(p_ws + 3 * H + u, h_n, n);
          }
        });
      }
    }
  });
}

// Backward through time. With dh_t = dL/dh_t (output gradient plus the step above) and
// h_n = W_hn h_{t-1} + b_hn the saved hidden part of the n gate:
//
//   h_t = (h_{t-1} - n) z + n    =>  dz = dh_t (h_{t-1} - n),  dn = dh_t (1 - z),
//                                    direct part of dh_{t-1} = dh_t z
//   n = tanh(x_n + r h_n)        =>  dA_n = dn (1 - n^2),  dr = dA_n h_n,
//                                    d(h_n) = dA_n r
//   r, z = vsigmoid(.)            =>  dA_r = dr r (1 - r),  dA_z = dz z (1 - z)
//   h_* = h_{t-1} W_hh^T + b_hh  =>  dh_{t-1} = dh_t z + [dA_r, dA_z, dA_n r] W_hh
//
// The reset gate sits inside n, so the input side sees dA_n where the hidden side sees
// dA_n r: a row of dG is dA_r | dA_z | dA_n r | dA_n. Columns 0..3H are the hidden-side
// gradient (dW_hh, db_hh, and the per-step GEMM above); columns r, z and the last block are
// the input side (dW_ih, db_ih, dX), each one GEMM over all steps in layer.cpp.
template <typename T>
void gru_backward(const Plan& p, int64_t H, const GRUBackward<T>& a) {
  const int64_t G = 3 * H, W = 4 * H;
  // pack with the thread count that computes, as MKL advises
  const bool small = a.w_hh16 || split_step_gemm(p.N * G * H);
  const SingleThreadBlas blas(small);
  const StepGemm<T> gemm_hh(a.w_hh, H, false, H, G, p.N, small, nullptr, a.w_hh16);
  for_blocks(p.N, small, [&](int64_t lo, int64_t hi) {
    for (int64_t s = p.steps() - 1; s >= 0; --s) {
      const int64_t o = p.off[s], b = std::min(p.bs[s], hi);
      if (b <= lo) continue;
      for (int64_t j = lo; j < b; ++j) {
        const T* p_ws = a.ws + (o + j) * W;
        const T* p_hp = a.restart.prev(p, s, j, a.out, a.ld_out, a.h0, H);
        const T* p_go = a.gout + (o + j) * a.ld_gout;
        T* p_dh = a.dh + j * H;
        T* p_dG = a.dG + (o + j) * W;
        const Vec<T> one(T(1));
        for_vec<T>(0, H, [&](int64_t u, int64_t n) {
          const Vec<T> b_dh = load(p_dh + u, n) + load(p_go + u, n);
          const Vec<T> b_r = load(p_ws + u, n), b_z = load(p_ws + H + u, n);
          const Vec<T> b_n = load(p_ws + 2 * H + u, n), h_n = load(p_ws + 3 * H + u, n);
          const Vec<T> d_an = b_dh * (one - b_z) * (one - b_n * b_n);
          store(p_dG + u, d_an * h_n * b_r * (one - b_r), n);
          store(p_dG + H + u, b_dh * (load(p_hp + u, n) - b_n) * b_z * (one - b_z), n);
          store(p_dG + 2 * H + u, d_an * b_r, n);
          store(p_dG + 3 * H + u, d_an, n);
          store(p_dh + u, b_dh * b_z, n);
        });
      }
      gemm_hh(b - lo, a.dG + (o + lo) * W, W, T(1), a.dh + lo * H, H);
      a.restart.cut(p, s, lo, b, a.dh, H, a.dh0);
    }
  });
}

template void gru_forward<float>(const Plan&, int64_t, const GRUForward<float>&);
template void gru_forward<double>(const Plan&, int64_t, const GRUForward<double>&);
template void gru_backward<float>(const Plan&, int64_t, const GRUBackward<float>&);
template void gru_backward<double>(const Plan&, int64_t, const GRUBackward<double>&);

}  // namespace rnnkit
