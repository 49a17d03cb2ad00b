// CPU implementation of the fused lm_head + loss ops (opdx::linear_token_logprobs_*, opdx::linear_generalized_jsd_*).
//
// The [N, V] logits are never formed. The vocabulary is swept in tiles of `tile` rows of the weight; each tile's
// logits h·W_tileᵀ (+ bias) are one ATen GEMM into a reused fp32 (fp64 for fp64 inputs) [N, tile] buffer, followed by a
// vectorized per-row epilogue built on the shared numerics (SoftmaxStats, jsd_element, ...):
//   token logprobs  forward : sweep 1  row lse (online merge over tiles) and the target logit
//                   backward: sweep 2  recompute the tile, G = g·(1[v=y] − p)/T in place,
//                                      grad_h += G·W_tile, grad_W_tile = Gᵀ·h, grad_b_tile = Σ_rows G
//   generalized JSD forward : sweep 1  lse_s, lse_t;  sweep 2  recompute both tiles, row loss and row total
//                   backward: sweep 3  recompute both tiles, G = g·∂L/∂x_s in place, the same three GEMMs
// Extra memory: one (token logprobs) or two (JSD) [N, tile] buffers, an upcast copy of hidden for bf16/fp16 inputs
// ([N, d]) and of one weight tile ([tile, d]), grad_h in fp32 ([N, d]) and O(N) row statistics; nothing scales with V
// except the gradient of the weight itself.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "opdx/linear_common.h"
#include "opdx/torch_utils.h"
#include "row_kernels.h"

namespace opdx {
namespace cpu {
namespace {

using linear::check_jsd_bwd_inputs;
using linear::check_linear_inputs;
using linear::check_row_vectors;
using linear::check_targets;
using linear::kAnchor;
using linear::kLseS;
using linear::kLseT;
using linear::kNumJsdStats;
using linear::kTotal;
using linear::choose_tile;
using linear::dispatch_jsd_mode;

// One linear layer viewed tile by tile: upcast hidden once, upcast each weight tile as it is used.
struct TiledLinear {
  at::Tensor h;  // [N, d] in the accumulation dtype (a view of hidden when it already is)
  at::Tensor weight;
  c10::optional<at::Tensor> bias;
  at::ScalarType acc;

  TiledLinear(const at::Tensor& hidden, const at::Tensor& w, const c10::optional<at::Tensor>& b)
      : weight(w), bias(b), acc(acc_dtype_for(hidden)) {
    h = hidden.to(acc).contiguous();
  }

  at::Tensor weight_tile(int64_t v0, int64_t n) const { return weight.narrow(0, v0, n).to(acc); }

  // logits[:, v0:v0+n] = h·W_tileᵀ (+ b_tile) into `out` ([N, n], contiguous). Returns the upcast weight tile.
  at::Tensor logits(int64_t v0, int64_t n, at::Tensor& out) const {
    at::Tensor wt = weight_tile(v0, n);
    if (bias.has_value()) {
      at::addmm_out(out, bias->narrow(0, v0, n).to(acc), h, wt.t());
    } else {
      at::mm_out(out, h, wt.t());
    }
    return wt;
  }
};

// The reused [N, tile] buffer, viewed as a contiguous [N, n] matrix for a (possibly shorter, last) tile.
at::Tensor tile_view(const at::Tensor& buf, int64_t N, int64_t n) { return buf.narrow(0, 0, N * n).view({N, n}); }

// Gradient accumulation for one linear layer: grad_h (acc dtype), grad_W / grad_b (weight dtype) tile by tile.
struct LinearGrads {
  at::Tensor grad_h;       // [N, d] acc dtype
  at::Tensor grad_weight;  // [V_full, d] weight dtype; rows >= V stay zero
  at::Tensor grad_bias;    // [V_full] weight dtype or [0]
  at::Tensor grad_bias_acc;

  LinearGrads(const TiledLinear& lin, int64_t V, bool with_bias, bool weight_grad) {
    const int64_t N = lin.h.size(0);
    const int64_t d = lin.h.size(1);
    const int64_t V_full = lin.weight.size(0);
    grad_h = at::zeros({N, d}, lin.h.options());
    // weight_grad = false (frozen lm_head): no grad_W / grad_b and no Gᵀ·h GEMMs.
    grad_weight = !weight_grad ? at::empty({0}, lin.weight.options())
                  : V == V_full ? empty_large({V_full, d}, lin.weight.options())
                                : at::zeros({V_full, d}, lin.weight.options());
    grad_bias = with_bias && weight_grad ? at::zeros({V_full}, lin.weight.options())
                                         : at::empty({0}, lin.weight.options());
  }

  // G: [N, n] gradient w.r.t. the tile's (raw) logits; wt: the upcast weight tile [n, d].
  void add_tile(const TiledLinear& lin, const at::Tensor& G, const at::Tensor& wt, int64_t v0, int64_t n) {
    grad_h.addmm_(G, wt);
    if (grad_weight.numel() == 0) return;
    at::Tensor gw = grad_weight.narrow(0, v0, n);
    if (gw.scalar_type() == lin.acc) {
      at::mm_out(gw, G.t(), lin.h);
    } else {
      gw.copy_(at::mm(G.t(), lin.h));
    }
    if (grad_bias.numel() > 0) grad_bias.narrow(0, v0, n).copy_(G.sum(0));
  }

  at::Tensor hidden_grad(const at::Tensor& hidden) const { return grad_h.to(hidden.scalar_type()); }
};

inline int64_t epilogue_grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

// ------------------------------------------------------------------------------------------------------------------
// linear_token_logprobs
// ------------------------------------------------------------------------------------------------------------------

template <typename acc_t>
void tlp_fwd_impl(const TiledLinear& lin, const int64_t* tgt, int64_t V, int64_t tile, acc_t invT,
                  int64_t ignore_index, acc_t* logp, acc_t* lse) {
  const int64_t N = lin.h.size(0);
  std::vector<SoftmaxStats<acc_t>> stats(N, SoftmaxStats<acc_t>::empty());
  std::vector<acc_t> target_x(N, acc_t(0));
  at::Tensor buf = at::empty({N * tile}, lin.h.options());
  for (int64_t v0 = 0; v0 < V; v0 += tile) {
    const int64_t n = std::min(tile, V - v0);
    at::Tensor L = tile_view(buf, N, n);
    lin.logits(v0, n, L);
    acc_t* base = L.data_ptr<acc_t>();
    at::parallel_for(0, N, epilogue_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t y = tgt[r];
        if (y == ignore_index) continue;
        acc_t* __restrict__ x = base + r * n;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) x[i] *= invT;
        stats[r].merge(chunk_stats(x, n, false));
        if (y >= v0 && y < v0 + n) target_x[r] = x[y - v0];
      }
    });
  }
  for (int64_t r = 0; r < N; ++r) {
    if (tgt[r] == ignore_index) {
      logp[r] = 0;
      lse[r] = 0;
    } else {
      lse[r] = stats[r].logsumexp();
      logp[r] = target_x[r] - lse[r];
    }
  }
}

std::tuple<at::Tensor, at::Tensor> linear_token_logprobs_fwd_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                                 const c10::optional<at::Tensor>& bias,
                                                                 const at::Tensor& targets, double inv_temperature,
                                                                 int64_t ignore_index, int64_t tile) {
  const int64_t V = weight.size(0);
  check_linear_inputs("opdx::linear_token_logprobs_fwd", hidden, weight, bias, V);
  check_targets("opdx::linear_token_logprobs_fwd", targets, hidden.size(0));
  const int64_t N = hidden.size(0);
  const TiledLinear lin(hidden, weight, bias);
  at::Tensor logp = at::empty({N}, lin.h.options());
  at::Tensor lse = at::empty({N}, lin.h.options());
  if (N == 0) return {logp, lse};
  const int64_t t = choose_tile(tile, N, V);
  AT_DISPATCH_FLOATING_TYPES(lin.acc, "linear_token_logprobs_fwd_cpu", [&] {
    tlp_fwd_impl<scalar_t>(lin, targets.const_data_ptr<int64_t>(), V, t, static_cast<scalar_t>(inv_temperature),
                           ignore_index, logp.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>());
  });
  return {logp, lse};
}

template <typename acc_t>
void tlp_bwd_impl(const TiledLinear& lin, LinearGrads& grads, const int64_t* tgt, const acc_t* g, const acc_t* lse,
                  int64_t V, int64_t tile, acc_t invT, int64_t ignore_index) {
  const int64_t N = lin.h.size(0);
  at::Tensor buf = at::empty({N * tile}, lin.h.options());
  for (int64_t v0 = 0; v0 < V; v0 += tile) {
    const int64_t n = std::min(tile, V - v0);
    at::Tensor L = tile_view(buf, N, n);
    at::Tensor wt = lin.logits(v0, n, L);
    acc_t* base = L.data_ptr<acc_t>();
    at::parallel_for(0, N, epilogue_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        acc_t* __restrict__ x = base + r * n;
        const int64_t y = tgt[r];
        if (y == ignore_index || g[r] == acc_t(0)) {
          std::fill(x, x + n, acc_t(0));
          continue;
        }
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) x[i] *= invT;
        chunk_logprob_grad(x, n, lse[r], g[r], acc_t(0), acc_t(0), invT);
        if (y >= v0 && y < v0 + n) x[y - v0] += g[r] * invT;
      }
    });
    grads.add_tile(lin, L, wt, v0, n);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_bwd_cpu(
    const at::Tensor& grad_logp, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse, double inv_temperature,
    int64_t ignore_index, int64_t tile, bool weight_grad) {
  const int64_t V = weight.size(0);
  check_linear_inputs("opdx::linear_token_logprobs_bwd", hidden, weight, bias, V);
  const int64_t N = hidden.size(0);
  const TiledLinear lin(hidden, weight, bias);
  check_row_vectors("opdx::linear_token_logprobs_bwd", lin.acc, N, grad_logp, lse);
  LinearGrads grads(lin, V, bias.has_value(), weight_grad);
  if (N > 0) {
    const int64_t t = choose_tile(tile, N, V);
    AT_DISPATCH_FLOATING_TYPES(lin.acc, "linear_token_logprobs_bwd_cpu", [&] {
      tlp_bwd_impl<scalar_t>(lin, grads, targets.const_data_ptr<int64_t>(), grad_logp.const_data_ptr<scalar_t>(),
                             lse.const_data_ptr<scalar_t>(), V, t, static_cast<scalar_t>(inv_temperature),
                             ignore_index);
    });
  } else {
    grads.grad_weight.zero_();
  }
  return {grads.hidden_grad(hidden), grads.grad_weight, grads.grad_bias};
}

// ------------------------------------------------------------------------------------------------------------------
// linear_generalized_jsd
// ------------------------------------------------------------------------------------------------------------------

using JsdInputs = linear::JsdInputs<TiledLinear>;

// Sweep 1: lse of both sides.
// Also finds each row's most probable student entry (first maximum) and returns the gradient anchor there (see
// jsd_anchor): the reference point that keeps the row total accurate for peaked rows.
template <int kMode, typename acc_t>
void jsd_lse_sweep(const JsdInputs& in, int64_t tile, acc_t beta, acc_t invT, acc_t* lse_s, acc_t* lse_t,
                   acc_t* anchor) {
  const int64_t N = in.N;
  std::vector<SoftmaxStats<acc_t>> st_s(N, SoftmaxStats<acc_t>::empty());
  std::vector<SoftmaxStats<acc_t>> st_t(N, SoftmaxStats<acc_t>::empty());
  std::vector<acc_t> top_s(N, neg_inf<acc_t>()), top_t(N, acc_t(0));  // raw logits at the student's first maximum
  at::Tensor buf_s = at::empty({N * tile}, in.student.h.options());
  at::Tensor buf_t = at::empty({N * tile}, in.student.h.options());
  for (int64_t v0 = 0; v0 < in.V; v0 += tile) {
    const int64_t n = std::min(tile, in.V - v0);
    at::Tensor Ls = tile_view(buf_s, N, n);
    at::Tensor Lt = tile_view(buf_t, N, n);
    in.student.logits(v0, n, Ls);
    in.teacher.logits(v0, n, Lt);
    acc_t* bs = Ls.data_ptr<acc_t>();
    acc_t* bt = Lt.data_ptr<acc_t>();
    at::parallel_for(0, N, epilogue_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (in.mask != nullptr && !in.mask[r]) continue;
        acc_t* __restrict__ xs = bs + r * n;
        acc_t* __restrict__ xt = bt + r * n;
        if (kMode != kJsdForwardKL) {
          const acc_t m = chunk_max(xs, n);
          if (m > top_s[r]) {
            int64_t i = 0;
            while (i + 1 < n && !(xs[i] == m)) ++i;
            top_s[r] = xs[i];
            top_t[r] = xt[i];
          }
        }
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          xs[i] *= invT;
          xt[i] *= invT;
        }
        st_s[r].merge(chunk_stats(xs, n, false));
        st_t[r].merge(chunk_stats(xt, n, false));
      }
    });
  }
  for (int64_t r = 0; r < N; ++r) {
    const bool on = in.mask == nullptr || in.mask[r];
    lse_s[r] = on ? st_s[r].logsumexp() : acc_t(0);
    lse_t[r] = on ? st_t[r].logsumexp() : acc_t(0);
    anchor[r] = acc_t(0);
    if (on && kMode != kJsdForwardKL && top_s[r] > neg_inf<acc_t>()) {
      const acc_t xs = top_s[r], xt = top_t[r];
      anchor[r] = jsd_anchor<kMode>(beta, xs * invT - lse_s[r], xt * invT - lse_t[r],
                                    jsd_delta(xs, xt, invT, lse_t[r] - lse_s[r]));
    }
  }
}

// Sweep 2: row loss and the row total the gradient needs (sums in double, as in generalized_jsd).
template <int kMode, typename acc_t>
void jsd_loss_sweep(const JsdInputs& in, int64_t tile, acc_t beta, acc_t invT, const acc_t* lse_s,
                    const acc_t* lse_t, const acc_t* anchor, acc_t* loss_out, acc_t* total_out) {
  const int64_t N = in.N;
  std::vector<double> loss(N, 0.0), total(N, 0.0);
  at::Tensor buf_s = at::empty({N * tile}, in.student.h.options());
  at::Tensor buf_t = at::empty({N * tile}, in.student.h.options());
  for (int64_t v0 = 0; v0 < in.V; v0 += tile) {
    const int64_t n = std::min(tile, in.V - v0);
    at::Tensor Ls = tile_view(buf_s, N, n);
    at::Tensor Lt = tile_view(buf_t, N, n);
    in.student.logits(v0, n, Ls);
    in.teacher.logits(v0, n, Lt);
    const acc_t* bs = Ls.data_ptr<acc_t>();
    const acc_t* bt = Lt.data_ptr<acc_t>();
    at::parallel_for(0, N, epilogue_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (in.mask != nullptr && !in.mask[r]) continue;
        const acc_t* __restrict__ sp = bs + r * n;
        const acc_t* __restrict__ tp = bt + r * n;
        const acc_t ls0 = lse_s[r], lt0 = lse_t[r], c = lt0 - ls0, a = anchor[r];
        for (int64_t start = 0; start < n; start += kChunk) {
          const int64_t m = std::min(kChunk, n - start);
          double l_chunk = 0, t_chunk = 0;
#pragma omp simd reduction(+ : l_chunk, t_chunk)
          for (int64_t i = start; i < start + m; ++i) {
            const acc_t xs = sp[i];
            const acc_t xt = tp[i];
            acc_t l, k;
            jsd_element<kMode>(beta, xs * invT - ls0, xt * invT - lt0, jsd_delta(xs, xt, invT, c), a, l, k);
            l_chunk += l;
            t_chunk += k;
          }
          loss[r] += l_chunk;
          total[r] += t_chunk;
        }
      }
    });
  }
  for (int64_t r = 0; r < N; ++r) {
    loss_out[r] = static_cast<acc_t>(loss[r]);
    total_out[r] = static_cast<acc_t>(total[r]);
  }
}

// Sweep 3 (backward): G = g·∂L/∂(x_s) tile by tile, then the gradient GEMMs of the student's linear layer.
template <int kMode, typename acc_t>
void jsd_grad_sweep(const JsdInputs& in, LinearGrads& grads, int64_t tile, acc_t beta, acc_t invT, const acc_t* g,
                    const acc_t* lse_s, const acc_t* lse_t, const acc_t* anchor, const acc_t* total) {
  const int64_t N = in.N;
  at::Tensor buf_s = at::empty({N * tile}, in.student.h.options());
  at::Tensor buf_t = at::empty({N * tile}, in.student.h.options());
  for (int64_t v0 = 0; v0 < in.V; v0 += tile) {
    const int64_t n = std::min(tile, in.V - v0);
    at::Tensor Ls = tile_view(buf_s, N, n);
    at::Tensor Lt = tile_view(buf_t, N, n);
    at::Tensor wt = in.student.logits(v0, n, Ls);
    in.teacher.logits(v0, n, Lt);
    acc_t* bs = Ls.data_ptr<acc_t>();
    const acc_t* bt = Lt.data_ptr<acc_t>();
    at::parallel_for(0, N, epilogue_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        acc_t* __restrict__ sp = bs + r * n;
        const acc_t* __restrict__ tp = bt + r * n;
        if ((in.mask != nullptr && !in.mask[r]) || g[r] == acc_t(0)) {
          std::fill(sp, sp + n, acc_t(0));
          continue;
        }
        const acc_t ls0 = lse_s[r], lt0 = lse_t[r], c = lt0 - ls0, a = anchor[r], row_total = total[r];
        const acc_t scale = g[r] * invT;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const acc_t xs = sp[i];
          const acc_t xt = tp[i];
          sp[i] = scale * jsd_element_grad<kMode>(beta, xs * invT - ls0, xt * invT - lt0,
                                                  jsd_delta(xs, xt, invT, c), a, row_total);
        }
      }
    });
    grads.add_tile(in.student, Ls, wt, v0, n);
  }
}


std::tuple<at::Tensor, at::Tensor> linear_generalized_jsd_fwd_cpu(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const c10::optional<at::Tensor>& student_bias,
    const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight, const c10::optional<at::Tensor>& teacher_bias,
    const c10::optional<at::Tensor>& mask, int64_t vocab_size, double beta, double inv_temperature, int64_t tile) {
  const char* op = "opdx::linear_generalized_jsd_fwd";
  linear::check_jsd_inputs(op, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                           teacher_bias, mask, vocab_size, beta, /*same_dtype=*/false);
  const JsdInputs in(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask,
                     vocab_size);
  const auto opts = in.student.h.options();
  at::Tensor loss = at::zeros({in.N}, opts);
  at::Tensor stats = at::zeros({kNumJsdStats, in.N}, opts);
  if (in.N == 0) return {loss, stats};
  const int64_t t = choose_tile(tile, in.N, in.V);
  AT_DISPATCH_FLOATING_TYPES(in.student.acc, "linear_generalized_jsd_fwd_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t invT = static_cast<acc_t>(inv_temperature);
    const acc_t b = static_cast<acc_t>(beta);
    acc_t* st = stats.mutable_data_ptr<acc_t>();
    const int64_t N = in.N;
    dispatch_jsd_mode(beta, [&](auto mode) {
      constexpr int kMode = decltype(mode)::value;
      jsd_lse_sweep<kMode, acc_t>(in, t, b, invT, st + kLseS * N, st + kLseT * N, st + kAnchor * N);
      jsd_loss_sweep<kMode, acc_t>(in, t, b, invT, st + kLseS * N, st + kLseT * N, st + kAnchor * N,
                                   loss.mutable_data_ptr<acc_t>(), st + kTotal * N);
    });
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_generalized_jsd_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& student_hidden, const at::Tensor& student_weight,
    const c10::optional<at::Tensor>& student_bias, const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight,
    const c10::optional<at::Tensor>& teacher_bias, const c10::optional<at::Tensor>& mask, const at::Tensor& stats,
    int64_t vocab_size, double beta, double inv_temperature, int64_t tile, bool weight_grad) {
  const char* op = "opdx::linear_generalized_jsd_bwd";
  linear::check_jsd_inputs(op, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                           teacher_bias, mask, vocab_size, beta, /*same_dtype=*/false);
  const JsdInputs in(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask,
                     vocab_size);
  check_jsd_bwd_inputs(op, in.student.acc, in.N, grad_loss, stats);
  LinearGrads grads(in.student, in.V, student_bias.has_value(), weight_grad);
  if (in.N == 0) {
    grads.grad_weight.zero_();  // (empty when !weight_grad)
  } else {
    const int64_t t = choose_tile(tile, in.N, in.V);
    AT_DISPATCH_FLOATING_TYPES(in.student.acc, "linear_generalized_jsd_bwd_cpu", [&] {
      using acc_t = scalar_t;
      const acc_t* st = stats.const_data_ptr<acc_t>();
      const int64_t N = in.N;
      dispatch_jsd_mode(beta, [&](auto mode) {
        jsd_grad_sweep<decltype(mode)::value, acc_t>(in, grads, t, static_cast<acc_t>(beta),
                                                     static_cast<acc_t>(inv_temperature),
                                                     grad_loss.const_data_ptr<acc_t>(), st + kLseS * N,
                                                     st + kLseT * N, st + kAnchor * N, st + kTotal * N);
      });
    });
  }
  return {grads.hidden_grad(student_hidden), grads.grad_weight, grads.grad_bias};
}

}  // namespace
}  // namespace cpu
}  // namespace opdx

TORCH_LIBRARY_IMPL(opdx, CPU, m) {
  m.impl("linear_token_logprobs_fwd", &opdx::cpu::linear_token_logprobs_fwd_cpu);
  m.impl("linear_token_logprobs_bwd", &opdx::cpu::linear_token_logprobs_bwd_cpu);
  m.impl("linear_generalized_jsd_fwd", &opdx::cpu::linear_generalized_jsd_fwd_cpu);
  m.impl("linear_generalized_jsd_bwd", &opdx::cpu::linear_generalized_jsd_bwd_cpu);
}
