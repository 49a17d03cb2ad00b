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
constexpr int kFinalizeThreads = 256;  // one thread per row

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
__global__ void tile_lse_kernel(
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
__global__ void tlp_grad_tile_kernel(
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
  lse_finalize_kernel<acc_t><<<static_cast<unsigned>((N + kFinalizeThreads - 1) / kFinalizeThreads), kFinalizeThreads, 0, stream>>>(
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

// ------------------------------------------------------------------------------------------------------------------
// linear_generalized_jsd. Row statistics live in `stats` [4, N]: lse_s, lse_t, gradient anchor, row total.
// ------------------------------------------------------------------------------------------------------------------

// Raw (bias added, not yet divided by T) logit of tile element i.
template <typename bias_t, typename acc_t>
__device__ __forceinline__ acc_t raw_logit(const acc_t* __restrict__ row, const bias_t* __restrict__ bias, int64_t i) {
  acc_t x = row[i];
  if (bias != nullptr) x += to_acc<acc_t>(bias[i]);
  return x;
}

// Running state per row across the tiles of sweep 1 (all [N], in global memory, one warp per row).
template <typename acc_t>
struct JsdRunState {
  acc_t* max_s;
  acc_t* sum_s;
  acc_t* max_t;
  acc_t* sum_t;
  acc_t* top_s;  // raw student logit at the student's first maximum so far (−inf initially)
  acc_t* top_t;  // raw teacher logit there
};

// Sweep 1 epilogue: online softmax statistics of both tiles and the student's first maximum.
template <int kMode, typename bias_t, typename acc_t>
__global__ void jsd_lse_tile_kernel(
    const acc_t* __restrict__ ls, const bias_t* __restrict__ bs, const acc_t* __restrict__ lt,
    const bias_t* __restrict__ bt, int64_t N, int64_t n, acc_t inv_temperature, const bool* __restrict__ mask,
    JsdRunState<acc_t> run) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kLinWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (r >= N || (mask != nullptr && !mask[r])) return;
  const acc_t* srow = ls + r * n;
  const acc_t* trow = lt + r * n;
  SoftmaxStats<acc_t> st_s = SoftmaxStats<acc_t>::empty();
  SoftmaxStats<acc_t> st_t = SoftmaxStats<acc_t>::empty();
  acc_t best_s = neg_inf<acc_t>(), best_t = acc_t(0);
  int64_t best_i = n;
  for (int64_t i = lane; i < n; i += kWarpSize) {
    const acc_t xs = raw_logit(srow, bs, i);
    const acc_t xt = raw_logit(trow, bt, i);
    st_s.add(xs * inv_temperature);
    st_t.add(xt * inv_temperature);
    if (kMode != kJsdForwardKL && xs > best_s) {  // lanes visit increasing i: strict > keeps the first maximum
      best_s = xs;
      best_t = xt;
      best_i = i;
    }
  }
  st_s = warp_merge_stats(st_s);
  st_t = warp_merge_stats(st_t);
  if (kMode != kJsdForwardKL) {
#pragma unroll
    for (int m = kWarpSize / 2; m > 0; m >>= 1) {
      const acc_t os = __shfl_xor_sync(0xffffffffu, best_s, m);
      const acc_t ot = __shfl_xor_sync(0xffffffffu, best_t, m);
      const int64_t oi = __shfl_xor_sync(0xffffffffu, best_i, m);
      if (os > best_s || (os == best_s && oi < best_i)) {
        best_s = os;
        best_t = ot;
        best_i = oi;
      }
    }
  }
  if (lane == 0) {
    SoftmaxStats<acc_t> a{run.max_s[r], run.sum_s[r], acc_t(0)};
    SoftmaxStats<acc_t> b{run.max_t[r], run.sum_t[r], acc_t(0)};
    a.merge(st_s);
    b.merge(st_t);
    run.max_s[r] = a.max;
    run.sum_s[r] = a.sum;
    run.max_t[r] = b.max;
    run.sum_t[r] = b.sum;
    if (kMode != kJsdForwardKL && best_s > run.top_s[r]) {  // earlier tiles win ties
      run.top_s[r] = best_s;
      run.top_t[r] = best_t;
    }
  }
}

// After sweep 1: lse_s, lse_t and the anchor into stats; zeroes the row accumulators of sweep 2.
template <int kMode, typename acc_t>
__global__ void jsd_lse_finalize_kernel(int64_t N, acc_t beta, acc_t inv_temperature, const bool* __restrict__ mask,
                                        JsdRunState<acc_t> run, acc_t* __restrict__ stats,
                                        double* __restrict__ row_loss, double* __restrict__ row_total) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= N) return;
  row_loss[r] = 0.0;
  row_total[r] = 0.0;
  const bool on = mask == nullptr || mask[r];
  const SoftmaxStats<acc_t> a{run.max_s[r], run.sum_s[r], acc_t(0)};
  const SoftmaxStats<acc_t> b{run.max_t[r], run.sum_t[r], acc_t(0)};
  const acc_t lse_s = on ? a.logsumexp() : acc_t(0);
  const acc_t lse_t = on ? b.logsumexp() : acc_t(0);
  acc_t anchor = acc_t(0);
  if (on && kMode != kJsdForwardKL && run.top_s[r] > neg_inf<acc_t>()) {
    const acc_t xs = run.top_s[r], xt = run.top_t[r];
    anchor = jsd_anchor<kMode>(beta, xs * inv_temperature - lse_s, xt * inv_temperature - lse_t,
                               jsd_delta(xs, xt, inv_temperature, lse_t - lse_s));
  }
  stats[r] = lse_s;
  stats[N + r] = lse_t;
  stats[2 * N + r] = anchor;
}

// Sweep 2 epilogue: the tile's share of the row loss and row total (double accumulators, one warp per row).
template <int kMode, typename bias_t, typename acc_t>
__global__ void jsd_loss_tile_kernel(
    const acc_t* __restrict__ ls, const bias_t* __restrict__ bs, const acc_t* __restrict__ lt,
    const bias_t* __restrict__ bt, int64_t N, int64_t n, acc_t beta, acc_t inv_temperature,
    const bool* __restrict__ mask, const acc_t* __restrict__ stats, double* __restrict__ row_loss,
    double* __restrict__ row_total) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kLinWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (r >= N || (mask != nullptr && !mask[r])) return;
  const acc_t lse_s = stats[r], lse_t = stats[N + r], anchor = stats[2 * N + r];
  const acc_t c = lse_t - lse_s;
  const acc_t* srow = ls + r * n;
  const acc_t* trow = lt + r * n;
  double loss = 0.0, total = 0.0;
  for (int64_t i = lane; i < n; i += kWarpSize) {
    const acc_t xs = raw_logit(srow, bs, i);
    const acc_t xt = raw_logit(trow, bt, i);
    acc_t l, k;
    jsd_element<kMode>(beta, xs * inv_temperature - lse_s, xt * inv_temperature - lse_t,
                       jsd_delta(xs, xt, inv_temperature, c), anchor, l, k);
    loss += l;
    total += k;
  }
  loss = warp_sum(loss);
  total = warp_sum(total);
  if (lane == 0) {
    row_loss[r] += loss;
    row_total[r] += total;
  }
}

template <typename acc_t>
__global__ void jsd_loss_finalize_kernel(int64_t N, const double* __restrict__ row_loss,
                                         const double* __restrict__ row_total, acc_t* __restrict__ loss,
                                         acc_t* __restrict__ stats) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= N) return;
  loss[r] = static_cast<acc_t>(row_loss[r]);
  stats[3 * N + r] = static_cast<acc_t>(row_total[r]);
}

// Backward epilogue: G = g_r·∂L_r/∂x_s/T for the tile, in the dtype of the gradient GEMMs.
template <int kMode, typename bias_t, typename acc_t, typename out_t>
__global__ void jsd_grad_tile_kernel(
    const acc_t* __restrict__ ls, const bias_t* __restrict__ bs, const acc_t* __restrict__ lt,
    const bias_t* __restrict__ bt, int64_t N, int64_t n, acc_t beta, acc_t inv_temperature,
    const bool* __restrict__ mask, const acc_t* __restrict__ grad, const acc_t* __restrict__ stats,
    out_t* __restrict__ G) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kLinWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (r >= N) return;
  out_t* out = G + r * n;
  const acc_t g = grad[r];
  if ((mask != nullptr && !mask[r]) || g == acc_t(0)) {
    for (int64_t i = lane; i < n; i += kWarpSize) out[i] = from_acc<out_t>(acc_t(0));
    return;
  }
  const acc_t lse_s = stats[r], lse_t = stats[N + r], anchor = stats[2 * N + r], total = stats[3 * N + r];
  const acc_t c = lse_t - lse_s;
  const acc_t scale = g * inv_temperature;
  const acc_t* srow = ls + r * n;
  const acc_t* trow = lt + r * n;
  for (int64_t i = lane; i < n; i += kWarpSize) {
    const acc_t xs = raw_logit(srow, bs, i);
    const acc_t xt = raw_logit(trow, bt, i);
    out[i] = from_acc<out_t>(scale * jsd_element_grad<kMode>(beta, xs * inv_temperature - lse_s,
                                                             xt * inv_temperature - lse_t,
                                                             jsd_delta(xs, xt, inv_temperature, c), anchor, total));
  }
}

template <int kMode, typename bias_t, typename acc_t>
cudaError_t launch_jsd_lse_tile(const acc_t* ls, const bias_t* bs, const acc_t* lt, const bias_t* bt, int64_t N,
                                int64_t n, acc_t inv_temperature, const bool* mask, JsdRunState<acc_t> run,
                                cudaStream_t stream) {
  if (N == 0 || n == 0) return cudaSuccess;
  jsd_lse_tile_kernel<kMode, bias_t, acc_t><<<row_blocks(N), kLinThreads, 0, stream>>>(ls, bs, lt, bt, N, n,
                                                                                       inv_temperature, mask, run);
  return cudaGetLastError();
}

template <int kMode, typename acc_t>
cudaError_t launch_jsd_lse_finalize(int64_t N, acc_t beta, acc_t inv_temperature, const bool* mask,
                                    JsdRunState<acc_t> run, acc_t* stats, double* row_loss, double* row_total,
                                    cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  jsd_lse_finalize_kernel<kMode, acc_t><<<static_cast<unsigned>((N + kFinalizeThreads - 1) / kFinalizeThreads), kFinalizeThreads, 0, stream>>>(
      N, beta, inv_temperature, mask, run, stats, row_loss, row_total);
  return cudaGetLastError();
}

template <int kMode, typename bias_t, typename acc_t>
cudaError_t launch_jsd_loss_tile(const acc_t* ls, const bias_t* bs, const acc_t* lt, const bias_t* bt, int64_t N,
                                 int64_t n, acc_t beta, acc_t inv_temperature, const bool* mask, const acc_t* stats,
                                 double* row_loss, double* row_total, cudaStream_t stream) {
  if (N == 0 || n == 0) return cudaSuccess;
  jsd_loss_tile_kernel<kMode, bias_t, acc_t><<<row_blocks(N), kLinThreads, 0, stream>>>(
      ls, bs, lt, bt, N, n, beta, inv_temperature, mask, stats, row_loss, row_total);
  return cudaGetLastError();
}

template <typename acc_t>
cudaError_t launch_jsd_loss_finalize(int64_t N, const double* row_loss, const double* row_total, acc_t* loss,
                                     acc_t* stats, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  jsd_loss_finalize_kernel<acc_t><<<static_cast<unsigned>((N + kFinalizeThreads - 1) / kFinalizeThreads), kFinalizeThreads, 0, stream>>>(N, row_loss,
                                                                                             row_total, loss, stats);
  return cudaGetLastError();
}

template <int kMode, typename bias_t, typename acc_t, typename out_t>
cudaError_t launch_jsd_grad_tile(const acc_t* ls, const bias_t* bs, const acc_t* lt, const bias_t* bt, int64_t N,
                                 int64_t n, acc_t beta, acc_t inv_temperature, const bool* mask, const acc_t* grad,
                                 const acc_t* stats, out_t* G, cudaStream_t stream) {
  if (N == 0 || n == 0) return cudaSuccess;
  jsd_grad_tile_kernel<kMode, bias_t, acc_t, out_t><<<row_blocks(N), kLinThreads, 0, stream>>>(
      ls, bs, lt, bt, N, n, beta, inv_temperature, mask, grad, stats, G);
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
#define OPDX_INSTANTIATE_LINEAR_JSD_MODE(mode, bias_t, acc_t, out_t)                                                 \
  template cudaError_t opdx::cuda::launch_jsd_lse_tile<mode, bias_t, acc_t>(                                         \
      const acc_t*, const bias_t*, const acc_t*, const bias_t*, int64_t, int64_t, acc_t, const bool*,                \
      opdx::cuda::JsdRunState<acc_t>, cudaStream_t);                                                                 \
  template cudaError_t opdx::cuda::launch_jsd_loss_tile<mode, bias_t, acc_t>(                                        \
      const acc_t*, const bias_t*, const acc_t*, const bias_t*, int64_t, int64_t, acc_t, acc_t, const bool*,         \
      const acc_t*, double*, double*, cudaStream_t);                                                                 \
  template cudaError_t opdx::cuda::launch_jsd_grad_tile<mode, bias_t, acc_t, out_t>(                                 \
      const acc_t*, const bias_t*, const acc_t*, const bias_t*, int64_t, int64_t, acc_t, acc_t, const bool*,         \
      const acc_t*, const acc_t*, out_t*, cudaStream_t);
#define OPDX_INSTANTIATE_LINEAR_JSD(bias_t, acc_t, out_t)                         \
  OPDX_INSTANTIATE_LINEAR_JSD_MODE(opdx::kJsdForwardKL, bias_t, acc_t, out_t)     \
  OPDX_INSTANTIATE_LINEAR_JSD_MODE(opdx::kJsdReverseKL, bias_t, acc_t, out_t)     \
  OPDX_INSTANTIATE_LINEAR_JSD_MODE(opdx::kJsdMixture, bias_t, acc_t, out_t)
OPDX_INSTANTIATE_LINEAR_JSD(float, float, float)
OPDX_INSTANTIATE_LINEAR_JSD(__half, float, __half)
OPDX_INSTANTIATE_LINEAR_JSD(__nv_bfloat16, float, __nv_bfloat16)
OPDX_INSTANTIATE_LINEAR_JSD(double, double, double)
#define OPDX_INSTANTIATE_LINEAR_JSD_FINALIZE(mode, acc_t)                                                          \
  template cudaError_t opdx::cuda::launch_jsd_lse_finalize<mode, acc_t>(                                             \
      int64_t, acc_t, acc_t, const bool*, opdx::cuda::JsdRunState<acc_t>, acc_t*, double*, double*, cudaStream_t);
OPDX_INSTANTIATE_LINEAR_JSD_FINALIZE(opdx::kJsdForwardKL, float)
OPDX_INSTANTIATE_LINEAR_JSD_FINALIZE(opdx::kJsdReverseKL, float)
OPDX_INSTANTIATE_LINEAR_JSD_FINALIZE(opdx::kJsdMixture, float)
OPDX_INSTANTIATE_LINEAR_JSD_FINALIZE(opdx::kJsdForwardKL, double)
OPDX_INSTANTIATE_LINEAR_JSD_FINALIZE(opdx::kJsdReverseKL, double)
OPDX_INSTANTIATE_LINEAR_JSD_FINALIZE(opdx::kJsdMixture, double)
template cudaError_t opdx::cuda::launch_jsd_loss_finalize<float>(int64_t, const double*, const double*, float*, float*,
                                                                 cudaStream_t);
template cudaError_t opdx::cuda::launch_jsd_loss_finalize<double>(int64_t, const double*, const double*, double*,
                                                                  double*, cudaStream_t);
#endif
