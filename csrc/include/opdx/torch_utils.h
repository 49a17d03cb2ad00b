// Host-side helpers shared by the torch glue of every op (CPU and CUDA launch files). Not for device code.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "opdx/numerics.h"

namespace opdx {

// Collapses the leading dims of a [..., V] tensor (last dim contiguous) into at most kMaxRowDims strided dims.
inline RowIndexer make_row_indexer(const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 1, "opdx: expected a tensor with a last (vocabulary) dim, got a scalar");
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, "opdx: the last dim must be contiguous (stride 1), got stride ",
              t.stride(-1));
  int64_t sizes[16];
  int64_t strides[16];
  int n = 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) == 1) continue;
    if (n > 0 && strides[n - 1] == t.stride(d) * t.size(d)) {
      sizes[n - 1] *= t.size(d);
      strides[n - 1] = t.stride(d);
    } else {
      TORCH_CHECK(n < 16, "opdx: too many leading dims");
      sizes[n] = t.size(d);
      strides[n] = t.stride(d);
      ++n;
    }
  }
  RowIndexer idx{};
  if (n == 0) {
    idx.ndim = 1;
    idx.sizes[0] = 1;
    idx.strides[0] = t.size(-1);
    return idx;
  }
  TORCH_CHECK(n <= kMaxRowDims, "opdx: the leading dims of a [..., V] input collapse to ", n,
              " strided dims; at most ", kMaxRowDims, " are supported (call .contiguous() first)");
  idx.ndim = n;
  for (int i = 0; i < n; ++i) {
    idx.sizes[i] = sizes[i];
    idx.strides[i] = strides[i];
  }
  return idx;
}

inline int64_t num_rows(const at::Tensor& t) { return t.dim() <= 1 ? 1 : t.numel() / std::max<int64_t>(t.size(-1), 1); }

// fp32 accumulation (and fp32 per-row outputs) for fp32/bf16/fp16 inputs; fp64 for fp64 inputs.
inline at::ScalarType acc_dtype_for(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks the Python faces cannot express (they validate everything else with clearer messages).
inline void check_token_logprobs_fwd_inputs(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.is_contiguous(),
              "opdx::token_logprobs_fwd: targets must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(targets.numel() == num_rows(logits), "opdx::token_logprobs_fwd: targets has ", targets.numel(),
              " entries but logits has ", num_rows(logits), " rows");
}

inline void check_token_logprobs_bwd_inputs(const at::Tensor& grad_logp, const at::Tensor& logits,
                                            const at::Tensor& targets, const at::Tensor& lse) {
  const auto acc_dtype = acc_dtype_for(logits);
  TORCH_CHECK(grad_logp.scalar_type() == acc_dtype && lse.scalar_type() == acc_dtype,
              "opdx::token_logprobs_bwd: grad_logp and lse must be ", acc_dtype);
  TORCH_CHECK(grad_logp.is_contiguous() && lse.is_contiguous() && targets.is_contiguous(),
              "opdx::token_logprobs_bwd: grad_logp, lse and targets must be contiguous");
  TORCH_CHECK(grad_logp.numel() == targets.numel() && lse.numel() == targets.numel(),
              "opdx::token_logprobs_bwd: grad_logp, lse and targets must have one entry per row");
}

// Per-row outputs of the row ops, allocated once for both devices (acc dtype; the logits' device).
using RowOutputs3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// token_logprobs_fwd: logp, lse [N] and entropy ([N], or [0] without it).
inline RowOutputs3 token_logprobs_outputs(const at::Tensor& logits, const at::Tensor& targets, bool compute_entropy) {
  check_token_logprobs_fwd_inputs(logits, targets);
  const auto opts = logits.options().dtype(acc_dtype_for(logits));
  const int64_t N = targets.numel();
  return {at::empty({N}, opts), at::empty({N}, opts), at::empty({compute_entropy ? N : 0}, opts)};
}

// teacher_topk: checks 1 <= k <= V (and k <= max_k, a kernel's limit) and returns ids [N, k] (int64), log-probs
// [N, k] and lse [N].
inline RowOutputs3 teacher_topk_outputs(const at::Tensor& logits, int64_t k, int64_t max_k) {
  TORCH_CHECK(logits.dim() >= 1 && k >= 1 && k <= logits.size(-1), "opdx::teacher_topk: need 1 <= k <= V, got k=",
              k, " and V=", logits.dim() >= 1 ? logits.size(-1) : 0);
  TORCH_CHECK(k <= max_k, "opdx::teacher_topk: k=", k, " exceeds this device's kernel limit of ", max_k);
  const auto acc = acc_dtype_for(logits);
  const int64_t N = num_rows(logits);
  return {at::empty({N, k}, logits.options().dtype(at::kLong)), at::empty({N, k}, logits.options().dtype(acc)),
          at::empty({N}, logits.options().dtype(acc))};
}

// The optional per-row mask of generalized_jsd_fwd as a pointer (nullptr: every row on).
inline const bool* row_mask_ptr(const c10::optional<at::Tensor>& mask, const at::Tensor& logits, int64_t N) {
  if (!mask.has_value()) return nullptr;
  TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->numel() == N &&
                  mask->device() == logits.device(),
              "opdx::generalized_jsd_fwd: mask must be a contiguous bool tensor on the logits' device with one entry "
              "per row (", N, ")");
  return mask->const_data_ptr<bool>();
}

inline void check_generalized_jsd_inputs(const at::Tensor& student, const at::Tensor& teacher, double beta) {
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "opdx::generalized_jsd_fwd: student and teacher ",
              "dtypes differ (", student.scalar_type(), " vs ", teacher.scalar_type(), ")");
  TORCH_CHECK(student.dim() >= 1 && student.sizes() == teacher.sizes(),
              "opdx::generalized_jsd_fwd: student and teacher shapes differ: ", student.sizes(), " vs ",
              teacher.sizes());
  TORCH_CHECK(student.device() == teacher.device(), "opdx::generalized_jsd_fwd: student and teacher devices differ");
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "opdx::generalized_jsd_fwd: beta must be in [0, 1], got ", beta);
}

// generalized_jsd_scale_grad_: grad a contiguous [..., V] gradient, scale [N] contiguous in its accumulation dtype.
inline void check_scale_grad_inputs(const at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(grad.dim() >= 1 && grad.is_contiguous(), "opdx::generalized_jsd_scale_grad_: grad must be contiguous");
  TORCH_CHECK(scale.dim() == 1 && scale.is_contiguous() && scale.numel() == num_rows(grad),
              "opdx::generalized_jsd_scale_grad_: scale must be a contiguous [", num_rows(grad), "] tensor, got ",
              scale.sizes());
  TORCH_CHECK(scale.scalar_type() == acc_dtype_for(grad), "opdx::generalized_jsd_scale_grad_: scale must be ",
              acc_dtype_for(grad), " for a ", grad.scalar_type(), " gradient, got ", scale.scalar_type());
  TORCH_CHECK(scale.device() == grad.device(), "opdx::generalized_jsd_scale_grad_: grad and scale devices differ");
}

// a·b with an `acc` (fp32/fp64) result. Inputs already in `acc`: a plain matmul. bf16/fp16 inputs (CUDA): one tensor-
// core GEMM that writes fp32 (aten::mm.dtype, torch >= 2.8; setup.py refuses older torch for CUDA builds), so no
// result is rounded to the input dtype first. out= variant: `out` must be a contiguous `acc` tensor of the result shape.
inline at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  return a.scalar_type() == acc ? at::mm(a, b) : at::mm(a, b, acc);
}
inline void mm_acc_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::mm_out(out, a, b);
  } else {
    at::mm_out(out, a, b, out.scalar_type());
  }
}

}  // namespace opdx
