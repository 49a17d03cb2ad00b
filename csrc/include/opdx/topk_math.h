// Small-K math of the top-k renormalized KL (host + device, torch-free): the student's scaled logits z at the
// teacher's K ids and the teacher's full-vocab log-probs t at the same ids give two distributions over K buckets
// (renormalized), or over K+1 buckets with a tail bucket holding 1 − Σ_K p (no renormalization; the student needs its
// full-vocab logsumexp), and the generalized JSD(β) between them with its gradient w.r.t. z (and the student lse).
//
// Notation: ℓ_j = log p_S,j, λ_j = log p_T,j over the buckets j. Treating the ℓ_j as free variables,
//   a_j = ∂L/∂ℓ_j = −p_T,j                         (β = 0, L = KL(P_T‖P_S))
//         p_S,j·(ℓ_j − λ_j + 1)                    (β = 1, L = KL(P_S‖P_T))
//         (1−β)·p_S,j·(ℓ_j − log M_j)              (else, log M = logaddexp(log β + λ, log(1−β) + ℓ))
// and the chain rule through the parametrization gives
//   renormalized: ℓ_k = z_k − LSE_K(z)            → ∂L/∂z_k = a_k − p_S,k·Σ_j a_j   (= DESIGN.md's formulas)
//   tail:         ℓ_k = z_k − lse, ℓ_tail = log(1 − Σ_k e^{ℓ_k})
//                 → ∂L/∂z_k = a_k − a_tail·p_S,k/p_S,tail,  ∂L/∂lse = −Σ_k a_k + a_tail·(1 − p_S,tail)/p_S,tail.
// A tail mass that rounds to <= 0 (the top-k holds all the mass up to rounding) is clamped to kTinyMass (both sides)
// and then carries no gradient.
#pragma once

#include "opdx/numerics.h"

namespace opdx {

// The order of teacher_topk on every device, as an unsigned key (larger key ↔ earlier in the top-k; equal keys are
// ordered by index ascending): value descending, −0 equal to +0, NaN above every value (torch.topk's treatment).
OPDX_HD uint32_t topk_order_key(float x) {
  if (x != x) return 0xffffffffu;
  x += 0.0f;  // −0 + 0 = +0 (round to nearest): ±0 share one key
  uint32_t b;
  memcpy(&b, &x, sizeof(b));
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);  // +inf → 0xff800000, below every NaN key
}
OPDX_HD uint64_t topk_order_key(double x) {
  if (x != x) return 0xffffffffffffffffull;
  x += 0.0;
  uint64_t b;
  memcpy(&b, &x, sizeof(b));
  return (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
}

// The value a key came from: exact, except that ±0 give +0 and NaN keys a NaN.
OPDX_HD float topk_key_value(uint32_t key) {
  const uint32_t b = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float x;
  memcpy(&x, &b, sizeof(x));
  return x;
}
OPDX_HD double topk_key_value(uint64_t key) {
  const uint64_t b = (key & 0x8000000000000000ull) ? (key & 0x7fffffffffffffffull) : ~key;
  double x;
  memcpy(&x, &b, sizeof(x));
  return x;
}

template <typename acc_t>
OPDX_HD acc_t tiny_mass();
template <>
OPDX_HD float tiny_mass<float>() { return 1e-30f; }
template <>
OPDX_HD double tiny_mass<double>() { return 1e-300; }

OPDX_HD float topk_expm1(float x) { return expm1f(x); }
OPDX_HD double topk_expm1(double x) { return expm1(x); }
OPDX_HD float topk_log(float x) { return logf(x); }
OPDX_HD double topk_log(double x) { return log(x); }
OPDX_HD float topk_exp(float x) { return expf(x); }
OPDX_HD double topk_exp(double x) { return exp(x); }

// logsumexp of x[0..K) (−inf entries contribute nothing; all −inf gives −inf).
template <typename acc_t, typename Load>
OPDX_HD acc_t small_lse(int64_t K, Load x) {
  acc_t m = neg_inf<acc_t>();
  for (int64_t k = 0; k < K; ++k) m = max_of(m, x(k));
  if (!(m > neg_inf<acc_t>())) return m;
  acc_t s = 0;
  for (int64_t k = 0; k < K; ++k) s += topk_exp(x(k) - m);
  return m + topk_log(s);
}

// log(1 − e^{log_s}) for log_s = log of the top-k mass, clamped below at log(tiny). Sets `clamped`.
template <typename acc_t>
OPDX_HD acc_t log_tail_mass(acc_t log_s, bool* clamped) {
  const acc_t tail = log_s > neg_inf<acc_t>() ? -topk_expm1(log_s < acc_t(0) ? log_s : acc_t(0)) : acc_t(1);
  *clamped = !(tail > tiny_mass<acc_t>());
  return topk_log(*clamped ? tiny_mass<acc_t>() : tail);
}

// One bucket of GJSD(β): its loss term and a = ∂L/∂ℓ (ℓ = student log-prob, lam = teacher log-prob).
template <typename acc_t>
struct GjsdTerm {
  acc_t loss;
  acc_t a;
};

template <typename acc_t>
OPDX_HD GjsdTerm<acc_t> gjsd_bucket(acc_t ell, acc_t lam, acc_t beta, acc_t log_beta, acc_t log_1m_beta) {
  const acc_t ps = ell > neg_inf<acc_t>() ? topk_exp(ell) : acc_t(0);
  const acc_t pt = lam > neg_inf<acc_t>() ? topk_exp(lam) : acc_t(0);
  GjsdTerm<acc_t> r{acc_t(0), acc_t(0)};
  if (beta == acc_t(0)) {
    if (pt > acc_t(0)) r.loss = pt * (lam - ell);
    r.a = -pt;
  } else if (beta == acc_t(1)) {
    if (ps > acc_t(0)) {
      r.loss = ps * (ell - lam);
      r.a = ps * (ell - lam + acc_t(1));
    }
  } else {
    const acc_t x = log_beta + lam;
    const acc_t y = log_1m_beta + ell;
    const acc_t hi = max_of(x, y);
    const acc_t lo = x > y ? y : x;
    const acc_t log_m = hi > neg_inf<acc_t>() ? hi + topk_log(acc_t(1) + topk_exp(lo - hi)) : neg_inf<acc_t>();
    if (pt > acc_t(0)) r.loss += beta * pt * (lam - log_m);
    if (ps > acc_t(0)) {
      r.loss += (acc_t(1) - beta) * ps * (ell - log_m);
      r.a = (acc_t(1) - beta) * ps * (ell - log_m);
    }
  }
  return r;
}

// Per-row loss over K ids (z: student scaled logits, t: teacher full-vocab log-probs, both with stride 1), and
// grad_z[k] = ∂L/∂z_k; with `tail`, student_lse is the student's full-vocab logsumexp and *grad_lse = ∂L/∂lse.
// Three short passes over K: the two logsumexps, the loss and Σa, the gradient.
template <typename acc_t, typename LoadZ, typename LoadT, typename StoreG>
OPDX_HD acc_t topk_gjsd_row(int64_t K, LoadZ z, LoadT t, bool tail, acc_t student_lse, acc_t beta, StoreG grad_z,
                            acc_t* grad_lse) {
  const acc_t log_beta = beta > acc_t(0) ? topk_log(beta) : neg_inf<acc_t>();
  const acc_t log_1m_beta = beta < acc_t(1) ? topk_log(acc_t(1) - beta) : neg_inf<acc_t>();
  const acc_t lse_z = small_lse<acc_t>(K, z);
  const acc_t lse_t = small_lse<acc_t>(K, t);
  acc_t s_norm = 0, t_norm = 0;  // subtracted from z and t
  acc_t loss = 0, sum_a = 0, a_tail = 0, ps_tail = 0;
  bool s_clamped = false;
  if (tail) {
    s_norm = student_lse;
    t_norm = 0;
    bool t_clamped = false;
    const acc_t ell_tail = log_tail_mass<acc_t>(lse_z - student_lse, &s_clamped);
    const acc_t lam_tail = log_tail_mass<acc_t>(lse_t, &t_clamped);
    const GjsdTerm<acc_t> term = gjsd_bucket(ell_tail, lam_tail, beta, log_beta, log_1m_beta);
    loss += term.loss;
    a_tail = s_clamped ? acc_t(0) : term.a;
    ps_tail = topk_exp(ell_tail);
  } else {
    s_norm = lse_z;
    t_norm = lse_t;
  }
  for (int64_t k = 0; k < K; ++k) {
    const GjsdTerm<acc_t> term = gjsd_bucket(z(k) - s_norm, t(k) - t_norm, beta, log_beta, log_1m_beta);
    loss += term.loss;
    sum_a += term.a;
  }
  for (int64_t k = 0; k < K; ++k) {
    const acc_t ell = z(k) - s_norm;
    const acc_t ps = ell > neg_inf<acc_t>() ? topk_exp(ell) : acc_t(0);
    const acc_t a = gjsd_bucket(ell, t(k) - t_norm, beta, log_beta, log_1m_beta).a;
    grad_z(k, tail ? a - a_tail * ps / ps_tail : a - ps * sum_a);
  }
  if (grad_lse) *grad_lse = tail ? -sum_a + a_tail * (acc_t(1) - ps_tail) / ps_tail : acc_t(0);
  return loss;
}

}  // namespace opdx
