// Numerics shared by every opdx kernel, CPU and CUDA alike.
//
// Everything here is header-only, depends on nothing but the C++ standard library (and CUDA when compiled by
// nvcc), and accumulates in `acc_t` (float for fp32/bf16/fp16 inputs, double for fp64 inputs).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define OPDX_HD __host__ __device__ __forceinline__
#define OPDX_DEVICE_CODE 1
#else
#define OPDX_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define OPDX_ON_DEVICE 1
#endif

namespace opdx {

template <typename acc_t>
OPDX_HD acc_t neg_inf() {
  return -static_cast<acc_t>(INFINITY);
}

template <typename acc_t>
OPDX_HD acc_t max_of(acc_t a, acc_t b) {
  return a > b ? a : b;
}

// ---------------------------------------------------------------------------------------------------------------
// exp / log. On the device the fast intrinsics (arguments here are always <= 0 or small, where they are accurate to
// a few ulp). On the host a branch-free polynomial exp that compilers vectorize (std::exp calls do not).
// ---------------------------------------------------------------------------------------------------------------

// exp(x) for x <= ~88, Cephes-style: x = k*ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial (< 2 ulp).
// Inputs below -87.3 (including -inf) return exactly 0, so masked (-inf) vocabulary entries contribute nothing.
inline float host_exp(float x) {
  const float clamped = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float k = std::nearbyint(clamped * 1.44269504088896341f);
  float r = clamped - k * 0.693359375f;  // Cody-Waite split of ln2 = 0.693359375 - 2.12194440e-4
  r = r + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float result = p * scale;
  return x < -87.3f ? 0.0f : result;
}
inline double host_exp(double x) { return std::exp(x); }

template <typename acc_t>
OPDX_HD acc_t fast_exp(acc_t x);
template <>
OPDX_HD float fast_exp<float>(float x) {
#if defined(OPDX_ON_DEVICE)
  return __expf(x);
#else
  return host_exp(x);
#endif
}
template <>
OPDX_HD double fast_exp<double>(double x) {
  return exp(x);
}

template <typename acc_t>
OPDX_HD acc_t fast_log(acc_t x);
template <>
OPDX_HD float fast_log<float>(float x) {
#if defined(OPDX_ON_DEVICE)
  return __logf(x);
#else
  return std::log(x);
#endif
}
template <>
OPDX_HD double fast_log<double>(double x) {
  return log(x);
}

// ---------------------------------------------------------------------------------------------------------------
// Online softmax statistics of a row x (already divided by the temperature), relative to a running maximum m:
//   sum  = Σ exp(x_v − m)
//   wsum = Σ exp(x_v − m)·(x_v − m)      (only for the entropy; kept relative to m to avoid cancellation)
// so that lse = m + log(sum) and entropy H = log(sum) − wsum/sum. −inf entries contribute nothing.
// Two partial statistics merge exactly (rescaling by exp(m_old − m_new)), so rows can be split across threads,
// warps, vector lanes or chunks in any order.
// ---------------------------------------------------------------------------------------------------------------
template <typename acc_t>
struct SoftmaxStats {
  acc_t max;
  acc_t sum;
  acc_t wsum;

  OPDX_HD static SoftmaxStats empty() { return {neg_inf<acc_t>(), acc_t(0), acc_t(0)}; }

  OPDX_HD void add(acc_t x) {
    if (!(x > neg_inf<acc_t>())) return;  // −inf (or NaN-free masked) entries
    if (x > max) {
      const acc_t shift = max - x;  // <= 0; −inf when this is the first finite entry
      const acc_t scale = fast_exp(shift);
      wsum = scale * (wsum + shift * sum);
      if (!(max > neg_inf<acc_t>())) wsum = acc_t(0);
      sum = sum * scale + acc_t(1);
      max = x;
    } else {
      const acc_t d = x - max;
      const acc_t e = fast_exp(d);
      sum += e;
      wsum += e * d;
    }
  }

  OPDX_HD void merge(const SoftmaxStats& other) {
    if (!(other.max > neg_inf<acc_t>())) return;
    if (!(max > neg_inf<acc_t>())) {
      *this = other;
      return;
    }
    const acc_t new_max = max_of(max, other.max);
    const acc_t d_self = max - new_max;
    const acc_t d_other = other.max - new_max;
    const acc_t s_self = fast_exp(d_self);
    const acc_t s_other = fast_exp(d_other);
    wsum = s_self * (wsum + d_self * sum) + s_other * (other.wsum + d_other * other.sum);
    sum = s_self * sum + s_other * other.sum;
    max = new_max;
  }

  OPDX_HD acc_t logsumexp() const {
    return max > neg_inf<acc_t>() ? max + fast_log(sum) : neg_inf<acc_t>();
  }
  OPDX_HD acc_t entropy() const {
    return max > neg_inf<acc_t>() ? fast_log(sum) - wsum / sum : acc_t(0);
  }
};

// p_v·log p_v with the 0·log 0 = 0 convention (−inf logits).
template <typename acc_t>
OPDX_HD acc_t xlogx_from_log(acc_t log_p) {
  return log_p > neg_inf<acc_t>() ? fast_exp(log_p) * log_p : acc_t(0);
}

// ---------------------------------------------------------------------------------------------------------------
// Gradient of the fused log-softmax gather (+ entropy) w.r.t. one scaled logit x_v (multiply by 1/T for raw logits):
//   d logp_y / d x_v = 1[v = y] − p_v
//   d H      / d x_v = −p_v·(log p_v + H)
// ---------------------------------------------------------------------------------------------------------------
template <typename acc_t>
OPDX_HD acc_t token_logprob_grad(acc_t x, acc_t lse, bool is_target, acc_t grad_logp, acc_t grad_entropy,
                                 acc_t entropy) {
  const acc_t log_p = x - lse;
  const acc_t p = x > neg_inf<acc_t>() ? fast_exp(log_p) : acc_t(0);
  acc_t g = -grad_logp * p;
  if (is_target) g += grad_logp;
  if (grad_entropy != acc_t(0) && p > acc_t(0)) g -= grad_entropy * p * (log_p + entropy);
  return g;
}

// ---------------------------------------------------------------------------------------------------------------
// Row addressing: a tensor [..., V] whose last dim is contiguous and whose leading dims have arbitrary strides
// (e.g. logits[:, :-1, :]) is visited row by row; row r starts at offset(r) elements from the data pointer.
// ---------------------------------------------------------------------------------------------------------------
constexpr int kMaxRowDims = 4;

struct RowIndexer {
  int ndim;  // number of (collapsed) leading dims, 1..kMaxRowDims
  int64_t sizes[kMaxRowDims];
  int64_t strides[kMaxRowDims];

  OPDX_HD int64_t offset(int64_t row) const {
    if (ndim == 1) return row * strides[0];
    int64_t off = 0;
#pragma unroll
    for (int d = kMaxRowDims - 1; d >= 0; --d) {
      if (d < ndim) {
        off += (row % sizes[d]) * strides[d];
        row /= sizes[d];
      }
    }
    return off;
  }
};

}  // namespace opdx
