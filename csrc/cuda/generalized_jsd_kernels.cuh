// CUDA kernels of the generalized JSD (opdx::generalized_jsd_fwd). Torch-free (see cuda_common.cuh).
//
// One block per row, the row read three times (two for β = 0), 16-byte vector loads when the student, teacher (and
// gradient) rows share their alignment:
//   pass 1: online softmax statistics of both rows and the student's argmax (the gradient anchor, numerics.h)
//   pass 2: row loss and the row total the gradient needs (β = 0: writes the gradient instead)
//   pass 3: the gradient
// Re-reads rely on L2 (a block's two rows are 2·V·sizeof(scalar_t) bytes). All arithmetic in acc_t on upcast values.
#pragma once

#include "cuda_common.cuh"

namespace opdx {
namespace cuda {

// Block-wide ArgMax (numerics.h's order: the CPU kernel's too); all threads get the index. blockDim.x % 32 == 0.
template <typename acc_t>
__device__ __forceinline__ int64_t block_argmax(ArgMax<acc_t> a) {
  __shared__ ArgMax<acc_t> partial[32];
  __shared__ int64_t result;
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
    if (lane == 0) result = a.index;
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
// they share their alignment. Each thread visits a fixed subset of entries (the same subset in every pass).
template <typename scalar_t, typename acc_t, typename F>
__device__ __forceinline__ void for_each_entry(const scalar_t* __restrict__ srow, const scalar_t* __restrict__ trow,
                                               int64_t V, bool vectorized, F&& f) {
  constexpr int kVec = RowSplit<scalar_t>::kVec;
  if (!vectorized) {
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) f(i, to_acc<acc_t>(srow[i]), to_acc<acc_t>(trow[i]));
    return;
  }
  const RowSplit<scalar_t> split(srow, V);
  for (int64_t i = threadIdx.x; i < split.head; i += blockDim.x) f(i, to_acc<acc_t>(srow[i]), to_acc<acc_t>(trow[i]));
  for (int64_t j = threadIdx.x; j < split.nvec; j += blockDim.x) {
    const int64_t i0 = split.head + j * kVec;
    const VecOf<scalar_t> vs = load_vec(srow + i0);
    const VecOf<scalar_t> vt = load_vec(trow + i0);
#pragma unroll
    for (int k = 0; k < kVec; ++k) f(i0 + k, to_acc<acc_t>(vs.v[k]), to_acc<acc_t>(vt.v[k]));
  }
  for (int64_t i = split.tail0 + threadIdx.x; i < V; i += blockDim.x) f(i, to_acc<acc_t>(srow[i]), to_acc<acc_t>(trow[i]));
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

// At most 512 threads: the float64 instantiation needs up to 84 registers per thread (1024·84 > 64k registers).
// No __launch_bounds__(512): with it ptxas spills these kernels (-Xptxas -v, nvcc 13.0, sm_90); without it they use
// at most 78 registers (float64), and 512 × 78 fits the 64k register file, so the launch cannot fail for lack of them.
constexpr int kJsdMaxThreads = 512;

template <int kMode, typename scalar_t, typename grad_t, typename acc_t>
__global__ void generalized_jsd_fwd_kernel(const scalar_t* __restrict__ student, RowIndexer s_rows,
                                           const scalar_t* __restrict__ teacher, RowIndexer t_rows, int64_t V,
                                           const bool* __restrict__ mask, acc_t beta, acc_t inv_temperature,
                                           acc_t* __restrict__ loss_out, grad_t* __restrict__ grad) {
  const int64_t r = blockIdx.x;
  grad_t* __restrict__ out = grad != nullptr ? grad + r * V : nullptr;
  if (mask != nullptr && !mask[r]) {
    if (threadIdx.x == 0) loss_out[r] = acc_t(0);
    if (out != nullptr)
      for (int64_t i = threadIdx.x; i < V; i += blockDim.x) out[i] = from_acc<grad_t>(acc_t(0));
    return;
  }
  const scalar_t* __restrict__ srow = student + s_rows.offset(r);
  const scalar_t* __restrict__ trow = teacher + t_rows.offset(r);
  const uintptr_t s_mis = reinterpret_cast<uintptr_t>(srow) % kVecBytes;
  const bool vec_in = s_mis == reinterpret_cast<uintptr_t>(trow) % kVecBytes;
  const acc_t invT = inv_temperature;

  // Pass 1.
  SoftmaxStats<acc_t> ss = SoftmaxStats<acc_t>::empty();
  SoftmaxStats<acc_t> st = SoftmaxStats<acc_t>::empty();
  ArgMax<acc_t> am = ArgMax<acc_t>::empty();
  for_each_entry<scalar_t, acc_t>(srow, trow, V, vec_in, [&](int64_t i, acc_t xs, acc_t xt) {
    ss.add(xs * invT);
    st.add(xt * invT);
    if (kMode != kJsdForwardKL) am.update(xs * invT, i);
  });
  ss = block_merge_stats(ss);
  st = block_merge_stats(st);
  const int64_t top = kMode == kJsdForwardKL ? 0 : block_argmax(am);
  const acc_t lse_s = ss.logsumexp();
  const acc_t lse_t = st.logsumexp();
  const acc_t c = lse_t - lse_s;
  acc_t anchor = acc_t(0);
  if (kMode != kJsdForwardKL) {
    const acc_t xs = to_acc<acc_t>(srow[top]);
    const acc_t xt = to_acc<acc_t>(trow[top]);
    anchor = jsd_anchor<kMode>(beta, xs * invT - lse_s, xt * invT - lse_t, jsd_delta(xs, xt, invT, c));
  }

  // Pass 2.
  acc_t loss = 0, total = 0;
  if (kMode == kJsdForwardKL && out != nullptr) {
    write_grad_row<scalar_t, grad_t, acc_t>(srow, trow, out, V, vec_in, [&](acc_t xs, acc_t xt) {
      const acc_t ls = xs * invT - lse_s;
      const acc_t lt = xt * invT - lse_t;
      const acc_t d = jsd_delta(xs, xt, invT, c);
      acc_t l, k;
      jsd_element<kMode>(beta, ls, lt, d, anchor, l, k);
      loss += l;
      return jsd_element_grad<kMode>(beta, ls, lt, d, anchor, acc_t(0)) * invT;
    });
  } else {
    for_each_entry<scalar_t, acc_t>(srow, trow, V, vec_in, [&](int64_t, acc_t xs, acc_t xt) {
      acc_t l, k;
      jsd_element<kMode>(beta, xs * invT - lse_s, xt * invT - lse_t, jsd_delta(xs, xt, invT, c), anchor, l, k);
      loss += l;
      total += k;
    });
  }
  block_sum2(loss, total);
  if (threadIdx.x == 0) loss_out[r] = loss;
  if (kMode == kJsdForwardKL || out == nullptr) return;

  // Pass 3.
  write_grad_row<scalar_t, grad_t, acc_t>(srow, trow, out, V, vec_in, [&](acc_t xs, acc_t xt) {
    return jsd_element_grad<kMode>(beta, xs * invT - lse_s, xt * invT - lse_t, jsd_delta(xs, xt, invT, c), anchor,
                                   total) *
           invT;
  });
}

template <typename scalar_t, typename grad_t, typename acc_t>
cudaError_t launch_generalized_jsd_fwd(const scalar_t* student, RowIndexer s_rows, const scalar_t* teacher,
                                       RowIndexer t_rows, int64_t N, int64_t V, const bool* mask, acc_t beta,
                                       acc_t inv_temperature, acc_t* loss, grad_t* grad, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  const int threads = threads_for_row<scalar_t>(V, kJsdMaxThreads);
  const unsigned blocks = static_cast<unsigned>(N);
  switch (jsd_mode_for_beta(static_cast<double>(beta))) {
    case kJsdForwardKL:
      generalized_jsd_fwd_kernel<kJsdForwardKL, scalar_t, grad_t, acc_t><<<blocks, threads, 0, stream>>>(
          student, s_rows, teacher, t_rows, V, mask, beta, inv_temperature, loss, grad);
      break;
    case kJsdReverseKL:
      generalized_jsd_fwd_kernel<kJsdReverseKL, scalar_t, grad_t, acc_t><<<blocks, threads, 0, stream>>>(
          student, s_rows, teacher, t_rows, V, mask, beta, inv_temperature, loss, grad);
      break;
    default:
      generalized_jsd_fwd_kernel<kJsdMixture, scalar_t, grad_t, acc_t><<<blocks, threads, 0, stream>>>(
          student, s_rows, teacher, t_rows, V, mask, beta, inv_temperature, loss, grad);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace opdx

// Explicit instantiations for the torch-free compile check on CPU machines (tests/test_cuda_compile.py).
#if defined(OPDX_COMPILE_CHECK)
#define OPDX_INSTANTIATE_GJSD(scalar_t, grad_t, acc_t)                                                              \
  template cudaError_t opdx::cuda::launch_generalized_jsd_fwd<scalar_t, grad_t, acc_t>(                             \
      const scalar_t*, opdx::RowIndexer, const scalar_t*, opdx::RowIndexer, int64_t, int64_t, const bool*, acc_t,   \
      acc_t, acc_t*, grad_t*, cudaStream_t);
OPDX_INSTANTIATE_GJSD(float, float, float)
OPDX_INSTANTIATE_GJSD(__half, __half, float)
OPDX_INSTANTIATE_GJSD(__half, float, float)
OPDX_INSTANTIATE_GJSD(__nv_bfloat16, __nv_bfloat16, float)
OPDX_INSTANTIATE_GJSD(__nv_bfloat16, float, float)
OPDX_INSTANTIATE_GJSD(double, double, double)
#endif
