// CPU implementation of the top-k renormalized KL building blocks (opdx::topk_*; teacher_topk is in teacher_topk.cpp):
//   topk_gather_dot      z[n,k] = (h_n·W[I_nk] + b[I_nk]) / T, never forming [N, V]
//   topk_gather_dot_bwd  grad_h = Σ_k g_k·W[I_k]/T; grad_W[v] = Σ_{(n,k): I_nk = v} g_nk·h_n/T (deterministic:
//                        stable counting sort of the (n, k) pairs by id, then one segmented reduction per id)
//   topk_gjsd            per-row GJSD(β) over the K (or K+1 with tail) buckets and ∂L/∂z, ∂L/∂lse (topk_math.h)
//   topk_vocab_lse(_bwd) the student's full-vocab logsumexp streamed over W in tiles of rows (device-generic ATen)
#include <algorithm>
#include <vector>

#include "row_kernels.h"
#include "opdx/topk_math.h"
#include "opdx/torch_utils.h"

namespace opdx {
namespace cpu {
namespace {

// Σ_i a[i]·b[i] over upcast inputs (a already in acc_t).
template <typename scalar_t, typename acc_t>
inline acc_t dot_row(const acc_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t d) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * static_cast<acc_t>(b[i]);
  return s;
}

// acc[i] += c·b[i]
template <typename scalar_t, typename acc_t>
inline void axpy_row(acc_t c, const scalar_t* __restrict__ b, int64_t d, acc_t* __restrict__ acc) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) acc[i] += c * static_cast<acc_t>(b[i]);
}

void check_gather_inputs(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& ids) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1), "opdx::", op,
              ": expected hidden [N, d] and weight [V, d], got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(), "opdx::", op, ": hidden and weight must be contiguous");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "opdx::", op, ": hidden and weight dtypes differ");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.size(0) == hidden.size(0) && ids.is_contiguous(),
              "opdx::", op, ": ids must be a contiguous int64 [N, K] tensor");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->is_contiguous() &&
                    bias->scalar_type() == weight.scalar_type(),
                "opdx::", op, ": bias must be a contiguous [V] tensor of weight's dtype");
  }
}

template <typename scalar_t>
void gather_dot_rows(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     const at::Tensor& ids, double inv_temperature, at::Tensor& z) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t N = hidden.size(0), d = hidden.size(1), K = ids.size(1);
  const scalar_t* h = hidden.const_data_ptr<scalar_t>();
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  const scalar_t* b = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
  const int64_t* idx = ids.const_data_ptr<int64_t>();
  acc_t* out = z.mutable_data_ptr<acc_t>();
  const acc_t scale = static_cast<acc_t>(inv_temperature);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K * d, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> hrow(d);
    for (int64_t n = begin; n < end; ++n) {
      load_scaled(h + n * d, d, acc_t(1), hrow.data());
      for (int64_t k = 0; k < K; ++k) {
        const int64_t v = idx[n * K + k];
        acc_t s = dot_row(hrow.data(), w + v * d, d);
        if (b) s += static_cast<acc_t>(b[v]);
        out[n * K + k] = s * scale;
      }
    }
  });
}

at::Tensor topk_gather_dot_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& ids, double inv_temperature,
                               bool deterministic) {
  (void)deterministic;
  check_gather_inputs("topk_gather_dot", hidden, weight, bias, ids);
  const auto acc_dtype = acc_dtype_for(hidden);
  at::Tensor z = at::empty(ids.sizes(), hidden.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "topk_gather_dot_cpu", [&] {
    gather_dot_rows<scalar_t>(hidden, weight, bias, ids, inv_temperature, z);
  });
  return z;
}

template <typename scalar_t, typename out_t>
void gather_dot_bwd_rows(const at::Tensor& grad_z, const at::Tensor& hidden, const at::Tensor& weight,
                         const at::Tensor& ids, double inv_temperature, bool has_bias, at::Tensor& grad_h,
                         at::Tensor& grad_w, at::Tensor& grad_b) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t N = hidden.size(0), d = hidden.size(1), K = ids.size(1), V = weight.size(0);
  const scalar_t* h = hidden.const_data_ptr<scalar_t>();
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  const int64_t* idx = ids.const_data_ptr<int64_t>();
  const acc_t* g = grad_z.const_data_ptr<acc_t>();
  out_t* gh = grad_h.mutable_data_ptr<out_t>();
  out_t* gw = grad_w.mutable_data_ptr<out_t>();
  out_t* gb = has_bias ? grad_b.mutable_data_ptr<out_t>() : nullptr;
  const acc_t scale = static_cast<acc_t>(inv_temperature);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K * d, 1));

  // grad_h: one row at a time, Σ_k g_k·W[I_k] accumulated in acc_t.
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(d);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t k = 0; k < K; ++k) {
        const acc_t c = g[n * K + k];
        if (c != acc_t(0)) axpy_row(c, w + idx[n * K + k] * d, d, acc.data());
      }
      out_t* out = gh + n * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) out[i] = static_cast<out_t>(acc[i] * scale);
    }
  });

  // grad_W / grad_b: stable counting sort of the positions p = n·K + k by id, then each id's segment is reduced in
  // position order by one task (the result does not depend on the thread count).
  const int64_t P = N * K;
  std::vector<int64_t> offsets(V + 1, 0);
  for (int64_t p = 0; p < P; ++p) ++offsets[idx[p] + 1];
  for (int64_t v = 0; v < V; ++v) offsets[v + 1] += offsets[v];
  std::vector<int64_t> order(P);
  {
    std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
    for (int64_t p = 0; p < P; ++p) order[cursor[idx[p]]++] = p;
  }
  std::vector<int64_t> present;  // ids with a non-empty segment, ascending
  present.reserve(std::min(P, V));
  for (int64_t v = 0; v < V; ++v)
    if (offsets[v + 1] > offsets[v]) present.push_back(v);
  const int64_t U = static_cast<int64_t>(present.size());
  const int64_t avg = std::max<int64_t>(1, P / std::max<int64_t>(U, 1));
  const int64_t seg_grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(avg * d, 1));
  at::parallel_for(0, U, seg_grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(d);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t v = present[u];
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t bsum = 0;
      for (int64_t s = offsets[v]; s < offsets[v + 1]; ++s) {
        const int64_t p = order[s];
        const acc_t c = g[p];
        bsum += c;
        if (c != acc_t(0)) axpy_row(c, h + (p / K) * d, d, acc.data());
      }
      out_t* out = gw + v * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) out[i] = static_cast<out_t>(acc[i] * scale);
      if (gb) gb[v] = static_cast<out_t>(bsum * scale);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_gather_dot_bwd_cpu(const at::Tensor& grad_z,
                                                                       const at::Tensor& hidden,
                                                                       const at::Tensor& weight, const at::Tensor& ids,
                                                                       double inv_temperature, bool has_bias,
                                                                       bool deterministic, bool acc_out) {
  (void)deterministic;  // the CPU reduction is always deterministic
  check_gather_inputs("topk_gather_dot_bwd", hidden, weight, c10::nullopt, ids);
  const auto acc_dtype = acc_dtype_for(hidden);
  TORCH_CHECK(grad_z.scalar_type() == acc_dtype && grad_z.is_contiguous() && grad_z.sizes() == ids.sizes(),
              "opdx::topk_gather_dot_bwd: grad_z must be a contiguous ", acc_dtype, " tensor shaped like ids");
  const auto out_opts = acc_out ? weight.options().dtype(acc_dtype) : weight.options();
  at::Tensor grad_h = at::empty(hidden.sizes(), out_opts);
  at::Tensor grad_w = at::zeros(weight.sizes(), out_opts);
  at::Tensor grad_b = has_bias ? at::zeros({weight.size(0)}, out_opts) : at::empty({0}, out_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "topk_gather_dot_bwd_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    if (acc_out)
      gather_dot_bwd_rows<scalar_t, acc_t>(grad_z, hidden, weight, ids, inv_temperature, has_bias, grad_h, grad_w,
                                           grad_b);
    else
      gather_dot_bwd_rows<scalar_t, scalar_t>(grad_z, hidden, weight, ids, inv_temperature, has_bias, grad_h,
                                              grad_w, grad_b);
  });
  return {grad_h, grad_w, grad_b};
}

template <typename acc_t>
void gjsd_rows(const at::Tensor& z, const at::Tensor& t, const c10::optional<at::Tensor>& student_lse, double beta,
               at::Tensor& loss, at::Tensor& grad_z, at::Tensor& grad_lse) {
  const int64_t N = z.size(0), K = z.size(1);
  const acc_t* zp = z.const_data_ptr<acc_t>();
  const acc_t* tp = t.const_data_ptr<acc_t>();
  const bool tail = student_lse.has_value();
  const acc_t* lse = tail ? student_lse->const_data_ptr<acc_t>() : nullptr;
  acc_t* lo = loss.mutable_data_ptr<acc_t>();
  acc_t* gz = grad_z.mutable_data_ptr<acc_t>();
  acc_t* gl = tail ? grad_lse.mutable_data_ptr<acc_t>() : nullptr;
  const acc_t b = static_cast<acc_t>(beta);
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const acc_t* zr = zp + n * K;
      const acc_t* tr = tp + n * K;
      acc_t* gr = gz + n * K;
      lo[n] = topk_gjsd_row<acc_t>(
          K, [&](int64_t k) { return zr[k]; }, [&](int64_t k) { return tr[k]; }, tail, tail ? lse[n] : acc_t(0), b,
          [&](int64_t k, acc_t v) { gr[k] = v; }, tail ? gl + n : nullptr);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_gjsd_cpu(const at::Tensor& z, const at::Tensor& teacher_logprobs,
                                                             const c10::optional<at::Tensor>& student_lse,
                                                             double beta) {
  TORCH_CHECK(z.dim() == 2 && z.is_contiguous() && (z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble),
              "opdx::topk_gjsd: z must be a contiguous float32/float64 [N, K] tensor");
  TORCH_CHECK(teacher_logprobs.sizes() == z.sizes() && teacher_logprobs.scalar_type() == z.scalar_type() &&
                  teacher_logprobs.is_contiguous(),
              "opdx::topk_gjsd: teacher_logprobs must be contiguous and match z's shape and dtype");
  if (student_lse.has_value()) {
    TORCH_CHECK(student_lse->dim() == 1 && student_lse->size(0) == z.size(0) && student_lse->is_contiguous() &&
                    student_lse->scalar_type() == z.scalar_type(),
                "opdx::topk_gjsd: student_lse must be a contiguous [N] tensor of z's dtype");
  }
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "opdx::topk_gjsd: beta must be in [0, 1], got ", beta);
  at::Tensor loss = at::empty({z.size(0)}, z.options());
  at::Tensor grad_z = at::empty(z.sizes(), z.options());
  at::Tensor grad_lse = at::empty({student_lse.has_value() ? z.size(0) : 0}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "topk_gjsd_cpu", [&] {
    gjsd_rows<scalar_t>(z, teacher_logprobs, student_lse, beta, loss, grad_z, grad_lse);
  });
  return {loss, grad_z, grad_lse};
}

// ---------------------------------------------------------------------------------------------------------------
// Full-vocab logsumexp of (h·Wᵀ + b)/T, streamed over W in tiles of `vocab_tile` rows (tile logits via addmm, online
// logsumexp merge), and its backward (tile logits recomputed; p_tile = exp(tile − lse)). Only ATen ops, so the same
// code serves every device (registered as CompositeExplicitAutograd). Memory O(N·tile).
// ---------------------------------------------------------------------------------------------------------------
at::Tensor tile_logits(const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       int64_t v0, int64_t v1, double inv_temperature, at::ScalarType acc) {
  const at::Tensor w = weight.slice(0, v0, v1);
  // CUDA bf16/fp16: the tensor-core GEMM writes fp32 (never bf16-rounded logits); CPU: h is already upcast.
  at::Tensor logits = mm_acc(h, (h.scalar_type() == w.scalar_type() ? w : w.to(acc)).t(), acc);
  if (bias.has_value()) logits.add_(bias->slice(0, v0, v1));
  return logits.mul_(inv_temperature);
}

// On CPU (and for fp32/fp64) the matmuls run in the accumulation dtype; on CUDA bf16/fp16 in the input dtype.
at::Tensor matmul_operand(const at::Tensor& hidden) {
  const auto acc = acc_dtype_for(hidden);
  if (hidden.is_cuda() && (hidden.scalar_type() == at::kBFloat16 || hidden.scalar_type() == at::kHalf)) return hidden;
  return hidden.to(acc);
}

void check_tile(int64_t vocab_tile) {
  TORCH_CHECK(vocab_tile > 0, "opdx::topk_vocab_lse: vocab_tile must be > 0, got ", vocab_tile);
}

at::Tensor topk_vocab_lse_impl(const at::Tensor& hidden, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, double inv_temperature, int64_t vocab_tile) {
  check_tile(vocab_tile);
  const auto acc = acc_dtype_for(hidden);
  const at::Tensor h = matmul_operand(hidden);
  const int64_t V = weight.size(0);
  at::Tensor lse = at::full({hidden.size(0)}, -std::numeric_limits<double>::infinity(), hidden.options().dtype(acc));
  for (int64_t v0 = 0; v0 < V; v0 += vocab_tile) {
    const int64_t v1 = std::min(V, v0 + vocab_tile);
    lse = at::logaddexp(lse, at::logsumexp(tile_logits(h, weight, bias, v0, v1, inv_temperature, acc), {1}));
  }
  return lse;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_vocab_lse_bwd_impl(const at::Tensor& grad_lse,
                                                                       const at::Tensor& hidden,
                                                                       const at::Tensor& weight,
                                                                       const c10::optional<at::Tensor>& bias,
                                                                       const at::Tensor& lse, double inv_temperature,
                                                                       int64_t vocab_tile, bool acc_out) {
  check_tile(vocab_tile);
  const auto acc = acc_dtype_for(hidden);
  const at::Tensor h = matmul_operand(hidden);
  const int64_t V = weight.size(0);
  const at::Tensor g = grad_lse.to(acc).unsqueeze(1);
  const at::Tensor l = lse.to(acc).unsqueeze(1);
  at::Tensor grad_h = at::zeros({hidden.size(0), hidden.size(1)}, hidden.options().dtype(acc));
  const auto out_opts = acc_out ? weight.options().dtype(acc) : weight.options();
  at::Tensor grad_w = at::empty(weight.sizes(), out_opts);
  at::Tensor grad_b = bias.has_value() ? at::empty({V}, out_opts) : at::empty({0}, out_opts);
  for (int64_t v0 = 0; v0 < V; v0 += vocab_tile) {
    const int64_t v1 = std::min(V, v0 + vocab_tile);
    // coefficient of each vocab entry: g_n·p_nv (∂lse/∂x_v = p_v); the 1/T is applied below
    at::Tensor coef = tile_logits(h, weight, bias, v0, v1, inv_temperature, acc).sub_(l).exp_().mul_(g);
    const at::Tensor w = weight.slice(0, v0, v1);
    const at::Tensor c_mm = coef.to(h.scalar_type());
    grad_h.add_(mm_acc(c_mm, h.scalar_type() == w.scalar_type() ? w : w.to(acc), acc));
    grad_w.slice(0, v0, v1).copy_(mm_acc(c_mm.t(), h, acc).mul_(inv_temperature));
    if (bias.has_value()) grad_b.slice(0, v0, v1).copy_(coef.sum(0).mul_(inv_temperature));
  }
  return {grad_h.mul_(inv_temperature).to(acc_out ? acc : hidden.scalar_type()), grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor> topk_logits_tail_impl(const at::Tensor& hidden, const at::Tensor& weight,
                                                         const c10::optional<at::Tensor>& bias, const at::Tensor& ids,
                                                         double inv_temperature, int64_t vocab_tile,
                                                         bool deterministic) {
  static const auto gather = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("opdx::topk_gather_dot", "")
                                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                   const c10::optional<at::Tensor>&, const at::Tensor&, double, bool)>();
  at::Tensor z = gather.call(hidden, weight, bias, ids, inv_temperature, deterministic);
  return {z, topk_vocab_lse_impl(hidden, weight, bias, inv_temperature, vocab_tile)};
}


}  // namespace
}  // namespace cpu
}  // namespace opdx

TORCH_LIBRARY_IMPL(opdx, CPU, m) {
  m.impl("topk_gather_dot", &opdx::cpu::topk_gather_dot_cpu);
  m.impl("topk_gather_dot_bwd", &opdx::cpu::topk_gather_dot_bwd_cpu);
  m.impl("topk_gjsd", &opdx::cpu::topk_gjsd_cpu);
}

// Device-generic (ATen matmul + logsumexp per tile): one implementation for CPU and CUDA.
TORCH_LIBRARY_IMPL(opdx, CompositeExplicitAutograd, m) {
  m.impl("topk_vocab_lse", &opdx::cpu::topk_vocab_lse_impl);
  m.impl("topk_vocab_lse_bwd", &opdx::cpu::topk_vocab_lse_bwd_impl);
  m.impl("topk_logits_tail", &opdx::cpu::topk_logits_tail_impl);
}
