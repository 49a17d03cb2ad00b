// CUDA kernels of the top-k renormalized KL and the fused teacher top-k. Torch-free (see cuda_common.cuh); the torch
// glue (sorting ids, allocating outputs) is in topk_kl.cu.
//
//   topk_gather_dot      one warp per (n, k): 16-byte vector loads of h_n and W[I_nk], fp32 FMA, shuffle reduction
//   topk_grad_hidden     one block per row n: each thread owns 16-byte slices of d, Σ_k g_nk·W[I_nk] in registers
//   topk_grad_weight     deterministic: ids sorted (stable) by the glue; segments of equal ids split into chunks of at
//                        most kSegChunk positions; a chunk reduces its positions in order (single-chunk segments write
//                        grad_W directly, longer ones write fp32 partials that a second kernel sums in chunk order);
//                        grid-stride over a layout padded to host-side bounds (the glue never synchronizes)
//   topk_grad_weight_atomic  opt-in (deterministic=False): fp32 atomics into an fp32 [V, d] buffer
//   topk_gjsd            one thread per row (K is small): topk_math.h
// teacher_topk's kernel is in topk_kl_teacher_kernels.cuh.
#pragma once

#include <algorithm>

#include "cuda_common.cuh"
#include "opdx/topk_math.h"

namespace opdx {
namespace cuda {

constexpr int kTopkThreads = 256;  // threads of the per-row kernels
constexpr int kDotWarps = 8;       // (n, k) pairs per block of the gather-dot
constexpr int kSegChunk = 256;     // positions per grad_weight chunk

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

// Σ_i a[i]·b[i] over one warp (all lanes get the result). kVectorized: d % kVec == 0 and both rows 16-byte aligned.
template <typename scalar_t, typename acc_t, bool kVectorized>
__device__ __forceinline__ acc_t warp_dot(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t d,
                                          int lane) {
  acc_t s = 0;
  if (kVectorized) {
    constexpr int kVec = RowSplit<scalar_t>::kVec;
    const int64_t nvec = d / kVec;
    for (int64_t i = lane; i < nvec; i += kWarpSize) {
      const VecOf<scalar_t> va = load_vec(a + i * kVec);
      const VecOf<scalar_t> vb = load_vec(b + i * kVec);
#pragma unroll
      for (int j = 0; j < kVec; ++j) s += to_acc<acc_t>(va.v[j]) * to_acc<acc_t>(vb.v[j]);
    }
  } else {
    for (int64_t i = lane; i < d; i += kWarpSize) s += to_acc<acc_t>(a[i]) * to_acc<acc_t>(b[i]);
  }
  return warp_sum(s);
}

// z[p] = (h[p / K]·W[ids[p]] + bias[ids[p]])·inv_temperature for the flat pair index p = n·K + k.
template <typename scalar_t, typename acc_t, bool kVectorized>
__global__ void __launch_bounds__(kDotWarps* kWarpSize)
    topk_gather_dot_kernel(const scalar_t* __restrict__ hidden, const scalar_t* __restrict__ weight,
                           const scalar_t* __restrict__ bias, const int64_t* __restrict__ ids, int64_t P, int64_t K,
                           int64_t d, acc_t inv_temperature, acc_t* __restrict__ z) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kDotWarps + threadIdx.x / kWarpSize;
  if (p >= P) return;
  const int64_t v = ids[p];
  acc_t s = warp_dot<scalar_t, acc_t, kVectorized>(hidden + (p / K) * d, weight + v * d, d, lane);
  if (lane == 0) {
    if (bias) s += to_acc<acc_t>(bias[v]);
    z[p] = s * inv_temperature;
  }
}

// out[j] (j over d, in slices of kVec) = scale·Σ_s coef(s)·row(s)[j]: the shared loop of grad_hidden (rows of W) and
// grad_weight (rows of h). Each thread keeps kVec accumulators per slice.
template <typename scalar_t, typename acc_t, bool kVectorized, typename Row, typename Coef, typename Store>
__device__ __forceinline__ void block_weighted_row_sum(int64_t d, int64_t count, Row row, Coef coef, Store store) {
  if (kVectorized) {
    constexpr int kVec = RowSplit<scalar_t>::kVec;
    const int64_t nvec = d / kVec;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      acc_t acc[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] = 0;
      for (int64_t s = 0; s < count; ++s) {
        const acc_t c = coef(s);
        if (c == acc_t(0)) continue;
        const VecOf<scalar_t> vr = load_vec(row(s) + i * kVec);
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[j] += c * to_acc<acc_t>(vr.v[j]);
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) store(i * kVec + j, acc[j]);
    }
  } else {
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      acc_t acc = 0;
      for (int64_t s = 0; s < count; ++s) {
        const acc_t c = coef(s);
        if (c != acc_t(0)) acc += c * to_acc<acc_t>(row(s)[i]);
      }
      store(i, acc);
    }
  }
}

// grad_h[n] = inv_temperature·Σ_k g[n, k]·W[ids[n, k]]; one block per row.
template <typename scalar_t, typename acc_t, typename out_t, bool kVectorized>
__global__ void __launch_bounds__(kTopkThreads)
    topk_grad_hidden_kernel(const acc_t* __restrict__ grad_z, const scalar_t* __restrict__ weight,
                            const int64_t* __restrict__ ids, int64_t K, int64_t d, acc_t inv_temperature,
                            out_t* __restrict__ grad_hidden) {
  const int64_t n = blockIdx.x;
  const acc_t* g = grad_z + n * K;
  const int64_t* idx = ids + n * K;
  out_t* out = grad_hidden + n * d;
  block_weighted_row_sum<scalar_t, acc_t, kVectorized>(
      d, K, [=](int64_t s) { return weight + idx[s] * d; }, [=](int64_t s) { return g[s]; },
      [=](int64_t j, acc_t v) { out[j] = from_acc<out_t>(v * inv_temperature); });
}

// Sorted-id segment layout built by the glue (all int64, on the device):
//   order[s]        flat pair index p = n·K + k of the s-th entry in id order (stable: p ascending within an id)
//   order_row[s]    its row n = p / K (precomputed: no 64-bit division in the inner loop)
//   seg_ids[u]      the u-th distinct id; seg_off[u] .. seg_off[u + 1] its entries in `order`
//   chunk_seg[c]    segment of chunk c; chunk_off[u] first chunk of segment u; nchunks[u] its chunk count
//   partial_off[u]  first fp32 partial row of segment u (only segments with nchunks > 1 use partials)
struct SegmentLayout {
  const int64_t* order;
  const int64_t* order_row;
  const int64_t* seg_ids;
  const int64_t* seg_off;
  const int64_t* chunk_seg;
  const int64_t* chunk_off;
  const int64_t* nchunks;
  const int64_t* partial_off;
};

template <typename scalar_t, typename acc_t, typename out_t, bool kVectorized>
__device__ __forceinline__ void grad_weight_chunk(int64_t c, int64_t u, const acc_t* __restrict__ grad_z,
                                                  const scalar_t* __restrict__ hidden, const SegmentLayout& seg,
                                                  int64_t d, acc_t inv_temperature, out_t* __restrict__ grad_weight,
                                                  out_t* __restrict__ grad_bias, acc_t* __restrict__ partial,
                                                  acc_t* __restrict__ partial_bias) {
  const int64_t local = c - seg.chunk_off[u];
  const int64_t start = seg.seg_off[u] + local * kSegChunk;
  const int64_t end = min(start + static_cast<int64_t>(kSegChunk), seg.seg_off[u + 1]);
  const int64_t* pos = seg.order + start;
  const int64_t* pos_row = seg.order_row + start;
  const bool direct = seg.nchunks[u] == 1;
  const int64_t v = seg.seg_ids[u];
  out_t* out = grad_weight + v * d;
  acc_t* part = direct ? nullptr : partial + (seg.partial_off[u] + local) * d;
  const auto row = [=](int64_t s) { return hidden + pos_row[s] * d; };
  const auto coef = [=](int64_t s) { return grad_z[pos[s]]; };
  if (direct)
    block_weighted_row_sum<scalar_t, acc_t, kVectorized>(
        d, end - start, row, coef, [=](int64_t j, acc_t val) { out[j] = from_acc<out_t>(val * inv_temperature); });
  else
    block_weighted_row_sum<scalar_t, acc_t, kVectorized>(d, end - start, row, coef,
                                                         [=](int64_t j, acc_t val) { part[j] = val; });
  if ((grad_bias || partial_bias) && threadIdx.x == 0) {
    acc_t b = 0;
    for (int64_t s = 0; s < end - start; ++s) b += grad_z[pos[s]];
    if (direct) {
      if (grad_bias) grad_bias[v] = from_acc<out_t>(b * inv_temperature);
    } else if (partial_bias) {
      partial_bias[seg.partial_off[u] + local] = b;
    }
  }
}

// One block per chunk of the bound: chunk_seg maps the padding chunks to num_segments, whose blocks exit at once (a
// grid-stride loop here makes ptxas spill).
template <typename scalar_t, typename acc_t, typename out_t, bool kVectorized>
__global__ void __launch_bounds__(kTopkThreads)
    topk_grad_weight_chunk_kernel(const acc_t* __restrict__ grad_z, const scalar_t* __restrict__ hidden,
                                  SegmentLayout seg, int64_t num_segments, int64_t d, acc_t inv_temperature,
                                  out_t* __restrict__ grad_weight, out_t* __restrict__ grad_bias,
                                  acc_t* __restrict__ partial, acc_t* __restrict__ partial_bias) {
  const int64_t c = blockIdx.x;
  const int64_t u = seg.chunk_seg[c];
  if (u >= num_segments) return;
  grad_weight_chunk<scalar_t, acc_t, out_t, kVectorized>(c, u, grad_z, hidden, seg, d, inv_temperature, grad_weight,
                                                         grad_bias, partial, partial_bias);
}

template <typename acc_t, typename out_t>
__device__ __forceinline__ void finalize_segment(int64_t u, const SegmentLayout& seg, int64_t d,
                                                 acc_t inv_temperature, out_t* __restrict__ grad_weight,
                                                 out_t* __restrict__ grad_bias, const acc_t* __restrict__ partial,
                                                 const acc_t* __restrict__ partial_bias) {
  const int64_t nc = seg.nchunks[u];
  if (nc <= 1) return;
  const int64_t v = seg.seg_ids[u];
  const acc_t* part = partial + seg.partial_off[u] * d;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    acc_t s = 0;
    for (int64_t c = 0; c < nc; ++c) s += part[c * d + j];
    grad_weight[v * d + j] = from_acc<out_t>(s * inv_temperature);
  }
  if (grad_bias && threadIdx.x == 0) {
    acc_t s = 0;
    for (int64_t c = 0; c < nc; ++c) s += partial_bias[seg.partial_off[u] + c];
    grad_bias[v] = from_acc<out_t>(s * inv_temperature);
  }
}

// Sums the partials of each multi-chunk segment in chunk order; grid-stride over the segment bound (padding
// segments have no chunks).
template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kTopkThreads)
    topk_grad_weight_finalize_kernel(SegmentLayout seg, int64_t num_segments, int64_t d, acc_t inv_temperature,
                                     out_t* __restrict__ grad_weight, out_t* __restrict__ grad_bias,
                                     const acc_t* __restrict__ partial, const acc_t* __restrict__ partial_bias) {
  for (int64_t u = blockIdx.x; u < num_segments; u += gridDim.x)
    finalize_segment(u, seg, d, inv_temperature, grad_weight, grad_bias, partial, partial_bias);
}

// Opt-in non-deterministic grad_weight: one warp per (n, k) pair adds g·h_n/T into an fp32/fp64 [V, d] buffer.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kDotWarps* kWarpSize)
    topk_grad_weight_atomic_kernel(const acc_t* __restrict__ grad_z, const scalar_t* __restrict__ hidden,
                                   const int64_t* __restrict__ ids, int64_t P, int64_t K, int64_t d,
                                   acc_t inv_temperature, acc_t* __restrict__ grad_weight_acc,
                                   acc_t* __restrict__ grad_bias_acc) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kDotWarps + threadIdx.x / kWarpSize;
  if (p >= P) return;
  const acc_t c = grad_z[p] * inv_temperature;
  if (c == acc_t(0)) return;
  const int64_t v = ids[p];
  const scalar_t* h = hidden + (p / K) * d;
  acc_t* out = grad_weight_acc + v * d;
  for (int64_t i = lane; i < d; i += kWarpSize) atomicAdd(out + i, c * to_acc<acc_t>(h[i]));
  if (grad_bias_acc && lane == 0) atomicAdd(grad_bias_acc + v, c);
}

// GJSD(β) over the K (or K+1) buckets per row; one thread per row.
constexpr int kGjsdRowsPerBlock = 128;

template <typename acc_t>
__global__ void topk_gjsd_kernel(const acc_t* __restrict__ z, const acc_t* __restrict__ t,
                                 const acc_t* __restrict__ student_lse, int64_t N, int64_t K, acc_t beta,
                                 acc_t* __restrict__ loss, acc_t* __restrict__ grad_z, acc_t* __restrict__ grad_lse) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const acc_t* zr = z + n * K;
  const acc_t* tr = t + n * K;
  acc_t* gr = grad_z + n * K;
  const bool tail = student_lse != nullptr;
  loss[n] = topk_gjsd_row<acc_t>(
      K, [&](int64_t k) { return zr[k]; }, [&](int64_t k) { return tr[k]; }, tail, tail ? student_lse[n] : acc_t(0),
      beta, [&](int64_t k, acc_t v) { gr[k] = v; }, tail ? grad_lse + n : nullptr);
}

// ---------------------------------------------------------------------------------------------------------------
// launchers
// ---------------------------------------------------------------------------------------------------------------
template <typename scalar_t>
inline bool rows_vectorizable(const void* a, const void* b, int64_t d) {
  constexpr int kVec = RowSplit<scalar_t>::kVec;
  return d % kVec == 0 && reinterpret_cast<uintptr_t>(a) % kVecBytes == 0 &&
         reinterpret_cast<uintptr_t>(b) % kVecBytes == 0;
}

inline unsigned blocks_for(int64_t n, int64_t per_block) { return static_cast<unsigned>((n + per_block - 1) / per_block); }

template <typename scalar_t, typename acc_t>
cudaError_t launch_topk_gather_dot(const scalar_t* hidden, const scalar_t* weight, const scalar_t* bias,
                                   const int64_t* ids, int64_t N, int64_t K, int64_t d, acc_t inv_temperature,
                                   acc_t* z, cudaStream_t stream) {
  const int64_t P = N * K;
  if (P == 0) return cudaSuccess;
  const unsigned blocks = blocks_for(P, kDotWarps);
  if (rows_vectorizable<scalar_t>(hidden, weight, d))
    topk_gather_dot_kernel<scalar_t, acc_t, true><<<blocks, kDotWarps * kWarpSize, 0, stream>>>(
        hidden, weight, bias, ids, P, K, d, inv_temperature, z);
  else
    topk_gather_dot_kernel<scalar_t, acc_t, false><<<blocks, kDotWarps * kWarpSize, 0, stream>>>(
        hidden, weight, bias, ids, P, K, d, inv_temperature, z);
  return cudaGetLastError();
}

template <typename scalar_t>
inline int threads_for_dim(int64_t d, bool vectorized) {
  const int64_t units = vectorized ? d / RowSplit<scalar_t>::kVec : d;
  int threads = 32;
  while (threads < kTopkThreads && threads < units) threads *= 2;
  return threads;
}

// out_t: scalar_t, or acc_t when the caller sums several gradient contributions before one rounding.
template <typename scalar_t, typename acc_t, typename out_t>
cudaError_t launch_topk_grad_hidden(const acc_t* grad_z, const scalar_t* weight, const int64_t* ids, int64_t N,
                                    int64_t K, int64_t d, acc_t inv_temperature, out_t* grad_hidden,
                                    cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  const bool vec = rows_vectorizable<scalar_t>(weight, weight, d);
  const int threads = threads_for_dim<scalar_t>(d, vec);
  if (vec)
    topk_grad_hidden_kernel<scalar_t, acc_t, out_t, true><<<static_cast<unsigned>(N), threads, 0, stream>>>(
        grad_z, weight, ids, K, d, inv_temperature, grad_hidden);
  else
    topk_grad_hidden_kernel<scalar_t, acc_t, out_t, false><<<static_cast<unsigned>(N), threads, 0, stream>>>(
        grad_z, weight, ids, K, d, inv_temperature, grad_hidden);
  return cudaGetLastError();
}

// grad_weight and grad_bias must be zero-filled (ids absent from `ids` keep 0). num_segments, num_chunks and
// num_partials are the host-side upper bounds the layout is padded to (no host synchronization); partial holds
// num_partials·d and partial_bias num_partials entries (may be null when num_partials == 0 / without bias).
constexpr int64_t kMaxGridBlocks = 8192;  // the finalize kernel's grid cap (grid-stride over the segment bound)

template <typename scalar_t, typename acc_t, typename out_t>
cudaError_t launch_topk_grad_weight(const acc_t* grad_z, const scalar_t* hidden, SegmentLayout seg,
                                    int64_t num_segments, int64_t num_chunks, int64_t num_partials, int64_t d,
                                    acc_t inv_temperature, out_t* grad_weight, out_t* grad_bias, acc_t* partial,
                                    acc_t* partial_bias, cudaStream_t stream) {
  if (num_chunks == 0) return cudaSuccess;
  const bool vec = rows_vectorizable<scalar_t>(hidden, hidden, d);
  const int threads = threads_for_dim<scalar_t>(d, vec);
  acc_t* pb = grad_bias ? partial_bias : nullptr;
  const unsigned chunk_blocks = static_cast<unsigned>(num_chunks);
  if (vec)
    topk_grad_weight_chunk_kernel<scalar_t, acc_t, out_t, true><<<chunk_blocks, threads, 0, stream>>>(
        grad_z, hidden, seg, num_segments, d, inv_temperature, grad_weight, grad_bias, partial, pb);
  else
    topk_grad_weight_chunk_kernel<scalar_t, acc_t, out_t, false><<<chunk_blocks, threads, 0, stream>>>(
        grad_z, hidden, seg, num_segments, d, inv_temperature, grad_weight, grad_bias, partial, pb);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || num_partials == 0) return err;
  const unsigned seg_blocks = static_cast<unsigned>(std::min(num_segments, kMaxGridBlocks));
  topk_grad_weight_finalize_kernel<acc_t, out_t><<<seg_blocks, kTopkThreads, 0, stream>>>(
      seg, num_segments, d, inv_temperature, grad_weight, grad_bias, partial, pb);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_topk_grad_weight_atomic(const acc_t* grad_z, const scalar_t* hidden, const int64_t* ids, int64_t N,
                                           int64_t K, int64_t d, acc_t inv_temperature, acc_t* grad_weight_acc,
                                           acc_t* grad_bias_acc, cudaStream_t stream) {
  const int64_t P = N * K;
  if (P == 0) return cudaSuccess;
  topk_grad_weight_atomic_kernel<scalar_t, acc_t><<<blocks_for(P, kDotWarps), kDotWarps * kWarpSize, 0, stream>>>(
      grad_z, hidden, ids, P, K, d, inv_temperature, grad_weight_acc, grad_bias_acc);
  return cudaGetLastError();
}

template <typename acc_t>
cudaError_t launch_topk_gjsd(const acc_t* z, const acc_t* t, const acc_t* student_lse, int64_t N, int64_t K,
                             acc_t beta, acc_t* loss, acc_t* grad_z, acc_t* grad_lse, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  constexpr int kThreads = kGjsdRowsPerBlock;
  topk_gjsd_kernel<acc_t><<<blocks_for(N, kThreads), kThreads, 0, stream>>>(z, t, student_lse, N, K, beta, loss,
                                                                             grad_z, grad_lse);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace opdx

// Explicit instantiations for the torch-free compile check on CPU machines (tests/test_cuda_compile.py).
#if defined(OPDX_COMPILE_CHECK)
#define OPDX_INSTANTIATE_TOPK_GRADS(scalar_t, acc_t, out_t)                                                        \
  template cudaError_t opdx::cuda::launch_topk_grad_hidden<scalar_t, acc_t, out_t>(                                  \
      const acc_t*, const scalar_t*, const int64_t*, int64_t, int64_t, int64_t, acc_t, out_t*, cudaStream_t);        \
  template cudaError_t opdx::cuda::launch_topk_grad_weight<scalar_t, acc_t, out_t>(                                  \
      const acc_t*, const scalar_t*, opdx::cuda::SegmentLayout, int64_t, int64_t, int64_t, int64_t, acc_t, out_t*,   \
      out_t*, acc_t*, acc_t*, cudaStream_t);
#define OPDX_INSTANTIATE_TOPK(scalar_t, acc_t)                                                                       \
  template cudaError_t opdx::cuda::launch_topk_gather_dot<scalar_t, acc_t>(                                          \
      const scalar_t*, const scalar_t*, const scalar_t*, const int64_t*, int64_t, int64_t, int64_t, acc_t, acc_t*,  \
      cudaStream_t);                                                                                                 \
  template cudaError_t opdx::cuda::launch_topk_grad_weight_atomic<scalar_t, acc_t>(                                  \
      const acc_t*, const scalar_t*, const int64_t*, int64_t, int64_t, int64_t, acc_t, acc_t*, acc_t*,              \
      cudaStream_t);
OPDX_INSTANTIATE_TOPK(float, float)
OPDX_INSTANTIATE_TOPK(__half, float)
OPDX_INSTANTIATE_TOPK(__nv_bfloat16, float)
OPDX_INSTANTIATE_TOPK(double, double)
OPDX_INSTANTIATE_TOPK_GRADS(float, float, float)
OPDX_INSTANTIATE_TOPK_GRADS(__half, float, __half)
OPDX_INSTANTIATE_TOPK_GRADS(__half, float, float)
OPDX_INSTANTIATE_TOPK_GRADS(__nv_bfloat16, float, __nv_bfloat16)
OPDX_INSTANTIATE_TOPK_GRADS(__nv_bfloat16, float, float)
OPDX_INSTANTIATE_TOPK_GRADS(double, double, double)
template cudaError_t opdx::cuda::launch_topk_gjsd<float>(const float*, const float*, const float*, int64_t, int64_t,
                                                         float, float*, float*, float*, cudaStream_t);
template cudaError_t opdx::cuda::launch_topk_gjsd<double>(const double*, const double*, const double*, int64_t,
                                                          int64_t, double, double*, double*, double*, cudaStream_t);
#endif
