// Dynamic int8 inference of one direction of an LSTM, GRU or Elman layer (rnnkit.quantized).
//
// Each weight W [J, K] is int8 per output channel, W ~ s_w[j] * Wq[j, k] with Wq in
// [-127, 127], held as panels [ceil(J/16)][ceil(K/4)][16][4]: one 64-byte load gives 16
// outputs x 4 consecutive k, the operand of AVX-512 VNNI's vpdpbusd (u8 x s8 -> s32, no
// saturation). The left side of every product (x_t, h_{t-1}, LSTM's o*tanh(c) before the
// projection) is quantized per row when it is known, as uint8 with a zero point:
//   a ~ s_a * (q - z),  s_a = (max(a, 0) - min(a, 0)) / 255,  z = round(-min(a, 0) / s_a),
// so that, with u[j] = sum_k Wq[j, k],
//   (a W^T)[j] ~ s_a * s_w[j] * (sum_k q_k Wq[j, k] - z * u[j]).
// Integer sums are exact; the dequantization and everything after it is float32, the states
// included. The op order (and the rounding: nearest, ties to even) is the Python reference's,
// rnnkit/quantized/reference.py, which the tests hold this file to.
#include "activations.h"
#include "kernels.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

// the epilogue's v * s + b must stay two roundings, as in the reference
#pragma GCC optimize("fp-contract=off")

namespace rnnkit::int8 {
namespace {

using at::Tensor;

constexpr int64_t kPanel = 16;  // outputs per panel
constexpr int64_t kDepth = 4;   // k per vpdpbusd lane

struct QWeight {
  const int8_t* panels;  // [ceil(J/16)][Kq][16][4]
  const float* scale;    // [J]
  const int32_t* sum;    // [J]
  int64_t J, K, Kq;
};

QWeight qweight(const Tensor& panels, const Tensor& scale, const Tensor& sum, int64_t K,
                const char* name) {
  const int64_t J = scale.numel();
  const int64_t Kq = (K + kDepth - 1) / kDepth;
  const int64_t Jb = (J + kPanel - 1) / kPanel;
  TORCH_CHECK(panels.scalar_type() == at::kChar && panels.is_contiguous() &&
                  panels.numel() == Jb * Kq * kPanel * kDepth,
              "rnnkit int8: ", name, " must be contiguous int8 panels of ", Jb * Kq * 64,
              " bytes for ", J, " outputs and ", K, " inputs, got ", panels.scalar_type(), " ",
              panels.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(), "rnnkit int8: ", name,
              " scale must be contiguous float32");
  TORCH_CHECK(sum.scalar_type() == at::kInt && sum.is_contiguous() && sum.numel() == J,
              "rnnkit int8: ", name, " sums must be contiguous int32 of ", J, " values");
  return {panels.data_ptr<int8_t>(), scale.data_ptr<float>(), sum.data_ptr<int32_t>(), J, K, Kq};
}

// Rows a [M, K] (leading dimension lda) as uint8 [M, ldq] (the tail past K zero), with each
// row's scale and zero point. A row holding inf or NaN gets scale NaN: its products are NaN.
void quantize_rows(const float* a, int64_t M, int64_t K, int64_t lda, uint8_t* q, int64_t ldq,
                   float* scale, int32_t* zero) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = a + m * lda;
    uint8_t* out = q + m * ldq;
    float lo = 0.f, hi = 0.f, probe = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      lo = std::min(lo, r[k]);
      hi = std::max(hi, r[k]);
      probe += r[k] * 0.f;
    }
    if (!std::isfinite(probe)) {
      std::memset(out, 0, ldq);
      scale[m] = std::nanf("");
      zero[m] = 0;
      continue;
    }
    float s = (hi - lo) / 255.f;
    if (!(s > 0.f)) s = 1.f;
    const float inv = 1.f / s;
    const int32_t z = static_cast<int32_t>(std::clamp(std::nearbyint(-lo * inv), 0.f, 255.f));
    for (int64_t k = 0; k < K; ++k) {
      const float v = std::nearbyint(r[k] * inv) + static_cast<float>(z);
      out[k] = static_cast<uint8_t>(std::clamp(v, 0.f, 255.f));
    }
    std::memset(out + K, 0, ldq - K);
    scale[m] = s;
    zero[m] = z;
  }
}

// What a product's rows are written as: c[m, j] = deq(m, j) [+ bias[j]] [+ add[m, j]].
struct Epilogue {
  const uint8_t* q;  // [M, ldq]
  int64_t ldq;
  const float* scale;
  const int32_t* zero;
  const float* bias;  // [J] or null
  const float* add;   // [M, ldadd] or null
  int64_t ldadd;
  float* c;
  int64_t ldc;
};

inline float dequant(int32_t acc, int32_t zero, int32_t sum, float sa, float sw) {
  return static_cast<float>(acc - zero * sum) * (sa * sw);
}

inline void finish(const Epilogue& e, const QWeight& w, int64_t m, int64_t j, int32_t acc) {
  float v = dequant(acc, e.zero[m], w.sum[j], e.scale[m], w.scale[j]);
  if (e.bias) v = v + e.bias[j];
  if (e.add) v = v + e.add[m * e.ldadd + j];
  e.c[m * e.ldc + j] = v;
}

// Panels [jb0, jb1), every row, in plain C++ (any x86-64 CPU; the compiler vectorizes it).
void gemm_portable(int64_t M, const QWeight& w, const Epilogue& e, int64_t jb0, int64_t jb1) {
  for (int64_t jb = jb0; jb < jb1; ++jb) {
    const int8_t* panel = w.panels + jb * w.Kq * kPanel * kDepth;
    const int64_t j0 = jb * kPanel, n = std::min(kPanel, w.J - j0);
    for (int64_t m = 0; m < M; ++m) {
      const uint8_t* a = e.q + m * e.ldq;
      int32_t acc[kPanel] = {};
      for (int64_t kq = 0; kq < w.Kq; ++kq) {
        const int8_t* b = panel + kq * kPanel * kDepth;
        const uint8_t* ak = a + kq * kDepth;
        for (int64_t i = 0; i < kPanel; ++i)
          for (int64_t u = 0; u < kDepth; ++u)
            acc[i] += static_cast<int32_t>(ak[u]) * static_cast<int32_t>(b[i * kDepth + u]);
      }
      for (int64_t i = 0; i < n; ++i) finish(e, w, m, j0 + i, acc[i]);
    }
  }
}

#define RNNKIT_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// MR rows x P panels (P = 1 or 2) of accumulators: each weight load feeds MR vpdpbusd, each
// broadcast of a row's 4 bytes feeds P.
template <int MR, int P>
RNNKIT_VNNI void tile_vnni(const QWeight& w, const Epilogue& e, int64_t m0, int64_t jb) {
  __m512i acc[MR][P];
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = _mm512_setzero_si512();
  const int8_t* panel = w.panels + jb * w.Kq * kPanel * kDepth;
  const int64_t stride = w.Kq * kPanel * kDepth;
  for (int64_t kq = 0; kq < w.Kq; ++kq) {
    __m512i b[P];
    for (int p = 0; p < P; ++p) b[p] = _mm512_loadu_si512(panel + p * stride + kq * 64);
    for (int r = 0; r < MR; ++r) {
      int32_t four;
      std::memcpy(&four, e.q + (m0 + r) * e.ldq + kq * kDepth, 4);
      const __m512i a = _mm512_set1_epi32(four);
      for (int p = 0; p < P; ++p) acc[r][p] = _mm512_dpbusd_epi32(acc[r][p], a, b[p]);
    }
  }
  for (int p = 0; p < P; ++p) {
    const int64_t j0 = (jb + p) * kPanel, n = std::min(kPanel, w.J - j0);
    const __mmask16 k = n == kPanel ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
    const __m512i sum = _mm512_maskz_loadu_epi32(k, w.sum + j0);
    const __m512 sw = _mm512_maskz_loadu_ps(k, w.scale + j0);
    const __m512 bias = e.bias ? _mm512_maskz_loadu_ps(k, e.bias + j0) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) {
      const int64_t m = m0 + r;
      const __m512i corr = _mm512_mullo_epi32(_mm512_set1_epi32(e.zero[m]), sum);
      const __m512 s = _mm512_mul_ps(_mm512_set1_ps(e.scale[m]), sw);
      __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][p], corr)), s);
      if (e.bias) v = _mm512_add_ps(v, bias);
      if (e.add) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, e.add + m * e.ldadd + j0));
      _mm512_mask_storeu_ps(e.c + m * e.ldc + j0, k, v);
    }
  }
}

template <int P>
RNNKIT_VNNI void rows_vnni(int64_t M, const QWeight& w, const Epilogue& e, int64_t jb) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile_vnni<4, P>(w, e, m, jb);
  switch (M - m) {
    case 3: tile_vnni<3, P>(w, e, m, jb); break;
    case 2: tile_vnni<2, P>(w, e, m, jb); break;
    case 1: tile_vnni<1, P>(w, e, m, jb); break;
    default: break;
  }
}

RNNKIT_VNNI void gemm_vnni(int64_t M, const QWeight& w, const Epilogue& e, int64_t jb0,
                           int64_t jb1) {
  int64_t jb = jb0;
  for (; jb + 2 <= jb1; jb += 2) rows_vnni<2>(M, w, e, jb);
  if (jb < jb1) rows_vnni<1>(M, w, e, jb);
}

bool use_vnni() {
  static const bool has = __builtin_cpu_supports("avx512vnni") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  // read per call, so that one process can run (and test) both kernels
  const char* forced = std::getenv("RNNKIT_INT8_KERNEL");
  if (forced && std::string(forced) == "portable") return false;
  return has;
}

// c = deq(q w^T) [+ bias] [+ add]: panels split over the threads when the product is large
// enough to pay for a fork, in pairs (the VNNI kernel's two-panel tile).
void gemm(int64_t M, const QWeight& w, const Epilogue& e) {
  if (M == 0) return;
  const int64_t Jb = (w.J + kPanel - 1) / kPanel;
  const bool vnni = use_vnni();
  auto run = [&](int64_t lo, int64_t hi) {
    const int64_t jb0 = lo * 2, jb1 = std::min(Jb, hi * 2);
    if (vnni) gemm_vnni(M, w, e, jb0, jb1);
    else gemm_portable(M, w, e, jb0, jb1);
  };
  const int64_t pairs = (Jb + 1) / 2;
  const bool big = M * w.J * w.K >= (int64_t(1) << 18);
  if (big && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    at::parallel_for(0, pairs, 1, run);
  } else {
    run(0, pairs);
  }
}

// The left side of a product, quantized: uint8 rows padded to the weight's depth.
struct QRows {
  std::vector<uint8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> zero;
  int64_t ld = 0;

  QRows(int64_t M, int64_t K) : ld(((K + kDepth - 1) / kDepth) * kDepth) {
    q.resize(std::max<int64_t>(M, 1) * ld);
    scale.resize(std::max<int64_t>(M, 1));
    zero.resize(std::max<int64_t>(M, 1));
  }
  void of(const float* a, int64_t M, int64_t K, int64_t lda) {
    quantize_rows(a, M, K, lda, q.data(), ld, scale.data(), zero.data());
  }
  Epilogue into(float* c, int64_t ldc, const float* bias = nullptr, const float* add = nullptr,
                int64_t ldadd = 0) const {
    return {q.data(), ld, scale.data(), zero.data(), bias, add, ldadd, c, ldc};
  }
};

const float* opt_ptr(const std::optional<Tensor>& t) {
  return t && t->defined() ? t->data_ptr<float>() : nullptr;
}

void check_float(const Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == shape,
              "rnnkit int8: ", name, " must be contiguous float32 of shape ", shape, ", got ",
              t.scalar_type(), " ", t.sizes());
}

}  // namespace

// One direction: x [R, H_in] rows in step order's layout (padded time-major or packed),
// h0 [N, H_out], c0 [N, H] (LSTM); returns output rows [R, H_out], h_n and c_n (LSTM; else an
// empty tensor).
std::vector<Tensor> direction_forward(int64_t mode, const Tensor& x, const Tensor& h0,
                                      const std::optional<Tensor>& c0, const Tensor& w_ih,
                                      const Tensor& s_ih, const Tensor& u_ih, const Tensor& w_hh,
                                      const Tensor& s_hh, const Tensor& u_hh,
                                      const std::optional<Tensor>& b_ih,
                                      const std::optional<Tensor>& b_hh,
                                      const std::optional<Tensor>& w_hr,
                                      const std::optional<Tensor>& s_hr,
                                      const std::optional<Tensor>& u_hr,
                                      at::IntArrayRef batch_sizes, bool reverse) {
  const bool lstm = mode == RNNKIT_MODE_LSTM, gru = mode == RNNKIT_MODE_GRU;
  const bool relu = mode == RNNKIT_MODE_RNN_RELU;
  TORCH_CHECK(lstm || gru || mode == RNNKIT_MODE_RNN_TANH || relu, "rnnkit int8: unknown mode ",
              mode);
  const int64_t G = lstm ? 4 : gru ? 3 : 1;
  TORCH_CHECK(x.dim() == 2 && h0.dim() == 2, "rnnkit int8: x and h0 must be 2-D rows");
  const int64_t R = x.size(0), H_in = x.size(1), N = h0.size(0), H_out = h0.size(1);
  const int64_t GH = s_hh.numel(), H = GH / G;
  check_float(x, "x", {R, H_in});
  check_float(h0, "h0", {N, H_out});
  const QWeight wi = qweight(w_ih, s_ih, u_ih, H_in, "weight_ih");
  const QWeight wh = qweight(w_hh, s_hh, u_hh, H_out, "weight_hh");
  TORCH_CHECK(GH == G * H && wi.J == GH, "rnnkit int8: weight_ih and weight_hh must have ",
              G, " * hidden_size outputs");
  const bool proj = w_hr && w_hr->defined();
  TORCH_CHECK(proj == (H_out != H), "rnnkit int8: weight_hr must be given exactly when h0's ",
              "width differs from hidden_size");
  TORCH_CHECK(!proj || lstm, "rnnkit int8: weight_hr is LSTM's");
  const QWeight wr = proj ? qweight(*w_hr, *s_hr, *u_hr, H, "weight_hr") : QWeight{};
  TORCH_CHECK(!proj || wr.J == H_out, "rnnkit int8: weight_hr must have h0's width of outputs");
  if (lstm) {
    TORCH_CHECK(c0 && c0->defined(), "rnnkit int8: LSTM needs c0");
    check_float(*c0, "c0", {N, H});
  }
  const float* bi = opt_ptr(b_ih);
  const float* bh = opt_ptr(b_hh);
  if (bi) check_float(*b_ih, "bias_ih", {GH});
  if (bh) check_float(*b_hh, "bias_hh", {GH});

  init_threads();
  const Plan p = make_plan(step_batches(batch_sizes, R, N), reverse);
  auto opts = x.options();
  Tensor out = at::empty({R, H_out}, opts);
  Tensor h = h0.clone();
  Tensor c = lstm ? c0->clone() : at::empty({0}, opts);
  float* p_out = out.data_ptr<float>();
  float* p_h = h.data_ptr<float>();
  float* p_c = lstm ? c.data_ptr<float>() : nullptr;

  // the input projection of every step at once: [R, G*H] = x W_ih^T + b_ih
  Tensor gx = at::empty({R, GH}, opts);
  float* p_gx = gx.data_ptr<float>();
  {
    QRows qx(R, H_in);
    qx.of(x.data_ptr<float>(), R, H_in, H_in);
    gemm(R, wi, qx.into(p_gx, GH, bi));
  }
  QRows qh(N, H_out), qc(proj ? N : 0, H);
  std::vector<float> gates(N * GH), cell(proj ? N * H : 0);
  using V = Vec<float>;
  const V one(1.f), zero(0.f);

  for (int64_t s = 0; s < p.steps(); ++s) {
    const int64_t b = p.bs[s], o = p.off[s];
    const float* gx_s = p_gx + o * GH;
    qh.of(p_h, b, H_out, H_out);
    // LSTM and Elman: gates = gx + (h W_hh^T + b_hh); GRU keeps h W_hh^T + b_hh apart
    gemm(b, wh, gru ? qh.into(gates.data(), GH, bh) : qh.into(gates.data(), GH, bh, gx_s, GH));
    for (int64_t r = 0; r < b; ++r) {
      float* g = gates.data() + r * GH;
      float* hr = p_h + r * H_out;
      if (lstm) {
        float* cr = p_c + r * H;
        float* hc = proj ? cell.data() + r * H : hr;
        for_vec<float>(0, H, [&](int64_t j, int64_t n) {
          const V i = vsigmoid(load(g + j, n)), f = vsigmoid(load(g + H + j, n));
          const V gg = vtanh(load(g + 2 * H + j, n)), og = vsigmoid(load(g + 3 * H + j, n));
          const V cy = f * load(cr + j, n) + i * gg;
          store(cr + j, cy, n);
          store(hc + j, og * vtanh(cy), n);
        });
      } else if (gru) {
        const float* gxr = gx_s + r * GH;
        for_vec<float>(0, H, [&](int64_t j, int64_t n) {
          const V rg = vsigmoid(load(gxr + j, n) + load(g + j, n));
          const V z = vsigmoid(load(gxr + H + j, n) + load(g + H + j, n));
          const V ng = vtanh(load(gxr + 2 * H + j, n) + rg * load(g + 2 * H + j, n));
          store(hr + j, ng + z * (load(hr + j, n) - ng), n);
        });
      } else {
        for_vec<float>(0, H, [&](int64_t j, int64_t n) {
          const V v = load(g + j, n);
          store(hr + j, relu ? at::vec::maximum(v, zero) : vtanh(v), n);
        });
      }
    }
    if (proj) {
      qc.of(cell.data(), b, H, H);
      gemm(b, wr, qc.into(p_h, H_out));
    }
    std::memcpy(p_out + o * H_out, p_h, b * H_out * sizeof(float));
  }
  return {out, h, c};
}

// Which product kernel runs (for reports and tests): "vnni" or "portable".
std::string kernel_name() { return use_vnni() ? "vnni" : "portable"; }

}  // namespace rnnkit::int8

TORCH_LIBRARY(rnnkit_int8, m) {
  m.def(
      "direction_forward(int mode, Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor s_ih, "
      "Tensor u_ih, Tensor w_hh, Tensor s_hh, Tensor u_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? w_hr, Tensor? s_hr, Tensor? u_hr, int[] batch_sizes, bool reverse) -> Tensor[]",
      &rnnkit::int8::direction_forward);
}

extern "C" const char* rnnkit_int8_kernel() {
  static thread_local std::string name;
  name = rnnkit::int8::kernel_name();
  return name.c_str();
}
