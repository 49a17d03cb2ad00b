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
