// CPU building blocks for row-streaming kernels: rows are processed in cache-resident chunks that are upcast to the
// accumulation type on the stack (never a full-row or [N, V] copy), with loops the compiler vectorizes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// Largest value of a chunk (NaN ignored; −inf when there is none).
template <typename acc_t>
inline acc_t chunk_max(const acc_t* __restrict__ x, int64_t n) {
  acc_t m = neg_inf<acc_t>();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// Folds chunk x (row entries offset .. offset + n) into a running ArgMax: only a chunk whose maximum beats the current
// one is scanned (for its first maximum), so chunks visited in index order give ArgMax's order exactly.
template <typename acc_t>
inline void chunk_argmax(ArgMax<acc_t>& am, const acc_t* __restrict__ x, int64_t n, int64_t offset) {
  const acc_t m = chunk_max(x, n);
  if (!(m > am.value)) return;
  int64_t i = 0;
  while (!(x[i] == m)) ++i;
  am = {m, offset + i};
}

// Softmax statistics of one chunk (see values_stats, shared with the CUDA kernels).
template <typename acc_t>
inline SoftmaxStats<acc_t> chunk_stats(const acc_t* __restrict__ x, int64_t n, bool with_entropy) {
  return values_stats(x, n, with_entropy);
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

// In place over a chunk of scaled logits x: x_i <- (−g_logp·p_i − g_H·p_i·(log p_i + H))·scale with
// p_i = exp(x_i − lse): the token-logprob (+ entropy) gradient without the one-hot term.
template <typename acc_t>
inline void chunk_logprob_grad(acc_t* __restrict__ x, int64_t n, acc_t lse, acc_t grad_logp, acc_t grad_entropy,
                               acc_t entropy, acc_t scale) {
  const acc_t coef = -grad_logp * scale;
  if (grad_entropy == acc_t(0)) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] = coef * fast_exp(x[i] - lse);
  } else {
    const acc_t ent_coef = -grad_entropy * scale;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc_t log_p = x[i] - lse;
      const acc_t p = fast_exp(log_p);
      x[i] = coef * p + (p > acc_t(0) ? ent_coef * p * (log_p + entropy) : acc_t(0));
    }
  }
}

template <typename scalar_t, typename acc_t>
inline void store_chunk(const acc_t* __restrict__ src, int64_t n, scalar_t* __restrict__ dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// at::empty for large [N, V] outputs. Fresh large allocations are page-faulted in 4 KiB pages on first write, which
// costs more than the kernel itself on a 256 MB gradient; asking for transparent huge pages (when the kernel's THP
// mode is `madvise`) cuts that ~3x. The hint changes nothing else.
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t aligned = (begin + kHuge - 1) & ~(kHuge - 1);
  if (t.nbytes() >= 4 * kHuge && end > aligned + kHuge) {
    (void)madvise(reinterpret_cast<void*>(aligned), (end - aligned) & ~(kHuge - 1), MADV_HUGEPAGE);
  }
#endif
  return t;
}

// Rows per parallel task: enough that each task streams at least ~64k elements.
inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)); }

}  // namespace cpu
}  // namespace opdx
