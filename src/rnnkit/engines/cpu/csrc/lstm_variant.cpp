// The LSTM variants (rnnkit.variants) on the fused CPU engine: one direction's recurrent part.
//
// The input side stays outside, in torch ops with autograd: the caller passes the gates' input
// part gx = LN_ih(x W_ih^T) + b_ih of every row, and the random masks it drew (so that every
// engine draws them alike). This file runs the time loop and its hand-written backward, and
// returns the gradient of gx with the other gradients; autograd takes it on through LN_ih and
// W_ih, and through the weight dropout that made w_hh.
//
// One step, h and c the previous state, m the recurrent dropout mask, k_h and k_c the zoneout
// keep weights (masks in training, the rates in eval), every clip optional:
//
//   r   = (h * m) W_hh^T                      rhat = (r - mean r) rstd_r       (layer_norm)
//   z   = gx + g_hh * rhat + b_hh             (z = gx + r + b_hh without layer_norm)
//   z_i += p_i * c,  z_f += p_f * c           (peephole)
//   i = sig(clip z_i),  f = sig(clip z_f) or 1 - i (coupled),  g = tanh(clip z_g)
//   ct  = clip_c(f * c + i * g)
//   z_o += p_o * ct,  o = sig(clip z_o)
//   co  = w_c * chat + b_c, chat = (ct - mean ct) rstd_c (layer_norm; else co = ct)
//   y   = o * tanh(co)                         ht = clip_p(y W_hr^T) (proj; else ht = y)
//   h'  = ht + k_h (h - ht)                    c' = ct + k_c (c - ct)
//
// Training keeps per row the pre-activations z (activations and clip masks are recomputed from
// them), ct, c' when it differs from ct, rhat and the row statistics for layer_norm, y and the
// unclipped projection for proj: what the backward below needs and nothing more.
#include "checks.h"
#include "kernels.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

namespace rnnkit {
namespace {

using at::Tensor;

constexpr double kLayerNormEps = 1e-5;

template <typename T>
T* ptr(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

template <typename T>
const T* ptr(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

template <typename T>
double hsum(const Vec<T>& v) {
  T lanes[Vec<T>::size()];
  v.store(lanes);
  double s = 0;
  for (int64_t k = 0; k < Vec<T>::size(); ++k) s += lanes[k];
  return s;
}

// Mean and 1 / sqrt(var + eps) of x[0..n), two passes (no cancellation of E[x^2] - E[x]^2).
template <typename T>
void row_moments(const T* x, int64_t n, T& mean, T& rstd) {
  constexpr int64_t V = Vec<T>::size();
  Vec<T> acc(T(0));
  int64_t u = 0;
  for (; u + V <= n; u += V) acc = acc + Vec<T>::loadu(x + u);
  double s = hsum(acc);
  for (; u < n; ++u) s += x[u];
  const double m = s / n;
  const Vec<T> vm(static_cast<T>(m));
  acc = Vec<T>(T(0));
  for (u = 0; u + V <= n; u += V) {
    const Vec<T> d = Vec<T>::loadu(x + u) - vm;
    acc = acc + d * d;
  }
  double q = hsum(acc);
  for (; u < n; ++u) q += (x[u] - m) * (x[u] - m);
  mean = static_cast<T>(m);
  rstd = static_cast<T>(1.0 / std::sqrt(q / n + kLayerNormEps));
}

// sum_u a[u] and sum_u a[u] b[u] over [0, n)
template <typename T>
void row_dots(const T* a, const T* b, int64_t n, double& sa, double& sab) {
  constexpr int64_t V = Vec<T>::size();
  Vec<T> acc_a(T(0)), acc_ab(T(0));
  int64_t u = 0;
  for (; u + V <= n; u += V) {
    const Vec<T> va = Vec<T>::loadu(a + u);
    acc_a = acc_a + va;
    acc_ab = acc_ab + va * Vec<T>::loadu(b + u);
  }
  sa = hsum(acc_a);
  sab = hsum(acc_ab);
  for (; u < n; ++u) {
    sa += a[u];
    sab += a[u] * b[u];
  }
}

// clamp to [-v, v]; v <= 0 means no clip
template <typename T>
inline Vec<T> clip(const Vec<T>& x, T v) {
  return v > 0 ? at::vec::clamp(x, Vec<T>(-v), Vec<T>(v)) : x;
}

// torch.clamp's gradient: dx where -v <= x <= v, else 0 (NaN included)
template <typename T>
inline Vec<T> clip_grad(const Vec<T>& dx, const Vec<T>& x, T v) {
  return v > 0 ? Vec<T>::blendv(Vec<T>(T(0)), dx, x.abs() <= Vec<T>(v)) : dx;
}

// The keep weight of zoneout: this row's mask when drawn, else the eval rate.
template <typename T>
inline Vec<T> keep(const T* mask_row, T rate, int64_t u, int64_t n) {
  return mask_row ? load(mask_row + u, n) : Vec<T>(rate);
}

template <typename T>
struct Args {
  int64_t H, H_out;
  const T* gx;        // [R, 4H]
  const T* h0;        // [N, H_out]
  const T* c0;        // [N, H]
  const T* w_hh;      // [4H, H_out]
  const T* b_hh;      // [4H] or null
  const T* w_hr;      // [H_out, H] or null
  const T* peep;      // [3H] i, f, o or null
  const T* ln_hh;     // [4H] gain or null (null: no layer_norm)
  const T* ln_cw;     // [H]
  const T* ln_cb;     // [H]
  const T* rec_mask;  // [N, H_out] or null
  const T* keep_h;    // [R, H_out] or null
  const T* keep_c;    // [R, H] or null
  T zh, zc;           // zoneout rates used when the masks are null
  T gate_clip, cell_clip, proj_clip;  // <= 0: none
  bool coupled;
  Restart<T> restart;  // resets inside the sequences (kernels.h), or none

  bool zone_h() const { return keep_h || zh != 0; }
  bool zone_c() const { return keep_c || zc != 0; }
};

// What forward keeps for backward, per row (null in inference).
template <typename T>
struct Saved {
  T* z;      // [R, 4H]
  T* ct;     // [R, H]
  T* cz;     // [R, H] c' when zoneout on c, else null (c' = ct)
  T* rhat;   // [R, 4H] layer_norm
  T* stats;  // [R, 3] rstd_r, mean ct, rstd_c (layer_norm)
  T* y;      // [R, H] proj
  T* hp;     // [R, H_out] unclipped projection (proj_clip)
};

template <typename T>
void forward_loop(const Plan& p, const Args<T>& a, const Saved<T>& sv, T* out, T* h, T* c) {
  const int64_t H = a.H, H_out = a.H_out, G = 4 * H, N = p.N;
  const bool proj = a.w_hr != nullptr, train = sv.z != nullptr;
  const bool small = small_step_gemm(N * G * H_out);
  const SingleThreadBlas blas(small);
  const StepGemm<T> gemm_hh(a.w_hh, H_out, true, G, H_out, N, small);
  const StepGemm<T> gemm_hr(a.w_hr, H, true, H_out, H, proj ? N : 0, small);
  std::vector<T> hin(a.rec_mask ? N * H_out : 0), rr(N * G), zs(G), cts(H), stats(3);
  std::vector<T> ys(proj && !train ? N * H : 0), hps(proj ? N * H_out : 0);
  for (int64_t s = 0; s < p.steps(); ++s) {
    const int64_t o = p.off[s], b = p.bs[s];
    a.restart.state(p, s, 0, b, h, H_out, a.h0);
    a.restart.state(p, s, 0, b, c, H, a.c0);
    const T* p_in = h;
    if (a.rec_mask) {
      for (int64_t k = 0; k < b * H_out; ++k) hin[k] = h[k] * a.rec_mask[k];
      p_in = hin.data();
    }
    gemm_hh(b, p_in, H_out, T(0), rr.data(), G);
    for (int64_t j = 0; j < b; ++j) {
      const int64_t row = o + j;
      const T* p_gx = a.gx + row * G;
      T* p_r = rr.data() + j * G;
      T* p_z = train ? sv.z + row * G : zs.data();
      T* p_ct = train ? sv.ct + row * H : cts.data();
      T* p_st = train && sv.stats ? sv.stats + row * 3 : stats.data();
      T* p_c = c + j * H;
      if (a.ln_hh) {
        T mean, rstd;
        row_moments(p_r, G, mean, rstd);
        p_st[0] = rstd;
        T* p_rhat = train ? sv.rhat + row * G : p_r;
        for_vec<T>(0, G, [&](int64_t u, int64_t n) {
          store(p_rhat + u, (load(p_r + u, n) - Vec<T>(mean)) * Vec<T>(rstd), n);
        });
        p_r = p_rhat;
      }
      // pass A: the gates' pre-activations, i, f, g and the new cell
      for_vec<T>(0, H, [&](int64_t u, int64_t n) {
        Vec<T> zk[4];
        for (int64_t k = 0; k < 4; ++k) {
          Vec<T> rec = load(p_r + k * H + u, n);
          if (a.ln_hh) rec = rec * load(a.ln_hh + k * H + u, n);
          if (a.b_hh) rec = rec + load(a.b_hh + k * H + u, n);
          zk[k] = load(p_gx + k * H + u, n) + rec;
        }
        const Vec<T> b_c = load(p_c + u, n);
        if (a.peep) {
          zk[0] = zk[0] + load(a.peep + u, n) * b_c;
          zk[1] = zk[1] + load(a.peep + H + u, n) * b_c;
        }
        const Vec<T> b_i = vsigmoid(clip(zk[0], a.gate_clip));
        const Vec<T> b_f = a.coupled ? Vec<T>(T(1)) - b_i : vsigmoid(clip(zk[1], a.gate_clip));
        const Vec<T> b_g = vtanh(clip(zk[2], a.gate_clip));
        const Vec<T> b_ct = clip(b_f * b_c + b_i * b_g, a.cell_clip);
        if (a.peep) zk[3] = zk[3] + load(a.peep + 2 * H + u, n) * b_ct;
        for (int64_t k = 0; k < 4; ++k) store(p_z + k * H + u, zk[k], n);
        store(p_ct + u, b_ct, n);
      });
      T mean_c = 0, rstd_c = 1;
      if (a.ln_cw) {
        row_moments(p_ct, H, mean_c, rstd_c);
        p_st[1] = mean_c;
        p_st[2] = rstd_c;
      }
      // pass B: o, the output y, zoneout of c (and of h without proj)
      T* p_y = proj ? (train ? sv.y + row * H : ys.data() + j * H) : nullptr;
      T* p_h = h + j * H_out;
      T* p_out = out + row * H_out;
      const T* p_kh = a.keep_h ? a.keep_h + row * H_out : nullptr;
      const T* p_kc = a.keep_c ? a.keep_c + row * H : nullptr;
      T* p_cz = sv.cz ? sv.cz + row * H : nullptr;
      for_vec<T>(0, H, [&](int64_t u, int64_t n) {
        const Vec<T> b_o = vsigmoid(clip(load(p_z + 3 * H + u, n), a.gate_clip));
        const Vec<T> b_ct = load(p_ct + u, n);
        Vec<T> b_co = b_ct;
        if (a.ln_cw) {
          b_co = (b_ct - Vec<T>(mean_c)) * Vec<T>(rstd_c) * load(a.ln_cw + u, n) +
                 load(a.ln_cb + u, n);
        }
        const Vec<T> b_y = b_o * vtanh(b_co);
        if (proj) {
          store(p_y + u, b_y, n);
        } else {
          const Vec<T> b_h = load(p_h + u, n);
          const Vec<T> b_hn = a.zone_h() ? b_y + keep(p_kh, a.zh, u, n) * (b_h - b_y) : b_y;
          store(p_h + u, b_hn, n);
          store(p_out + u, b_hn, n);
        }
        Vec<T> b_cn = b_ct;
        if (a.zone_c()) b_cn = b_ct + keep(p_kc, a.zc, u, n) * (load(p_c + u, n) - b_ct);
        store(p_c + u, b_cn, n);
        if (p_cz) store(p_cz + u, b_cn, n);
      });
    }
    if (proj) {
      const T* p_y = train ? sv.y + o * H : ys.data();
      gemm_hr(b, p_y, H, T(0), hps.data(), H_out);
      for (int64_t j = 0; j < b; ++j) {
        const int64_t row = o + j;
        const T* p_hp = hps.data() + j * H_out;
        T* p_h = h + j * H_out;
        T* p_out = out + row * H_out;
        const T* p_kh = a.keep_h ? a.keep_h + row * H_out : nullptr;
        if (train && sv.hp) std::memcpy(sv.hp + row * H_out, p_hp, H_out * sizeof(T));
        for_vec<T>(0, H_out, [&](int64_t u, int64_t n) {
          const Vec<T> b_ht = clip(load(p_hp + u, n), a.proj_clip);
          const Vec<T> b_h = load(p_h + u, n);
          const Vec<T> b_hn = a.zone_h() ? b_ht + keep(p_kh, a.zh, u, n) * (b_h - b_ht) : b_ht;
          store(p_h + u, b_hn, n);
          store(p_out + u, b_hn, n);
        });
      }
    }
  }
}

// Gradients the loop accumulates over rows (the rest are GEMMs over all rows afterwards).
template <typename T>
struct Accum {
  std::vector<T> peep, ln_hh, ln_cw, ln_cb;
};

template <typename T>
inline void accumulate(T* acc, const Vec<T>& v, int64_t n) {
  store(acc, load(acc, n) + v, n);
}

// Backward through time. dh, dc: gradient of the final state on entry, of h0, c0 on exit.
// Per step, in reverse, with dh' = grad_out + dh (the state's gradient from the step after):
//
//   dht = dh' (1 - k_h), dh_prev = dh' k_h + ...      (zoneout: h' = ht + k_h (h - ht))
//   proj: dht *= [|y W_hr^T| <= v_p], dy = dht W_hr (a GEMM); else dy = dht
//   do = dy tanh(co),  dco = dy o (1 - tanh^2 co)
//   layer_norm on c: dchat = dco w_c, dct_ln = rstd_c (dchat - mean(dchat) - chat mean(dchat chat))
//   dz_o = do o (1 - o) [|z_o| <= v]
//   dct = dc (1 - k_c) + dct_ln + dz_o p_o,  dc_prev = dc k_c + ...
//   dpre = dct [|f c + i g| <= v_c]
//   di = dpre g, dg = dpre i, df = dpre c (coupled: di -= df, no dz_f), dc_prev += dpre f
//   dz_i = di i (1 - i) [..], dz_f = df f (1 - f) [..], dz_g = dg (1 - g^2) [..]
//   dc_prev += dz_i p_i + dz_f p_f;  dgx = dz
//   layer_norm on r: drhat = dz g_hh, dr = rstd_r (drhat - mean(drhat) - rhat mean(drhat rhat))
//   dh_prev += (dr W_hh) * m  (a GEMM)
template <typename T>
void backward_loop(const Plan& p, const Args<T>& a, const Saved<T>& sv, const T* gout,
                   T* dh, T* dc, T* dz_all, T* dr_all, T* dht_all, Accum<T>& acc, T* dh_init,
                   T* dc_init) {
  const int64_t H = a.H, H_out = a.H_out, G = 4 * H, N = p.N;
  const bool proj = a.w_hr != nullptr;
  const bool small = small_step_gemm(N * G * H_out);
  const SingleThreadBlas blas(small);
  const StepGemm<T> gemm_hh(a.w_hh, H_out, false, H_out, G, N, small);
  const StepGemm<T> gemm_hr(a.w_hr, H, false, H, H_out, proj ? N : 0, small);
  std::vector<T> dys(N * H), dcd(H), dtmp(a.rec_mask ? N * H_out : 0);
  const T* c_hist = sv.cz ? sv.cz : sv.ct;
  const Vec<T> one(T(1));
  for (int64_t s = p.steps() - 1; s >= 0; --s) {
    const int64_t o = p.off[s], b = p.bs[s];
    // the output's gradient: split by zoneout into ht's and the previous state's
    for (int64_t j = 0; j < b; ++j) {
      const int64_t row = o + j;
      const T* p_go = gout + row * H_out;
      const T* p_kh = a.keep_h ? a.keep_h + row * H_out : nullptr;
      T* p_dh = dh + j * H_out;
      T* p_dht = proj ? dht_all + row * H_out : dys.data() + j * H;
      const T* p_hp = sv.hp ? sv.hp + row * H_out : nullptr;
      for_vec<T>(0, H_out, [&](int64_t u, int64_t n) {
        const Vec<T> b_dhn = load(p_dh + u, n) + load(p_go + u, n);
        Vec<T> b_dht = b_dhn;
        Vec<T> b_keep(T(0));
        if (a.zone_h()) {
          const Vec<T> k = keep(p_kh, a.zh, u, n);
          b_dht = b_dhn * (one - k);
          b_keep = b_dhn * k;
        }
        if (p_hp) b_dht = clip_grad(b_dht, load(p_hp + u, n), a.proj_clip);
        store(p_dht + u, b_dht, n);
        store(p_dh + u, b_keep, n);
      });
    }
    if (proj) gemm_hr(b, dht_all + o * H_out, H_out, T(0), dys.data(), H);
    for (int64_t j = 0; j < b; ++j) {
      const int64_t row = o + j;
      const T* p_z = sv.z + row * G;
      const T* p_ct = sv.ct + row * H;
      const T* p_cp = a.restart.prev(p, s, j, c_hist, H, a.c0, H);
      const T* p_dy = dys.data() + j * H;
      const T* p_kc = a.keep_c ? a.keep_c + row * H : nullptr;
      const T* p_st = sv.stats ? sv.stats + row * 3 : nullptr;
      T* p_dc = dc + j * H;
      T* p_dz = dz_all + row * G;
      const T mean_c = p_st ? p_st[1] : T(0), rstd_c = p_st ? p_st[2] : T(1);
      // pass 1: dz_o, and the gradient reaching ct through tanh(co) (dchat with layer_norm)
      for_vec<T>(0, H, [&](int64_t u, int64_t n) {
        const Vec<T> b_zo = load(p_z + 3 * H + u, n);
        const Vec<T> b_o = vsigmoid(clip(b_zo, a.gate_clip));
        const Vec<T> b_ct = load(p_ct + u, n);
        Vec<T> b_chat = b_ct, b_co = b_ct;
        if (a.ln_cw) {
          b_chat = (b_ct - Vec<T>(mean_c)) * Vec<T>(rstd_c);
          b_co = b_chat * load(a.ln_cw + u, n) + load(a.ln_cb + u, n);
        }
        const Vec<T> b_tc = vtanh(b_co);
        const Vec<T> b_dy = load(p_dy + u, n);
        Vec<T> b_dco = b_dy * b_o * (one - b_tc * b_tc);
        store(p_dz + 3 * H + u, clip_grad(b_dy * b_tc * b_o * (one - b_o), b_zo, a.gate_clip), n);
        if (a.ln_cw) {
          accumulate(acc.ln_cw.data() + u, b_dco * b_chat, n);
          accumulate(acc.ln_cb.data() + u, b_dco, n);
          b_dco = b_dco * load(a.ln_cw + u, n);
        }
        store(dcd.data() + u, b_dco, n);
      });
      double s_d = 0, s_dc = 0;
      if (a.ln_cw) {
        // mean(dchat) and mean(dchat chat), chat recomputed into the scratch of dz's f block
        T* p_chat = p_dz + H;
        for_vec<T>(0, H, [&](int64_t u, int64_t n) {
          store(p_chat + u, (load(p_ct + u, n) - Vec<T>(mean_c)) * Vec<T>(rstd_c), n);
        });
        row_dots(dcd.data(), p_chat, H, s_d, s_dc);
        s_d /= H;
        s_dc /= H;
      }
      // pass 2: through the cell update to the gates and the previous cell
      for_vec<T>(0, H, [&](int64_t u, int64_t n) {
        const Vec<T> b_zi = load(p_z + u, n), b_zf = load(p_z + H + u, n);
        const Vec<T> b_zg = load(p_z + 2 * H + u, n);
        const Vec<T> b_i = vsigmoid(clip(b_zi, a.gate_clip));
        const Vec<T> b_f = a.coupled ? one - b_i : vsigmoid(clip(b_zf, a.gate_clip));
        const Vec<T> b_g = vtanh(clip(b_zg, a.gate_clip));
        const Vec<T> b_cp = load(p_cp + u, n);
        const Vec<T> b_ct = load(p_ct + u, n);
        Vec<T> b_dct = load(dcd.data() + u, n);
        if (a.ln_cw) {
          const Vec<T> b_chat = (b_ct - Vec<T>(mean_c)) * Vec<T>(rstd_c);
          b_dct = Vec<T>(rstd_c) * (b_dct - Vec<T>(T(s_d)) - b_chat * Vec<T>(T(s_dc)));
        }
        const Vec<T> b_dcn = load(p_dc + u, n);
        Vec<T> b_dcp(T(0));
        if (a.zone_c()) {
          const Vec<T> k = keep(p_kc, a.zc, u, n);
          b_dct = b_dct + b_dcn * (one - k);
          b_dcp = b_dcn * k;
        } else {
          b_dct = b_dct + b_dcn;
        }
        const Vec<T> b_dzo = load(p_dz + 3 * H + u, n);
        if (a.peep) b_dct = b_dct + b_dzo * load(a.peep + 2 * H + u, n);
        const Vec<T> b_dpre = clip_grad(b_dct, b_f * b_cp + b_i * b_g, a.cell_clip);
        Vec<T> b_di = b_dpre * b_g;
        const Vec<T> b_df = b_dpre * b_cp;
        Vec<T> b_dzf(T(0));
        if (a.coupled) {
          b_di = b_di - b_df;
        } else {
          b_dzf = clip_grad(b_df * b_f * (one - b_f), b_zf, a.gate_clip);
        }
        const Vec<T> b_dzi = clip_grad(b_di * b_i * (one - b_i), b_zi, a.gate_clip);
        const Vec<T> b_dzg = clip_grad(b_dpre * b_i * (one - b_g * b_g), b_zg, a.gate_clip);
        b_dcp = b_dcp + b_dpre * b_f;
        if (a.peep) {
          b_dcp = b_dcp + b_dzi * load(a.peep + u, n) + b_dzf * load(a.peep + H + u, n);
          accumulate(acc.peep.data() + u, b_dzi * b_cp, n);
          accumulate(acc.peep.data() + H + u, b_dzf * b_cp, n);
          accumulate(acc.peep.data() + 2 * H + u, b_dzo * b_ct, n);
        }
        store(p_dc + u, b_dcp, n);
        store(p_dz + u, b_dzi, n);
        store(p_dz + H + u, b_dzf, n);
        store(p_dz + 2 * H + u, b_dzg, n);
      });
      if (a.ln_hh) {
        // layer_norm of the recurrent part: dz -> dr through the gain and the normalization
        const T* p_rhat = sv.rhat + row * G;
        T* p_dr = dr_all + row * G;
        const T rstd = p_st[0];
        for_vec<T>(0, G, [&](int64_t u, int64_t n) {
          store(p_dr + u, load(p_dz + u, n) * load(a.ln_hh + u, n), n);
        });
        for_vec<T>(0, G, [&](int64_t u, int64_t n) {
          accumulate(acc.ln_hh.data() + u, load(p_dz + u, n) * load(p_rhat + u, n), n);
        });
        double m_d, m_dr;
        row_dots(p_dr, p_rhat, G, m_d, m_dr);
        const Vec<T> v_d(T(m_d / G)), v_dr(T(m_dr / G));
        for_vec<T>(0, G, [&](int64_t u, int64_t n) {
          const Vec<T> d = load(p_dr + u, n) - v_d - load(p_rhat + u, n) * v_dr;
          store(p_dr + u, d * Vec<T>(rstd), n);
        });
      }
    }
    const T* p_dr = (a.ln_hh ? dr_all : dz_all) + o * G;
    if (a.rec_mask) {
      gemm_hh(b, p_dr, G, T(0), dtmp.data(), H_out);
      for (int64_t k = 0; k < b * H_out; ++k) dh[k] += dtmp[k] * a.rec_mask[k];
    } else {
      gemm_hh(b, p_dr, G, T(1), dh, H_out);
    }
    a.restart.cut(p, s, 0, b, dh, H_out, dh_init);
    a.restart.cut(p, s, 0, b, dc, H, dc_init);
  }
}

Tensor empty_of(const Tensor& like) { return at::empty({0}, like.options()); }

Tensor opt(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : Tensor();
}

template <typename T>
Args<T> make_args(const Tensor& gx, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
                  const Tensor& b_hh, const Tensor& w_hr, const Tensor& peep,
                  const Tensor& ln_hh, const Tensor& ln_cw, const Tensor& ln_cb,
                  const Tensor& rec_mask, const Tensor& keep_h, const Tensor& keep_c,
                  at::ArrayRef<double> rates, bool coupled) {
  Args<T> a{};
  a.H = c0.size(1);
  a.H_out = h0.size(1);
  a.gx = ptr<T>(gx);
  a.h0 = ptr<T>(h0);
  a.c0 = ptr<T>(c0);
  a.w_hh = ptr<T>(w_hh);
  a.b_hh = ptr<T>(b_hh);
  a.w_hr = ptr<T>(w_hr);
  a.peep = ptr<T>(peep);
  a.ln_hh = ptr<T>(ln_hh);
  a.ln_cw = ptr<T>(ln_cw);
  a.ln_cb = ptr<T>(ln_cb);
  a.rec_mask = ptr<T>(rec_mask);
  a.keep_h = ptr<T>(keep_h);
  a.keep_c = ptr<T>(keep_c);
  a.zh = static_cast<T>(rates[0]);
  a.zc = static_cast<T>(rates[1]);
  a.gate_clip = static_cast<T>(rates[2]);
  a.cell_clip = static_cast<T>(rates[3]);
  a.proj_clip = static_cast<T>(rates[4]);
  a.coupled = coupled;
  return a;
}

// Returns out [R, H_out], h_n [N, H_out], c_n [N, H], then (when train) the saved buffers
// z, ct, cz, rhat, stats, y, hp (empty where the variant needs none).
template <typename T>
std::vector<Tensor> forward_impl(const Tensor& gx, const Tensor& h0, const Tensor& c0,
                                 const Args<T>& a, at::IntArrayRef batch_sizes, bool reverse,
                                 bool train) {
  const int64_t R = gx.size(0), H = a.H, H_out = a.H_out;
  const auto opts = gx.options();
  const Plan p = make_plan(batch_sizes, reverse);
  Tensor out = at::empty({R, H_out}, opts);
  Tensor h_n = h0.clone(at::MemoryFormat::Contiguous);
  Tensor c_n = c0.clone(at::MemoryFormat::Contiguous);
  const bool ln = a.ln_hh != nullptr, proj = a.w_hr != nullptr;
  std::vector<Tensor> saved(7, Tensor());
  if (train) {
    saved[0] = at::empty({R, 4 * H}, opts);
    saved[1] = at::empty({R, H}, opts);
    if (a.zone_c()) saved[2] = at::empty({R, H}, opts);
    if (ln) saved[3] = at::empty({R, 4 * H}, opts);
    if (ln) saved[4] = at::empty({R, 3}, opts);
    if (proj) saved[5] = at::empty({R, H}, opts);
    if (proj && a.proj_clip > 0) saved[6] = at::empty({R, H_out}, opts);
  }
  const Saved<T> sv{ptr<T>(saved[0]), ptr<T>(saved[1]), ptr<T>(saved[2]), ptr<T>(saved[3]),
                    ptr<T>(saved[4]), ptr<T>(saved[5]), ptr<T>(saved[6])};
  forward_loop<T>(p, a, sv, ptr<T>(out), ptr<T>(h_n), ptr<T>(c_n));
  std::vector<Tensor> result{out, h_n, c_n};
  if (train) {
    for (auto& t : saved) result.push_back(t.defined() ? t : empty_of(gx));
  }
  return result;
}

// Returns dgx [R, 4H], dh0, dc0, dw_hh, then db_hh, dw_hr, dpeep, dln_hh, dln_c_weight,
// dln_c_bias (empty where the parameter is absent).
template <typename T>
std::vector<Tensor> backward_impl(const Tensor& grad_out, const Tensor& grad_hn,
                                  const Tensor& grad_cn, const Tensor& out,
                                  at::TensorList saved, const Args<T>& a,
                                  at::IntArrayRef batch_sizes, bool reverse, bool has_b_hh) {
  const int64_t H = a.H, H_out = a.H_out, G = 4 * H;
  const int64_t R = out.size(0);
  const auto opts = out.options();
  const Plan p = make_plan(batch_sizes, reverse);
  const Tensor gout = grad_out.contiguous();
  Tensor dh = grad_hn.clone(at::MemoryFormat::Contiguous);
  Tensor dc = grad_cn.clone(at::MemoryFormat::Contiguous);
  Tensor dz = at::empty({R, G}, opts);
  const bool ln = a.ln_hh != nullptr, proj = a.w_hr != nullptr;
  Tensor dr = ln ? at::empty({R, G}, opts) : dz;
  Tensor dht = proj ? at::empty({R, H_out}, opts) : Tensor();
  const Saved<T> sv{ptr<T>(saved[0]), ptr<T>(saved[1]), ptr<T>(saved[2]), ptr<T>(saved[3]),
                    ptr<T>(saved[4]), ptr<T>(saved[5]), ptr<T>(saved[6])};
  Accum<T> acc;
  if (a.peep) acc.peep.assign(3 * H, T(0));
  if (ln) acc.ln_hh.assign(G, T(0));
  if (a.ln_cw) {
    acc.ln_cw.assign(H, T(0));
    acc.ln_cb.assign(H, T(0));
  }
  // with resets: what reaches h0, c0 at the rows that restart from them
  const bool resets = a.restart.codes != nullptr;
  Tensor dh_init = resets ? at::zeros_like(dh) : Tensor();
  Tensor dc_init = resets ? at::zeros_like(dc) : Tensor();
  backward_loop<T>(p, a, sv, ptr<T>(gout), ptr<T>(dh), ptr<T>(dc), ptr<T>(dz), ptr<T>(dr),
                   ptr<T>(dht), acc, ptr<T>(dh_init), ptr<T>(dc_init));
  if (resets) {
    dh.add_(dh_init);
    dc.add_(dc_init);
  }

  // dW_hh = sum over rows of dr^T (h_prev * m): the previous states gathered into one matrix
  Tensor hin = at::empty({R, H_out}, opts);
  const T* p_out = ptr<T>(out);
  T* p_hin = ptr<T>(hin);
  for (int64_t s = 0; s < p.steps(); ++s) {
    for (int64_t j = 0; j < p.bs[s]; ++j) {
      const T* src = a.restart.prev(p, s, j, p_out, H_out, a.h0, H_out);
      T* dst = p_hin + (p.off[s] + j) * H_out;
      if (a.rec_mask) {
        for (int64_t u = 0; u < H_out; ++u) dst[u] = src[u] * a.rec_mask[j * H_out + u];
      } else {
        std::memcpy(dst, src, H_out * sizeof(T));
      }
    }
  }
  Tensor dw_hh = at::empty({G, H_out}, opts);
  gemm<T>(true, false, G, H_out, R, T(1), ptr<T>(dr), G, p_hin, H_out, T(0), ptr<T>(dw_hh), H_out);
  hin = Tensor();

  auto from = [&](const std::vector<T>& v) {
    Tensor t = at::empty({static_cast<int64_t>(v.size())}, opts);
    std::memcpy(ptr<T>(t), v.data(), v.size() * sizeof(T));
    return t;
  };
  std::vector<Tensor> result{dz, dh, dc, dw_hh};
  result.push_back(has_b_hh ? dz.sum(0) : empty_of(out));
  if (proj) {
    // dW_hr = sum_t dht^T y_t
    Tensor dw_hr = at::empty({H_out, H}, opts);
    gemm<T>(true, false, H_out, H, R, T(1), ptr<T>(dht), H_out, sv.y, H, T(0), ptr<T>(dw_hr), H);
    result.push_back(dw_hr);
  } else {
    result.push_back(empty_of(out));
  }
  result.push_back(a.peep ? from(acc.peep) : empty_of(out));
  result.push_back(ln ? from(acc.ln_hh) : empty_of(out));
  result.push_back(a.ln_cw ? from(acc.ln_cw) : empty_of(out));
  result.push_back(a.ln_cw ? from(acc.ln_cb) : empty_of(out));
  return result;
}

std::vector<Tensor> lstm_variant_forward(
    const Tensor& gx, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& peephole, const std::optional<Tensor>& ln_hh,
    const std::optional<Tensor>& ln_c_weight, const std::optional<Tensor>& ln_c_bias,
    const std::optional<Tensor>& rec_mask, const std::optional<Tensor>& keep_h,
    const std::optional<Tensor>& keep_c, at::ArrayRef<double> rates, bool coupled,
    at::IntArrayRef batch_sizes, bool reverse, bool train, const std::optional<Tensor>& restart) {
  init_threads();
  const c10::ScalarType dtype = float_dtype("gx", gx);
  check_tensor("gx", gx, dtype, 2);
  const VariantShape s =
      check_variant_args(dtype, gx.size(0), h0, c0, w_hh, b_hh, w_hr, peephole, ln_hh,
                         ln_c_weight, ln_c_bias, rec_mask, keep_h, keep_c, rates, batch_sizes);
  check_variant_restart(s, restart);
  const std::optional<Tensor> rc = contiguous(restart);
  check_tensor("gx", gx, dtype, {s.R, 4 * s.H}, "[R, 4*H]");
  const Tensor g = gx.contiguous(), h = h0.contiguous(), c = c0.contiguous();
  const Tensor w = w_hh.contiguous(), bh = opt(b_hh), wr = opt(w_hr), pp = opt(peephole);
  const Tensor lh = opt(ln_hh), lw = opt(ln_c_weight), lb = opt(ln_c_bias);
  const Tensor rm = opt(rec_mask), kh = opt(keep_h), kc = opt(keep_c);
  const int64_t width = std::max(h.size(1), c.size(1));
  if (gx.scalar_type() == at::kFloat) {
    const std::vector<float> zeros(width, 0.0f);
    auto a = make_args<float>(g, h, c, w, bh, wr, pp, lh, lw, lb, rm, kh, kc, rates, coupled);
    a.restart = direction_restart(rc, 0, s.R, zeros);
    return forward_impl<float>(g, h, c, a, s.batch_sizes, reverse, train);
  }
  const std::vector<double> zeros(width, 0.0);
  auto a = make_args<double>(g, h, c, w, bh, wr, pp, lh, lw, lb, rm, kh, kc, rates, coupled);
  a.restart = direction_restart(rc, 0, s.R, zeros);
  return forward_impl<double>(g, h, c, a, s.batch_sizes, reverse, train);
}

std::vector<Tensor> lstm_variant_backward(
    const Tensor& grad_out, const Tensor& grad_hn, const Tensor& grad_cn, const Tensor& out,
    at::TensorList saved, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& peephole, const std::optional<Tensor>& ln_hh,
    const std::optional<Tensor>& ln_c_weight, const std::optional<Tensor>& ln_c_bias,
    const std::optional<Tensor>& rec_mask, const std::optional<Tensor>& keep_h,
    const std::optional<Tensor>& keep_c, at::ArrayRef<double> rates, bool coupled,
    at::IntArrayRef batch_sizes, bool reverse, const std::optional<Tensor>& restart) {
  init_threads();
  const c10::ScalarType dtype = float_dtype("out", out);
  check_tensor("out", out, dtype, 2);
  const VariantShape s =
      check_variant_args(dtype, out.size(0), h0, c0, w_hh, b_hh, w_hr, peephole, ln_hh,
                         ln_c_weight, ln_c_bias, rec_mask, keep_h, keep_c, rates, batch_sizes);
  check_variant_grads(dtype, s, grad_out, grad_hn, grad_cn, out, saved);
  check_variant_restart(s, restart);
  const std::optional<Tensor> rc = contiguous(restart);
  const Tensor h = h0.contiguous(), c = c0.contiguous();
  const Tensor w = w_hh.contiguous(), bh = opt(b_hh), wr = opt(w_hr), pp = opt(peephole);
  const Tensor lh = opt(ln_hh), lw = opt(ln_c_weight), lb = opt(ln_c_bias);
  const Tensor rm = opt(rec_mask), kh = opt(keep_h), kc = opt(keep_c);
  const Tensor o = out.contiguous();
  std::vector<Tensor> sv;
  for (const Tensor& t : saved) sv.push_back(t.contiguous());
  const bool has_b = bh.defined();
  const int64_t width = std::max(h.size(1), c.size(1));
  if (out.scalar_type() == at::kFloat) {
    const std::vector<float> zeros(width, 0.0f);
    auto a = make_args<float>(o, h, c, w, bh, wr, pp, lh, lw, lb, rm, kh, kc, rates, coupled);
    a.restart = direction_restart(rc, 0, s.R, zeros);
    return backward_impl<float>(grad_out, grad_hn, grad_cn, o, sv, a, s.batch_sizes, reverse,
                                has_b);
  }
  const std::vector<double> zeros(width, 0.0);
  auto a = make_args<double>(o, h, c, w, bh, wr, pp, lh, lw, lb, rm, kh, kc, rates, coupled);
  a.restart = direction_restart(rc, 0, s.R, zeros);
  return backward_impl<double>(grad_out, grad_hn, grad_cn, o, sv, a, s.batch_sizes, reverse,
                               has_b);
}

}  // namespace
}  // namespace rnnkit

// The schemas are in engines/cpu/ops.py (see layer.cpp).
TORCH_LIBRARY_IMPL(rnnkit_cpu, CPU, m) {
  m.impl("lstm_variant_forward", &rnnkit::lstm_variant_forward);
  m.impl("lstm_variant_backward", &rnnkit::lstm_variant_backward);
}
