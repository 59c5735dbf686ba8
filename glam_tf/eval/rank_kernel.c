/* The binning pass of exact search's rank counting (glam_tf/eval/search.py, _count_finite),
   compiled on first use by glam_tf/eval/rank_kernel.py. One pass over a row of scores does
   what takes NumPy seven (product, sum, clip, bincount, take and flatnonzero for the
   tracked scores' bins, a comparison and flatnonzero for the top-k). */
#include <stdint.h>

/* For each of the n scores v: x = v * scale, then x + offset (float32, each rounded: the
   build turns contraction into fused multiply-adds off, so the bins are NumPy's), clamped
   to [0, num_bins - 1] and truncated: its bin. hist[bin] += 1, and v is appended to cand
   when marked[bin]; its column i is appended to above when v >= kth. hist holds num_bins
   zeros (int32: half the cache an int64 one takes beside the matrix product; a row has
   fewer than 2^31 scores), cand room for n floats, above for n columns; *n_above receives
   their number.
   Returns the number of values appended to cand, or -1 when a score is NaN. */
int64_t glam_bin_collect(const float *row, int64_t n, float scale, float offset,
                         int64_t num_bins, int32_t *hist, const uint8_t *marked,
                         float *cand, float kth, int64_t *above, int64_t *n_above) {
  const float top = (float)(num_bins - 1);
  int64_t taken = 0, reached = 0;
  int nan = 0;
  for (int64_t i = 0; i < n; i++) {
    const float v = row[i];
    float x = v * scale;
    x = x + offset;
    nan |= (x != x);
    if (!(x >= 0.0f)) x = 0.0f; /* NaN too: never an index out of range */
    if (x > top) x = top;
    const int64_t b = (int64_t)x;
    hist[b]++;
    cand[taken] = v;
    taken += marked[b];
    above[reached] = i;
    reached += (v >= kth);
  }
  *n_above = reached;
  return nan ? -1 : taken;
}
