// Torch glue for the CUDA fused lm_head + loss ops; the epilogue kernels are in linear_losses_kernels.cuh.
//
// Each vocabulary tile: one cuBLAS GEMM (at::mm with an fp32 output, so bf16/fp16 inputs run on tensor cores with fp32
// accumulation and no rounding of the logits) into a reused fp32 [N, tile] buffer, then the epilogue kernel. The
// gradient coefficients of a tile are written in the weight dtype (bf16/fp16 tensor-core GEMMs, as Liger and CCE do)
// and feed grad_h += G·W_tile (fp32 accumulator via addmm with an fp32 output) and grad_W_tile = Gᵀ·h.
// Follow-up: a fused sm_90a wgmma kernel with this epilogue in registers, and row-chunked full-vocabulary passes
// (fewer recomputed GEMMs) where memory allows; measure against this version.
#include "linear_losses_kernels.cuh"
#include "torch_cuda_utils.h"

namespace opdx {
namespace cuda {
namespace {

constexpr int64_t kTileElems = int64_t(1) << 23;

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
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1), op,
              ": hidden must be [N, d] and weight [V, d], got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), op, ": hidden and weight dtypes differ");
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  TORCH_CHECK(V >= 1 && V <= weight.size(0), op, ": vocab size ", V, " must be in [1, ", weight.size(0), "]");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->is_contiguous() &&
                    bias->scalar_type() == weight.scalar_type(),
                op, ": bias must be a contiguous [V] tensor of the weight dtype");
  }
}

// One lm_head viewed tile by tile. GEMMs read hidden/weight in their own dtype and write fp32 (fp64 for fp64).
struct TiledLinear {
  at::Tensor h;  // [N, d] contiguous, input dtype
  at::Tensor weight;
  c10::optional<at::Tensor> bias;
  at::ScalarType acc;

  TiledLinear(const at::Tensor& hidden, const at::Tensor& w, const c10::optional<at::Tensor>& b)
      : h(hidden.contiguous()), weight(w), bias(b), acc(acc_dtype_of(hidden)) {}

  at::Tensor weight_tile(int64_t v0, int64_t n) const { return weight.narrow(0, v0, n); }

  // out [N, n] (acc dtype) = h·W_tileᵀ; the bias is added by the epilogue kernels.
  void logits(int64_t v0, int64_t n, at::Tensor& out) const {
    if (h.scalar_type() == acc) {
      at::mm_out(out, h, weight_tile(v0, n).t());
    } else {
      at::mm_out(out, h, weight_tile(v0, n).t(), acc);
    }
  }
};

at::Tensor tile_view(const at::Tensor& buf, int64_t N, int64_t n) { return buf.narrow(0, 0, N * n).view({N, n}); }

struct LinearGrads {
  at::Tensor grad_h;  // [N, d] acc dtype
  at::Tensor grad_weight;
  at::Tensor grad_bias;

  LinearGrads(const TiledLinear& lin, int64_t V, bool with_bias) {
    const int64_t N = lin.h.size(0), d = lin.h.size(1), V_full = lin.weight.size(0);
    grad_h = at::zeros({N, d}, lin.h.options().dtype(lin.acc));
    grad_weight = V == V_full ? at::empty({V_full, d}, lin.weight.options())
                              : at::zeros({V_full, d}, lin.weight.options());
    grad_bias = with_bias ? at::zeros({V_full}, lin.weight.options()) : at::empty({0}, lin.weight.options());
  }

  // G: [N, n] in the weight dtype (the tile's gradient w.r.t. its raw logits).
  void add_tile(const TiledLinear& lin, const at::Tensor& G, int64_t v0, int64_t n) {
    const at::Tensor wt = lin.weight_tile(v0, n);
    if (G.scalar_type() == lin.acc) {
      grad_h.addmm_(G, wt);
    } else {
      at::addmm_out(grad_h, grad_h, G, wt, lin.acc);  // fp32 accumulator, bf16/fp16 tensor-core GEMM
    }
    at::Tensor gw = grad_weight.narrow(0, v0, n);
    at::mm_out(gw, G.t(), lin.h);
    if (grad_bias.numel() > 0) grad_bias.narrow(0, v0, n).copy_(G.sum(0, false, lin.acc));
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
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.is_contiguous() &&
                  targets.numel() == hidden.size(0),
              op, ": targets must be a contiguous int64 [N] tensor");
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "linear_token_logprobs_fwd_cuda", [&] {
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
    int64_t ignore_index, int64_t tile) {
  const char* op = "opdx::linear_token_logprobs_bwd";
  const int64_t V = weight.size(0);
  check_linear_inputs(op, hidden, weight, bias, V);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const TiledLinear lin(hidden, weight, bias);
  const int64_t N = hidden.size(0);
  TORCH_CHECK(grad_logp.scalar_type() == lin.acc && lse.scalar_type() == lin.acc && grad_logp.is_contiguous() &&
                  lse.is_contiguous() && grad_logp.numel() == N && lse.numel() == N,
              op, ": grad_logp and lse must be contiguous [N] ", lin.acc, " tensors");
  LinearGrads grads(lin, V, bias.has_value());
  if (N == 0) {
    grads.grad_weight.zero_();
    return {grads.hidden_grad(hidden), grads.grad_weight, grads.grad_bias};
  }
  const int64_t t = choose_tile(tile, N, V);
  at::Tensor buf = at::empty({N * t}, hidden.options().dtype(lin.acc));
  at::Tensor gbuf = at::empty({N * t}, weight.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "linear_token_logprobs_bwd_cuda", [&] {
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

}  // namespace
}  // namespace cuda
}  // namespace opdx

TORCH_LIBRARY_IMPL(opdx, CUDA, m) {
  m.impl("linear_token_logprobs_fwd", &opdx::cuda::linear_token_logprobs_fwd_cuda);
  m.impl("linear_token_logprobs_bwd", &opdx::cuda::linear_token_logprobs_bwd_cuda);
}
