// Elman RNN time loops of one direction, tanh or ReLU.
#include "kernels.h"

#include <algorithm>

namespace rnnkit {

// Per step (the rows that restart there taking zeros or h0 as h_{t-1}, Restart in kernels.h):
// a = x W_ih^T + h_{t-1} W_hh^T (one GEMM accumulating into the projection, which
// sits in the output rows, projected over the sequence first or by the step itself) + b, h_t = act(a) over a in place. The output is the activation
// itself, so training saves nothing more.
template <typename T>
void rnn_forward(const Plan& p, int64_t H, const RNNForward<T>& a) {
  // pack with the thread count that computes, as MKL advises
  // (bfloat16 products run on the calling thread at every size)
  const bool small = a.w_hh16 || split_step_gemm(p.N * H * H);
  const SingleThreadBlas blas(small);
  const StepGemm<T> gemm_hh(a.w_hh, H, true, H, H, p.N, small, a.id_hh, a.w_hh16);
  const StepGemm<T> gemm_ih(a.w_ih, a.H_in, true, H, a.H_in, a.x ? p.N : 0, small, a.id_ih,
                            a.w_ih16);
  // the batch split over the threads, as the LSTM loops
  for_blocks(p.N, small, [&](int64_t lo, int64_t hi) {
    for (int64_t s = 0; s < p.steps(); ++s) {
      const int64_t o = p.off[s], b = std::min(p.bs[s], hi);
      if (b <= lo) continue;
      a.restart.state(p, s, lo, b, a.h, H, a.h0);
      T* p_a = a.out + (o + lo) * a.ld_out;
      if (a.x) gemm_ih(b - lo, a.x + (o + lo) * a.H_in, a.H_in, T(0), p_a, a.ld_out);
      gemm_hh(b - lo, a.h + lo * H, H, T(1), p_a, a.ld_out);
      for (int64_t j = lo; j < b; ++j) {
        T* p_h = a.h + j * H;
        T* p_out = a.out + (o + j) * a.ld_out;
        const Vec<T> zero(T(0));
        for_vec<T>(0, H, [&](int64_t u, int64_t n) {
          Vec<T> b_a = load(p_out + u, n);
          if (a.bias) b_a = b_a + load(a.bias + u, n);
          const Vec<T> b_h = a.relu ? at::vec::clamp_min(b_a, zero) : vtanh(b_a);
          store(p_h + u, b_h, n);
          store(p_out + u, b_h, n);
        });
      }
    }
  });
}

// Backward through time over the steps [s_lo, s_hi), from the saved activations h_t alone:
//   tanh:  dA = dh_t (1 - h_t^2)      relu:  dA = dh_t [not h_t <= 0] (torch's
//   threshold_backward: a NaN output passes its gradient)
//   dh_{t-1} = dA W_hh  (one GEMM per step, W_hh packed once by the caller for all blocks);
// weight and input gradients of the block in layer.cpp.
template <typename T>
void rnn_backward(const Plan& p, int64_t s_lo, int64_t s_hi, int64_t H, const RNNBackward<T>& a) {
  const SingleThreadBlas blas(small_step_gemm(p.N * H * H));
  const int64_t r0 = p.first_row(s_lo, s_hi);
  for (int64_t s = s_hi - 1; s >= s_lo; --s) {
    const int64_t o = p.off[s], b = p.bs[s];
    for (int64_t j = 0; j < b; ++j) {
      const T* p_h = a.out + (o + j) * a.ld_out;
      const T* p_go = a.gout + (o + j) * a.ld_gout;
      const T* p_dh = a.dh + j * H;
      T* p_dG = a.dG + (o + j - r0) * H;
      const Vec<T> zero(T(0)), one(T(1));
      for_vec<T>(0, H, [&](int64_t u, int64_t n) {
        const Vec<T> b_dh = load(p_dh + u, n) + load(p_go + u, n);
        const Vec<T> b_h = load(p_h + u, n);
        const Vec<T> b_da = a.relu ? Vec<T>::blendv(b_dh, zero, b_h <= zero)
                                   : b_dh * (one - b_h * b_h);
        store(p_dG + u, b_da, n);
      });
    }
    (*a.gemm_hh)(b, a.dG + (o - r0) * H, H, T(0), a.dh, H);
    a.restart.cut(p, s, 0, b, a.dh, H, a.dh0);
  }
}

template void rnn_forward<float>(const Plan&, int64_t, const RNNForward<float>&);
template void rnn_forward<double>(const Plan&, int64_t, const RNNForward<double>&);
template void rnn_backward<float>(const Plan&, int64_t, int64_t, int64_t,
                                  const RNNBackward<float>&);
template void rnn_backward<double>(const Plan&, int64_t, int64_t, int64_t,
                                   const RNNBackward<double>&);

}  // namespace rnnkit
