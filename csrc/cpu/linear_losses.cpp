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

#include "opdx/torch_utils.h"
#include "row_kernels.h"

namespace opdx {
namespace cpu {
namespace {

constexpr int64_t kTileElems = int64_t(1) << 23;  // 8M elements (32 MiB fp32) per [N, tile] buffer by default

int64_t choose_tile(int64_t requested, int64_t N, int64_t V) {
  int64_t tile = requested;
  if (tile <= 0) {
    tile = kTileElems / std::max<int64_t>(N, 1);
    tile = std::max<int64_t>(512, std::min<int64_t>(16384, tile));
    tile = tile / 128 * 128;
  }
  return std::max<int64_t>(1, std::min(tile, V));
}

at::ScalarType acc_dtype_of(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_linear_inputs(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, int64_t V) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, op, ": hidden must be [N, d] and weight [V, d], got ",
              hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(hidden.size(1) == weight.size(1), op, ": hidden has d = ", hidden.size(1), " but weight has d = ",
              weight.size(1));
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), op, ": hidden and weight dtypes differ (",
              hidden.scalar_type(), " vs ", weight.scalar_type(), ")");
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  TORCH_CHECK(V >= 1 && V <= weight.size(0), op, ": vocab size ", V, " must be in [1, ", weight.size(0), "]");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->is_contiguous(), op,
                ": bias must be a contiguous [V] tensor matching weight.size(0) = ", weight.size(0));
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), op, ": bias dtype must match weight");
  }
}

// One linear layer viewed tile by tile: upcast hidden once, upcast each weight tile as it is used.
struct TiledLinear {
  at::Tensor h;  // [N, d] in the accumulation dtype (a view of hidden when it already is)
  at::Tensor weight;
  c10::optional<at::Tensor> bias;
  at::ScalarType acc;

  TiledLinear(const at::Tensor& hidden, const at::Tensor& w, const c10::optional<at::Tensor>& b)
      : weight(w), bias(b), acc(acc_dtype_of(hidden)) {
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

  LinearGrads(const TiledLinear& lin, int64_t V, bool with_bias) {
    const int64_t N = lin.h.size(0);
    const int64_t d = lin.h.size(1);
    const int64_t V_full = lin.weight.size(0);
    grad_h = at::zeros({N, d}, lin.h.options());
    grad_weight = V == V_full ? empty_large({V_full, d}, lin.weight.options())
                              : at::zeros({V_full, d}, lin.weight.options());
    grad_bias = with_bias ? at::zeros({V_full}, lin.weight.options()) : at::empty({0}, lin.weight.options());
  }

  // G: [N, n] gradient w.r.t. the tile's (raw) logits; wt: the upcast weight tile [n, d].
  void add_tile(const TiledLinear& lin, const at::Tensor& G, const at::Tensor& wt, int64_t v0, int64_t n) {
    grad_h.addmm_(G, wt);
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
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.is_contiguous() &&
                  targets.numel() == hidden.size(0),
              "opdx::linear_token_logprobs_fwd: targets must be a contiguous int64 [N] tensor");
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
    int64_t ignore_index, int64_t tile) {
  const int64_t V = weight.size(0);
  check_linear_inputs("opdx::linear_token_logprobs_bwd", hidden, weight, bias, V);
  const int64_t N = hidden.size(0);
  const TiledLinear lin(hidden, weight, bias);
  TORCH_CHECK(grad_logp.scalar_type() == lin.acc && lse.scalar_type() == lin.acc && grad_logp.is_contiguous() &&
                  lse.is_contiguous() && grad_logp.numel() == N && lse.numel() == N,
              "opdx::linear_token_logprobs_bwd: grad_logp and lse must be contiguous [N] ", lin.acc, " tensors");
  LinearGrads grads(lin, V, bias.has_value());
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

}  // namespace
}  // namespace cpu
}  // namespace opdx

TORCH_LIBRARY_IMPL(opdx, CPU, m) {
  m.impl("linear_token_logprobs_fwd", &opdx::cpu::linear_token_logprobs_fwd_cpu);
  m.impl("linear_token_logprobs_bwd", &opdx::cpu::linear_token_logprobs_bwd_cpu);
}
