// Device building blocks shared by the opdx CUDA kernels. Depends only on CUDA (no torch), so CPU-only machines
// can compile-check every kernel with nvcc (tests/test_cuda_compile.py).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "opdx/numerics.h"

namespace opdx {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kVecBytes = 16;

template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(float x) { return static_cast<acc_t>(x); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(double x) { return static_cast<acc_t>(x); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__half x) { return static_cast<acc_t>(__half2float(x)); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__nv_bfloat16 x) { return static_cast<acc_t>(__bfloat162float(x)); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(double x) { return static_cast<scalar_t>(x); }

// A row of V scalars starting at `row` (aligned to sizeof(scalar_t) only) is split into a scalar head up to the first
// 16-byte boundary, a body of 16-byte vectors, and a scalar tail.
template <typename scalar_t>
struct RowSplit {
  static constexpr int kVec = kVecBytes / sizeof(scalar_t);
  int64_t head;   // scalars before the first aligned vector
  int64_t nvec;   // aligned vectors
  int64_t tail0;  // first scalar of the tail

  __device__ __forceinline__ RowSplit(const void* row, int64_t V) {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
    const int64_t mis = static_cast<int64_t>((addr % kVecBytes) / sizeof(scalar_t));
    head = mis == 0 ? 0 : (kVec - mis);
    if (head > V) head = V;
    nvec = (V - head) / kVec;
    tail0 = head + nvec * kVec;
  }
};

template <typename scalar_t>
struct alignas(kVecBytes) VecOf {
  scalar_t v[RowSplit<scalar_t>::kVec];
};

template <typename scalar_t>
__device__ __forceinline__ VecOf<scalar_t> load_vec(const scalar_t* p) {
  return *reinterpret_cast<const VecOf<scalar_t>*>(p);
}
template <typename scalar_t>
__device__ __forceinline__ void store_vec(scalar_t* p, const VecOf<scalar_t>& v) {
  *reinterpret_cast<VecOf<scalar_t>*>(p) = v;
}

template <typename acc_t>
__device__ __forceinline__ SoftmaxStats<acc_t> shfl_xor_stats(const SoftmaxStats<acc_t>& s, int lane_mask) {
  SoftmaxStats<acc_t> o;
  o.max = __shfl_xor_sync(0xffffffffu, s.max, lane_mask);
  o.sum = __shfl_xor_sync(0xffffffffu, s.sum, lane_mask);
  o.wsum = __shfl_xor_sync(0xffffffffu, s.wsum, lane_mask);
  return o;
}

// Merges the statistics of every thread of the block; all threads get the result. blockDim.x % 32 == 0.
template <typename acc_t>
__device__ __forceinline__ SoftmaxStats<acc_t> block_merge_stats(SoftmaxStats<acc_t> st) {
  __shared__ SoftmaxStats<acc_t> partial[32];
  __shared__ SoftmaxStats<acc_t> total;
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) st.merge(shfl_xor_stats(st, m));
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (lane == 0) partial[warp] = st;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x / kWarpSize;
    st = lane < nwarps ? partial[lane] : SoftmaxStats<acc_t>::empty();
#pragma unroll
    for (int m = kWarpSize / 2; m > 0; m >>= 1) st.merge(shfl_xor_stats(st, m));
    if (lane == 0) total = st;
  }
  __syncthreads();
  return total;
}

// Sum over the block; all threads get the result. blockDim.x % 32 == 0.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t x) {
  __shared__ acc_t partial[32];
  __shared__ acc_t total;
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x / kWarpSize;
    x = lane < nwarps ? partial[lane] : acc_t(0);
#pragma unroll
    for (int m = kWarpSize / 2; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
    if (lane == 0) total = x;
  }
  __syncthreads();
  return total;
}

// Most threads a row-block kernel is launched with; its __launch_bounds__ (so the compiler keeps the registers per
// thread within what a block of that size may use, and the launch can never fail for lack of registers). float64
// rows: 512 (their kernels need more than the 64 registers a 1024-thread block leaves each thread; no spills).
template <typename acc_t>
constexpr int kMaxRowThreads = sizeof(acc_t) == 8 ? 512 : 1024;

// Threads per row-block: enough 16-byte vectors per thread to hide latency, at least one warp, at most `max_threads`.
template <typename scalar_t>
inline int threads_for_row(int64_t V, int max_threads) {
  const int64_t vecs = (V + RowSplit<scalar_t>::kVec - 1) / RowSplit<scalar_t>::kVec;
  int threads = 32;
  while (threads < max_threads && vecs > threads * 8) threads *= 2;
  return threads;
}

}  // namespace cuda
}  // namespace opdx
