// The argument checks of the ops' entry points (layer.cpp, lstm_variant.cpp): one function per
// op and direction of the pass (check_layer_args, check_layer_grads, check_variant_args,
// check_variant_grads) over the helpers of one tensor. The ops are reachable from traces and
// deserialized graphs as well as from the Python callers, so every tensor an op reads is
// checked before a kernel touches its memory: on the CPU, of the op's one dtype (float32 or
// float64), of the sizes that the other arguments imply; and the batch sizes (step_batches in
// kernels.h). A failed check raises a RuntimeError that names the argument, what was expected
// and what came.
#pragma once

#include "kernels.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <vector>

namespace rnnkit {

using at::Tensor;

// The dtype of an op's every tensor: that of its first, which must be float32 or float64.
inline c10::ScalarType float_dtype(const std::string& name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), "rnnkit fused engine: ", name, " is undefined");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "rnnkit fused engine: float32 or float64 only, got ", name, " of dtype ",
              t.scalar_type());
  return t.scalar_type();
}

// A tensor that is there, on the CPU, of `dtype`: the checks that come before its sizes.
inline void check_placed(const std::string& name, const at::Tensor& t, c10::ScalarType dtype) {
  TORCH_CHECK(t.defined(), "rnnkit fused engine: ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "rnnkit fused engine: ", name,
              " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "rnnkit fused engine: ", name, " must have dtype ", dtype,
              " (the op's), got ", t.scalar_type());
}

// The same, and `dim` dimensions, whose sizes the caller then reads.
inline void check_tensor(const std::string& name, const at::Tensor& t, c10::ScalarType dtype,
                         int64_t dim) {
  check_placed(name, t, dtype);
  TORCH_CHECK(t.dim() == dim, "rnnkit fused engine: ", name, " must be ", dim, "-D, got ",
              t.dim(), "-D of shape ", t.sizes());
}

// The same, and the sizes; `legend` says what they are in the dimension legend ("[G*H, H_in]").
inline void check_tensor(const std::string& name, const at::Tensor& t, c10::ScalarType dtype,
                         c10::IntArrayRef sizes, const char* legend) {
  check_placed(name, t, dtype);
  TORCH_CHECK(t.sizes() == sizes, "rnnkit fused engine: ", name, " must have shape ", sizes, " (",
              legend, "), got ", t.sizes());
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// An optional tensor made contiguous, or none.
inline std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return present(t) ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// An optional tensor: checked as above when given.
inline void check_optional(const std::string& name, const std::optional<at::Tensor>& t,
                           c10::ScalarType dtype, c10::IntArrayRef sizes, const char* legend) {
  if (present(t)) check_tensor(name, *t, dtype, sizes, legend);
}

// The codes and gate blocks of rnnkit/modes.py's table, which build.py passes as macros.
enum Mode : int64_t {
  LSTM = RNNKIT_MODE_LSTM,
  GRU = RNNKIT_MODE_GRU,
  RNN_TANH = RNNKIT_MODE_RNN_TANH,
  RNN_RELU = RNNKIT_MODE_RNN_RELU
};

inline int64_t gate_blocks(int64_t mode) {
  return mode == LSTM ? RNNKIT_GATES_LSTM : mode == GRU ? RNNKIT_GATES_GRU : RNNKIT_GATES_RNN_TANH;
}

// The sizes of one layer call, read from its checked arguments (check_layer_args).
struct LayerShape {
  int64_t D, N, R, H_in, H, H_out, G;
  bool proj;
  c10::ScalarType dtype;
  c10::ScalarType wdtype;            // the weights': dtype, or bfloat16 (a bfloat16 layer)
  std::vector<int64_t> batch_sizes;  // of every step (step_batches)
};

inline std::string of_direction(const char* name, int64_t d) {
  return std::string(name) + " of direction " + std::to_string(d);
}

// Everything a layer's forward reads: x [R, H_in], h0 [D, N, H_out], c0 [D, N, H] (LSTM
// only), per direction w_ih [G*H, H_in], w_hh [G*H, H_out], b_ih and b_hh [G*H] (has_bias),
// w_hr [H_out, H] (LSTM with projections), all of x's dtype on the CPU (`bf16_weights`: or
// all bfloat16 where x is float32); and the batch sizes.
inline LayerShape check_layer_args(int64_t mode, const Tensor& x, const Tensor& h0,
                                   const std::optional<Tensor>& c0, at::TensorList weights,
                                   at::IntArrayRef batch_sizes, bool has_bias,
                                   bool bf16_weights = false) {
  TORCH_CHECK(mode == LSTM || mode == GRU || mode == RNN_TANH || mode == RNN_RELU,
              "rnnkit fused engine: mode must be one of LSTM = ", LSTM, ", GRU = ", GRU,
              ", RNN_TANH = ", RNN_TANH, ", RNN_RELU = ", RNN_RELU, ", got ", mode);
  LayerShape s{};
  s.dtype = float_dtype("x", x);
  check_tensor("x", x, s.dtype, 2);
  check_tensor("h0", h0, s.dtype, 3);
  s.R = x.size(0);
  s.H_in = x.size(1);
  s.D = h0.size(0);
  s.N = h0.size(1);
  s.H_out = h0.size(2);
  TORCH_CHECK(s.D == 1 || s.D == 2, "rnnkit fused engine: h0 must be [D, N, H_out] with D = 1 ",
              "or 2 directions, got shape ", h0.sizes());
  const int64_t base = has_bias ? 4 : 2, n = static_cast<int64_t>(weights.size());
  s.proj = mode == LSTM && n == (base + 1) * s.D;
  TORCH_CHECK(n == base * s.D || s.proj, "rnnkit fused engine: expected ", base * s.D,
              mode == LSTM ? " (or with w_hr " + std::to_string((base + 1) * s.D) + ")" : "",
              " weights for ", s.D, " direction(s) ", has_bias ? "with" : "without",
              " biases, got ", n);
  s.G = gate_blocks(mode);
  s.wdtype = bf16_weights && s.dtype == at::kFloat && weights[1].scalar_type() == at::kBFloat16
                 ? at::kBFloat16
                 : s.dtype;
  check_tensor("w_hh of direction 0", weights[1], s.wdtype, 2);
  const int64_t GH = weights[1].size(0);
  TORCH_CHECK(GH > 0 && GH % s.G == 0, "rnnkit fused engine: w_hh of direction 0 must have G*H ",
              "rows (G = ", s.G, " gate blocks), got shape ", weights[1].sizes());
  s.H = GH / s.G;
  TORCH_CHECK(s.proj || s.H_out == s.H, "rnnkit fused engine: h0's H_out (", s.H_out,
              ") must equal the hidden size H = ", s.H, " without w_hr");
  const int64_t per_dir = n / s.D;
  for (int64_t d = 0; d < s.D; ++d) {
    const at::TensorList w = weights.slice(d * per_dir, per_dir);
    check_tensor(of_direction("w_ih", d), w[0], s.wdtype, {GH, s.H_in}, "[G*H, H_in], H_in of x");
    check_tensor(of_direction("w_hh", d), w[1], s.wdtype, {GH, s.H_out}, "[G*H, H_out]");
    if (has_bias) {
      check_tensor(of_direction("b_ih", d), w[2], s.wdtype, {GH}, "[G*H]");
      check_tensor(of_direction("b_hh", d), w[3], s.wdtype, {GH}, "[G*H]");
    }
    if (s.proj) {
      check_tensor(of_direction("w_hr", d), w[base], s.wdtype, {s.H_out, s.H}, "[H_out, H]");
    }
  }
  if (mode == LSTM) {
    TORCH_CHECK(present(c0), "rnnkit fused engine: an LSTM layer needs c0");
    check_tensor("c0", *c0, s.dtype, {s.D, s.N, s.H}, "[D, N, H]");
  } else {
    TORCH_CHECK(!present(c0), "rnnkit fused engine: c0 is for LSTM only, got one for mode ", mode);
  }
  s.batch_sizes = step_batches(batch_sizes, s.R, s.N);
  return s;
}

// Restart codes (rnnkit.resets), when given: int8 of `sizes` (`legend`), R = the last size
// rows per direction, each code 0 (carry), 1 (zeros) or 2 (the initial state).
inline void check_restart_codes(const std::optional<Tensor>& restart, c10::IntArrayRef sizes,
                                const char* legend) {
  if (!present(restart)) return;
  check_tensor("restart", *restart, at::kChar, sizes, legend);
  const Tensor codes = restart->contiguous();
  const int8_t* c = codes.data_ptr<int8_t>();
  const int64_t R = sizes.back();
  for (int64_t i = 0, n = codes.numel(); i < n; ++i) {
    if (c[i] >= 0 && c[i] <= 2) continue;
    const std::string direction =
        sizes.size() > 1 ? " of direction " + std::to_string(i / R) : std::string();
    TORCH_CHECK(false, "rnnkit fused engine: restart codes must be 0, 1 or 2, got ",
                static_cast<int>(c[i]), " at row ", i % R, direction);
  }
}

// The restart codes of a layer's directions, when given: int8 [D, R].
inline void check_restart(const LayerShape& s, const std::optional<Tensor>& restart) {
  check_restart_codes(restart, {s.D, s.R}, "[D, R]");
}

// Direction d's Restart (kernels.h): rows [d*R, (d+1)*R) of the checked, contiguous codes
// `restart`, over `zeros`; none without codes.
template <typename T>
Restart<T> direction_restart(const std::optional<Tensor>& restart, int64_t d, int64_t R,
                             const std::vector<T>& zeros) {
  if (!present(restart)) return {};
  return {restart->data_ptr<int8_t>() + d * R, zeros.data()};
}

// What a layer's backward reads beyond its forward's arguments: the gradients of the outputs
// and the forward's output and saved buffers, shaped as layer_forward returned them.
inline void check_layer_grads(int64_t mode, const LayerShape& s, const Tensor& grad_out,
                              const Tensor& grad_hn, const std::optional<Tensor>& grad_cn,
                              const Tensor& out, at::TensorList saved) {
  check_tensor("grad_out", grad_out, s.dtype, {s.R, s.D * s.H_out}, "[R, D*H_out]");
  check_tensor("grad_hn", grad_hn, s.dtype, {s.D, s.N, s.H_out}, "[D, N, H_out]");
  if (mode == LSTM) {
    TORCH_CHECK(present(grad_cn), "rnnkit fused engine: an LSTM layer's backward needs grad_cn");
    check_tensor("grad_cn", *grad_cn, s.dtype, {s.D, s.N, s.H}, "[D, N, H]");
  } else {
    TORCH_CHECK(!present(grad_cn), "rnnkit fused engine: grad_cn is for LSTM only, got one for ",
                "mode ", mode);
  }
  check_tensor("out", out, s.dtype, {s.R, s.D * s.H_out}, "[R, D*H_out]");
  const int64_t per_dir = mode == LSTM ? 3 : mode == GRU ? 1 : 0;
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == per_dir * s.D,
              "rnnkit fused engine: backward needs the ", per_dir * s.D,
              " saved buffers of a training forward, got ", saved.size());
  for (int64_t d = 0; d < s.D; ++d) {
    if (mode == LSTM) {
      check_tensor(of_direction("saved gates", d), saved[3 * d], s.dtype, {s.R, 4 * s.H},
                   "[R, 4*H]");
      check_tensor(of_direction("saved cell states", d), saved[3 * d + 1], s.dtype, {s.R, s.H},
                   "[R, H]");
      check_tensor(of_direction("saved projection inputs", d), saved[3 * d + 2], s.dtype,
                   s.proj ? c10::IntArrayRef{s.R, s.H} : c10::IntArrayRef{0},
                   s.proj ? "[R, H]" : "[0] without w_hr");
    } else if (mode == GRU) {
      check_tensor(of_direction("saved gates", d), saved[d], s.dtype, {s.R, 4 * s.H}, "[R, 4*H]");
    }
  }
}

// The sizes of one variant direction, read from its checked arguments.
struct VariantShape {
  int64_t R, N, H, H_out;
  bool proj, ln, zone_c, proj_clip;
  std::vector<int64_t> batch_sizes;  // of every step (step_batches)
};

// The restart codes of one variant direction, when given: int8 [R].
inline void check_variant_restart(const VariantShape& s, const std::optional<Tensor>& restart) {
  check_restart_codes(restart, {s.R}, "[R]");
}

// Everything a variant direction reads but gx (forward) or out (backward), whose dtype and
// rows R are given: h0 [N, H_out], c0 [N, H], w_hh [4H, H_out], b_hh [4H], w_hr [H_out, H]
// (without it H_out = H), peephole [3H] (i, f, o), layer_norm's ln_hh [4H], ln_c_weight [H]
// and ln_c_bias [H] (the three or none), rec_mask [N, H_out], keep_h [R, H_out], keep_c
// [R, H], the 5 rates and clips, and the batch sizes.
inline VariantShape check_variant_args(c10::ScalarType dtype, int64_t R, const Tensor& h0,
                                       const Tensor& c0, const Tensor& w_hh,
                                       const std::optional<Tensor>& b_hh,
                                       const std::optional<Tensor>& w_hr,
                                       const std::optional<Tensor>& peephole,
                                       const std::optional<Tensor>& ln_hh,
                                       const std::optional<Tensor>& ln_c_weight,
                                       const std::optional<Tensor>& ln_c_bias,
                                       const std::optional<Tensor>& rec_mask,
                                       const std::optional<Tensor>& keep_h,
                                       const std::optional<Tensor>& keep_c,
                                       at::ArrayRef<double> rates,
                                       at::IntArrayRef batch_sizes) {
  VariantShape s{};
  s.R = R;
  check_tensor("h0", h0, dtype, 2);
  check_tensor("c0", c0, dtype, 2);
  s.N = h0.size(0);
  s.H_out = h0.size(1);
  s.H = c0.size(1);
  const int64_t N = s.N, H = s.H, H_out = s.H_out;
  TORCH_CHECK(H > 0, "rnnkit fused engine: c0 must be [N, H] with H > 0, got shape ", c0.sizes());
  check_tensor("c0", c0, dtype, {N, H}, "[N, H], N of h0");
  check_tensor("w_hh", w_hh, dtype, {4 * H, H_out}, "[4*H, H_out]");
  check_optional("b_hh", b_hh, dtype, {4 * H}, "[4*H]");
  s.proj = present(w_hr);
  check_optional("w_hr", w_hr, dtype, {H_out, H}, "[H_out, H]");
  TORCH_CHECK(s.proj || H_out == H, "rnnkit fused engine: h0's H_out (", H_out,
              ") must equal c0's H = ", H, " without w_hr");
  check_optional("peephole", peephole, dtype, {3 * H}, "[3*H]");
  s.ln = present(ln_hh);
  TORCH_CHECK(present(ln_c_weight) == s.ln && present(ln_c_bias) == s.ln,
              "rnnkit fused engine: layer_norm takes ln_hh, ln_c_weight and ln_c_bias together, ",
              "got ", s.ln ? "ln_hh" : "no ln_hh", present(ln_c_weight) ? ", ln_c_weight" : "",
              present(ln_c_bias) ? ", ln_c_bias" : "");
  check_optional("ln_hh", ln_hh, dtype, {4 * H}, "[4*H]");
  check_optional("ln_c_weight", ln_c_weight, dtype, {H}, "[H]");
  check_optional("ln_c_bias", ln_c_bias, dtype, {H}, "[H]");
  check_optional("rec_mask", rec_mask, dtype, {N, H_out}, "[N, H_out]");
  check_optional("keep_h", keep_h, dtype, {R, H_out}, "[R, H_out]");
  check_optional("keep_c", keep_c, dtype, {R, H}, "[R, H]");
  TORCH_CHECK(rates.size() == 5, "rnnkit fused engine: rates must hold 5 values (zoneout h, ",
              "zoneout c, gate clip, cell clip, projection clip), got ", rates.size());
  s.zone_c = present(keep_c) || rates[1] != 0;
  s.proj_clip = s.proj && rates[4] > 0;
  s.batch_sizes = step_batches(batch_sizes, R, N);
  return s;
}

// What a variant direction's backward reads beyond its forward's arguments: the gradients of
// the outputs and the 7 buffers a training forward saved, shaped as it returned them (empty
// where the variant needs none).
inline void check_variant_grads(c10::ScalarType dtype, const VariantShape& s,
                                const Tensor& grad_out, const Tensor& grad_hn,
                                const Tensor& grad_cn, const Tensor& out, at::TensorList saved) {
  const int64_t R = s.R, H = s.H, H_out = s.H_out;
  check_tensor("out", out, dtype, {R, H_out}, "[R, H_out]");
  check_tensor("grad_out", grad_out, dtype, {R, H_out}, "[R, H_out]");
  check_tensor("grad_hn", grad_hn, dtype, {s.N, H_out}, "[N, H_out]");
  check_tensor("grad_cn", grad_cn, dtype, {s.N, H}, "[N, H]");
  TORCH_CHECK(saved.size() == 7, "rnnkit fused engine: backward needs the 7 saved buffers of a ",
              "training forward, got ", saved.size());
  const std::vector<int64_t> none{0};
  const struct {
    const char* name;
    bool present;
    std::vector<int64_t> sizes;
    const char* legend;
  } expected[7] = {
      {"saved pre-activations", true, {R, 4 * H}, "[R, 4*H]"},
      {"saved cell states", true, {R, H}, "[R, H]"},
      {"saved zoned-out cell states", s.zone_c, {R, H}, "[R, H] with zoneout on c, else [0]"},
      {"saved normalized recurrent part", s.ln, {R, 4 * H}, "[R, 4*H] with layer_norm, else [0]"},
      {"saved row statistics", s.ln, {R, 3}, "[R, 3] with layer_norm, else [0]"},
      {"saved projection inputs", s.proj, {R, H}, "[R, H] with w_hr, else [0]"},
      {"saved projections", s.proj_clip, {R, H_out}, "[R, H_out] with a proj clip, else [0]"},
  };
  for (size_t k = 0; k < 7; ++k) {
    const auto& e = expected[k];
    check_tensor(e.name, saved[k], dtype, e.present ? e.sizes : none, e.legend);
  }
}

}  // namespace rnnkit
