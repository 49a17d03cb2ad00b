// A row cut into contiguous slices, each reduced on its own and the partials merged in a fixed order: the CPU
// generalized JSD (slices = its cache-sized chunks) and the CUDA cluster kernel (slices = the blocks of a
// thread-block cluster, merged through distributed shared memory) use these same definitions, so CPU tests
// exercise the merge the GPU runs. Host+device, header-only (see numerics.h).
#pragma once

#include "opdx/numerics.h"

namespace opdx {

// Slice k of a row of V entries covers [k·len, min((k + 1)·len, V)); trailing slices may be empty.
struct RowSlices {
  int64_t V;
  int64_t len;  // > 0

  OPDX_HD int64_t begin(int64_t k) const { return k * len < V ? k * len : V; }
  OPDX_HD int64_t end(int64_t k) const { return begin(k + 1); }
  OPDX_HD int64_t size(int64_t k) const { return end(k) - begin(k); }
  OPDX_HD int64_t count() const { return (V + len - 1) / len; }
};

// The length that splits V into (at most) `slices` slices whose starts are multiples of `granule` entries (so a row
// aligned for vector loads stays aligned in every slice). At least one granule.
OPDX_HD int64_t slice_length(int64_t V, int64_t slices, int64_t granule) {
  const int64_t even = (V + slices - 1) / slices;
  const int64_t len = (even + granule - 1) / granule * granule;
  return len > 0 ? len : granule;
}

// Pass-1 statistics of one slice of a (student, teacher) row pair (values already divided by the temperature):
// both rows' softmax statistics and the student's argmax, with the global index.
template <typename acc_t>
struct RowPartial {
  SoftmaxStats<acc_t> student;
  SoftmaxStats<acc_t> teacher;
  ArgMax<acc_t> top;

  OPDX_HD static RowPartial empty() {
    return {SoftmaxStats<acc_t>::empty(), SoftmaxStats<acc_t>::empty(), ArgMax<acc_t>::empty()};
  }
  // Folds in the partial of the next slice. Slices folded 0, 1, 2, ... give one fixed result (the softmax merge
  // rounds differently in another order; the argmax is order-free: value descending, then index ascending).
  OPDX_HD void merge_next(const RowPartial& next) {
    student.merge(next.student);
    teacher.merge(next.teacher);
    top.merge(next.top);
  }
};

// Pass-2 sums of one slice: the row loss and the row total the gradient needs (numerics.h, jsd_element).
template <typename sum_t>
struct RowSums {
  sum_t loss;
  sum_t total;

  OPDX_HD static RowSums empty() { return {sum_t(0), sum_t(0)}; }
  OPDX_HD void merge_next(const RowSums& next) {
    loss += next.loss;
    total += next.total;
  }
};

// The partials of slices 0 .. n − 1, part(k) giving slice k's, merged in rank order: every caller that merges the
// same partials (e.g. each block of a cluster, reading its peers' shared memory) gets bit-identical results.
template <typename Partial, typename Get>
OPDX_HD Partial merge_in_rank_order(int n, Get&& part) {
  Partial merged = Partial::empty();
  for (int k = 0; k < n; ++k) merged.merge_next(part(k));
  return merged;
}

}  // namespace opdx
