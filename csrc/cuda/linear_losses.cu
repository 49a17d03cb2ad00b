// Torch glue for the CUDA fused lm_head + loss ops; the epilogue kernels are in linear_losses_kernels.cuh.
//
// Each vocabulary tile: one cuBLAS GEMM (at::mm with an fp32 output, so bf16/fp16 inputs run on tensor cores with fp32
// accumulation and no rounding of the logits) into a reused fp32 [N, tile] buffer, then the epilogue kernel. The
// gradient coefficients of a tile are written in the weight dtype (bf16/fp16 tensor-core GEMMs, as Liger and CCE do)
// and feed grad_h += G·W_tile (an fp32-output GEMM, then added) and grad_W_tile = Gᵀ·h.
// Follow-up: a fused sm_90a wgmma kernel with this epilogue in registers, and row-chunked full-vocabulary passes
// (fewer recomputed GEMMs) where memory allows; measure against this version.
#include <limits>

#include "linear_losses_kernels.cuh"
#include "opdx/linear_common.h"
#include "torch_cuda_utils.h"

namespace opdx {
namespace cuda {
namespace {

using linear::check_jsd_bwd_inputs;
using linear::check_linear_inputs;
using linear::check_row_vectors;
using linear::check_targets;
using linear::kNumJsdStats;
using linear::choose_tile;
using linear::dispatch_jsd_mode;

// One lm_head viewed tile by tile. GEMMs read hidden/weight in their own dtype and write fp32 (fp64 for fp64).
struct TiledLinear {
  at::Tensor h;  // [N, d] contiguous, input dtype
  at::Tensor weight;
  c10::optional<at::Tensor> bias;
  at::ScalarType acc;

  TiledLinear(const at::Tensor& hidden, const at::Tensor& w, const c10::optional<at::Tensor>& b)
      : h(hidden.contiguous()), weight(w), bias(b), acc(acc_dtype_for(hidden)) {}

  at::Tensor weight_tile(int64_t v0, int64_t n) const { return weight.narrow(0, v0, n); }

  // out [N, n] (acc dtype) = h·W_tileᵀ; the bias is added by the epilogue kernels.
  void logits(int64_t v0, int64_t n, at::Tensor& out) const {
    mm_acc_out(out, h, weight_tile(v0, n).t());
  }
};

at::Tensor tile_view(const at::Tensor& buf, int64_t N, int64_t n) { return buf.narrow(0, 0, N * n).view({N, n}); }

struct LinearGrads {
  at::Tensor grad_h;  // [N, d] acc dtype
  at::Tensor grad_weight;
  at::Tensor grad_bias;

  LinearGrads(const TiledLinear& lin, int64_t V, bool with_bias, bool weight_grad) {
    const int64_t N = lin.h.size(0), d = lin.h.size(1), V_full = lin.weight.size(0);
    grad_h = at::zeros({N, d}, lin.h.options().dtype(lin.acc));
    grad_weight = !weight_grad ? at::empty({0}, lin.weight.options())
                  : V == V_full ? at::empty({V_full, d}, lin.weight.options())
                                : at::zeros({V_full, d}, lin.weight.options());
    grad_bias = with_bias && weight_grad ? at::zeros({V_full}, lin.weight.options())
                                         : at::empty({0}, lin.weight.options());
  }

  // G: [N, n] in the weight dtype (the tile's gradient w.r.t. its raw logits).
  void add_tile(const TiledLinear& lin, const at::Tensor& G, int64_t v0, int64_t n) {
    const at::Tensor wt = lin.weight_tile(v0, n);
    if (G.scalar_type() == lin.acc) {
      grad_h.addmm_(G, wt);
    } else {
      // fp32 product of the bf16/fp16 GEMM, then added: aten::addmm.dtype_out does not accept an fp32 `self` with
      // bf16 mat1/mat2 (pytorch/pytorch#154086), so the accumulation is not fused into the GEMM.
      grad_h.add_(mm_acc(G, wt, lin.acc));
    }
    if (grad_weight.numel() == 0) return;
    at::Tensor gw = grad_weight.narrow(0, v0, n);
    at::mm_out(gw, G.t(), lin.h);
    if (grad_bias.numel() > 0) grad_bias.narrow(0, v0, n).copy_(at::sum(G, at::IntArrayRef{0}, false, lin.acc));
  }

  at::Tensor hidden_grad(const at::Tensor& hidden) const { return grad_h.to(hidden.scalar_type()); }
};

template <typename scalar_t>
const typename CudaType<scalar_t>::type* bias_tile_ptr(const c10::optional<at::Tensor>& bias, int64_t v0) {
  return bias.has_value() ? cuda_ptr<scalar_t>(*bias) + v0 : nullptr;
}

// ------------------------------------------------------------------------------------------------------------------
// linear_token_logprobs
// ------------------------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> linear_token_logprobs_fwd_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                                  const c10::optional<at::Tensor>& bias,
                                                                  const at::Tensor& targets, double inv_temperature,
                                                                  int64_t ignore_index, int64_t tile) {
  const char* op = "opdx::linear_token_logprobs_fwd";
  const int64_t V = weight.size(0);
  check_linear_inputs(op, hidden, weight, bias, V);
  check_targets("opdx::linear_token_logprobs_fwd", targets, hidden.size(0));
  const c10::cuda::CUDAGuard guard(hidden.device());
  const TiledLinear lin(hidden, weight, bias);
  const int64_t N = hidden.size(0);
  const auto opts = hidden.options().dtype(lin.acc);
  at::Tensor logp = at::empty({N}, opts), lse = at::empty({N}, opts);
  if (N == 0) return {logp, lse};
  const int64_t t = choose_tile(tile, N, V);
  at::Tensor run_max = at::full({N}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor run_sum = at::zeros({N}, opts);
  at::Tensor target_x = at::zeros({N}, opts);
  at::Tensor buf = at::empty({N * t}, opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "linear_token_logprobs_fwd_cuda",
                                  [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    for (int64_t v0 = 0; v0 < V; v0 += t) {
      const int64_t n = std::min(t, V - v0);
      at::Tensor L = tile_view(buf, N, n);
      lin.logits(v0, n, L);
      check_launch(launch_tile_lse(L.const_data_ptr<acc_t>(), bias_tile_ptr<scalar_t>(bias, v0), N, n, v0,
                                   static_cast<acc_t>(inv_temperature), targets.const_data_ptr<int64_t>(),
                                   ignore_index, static_cast<const bool*>(nullptr), run_max.mutable_data_ptr<acc_t>(),
                                   run_sum.mutable_data_ptr<acc_t>(), target_x.mutable_data_ptr<acc_t>(), stream),
                   "linear_token_logprobs tile_lse");
    }
    check_launch(launch_lse_finalize(N, run_max.const_data_ptr<acc_t>(), run_sum.const_data_ptr<acc_t>(),
                                     targets.const_data_ptr<int64_t>(), ignore_index,
                                     static_cast<const bool*>(nullptr), target_x.const_data_ptr<acc_t>(),
                                     lse.mutable_data_ptr<acc_t>(), logp.mutable_data_ptr<acc_t>(), stream),
                 "linear_token_logprobs finalize");
  });
  return {logp, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_bwd_cuda(
    const at::Tensor& grad_logp, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse, double inv_temperature,
    int64_t ignore_index, int64_t tile, bool weight_grad) {
  const char* op = "opdx::linear_token_logprobs_bwd";
  const int64_t V = weight.size(0);
  check_linear_inputs(op, hidden, weight, bias, V);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const TiledLinear lin(hidden, weight, bias);
  const int64_t N = hidden.size(0);
  check_row_vectors("opdx::linear_token_logprobs_bwd", lin.acc, N, grad_logp, lse);
  LinearGrads grads(lin, V, bias.has_value(), weight_grad);
  if (N == 0) {
    grads.grad_weight.zero_();
    return {grads.hidden_grad(hidden), grads.grad_weight, grads.grad_bias};
  }
  const int64_t t = choose_tile(tile, N, V);
  at::Tensor buf = at::empty({N * t}, hidden.options().dtype(lin.acc));
  at::Tensor gbuf = at::empty({N * t}, weight.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "linear_token_logprobs_bwd_cuda",
                                  [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using cuda_t = typename CudaType<scalar_t>::type;
    for (int64_t v0 = 0; v0 < V; v0 += t) {
      const int64_t n = std::min(t, V - v0);
      at::Tensor L = tile_view(buf, N, n);
      at::Tensor G = tile_view(gbuf, N, n);
      lin.logits(v0, n, L);
      check_launch(launch_tlp_grad_tile(L.const_data_ptr<acc_t>(), bias_tile_ptr<scalar_t>(bias, v0), N, n, v0,
                                        static_cast<acc_t>(inv_temperature), targets.const_data_ptr<int64_t>(),
                                        ignore_index, grad_logp.const_data_ptr<acc_t>(), lse.const_data_ptr<acc_t>(),
                                        reinterpret_cast<cuda_t*>(G.mutable_data_ptr<scalar_t>()), stream),
                   "linear_token_logprobs grad tile");
      grads.add_tile(lin, G, v0, n);
    }
  });
  return {grads.hidden_grad(hidden), grads.grad_weight, grads.grad_bias};
}

// ------------------------------------------------------------------------------------------------------------------
// linear_generalized_jsd
// ------------------------------------------------------------------------------------------------------------------

using JsdInputs = linear::JsdInputs<TiledLinear>;

std::tuple<at::Tensor, at::Tensor> linear_generalized_jsd_fwd_cuda(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const c10::optional<at::Tensor>& student_bias,
    const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight, const c10::optional<at::Tensor>& teacher_bias,
    const c10::optional<at::Tensor>& mask, int64_t vocab_size, double beta, double inv_temperature, int64_t tile) {
  const char* op = "opdx::linear_generalized_jsd_fwd";
  linear::check_jsd_inputs(op, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                           teacher_bias, mask, vocab_size, beta, /*same_dtype=*/true);
  const c10::cuda::CUDAGuard guard(student_hidden.device());
  const JsdInputs in(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask,
                     vocab_size);
  const int64_t N = in.N;
  const auto opts = student_hidden.options().dtype(in.student.acc);
  at::Tensor loss = at::zeros({N}, opts);
  at::Tensor stats = at::zeros({kNumJsdStats, N}, opts);
  if (N == 0) return {loss, stats};
  const int64_t t = choose_tile(tile, N, in.V);
  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor run = at::empty({6, N}, opts);  // max_s, sum_s, max_t, sum_t, top_s, top_t
  run.select(0, 0).fill_(-inf);
  run.select(0, 1).zero_();
  run.select(0, 2).fill_(-inf);
  run.select(0, 3).zero_();
  run.select(0, 4).fill_(-inf);
  run.select(0, 5).zero_();
  at::Tensor rows = at::empty({2, N}, opts.dtype(at::kDouble));  // sweep-2 accumulators: loss, total
  at::Tensor buf_s = at::empty({N * t}, opts), buf_t = at::empty({N * t}, opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student_hidden.scalar_type(),
                                  "linear_generalized_jsd_fwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t invT = static_cast<acc_t>(inv_temperature), b = static_cast<acc_t>(beta);
    acc_t* rp = run.mutable_data_ptr<acc_t>();
    const JsdRunState<acc_t> state{rp, rp + N, rp + 2 * N, rp + 3 * N, rp + 4 * N, rp + 5 * N};
    double* row_loss = rows.mutable_data_ptr<double>();
    double* row_total = row_loss + N;
    dispatch_jsd_mode(beta, [&](auto mode) {
      constexpr int kMode = decltype(mode)::value;
      for (int64_t v0 = 0; v0 < in.V; v0 += t) {  // sweep 1
        const int64_t n = std::min(t, in.V - v0);
        at::Tensor Ls = tile_view(buf_s, N, n), Lt = tile_view(buf_t, N, n);
        in.student.logits(v0, n, Ls);
        in.teacher.logits(v0, n, Lt);
        check_launch(launch_jsd_lse_tile<kMode>(Ls.const_data_ptr<acc_t>(), bias_tile_ptr<scalar_t>(student_bias, v0),
                                                Lt.const_data_ptr<acc_t>(), bias_tile_ptr<scalar_t>(teacher_bias, v0),
                                                N, n, invT, in.mask, state, stream),
                     "linear_generalized_jsd lse tile");
      }
      check_launch(launch_jsd_lse_finalize<kMode>(N, b, invT, in.mask, state, stats.mutable_data_ptr<acc_t>(),
                                                  row_loss, row_total, stream),
                   "linear_generalized_jsd lse finalize");
      for (int64_t v0 = 0; v0 < in.V; v0 += t) {  // sweep 2
        const int64_t n = std::min(t, in.V - v0);
        at::Tensor Ls = tile_view(buf_s, N, n), Lt = tile_view(buf_t, N, n);
        in.student.logits(v0, n, Ls);
        in.teacher.logits(v0, n, Lt);
        check_launch(launch_jsd_loss_tile<kMode>(Ls.const_data_ptr<acc_t>(), bias_tile_ptr<scalar_t>(student_bias, v0),
                                                 Lt.const_data_ptr<acc_t>(), bias_tile_ptr<scalar_t>(teacher_bias, v0),
                                                 N, n, b, invT, in.mask, stats.const_data_ptr<acc_t>(), row_loss,
                                                 row_total, stream),
                     "linear_generalized_jsd loss tile");
      }
      check_launch(launch_jsd_loss_finalize(N, row_loss, row_total, loss.mutable_data_ptr<acc_t>(),
                                            stats.mutable_data_ptr<acc_t>(), stream),
                   "linear_generalized_jsd loss finalize");
    });
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_generalized_jsd_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& student_hidden, const at::Tensor& student_weight,
    const c10::optional<at::Tensor>& student_bias, const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight,
    const c10::optional<at::Tensor>& teacher_bias, const c10::optional<at::Tensor>& mask, const at::Tensor& stats,
    int64_t vocab_size, double beta, double inv_temperature, int64_t tile, bool weight_grad) {
  const char* op = "opdx::linear_generalized_jsd_bwd";
  linear::check_jsd_inputs(op, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                           teacher_bias, mask, vocab_size, beta, /*same_dtype=*/true);
  const c10::cuda::CUDAGuard guard(student_hidden.device());
  const JsdInputs in(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask,
                     vocab_size);
  const int64_t N = in.N;
  check_jsd_bwd_inputs(op, in.student.acc, in.N, grad_loss, stats);
  LinearGrads grads(in.student, in.V, student_bias.has_value(), weight_grad);
  if (N == 0) {
    grads.grad_weight.zero_();
    return {grads.hidden_grad(student_hidden), grads.grad_weight, grads.grad_bias};
  }
  const int64_t t = choose_tile(tile, N, in.V);
  const auto opts = student_hidden.options().dtype(in.student.acc);
  at::Tensor buf_s = at::empty({N * t}, opts), buf_t = at::empty({N * t}, opts);
  at::Tensor gbuf = at::empty({N * t}, student_weight.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student_hidden.scalar_type(),
                                  "linear_generalized_jsd_bwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using cuda_t = typename CudaType<scalar_t>::type;
    dispatch_jsd_mode(beta, [&](auto mode) {
      constexpr int kMode = decltype(mode)::value;
      for (int64_t v0 = 0; v0 < in.V; v0 += t) {
        const int64_t n = std::min(t, in.V - v0);
        at::Tensor Ls = tile_view(buf_s, N, n), Lt = tile_view(buf_t, N, n), G = tile_view(gbuf, N, n);
        in.student.logits(v0, n, Ls);
        in.teacher.logits(v0, n, Lt);
        check_launch(launch_jsd_grad_tile<kMode>(
                         Ls.const_data_ptr<acc_t>(), bias_tile_ptr<scalar_t>(student_bias, v0),
                         Lt.const_data_ptr<acc_t>(), bias_tile_ptr<scalar_t>(teacher_bias, v0), N, n,
                         static_cast<acc_t>(beta), static_cast<acc_t>(inv_temperature), in.mask,
                         grad_loss.const_data_ptr<acc_t>(), stats.const_data_ptr<acc_t>(),
                         reinterpret_cast<cuda_t*>(G.mutable_data_ptr<scalar_t>()), stream),
                     "linear_generalized_jsd grad tile");
        grads.add_tile(in.student, G, v0, n);
      }
    });
  });
  return {grads.hidden_grad(student_hidden), grads.grad_weight, grads.grad_bias};
}

}  // namespace
}  // namespace cuda
}  // namespace opdx

TORCH_LIBRARY_IMPL(opdx, CUDA, m) {
  m.impl("linear_token_logprobs_fwd", &opdx::cuda::linear_token_logprobs_fwd_cuda);
  m.impl("linear_token_logprobs_bwd", &opdx::cuda::linear_token_logprobs_bwd_cuda);
  m.impl("linear_generalized_jsd_fwd", &opdx::cuda::linear_generalized_jsd_fwd_cuda);
  m.impl("linear_generalized_jsd_bwd", &opdx::cuda::linear_generalized_jsd_bwd_cuda);
}
