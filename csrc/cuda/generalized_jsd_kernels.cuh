// CUDA kernels of the generalized JSD (opdx::generalized_jsd_fwd). Torch-free (see cuda_common.cuh).
//
// One block per row, the row read three times (two for β = 0), 16-byte vector loads when the student, teacher (and
// gradient) rows share their alignment:
//   pass 1: online softmax statistics of both rows and the student's argmax (the gradient anchor, numerics.h)
//   pass 2: row loss and the row total the gradient needs (β = 0: writes the gradient instead)
//   pass 3: the gradient
// Re-reads rely on L2 (a block's two rows are 2·V·sizeof(scalar_t) bytes). All arithmetic in acc_t on upcast values.
// The launcher that picks this kernel or the sm_90 cluster kernel (each logit read from HBM once) is in
// generalized_jsd_cluster_kernels.cuh; this one runs on pre-sm_90 devices and for rows too long for the cluster.
#pragma once

#include <type_traits>

#include "cuda_common.cuh"
#include "opdx/row_slices.h"

namespace opdx {
namespace cuda {

// Block-wide ArgMax (numerics.h's order: the CPU kernel's too); all threads get it. blockDim.x % 32 == 0.
template <typename acc_t>
__device__ __forceinline__ ArgMax<acc_t> block_argmax(ArgMax<acc_t> a) {
  __shared__ ArgMax<acc_t> partial[32];
  __shared__ ArgMax<acc_t> result;
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1)
    a.merge({__shfl_xor_sync(0xffffffffu, a.value, m), __shfl_xor_sync(0xffffffffu, a.index, m)});
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (lane == 0) partial[warp] = a;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x / kWarpSize;
    a = lane < nwarps ? partial[lane] : ArgMax<acc_t>::empty();
#pragma unroll
    for (int m = kWarpSize / 2; m > 0; m >>= 1)
      a.merge({__shfl_xor_sync(0xffffffffu, a.value, m), __shfl_xor_sync(0xffffffffu, a.index, m)});
    if (lane == 0) result = a;
  }
  __syncthreads();
  return result;
}

// Sums two values over the block (double partials across warps); all threads get the results.
template <typename acc_t>
__device__ __forceinline__ void block_sum2(acc_t& x, acc_t& y) {
  __shared__ acc_t px[32];
  __shared__ acc_t py[32];
  __shared__ acc_t tx;
  __shared__ acc_t ty;
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, m);
    y += __shfl_xor_sync(0xffffffffu, y, m);
  }
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (lane == 0) {
    px[warp] = x;
    py[warp] = y;
  }
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x / kWarpSize;
    x = lane < nwarps ? px[lane] : acc_t(0);
    y = lane < nwarps ? py[lane] : acc_t(0);
#pragma unroll
    for (int m = kWarpSize / 2; m > 0; m >>= 1) {
      x += __shfl_xor_sync(0xffffffffu, x, m);
      y += __shfl_xor_sync(0xffffffffu, y, m);
    }
    if (lane == 0) {
      tx = x;
      ty = y;
    }
  }
  __syncthreads();
  x = tx;
  y = ty;
}

// Calls f(i, xs, xt) for every entry of the row with upcast (unscaled) values, using 16-byte loads of both rows when
// they share their alignment. Each thread visits a fixed subset of entries (the same subset in every pass). With
// s_copy / t_copy (at the rows' alignment mod 16 bytes) the raw rows are also copied there, vector by vector.
template <typename scalar_t, typename acc_t, typename F>
__device__ __forceinline__ void for_each_entry(const scalar_t* __restrict__ srow, const scalar_t* __restrict__ trow,
                                               int64_t V, bool vectorized, F&& f,
                                               scalar_t* __restrict__ s_copy = nullptr,
                                               scalar_t* __restrict__ t_copy = nullptr) {
  constexpr int kVec = RowSplit<scalar_t>::kVec;
  const bool copy = s_copy != nullptr;
  const auto scalar = [&](int64_t i) {
    const scalar_t s = srow[i], t = trow[i];
    if (copy) {
      s_copy[i] = s;
      t_copy[i] = t;
    }
    f(i, to_acc<acc_t>(s), to_acc<acc_t>(t));
  };
  if (!vectorized) {
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) scalar(i);
    return;
  }
  const RowSplit<scalar_t> split(srow, V);
  for (int64_t i = threadIdx.x; i < split.head; i += blockDim.x) scalar(i);
  for (int64_t j = threadIdx.x; j < split.nvec; j += blockDim.x) {
    const int64_t i0 = split.head + j * kVec;
    const VecOf<scalar_t> vs = load_vec(srow + i0);
    const VecOf<scalar_t> vt = load_vec(trow + i0);
    if (copy) {
      store_vec(s_copy + i0, vs);
      store_vec(t_copy + i0, vt);
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) f(i0 + k, to_acc<acc_t>(vs.v[k]), to_acc<acc_t>(vt.v[k]));
  }
  for (int64_t i = split.tail0 + threadIdx.x; i < V; i += blockDim.x) scalar(i);
}

// out[i] = from_acc(g(xs_i, xt_i)) for the whole row: 16-byte loads as in for_each_entry and, when `out` shares the
// input rows' alignment (in elements), the kVec results of a vector written with 16-byte stores.
template <typename scalar_t, typename grad_t, typename acc_t, typename G>
__device__ __forceinline__ void write_grad_row(const scalar_t* __restrict__ srow, const scalar_t* __restrict__ trow,
                                               grad_t* __restrict__ out, int64_t V, bool vectorized, G&& g) {
  constexpr int kVec = RowSplit<scalar_t>::kVec;
  constexpr int kOutVec = RowSplit<grad_t>::kVec;  // grad_t elements per 16-byte store
  const RowSplit<scalar_t> split(srow, V);
  const bool vec_out = vectorized && kVec % kOutVec == 0 &&
                       reinterpret_cast<uintptr_t>(out + split.head) % kVecBytes == 0;
  if (!vec_out) {
    for_each_entry<scalar_t, acc_t>(srow, trow, V, vectorized,
                                    [&](int64_t i, acc_t xs, acc_t xt) { out[i] = from_acc<grad_t>(g(xs, xt)); });
    return;
  }
  for (int64_t i = threadIdx.x; i < split.head; i += blockDim.x)
    out[i] = from_acc<grad_t>(g(to_acc<acc_t>(srow[i]), to_acc<acc_t>(trow[i])));
  for (int64_t j = threadIdx.x; j < split.nvec; j += blockDim.x) {
    const int64_t i0 = split.head + j * kVec;
    const VecOf<scalar_t> vs = load_vec(srow + i0);
    const VecOf<scalar_t> vt = load_vec(trow + i0);
#pragma unroll
    for (int part = 0; part < kVec / kOutVec; ++part) {
      VecOf<grad_t> vo;
#pragma unroll
      for (int k = 0; k < kOutVec; ++k)
        vo.v[k] = from_acc<grad_t>(g(to_acc<acc_t>(vs.v[part * kOutVec + k]), to_acc<acc_t>(vt.v[part * kOutVec + k])));
      store_vec(out + i0 + part * kOutVec, vo);
    }
  }
  for (int64_t i = split.tail0 + threadIdx.x; i < V; i += blockDim.x)
    out[i] = from_acc<grad_t>(g(to_acc<acc_t>(srow[i]), to_acc<acc_t>(trow[i])));
}

// Threads per block (at most; threads_for_row). 256 was the fastest for every β of the one-block-per-row kernel on an
// H200 (bf16 N=8192 V=131072 fwd+grad β=0.5: 8.2 ms at 256, 8.2 at 512, 8.6 at 1024; β=0: 3.5 / 4.0 / 4.4 ms; fp32
// V=32768: 2.2 / 2.5 / 2.6 ms; benchmarks/cuda/gjsd_variants.cu): smaller blocks keep more rows in flight per SM,
// so one row's pass-1 reads overlap another's arithmetic. No __launch_bounds__: with it ptxas spills these kernels
// (nvcc 13.0, sm_90); without it they use at most 96 registers (float64), and 256 × 96 fits the register file.
constexpr int kJsdMaxThreads = 256;

// A row's constants once pass 1 is done (both log-normalizers and the gradient anchor) and its per-entry math.
template <int kMode, typename acc_t>
struct JsdRowMath {
  acc_t beta, invT, lse_s, lse_t, c, anchor;

  // xs_top / xt_top: the raw logits at the student's argmax (unused for β = 0).
  __device__ __forceinline__ JsdRowMath(acc_t beta_, acc_t invT_, acc_t lse_s_, acc_t lse_t_, acc_t xs_top,
                                        acc_t xt_top)
      : beta(beta_), invT(invT_), lse_s(lse_s_), lse_t(lse_t_), c(lse_t_ - lse_s_), anchor(0) {
    if (kMode != kJsdForwardKL)
      anchor = jsd_anchor<kMode>(beta, xs_top * invT - lse_s, xt_top * invT - lse_t,
                                 jsd_delta(xs_top, xt_top, invT, c));
  }
  __device__ __forceinline__ void element(acc_t xs, acc_t xt, acc_t& loss, acc_t& total) const {
    jsd_element<kMode>(beta, xs * invT - lse_s, xt * invT - lse_t, jsd_delta(xs, xt, invT, c), anchor, loss, total);
  }
  __device__ __forceinline__ acc_t grad(acc_t xs, acc_t xt, acc_t total) const {
    return jsd_element_grad<kMode>(beta, xs * invT - lse_s, xt * invT - lse_t, jsd_delta(xs, xt, invT, c), anchor,
                                   total) *
           invT;
  }
};

// The row's constants from its merged pass-1 partial: the anchor reads both rows at the student's argmax (β > 0).
template <int kMode, typename scalar_t, typename acc_t>
__device__ __forceinline__ JsdRowMath<kMode, acc_t> jsd_row_math(const RowPartial<acc_t>& p,
                                                                 const scalar_t* __restrict__ srow,
                                                                 const scalar_t* __restrict__ trow, acc_t beta,
                                                                 acc_t inv_temperature) {
  const bool anchored = kMode != kJsdForwardKL;
  const int64_t top = p.top.index;
  return {beta, inv_temperature, p.student.logsumexp(), p.teacher.logsumexp(),
          anchored ? to_acc<acc_t>(srow[top]) : acc_t(0), anchored ? to_acc<acc_t>(trow[top]) : acc_t(0)};
}

// Pass 1 over V entries: both rows' softmax statistics and the student's argmax (index + index0), block-reduced.
template <int kMode, typename scalar_t, typename acc_t>
__device__ __forceinline__ RowPartial<acc_t> jsd_pass1(const scalar_t* __restrict__ srow,
                                                       const scalar_t* __restrict__ trow, int64_t V, bool vec_in,
                                                       acc_t invT, int64_t index0, scalar_t* s_copy = nullptr,
                                                       scalar_t* t_copy = nullptr) {
  RowPartial<acc_t> p = RowPartial<acc_t>::empty();
  for_each_entry<scalar_t, acc_t>(srow, trow, V, vec_in, [&](int64_t i, acc_t xs, acc_t xt) {
    p.student.add(xs * invT);
    p.teacher.add(xt * invT);
    if (kMode != kJsdForwardKL) p.top.update(xs * invT, index0 + i);
  }, s_copy, t_copy);
  p.student = block_merge_stats(p.student);
  p.teacher = block_merge_stats(p.teacher);
  if (kMode != kJsdForwardKL) p.top = block_argmax(p.top);
  return p;
}

// Pass 2 over V entries: the block's (loss, total) sums; β = 0 with `out` writes the gradient here too.
template <int kMode, typename scalar_t, typename grad_t, typename acc_t>
__device__ __forceinline__ RowSums<acc_t> jsd_pass2(const scalar_t* __restrict__ srow,
                                                    const scalar_t* __restrict__ trow, grad_t* __restrict__ out,
                                                    int64_t V, bool vec_in, const JsdRowMath<kMode, acc_t>& m) {
  acc_t loss = 0, total = 0;
  if (kMode == kJsdForwardKL && out != nullptr) {
    write_grad_row<scalar_t, grad_t, acc_t>(srow, trow, out, V, vec_in, [&](acc_t xs, acc_t xt) {
      acc_t l, k;
      m.element(xs, xt, l, k);
      loss += l;
      return m.grad(xs, xt, acc_t(0));
    });
  } else {
    for_each_entry<scalar_t, acc_t>(srow, trow, V, vec_in, [&](int64_t, acc_t xs, acc_t xt) {
      acc_t l, k;
      m.element(xs, xt, l, k);
      loss += l;
      total += k;
    });
  }
  block_sum2(loss, total);
  return {loss, total};
}

// Pass 3 over V entries (β > 0): the gradient, given the row total.
template <int kMode, typename scalar_t, typename grad_t, typename acc_t>
__device__ __forceinline__ void jsd_pass3(const scalar_t* __restrict__ srow, const scalar_t* __restrict__ trow,
                                          grad_t* __restrict__ out, int64_t V, bool vec_in,
                                          const JsdRowMath<kMode, acc_t>& m, acc_t total) {
  write_grad_row<scalar_t, grad_t, acc_t>(srow, trow, out, V, vec_in,
                                          [&](acc_t xs, acc_t xt) { return m.grad(xs, xt, total); });
}

// Zeroes entries [0, V) of a masked row's gradient (block-strided).
template <typename grad_t>
__device__ __forceinline__ void zero_row(grad_t* __restrict__ out, int64_t V) {
  if (out != nullptr)
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) out[i] = from_acc<grad_t>(0.0f);
}

template <int kMode, typename scalar_t, typename grad_t, typename acc_t>
__global__ void generalized_jsd_fwd_kernel(const scalar_t* __restrict__ student, RowIndexer s_rows,
                                           const scalar_t* __restrict__ teacher, RowIndexer t_rows, int64_t V,
                                           const bool* __restrict__ mask, acc_t beta, acc_t inv_temperature,
                                           acc_t* __restrict__ loss_out, grad_t* __restrict__ grad) {
  const int64_t r = blockIdx.x;
  grad_t* __restrict__ out = grad != nullptr ? grad + r * V : nullptr;
  if (mask != nullptr && !mask[r]) {
    if (threadIdx.x == 0) loss_out[r] = acc_t(0);
    zero_row(out, V);
    return;
  }
  const scalar_t* __restrict__ srow = student + s_rows.offset(r);
  const scalar_t* __restrict__ trow = teacher + t_rows.offset(r);
  const bool vec_in = reinterpret_cast<uintptr_t>(srow) % kVecBytes == reinterpret_cast<uintptr_t>(trow) % kVecBytes;
  const RowPartial<acc_t> p = jsd_pass1<kMode>(srow, trow, V, vec_in, inv_temperature, 0);
  const JsdRowMath<kMode, acc_t> m = jsd_row_math<kMode>(p, srow, trow, beta, inv_temperature);
  const RowSums<acc_t> sums = jsd_pass2<kMode>(srow, trow, out, V, vec_in, m);
  if (threadIdx.x == 0) loss_out[r] = sums.loss;
  if (kMode != kJsdForwardKL && out != nullptr) jsd_pass3<kMode>(srow, trow, out, V, vec_in, m, sums.total);
}

// Calls f(std::integral_constant<int, mode>) for β's mode (the kernels are templated on it).
template <typename F>
inline cudaError_t with_jsd_mode(double beta, F&& f) {
  switch (jsd_mode_for_beta(beta)) {
    case kJsdForwardKL:
      return f(std::integral_constant<int, kJsdForwardKL>{});
    case kJsdReverseKL:
      return f(std::integral_constant<int, kJsdReverseKL>{});
    default:
      return f(std::integral_constant<int, kJsdMixture>{});
  }
}

// The one-block-per-row kernel (any device; the fallback of generalized_jsd_cluster_kernels.cuh).
template <typename scalar_t, typename grad_t, typename acc_t>
cudaError_t launch_generalized_jsd_rows(const scalar_t* student, RowIndexer s_rows, const scalar_t* teacher,
                                        RowIndexer t_rows, int64_t N, int64_t V, const bool* mask, acc_t beta,
                                        acc_t inv_temperature, acc_t* loss, grad_t* grad, cudaStream_t stream,
                                        int max_threads = kJsdMaxThreads) {
  if (N == 0) return cudaSuccess;
  const int threads = threads_for_row<scalar_t>(V, max_threads);
  return with_jsd_mode(static_cast<double>(beta), [&](auto mode) {
    generalized_jsd_fwd_kernel<decltype(mode)::value, scalar_t, grad_t, acc_t>
        <<<static_cast<unsigned>(N), threads, 0, stream>>>(student, s_rows, teacher, t_rows, V, mask, beta,
                                                            inv_temperature, loss, grad);
    return cudaGetLastError();
  });
}

// grad[r, :] *= scale[r] in acc_t, one block per row, 16-byte loads and stores (the backward of the op: the gradient
// stored by the forward, scaled by the incoming per-row gradient).
template <typename grad_t, typename acc_t>
__global__ void scale_grad_rows_kernel(grad_t* __restrict__ grad, const acc_t* __restrict__ scale, int64_t V) {
  constexpr int kVec = RowSplit<grad_t>::kVec;
  grad_t* __restrict__ row = grad + static_cast<int64_t>(blockIdx.x) * V;
  const acc_t k = scale[blockIdx.x];
  const RowSplit<grad_t> split(row, V);
  const auto one = [&](int64_t i) { row[i] = from_acc<grad_t>(to_acc<acc_t>(row[i]) * k); };
  for (int64_t i = threadIdx.x; i < split.head; i += blockDim.x) one(i);
  for (int64_t j = threadIdx.x; j < split.nvec; j += blockDim.x) {
    grad_t* p = row + split.head + j * kVec;
    VecOf<grad_t> v = load_vec(p);
#pragma unroll
    for (int q = 0; q < kVec; ++q) v.v[q] = from_acc<grad_t>(to_acc<acc_t>(v.v[q]) * k);
    store_vec(p, v);
  }
  for (int64_t i = split.tail0 + threadIdx.x; i < V; i += blockDim.x) one(i);
}

template <typename grad_t, typename acc_t>
cudaError_t launch_scale_grad_rows(grad_t* grad, const acc_t* scale, int64_t N, int64_t V, cudaStream_t stream) {
  if (N == 0 || V == 0) return cudaSuccess;
  scale_grad_rows_kernel<grad_t, acc_t>
      <<<static_cast<unsigned>(N), threads_for_row<grad_t>(V, kJsdMaxThreads), 0, stream>>>(grad, scale, V);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace opdx

// The (scalar_t, grad_t, acc_t) combinations the torch glue launches: X(scalar_t, grad_t, acc_t) for each.
#define OPDX_GJSD_TYPES(X)                                                                                          \
  X(float, float, float)                                                                                            \
  X(__half, __half, float)                                                                                          \
  X(__half, float, float)                                                                                           \
  X(__nv_bfloat16, __nv_bfloat16, float)                                                                            \
  X(__nv_bfloat16, float, float)                                                                                    \
  X(double, double, double)

// Explicit instantiations for the torch-free compile check on CPU machines (tests/test_cuda_compile.py).
#if defined(OPDX_COMPILE_CHECK)
#define OPDX_INSTANTIATE_GJSD_ROWS(scalar_t, grad_t, acc_t)                                                         \
  template cudaError_t opdx::cuda::launch_generalized_jsd_rows<scalar_t, grad_t, acc_t>(                            \
      const scalar_t*, opdx::RowIndexer, const scalar_t*, opdx::RowIndexer, int64_t, int64_t, const bool*, acc_t,   \
      acc_t, acc_t*, grad_t*, cudaStream_t, int);
OPDX_GJSD_TYPES(OPDX_INSTANTIATE_GJSD_ROWS)
template cudaError_t opdx::cuda::launch_scale_grad_rows<float, float>(float*, const float*, int64_t, int64_t,
                                                                       cudaStream_t);
template cudaError_t opdx::cuda::launch_scale_grad_rows<__half, float>(__half*, const float*, int64_t, int64_t,
                                                                        cudaStream_t);
template cudaError_t opdx::cuda::launch_scale_grad_rows<__nv_bfloat16, float>(__nv_bfloat16*, const float*, int64_t,
                                                                               int64_t, cudaStream_t);
template cudaError_t opdx::cuda::launch_scale_grad_rows<double, double>(double*, const double*, int64_t, int64_t,
                                                                         cudaStream_t);
#endif
