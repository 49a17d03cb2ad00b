// CUDA kernels of the fused log-softmax gather. Torch-free (see cuda_common.cuh).
#pragma once

#include "cuda_common.cuh"

namespace opdx {
namespace cuda {

// One block per row: each thread folds its 16-byte vectors into online softmax statistics, then the block merges.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxRowThreads<acc_t>) token_logprobs_fwd_kernel(const scalar_t* __restrict__ logits, RowIndexer rows, int64_t V,
                                          const int64_t* __restrict__ targets, acc_t inv_temperature,
                                          int64_t ignore_index, acc_t* __restrict__ logp, acc_t* __restrict__ lse,
                                          acc_t* __restrict__ entropy) {
  const int64_t r = blockIdx.x;
  const int64_t y = targets[r];
  if (y == ignore_index) {
    if (threadIdx.x == 0) {
      logp[r] = 0;
      lse[r] = 0;
      if (entropy) entropy[r] = 0;
    }
    return;
  }
  const scalar_t* row = logits + rows.offset(r);
  const RowSplit<scalar_t> split(row, V);
  constexpr int kVec = RowSplit<scalar_t>::kVec;
  SoftmaxStats<acc_t> st = SoftmaxStats<acc_t>::empty();
  for (int64_t i = threadIdx.x; i < split.head; i += blockDim.x) st.add(to_acc<acc_t>(row[i]) * inv_temperature);
  const scalar_t* body = row + split.head;
  for (int64_t i = threadIdx.x; i < split.nvec; i += blockDim.x) {
    const VecOf<scalar_t> vec = load_vec(body + i * kVec);
    acc_t x[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) x[k] = to_acc<acc_t>(vec.v[k]) * inv_temperature;
    const SoftmaxStats<acc_t> local = values_stats(x, kVec, entropy != nullptr);  // as the CPU chunks (NaN → NaN)
    st.merge(local);
  }
  for (int64_t i = split.tail0 + threadIdx.x; i < V; i += blockDim.x) st.add(to_acc<acc_t>(row[i]) * inv_temperature);
  st = block_merge_stats(st);
  if (threadIdx.x == 0) {
    const acc_t row_lse = st.logsumexp();
    lse[r] = row_lse;
    logp[r] = to_acc<acc_t>(row[y]) * inv_temperature - row_lse;
    if (entropy) entropy[r] = st.entropy();
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t grad_element(scalar_t xv, acc_t inv_temperature, acc_t row_lse, acc_t gl, acc_t ge,
                                              acc_t h) {
  const acc_t log_p = to_acc<acc_t>(xv) * inv_temperature - row_lse;
  const acc_t p = fast_exp(log_p);
  acc_t g = -gl * p;
  if (ge != acc_t(0) && p > acc_t(0)) g -= ge * p * (log_p + h);
  return g * inv_temperature;
}

// One block per row, one streaming pass: grad = (g_logp·(onehot − p) − g_H·p·(log p + H)) / T. `grad` may alias
// `logits` (in-place backward): every element is read before it is written by the same thread, and the target
// element is finished by thread 0 after a barrier from the value it read first.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxRowThreads<acc_t>) token_logprobs_bwd_kernel(const scalar_t* logits, RowIndexer in_rows, scalar_t* grad,
                                          RowIndexer out_rows, int64_t V, const int64_t* __restrict__ targets,
                                          acc_t inv_temperature, int64_t ignore_index,
                                          const acc_t* __restrict__ grad_logp, const acc_t* __restrict__ grad_entropy,
                                          const acc_t* __restrict__ lse, const acc_t* __restrict__ entropy) {
  const int64_t r = blockIdx.x;
  const int64_t y = targets[r];
  const scalar_t* row = logits + in_rows.offset(r);
  scalar_t* out = grad + out_rows.offset(r);
  if (y == ignore_index) {
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) out[i] = from_acc<scalar_t>(acc_t(0));
    return;
  }
  const acc_t row_lse = lse[r];
  const acc_t gl = grad_logp[r];
  const acc_t ge = (grad_entropy && entropy) ? grad_entropy[r] : acc_t(0);
  const acc_t h = entropy ? entropy[r] : acc_t(0);
  __shared__ acc_t x_target;
  if (threadIdx.x == 0) x_target = to_acc<acc_t>(row[y]) * inv_temperature;
  __syncthreads();

  // Input and output rows share alignment only when they share offsets; otherwise use the scalar path.
  const bool same_alignment = (reinterpret_cast<uintptr_t>(row) % kVecBytes) == (reinterpret_cast<uintptr_t>(out) % kVecBytes);
  if (same_alignment) {
    const RowSplit<scalar_t> split(row, V);
    constexpr int kVec = RowSplit<scalar_t>::kVec;
    for (int64_t i = threadIdx.x; i < split.head; i += blockDim.x)
      out[i] = from_acc<scalar_t>(grad_element(row[i], inv_temperature, row_lse, gl, ge, h));
    const scalar_t* body_in = row + split.head;
    scalar_t* body_out = out + split.head;
    for (int64_t i = threadIdx.x; i < split.nvec; i += blockDim.x) {
      const VecOf<scalar_t> vin = load_vec(body_in + i * kVec);
      VecOf<scalar_t> vout;
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        vout.v[k] = from_acc<scalar_t>(grad_element(vin.v[k], inv_temperature, row_lse, gl, ge, h));
      store_vec(body_out + i * kVec, vout);
    }
    for (int64_t i = split.tail0 + threadIdx.x; i < V; i += blockDim.x)
      out[i] = from_acc<scalar_t>(grad_element(row[i], inv_temperature, row_lse, gl, ge, h));
  } else {
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
      out[i] = from_acc<scalar_t>(grad_element(row[i], inv_temperature, row_lse, gl, ge, h));
  }
  __syncthreads();
  if (threadIdx.x == 0)
    out[y] = from_acc<scalar_t>(token_logprob_grad<acc_t>(x_target, row_lse, true, gl, ge, h) * inv_temperature);
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_token_logprobs_fwd(const scalar_t* logits, RowIndexer rows, int64_t N, int64_t V,
                                      const int64_t* targets, acc_t inv_temperature, int64_t ignore_index,
                                      acc_t* logp, acc_t* lse, acc_t* entropy, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  const int threads = threads_for_row<scalar_t>(V, kMaxRowThreads<acc_t>);
  token_logprobs_fwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(N), threads, 0, stream>>>(
      logits, rows, V, targets, inv_temperature, ignore_index, logp, lse, entropy);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_token_logprobs_bwd(const scalar_t* logits, RowIndexer in_rows, scalar_t* grad,
                                      RowIndexer out_rows, int64_t N, int64_t V, const int64_t* targets,
                                      acc_t inv_temperature, int64_t ignore_index, const acc_t* grad_logp,
                                      const acc_t* grad_entropy, const acc_t* lse, const acc_t* entropy,
                                      cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  const int threads = threads_for_row<scalar_t>(V, kMaxRowThreads<acc_t>);
  token_logprobs_bwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(N), threads, 0, stream>>>(
      logits, in_rows, grad, out_rows, V, targets, inv_temperature, ignore_index, grad_logp, grad_entropy, lse,
      entropy);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace opdx

// Explicit instantiations for the torch-free compile check on CPU machines (tests/test_cuda_compile.py).
#if defined(OPDX_COMPILE_CHECK)
#define OPDX_INSTANTIATE_TOKEN_LOGPROBS(scalar_t, acc_t)                                                             \
  template cudaError_t opdx::cuda::launch_token_logprobs_fwd<scalar_t, acc_t>(                                       \
      const scalar_t*, opdx::RowIndexer, int64_t, int64_t, const int64_t*, acc_t, int64_t, acc_t*, acc_t*, acc_t*,   \
      cudaStream_t);                                                                                                 \
  template cudaError_t opdx::cuda::launch_token_logprobs_bwd<scalar_t, acc_t>(                                       \
      const scalar_t*, opdx::RowIndexer, scalar_t*, opdx::RowIndexer, int64_t, int64_t, const int64_t*, acc_t,       \
      int64_t, const acc_t*, const acc_t*, const acc_t*, const acc_t*, cudaStream_t);
OPDX_INSTANTIATE_TOKEN_LOGPROBS(float, float)
OPDX_INSTANTIATE_TOKEN_LOGPROBS(__half, float)
OPDX_INSTANTIATE_TOKEN_LOGPROBS(__nv_bfloat16, float)
OPDX_INSTANTIATE_TOKEN_LOGPROBS(double, double)
#endif
