// Launch-configuration sweep of the CUDA generalized JSD (no torch): the one-block-per-row kernel and the sm_90
// cluster kernel at every cluster size that fits, each at several block sizes, timed with CUDA events on
// headline shapes, every variant's loss and gradient checked against the first variant's.
//
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90,code=sm_90 -Icsrc/include -Icsrc/cuda \
//        benchmarks/cuda/gjsd_variants.cu -o gjsd_variants && ./gjsd_variants
//
// Prints one line per (shape, β, variant): median ms over 10 launches, GB/s of the op's minimal traffic (both rows
// read once, the gradient written once), max |Δloss| and max |Δgrad| against the reference variant.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "generalized_jsd_cluster_kernels.cuh"

using namespace opdx;
using namespace opdx::cuda;

#define CHECK(x)                                                                               \
  do {                                                                                         \
    cudaError_t e = (x);                                                                       \
    if (e != cudaSuccess) {                                                                    \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__);      \
      std::exit(1);                                                                            \
    }                                                                                          \
  } while (0)

template <typename T>
__global__ void fill_normalish(T* x, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint64_t h = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 29;
    const float u1 = ((h >> 40) + 1) * (1.0f / 16777217.0f), u2 = ((h >> 16) & 0xFFFFFF) * (1.0f / 16777216.0f);
    x[i] = from_acc<T>(scale * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2));
  }
}

struct Variant {
  std::string name;
  int C;  // 0: the one-block-per-row kernel; -1: the product launcher's choice (launch_generalized_jsd_fwd)
  int threads;
};

template <typename T>
cudaError_t launch(const Variant& v, const T* s, const T* t, RowIndexer rows, int64_t N, int64_t V, float beta,
                   float* loss, T* grad) {
  if (v.C < 0) return launch_generalized_jsd_fwd<T, T, float>(s, rows, t, rows, N, V, nullptr, beta, 1.0f, loss, grad, 0);
  if (v.C == 0)
    return launch_generalized_jsd_rows<T, T, float>(s, rows, t, rows, N, V, nullptr, beta, 1.0f, loss, grad, 0,
                                                    v.threads);
  return with_jsd_mode(beta, [&](auto mode) {
    return launch_jsd_cluster<decltype(mode)::value, T, T, float>(s, rows, t, rows, N, V, v.C, nullptr, beta, 1.0f,
                                                                  loss, grad, 0, v.threads);
  });
}

template <typename T>
void run_case(const char* dtype, int64_t N, int64_t V, double beta, bool with_grad, int reps, bool full) {
  const int64_t n = N * V;
  T *s, *t, *g;
  float* loss;
  CHECK(cudaMalloc(&s, n * sizeof(T)));
  CHECK(cudaMalloc(&t, n * sizeof(T)));
  CHECK(cudaMalloc(&g, n * sizeof(T)));
  CHECK(cudaMalloc(&loss, N * sizeof(float)));
  fill_normalish<<<2048, 256>>>(s, n, 1234, 3.0f);
  fill_normalish<<<2048, 256>>>(t, n, 987, 3.0f);
  CHECK(cudaDeviceSynchronize());
  RowIndexer rows{};
  rows.ndim = 1;
  rows.sizes[0] = N;
  rows.strides[0] = V;
  std::vector<Variant> variants{{"auto", -1, 0}};
  for (int th : {256, 512, 1024})
    if (full || th != 512) variants.push_back({"rows/" + std::to_string(th), 0, th});
  for (int C : {1, 2, 4, 8})
    for (int th : {256, 512, 1024})
      if (full || th == 256) variants.push_back({"cluster" + std::to_string(C) + "/" + std::to_string(th), C, th});
  const int64_t sample = std::min<int64_t>(n, 1 << 20);
  std::vector<float> ref_loss(N), cur_loss(N);
  std::vector<T> ref_grad(sample), cur_grad(sample);
  bool have_ref = false;
  const double bytes = double(n) * sizeof(T) * (with_grad ? 3 : 2);
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  for (const Variant& v : variants) {
    CHECK(cudaMemset(loss, 0xff, N * sizeof(float)));
    cudaError_t err = launch<T>(v, s, t, rows, N, V, float(beta), loss, with_grad ? g : nullptr);
    if (err == cudaErrorNotSupported) {
      std::printf("%-6s N=%-6lld V=%-7lld beta=%.2f grad=%d %-16s  (does not fit)\n", dtype, (long long)N,
                  (long long)V, beta, with_grad, v.name.c_str());
      continue;
    }
    CHECK(err);
    CHECK(cudaDeviceSynchronize());
    std::vector<float> ms;
    for (int r = 0; r < reps + 2; ++r) {
      CHECK(cudaEventRecord(e0));
      CHECK(launch<T>(v, s, t, rows, N, V, float(beta), loss, with_grad ? g : nullptr));
      CHECK(cudaEventRecord(e1));
      CHECK(cudaEventSynchronize(e1));
      float m;
      CHECK(cudaEventElapsedTime(&m, e0, e1));
      if (r >= 2) ms.push_back(m);
    }
    std::sort(ms.begin(), ms.end());
    const float med = ms[ms.size() / 2];
    CHECK(cudaMemcpy(cur_loss.data(), loss, N * sizeof(float), cudaMemcpyDeviceToHost));
    if (with_grad) CHECK(cudaMemcpy(cur_grad.data(), g, sample * sizeof(T), cudaMemcpyDeviceToHost));
    double dl = 0, dg = 0;
    if (!have_ref) {
      ref_loss = cur_loss;
      ref_grad = cur_grad;
      have_ref = true;
    } else {
      for (int64_t i = 0; i < N; ++i) dl = std::max(dl, double(std::abs(cur_loss[i] - ref_loss[i])) / (1e-6 + std::abs(ref_loss[i])));
      if (with_grad)
        for (int64_t i = 0; i < sample; ++i)
          dg = std::max(dg, double(std::abs(float(cur_grad[i]) - float(ref_grad[i]))));
    }
    std::printf("%-6s N=%-6lld V=%-7lld beta=%.2f grad=%d %-16s %8.3f ms %8.1f GB/s  rel dloss %.1e  dgrad %.1e\n",
                dtype, (long long)N, (long long)V, beta, with_grad, v.name.c_str(), med, bytes / med / 1e6, dl, dg);
  }
  CHECK(cudaFree(s));
  CHECK(cudaFree(t));
  CHECK(cudaFree(g));
  CHECK(cudaFree(loss));
}

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 10;
  cudaDeviceProp p;
  CHECK(cudaGetDeviceProperties(&p, 0));
  std::printf("%s, %d SMs, smem/block optin %zu KB\n", p.name, p.multiProcessorCount, p.sharedMemPerBlockOptin / 1024);
  for (int64_t N : {16, 64, 256, 1024, 8192}) run_case<__nv_bfloat16>("bf16", N, 131072, 0.5, true, reps, false);
  for (double beta : {0.0, 1.0}) run_case<__nv_bfloat16>("bf16", 8192, 131072, beta, true, reps, false);
  run_case<__nv_bfloat16>("bf16", 8192, 151936, 0.5, true, reps, false);
  for (int64_t N : {64, 8192}) run_case<float>("fp32", N, 32768, 0.5, true, reps, false);
  return 0;
}
