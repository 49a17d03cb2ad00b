// Host-side pieces shared by the CPU and CUDA fused lm_head + loss ops (csrc/cpu/linear_losses.cpp,
// csrc/cuda/linear_losses.cu): vocabulary tile size, input checks and the JSD-mode dispatch.
#pragma once

#include <type_traits>

#include "opdx/torch_utils.h"

namespace opdx {
namespace linear {

constexpr int64_t kTileElems = int64_t(1) << 23;  // 8M elements (32 MiB fp32) per [N, tile] buffer by default

inline int64_t choose_tile(int64_t requested, int64_t N, int64_t V) {
  int64_t tile = requested;
  if (tile <= 0) {
    tile = kTileElems / std::max<int64_t>(N, 1);
    tile = std::max<int64_t>(512, std::min<int64_t>(16384, tile));
    tile = tile / 128 * 128;
  }
  return std::max<int64_t>(1, std::min(tile, V));
}

inline void check_linear_inputs(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
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

// linear_token_logprobs: targets [N] (fwd) and the backward's per-row vectors.
inline void check_targets(const char* op, const at::Tensor& targets, int64_t N) {
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.is_contiguous() &&
                  targets.numel() == N,
              op, ": targets must be a contiguous int64 [N] tensor (N = ", N, ")");
}
inline void check_row_vectors(const char* op, at::ScalarType acc, int64_t N, const at::Tensor& grad_logp,
                              const at::Tensor& lse) {
  TORCH_CHECK(grad_logp.scalar_type() == acc && lse.scalar_type() == acc && grad_logp.is_contiguous() &&
                  lse.is_contiguous() && grad_logp.numel() == N && lse.numel() == N,
              op, ": grad_logp and lse must be contiguous [N] ", acc, " tensors");
}

// linear_generalized_jsd. `same_dtype`: the CUDA kernels dispatch on one dtype for both sides; the CPU ones only
// need one accumulation dtype.
inline void check_jsd_inputs(const char* op, const at::Tensor& hs, const at::Tensor& ws,
                             const c10::optional<at::Tensor>& bs, const at::Tensor& ht, const at::Tensor& wt,
                             const c10::optional<at::Tensor>& bt, const c10::optional<at::Tensor>& mask, int64_t V,
                             double beta, bool same_dtype) {
  check_linear_inputs(op, hs, ws, bs, V);
  check_linear_inputs(op, ht, wt, bt, V);
  TORCH_CHECK(hs.size(0) == ht.size(0), op, ": student and teacher hidden have ", hs.size(0), " and ", ht.size(0),
              " rows");
  TORCH_CHECK(!same_dtype || hs.scalar_type() == ht.scalar_type(), op, ": student and teacher dtypes differ (",
              hs.scalar_type(), " vs ", ht.scalar_type(), ")");
  TORCH_CHECK(acc_dtype_for(hs) == acc_dtype_for(ht), op, ": student and teacher must both be float64 or neither");
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, op, ": beta must be in [0, 1], got ", beta);
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->numel() == hs.size(0), op,
                ": mask must be a contiguous bool tensor with one entry per row (", hs.size(0), ")");
  }
}

// Row statistics saved for the backward, packed as one [4, N] tensor: lse_s, lse_t, anchor, row total.
enum JsdStat : int64_t { kLseS = 0, kLseT = 1, kAnchor = 2, kTotal = 3, kNumJsdStats = 4 };

inline void check_jsd_bwd_inputs(const char* op, at::ScalarType acc, int64_t N, const at::Tensor& grad_loss,
                                 const at::Tensor& stats) {
  TORCH_CHECK(grad_loss.scalar_type() == acc && grad_loss.is_contiguous() && grad_loss.numel() == N, op,
              ": grad_loss must be a contiguous [N] ", acc, " tensor");
  TORCH_CHECK(stats.scalar_type() == acc && stats.is_contiguous() && stats.dim() == 2 &&
                  stats.size(0) == kNumJsdStats && stats.size(1) == N,
              op, ": stats must be the contiguous [4, N] row statistics returned by the forward");
}

// Both sides of a linear_generalized_jsd call; Linear is the device's tiled lm_head (TiledLinear of each launch file).
template <typename Linear>
struct JsdInputs {
  Linear student;
  Linear teacher;
  const bool* mask;
  int64_t N;
  int64_t V;

  JsdInputs(const at::Tensor& sh, const at::Tensor& sw, const c10::optional<at::Tensor>& sb, const at::Tensor& th,
            const at::Tensor& tw, const c10::optional<at::Tensor>& tb, const c10::optional<at::Tensor>& m, int64_t V_)
      : student(sh, sw, sb), teacher(th, tw, tb), mask(m.has_value() ? m->const_data_ptr<bool>() : nullptr),
        N(sh.size(0)), V(V_) {}
};

// Calls fn with the JSD mode for beta as a compile-time constant (kernels are templated on it).
template <typename Fn>
inline void dispatch_jsd_mode(double beta, Fn&& fn) {
  switch (jsd_mode_for_beta(beta)) {
    case kJsdForwardKL:
      fn(std::integral_constant<int, kJsdForwardKL>{});
      break;
    case kJsdReverseKL:
      fn(std::integral_constant<int, kJsdReverseKL>{});
      break;
    default:
      fn(std::integral_constant<int, kJsdMixture>{});
  }
}

}  // namespace linear
}  // namespace opdx
