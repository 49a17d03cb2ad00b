// CPU implementation of the fused log-softmax gather (opdx::token_logprobs_*).
#include "row_kernels.h"
#include "opdx/torch_utils.h"

namespace opdx {
namespace cpu {
namespace {

template <typename scalar_t>
void token_logprobs_fwd_rows(const at::Tensor& logits, const at::Tensor& targets, double inv_temperature,
                             int64_t ignore_index, bool compute_entropy, at::Tensor& logp, at::Tensor& lse,
                             at::Tensor& entropy) {
  using acc_t = acc_type_t<scalar_t>;
  const RowIndexer rows = make_row_indexer(logits);
  const int64_t V = logits.size(-1);
  const int64_t N = targets.numel();
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  acc_t* logp_out = logp.mutable_data_ptr<acc_t>();
  acc_t* lse_out = lse.mutable_data_ptr<acc_t>();
  acc_t* ent_out = compute_entropy ? entropy.mutable_data_ptr<acc_t>() : nullptr;
  const acc_t scale = static_cast<acc_t>(inv_temperature);

  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t buf[kChunk];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = tgt[r];
      if (y == ignore_index) {
        logp_out[r] = 0;
        lse_out[r] = 0;
        if (ent_out) ent_out[r] = 0;
        continue;
      }
      const scalar_t* row = base + rows.offset(r);
      const SoftmaxStats<acc_t> st = row_stats(row, V, scale, compute_entropy, buf);
      const acc_t row_lse = st.logsumexp();
      lse_out[r] = row_lse;
      logp_out[r] = static_cast<acc_t>(row[y]) * scale - row_lse;
      if (ent_out) ent_out[r] = st.entropy();
    }
  });
}

template <typename scalar_t>
void token_logprobs_bwd_rows(const at::Tensor& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                             const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                             const c10::optional<at::Tensor>& entropy, double inv_temperature, int64_t ignore_index,
                             at::Tensor& grad_logits) {
  using acc_t = acc_type_t<scalar_t>;
  const RowIndexer in_rows = make_row_indexer(logits);
  const RowIndexer out_rows = make_row_indexer(grad_logits);
  const int64_t V = logits.size(-1);
  const int64_t N = targets.numel();
  const scalar_t* in_base = logits.const_data_ptr<scalar_t>();
  scalar_t* out_base = grad_logits.mutable_data_ptr<scalar_t>();  // may alias in_base (in-place backward)
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  const acc_t* g_logp = grad_logp.const_data_ptr<acc_t>();
  const acc_t* g_ent = grad_entropy.has_value() ? grad_entropy->const_data_ptr<acc_t>() : nullptr;
  const acc_t* ent = entropy.has_value() && entropy->numel() > 0 ? entropy->const_data_ptr<acc_t>() : nullptr;
  const acc_t* lse_in = lse.const_data_ptr<acc_t>();
  const acc_t scale = static_cast<acc_t>(inv_temperature);

  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t buf[kChunk];
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = in_base + in_rows.offset(r);
      scalar_t* out = out_base + out_rows.offset(r);
      const int64_t y = tgt[r];
      if (y == ignore_index) {
        std::fill(out, out + V, scalar_t(0));
        continue;
      }
      const acc_t row_lse = lse_in[r];
      const acc_t gl = g_logp[r];
      const acc_t ge = (g_ent && ent) ? g_ent[r] : acc_t(0);
      const acc_t h = ent ? ent[r] : acc_t(0);
      const acc_t x_target = static_cast<acc_t>(row[y]) * scale;  // read before an in-place overwrite
      for (int64_t start = 0; start < V; start += kChunk) {
        const int64_t n = std::min(kChunk, V - start);
        load_scaled(row + start, n, scale, buf);
        chunk_logprob_grad(buf, n, row_lse, gl, ge, h, scale);
        store_chunk(buf, n, out + start);
      }
      out[y] = static_cast<scalar_t>(token_logprob_grad<acc_t>(x_target, row_lse, true, gl, ge, h) * scale);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_cpu(const at::Tensor& logits,
                                                                      const at::Tensor& targets,
                                                                      double inv_temperature, int64_t ignore_index,
                                                                      bool compute_entropy, bool inplace_backward) {
  (void)inplace_backward;
  at::Tensor logp, lse, entropy;
  std::tie(logp, lse, entropy) = token_logprobs_outputs(logits, targets, compute_entropy);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_fwd_cpu", [&] {
    token_logprobs_fwd_rows<scalar_t>(logits, targets, inv_temperature, ignore_index, compute_entropy, logp, lse,
                                      entropy);
  });
  return {logp, lse, entropy};
}

at::Tensor token_logprobs_bwd_cpu(const at::Tensor& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                                  const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                  const c10::optional<at::Tensor>& entropy, double inv_temperature,
                                  int64_t ignore_index) {
  check_token_logprobs_bwd_inputs(grad_logp, logits, targets, lse);
  at::Tensor grad_logits = empty_large(logits.sizes(), logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_bwd_cpu", [&] {
    token_logprobs_bwd_rows<scalar_t>(grad_logp, grad_entropy, logits, targets, lse, entropy, inv_temperature,
                                      ignore_index, grad_logits);
  });
  return grad_logits;
}

void token_logprobs_bwd_inplace_cpu(const at::Tensor& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                                    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                    const c10::optional<at::Tensor>& entropy, double inv_temperature,
                                    int64_t ignore_index) {
  check_token_logprobs_bwd_inputs(grad_logp, logits, targets, lse);
  at::Tensor out = logits;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_bwd_inplace_cpu",
                                  [&] {
                                    token_logprobs_bwd_rows<scalar_t>(grad_logp, grad_entropy, logits, targets, lse,
                                                                      entropy, inv_temperature, ignore_index, out);
                                  });
}

}  // namespace
}  // namespace cpu
}  // namespace opdx

TORCH_LIBRARY_IMPL(opdx, CPU, m) {
  m.impl("token_logprobs_fwd", &opdx::cpu::token_logprobs_fwd_cpu);
  m.impl("token_logprobs_bwd", &opdx::cpu::token_logprobs_bwd_cpu);
  m.impl("token_logprobs_bwd_inplace", &opdx::cpu::token_logprobs_bwd_inplace_cpu);
}
