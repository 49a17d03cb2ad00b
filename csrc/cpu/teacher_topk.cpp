// CPU implementation of opdx::teacher_topk: fused per-row top-k + online logsumexp in one streaming pass.
#include <algorithm>
#include <limits>
#include <vector>

#include "row_kernels.h"
#include "opdx/topk_math.h"
#include "opdx/topk_select.h"
#include "opdx/torch_utils.h"

namespace opdx {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// teacher_topk: per row one streaming pass in chunks: chunk_stats folds the chunk into the online softmax statistics,
// the chunk's order keys go through the threshold filter into a candidate buffer that is compacted whenever the next
// chunk could overflow it (topk_select.h, the CUDA kernel's row logic). Outputs sorted by value (desc), then id.
// ---------------------------------------------------------------------------------------------------------------
template <typename acc_t>
struct TopkRowBuffer {
  using key_t = decltype(topk_order_key(acc_t(0)));
  std::vector<key_t> keys, chunk_keys;
  std::vector<int64_t> ids;
  std::vector<unsigned> hist;
  std::vector<int64_t> order;

  explicit TopkRowBuffer(int64_t k)
      : keys(2 * std::max(k, kChunk) + kChunk), chunk_keys(kChunk), ids(keys.size()), hist(kRadixBins) {}

  // Top-k of one row (scaled by `scale` on load); writes k ids and log-probs, returns the row's logsumexp.
  template <typename scalar_t>
  acc_t run(const scalar_t* row, int64_t V, int k, acc_t scale, acc_t* buf, int64_t* ids_out, acc_t* lp_out) {
    SoftmaxStats<acc_t> st = SoftmaxStats<acc_t>::empty();
    TopkThreshold<key_t> thr = TopkThreshold<key_t>::open();
    int64_t count = 0;
    for (int64_t start = 0; start < V; start += kChunk) {
      const int64_t n = std::min(kChunk, V - start);
      load_scaled(row + start, n, scale, buf);
      st.merge(chunk_stats(buf, n, false));
      key_t* ck = chunk_keys.data();
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) ck[i] = topk_order_key(buf[i]);
      if (topk_buffer_must_compact(count, n, static_cast<int64_t>(keys.size()))) {
        count = topk_compact(keys.data(), ids.data(), count, k, hist.data(), &thr);
        if (topk_buffer_must_compact(count, n, static_cast<int64_t>(keys.size()))) {  // massive ties: grow
          keys.resize(count + n);
          ids.resize(count + n);
        }
      }
      count = topk_append_admitted(ck, n, start, thr, keys.data(), ids.data(), count);
    }
    if (count > k) count = topk_compact(keys.data(), ids.data(), count, k, hist.data(), &thr);
    order.resize(count);
    for (int64_t i = 0; i < count; ++i) order[i] = i;
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
      return topk_before(keys[a], ids[a], keys[b], ids[b]);
    });
    const acc_t row_lse = st.logsumexp();
    for (int j = 0; j < k; ++j) {
      const int64_t id = ids[order[j]];
      // the key holds the scaled value exactly (rounded once, as chunk_stats saw it); ±0 (one key) from the row
      const acc_t x = topk_key_value(keys[order[j]]);
      ids_out[j] = id;
      lp_out[j] = (x == acc_t(0) ? static_cast<acc_t>(row[id]) * scale : x) - row_lse;
    }
    return row_lse;
  }
};

template <typename scalar_t>
void teacher_topk_rows(const at::Tensor& logits, int64_t k, double inv_temperature, at::Tensor& ids,
                       at::Tensor& logprobs, at::Tensor& lse) {
  using acc_t = acc_type_t<scalar_t>;
  const RowIndexer rows = make_row_indexer(logits);
  const int64_t V = logits.size(-1);
  const int64_t N = lse.numel();
  TORCH_CHECK(k <= std::numeric_limits<int>::max(), "opdx::teacher_topk: k=", k, " must fit in int32");
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  int64_t* ids_out = ids.mutable_data_ptr<int64_t>();
  acc_t* lp_out = logprobs.mutable_data_ptr<acc_t>();
  acc_t* lse_out = lse.mutable_data_ptr<acc_t>();
  const acc_t scale = static_cast<acc_t>(inv_temperature);
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t buf[kChunk];
    TopkRowBuffer<acc_t> cand(k);
    for (int64_t r = begin; r < end; ++r)
      lse_out[r] = cand.run(base + rows.offset(r), V, static_cast<int>(k), scale, buf, ids_out + r * k, lp_out + r * k);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> teacher_topk_cpu(const at::Tensor& logits, int64_t k,
                                                                double inv_temperature) {
  at::Tensor ids, logprobs, lse;
  std::tie(ids, logprobs, lse) = teacher_topk_outputs(logits, k, std::numeric_limits<int64_t>::max());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "teacher_topk_cpu", [&] {
    teacher_topk_rows<scalar_t>(logits, k, inv_temperature, ids, logprobs, lse);
  });
  return {ids, logprobs, lse};
}

}  // namespace
}  // namespace cpu
}  // namespace opdx

TORCH_LIBRARY_IMPL(opdx, CPU, m) { m.impl("teacher_topk", &opdx::cpu::teacher_topk_cpu); }
