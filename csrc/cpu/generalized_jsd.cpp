// CPU implementation of the generalized JSD (opdx::generalized_jsd_fwd): per-row loss plus the student gradient,
// written during the forward. Each row is streamed three times (two for β = 0) in cache-sized slices (chunks):
//   pass 1: online softmax statistics of both rows (lse_s, lse_t) and the student's argmax, per slice, the slice
//           partials merged in slice order by row_slices.h (the merge the CUDA cluster kernel runs across blocks)
//   pass 2: the row loss and the row total the gradient needs (β = 0 writes the gradient here)
//   pass 3: the gradient
// All arithmetic is in acc_t (float; double for float64 inputs) on values upcast in registers; the two row sums are
// accumulated in double. No [N, V] temporary.
#include "row_kernels.h"
#include "opdx/row_slices.h"
#include "opdx/torch_utils.h"

namespace opdx {
namespace cpu {
namespace {

// out[i] = d loss / d x_s[i] for one chunk of raw (upcast, unscaled) logits; a standalone loop so it vectorizes.
template <int kMode, typename acc_t>
void chunk_jsd_grad(const acc_t* __restrict__ xs, const acc_t* __restrict__ xt, int64_t n, acc_t beta, acc_t invT,
                    acc_t lse_s, acc_t lse_t, acc_t c, acc_t anchor, acc_t row_total, acc_t* __restrict__ out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    out[i] = jsd_element_grad<kMode>(beta, xs[i] * invT - lse_s, xt[i] * invT - lse_t, jsd_delta(xs[i], xt[i], invT, c),
                                     anchor, row_total) *
             invT;
  }
}

// What one row's passes share: the scaling, β, both log-normalizers and the gradient anchor.
template <typename acc_t>
struct RowConstants {
  acc_t beta, invT, lse_s, lse_t, c, anchor;
};

// Pass-1 statistics of slice k of a (student, teacher) row pair; xs / xt: chunk buffers.
template <int kMode, typename scalar_t, typename acc_t>
RowPartial<acc_t> slice_partial(const scalar_t* __restrict__ srow, const scalar_t* __restrict__ trow,
                                const RowSlices& slices, int64_t k, acc_t invT, acc_t* __restrict__ xs,
                                acc_t* __restrict__ xt) {
  const int64_t begin = slices.begin(k);
  const int64_t n = slices.size(k);
  load_scaled(srow + begin, n, invT, xs);
  load_scaled(trow + begin, n, invT, xt);
  RowPartial<acc_t> p{chunk_stats(xs, n, false), chunk_stats(xt, n, false), ArgMax<acc_t>::empty()};
  if (kMode != kJsdForwardKL) chunk_argmax(p.top, xs, n, begin);
  return p;
}

// Pass 1: the row's slices (its chunks) reduced one by one and merged in slice order through row_slices.h, the
// merge the CUDA cluster kernel runs across its blocks; then lse_s, lse_t and the anchor (the gradient's reference
// point at the student's argmax, numerics.h's ArgMax order).
template <int kMode, typename scalar_t, typename acc_t>
RowConstants<acc_t> row_constants(const scalar_t* __restrict__ srow, const scalar_t* __restrict__ trow, int64_t V,
                                  acc_t beta, acc_t invT, bool with_anchor, acc_t* xs, acc_t* xt) {
  const RowSlices slices{V, kChunk};
  const RowPartial<acc_t> row =
      merge_in_rank_order<RowPartial<acc_t>>(static_cast<int>(slices.count()), [&](int k) {
        return slice_partial<kMode>(srow, trow, slices, k, invT, xs, xt);
      });
  RowConstants<acc_t> rc{beta, invT, row.student.logsumexp(), row.teacher.logsumexp(), acc_t(0), acc_t(0)};
  rc.c = rc.lse_t - rc.lse_s;
  if (kMode != kJsdForwardKL && with_anchor) {
    const acc_t s = static_cast<acc_t>(srow[row.top.index]);
    const acc_t t = static_cast<acc_t>(trow[row.top.index]);
    rc.anchor = jsd_anchor<kMode>(beta, s * invT - rc.lse_s, t * invT - rc.lse_t, jsd_delta(s, t, invT, rc.c));
  }
  return rc;
}

// Pass-2 sums of entries [0, n) of a slice; β = 0 with `out` also writes the gradient there. Sums in double: the
// gradient uses total − (entry value), which cancels for the dominant entries of a peaked row, so the row total
// must be accurate well below the fp32 resolution of its partial sums.
template <int kMode, typename scalar_t, typename grad_t, typename acc_t>
RowSums<double> slice_sums(const scalar_t* __restrict__ sp, const scalar_t* __restrict__ tp, int64_t n,
                           const RowConstants<acc_t>& rc, grad_t* __restrict__ op) {
  double l_sum = 0, t_sum = 0;
  if (kMode == kJsdForwardKL && op != nullptr) {
#pragma omp simd reduction(+ : l_sum)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t xs = static_cast<acc_t>(sp[i]);
      const acc_t xt = static_cast<acc_t>(tp[i]);
      const acc_t ls = xs * rc.invT - rc.lse_s;
      const acc_t lt = xt * rc.invT - rc.lse_t;
      const acc_t d = jsd_delta(xs, xt, rc.invT, rc.c);
      acc_t l, k;
      jsd_element<kMode>(rc.beta, ls, lt, d, acc_t(0), l, k);
      l_sum += l;
      op[i] = static_cast<grad_t>(jsd_element_grad<kMode>(rc.beta, ls, lt, d, acc_t(0), acc_t(0)) * rc.invT);
    }
  } else {
#pragma omp simd reduction(+ : l_sum, t_sum)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t xs = static_cast<acc_t>(sp[i]);
      const acc_t xt = static_cast<acc_t>(tp[i]);
      acc_t l, k;
      jsd_element<kMode>(rc.beta, xs * rc.invT - rc.lse_s, xt * rc.invT - rc.lse_t, jsd_delta(xs, xt, rc.invT, rc.c),
                         rc.anchor, l, k);
      l_sum += l;
      t_sum += k;
    }
  }
  return {l_sum, t_sum};
}

// One unmasked row: returns its loss and, when `out` is given, writes its gradient. Pass 2 and pass 3 walk the
// same slices (cache-sized, so the re-reads hit cache); pass 3 upcasts both rows into the chunk buffers, forms the
// gradient in acc_t, then stores it converted.
template <int kMode, typename scalar_t, typename grad_t, typename acc_t>
acc_t gjsd_row(const scalar_t* __restrict__ srow, const scalar_t* __restrict__ trow, int64_t V, acc_t beta,
               acc_t invT, grad_t* __restrict__ out, acc_t* xs_buf, acc_t* xt_buf, acc_t* buf) {
  const RowConstants<acc_t> rc = row_constants<kMode>(srow, trow, V, beta, invT, out != nullptr, xs_buf, xt_buf);
  const RowSlices slices{V, kChunk};
  const RowSums<double> sums = merge_in_rank_order<RowSums<double>>(static_cast<int>(slices.count()), [&](int k) {
    const int64_t b = slices.begin(k);
    return slice_sums<kMode>(srow + b, trow + b, slices.size(k), rc, out != nullptr ? out + b : out);
  });
  if (kMode != kJsdForwardKL && out != nullptr) {
    const acc_t row_total = static_cast<acc_t>(sums.total);
    for (int64_t k = 0; k < slices.count(); ++k) {
      const int64_t b = slices.begin(k);
      const int64_t n = slices.size(k);
      load_scaled(srow + b, n, acc_t(1), xs_buf);
      load_scaled(trow + b, n, acc_t(1), xt_buf);
      chunk_jsd_grad<kMode>(xs_buf, xt_buf, n, beta, invT, rc.lse_s, rc.lse_t, rc.c, rc.anchor, row_total, buf);
      store_chunk(buf, n, out + b);
    }
  }
  return static_cast<acc_t>(sums.loss);  // a sum of non-negative terms
}

template <int kMode, typename scalar_t, typename grad_t>
void gjsd_rows(const at::Tensor& student, const at::Tensor& teacher, const bool* mask, double beta_d,
               double inv_temperature, acc_type_t<scalar_t>* loss_out, at::Tensor* grad) {
  using acc_t = acc_type_t<scalar_t>;
  const RowIndexer s_rows = make_row_indexer(student);
  const RowIndexer t_rows = make_row_indexer(teacher);
  const int64_t V = student.size(-1);
  const scalar_t* s_base = student.const_data_ptr<scalar_t>();
  const scalar_t* t_base = teacher.const_data_ptr<scalar_t>();
  grad_t* g_base = grad != nullptr ? grad->mutable_data_ptr<grad_t>() : nullptr;  // contiguous [N, V]
  const acc_t invT = static_cast<acc_t>(inv_temperature);
  const acc_t beta = static_cast<acc_t>(beta_d);
  at::parallel_for(0, num_rows(student), row_grain(V), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t buf[kChunk];
    alignas(64) acc_t xs_buf[kChunk];
    alignas(64) acc_t xt_buf[kChunk];
    for (int64_t r = begin; r < end; ++r) {
      grad_t* __restrict__ out = g_base != nullptr ? g_base + r * V : nullptr;
      if (mask != nullptr && !mask[r]) {
        loss_out[r] = acc_t(0);
        if (out != nullptr) std::fill(out, out + V, grad_t(0));
        continue;
      }
      loss_out[r] = gjsd_row<kMode>(s_base + s_rows.offset(r), t_base + t_rows.offset(r), V, beta, invT, out, xs_buf,
                                    xt_buf, buf);
    }
  });
}

template <typename scalar_t, typename grad_t>
void gjsd_dispatch_mode(const at::Tensor& student, const at::Tensor& teacher, const bool* mask, double beta,
                        double inv_temperature, acc_type_t<scalar_t>* loss, at::Tensor* grad) {
  switch (jsd_mode_for_beta(beta)) {
    case kJsdForwardKL:
      return gjsd_rows<kJsdForwardKL, scalar_t, grad_t>(student, teacher, mask, beta, inv_temperature, loss, grad);
    case kJsdReverseKL:
      return gjsd_rows<kJsdReverseKL, scalar_t, grad_t>(student, teacher, mask, beta, inv_temperature, loss, grad);
    default:
      return gjsd_rows<kJsdMixture, scalar_t, grad_t>(student, teacher, mask, beta, inv_temperature, loss, grad);
  }
}

std::tuple<at::Tensor, at::Tensor> generalized_jsd_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                           const c10::optional<at::Tensor>& mask, double beta,
                                                           double inv_temperature, bool compute_grad,
                                                           bool grad_fp32) {
  check_generalized_jsd_inputs(student, teacher, beta);
  const int64_t N = num_rows(student);
  const bool* mask_ptr = row_mask_ptr(mask, student, N);
  const bool is_double = student.scalar_type() == at::kDouble;
  const auto acc_dtype = acc_dtype_for(student);
  at::Tensor loss = at::empty({N}, student.options().dtype(acc_dtype));
  const auto grad_dtype = (grad_fp32 && !is_double) ? at::kFloat : student.scalar_type();
  at::Tensor grad = compute_grad ? empty_large(student.sizes(), student.options().dtype(grad_dtype))
                                 : at::empty({0}, student.options().dtype(grad_dtype));
  at::Tensor* grad_ptr = compute_grad ? &grad : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "generalized_jsd_fwd_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    if (grad_dtype == student.scalar_type()) {
      gjsd_dispatch_mode<scalar_t, scalar_t>(student, teacher, mask_ptr, beta, inv_temperature,
                                             loss.mutable_data_ptr<acc_t>(), grad_ptr);
    } else {
      gjsd_dispatch_mode<scalar_t, float>(student, teacher, mask_ptr, beta, inv_temperature,
                                          loss.mutable_data_ptr<acc_t>(), grad_ptr);
    }
  });
  return {loss, grad};
}

// grad[r, :] *= scale[r] in place, in acc_t (the backward of generalized_jsd_fwd).
template <typename scalar_t>
void scale_grad_rows(scalar_t* __restrict__ g, const acc_type_t<scalar_t>* __restrict__ k, int64_t N, int64_t V) {
  at::parallel_for(0, N, row_grain(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* __restrict__ row = g + r * V;
      const acc_type_t<scalar_t> kr = k[r];
#pragma omp simd
      for (int64_t i = 0; i < V; ++i) row[i] = static_cast<scalar_t>(static_cast<acc_type_t<scalar_t>>(row[i]) * kr);
    }
  });
}

void generalized_jsd_scale_grad_cpu(const at::Tensor& grad, const at::Tensor& scale) {
  check_scale_grad_inputs(grad, scale);
  at::Tensor out = grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "generalized_jsd_scale_grad_cpu", [&] {
    scale_grad_rows<scalar_t>(out.mutable_data_ptr<scalar_t>(), scale.const_data_ptr<acc_type_t<scalar_t>>(),
                              num_rows(grad), grad.size(-1));
  });
}

}  // namespace
}  // namespace cpu
}  // namespace opdx

TORCH_LIBRARY_IMPL(opdx, CPU, m) {
  m.impl("generalized_jsd_fwd", &opdx::cpu::generalized_jsd_fwd_cpu);
  m.impl("generalized_jsd_scale_grad_", &opdx::cpu::generalized_jsd_scale_grad_cpu);
}
