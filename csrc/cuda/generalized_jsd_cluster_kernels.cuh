// The generalized JSD on Hopper thread-block clusters (sm_90+), and the launcher that picks the kernel.
// Torch-free (see cuda_common.cuh).
//
// Which path runs: with enough rows to fill the device (N >= kClusterMaxRowsPerSm · SMs) the one-block-per-row
// kernel of generalized_jsd_kernels.cuh (three reads of the rows, the re-reads mostly from L2). Measured on an H200
// (benchmarks/cuda/gjsd_variants.cu, bf16 N=8192 V=131072 fwd+grad): rows 8.2 ms (β=0.5), 3.5 (β=0), 5.1 (β=1)
// against 10.5 / 6.3 / 7.9 ms for the best cluster size: the cluster kernel's one HBM read does not pay for its
// occupancy (one or a few blocks per SM, each holding its slices in shared memory), and at β = 0.5 both are
// arithmetic-bound. With few rows, the cluster kernel splits each row over C blocks, so C·N blocks share the work:
// it runs when the device is sm_90 or newer, the kernel's code was compiled for sm_90+ (cudaFuncGetAttributes), the
// slices fit the shared-memory budget (cluster_blocks_per_row) and the device can co-schedule such a cluster
// (cudaOccupancyMaxActiveClusters).
//
// Cluster kernel: block `rank` of a row's cluster owns the contiguous slice `rank` (row_slices.h) of the student and
// the teacher row. Pass 1 reads its slice from HBM once (16-byte vector loads when both rows share their alignment),
// computing the slice's softmax statistics of both rows and the student's argmax while copying the raw values into
// dynamic shared memory (input dtype). The blocks' partials are exchanged through distributed shared memory and
// merged in rank order 0..C-1, so every block holds identical lse_s, lse_t and argmax; passes 2 (loss, row total:
// merged the same way) and 3 (the gradient, 16-byte stores) read shared memory only. HBM traffic per row:
// 2·V·sizeof(scalar_t) read + V·sizeof(grad_t) written (+ the two logits at the argmax, the gradient anchor).
#pragma once

#include <cooperative_groups.h>

#include <algorithm>
#include <mutex>

#include "generalized_jsd_kernels.cuh"

namespace opdx {
namespace cuda {

constexpr int kClusterMaxBlocks = 8;  // the portable cluster size
// The cluster kernel runs only for N < kClusterMaxRowsPerSm · SMs: fewer rows than one-row blocks the device keeps
// in flight at once. Each block's slice is at most kClusterSliceTarget entries where C <= 8 allows.
constexpr int64_t kClusterMaxRowsPerSm = 2;
constexpr int64_t kClusterSliceTarget = 16384;
// Dynamic shared memory a block may use for its two slices: below the 227 KB opt-in limit of sm_90, leaving room for
// the blocks' static shared memory (the reductions' scratch, < 2 KB).
constexpr int64_t kClusterSmemBudget = 200 * 1024;
constexpr int64_t kStaticSmemReserve = 8 * 1024;

// A block's dynamic shared memory: its student slice, then its teacher slice, each stored at the same offset mod 16
// bytes as in global memory (so RowSplit cuts both copies like the global rows), each region one vector longer than
// the slice for that shift.
template <typename scalar_t>
struct ClusterSmem {
  static constexpr int kVec = RowSplit<scalar_t>::kVec;
  static constexpr int64_t region(int64_t slice_len) { return slice_len + kVec; }  // slice_len % kVec == 0
  static constexpr int64_t bytes(int64_t slice_len) { return 2 * region(slice_len) * sizeof(scalar_t); }
  __device__ static int64_t shift(const scalar_t* p) {
    return static_cast<int64_t>((reinterpret_cast<uintptr_t>(p) % kVecBytes) / sizeof(scalar_t));
  }
};

// One cluster of gridDim.x / N blocks per row; slice_len as chosen by cluster_slice_length.
template <int kMode, typename scalar_t, typename grad_t, typename acc_t>
__global__ void generalized_jsd_cluster_kernel(const scalar_t* __restrict__ student, RowIndexer s_rows,
                                               const scalar_t* __restrict__ teacher, RowIndexer t_rows, int64_t V,
                                               int64_t slice_len, const bool* __restrict__ mask, acc_t beta,
                                               acc_t inv_temperature, acc_t* __restrict__ loss_out,
                                               grad_t* __restrict__ grad) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int blocks = static_cast<int>(cluster.num_blocks());
  const int64_t r = blockIdx.x / blocks;
  const RowSlices slices{V, slice_len};
  const int64_t begin = slices.begin(rank);
  const int64_t n = slices.size(rank);
  grad_t* __restrict__ out = grad != nullptr ? grad + r * V + begin : nullptr;
  if (mask != nullptr && !mask[r]) {  // the whole cluster leaves: no block touches another's shared memory
    if (rank == 0 && threadIdx.x == 0) loss_out[r] = acc_t(0);
    zero_row(out, n);
    return;
  }
  const scalar_t* __restrict__ srow = student + s_rows.offset(r);
  const scalar_t* __restrict__ trow = teacher + t_rows.offset(r);
  const scalar_t* __restrict__ sg = srow + begin;
  const scalar_t* __restrict__ tg = trow + begin;
  extern __shared__ __align__(16) unsigned char cluster_smem[];
  using Smem = ClusterSmem<scalar_t>;
  scalar_t* ss = reinterpret_cast<scalar_t*>(cluster_smem) + Smem::shift(sg);
  scalar_t* ts = reinterpret_cast<scalar_t*>(cluster_smem) + Smem::region(slice_len) + Smem::shift(tg);
  const bool vec_in = reinterpret_cast<uintptr_t>(sg) % kVecBytes == reinterpret_cast<uintptr_t>(tg) % kVecBytes;
  __shared__ RowPartial<acc_t> block_partial;
  __shared__ RowSums<acc_t> block_sums;

  // Pass 1 (the only HBM read), then the cluster-wide statistics.
  const RowPartial<acc_t> mine = jsd_pass1<kMode>(sg, tg, n, vec_in, inv_temperature, begin, ss, ts);
  if (threadIdx.x == 0) block_partial = mine;
  cluster.sync();  // every block's partial published (and this block's shared-memory copy complete)
  const RowPartial<acc_t> row = merge_in_rank_order<RowPartial<acc_t>>(
      blocks, [&](int k) { return *cluster.map_shared_rank(&block_partial, k); });
  const JsdRowMath<kMode, acc_t> m = jsd_row_math<kMode>(row, srow, trow, beta, inv_temperature);

  // Pass 2 from shared memory, then the cluster-wide sums.
  const RowSums<acc_t> part = jsd_pass2<kMode>(ss, ts, out, n, vec_in, m);
  if (threadIdx.x == 0) block_sums = part;
  cluster.sync();
  const RowSums<acc_t> sums =
      merge_in_rank_order<RowSums<acc_t>>(blocks, [&](int k) { return *cluster.map_shared_rank(&block_sums, k); });
  if (rank == 0 && threadIdx.x == 0) loss_out[r] = sums.loss;
  cluster.barrier_arrive();  // this block has read its peers' sums

  // Pass 3 from shared memory.
  if (kMode != kJsdForwardKL && out != nullptr) jsd_pass3<kMode>(ss, ts, out, n, vec_in, m, sums.total);
  cluster.barrier_wait();  // no block exits (freeing its shared memory) while a peer may still read it
#else
  __trap();  // code for pre-sm_90 targets: never launched (launch_jsd_cluster checks the kernel's PTX version)
#endif
}

// What the launcher needs to know about a device, queried once per device.
struct ClusterDevice {
  bool clusters;  // compute capability >= 9.0
  int64_t smem_optin;
  int64_t sms;
};

inline ClusterDevice cluster_device(int device) {
  constexpr int kMaxDevices = 64;
  static ClusterDevice cache[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) return {false, 0, 0};
  std::call_once(once[device], [device] {
    int major = 0, optin = 0, sms = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      (void)cudaGetLastError();  // leave no sticky error for the caller's launch check
      major = 0;
    }
    cache[device] = {major >= 9, optin, sms};
  });
  return cache[device];
}

// Blocks per row for the cluster kernel: the smallest C in {1, 2, 4, 8} whose slices are at most
// kClusterSliceTarget entries (else 8), if the slices of both rows fit the shared-memory budget; 0 when they do not,
// the device has no clusters, or N fills the device with one-row blocks.
template <typename scalar_t>
inline int cluster_blocks_per_row(int64_t N, int64_t V, const ClusterDevice& dev) {
  if (!dev.clusters || N >= kClusterMaxRowsPerSm * dev.sms) return 0;
  const int64_t budget = std::min(kClusterSmemBudget, dev.smem_optin - kStaticSmemReserve);
  int c = 1;
  while (c < kClusterMaxBlocks && slice_length(V, c, ClusterSmem<scalar_t>::kVec) > kClusterSliceTarget) c *= 2;
  return ClusterSmem<scalar_t>::bytes(slice_length(V, c, ClusterSmem<scalar_t>::kVec)) <= budget ? c : 0;
}

// Launches the cluster kernel with C blocks per row; cudaErrorNotSupported (nothing launched, no error left set)
// when this build has no sm_90+ code for it or the device cannot co-schedule such a cluster.
template <int kMode, typename scalar_t, typename grad_t, typename acc_t>
cudaError_t launch_jsd_cluster(const scalar_t* student, RowIndexer s_rows, const scalar_t* teacher,
                               RowIndexer t_rows, int64_t N, int64_t V, int C, const bool* mask, acc_t beta,
                               acc_t inv_temperature, acc_t* loss, grad_t* grad, cudaStream_t stream,
                               int max_threads = kJsdMaxThreads) {
  const auto kernel = generalized_jsd_cluster_kernel<kMode, scalar_t, grad_t, acc_t>;
  const int64_t slice_len = slice_length(V, C, ClusterSmem<scalar_t>::kVec);
  const int64_t bytes = ClusterSmem<scalar_t>::bytes(slice_len);
  cudaFuncAttributes attrs;
  if (cudaFuncGetAttributes(&attrs, kernel) != cudaSuccess || attrs.ptxVersion < 90 || attrs.binaryVersion < 90 ||
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)) !=
          cudaSuccess) {
    (void)cudaGetLastError();
    return cudaErrorNotSupported;  // e.g. a build with compute_80 code only, JIT-compiled for an sm_90 device
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(N * C));
  config.blockDim = dim3(threads_for_row<scalar_t>(slice_len, max_threads));
  config.dynamicSmemBytes = static_cast<size_t>(bytes);
  config.stream = stream;
  cudaLaunchAttribute cluster_dim;
  cluster_dim.id = cudaLaunchAttributeClusterDimension;
  cluster_dim.val.clusterDim.x = static_cast<unsigned>(C);
  cluster_dim.val.clusterDim.y = 1;
  cluster_dim.val.clusterDim.z = 1;
  config.attrs = &cluster_dim;
  config.numAttrs = 1;
  int active_clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&active_clusters, kernel, &config) != cudaSuccess || active_clusters == 0) {
    (void)cudaGetLastError();
    return cudaErrorNotSupported;
  }
  return cudaLaunchKernelEx(&config, kernel, student, s_rows, teacher, t_rows, V, slice_len, mask, beta,
                            inv_temperature, loss, grad);
}

// The generalized JSD forward (+ gradient): the one-block-per-row kernel, or the cluster kernel for few rows (see
// the top of this file).
template <typename scalar_t, typename grad_t, typename acc_t>
cudaError_t launch_generalized_jsd_fwd(const scalar_t* student, RowIndexer s_rows, const scalar_t* teacher,
                                       RowIndexer t_rows, int64_t N, int64_t V, const bool* mask, acc_t beta,
                                       acc_t inv_temperature, acc_t* loss, grad_t* grad, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return cudaGetLastError();
  const int C = cluster_blocks_per_row<scalar_t>(N, V, cluster_device(device));
  if (C > 0) {
    const cudaError_t err = with_jsd_mode(static_cast<double>(beta), [&](auto mode) {
      return launch_jsd_cluster<decltype(mode)::value>(student, s_rows, teacher, t_rows, N, V, C, mask, beta,
                                                       inv_temperature, loss, grad, stream);
    });
    if (err != cudaErrorNotSupported) return err;
  }
  return launch_generalized_jsd_rows(student, s_rows, teacher, t_rows, N, V, mask, beta, inv_temperature, loss, grad,
                                     stream);
}

}  // namespace cuda
}  // namespace opdx

// Explicit instantiations for the torch-free compile check on CPU machines (tests/test_cuda_compile.py).
#if defined(OPDX_COMPILE_CHECK)
#define OPDX_INSTANTIATE_GJSD(scalar_t, grad_t, acc_t)                                                              \
  template cudaError_t opdx::cuda::launch_generalized_jsd_fwd<scalar_t, grad_t, acc_t>(                             \
      const scalar_t*, opdx::RowIndexer, const scalar_t*, opdx::RowIndexer, int64_t, int64_t, const bool*, acc_t,   \
      acc_t, acc_t*, grad_t*, cudaStream_t);
OPDX_GJSD_TYPES(OPDX_INSTANTIATE_GJSD)
#endif
