// Torch glue for the CUDA fused log-softmax gather; the kernels are in token_logprobs_kernels.cuh.
#include "token_logprobs_kernels.cuh"
#include "torch_cuda_utils.h"

namespace opdx {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_cuda(const at::Tensor& logits,
                                                                       const at::Tensor& targets,
                                                                       double inv_temperature, int64_t ignore_index,
                                                                       bool compute_entropy, bool inplace_backward) {
  (void)inplace_backward;
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor logp, lse, entropy;
  std::tie(logp, lse, entropy) = token_logprobs_outputs(logits, targets, compute_entropy);
  const int64_t N = lse.numel();
  const RowIndexer rows = make_row_indexer(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_fwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    check_launch(launch_token_logprobs_fwd(cuda_ptr<scalar_t>(logits), rows, N, logits.size(-1),
                                           targets.const_data_ptr<int64_t>(), static_cast<acc_t>(inv_temperature),
                                           ignore_index, logp.mutable_data_ptr<acc_t>(),
                                           lse.mutable_data_ptr<acc_t>(),
                                           compute_entropy ? entropy.mutable_data_ptr<acc_t>() : nullptr,
                                           at::cuda::getCurrentCUDAStream()),
                 "token_logprobs_fwd");
  });
  return {logp, lse, entropy};
}

void token_logprobs_bwd_into(const at::Tensor& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                             const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                             const c10::optional<at::Tensor>& entropy, double inv_temperature, int64_t ignore_index,
                             at::Tensor& grad_logits) {
  check_token_logprobs_bwd_inputs(grad_logp, logits, targets, lse);
  const c10::cuda::CUDAGuard guard(logits.device());
  const bool use_entropy = grad_entropy.has_value() && entropy.has_value() && entropy->numel() > 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_bwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    check_launch(launch_token_logprobs_bwd(cuda_ptr<scalar_t>(logits), make_row_indexer(logits),
                                           cuda_mutable_ptr<scalar_t>(grad_logits), make_row_indexer(grad_logits),
                                           targets.numel(), logits.size(-1), targets.const_data_ptr<int64_t>(),
                                           static_cast<acc_t>(inv_temperature), ignore_index,
                                           grad_logp.const_data_ptr<acc_t>(),
                                           use_entropy ? grad_entropy->const_data_ptr<acc_t>() : nullptr,
                                           lse.const_data_ptr<acc_t>(),
                                           use_entropy ? entropy->const_data_ptr<acc_t>() : nullptr,
                                           at::cuda::getCurrentCUDAStream()),
                 "token_logprobs_bwd");
  });
}

at::Tensor token_logprobs_bwd_cuda(const at::Tensor& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                                   const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                   const c10::optional<at::Tensor>& entropy, double inv_temperature,
                                   int64_t ignore_index) {
  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());
  token_logprobs_bwd_into(grad_logp, grad_entropy, logits, targets, lse, entropy, inv_temperature, ignore_index,
                          grad_logits);
  return grad_logits;
}

void token_logprobs_bwd_inplace_cuda(const at::Tensor& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                                     const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                     const c10::optional<at::Tensor>& entropy, double inv_temperature,
                                     int64_t ignore_index) {
  at::Tensor out = logits;
  token_logprobs_bwd_into(grad_logp, grad_entropy, logits, targets, lse, entropy, inv_temperature, ignore_index, out);
}

}  // namespace
}  // namespace cuda
}  // namespace opdx

TORCH_LIBRARY_IMPL(opdx, CUDA, m) {
  m.impl("token_logprobs_fwd", &opdx::cuda::token_logprobs_fwd_cuda);
  m.impl("token_logprobs_bwd", &opdx::cuda::token_logprobs_bwd_cuda);
  m.impl("token_logprobs_bwd_inplace", &opdx::cuda::token_logprobs_bwd_inplace_cuda);
}
