// CUDA epilogue kernels of the fused lm_head + loss ops (linear_token_logprobs, linear_generalized_jsd). Torch-free
// (see cuda_common.cuh). The glue (linear_losses.cu) computes each vocabulary tile's logits with one cuBLAS GEMM into
// an fp32 [N, n] buffer (h·W_tileᵀ, bias added here) and runs these kernels on it:
//   tile_lse_kernel        online softmax statistics of every row of the tile, merged into running per-row stats
//   lse_finalize_kernel    lse (and the target log-prob) from the running stats
//   tlp_grad_tile_kernel   G = g·(1[v=y] − p)/T for the tile, written in the GEMM input dtype for the gradient GEMMs
//   jsd_*_tile_kernel      the same for the generalized JSD (two tiles: student and teacher logits)
// One warp owns one row of a tile (lanes stride the row, coalesced), so per-row running state needs no atomics.
// A fused wgmma kernel (GEMM with this epilogue in registers, sm_90a) is the follow-up; these kernels are the epilogue
// it will inline.
#pragma once

#include "cuda_common.cuh"

namespace opdx {
namespace cuda {

constexpr int kLinWarps = 8;  // rows (warps) per block
constexpr int kLinThreads = kLinWarps * kWarpSize;

template <typename acc_t>
__device__ __forceinline__ SoftmaxStats<acc_t> warp_merge_stats(SoftmaxStats<acc_t> st) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) st.merge(shfl_xor_stats(st, m));
  return st;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

// Scaled logit of tile element i of a row: (L[i] + b[i]) / T.
template <typename bias_t, typename acc_t>
__device__ __forceinline__ acc_t tile_logit(const acc_t* __restrict__ row, const bias_t* __restrict__ bias, int64_t i,
                                            acc_t inv_temperature) {
  acc_t x = row[i];
  if (bias != nullptr) x += to_acc<acc_t>(bias[i]);
  return x * inv_temperature;
}

// Running per-row softmax statistics in global memory (max, sum), initialized to (−inf, 0).
// Rows whose `skip` flag is set (ignore_index targets, masked rows) are left untouched.
// logits: [N, n] tile (row stride n); bias: the tile's bias slice or nullptr. When targets != nullptr, the scaled
// logit of the target is recorded in target_x when it falls in [v0, v0 + n).
template <typename bias_t, typename acc_t>
__global__ void __launch_bounds__(kLinThreads) tile_lse_kernel(
    const acc_t* __restrict__ logits, const bias_t* __restrict__ bias, int64_t N, int64_t n, int64_t v0,
    acc_t inv_temperature, const int64_t* __restrict__ targets, int64_t ignore_index, const bool* __restrict__ mask,
    acc_t* __restrict__ run_max, acc_t* __restrict__ run_sum, acc_t* __restrict__ target_x) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kLinWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (r >= N) return;
  if (targets != nullptr && targets[r] == ignore_index) return;
  if (mask != nullptr && !mask[r]) return;
  const acc_t* row = logits + r * n;
  SoftmaxStats<acc_t> st = SoftmaxStats<acc_t>::empty();
  for (int64_t i = lane; i < n; i += kWarpSize) st.add(tile_logit(row, bias, i, inv_temperature));
  st = warp_merge_stats(st);
  if (lane == 0) {
    SoftmaxStats<acc_t> run{run_max[r], run_sum[r], acc_t(0)};
    run.merge(st);
    run_max[r] = run.max;
    run_sum[r] = run.sum;
    if (targets != nullptr) {
      const int64_t y = targets[r];
      if (y >= v0 && y < v0 + n) target_x[r] = tile_logit(row, bias, y - v0, inv_temperature);
    }
  }
}

// lse = max + log(sum); with target_x: logp = target_x − lse. Skipped rows give lse = 0 (and logp = 0).
template <typename acc_t>
__global__ void lse_finalize_kernel(int64_t N, const acc_t* __restrict__ run_max, const acc_t* __restrict__ run_sum,
                                    const int64_t* __restrict__ targets, int64_t ignore_index,
                                    const bool* __restrict__ mask, const acc_t* __restrict__ target_x,
                                    acc_t* __restrict__ lse, acc_t* __restrict__ logp) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= N) return;
  const bool skip = (targets != nullptr && targets[r] == ignore_index) || (mask != nullptr && !mask[r]);
  const SoftmaxStats<acc_t> st{run_max[r], run_sum[r], acc_t(0)};
  const acc_t row_lse = skip ? acc_t(0) : st.logsumexp();
  lse[r] = row_lse;
  if (logp != nullptr) logp[r] = skip ? acc_t(0) : target_x[r] - row_lse;
}

// G[r, i] = g_r·(1[v0 + i = y_r] − exp(x − lse_r))/T for the tile, in the dtype of the gradient GEMMs.
template <typename bias_t, typename acc_t, typename out_t>
__global__ void __launch_bounds__(kLinThreads) tlp_grad_tile_kernel(
    const acc_t* __restrict__ logits, const bias_t* __restrict__ bias, int64_t N, int64_t n, int64_t v0,
    acc_t inv_temperature, const int64_t* __restrict__ targets, int64_t ignore_index, const acc_t* __restrict__ grad,
    const acc_t* __restrict__ lse, out_t* __restrict__ G) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kLinWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (r >= N) return;
  const acc_t* row = logits + r * n;
  out_t* out = G + r * n;
  const int64_t y = targets[r];
  const acc_t g = grad[r];
  if (y == ignore_index || g == acc_t(0)) {
    for (int64_t i = lane; i < n; i += kWarpSize) out[i] = from_acc<out_t>(acc_t(0));
    return;
  }
  const acc_t row_lse = lse[r];
  const acc_t coef = g * inv_temperature;
  for (int64_t i = lane; i < n; i += kWarpSize) {
    const acc_t p = fast_exp(tile_logit(row, bias, i, inv_temperature) - row_lse);
    const acc_t onehot = (v0 + i == y) ? acc_t(1) : acc_t(0);
    out[i] = from_acc<out_t>(coef * (onehot - p));
  }
}

// Grid helpers.
inline unsigned row_blocks(int64_t N) { return static_cast<unsigned>((N + kLinWarps - 1) / kLinWarps); }

template <typename bias_t, typename acc_t>
cudaError_t launch_tile_lse(const acc_t* logits, const bias_t* bias, int64_t N, int64_t n, int64_t v0,
                            acc_t inv_temperature, const int64_t* targets, int64_t ignore_index, const bool* mask,
                            acc_t* run_max, acc_t* run_sum, acc_t* target_x, cudaStream_t stream) {
  if (N == 0 || n == 0) return cudaSuccess;
  tile_lse_kernel<bias_t, acc_t><<<row_blocks(N), kLinThreads, 0, stream>>>(
      logits, bias, N, n, v0, inv_temperature, targets, ignore_index, mask, run_max, run_sum, target_x);
  return cudaGetLastError();
}

template <typename acc_t>
cudaError_t launch_lse_finalize(int64_t N, const acc_t* run_max, const acc_t* run_sum, const int64_t* targets,
                                int64_t ignore_index, const bool* mask, const acc_t* target_x, acc_t* lse, acc_t* logp,
                                cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  lse_finalize_kernel<acc_t><<<static_cast<unsigned>((N + 255) / 256), 256, 0, stream>>>(
      N, run_max, run_sum, targets, ignore_index, mask, target_x, lse, logp);
  return cudaGetLastError();
}

template <typename bias_t, typename acc_t, typename out_t>
cudaError_t launch_tlp_grad_tile(const acc_t* logits, const bias_t* bias, int64_t N, int64_t n, int64_t v0,
                                 acc_t inv_temperature, const int64_t* targets, int64_t ignore_index,
                                 const acc_t* grad, const acc_t* lse, out_t* G, cudaStream_t stream) {
  if (N == 0 || n == 0) return cudaSuccess;
  tlp_grad_tile_kernel<bias_t, acc_t, out_t><<<row_blocks(N), kLinThreads, 0, stream>>>(
      logits, bias, N, n, v0, inv_temperature, targets, ignore_index, grad, lse, G);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace opdx

// Explicit instantiations for the torch-free compile check on CPU machines (tests/test_cuda_compile.py).
#if defined(OPDX_COMPILE_CHECK)
#define OPDX_INSTANTIATE_LINEAR_TLP(bias_t, acc_t, out_t)                                                            \
  template cudaError_t opdx::cuda::launch_tile_lse<bias_t, acc_t>(const acc_t*, const bias_t*, int64_t, int64_t,     \
                                                                  int64_t, acc_t, const int64_t*, int64_t,           \
                                                                  const bool*, acc_t*, acc_t*, acc_t*, cudaStream_t); \
  template cudaError_t opdx::cuda::launch_tlp_grad_tile<bias_t, acc_t, out_t>(                                       \
      const acc_t*, const bias_t*, int64_t, int64_t, int64_t, acc_t, const int64_t*, int64_t, const acc_t*,          \
      const acc_t*, out_t*, cudaStream_t);
OPDX_INSTANTIATE_LINEAR_TLP(float, float, float)
OPDX_INSTANTIATE_LINEAR_TLP(__half, float, __half)
OPDX_INSTANTIATE_LINEAR_TLP(__nv_bfloat16, float, __nv_bfloat16)
OPDX_INSTANTIATE_LINEAR_TLP(double, double, double)
template cudaError_t opdx::cuda::launch_lse_finalize<float>(int64_t, const float*, const float*, const int64_t*,
                                                            int64_t, const bool*, const float*, float*, float*,
                                                            cudaStream_t);
template cudaError_t opdx::cuda::launch_lse_finalize<double>(int64_t, const double*, const double*, const int64_t*,
                                                             int64_t, const bool*, const double*, double*, double*,
                                                             cudaStream_t);
#endif
