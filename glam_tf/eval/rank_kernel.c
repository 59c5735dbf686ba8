/* The rank counting of exact search (glam_tf/eval/search.py, _count_finite), compiled on
   first use by glam_tf/eval/rank_kernel.py. One pass over a row of chunk scores gives, per
   tracked score, the entries ranked before it, and the columns that may enter the top-k;
   no sort. */
#include <stdint.h>

/* The bin of v: v * scale + offset, clamped to [0, top] (NaN to 0) and truncated. It is
   non-decreasing in v (scale > 0): a value in a higher bin is strictly higher. */
static inline int64_t bin_of(float v, float scale, float offset, float top) {
  float x = v * scale;
  x = x + offset;
  if (!(x >= 0.0f)) x = 0.0f;
  if (x > top) x = top;
  return (int64_t)x;
}

/* Per tracked score tv[j] (m >= 1 of them, ascending, finite), count[j] = the entries of
   the row (n scores) above it, plus those equal to it in columns below lim[j] (ties go to
   the lower database index: lim is the tracked image's column in the chunk, 0 when it lies
   before the chunk, n after it).
   One pass bins every entry and counts the bins; the entries of bins holding a tracked
   score (about one in a hundred) are kept, with their columns. Then the entries in higher
   bins than a tracked score's are a suffix sum of the counts, and the kept entries are
   compared with the tracked scores of their own bin. The bins span [tv[0], high] (below:
   bin 0, above: the last): high is the highest tracked score, or lower where that lies
   far out (a positive near the top) so that the bins stay fine where the scores are dense:
   then at most about 1/256 of the row (counted on every 16th entry) lies above it.
   Scratch: hist and first hold num_bins (>= 4) int32; cand and cand_col room for n
   entries, above for n columns: the columns scoring >= kth (the top-k candidates).
   Returns their number, or -1 when a score is NaN. */
int64_t glam_rank_count(const float *row, int64_t n, const float *tv, const int64_t *lim,
                        int64_t m, int64_t num_bins, int32_t *hist, int32_t *first,
                        float *cand, int64_t *cand_col, int64_t *count, float kth,
                        int64_t *above) {
  const float low = tv[0];
  float high = tv[m - 1];
  if (high > low) {
    int64_t coarse[257] = {0};
    const float cs = 256.0f / (high - low);
    for (int64_t i = 0; i < n; i += 16) coarse[bin_of(row[i], cs, -low * cs, 256.0f)]++;
    int64_t acc = 0, b = 256;
    for (; b > 0 && acc + coarse[b] <= (n / 16) / 256; b--) acc += coarse[b];
    const float edge = low + (float)(b + 1) / cs;
    if (edge < high) high = edge;
  }
  float width = high - low;
  if (!(width > 0.0f)) width = (low < 0.0f ? -low : low) * 1e-3f + 1e-9f;
  const float scale = (float)(num_bins - 3) / width;
  const float offset = 1.5f - low * scale; /* low: mid-bin 1, not an edge */
  const float top = (float)(num_bins - 1);

  for (int64_t b = 0; b < num_bins; b++) {
    hist[b] = 0;
    first[b] = -1;
  }
  for (int64_t j = m - 1; j >= 0; j--) first[bin_of(tv[j], scale, offset, top)] = (int32_t)j;

  int64_t taken = 0, reached = 0;
  int nan = 0;
  for (int64_t i = 0; i < n; i++) {
    const float v = row[i];
    const int64_t b = bin_of(v, scale, offset, top);
    nan |= (v != v);
    hist[b]++;
    cand[taken] = v;
    cand_col[taken] = i;
    taken += (first[b] >= 0);
    above[reached] = i;
    reached += (v >= kth);
  }

  int64_t acc = 0;
  for (int64_t b = num_bins - 1; b >= 0; b--) {
    if (first[b] >= 0)
      for (int64_t k = first[b]; k < m && bin_of(tv[k], scale, offset, top) == b; k++)
        count[k] = acc;
    acc += hist[b];
  }
  for (int64_t c = 0; c < taken; c++) {
    /* The first tracked score of the bin without a branch; more (rare) in a loop. */
    const float v = cand[c];
    int64_t k = first[bin_of(v, scale, offset, top)];
    count[k] += (tv[k] < v) | ((tv[k] == v) & (cand_col[c] < lim[k]));
    for (k++; k < m && tv[k] <= v; k++) count[k] += (tv[k] < v) | (cand_col[c] < lim[k]);
  }
  return nan ? -1 : reached;
}

/* glam_rank_count on rows of a chunk's score matrix (C order, n columns): row_ids[r] is
   the r-th row counted, with the tracked scores tv[starts[r] .. starts[r + 1]) (ascending,
   at least one), the limits lim[...] and the counts count[...] of the same span, and the
   top-k threshold kth[r]. Its columns scoring >= kth[r] are appended to `above` while that
   has room for a whole row (above_cap), n_above[r] of them; a row without room gets
   n_above[r] = -1 (its columns are not kept; spill is their scratch, room for n).
   One call for a chunk's rows: no per-row call overhead.
   Returns 0, or -1 when a score is NaN. */
int64_t glam_rank_count_rows(const float *scores, int64_t n, int64_t nrows,
                             const int64_t *row_ids, const float *tv, const int64_t *lim,
                             const int64_t *starts, int64_t num_bins, int32_t *hist,
                             int32_t *first, float *cand, int64_t *cand_col, int64_t *count,
                             const float *kth, int64_t *above, int64_t above_cap,
                             int64_t *n_above, int64_t *spill) {
  int64_t used = 0;
  for (int64_t r = 0; r < nrows; r++) {
    int64_t *dest = (used + n <= above_cap) ? above + used : spill;
    const int64_t s = starts[r];
    const int64_t got = glam_rank_count(scores + row_ids[r] * n, n, tv + s, lim + s,
                                        starts[r + 1] - s, num_bins, hist, first, cand,
                                        cand_col, count + s, kth[r], dest);
    if (got < 0) return -1;
    n_above[r] = (dest == spill) ? -1 : got;
    if (dest != spill) used += got;
  }
  return 0;
}
