// The row logic of teacher_topk shared by the CPU op and the CUDA kernels (host + device, torch-free): a row is
// streamed in index order through a threshold filter into a candidate buffer of (order key, index) pairs; when the
// buffer could overflow it is compacted to the keys >= the k-th largest key of the buffer (a radix select), and the
// threshold rises above that key; the final top-k is the compacted buffer in topk_order_key order.
//
// Why a strict threshold is exact: after a compaction the buffer holds >= k keys >= kth, all at indices below every
// element still to come, so a later element equal to kth loses to all of them (ties go to the smaller index) and only
// keys > kth can still enter the top-k.
//
// The CPU op runs these functions sequentially; the CUDA kernel runs the same RadixSelect pass arithmetic, threshold,
// keep rule and order with block-parallel loops (csrc/cuda/topk_kl_teacher_kernels.cuh).
#pragma once

#include "opdx/topk_math.h"

namespace opdx {

// teacher_topk's order on (key, index): true when a comes first (key desc, then index asc).
template <typename key_t>
OPDX_HD bool topk_before(key_t key_a, int64_t id_a, key_t key_b, int64_t id_b) {
  return key_a > key_b || (key_a == key_b && id_a < id_b);
}

constexpr int kRadixBits = 11;
constexpr int kRadixBins = 1 << kRadixBits;

// State of a radix select of the k-th largest key, most significant digit first: pass p histograms the digit of the
// keys that match the prefix fixed so far, the bin holding the remaining-th largest key extends the prefix.
template <typename key_t>
struct RadixSelect {
  static constexpr int kKeyBits = static_cast<int>(sizeof(key_t) * 8);
  static constexpr int kPasses = (kKeyBits + kRadixBits - 1) / kRadixBits;
  key_t prefix;
  key_t mask;
  int remaining;  // how many of the keys matching the prefix belong to the top-k
  int tie_count;  // after the last pass: how many keys equal the k-th largest

  OPDX_HD static RadixSelect start(int k) { return {key_t(0), key_t(0), k, 0}; }
  OPDX_HD static int shift(int pass) {
    const int hi = kKeyBits - pass * kRadixBits;
    return hi > kRadixBits ? hi - kRadixBits : 0;
  }
  OPDX_HD static int bins(int pass) { return 1 << (kKeyBits - pass * kRadixBits - shift(pass)); }
  OPDX_HD bool matches(key_t key) const { return (key & mask) == prefix; }
  OPDX_HD static int digit(key_t key, int pass) {
    return static_cast<int>((key >> shift(pass)) & static_cast<key_t>(bins(pass) - 1));
  }
  // bin: the digit of the remaining-th largest matching key; above: matching keys in higher bins; count: in `bin`.
  OPDX_HD void advance(int pass, int bin, int above, int count) {
    remaining -= above;
    tie_count = count;
    prefix |= static_cast<key_t>(bin) << shift(pass);
    mask |= static_cast<key_t>(bins(pass) - 1) << shift(pass);
  }
  OPDX_HD key_t kth() const { return prefix; }
};

// The bin of a histogram (nbins counts) holding the remaining-th largest key, scanning from the top bin.
struct RadixBin {
  int bin;
  int above;
};
OPDX_HD RadixBin radix_pick_bin(const unsigned* hist, int nbins, int remaining) {
  int above = 0;
  for (int b = nbins - 1; b > 0; --b) {
    const int c = static_cast<int>(hist[b]);
    if (above + c >= remaining) return {b, above};
    above += c;
  }
  return {0, above};
}

// Sequential radix select over n keys (n >= k >= 1); hist holds kRadixBins counters.
template <typename key_t>
OPDX_HD RadixSelect<key_t> kth_largest_key(const key_t* keys, int64_t n, int k, unsigned* hist) {
  RadixSelect<key_t> sel = RadixSelect<key_t>::start(k);
  for (int pass = 0; pass < RadixSelect<key_t>::kPasses; ++pass) {
    const int nbins = RadixSelect<key_t>::bins(pass);
    for (int b = 0; b < nbins; ++b) hist[b] = 0;
    for (int64_t i = 0; i < n; ++i)
      if (sel.matches(keys[i])) ++hist[RadixSelect<key_t>::digit(keys[i], pass)];
    const RadixBin pick = radix_pick_bin(hist, nbins, sel.remaining);
    sel.advance(pass, pick.bin, pick.above, static_cast<int>(hist[pick.bin]));
  }
  return sel;
}

// Which keys the buffer admits: every key until the first compaction, then only keys above the k-th key it found.
template <typename key_t>
struct TopkThreshold {
  key_t min_key;
  bool closed;  // the k-th key was the largest key there is (>= k NaNs): nothing later can enter

  OPDX_HD static TopkThreshold open() { return {key_t(0), false}; }
  OPDX_HD bool admits(key_t key) const { return !closed && key >= min_key; }
  OPDX_HD void raise(key_t kth) {
    closed = kth == static_cast<key_t>(~key_t(0));
    min_key = static_cast<key_t>(kth + 1);
  }
};

// The compaction rule: a buffer entry survives iff its key is >= the k-th largest key of the buffer.
template <typename key_t>
OPDX_HD bool topk_keeps(key_t key, key_t kth) {
  return key >= kth;
}

// Whether `count` buffered entries plus `incoming` new ones could exceed the capacity: compact first.
OPDX_HD bool topk_buffer_must_compact(int64_t count, int64_t incoming, int64_t capacity) {
  return count + incoming > capacity;
}

// Sequential filter of n keys (row indices offset .. offset + n) into the buffer; returns the new count. The buffer
// must have room for n more entries.
template <typename key_t, typename id_t>
OPDX_HD int64_t topk_append_admitted(const key_t* keys, int64_t n, int64_t offset, TopkThreshold<key_t> thr,
                                     key_t* buf_keys, id_t* buf_ids, int64_t count) {
  for (int64_t i = 0; i < n; ++i) {
    if (thr.admits(keys[i])) {
      buf_keys[count] = keys[i];
      buf_ids[count] = static_cast<id_t>(offset + i);
      ++count;
    }
  }
  return count;
}

// Sequential compaction of a buffer of count >= k entries (order not kept); raises thr; returns the new count.
template <typename key_t, typename id_t>
OPDX_HD int64_t topk_compact(key_t* buf_keys, id_t* buf_ids, int64_t count, int k, unsigned* hist,
                             TopkThreshold<key_t>* thr) {
  const key_t kth = kth_largest_key(buf_keys, count, k, hist).kth();
  int64_t kept = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (topk_keeps(buf_keys[i], kth)) {
      buf_keys[kept] = buf_keys[i];
      buf_ids[kept] = buf_ids[i];
      ++kept;
    }
  }
  thr->raise(kth);
  return kept;
}

}  // namespace opdx
