// CPU building blocks for row-streaming kernels: rows are processed in cache-resident chunks that are upcast to the
// accumulation type on the stack (never a full-row or [N, V] copy), with loops the compiler vectorizes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "opdx/numerics.h"

namespace opdx {
namespace cpu {

constexpr int64_t kChunk = 2048;

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// dst[i] = float(src[i]) * scale
template <typename scalar_t, typename acc_t>
inline void load_scaled(const scalar_t* __restrict__ src, int64_t n, acc_t scale, acc_t* __restrict__ dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]) * scale;
}

template <typename acc_t>
inline acc_t chunk_max(const acc_t* __restrict__ x, int64_t n) {
  acc_t m = neg_inf<acc_t>();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// Softmax statistics of one chunk (see SoftmaxStats); the chunk's own max is the reference point.
template <typename acc_t>
inline SoftmaxStats<acc_t> chunk_stats(const acc_t* __restrict__ x, int64_t n, bool with_entropy) {
  const acc_t m = chunk_max(x, n);
  if (!(m > neg_inf<acc_t>())) return SoftmaxStats<acc_t>::empty();
  acc_t s = 0, w = 0;
  if (with_entropy) {
#pragma omp simd reduction(+ : s, w)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t d = x[i] - m;
      const acc_t e = fast_exp(d);
      s += e;
      w += e > acc_t(0) ? e * d : acc_t(0);
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += fast_exp(x[i] - m);
  }
  return {m, s, w};
}

// Streams a row once, chunk by chunk, and returns its softmax statistics of x * scale.
template <typename scalar_t, typename acc_t>
inline SoftmaxStats<acc_t> row_stats(const scalar_t* row, int64_t V, acc_t scale, bool with_entropy, acc_t* buf) {
  SoftmaxStats<acc_t> st = SoftmaxStats<acc_t>::empty();
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    load_scaled(row + start, n, scale, buf);
    st.merge(chunk_stats(buf, n, with_entropy));
  }
  return st;
}

// Rows per parallel task: enough that each task streams at least ~64k elements.
inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)); }

}  // namespace cpu
}  // namespace opdx
