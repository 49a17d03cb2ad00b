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
#elif defined(__GNUC__)
// Forced inlining keeps the per-element math inside the callers' vectorized loops (an out-of-line call, even to an
// `inline` function, goes through the PLT of the shared library and stops vectorization).
#define OPDX_HD inline __attribute__((always_inline))
#else
#define OPDX_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define OPDX_ON_DEVICE 1
#endif

// Host-only helpers called from vectorized loops: always inlined (see OPDX_HD).
#if defined(__GNUC__)
#define OPDX_HOST_INLINE inline __attribute__((always_inline))
#else
#define OPDX_HOST_INLINE inline
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
OPDX_HOST_INLINE float host_exp(float x) {
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
OPDX_HOST_INLINE double host_exp(double x) { return std::exp(x); }

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

  // A NaN x is folded in like any value (its exp poisons `sum`), so a NaN anywhere makes the row's results NaN.
  OPDX_HD void add(acc_t x) {
    if (x == neg_inf<acc_t>()) return;  // masked entry
    if (x > max) {
      const acc_t shift = max - x;  // <= 0; −inf when this is the first finite entry
      const acc_t scale = fast_exp(shift);
      wsum = scale * (wsum + shift * sum);
      if (!(max > neg_inf<acc_t>())) wsum = acc_t(0);
      sum = sum * scale + acc_t(1);
      max = x;
    } else {
      const acc_t d = x - max;  // NaN for a NaN x (also while max is still −inf)
      const acc_t e = fast_exp(d);
      sum += e;
      wsum += e * d;
    }
  }

  OPDX_HD void merge(const SoftmaxStats& other) {
    if (!(other.max > neg_inf<acc_t>())) {  // empty (adds 0) or NaN-poisoned with no finite entry (adds NaN)
      sum += other.sum;
      wsum += other.wsum;
      return;
    }
    if (!(max > neg_inf<acc_t>())) {
      const acc_t s = sum, w = wsum;
      *this = other;
      sum += s;
      wsum += w;
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

  // An all −inf row: lse = −inf (so log p = −inf − (−inf) = NaN, torch's log_softmax) and entropy NaN; a NaN-poisoned
  // row: NaN for both.
  OPDX_HD acc_t logsumexp() const {
    if (max > neg_inf<acc_t>()) return max + fast_log(sum);
    return sum == acc_t(0) ? neg_inf<acc_t>() : sum;
  }
  OPDX_HD acc_t entropy() const {
    return max > neg_inf<acc_t>() ? fast_log(sum) - wsum / sum : static_cast<acc_t>(NAN);
  }
};

// A loop over a chunk: vectorized on the host, unrolled on the device (where n is a vector width known at compile time).
#define OPDX_PRAGMA(x) _Pragma(#x)
#if defined(__CUDACC__)
#define OPDX_SIMD(clauses) OPDX_PRAGMA(unroll)
#else
#define OPDX_SIMD(clauses) OPDX_PRAGMA(omp simd clauses)
#endif

// Softmax statistics of n values x (already scaled), relative to their own maximum: the one definition every kernel
// (CPU chunks, CUDA vectors) uses. The maximum ignores NaN; a NaN value makes `sum` NaN (NaN in → NaN out); −inf
// values contribute nothing.
template <typename acc_t>
OPDX_HD SoftmaxStats<acc_t> values_stats(const acc_t* __restrict__ x, int64_t n, bool with_entropy) {
  acc_t m = neg_inf<acc_t>();
  OPDX_SIMD(reduction(max : m))
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  acc_t s = 0, w = 0;
  if (!(m > neg_inf<acc_t>())) {  // every value −inf or NaN: only a NaN survives, into the sum
    OPDX_SIMD(reduction(+ : s))
    for (int64_t i = 0; i < n; ++i) s += x[i] == x[i] ? acc_t(0) : x[i];
    return {m, s, acc_t(0)};
  }
  if (with_entropy) {
    OPDX_SIMD(reduction(+ : s, w))
    for (int64_t i = 0; i < n; ++i) {
      const acc_t d = x[i] - m;
      const acc_t e = fast_exp(d);
      s += e;
      w += e > acc_t(0) ? e * d : acc_t(0);
    }
  } else {
    OPDX_SIMD(reduction(+ : s))
    for (int64_t i = 0; i < n; ++i) s += fast_exp(x[i] - m);
  }
  return {m, s, w};
}

// Running argmax of a row by the one order every kernel uses: value descending, then index ascending; NaN values are
// never selected; a row with no value above −inf gives index 0 (always in bounds).
template <typename acc_t>
struct ArgMax {
  acc_t value;
  int64_t index;

  OPDX_HD static ArgMax empty() { return {neg_inf<acc_t>(), 0}; }
  OPDX_HD void update(acc_t v, int64_t i) {
    if (v > value || (v == value && v > neg_inf<acc_t>() && i < index)) {
      value = v;
      index = i;
    }
  }
  OPDX_HD void merge(const ArgMax& o) { update(o.value, o.index); }
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
  const acc_t p = fast_exp(log_p);  // 0 for a masked x; NaN in a NaN or all −inf row (NaN gradient, like torch's)
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

// ===============================================================================================================
// Generalized Jensen-Shannon divergence (GKD). See DESIGN.md ("Generalized JSD") and opdx/ops/reference.py.
// ===============================================================================================================
namespace opdx {

// Natural log for x > 0 (0 → −inf, +inf → +inf), Cephes-style: x = m·2^e with m in [√½, √2), log(m) by a degree-9
// polynomial in m − 1 (about 1 ulp). Branch-free, so loops calling it vectorize (std::log calls do not). Host only.
OPDX_HOST_INLINE float host_log(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool low = m < 0.70710678118654752f;
  e = low ? e - 1 : e;
  const float f = low ? (m + m - 1.0f) : (m - 1.0f);
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  float y = p * f * z;
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  const float r = f + y + 0.693359375f * fe;
  return x > 0.0f ? (x < INFINITY ? r : x) : (x == 0.0f ? -INFINITY : NAN);
}

// log on the host vectorizable path / the device intrinsic (used only where |result| >= ~0.2, so absolute error is
// relative error).
template <typename acc_t>
OPDX_HD acc_t jsd_log(acc_t x);
template <>
OPDX_HD float jsd_log<float>(float x) {
#if defined(OPDX_ON_DEVICE)
  return __logf(x);
#else
  return host_log(x);
#endif
}
template <>
OPDX_HD double jsd_log<double>(double x) {
  return log(x);
}

// expm1(u) for u <= 0 with relative accuracy near 0 (a degree-8 Taylor polynomial on (−0.35, 0], exp(u) − 1 below).
// u = −inf gives −1.
template <typename acc_t>
OPDX_HD acc_t expm1_nonpos(acc_t u);
template <>
OPDX_HD float expm1_nonpos<float>(float u) {
  float p = 2.4801587302e-5f;  // 1/8!
  p = p * u + 1.9841269841e-4f;
  p = p * u + 1.3888888889e-3f;
  p = p * u + 8.3333333333e-3f;
  p = p * u + 4.1666666667e-2f;
  p = p * u + 1.6666666667e-1f;
  p = p * u + 0.5f;
  const float near = u + (u * u) * p;
  const float far = fast_exp(u) - 1.0f;
  return u > -0.35f ? near : far;
}
template <>
OPDX_HD double expm1_nonpos<double>(double u) {
  return expm1(u);
}

// log(1 − w + w·r) = log1p(w·em) for w in [0, 1), r = exp(u) in [0, 1], em = expm1(u): the log of a mixture weight.
// Near 0 (w·em > −0.25) 2·atanh(x / (2 + x)) as an odd series in x = w·em (relative accuracy); below, log of
// (1 − w) + w·r formed directly (accurate to an ulp, where |result| > 0.28).
template <typename acc_t>
OPDX_HD acc_t log_mix(acc_t w, acc_t r, acc_t em);
template <>
OPDX_HD float log_mix<float>(float w, float r, float em) {
  const float x = w * em;
  const float z = x / (2.0f + x);
  const float z2 = z * z;
  float q = 1.0f / 9.0f;
  q = q * z2 + 1.0f / 7.0f;
  q = q * z2 + 1.0f / 5.0f;
  q = q * z2 + 1.0f / 3.0f;
  const float near = 2.0f * z + (2.0f * z) * (z2 * q);
  const float far = jsd_log<float>((1.0f - w) + w * r);
  return x > -0.25f ? near : far;
}
template <>
OPDX_HD double log_mix<double>(double w, double r, double em) {
  (void)r;
  return log1p(w * em);
}

// Which divergence a row computes: β = 0 is exactly KL(P_T‖P_S), β = 1 exactly KL(P_S‖P_T), otherwise the
// mixture form with M = β·P_T + (1 − β)·P_S. The kernels are templated on the mode (branch-free inner loops).
enum JsdMode : int { kJsdForwardKL = 0, kJsdReverseKL = 1, kJsdMixture = 2 };

inline int jsd_mode_for_beta(double beta) {
  return beta == 0.0 ? kJsdForwardKL : (beta == 1.0 ? kJsdReverseKL : kJsdMixture);
}

// One vocabulary entry, in "larger side / smaller side" form so that nothing overflows and one-sided −inf entries
// (zero probability) need no special case:
//   P     = max(p_S, p_T)                 (0 when both logits are −inf)
//   u     = log(min(p_S, p_T) / P) <= 0   (−inf when the smaller side is exactly 0)
//   r     = exp(u), em = expm1(u), rlogr = r·u (0·log 0 = 0)
// log p_S − log p_T is −δ with δ = (x_t − x_s)/T − (lse_t − lse_s): computed from the difference of the raw logits, so
// it is accurate (relative) when teacher ≈ student, and an error in lse_t − lse_s only shifts it uniformly (the
// per-row totals below are first-order insensitive to such a shift).
template <typename acc_t>
struct JsdPoint {
  acc_t P;
  acc_t u;
  acc_t r;
  acc_t em;
  acc_t rlogr;
  bool student_small;  // p_S < p_T
};

// log_ps / log_pt: x/T − lse of each side; delta as above (NaN when both sides are −inf).
template <typename acc_t>
OPDX_HD JsdPoint<acc_t> jsd_point(acc_t log_ps, acc_t log_pt, acc_t delta) {
  JsdPoint<acc_t> pt;
  pt.student_small = delta > acc_t(0);
  const acc_t big = pt.student_small ? log_pt : log_ps;
  acc_t u = pt.student_small ? -delta : delta;
  u = u == u ? u : acc_t(0);  // both −inf: P = 0 below, any finite u will do
  pt.u = u;
  pt.P = fast_exp(big);
  pt.r = fast_exp(u);
  pt.em = expm1_nonpos(u);
  pt.rlogr = pt.r > acc_t(0) ? pt.r * u : acc_t(0);
  return pt;
}

// log p_S − log M (mixture) or log p_S − log p_T (β = 1) of one entry: the quantity the student gradient weighs.
template <int kMode, typename acc_t>
OPDX_HD acc_t jsd_student_log_ratio(acc_t beta, const JsdPoint<acc_t>& q) {
  if (kMode == kJsdReverseKL) return q.student_small ? q.u : -q.u;
  const acc_t w = q.student_small ? (acc_t(1) - beta) : beta;  // weight of the smaller side in M
  const acc_t ell = log_mix(w, q.r, q.em);                      // log(M / larger side)
  return q.student_small ? q.u - ell : -ell;
}

// The anchor of a row: jsd_student_log_ratio at the student's most probable entry. Gradients are formed as
// p_S·((a − anchor) − Σ p_S·(a − anchor)) instead of p_S·(a − Σ p_S·a): the same value, but for a peaked row the
// dominant entry's a − Σ p_S·a cancels to O(1 − p_max) and would lose all fp32 digits; relative to the anchor, the
// dominant entry contributes exactly 0 and the row total is a sum of small, accurate terms.
template <int kMode, typename acc_t>
OPDX_HD acc_t jsd_anchor(acc_t beta, acc_t log_ps, acc_t log_pt, acc_t delta) {
  if (kMode == kJsdForwardKL) return acc_t(0);
  return jsd_student_log_ratio<kMode>(beta, jsd_point(log_ps, log_pt, delta));
}

// Per-entry loss term (>= 0) and the entry's share of the row total the gradient needs:
//   β = 0: term of KL(P_T‖P_S) written as p_T·log(p_T/p_S) − p_T + p_S; no row total
//   β = 1: term of KL(P_S‖P_T) written as p_S·log(p_S/p_T) − p_S + p_T; total term p_S·(log(p_S/p_T) − anchor)
//   else:  β·p_T·log(p_T/m) + (1−β)·p_S·log(p_S/m);                        total term p_S·(log(p_S/m) − anchor)
// The added (p_S − p_T) terms sum to 0 over the row, but make every term non-negative (x·log x − x + 1 >= 0, and
// Jensen for the mixture) and the row sum first-order insensitive to normalization errors, so a row loss is >= 0
// and accurate even when teacher ≈ student (the terms are O(δ²), computed from δ with relative accuracy).
// Terms are clamped at 0, which only removes rounding (each exact term is >= 0).
template <int kMode, typename acc_t>
OPDX_HD void jsd_element(acc_t beta, acc_t log_ps, acc_t log_pt, acc_t delta, acc_t anchor, acc_t& loss,
                         acc_t& total) {
  const JsdPoint<acc_t> q = jsd_point(log_ps, log_pt, delta);
  const acc_t small_term = q.rlogr - q.em;  // x·log x − x + 1 at x = r, for the smaller side's divergence
  const acc_t big_term = q.em - q.u;        // the same with the sides swapped, relative to the larger side
  if (kMode == kJsdForwardKL) {
    const acc_t t = q.student_small ? big_term : small_term;
    loss = q.P * max_of(t, acc_t(0));
    total = acc_t(0);
    return;
  }
  if (kMode == kJsdReverseKL) {
    const acc_t t = q.student_small ? small_term : big_term;
    loss = q.P * max_of(t, acc_t(0));
  } else {
    const acc_t w = q.student_small ? (acc_t(1) - beta) : beta;
    const acc_t ell = log_mix(w, q.r, q.em);
    const acc_t h = w * q.rlogr - ((acc_t(1) - w) + w * q.r) * ell;
    loss = q.P * max_of(h, acc_t(0));
  }
  const acc_t ps = q.student_small ? q.P * q.r : q.P;
  // Computed unconditionally and then selected (a branch-free body vectorizes); the ratio may be ±inf where ps = 0.
  // A NaN ps (NaN row) is kept, so the row total and with it every gradient entry of the row is NaN.
  const acc_t weighted = ps * (jsd_student_log_ratio<kMode>(beta, q) - anchor);
  total = !(ps <= acc_t(0)) ? weighted : acc_t(0);
}

// Gradient of the row loss w.r.t. one scaled student logit x_s/T (multiply by 1/T for raw logits):
//   β = 0: p_S − p_T
//   β = 1: p_S·(log p_S − log p_T − L)                 = p_S·((a − anchor) − total)
//   else:  (1−β)·p_S·(log p_S − log M − KL(P_S‖M))    = (1−β)·p_S·((a − anchor) − total)
// with `total` the row sum of jsd_element's total terms (unused for β = 0).
template <int kMode, typename acc_t>
OPDX_HD acc_t jsd_element_grad(acc_t beta, acc_t log_ps, acc_t log_pt, acc_t delta, acc_t anchor, acc_t total) {
  const JsdPoint<acc_t> q = jsd_point(log_ps, log_pt, delta);
  if (kMode == kJsdForwardKL) return q.student_small ? q.P * q.em : -q.P * q.em;
  const acc_t ps = q.student_small ? q.P * q.r : q.P;
  const acc_t weighted = ps * ((jsd_student_log_ratio<kMode>(beta, q) - anchor) - total);
  const acc_t g = !(ps <= acc_t(0)) ? weighted : acc_t(0);
  return kMode == kJsdReverseKL ? g : (acc_t(1) - beta) * g;
}

// δ of one entry from the raw (upcast, unscaled) logits; c = lse_t − lse_s.
template <typename acc_t>
OPDX_HD acc_t jsd_delta(acc_t xs, acc_t xt, acc_t inv_temperature, acc_t c) {
  return (xt - xs) * inv_temperature - c;
}

}  // namespace opdx
