// CUDA kernels of the top-k renormalized KL and the fused teacher top-k. Torch-free (see cuda_common.cuh); the torch
// glue (sorting ids, allocating outputs) is in topk_kl.cu.
//
//   topk_gather_dot      one warp per (n, k): 16-byte vector loads of h_n and W[I_nk], fp32 FMA, shuffle reduction
//   topk_grad_hidden     one block per row n: each thread owns 16-byte slices of d, Σ_k g_nk·W[I_nk] in registers
//   topk_grad_weight     deterministic: ids sorted (stable) by the glue; segments of equal ids split into chunks of at
//                        most kSegChunk positions; a chunk reduces its positions in order (single-chunk segments write
//                        grad_W directly, longer ones write fp32 partials that a second kernel sums in chunk order)
//   topk_grad_weight_atomic  opt-in (deterministic=False): fp32 atomics into an fp32 [V, d] buffer
//   topk_gjsd            one thread per row (K is small): topk_math.h
//   teacher_topk         one block per row: online logsumexp fused into the first pass of an 11-bit radix select of
//                        the k-th largest key, a collection pass (key > threshold by atomics; ties at the threshold
//                        taken in index order when not all fit), and a rank sort of the k candidates in shared memory
#pragma once

#include "cuda_common.cuh"
#include "opdx/topk_math.h"

namespace opdx {
namespace cuda {

constexpr int kTopkThreads = 256;  // threads of the per-row kernels
constexpr int kDotWarps = 8;       // (n, k) pairs per block of the gather-dot
constexpr int kSegChunk = 256;     // positions per grad_weight chunk
constexpr int kMaxTeacherK = 1024;  // teacher_topk's k limit (shared-memory candidate buffer)

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
__global__ void __launch_bounds__(kTopkThreads)
    topk_grad_weight_chunk_kernel(const acc_t* __restrict__ grad_z, const scalar_t* __restrict__ hidden,
                                  SegmentLayout seg, int64_t K, int64_t d, acc_t inv_temperature,
                                  out_t* __restrict__ grad_weight, out_t* __restrict__ grad_bias,
                                  acc_t* __restrict__ partial, acc_t* __restrict__ partial_bias) {
  const int64_t c = blockIdx.x;
  const int64_t u = seg.chunk_seg[c];
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

// Sums the partials of each multi-chunk segment in chunk order; one block per segment.
template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kTopkThreads)
    topk_grad_weight_finalize_kernel(SegmentLayout seg, int64_t d, acc_t inv_temperature,
                                     out_t* __restrict__ grad_weight, out_t* __restrict__ grad_bias,
                                     const acc_t* __restrict__ partial, const acc_t* __restrict__ partial_bias) {
  const int64_t u = blockIdx.x;
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
// teacher_topk
// ---------------------------------------------------------------------------------------------------------------
// The radix select works on topk_order_key (topk_math.h: the CPU kernel's order too).
template <typename acc_t>
struct OrderedKey {
  using type = decltype(topk_order_key(acc_t(0)));
  __device__ __forceinline__ static type of(acc_t x) { return topk_order_key(x); }
};

// Calls f(i, value_i) for every element of a row, with 16-byte vector loads for the aligned body.
template <typename scalar_t, typename acc_t, typename F>
__device__ __forceinline__ void for_each_in_row(const scalar_t* row, int64_t V, F f) {
  const RowSplit<scalar_t> split(row, V);
  constexpr int kVec = RowSplit<scalar_t>::kVec;
  for (int64_t i = threadIdx.x; i < split.head; i += blockDim.x) f(i, to_acc<acc_t>(row[i]));
  const scalar_t* body = row + split.head;
  for (int64_t i = threadIdx.x; i < split.nvec; i += blockDim.x) {
    const VecOf<scalar_t> vec = load_vec(body + i * kVec);
#pragma unroll
    for (int j = 0; j < kVec; ++j) f(split.head + i * kVec + j, to_acc<acc_t>(vec.v[j]));
  }
  for (int64_t i = split.tail0 + threadIdx.x; i < V; i += blockDim.x) f(i, to_acc<acc_t>(row[i]));
}

constexpr int kRadixBits = 11;
constexpr int kRadixBins = 1 << kRadixBits;

// No __launch_bounds__: with it ptxas (nvcc 13.0, sm_80) spills this kernel; at 256 threads a block can never lack
// registers (256 × 255 <= 64k).
template <typename scalar_t, typename acc_t>
__global__ void teacher_topk_kernel(const scalar_t* __restrict__ logits, RowIndexer rows, int64_t V, int k, acc_t inv_temperature,
                        int64_t* __restrict__ ids_out, acc_t* __restrict__ lp_out, acc_t* __restrict__ lse_out) {
  using key_t = typename OrderedKey<acc_t>::type;
  constexpr int kKeyBits = static_cast<int>(sizeof(key_t) * 8);
  constexpr int kPasses = (kKeyBits + kRadixBits - 1) / kRadixBits;
  __shared__ unsigned int hist[kRadixBins];
  __shared__ key_t cand_key[kMaxTeacherK];
  __shared__ int64_t cand_id[kMaxTeacherK];
  __shared__ int sel_bin;
  __shared__ int sel_above;
  __shared__ int n_cand;
  __shared__ int warp_counts[kTopkThreads / kWarpSize];

  const int64_t r = blockIdx.x;
  const scalar_t* row = logits + rows.offset(r);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;

  key_t prefix = 0, prefix_mask = 0;
  int remaining = k;  // how many of the still-matching keys belong to the top-k
  int tie_count = 0;  // elements whose key equals the final threshold
  SoftmaxStats<acc_t> st = SoftmaxStats<acc_t>::empty();
#pragma unroll 1
  for (int pass = 0; pass < kPasses; ++pass) {
    const int hi = kKeyBits - pass * kRadixBits;
    const int shift = hi > kRadixBits ? hi - kRadixBits : 0;
    const int width = hi - shift;
    const int nbins = 1 << width;
    for (int i = threadIdx.x; i < nbins; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    const key_t digit_mask = static_cast<key_t>(nbins - 1);
    for_each_in_row<scalar_t, acc_t>(row, V, [&](int64_t, acc_t x) {
      if (pass == 0) st.add(x * inv_temperature);
      const key_t key = OrderedKey<acc_t>::of(x);
      if ((key & prefix_mask) == prefix) atomicAdd(&hist[static_cast<int>((key >> shift) & digit_mask)], 1u);
    });
    __syncthreads();
    // Warp 0 finds the bin holding the remaining-th largest key: lanes own contiguous ranges of bins, a suffix scan
    // over lanes finds the lane, that lane scans its range from the top.
    if (warp == 0) {
      const int per = nbins / kWarpSize;
      int own = 0;
      for (int j = 0; j < per; ++j) own += static_cast<int>(hist[lane * per + j]);
      int suffix = own;  // Σ over lanes >= lane
#pragma unroll
      for (int m = 1; m < kWarpSize; m <<= 1) {
        const int other = __shfl_down_sync(0xffffffffu, suffix, m);
        if (lane + m < kWarpSize) suffix += other;
      }
      const unsigned ok = __ballot_sync(0xffffffffu, suffix >= remaining);
      const int owner = kWarpSize - 1 - __clz(static_cast<int>(ok));
      if (lane == owner) {
        int above = suffix - own;
        int bin = lane * per;
        for (int j = per - 1; j >= 0; --j) {
          const int c = static_cast<int>(hist[lane * per + j]);
          if (above + c >= remaining) {
            bin = lane * per + j;
            break;
          }
          above += c;
        }
        sel_bin = bin;
        sel_above = above;
      }
    }
    __syncthreads();
    remaining -= sel_above;
    tie_count = static_cast<int>(hist[sel_bin]);
    prefix |= static_cast<key_t>(sel_bin) << shift;
    prefix_mask |= digit_mask << shift;
    __syncthreads();  // hist is cleared by the next pass
  }
  st = block_merge_stats(st);
  const acc_t row_lse = st.logsumexp();
  const key_t thr = prefix;

  // Collect: keys above the threshold (and the threshold's ties when all of them are taken) by atomics; the final
  // order comes from the rank sort below, so the result is deterministic.
  if (threadIdx.x == 0) n_cand = 0;
  __syncthreads();
  const bool take_all_ties = tie_count == remaining;
  for_each_in_row<scalar_t, acc_t>(row, V, [&](int64_t i, acc_t x) {
    const key_t key = OrderedKey<acc_t>::of(x);
    if (key > thr || (take_all_ties && key == thr)) {
      const int slot = atomicAdd(&n_cand, 1);
      cand_key[slot] = key;
      cand_id[slot] = i;
    }
  });
  __syncthreads();
  if (!take_all_ties) {
    // Only the `remaining` smallest indices among the ties: scan the row in index order, block-wide ranks.
    int taken = 0;
    const int base = k - remaining;
    for (int64_t start = 0; start < V && taken < remaining; start += blockDim.x) {
      const int64_t i = start + threadIdx.x;
      const bool is_tie = i < V && OrderedKey<acc_t>::of(to_acc<acc_t>(row[i])) == thr;
      const unsigned ballot = __ballot_sync(0xffffffffu, is_tie);
      if (lane == 0) warp_counts[warp] = __popc(ballot);
      __syncthreads();
      int before = 0, total = 0;
      for (int w = 0; w < static_cast<int>(blockDim.x / kWarpSize); ++w) {
        if (w < warp) before += warp_counts[w];
        total += warp_counts[w];
      }
      const int rank = taken + before + __popc(ballot & ((1u << lane) - 1u));
      if (is_tie && rank < remaining) {
        cand_key[base + rank] = thr;
        cand_id[base + rank] = i;
      }
      taken += total;
      __syncthreads();  // warp_counts is rewritten next iteration
    }
  }
  __syncthreads();

  // Rank sort by (key desc, id asc) and write out.
  for (int a = threadIdx.x; a < k; a += blockDim.x) {
    const key_t ka = cand_key[a];
    const int64_t ia = cand_id[a];
    int rank = 0;
    for (int b = 0; b < k; ++b) {
      const key_t kb = cand_key[b];
      rank += (kb > ka || (kb == ka && cand_id[b] < ia)) ? 1 : 0;
    }
    ids_out[r * k + rank] = ia;
    lp_out[r * k + rank] = to_acc<acc_t>(row[ia]) * inv_temperature - row_lse;
  }
  if (threadIdx.x == 0) lse_out[r] = row_lse;
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

// grad_weight and grad_bias must be zero-filled (ids absent from `ids` keep 0); partial holds num_partials·d and
// partial_bias num_partials entries (may be null when num_partials == 0 / without bias).
template <typename scalar_t, typename acc_t, typename out_t>
cudaError_t launch_topk_grad_weight(const acc_t* grad_z, const scalar_t* hidden, SegmentLayout seg,
                                    int64_t num_segments, int64_t num_chunks, int64_t num_partials, int64_t K,
                                    int64_t d, acc_t inv_temperature, out_t* grad_weight, out_t* grad_bias,
                                    acc_t* partial, acc_t* partial_bias, cudaStream_t stream) {
  if (num_chunks == 0) return cudaSuccess;
  const bool vec = rows_vectorizable<scalar_t>(hidden, hidden, d);
  const int threads = threads_for_dim<scalar_t>(d, vec);
  acc_t* pb = grad_bias ? partial_bias : nullptr;
  if (vec)
    topk_grad_weight_chunk_kernel<scalar_t, acc_t, out_t, true>
        <<<static_cast<unsigned>(num_chunks), threads, 0, stream>>>(grad_z, hidden, seg, K, d, inv_temperature,
                                                                      grad_weight, grad_bias, partial, pb);
  else
    topk_grad_weight_chunk_kernel<scalar_t, acc_t, out_t, false>
        <<<static_cast<unsigned>(num_chunks), threads, 0, stream>>>(grad_z, hidden, seg, K, d, inv_temperature,
                                                                      grad_weight, grad_bias, partial, pb);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || num_partials == 0) return err;
  topk_grad_weight_finalize_kernel<acc_t, out_t><<<static_cast<unsigned>(num_segments), kTopkThreads, 0, stream>>>(
      seg, d, inv_temperature, grad_weight, grad_bias, partial, pb);
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

template <typename scalar_t, typename acc_t>
cudaError_t launch_teacher_topk(const scalar_t* logits, RowIndexer rows, int64_t N, int64_t V, int k,
                                acc_t inv_temperature, int64_t* ids, acc_t* logprobs, acc_t* lse,
                                cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (k < 1 || k > kMaxTeacherK || k > V) return cudaErrorInvalidValue;
  teacher_topk_kernel<scalar_t, acc_t><<<static_cast<unsigned>(N), kTopkThreads, 0, stream>>>(
      logits, rows, V, k, inv_temperature, ids, logprobs, lse);
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
      const acc_t*, const scalar_t*, opdx::cuda::SegmentLayout, int64_t, int64_t, int64_t, int64_t, int64_t, acc_t,  \
      out_t*, out_t*, acc_t*, acc_t*, cudaStream_t);
#define OPDX_INSTANTIATE_TOPK(scalar_t, acc_t)                                                                       \
  template cudaError_t opdx::cuda::launch_topk_gather_dot<scalar_t, acc_t>(                                          \
      const scalar_t*, const scalar_t*, const scalar_t*, const int64_t*, int64_t, int64_t, int64_t, acc_t, acc_t*,  \
      cudaStream_t);                                                                                                 \
  template cudaError_t opdx::cuda::launch_topk_grad_weight_atomic<scalar_t, acc_t>(                                  \
      const acc_t*, const scalar_t*, const int64_t*, int64_t, int64_t, int64_t, acc_t, acc_t*, acc_t*,              \
      cudaStream_t);                                                                                                 \
  template cudaError_t opdx::cuda::launch_teacher_topk<scalar_t, acc_t>(                                             \
      const scalar_t*, opdx::RowIndexer, int64_t, int64_t, int, acc_t, int64_t*, acc_t*, acc_t*, cudaStream_t);
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
