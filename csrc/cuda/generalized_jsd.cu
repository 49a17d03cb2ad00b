// Torch glue for the CUDA generalized JSD; the kernels are in generalized_jsd_kernels.cuh (one block per row) and
// generalized_jsd_cluster_kernels.cuh (sm_90 clusters, and the launcher that picks between them).
#include "generalized_jsd_cluster_kernels.cuh"
#include "torch_cuda_utils.h"

namespace opdx {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> generalized_jsd_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                            const c10::optional<at::Tensor>& mask, double beta,
                                                            double inv_temperature, bool compute_grad,
                                                            bool grad_fp32) {
  check_generalized_jsd_inputs(student, teacher, beta);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t N = num_rows(student);
  const int64_t V = student.size(-1);
  const bool* mask_ptr = row_mask_ptr(mask, student, N);
  const bool is_double = student.scalar_type() == at::kDouble;
  const auto acc_dtype = acc_dtype_for(student);
  at::Tensor loss = at::empty({N}, student.options().dtype(acc_dtype));
  const auto grad_dtype = (grad_fp32 && !is_double) ? at::kFloat : student.scalar_type();
  at::Tensor grad =
      at::empty(compute_grad ? student.sizes() : at::IntArrayRef({0}), student.options().dtype(grad_dtype));
  const RowIndexer s_rows = make_row_indexer(student);
  const RowIndexer t_rows = make_row_indexer(teacher);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "generalized_jsd_fwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using cuda_t = typename CudaType<scalar_t>::type;
    if (grad_dtype == student.scalar_type()) {
      check_launch(launch_generalized_jsd_fwd<cuda_t, cuda_t, acc_t>(
                       cuda_ptr<scalar_t>(student), s_rows, cuda_ptr<scalar_t>(teacher), t_rows, N, V, mask_ptr,
                       static_cast<acc_t>(beta), static_cast<acc_t>(inv_temperature),
                       loss.mutable_data_ptr<acc_t>(), compute_grad ? cuda_mutable_ptr<scalar_t>(grad) : nullptr,
                       stream),
                   "generalized_jsd_fwd");
    } else {
      check_launch(launch_generalized_jsd_fwd<cuda_t, float, acc_t>(
                       cuda_ptr<scalar_t>(student), s_rows, cuda_ptr<scalar_t>(teacher), t_rows, N, V, mask_ptr,
                       static_cast<acc_t>(beta), static_cast<acc_t>(inv_temperature),
                       loss.mutable_data_ptr<acc_t>(), compute_grad ? grad.mutable_data_ptr<float>() : nullptr,
                       stream),
                   "generalized_jsd_fwd");
    }
  });
  return {loss, grad};
}

void generalized_jsd_scale_grad_cuda(const at::Tensor& grad, const at::Tensor& scale) {
  check_scale_grad_inputs(grad, scale);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out = grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "generalized_jsd_scale_grad_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    check_launch(launch_scale_grad_rows(cuda_mutable_ptr<scalar_t>(out), scale.const_data_ptr<acc_t>(), num_rows(grad),
                                        grad.size(-1), at::cuda::getCurrentCUDAStream()),
                 "generalized_jsd_scale_grad_");
  });
}

}  // namespace
}  // namespace cuda
}  // namespace opdx

TORCH_LIBRARY_IMPL(opdx, CUDA, m) {
  m.impl("generalized_jsd_fwd", &opdx::cuda::generalized_jsd_fwd_cuda);
  m.impl("generalized_jsd_scale_grad_", &opdx::cuda::generalized_jsd_scale_grad_cuda);
}
