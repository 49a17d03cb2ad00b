// CUDA teacher_topk (torch-free; glue in topk_kl.cu): one block per row, topk_order_key order (topk_math.h), the row
// logic of opdx/topk_select.h run block-parallel.
//
//   one pass (common case)  the row is streamed once in tiles of half the buffer (2048 elements; fp64 1024) with
//                           16-byte vector loads: online softmax statistics, and every key the threshold admits is
//                           appended to a shared-memory candidate buffer (atomic slot); when the next tile could
//                           overflow the buffer, the block
//                           compacts it (radix select of the buffer's k-th key, keep keys >= it, threshold above it).
//                           The top-k is a rank sort of the final compacted buffer.
//   radix (fallback)        when a compaction cannot free a tile's room (massive ties, e.g. a constant row) or the
//                           final buffer holds too many ties to rank-sort: the block restarts the row with an 11-bit
//                           radix select of the k-th key over global memory (3 passes for fp32, online logsumexp fused
//                           into the first), a collection pass, and a tie pass in index order when not all ties fit.
// Both paths give the same ids, log-probs and logsumexp bit for bit (same per-thread accumulation order).
#pragma once

#include <climits>

#include "cuda_common.cuh"
#include "opdx/topk_select.h"

namespace opdx {
namespace cuda {

constexpr int kTeacherThreads = 256;
constexpr int kMaxTeacherK = 1024;   // teacher_topk's k limit

template <typename acc_t>
struct OrderedKey {
  using type = decltype(topk_order_key(acc_t(0)));
  __device__ __forceinline__ static type of(acc_t x) { return topk_order_key(x); }
};

// Shared memory of one row: the radix histogram and the candidate buffer (fp32 keys: 4096 entries, fp64: 2048).
template <typename key_t>
struct TeacherSmem {
  static constexpr int kCapacity = sizeof(key_t) == 4 ? 4096 : 2048;
  unsigned hist[kRadixBins];
  key_t keys[kCapacity];
  int ids[kCapacity];
  int count;
  int sel_bin;
  int sel_above;
  int warp_counts[kTeacherThreads / kWarpSize];
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

// Warp 0's radix_pick_bin: lanes own contiguous ranges of bins, a suffix scan over lanes finds the lane, that lane
// scans its range from the top (the same bin as the sequential scan).
__device__ __forceinline__ void warp_pick_bin(const unsigned* hist, int nbins, int remaining, int* sel_bin,
                                              int* sel_above) {
  const int lane = threadIdx.x % kWarpSize;
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
    const RadixBin pick = radix_pick_bin(hist + lane * per, per, remaining - (suffix - own));
    *sel_bin = lane * per + pick.bin;
    *sel_above = suffix - own + pick.above;
  }
}

// Block-parallel RadixSelect over an abstract source: for_each_key(pass, visit) calls visit(key) for this thread's
// keys (the row in global memory, or the candidate buffer).
template <typename key_t, typename ForEachKey>
__device__ __forceinline__ RadixSelect<key_t> block_radix_select(ForEachKey for_each_key, int k,
                                                                 TeacherSmem<key_t>& sm) {
  using Sel = RadixSelect<key_t>;
  Sel sel = Sel::start(k);
#pragma unroll 1
  for (int pass = 0; pass < Sel::kPasses; ++pass) {
    const int nbins = Sel::bins(pass);
    for (int i = threadIdx.x; i < nbins; i += blockDim.x) sm.hist[i] = 0;
    __syncthreads();
    for_each_key(pass, [&](key_t key) {
      if (sel.matches(key)) atomicAdd(&sm.hist[Sel::digit(key, pass)], 1u);
    });
    __syncthreads();
    if (threadIdx.x < kWarpSize) warp_pick_bin(sm.hist, nbins, sel.remaining, &sm.sel_bin, &sm.sel_above);
    __syncthreads();
    sel.advance(pass, sm.sel_bin, sm.sel_above, static_cast<int>(sm.hist[sm.sel_bin]));
    __syncthreads();  // hist is cleared by the next pass
  }
  return sel;
}

// Rank sort of the m buffered candidates by (key desc, id asc); ranks < k are written out.
template <typename scalar_t, typename acc_t, typename key_t>
__device__ __forceinline__ void write_ranked(const TeacherSmem<key_t>& sm, int m, int k, const scalar_t* row,
                                             acc_t inv_temperature, acc_t row_lse, int64_t* ids_out,
                                             acc_t* lp_out) {
  for (int a = threadIdx.x; a < m; a += blockDim.x) {
    const key_t ka = sm.keys[a];
    const int ia = sm.ids[a];
    int rank = 0;
    for (int b = 0; b < m; ++b) rank += topk_before<key_t>(sm.keys[b], sm.ids[b], ka, ia) ? 1 : 0;
    if (rank < k) {
      ids_out[rank] = ia;
      lp_out[rank] = to_acc<acc_t>(row[ia]) * inv_temperature - row_lse;
    }
  }
}

// Ties at the threshold when not all of them fit: the `remaining` smallest indices, by a row scan in index order with
// block-wide ranks, into buffer slots base ...
template <typename scalar_t, typename acc_t, typename key_t>
__device__ __forceinline__ void take_ties_in_order(const scalar_t* row, int64_t V, key_t thr, int base, int remaining,
                                                   TeacherSmem<key_t>& sm) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  int taken = 0;
  for (int64_t start = 0; start < V && taken < remaining; start += blockDim.x) {
    const int64_t i = start + threadIdx.x;
    const bool is_tie = i < V && OrderedKey<acc_t>::of(to_acc<acc_t>(row[i])) == thr;
    const unsigned ballot = __ballot_sync(0xffffffffu, is_tie);
    if (lane == 0) sm.warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x / kWarpSize); ++w) {
      if (w < warp) before += sm.warp_counts[w];
      total += sm.warp_counts[w];
    }
    const int rank = taken + before + __popc(ballot & ((1u << lane) - 1u));
    if (is_tie && rank < remaining) {
      sm.keys[base + rank] = thr;
      sm.ids[base + rank] = static_cast<int>(i);
    }
    taken += total;
    __syncthreads();  // warp_counts is rewritten next iteration
  }
}

// The radix path for one row (the fallback): every read of the row goes to global memory.
template <typename scalar_t, typename acc_t, typename key_t>
__device__ __noinline__ void radix_topk_row(const scalar_t* row, int64_t V, int k, acc_t inv_temperature,
                                            TeacherSmem<key_t>& sm, int64_t* ids_out, acc_t* lp_out,
                                            acc_t* lse_out) {
  SoftmaxStats<acc_t> st = SoftmaxStats<acc_t>::empty();
  const RadixSelect<key_t> sel = block_radix_select<key_t>(
      [&](int pass, auto visit) {
        for_each_in_row<scalar_t, acc_t>(row, V, [&](int64_t, acc_t x) {
          if (pass == 0) st.add(x * inv_temperature);
          visit(OrderedKey<acc_t>::of(x));
        });
      },
      k, sm);
  st = block_merge_stats(st);
  const acc_t row_lse = st.logsumexp();
  const key_t thr = sel.kth();
  // Collect: keys above the threshold (and its ties when all of them are taken) by atomics; the order comes from
  // the rank sort, so the result is deterministic.
  if (threadIdx.x == 0) sm.count = 0;
  __syncthreads();
  const bool take_all_ties = sel.tie_count == sel.remaining;
  for_each_in_row<scalar_t, acc_t>(row, V, [&](int64_t i, acc_t x) {
    const key_t key = OrderedKey<acc_t>::of(x);
    if (key > thr || (take_all_ties && key == thr)) {
      const int slot = atomicAdd(&sm.count, 1);
      sm.keys[slot] = key;
      sm.ids[slot] = static_cast<int>(i);
    }
  });
  __syncthreads();
  if (!take_all_ties) take_ties_in_order<scalar_t, acc_t>(row, V, thr, k - sel.remaining, sel.remaining, sm);
  __syncthreads();
  write_ranked<scalar_t, acc_t>(sm, k, k, row, inv_temperature, row_lse, ids_out, lp_out);
  if (threadIdx.x == 0) *lse_out = row_lse;
}

// topk_compact of the buffer, block-parallel: the kept entries move down in place (each chunk of blockDim entries is
// read into registers before any is written; a kept entry's new slot never exceeds its old position's chunk end).
// Returns the new count (all threads); raises thr.
template <typename key_t>
__device__ __forceinline__ int block_compact(TeacherSmem<key_t>& sm, int k, TopkThreshold<key_t>& thr) {
  const int count = sm.count;
  const key_t kth = block_radix_select<key_t>(
                        [&](int, auto visit) {
                          for (int i = threadIdx.x; i < count; i += blockDim.x) visit(sm.keys[i]);
                        },
                        k, sm)
                        .kth();
  if (threadIdx.x == 0) sm.count = 0;
  __syncthreads();
  for (int start = 0; start < count; start += blockDim.x) {
    const int i = start + threadIdx.x;
    const key_t key = i < count ? sm.keys[i] : key_t(0);
    const int id = i < count ? sm.ids[i] : 0;
    const bool keep = i < count && topk_keeps(key, kth);
    __syncthreads();
    if (keep) {
      const int slot = atomicAdd(&sm.count, 1);
      sm.keys[slot] = key;
      sm.ids[slot] = id;
    }
    __syncthreads();
  }
  const int kept = sm.count;
  __syncthreads();  // everyone has read the count before the next appends
  thr.raise(kth);
  return kept;
}

// No __launch_bounds__: with it ptxas (nvcc 13.0, sm_80) spills; at 256 threads a block can never lack registers.
template <typename scalar_t, typename acc_t>
__global__ void teacher_topk_kernel(const scalar_t* __restrict__ logits, RowIndexer rows, int64_t V, int k,
                                    acc_t inv_temperature, int64_t* __restrict__ ids_out, acc_t* __restrict__ lp_out,
                                    acc_t* __restrict__ lse_out) {
  using key_t = typename OrderedKey<acc_t>::type;
  using Smem = TeacherSmem<key_t>;
  constexpr int kVec = RowSplit<scalar_t>::kVec;
  constexpr int kTileVecs = Smem::kCapacity / 2 / (kTeacherThreads * kVec);  // a tile: half the buffer
  constexpr int kTile = kTileVecs * kTeacherThreads * kVec;
  static_assert(kTileVecs >= 1 && Smem::kCapacity - kTile >= kMaxTeacherK, "a compacted buffer must leave room for a tile");
  __shared__ Smem sm;
  const int64_t r = blockIdx.x;
  const scalar_t* row = logits + rows.offset(r);
  if (threadIdx.x == 0) sm.count = 0;
  __syncthreads();

  SoftmaxStats<acc_t> st = SoftmaxStats<acc_t>::empty();
  TopkThreshold<key_t> thr = TopkThreshold<key_t>::open();
  int last = 0;  // 1 + this thread's last slot since the previous compaction (0: none)
  const auto visit = [&](int64_t i, acc_t x) {
    st.add(x * inv_temperature);
    const key_t key = OrderedKey<acc_t>::of(x);
    if (thr.admits(key)) {
      const int slot = atomicAdd(&sm.count, 1);
      sm.keys[slot] = key;
      sm.ids[slot] = static_cast<int>(i);
      last = slot + 1;
    }
  };
  // Compacts when the next `incoming` elements could overflow; true when even a compacted buffer has no room. The
  // buffer held room for a tile before the last appends, so only a thread that appended can see an overflow.
  const auto no_room = [&](int incoming) {
    if (!__syncthreads_or(topk_buffer_must_compact(last, incoming, Smem::kCapacity))) return false;
    last = 0;
    return topk_buffer_must_compact(block_compact(sm, k, thr), incoming, Smem::kCapacity);
  };
  const RowSplit<scalar_t> split(row, V);
  const scalar_t* body = row + split.head;
  bool overflow = false;
  if (threadIdx.x < split.head) visit(threadIdx.x, to_acc<acc_t>(row[threadIdx.x]));  // head < kVec <= blockDim
  for (int64_t t0 = 0; t0 < split.nvec && !overflow; t0 += kTileVecs * kTeacherThreads) {
#pragma unroll
    for (int j = 0; j < kTileVecs; ++j) {
      const int64_t v = t0 + j * kTeacherThreads + threadIdx.x;
      if (v >= split.nvec) break;
      const VecOf<scalar_t> vec = load_vec(body + v * kVec);
#pragma unroll
      for (int e = 0; e < kVec; ++e) visit(split.head + v * kVec + e, to_acc<acc_t>(vec.v[e]));
    }
    overflow = no_room(kTile);
  }
  const int64_t tail = split.tail0 + threadIdx.x;  // the tail (< kVec) last: indices stay in order
  if (!overflow && tail < V) visit(tail, to_acc<acc_t>(row[tail]));
  __syncthreads();
  if (!overflow) {
    // The final compaction; too many ties left for the rank sort → the fallback.
    int m = sm.count;
    __syncthreads();
    if (m > k) m = block_compact(sm, k, thr);
    overflow = m > 2 * k + kTeacherThreads;
    if (!overflow) {
      st = block_merge_stats(st);
      const acc_t row_lse = st.logsumexp();
      write_ranked<scalar_t, acc_t>(sm, m, k, row, inv_temperature, row_lse, ids_out + r * k, lp_out + r * k);
      if (threadIdx.x == 0) lse_out[r] = row_lse;
      return;
    }
  }
  radix_topk_row<scalar_t, acc_t>(row, V, k, inv_temperature, sm, ids_out + r * k, lp_out + r * k, lse_out + r);
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_teacher_topk(const scalar_t* logits, RowIndexer rows, int64_t N, int64_t V, int k,
                                acc_t inv_temperature, int64_t* ids, acc_t* logprobs, acc_t* lse,
                                cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (k < 1 || k > kMaxTeacherK || k > V || V > INT_MAX) return cudaErrorInvalidValue;
  teacher_topk_kernel<scalar_t, acc_t><<<static_cast<unsigned>(N), kTeacherThreads, 0, stream>>>(
      logits, rows, V, k, inv_temperature, ids, logprobs, lse);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace opdx

#if defined(OPDX_COMPILE_CHECK)
#define OPDX_INSTANTIATE_TEACHER_TOPK(scalar_t, acc_t)                                                             \
  template cudaError_t opdx::cuda::launch_teacher_topk<scalar_t, acc_t>(                                           \
      const scalar_t*, opdx::RowIndexer, int64_t, int64_t, int, acc_t, int64_t*, acc_t*, acc_t*, cudaStream_t);
OPDX_INSTANTIATE_TEACHER_TOPK(float, float)
OPDX_INSTANTIATE_TEACHER_TOPK(__half, float)
OPDX_INSTANTIATE_TEACHER_TOPK(__nv_bfloat16, float)
OPDX_INSTANTIATE_TEACHER_TOPK(double, double)
#endif
