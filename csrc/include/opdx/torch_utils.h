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

}  // namespace opdx
