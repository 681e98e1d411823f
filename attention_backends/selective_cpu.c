/* Token-selective attention for decode rows over a paged KV cache, one pass over each row's selected keys.

   The torch path (selective.py) gathers each sequence's selected blocks per kv head, in a Python loop, and
   materialises their scores: on a 2-core CPU it cost several times what vLLM's kernel costs for the whole
   cache. Here one call per layer serves every row: (sequence, kv head) pairs in parallel, keys read in
   place, an online softmax over the selected positions only. Built at first use by
   attention_backends/native.py (cc -O3 -march=native -fopenmp), called through ctypes.

   Layouts (float32 / int32 / uint8 as named; strides in elements):
     query   [T, Hkv * G, D]       the rows' queries back to back (G query heads per kv head, head h*G+g)
     keys    key (block, h, d, t) at keys[block * block_stride + h * head_stride + d * BS + t]: channel-major
                                   per block and kv head (vLLM-CPU's "vec" layout)
     values  value (block, h, t, d) at values[block * block_stride + h * head_stride + t * D + d]
     table   [B, table_stride]     physical block of each logical block
     starts  [B + 1]               row b's queries are query[starts[b] .. starts[b + 1]): its last positions
     mask    [B, Hkv, mask_stride] 1 where a kv head may read a position
     tree    [N, tree_stride]      with tree_rows [B] (both may be NULL): row b verifies a token tree when
                                   tree_rows[b]; its query i reads, among the row's own positions, those
                                   tree[i, j] marks (its ancestors and itself), root first
     out     [T, Hkv * G, D]
   Query i of a row of n_q reads the selected positions before the row, and of the row's own positions those
   up to its own (a chain's causal rule) or those its tree row marks.

   Bytes touched: a key channel's 16 tokens share a 64-byte line, so keys are read in 16-token runs that
   hold a selected position; values one selected token at a time. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define RUN 16 /* float32 key channels per 64-byte cache line */
#define QUAD 4 /* rows scored together: each key line is loaded once for up to four rows */

/* exp(x) for x <= 0 (scores minus their running max), Cephes' expf polynomial after range reduction: plain
   arithmetic, so the compiler vectorises the loops it sits in (libm's expf it would not, without
   -ffast-math). Relative error below 2e-7 for x >= -87; smaller x gives 0 (as expf underflows). */
static inline float exp_nonpositive(float x) {
    float clamped = x < -87.0f ? -87.0f : x;
    float y = clamped * 1.44269504088896341f;
    float k = (y + 12582912.0f) - 12582912.0f; /* y rounded to an integer: adding 1.5 * 2^23 drops the fraction */
    float r = clamped - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)k + 127) << 23; /* 2^k */
    float scale;
    memcpy(&scale, &bits, sizeof(scale));
    return x < -87.0f ? 0.0f : p * scale;
}

/* a[0 .. dim) = a * shrink + the weighted values of the positions with a nonzero weight w[t]. When most
   positions are read (``dense``) and dim is a multiple of 16, each 16-wide slice of a stays in a register across
   the block's tokens; otherwise a is updated token by token, so that only the values read are loaded. */
static inline void add_values(float *a, float shrink, const float *w, const float *v, int count, int dim,
                              int dense) {
    if (!dense || dim % 16) {
        for (int d = 0; d < dim; d++) a[d] *= shrink;
        for (int t = 0; t < count; t++) {
            float wt = w[t];
            if (wt == 0.0f) continue;
            const float *vt = v + (int64_t)t * dim;
#pragma omp simd
            for (int d = 0; d < dim; d++) a[d] += wt * vt[d];
        }
        return;
    }
    for (int d0 = 0; d0 < dim; d0 += 16) {
        float part[16];
        for (int dd = 0; dd < 16; dd++) part[dd] = a[d0 + dd] * shrink;
        for (int t = 0; t < count; t++) {
            float wt = w[t];
            const float *vt = v + (int64_t)t * dim + d0;
#pragma omp simd
            for (int dd = 0; dd < 16; dd++) part[dd] += wt * vt[dd];
        }
        for (int dd = 0; dd < 16; dd++) a[d0 + dd] = part[dd];
    }
}

/* Returns 0; -1 when a scratch buffer could not be allocated (that pair's rows are left unwritten). */
int selective_decode(const float *query, const float *keys, const float *values, int64_t block_stride,
                     int64_t head_stride, const int32_t *table, int64_t table_stride, const int32_t *seq_lens,
                     const int32_t *starts, const uint8_t *mask, int64_t mask_stride, const uint8_t *tree,
                     int64_t tree_stride, const uint8_t *tree_rows, int batch, int num_kv_heads, int group, int dim,
                     int block_size, float scale, float *out) {
    int failed = 0, num_heads = num_kv_heads * group;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int pair = 0; pair < batch * num_kv_heads; pair++) {
        int b = pair / num_kv_heads, h = pair % num_kv_heads;
        int n_q = starts[b + 1] - starts[b], n = seq_lens[b];
        if (n_q <= 0) continue;
        int in_tree = tree_rows != NULL && tree_rows[b];
        int rows = n_q * group, padded = (rows + QUAD - 1) / QUAD * QUAD;
        float *q = calloc((size_t)padded * dim, sizeof(float)), *acc = calloc((size_t)rows * dim, sizeof(float));
        float *top = malloc(sizeof(float) * (size_t)rows), *sum = calloc((size_t)rows, sizeof(float));
        float *score = malloc(sizeof(float) * (size_t)padded * block_size);
        if (!q || !acc || !top || !sum || !score) {
            free(q); free(acc); free(top); free(sum); free(score);
            failed |= 1;
            continue;
        }
        for (int i = 0; i < n_q; i++)
            for (int g = 0; g < group; g++) {
                const float *src = query + ((int64_t)(starts[b] + i) * num_heads + h * group + g) * dim;
                for (int d = 0; d < dim; d++) q[(i * group + g) * dim + d] = src[d] * scale;
                top[i * group + g] = -INFINITY;
            }
        const uint8_t *selected = mask + ((int64_t)b * num_kv_heads + h) * mask_stride;
        int n_blocks = (n + block_size - 1) / block_size;
        for (int j = 0; j < n_blocks; j++) {
            int first = j * block_size, count = n - first < block_size ? n - first : block_size;
            int any_run[block_size / RUN + 1], any = 0, picked_count = 0;
            for (int run = 0; run * RUN < count; run++) {
                int hit = 0;
                for (int t = run * RUN; t < count && t < (run + 1) * RUN; t++) {
                    hit |= selected[first + t];
                    picked_count += selected[first + t];
                }
                any_run[run] = hit;
                any |= hit;
            }
            if (!any) continue;
            int64_t base = (int64_t)table[(int64_t)b * table_stride + j] * block_stride + h * head_stride;
            const float *k = keys + base, *v = values + base;
            for (int r0 = 0; r0 < padded; r0 += QUAD) /* scores of the runs that hold a selected key */
                for (int run = 0; run * RUN < count; run++) {
                    if (!any_run[run]) continue;
                    float part[QUAD][RUN] = {{0}};
                    for (int d = 0; d < dim; d++) {
                        const float *kd = k + (int64_t)d * block_size + run * RUN;
                        for (int rr = 0; rr < QUAD; rr++) {
                            float qv = q[(int64_t)(r0 + rr) * dim + d];
#pragma omp simd
                            for (int t = 0; t < RUN; t++) part[rr][t] += qv * kd[t];
                        }
                    }
                    for (int rr = 0; rr < QUAD; rr++)
                        memcpy(score + (int64_t)(r0 + rr) * block_size + run * RUN, part[rr], sizeof(part[rr]));
                }
            for (int r = 0; r < rows; r++) {
                float *s = score + (int64_t)r * block_size, best = -INFINITY;
                int i = r / group, row_start = n - n_q - first; /* the row's first query, as a block offset */
                const uint8_t *path = in_tree ? tree + (int64_t)i * tree_stride : NULL;
                const uint8_t *picked = selected + first; /* a picked position lies in a run that was scored */
                if (row_start >= count) { /* the block lies before the row's queries: the selection alone */
#pragma omp simd reduction(max : best)
                    for (int t = 0; t < count; t++) { /* unread positions score -inf: weight 0 below */
                        s[t] = picked[t] ? s[t] : -INFINITY;
                        best = s[t] > best ? s[t] : best;
                    }
                } else {
                    for (int t = 0; t < count; t++) {
                        int seen = t < row_start ? 1 : path ? path[t - row_start] : t - row_start <= i;
                        s[t] = seen && picked[t] ? s[t] : -INFINITY;
                        best = s[t] > best ? s[t] : best;
                    }
                }
                if (best == -INFINITY) continue;
                /* online softmax: rescale once per block */
                float new_top = best > top[r] ? best : top[r];
                float shrink = top[r] == -INFINITY ? 0.0f : exp_nonpositive(top[r] - new_top);
                top[r] = new_top;
                float *a = acc + (int64_t)r * dim, total = 0.0f;
#pragma omp simd reduction(+ : total)
                for (int t = 0; t < count; t++) {
                    float w = exp_nonpositive(s[t] - new_top);
                    s[t] = w;
                    total += w;
                }
                sum[r] = sum[r] * shrink + total;
                add_values(a, shrink, s, v, count, dim, 4 * picked_count >= 3 * count);
            }
        }
        for (int i = 0; i < n_q; i++)
            for (int g = 0; g < group; g++) {
                int r = i * group + g;
                float *dst = out + ((int64_t)(starts[b] + i) * num_heads + h * group + g) * dim;
                float inv = sum[r] > 0.0f ? 1.0f / sum[r] : 0.0f; /* no key selected: zeros, as the torch path */
                for (int d = 0; d < dim; d++) dst[d] = acc[(int64_t)r * dim + d] * inv;
            }
        free(q); free(acc); free(top); free(sum); free(score);
    }
    return failed ? -1 : 0;
}
