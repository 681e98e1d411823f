/* Quest block selection and summary updates for a CPU decode batch, in one pass each.

   The torch path (block_choice.py) takes about ten small ops per layer and step (a gather of the pages'
   summaries, a matmul, masks, top-k, sort): on a 2-core CPU that cost as much as the KV reads it saved.
   Here one call per layer scores each sequence's own pages (nothing padded to the batch's longest),
   and chooses its blocks. Built at first use by
   attention_backends/native.py (cc -O3 -march=native -fopenmp), called through ctypes.

   Layouts (all contiguous, float32 / int32 / int64 as named):
     bounds  [num_pages, Hkv, 2D]  per page and kv head: max of its keys (D) then min (D); an empty page
                                   holds -inf / +inf
     query   [B, Hkv * G, D]       one query per sequence (G query heads per kv head, head h*G+g)
     table   [B, table_stride]     int32 physical KV blocks of each sequence
     out     [B, Hkv, k]           int64 the chosen logical blocks, ascending, padded with 0 (block_choice's
                                   choose_blocks: the first budgets[b] valid); may be NULL
     ids     [B * Hkv, k]          int32 the same as one-head block ids, physical * Hkv + h (the slab of kv
                                   head h of a cache laid out [blocks, Hkv, ...]), padded with logical block 0's
                                   (block_choice.head_block_ids); may be NULL
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Blocks are scattered in memory: fetch their summaries this many blocks ahead of the scoring. */
#define PREFETCH_AHEAD 2

/* sum_d max(q_d hi_d, q_d lo_d) = q+ . hi + q- . lo (q+ = max(q, 0), q- = min(q, 0)), max over the group */
static float page_bound(const float *row, const float *signed_q, int group, int dim) {
    const float *hi = row, *lo = row + dim;
    if (hi[0] == -INFINITY) return -INFINITY; /* empty page: bounds nothing */
    float best = -INFINITY;
    for (int g = 0; g < group; g++) {
        const float *qp = signed_q + (int64_t)g * 2 * dim, *qn = qp + dim;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int d = 0; d < dim; d++) acc += qp[d] * hi[d] + qn[d] * lo[d];
        if (acc > best) best = acc;
    }
    return best;
}

/* Move the `want` largest scores of idx[0..n) to its front (quickselect, O(n) expected). */
static void select_top(const float *score, int32_t *idx, int n, int want) {
    int lo = 0, hi = n - 1;
    while (lo < hi && want > lo && want <= hi) {
        float pivot = score[idx[(lo + hi) / 2]];
        int i = lo, j = hi;
        while (i <= j) {
            while (score[idx[i]] > pivot) i++;
            while (score[idx[j]] < pivot) j--;
            if (i <= j) { int32_t t = idx[i]; idx[i] = idx[j]; idx[j] = t; i++; j--; }
        }
        if (want <= j) hi = j; else if (want > i) lo = i; else break;
    }
}

/* Returns 0; -1 when a scratch buffer could not be allocated; -2 when a sequence has more blocks than
   max_blocks or its table row holds (nothing is read or written for it then). */
int quest_select_table(const float *bounds, const float *query, const int32_t *table, int64_t table_stride,
                       const int32_t *seq_lens, const int64_t *budgets, const int64_t *min_recent, int batch,
                       int num_kv_heads, int group, int dim, int block_size, int page_size, int sink, int recent,
                       int k, int max_blocks, int64_t *out, int32_t *ids) {
    int per_block = block_size / page_size, row = 2 * dim, failed = 0;
    /* Sequences in parallel on the OpenMP pool the process already runs (torch's libgomp, bound by vLLM). */
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int b = 0; b < batch; b++) {
        float *score = malloc(sizeof(float) * (size_t)max_blocks * num_kv_heads); /* [Hkv, max_blocks] */
        int32_t *idx = malloc(sizeof(int32_t) * (size_t)max_blocks);
        unsigned char *keep = malloc((size_t)max_blocks);
        float *signed_q = malloc(sizeof(float) * (size_t)num_kv_heads * group * row); /* [Hkv, G, (q+, q-)] */
        if (!score || !idx || !keep || !signed_q) {
            free(score); free(idx); free(keep); free(signed_q);
            failed |= 1;
            continue;
        }
        int n = seq_lens[b], n_blocks = (n + block_size - 1) / block_size, n_pages = (n + page_size - 1) / page_size;
        if (n_blocks > max_blocks || n_blocks > table_stride) {
            free(score); free(idx); free(keep); free(signed_q);
            failed |= 2;
            continue;
        }
        int rec = recent > min_recent[b] ? recent : (int)min_recent[b];
        int budget = (int)budgets[b];
        const int32_t *blocks = table + b * table_stride;
        const float *q = query + (int64_t)b * num_kv_heads * group * dim;
        for (int hg = 0; hg < num_kv_heads * group; hg++) {
            float *qp = signed_q + (int64_t)hg * row, *qn = qp + dim;
            for (int d = 0; d < dim; d++) {
                float x = q[(int64_t)hg * dim + d];
                qp[d] = x > 0 ? x : 0;
                qn[d] = x < 0 ? x : 0;
            }
        }
        /* One pass over the sequence's blocks: a block's pages (all kv heads) lie side by side in bounds. */
        for (int j = 0; j < n_blocks; j++) {
            int forced = j < sink || j >= n_blocks - rec;
            const float *block_rows = bounds + (int64_t)blocks[j] * per_block * num_kv_heads * row;
            if (j + PREFETCH_AHEAD < n_blocks) { /* the block PREFETCH_AHEAD on, every cache line of it */
                const char *ahead = (const char *)(bounds + (int64_t)blocks[j + PREFETCH_AHEAD] * per_block *
                                                                num_kv_heads * row);
                for (int64_t at = 0; at < (int64_t)per_block * num_kv_heads * row * 4; at += 64)
                    __builtin_prefetch(ahead + at);
            }
            for (int h = 0; h < num_kv_heads; h++) {
                float best = -INFINITY;
                for (int i = 0; !forced && i < per_block && j * per_block + i < n_pages; i++) {
                    float s = page_bound(block_rows + ((int64_t)i * num_kv_heads + h) * row,
                                         signed_q + (int64_t)h * group * row, group, dim);
                    if (s > best) best = s;
                }
                score[(int64_t)h * max_blocks + j] = best;
            }
        }
        for (int h = 0; h < num_kv_heads; h++) {
            int free_count = 0, chosen = 0;
            memset(keep, 0, (size_t)n_blocks);
            for (int j = 0; j < n_blocks; j++) {
                if (j < sink || j >= n_blocks - rec) {
                    if (chosen < budget) { keep[j] = 1; chosen++; }
                } else {
                    idx[free_count++] = j;
                }
            }
            int room = budget - chosen;
            if (room > free_count) room = free_count;
            if (room > 0) {
                select_top(score + (int64_t)h * max_blocks, idx, free_count, room);
                for (int i = 0; i < room; i++) keep[idx[i]] = 1;
            }
            int64_t at = ((int64_t)b * num_kv_heads + h) * k;
            int w = 0;
            for (int j = 0; j < n_blocks && w < k; j++)
                if (keep[j]) {
                    if (out) out[at + w] = j;
                    if (ids) ids[at + w] = blocks[j] * num_kv_heads + h;
                    w++;
                }
            for (; w < k; w++) {
                if (out) out[at + w] = 0;
                if (ids) ids[at + w] = blocks[0] * num_kv_heads + h;
            }
        }
        free(score); free(idx); free(keep); free(signed_q);
    }
    return failed & 2 ? -2 : failed ? -1 : 0;
}

/* Fold keys [n, Hkv, D] written at slots [n] (negative: padding) into the page bounds: pages written at
   offset 0 start over (the engine reused them) before any key of the step is folded in. */
void quest_update_bounds(float *bounds, const float *keys, const int64_t *slots, int n, int num_kv_heads, int dim,
                         int page_size) {
    for (int t = 0; t < n; t++) {
        if (slots[t] < 0 || slots[t] % page_size) continue;
        float *row = bounds + slots[t] / page_size * num_kv_heads * 2 * dim;
        for (int h = 0; h < num_kv_heads; h++, row += 2 * dim)
            for (int d = 0; d < dim; d++) { row[d] = -INFINITY; row[dim + d] = INFINITY; }
    }
    for (int t = 0; t < n; t++) {
        if (slots[t] < 0) continue;
        float *row = bounds + slots[t] / page_size * num_kv_heads * 2 * dim;
        const float *key = keys + (int64_t)t * num_kv_heads * dim;
        for (int h = 0; h < num_kv_heads; h++, row += 2 * dim, key += dim)
            for (int d = 0; d < dim; d++) {
                if (key[d] > row[d]) row[d] = key[d];
                if (key[d] < row[dim + d]) row[dim + d] = key[d];
            }
    }
}
