// CPU implementation of the generalized JSD (opdx::generalized_jsd_fwd): per-row loss plus the student gradient,
// written during the forward. Each row is streamed three times (two for β = 0) while it is cache-resident:
//   pass 1: online softmax statistics of both rows (lse_s, lse_t) and the student's argmax
//   pass 2: the row loss and the row total the gradient needs (β = 0 writes the gradient here)
//   pass 3: the gradient
// All arithmetic is in acc_t (float; double for float64 inputs) on values upcast in registers; the two row sums are
// accumulated in double. No [N, V] temporary.
#include "row_kernels.h"
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

template <int kMode, typename scalar_t, typename grad_t>
void gjsd_rows(const at::Tensor& student, const at::Tensor& teacher, const bool* mask, double beta_d,
               double inv_temperature, acc_type_t<scalar_t>* loss_out, at::Tensor* grad) {
  using acc_t = acc_type_t<scalar_t>;
  const RowIndexer s_rows = make_row_indexer(student);
  const RowIndexer t_rows = make_row_indexer(teacher);
  const int64_t V = student.size(-1);
  const int64_t N = num_rows(student);
  const scalar_t* s_base = student.const_data_ptr<scalar_t>();
  const scalar_t* t_base = teacher.const_data_ptr<scalar_t>();
  grad_t* g_base = grad != nullptr ? grad->mutable_data_ptr<grad_t>() : nullptr;  // contiguous [N, V]
  const acc_t invT = static_cast<acc_t>(inv_temperature);
  const acc_t beta = static_cast<acc_t>(beta_d);

  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
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
      const scalar_t* __restrict__ srow = s_base + s_rows.offset(r);
      const scalar_t* __restrict__ trow = t_base + t_rows.offset(r);
      // Pass 1 (+ the student's argmax, the gradient anchor: numerics.h's ArgMax order, as on CUDA).
      SoftmaxStats<acc_t> st_s = SoftmaxStats<acc_t>::empty();
      ArgMax<acc_t> top = ArgMax<acc_t>::empty();
      for (int64_t start = 0; start < V; start += kChunk) {
        const int64_t n = std::min(kChunk, V - start);
        load_scaled(srow + start, n, invT, buf);
        st_s.merge(chunk_stats(buf, n, false));
        if (kMode != kJsdForwardKL) chunk_argmax(top, buf, n, start);
      }
      const acc_t lse_s = st_s.logsumexp();
      const acc_t lse_t = row_stats(trow, V, invT, false, buf).logsumexp();
      const acc_t c = lse_t - lse_s;
      acc_t anchor = 0;
      if (kMode != kJsdForwardKL && out != nullptr) {
        const acc_t xs = static_cast<acc_t>(srow[top.index]);
        const acc_t xt = static_cast<acc_t>(trow[top.index]);
        anchor = jsd_anchor<kMode>(beta, xs * invT - lse_s, xt * invT - lse_t, jsd_delta(xs, xt, invT, c));
      }
      // Pass 2 (chunked so the partial sums stay short and the rows are re-read in cache-sized pieces).
      // Row sums in double: the gradient uses total − (entry value), which cancels for the dominant entries of a
      // peaked row, so the row total must be accurate well below fp32 resolution of its partial sums.
      double loss = 0, total = 0;
      for (int64_t start = 0; start < V; start += kChunk) {
        const int64_t n = std::min(kChunk, V - start);
        const scalar_t* __restrict__ sp = srow + start;
        const scalar_t* __restrict__ tp = trow + start;
        double l_chunk = 0, t_chunk = 0;
        if (kMode == kJsdForwardKL && out != nullptr) {
          grad_t* __restrict__ op = out + start;
#pragma omp simd reduction(+ : l_chunk)
          for (int64_t i = 0; i < n; ++i) {
            const acc_t xs = static_cast<acc_t>(sp[i]);
            const acc_t xt = static_cast<acc_t>(tp[i]);
            const acc_t ls = xs * invT - lse_s;
            const acc_t lt = xt * invT - lse_t;
            const acc_t d = jsd_delta(xs, xt, invT, c);
            acc_t l, k;
            jsd_element<kMode>(beta, ls, lt, d, acc_t(0), l, k);
            l_chunk += l;
            op[i] = static_cast<grad_t>(jsd_element_grad<kMode>(beta, ls, lt, d, acc_t(0), acc_t(0)) * invT);
          }
        } else {
#pragma omp simd reduction(+ : l_chunk, t_chunk)
          for (int64_t i = 0; i < n; ++i) {
            const acc_t xs = static_cast<acc_t>(sp[i]);
            const acc_t xt = static_cast<acc_t>(tp[i]);
            acc_t l, k;
            jsd_element<kMode>(beta, xs * invT - lse_s, xt * invT - lse_t, jsd_delta(xs, xt, invT, c), anchor, l, k);
            l_chunk += l;
            t_chunk += k;
          }
        }
        loss += l_chunk;
        total += t_chunk;
      }
      loss_out[r] = static_cast<acc_t>(loss);  // a sum of non-negative terms
      const acc_t row_total = static_cast<acc_t>(total);
      if (kMode == kJsdForwardKL || out == nullptr) continue;
      // Pass 3 (chunked: both rows are upcast into cache-resident buffers, the gradient formed in acc_t, then
      // stored converted).
      for (int64_t start = 0; start < V; start += kChunk) {
        const int64_t n = std::min(kChunk, V - start);
        load_scaled(srow + start, n, acc_t(1), xs_buf);
        load_scaled(trow + start, n, acc_t(1), xt_buf);
        chunk_jsd_grad<kMode>(xs_buf, xt_buf, n, beta, invT, lse_s, lse_t, c, anchor, row_total, buf);
        store_chunk(buf, n, out + start);
      }
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

}  // namespace
}  // namespace cpu
}  // namespace opdx

TORCH_LIBRARY_IMPL(opdx, CPU, m) { m.impl("generalized_jsd_fwd", &opdx::cpu::generalized_jsd_fwd_cpu); }
