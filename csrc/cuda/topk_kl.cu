// Torch glue for the CUDA top-k KL ops; the kernels are in topk_kl_kernels.cuh and topk_kl_teacher_kernels.cuh. The
// deterministic grad_weight reduction sorts the flat ids here (stable at::sort) and builds the segment/chunk layout
// with ATen ops, without a host synchronization.
// topk_vocab_lse(_bwd) has one device-generic implementation (csrc/cpu/topk_kl.cpp, CompositeExplicitAutograd).
#include "topk_kl_kernels.cuh"
#include "topk_kl_teacher_kernels.cuh"
#include "torch_cuda_utils.h"

namespace opdx {
namespace cuda {
namespace {

void check_gather_inputs(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& ids) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1), "opdx::", op,
              ": expected hidden [N, d] and weight [V, d], got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(), "opdx::", op, ": hidden and weight must be contiguous");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "opdx::", op, ": hidden and weight dtypes differ");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.size(0) == hidden.size(0) && ids.is_contiguous(),
              "opdx::", op, ": ids must be a contiguous int64 [N, K] tensor");
  TORCH_CHECK(hidden.device() == weight.device() && ids.device() == hidden.device(), "opdx::", op,
              ": hidden, weight and ids must be on the same device");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->is_contiguous() &&
                    bias->scalar_type() == weight.scalar_type() && bias->device() == weight.device(),
                "opdx::", op, ": bias must be a contiguous [V] tensor of weight's dtype and device");
  }
}


at::Tensor topk_gather_dot_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, const at::Tensor& ids, double inv_temperature,
                                bool deterministic) {
  (void)deterministic;
  check_gather_inputs("topk_gather_dot", hidden, weight, bias, ids);
  const c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor z = at::empty(ids.sizes(), hidden.options().dtype(acc_dtype_for(hidden)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "topk_gather_dot_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using cuda_t = typename CudaType<scalar_t>::type;
    const cuda_t* b = bias.has_value() ? cuda_ptr<scalar_t>(*bias) : nullptr;
    check_launch(launch_topk_gather_dot<cuda_t, acc_t>(cuda_ptr<scalar_t>(hidden), cuda_ptr<scalar_t>(weight), b,
                                                       ids.const_data_ptr<int64_t>(), ids.size(0), ids.size(1),
                                                       hidden.size(1), static_cast<acc_t>(inv_temperature),
                                                       z.mutable_data_ptr<acc_t>(), at::cuda::getCurrentCUDAStream()),
                 "topk_gather_dot");
  });
  return z;
}

// The sorted-id segment layout of topk_kl_kernels.cuh (SegmentLayout); owns its tensors. Built without a host
// synchronization: the number of distinct ids U, of chunks and of partials are data-dependent, so every array is
// sized by a host-side upper bound and padded (segments u >= U are empty, chunks past the last map to segment
// num_segments); the kernels skip the padding.
struct SegmentTensors {
  at::Tensor order, order_row, seg_ids, seg_off, chunk_seg, chunk_off, nchunks, partial_off;
  int64_t num_segments = 0, num_chunks = 0, num_partials = 0;  // upper bounds

  SegmentLayout layout() const {
    return {order.const_data_ptr<int64_t>(),     order_row.const_data_ptr<int64_t>(),
            seg_ids.const_data_ptr<int64_t>(),   seg_off.const_data_ptr<int64_t>(),
            chunk_seg.const_data_ptr<int64_t>(), chunk_off.const_data_ptr<int64_t>(),
            nchunks.const_data_ptr<int64_t>(),   partial_off.const_data_ptr<int64_t>()};
  }
};

// Bounds: U <= min(P, V); Σ_u ceil(c_u / kSegChunk) <= P / kSegChunk + U; a multi-chunk segment has c_u > kSegChunk,
// so its ceil(c_u / kSegChunk) <= 2·c_u / kSegChunk and the partials total at most 2P / kSegChunk.
SegmentTensors build_segments(const at::Tensor& ids, int64_t V) {
  SegmentTensors s;
  const int64_t K = ids.size(1);
  const at::Tensor flat = ids.reshape({-1});
  const int64_t P = flat.numel();
  const auto lopts = flat.options();
  at::Tensor sorted;
  std::tie(sorted, s.order) = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  s.order = s.order.contiguous();
  s.order_row = at::div(s.order, K, "floor").contiguous();
  s.num_segments = std::min(P, V);
  s.num_chunks = P / kSegChunk + s.num_segments;
  s.num_partials = 2 * P / kSegChunk;
  // segment of each sorted position (nondecreasing), then each segment's first position by binary search
  at::Tensor starts = at::ones({P}, lopts);
  starts.slice(0, 1).copy_(sorted.slice(0, 1).ne(sorted.slice(0, 0, P - 1)));
  const at::Tensor seg_of = starts.cumsum(0).sub_(1);
  s.seg_off = at::searchsorted(seg_of, at::arange(s.num_segments + 1, lopts)).contiguous();  // P for u >= U
  s.seg_ids = sorted.index_select(0, s.seg_off.slice(0, 0, s.num_segments).clamp_max(P - 1)).contiguous();
  const at::Tensor counts = s.seg_off.slice(0, 1) - s.seg_off.slice(0, 0, s.num_segments);
  s.nchunks = at::div(counts + (kSegChunk - 1), kSegChunk, "floor").contiguous();
  const at::Tensor chunk_end = s.nchunks.cumsum(0);
  s.chunk_off = (chunk_end - s.nchunks).contiguous();
  const at::Tensor npart = at::where(s.nchunks.gt(1), s.nchunks, at::zeros_like(s.nchunks));
  s.partial_off = (npart.cumsum(0) - npart).contiguous();
  // chunk c belongs to the first segment whose chunks end after c (num_segments for the padding chunks)
  s.chunk_seg = at::searchsorted(chunk_end, at::arange(s.num_chunks, lopts), /*out_int32=*/false, /*right=*/true)
                    .contiguous();
  return s;
}

// grad_hidden and grad_weight/grad_bias (zero-filled) of the gather-dot, written as out_t (the weight's CUDA type, or
// acc_t for acc_out). Deterministic: sorted-id segments; else atomics in acc_t.
template <typename cuda_t, typename acc_t, typename out_t>
void grad_weight_into(const at::Tensor& grad_z, const at::Tensor& hidden, const at::Tensor& ids, acc_t inv_t,
                      bool has_bias, bool deterministic, const at::Tensor& grad_h_t, at::Tensor& grad_w_t,
                      at::Tensor& grad_b_t, out_t* grad_h, out_t* grad_w, out_t* grad_b, const at::Tensor& weight,
                      cudaStream_t stream) {
  (void)grad_h_t;
  const int64_t N = ids.size(0), K = ids.size(1), d = hidden.size(1), V = weight.size(0);
  const auto acc = acc_dtype_for(hidden);
  const cuda_t* h = reinterpret_cast<const cuda_t*>(hidden.const_data_ptr());
  const cuda_t* w = reinterpret_cast<const cuda_t*>(weight.const_data_ptr());
  check_launch(launch_topk_grad_hidden<cuda_t, acc_t, out_t>(grad_z.const_data_ptr<acc_t>(), w,
                                                             ids.const_data_ptr<int64_t>(), N, K, d, inv_t, grad_h,
                                                             stream),
               "topk_grad_hidden");
  if (deterministic) {
    const SegmentTensors seg = build_segments(ids, V);
    at::Tensor partial = at::empty({seg.num_partials, d}, hidden.options().dtype(acc));
    at::Tensor partial_b = at::empty({has_bias ? seg.num_partials : 0}, hidden.options().dtype(acc));
    check_launch(launch_topk_grad_weight<cuda_t, acc_t, out_t>(
                     grad_z.const_data_ptr<acc_t>(), h, seg.layout(), seg.num_segments, seg.num_chunks,
                     seg.num_partials, d, inv_t, grad_w, has_bias ? grad_b : nullptr,
                     seg.num_partials > 0 ? partial.mutable_data_ptr<acc_t>() : nullptr,
                     (has_bias && seg.num_partials > 0) ? partial_b.mutable_data_ptr<acc_t>() : nullptr, stream),
                 "topk_grad_weight");
  } else {
    // Atomics accumulate in acc_t: straight into the output when it is acc_t, else into a buffer copied afterwards.
    const bool direct = grad_w_t.scalar_type() == acc;
    at::Tensor gw_acc = direct ? grad_w_t : at::zeros(weight.sizes(), weight.options().dtype(acc));
    at::Tensor gb_acc = (!has_bias || direct) ? grad_b_t : at::zeros({V}, weight.options().dtype(acc));
    check_launch(launch_topk_grad_weight_atomic<cuda_t, acc_t>(
                     grad_z.const_data_ptr<acc_t>(), h, ids.const_data_ptr<int64_t>(), N, K, d, inv_t,
                     gw_acc.mutable_data_ptr<acc_t>(), has_bias ? gb_acc.mutable_data_ptr<acc_t>() : nullptr, stream),
                 "topk_grad_weight_atomic");
    if (!direct) {
      grad_w_t.copy_(gw_acc);
      if (has_bias) grad_b_t.copy_(gb_acc);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_gather_dot_bwd_cuda(const at::Tensor& grad_z,
                                                                        const at::Tensor& hidden,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& ids, double inv_temperature,
                                                                        bool has_bias, bool deterministic,
                                                                        bool acc_out) {
  check_gather_inputs("topk_gather_dot_bwd", hidden, weight, c10::nullopt, ids);
  const auto acc = acc_dtype_for(hidden);
  TORCH_CHECK(grad_z.scalar_type() == acc && grad_z.is_contiguous() && grad_z.sizes() == ids.sizes(),
              "opdx::topk_gather_dot_bwd: grad_z must be a contiguous ", acc, " tensor shaped like ids");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t N = ids.size(0), K = ids.size(1), d = hidden.size(1), V = weight.size(0);
  const auto out_opts = acc_out ? weight.options().dtype(acc) : weight.options();
  at::Tensor grad_h = at::empty(hidden.sizes(), out_opts);
  at::Tensor grad_w = at::zeros(weight.sizes(), out_opts);
  at::Tensor grad_b = has_bias ? at::zeros({V}, out_opts) : at::empty({0}, out_opts);
  if (N * K == 0) return {grad_h.zero_(), grad_w, grad_b};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "topk_gather_dot_bwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using cuda_t = typename CudaType<scalar_t>::type;
    const acc_t inv_t = static_cast<acc_t>(inv_temperature);
    if (acc_out) {
      grad_weight_into<cuda_t, acc_t, acc_t>(grad_z, hidden, ids, inv_t, has_bias, deterministic, grad_h, grad_w,
                                              grad_b, grad_h.mutable_data_ptr<acc_t>(), grad_w.mutable_data_ptr<acc_t>(),
                                              has_bias ? grad_b.mutable_data_ptr<acc_t>() : nullptr, weight, stream);
    } else {
      grad_weight_into<cuda_t, acc_t, cuda_t>(grad_z, hidden, ids, inv_t, has_bias, deterministic, grad_h, grad_w,
                                               grad_b, cuda_mutable_ptr<scalar_t>(grad_h),
                                               cuda_mutable_ptr<scalar_t>(grad_w),
                                               has_bias ? cuda_mutable_ptr<scalar_t>(grad_b) : nullptr, weight,
                                               stream);
    }
  });
  return {grad_h, grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_gjsd_cuda(const at::Tensor& z, const at::Tensor& teacher_logprobs,
                                                              const c10::optional<at::Tensor>& student_lse,
                                                              double beta) {
  TORCH_CHECK(z.dim() == 2 && z.is_contiguous() && (z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble),
              "opdx::topk_gjsd: z must be a contiguous float32/float64 [N, K] tensor");
  TORCH_CHECK(teacher_logprobs.sizes() == z.sizes() && teacher_logprobs.scalar_type() == z.scalar_type() &&
                  teacher_logprobs.is_contiguous() && teacher_logprobs.device() == z.device(),
              "opdx::topk_gjsd: teacher_logprobs must be contiguous and match z's shape, dtype and device");
  if (student_lse.has_value()) {
    TORCH_CHECK(student_lse->dim() == 1 && student_lse->size(0) == z.size(0) && student_lse->is_contiguous() &&
                    student_lse->scalar_type() == z.scalar_type() && student_lse->device() == z.device(),
                "opdx::topk_gjsd: student_lse must be a contiguous [N] tensor of z's dtype and device");
  }
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "opdx::topk_gjsd: beta must be in [0, 1], got ", beta);
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t N = z.size(0);
  at::Tensor loss = at::empty({N}, z.options());
  at::Tensor grad_z = at::empty(z.sizes(), z.options());
  at::Tensor grad_lse = at::empty({student_lse.has_value() ? N : 0}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "topk_gjsd_cuda", [&] {
    check_launch(launch_topk_gjsd<scalar_t>(z.const_data_ptr<scalar_t>(), teacher_logprobs.const_data_ptr<scalar_t>(),
                                            student_lse.has_value() ? student_lse->const_data_ptr<scalar_t>() : nullptr,
                                            N, z.size(1), static_cast<scalar_t>(beta), loss.mutable_data_ptr<scalar_t>(),
                                            grad_z.mutable_data_ptr<scalar_t>(),
                                            student_lse.has_value() ? grad_lse.mutable_data_ptr<scalar_t>() : nullptr,
                                            at::cuda::getCurrentCUDAStream()),
                 "topk_gjsd");
  });
  return {loss, grad_z, grad_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> teacher_topk_cuda(const at::Tensor& logits, int64_t k,
                                                                 double inv_temperature) {
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor ids, logprobs, lse;
  std::tie(ids, logprobs, lse) = teacher_topk_outputs(logits, k, kMaxTeacherK);
  TORCH_CHECK(logits.size(-1) <= INT_MAX, "opdx::teacher_topk: the CUDA kernel needs V <= 2^31 - 1, got V=",
              logits.size(-1), "; run it on CPU or split the vocabulary");
  const int64_t N = lse.numel();
  const RowIndexer rows = make_row_indexer(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "teacher_topk_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    check_launch(launch_teacher_topk(cuda_ptr<scalar_t>(logits), rows, N, logits.size(-1), static_cast<int>(k),
                                     static_cast<acc_t>(inv_temperature), ids.mutable_data_ptr<int64_t>(),
                                     logprobs.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>(),
                                     at::cuda::getCurrentCUDAStream()),
                 "teacher_topk");
  });
  return {ids, logprobs, lse};
}

}  // namespace
}  // namespace cuda
}  // namespace opdx

TORCH_LIBRARY_IMPL(opdx, CUDA, m) {
  m.impl("topk_gather_dot", &opdx::cuda::topk_gather_dot_cuda);
  m.impl("topk_gather_dot_bwd", &opdx::cuda::topk_gather_dot_bwd_cuda);
  m.impl("topk_gjsd", &opdx::cuda::topk_gjsd_cuda);
  m.impl("teacher_topk", &opdx::cuda::teacher_topk_cuda);
}
