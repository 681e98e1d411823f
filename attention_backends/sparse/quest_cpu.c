/* Quest block selection and summary updates for a CPU decode batch, in one pass each.

   The torch path (block_choice.py) takes about ten small ops per layer and step (a gather of the pages'
   summaries, a matmul, masks, top-k, sort): on a 2-core CPU that cost as much as the KV reads it saved.
   Here one call per layer scores each sequence's own pages (nothing padded to the batch's longest),
   and chooses its blocks. Built at first use by
   attention_backends/native.py (cc -O3 -march=native -fopenmp), called through ctypes.

   Layouts (all contiguous, float32 / int32 / int64 as named):
     bounds  [num_pages, Hkv, 2D]  per page and kv head: max of its keys (D) then min (D); an empty page
                                   holds -inf / +inf. float32, or bfloat16 (`bf16` set) rounded outward: the
                                   max toward +inf, the min toward -inf, so the bound stays an upper bound
                                   at half the bytes (scoring reads them all, every step)
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

static inline float bf16_float(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

/* x as bfloat16 rounded toward +inf (up) or -inf: truncation moves toward zero, so a value that loses bits
   steps one unit away from zero when that is the wanted direction (quest.bf16_outward is the reference). */
static inline uint16_t bf16_toward(float x, int up) {
    union { float f; uint32_t u; } v = {x};
    uint16_t kept = (uint16_t)(v.u >> 16);
    return (uint16_t)(kept + ((v.u & 0xFFFFu) && (up ? x > 0 : x < 0)));
}

/* sum_d max(q_d hi_d, q_d lo_d) = q+ . hi + q- . lo (q+ = max(q, 0), q- = min(q, 0)): one dot product of
   the page's row (hi, lo) with each query head's (q+, q-), the max over the kv head's group. The group's
   dot products share one pass over the row (G accumulators): the row is loaded once, not G times, which
   made scoring 1.2-1.4x faster at SmolLM2's group of 3 (README, session 22). LOAD reads element d of a row
   as float. */
#define LOAD_F32(row, d) ((row)[d])
#define LOAD_BF16(row, d) bf16_float((row)[d])
#define EMPTY_ROW(row, LOAD) (LOAD(row, 0) == -INFINITY) /* an empty page (max -inf) bounds nothing */
#define BOUND_FUSED(NAME, T, LOAD, G) /* G <= 4, a literal: the unused accumulators compile away */            \
    static float NAME(const T *row, const float *signed_q, int width) {                                     \
        const float *q0 = signed_q, *q1 = q0 + (G > 1) * width, *q2 = q0 + (G > 2) * 2 * width,              \
                    *q3 = q0 + (G > 3) * 3 * width;                                                          \
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;                                                    \
        _Pragma("omp simd reduction(+ : a0, a1, a2, a3)") for (int d = 0; d < width; d++) {                 \
            float r = LOAD(row, d);                                                                          \
            a0 += r * q0[d];                                                                                 \
            if (G > 1) a1 += r * q1[d];                                                                      \
            if (G > 2) a2 += r * q2[d];                                                                      \
            if (G > 3) a3 += r * q3[d];                                                                      \
        }                                                                                                    \
        float best = a0;                                                                                     \
        if (G > 1 && a1 > best) best = a1;                                                                   \
        if (G > 2 && a2 > best) best = a2;                                                                   \
        if (G > 3 && a3 > best) best = a3;                                                                   \
        return best;                                                                                         \
    }
#define BOUND_ANY(NAME, T, LOAD)                                                                            \
    static float NAME(const T *row, const float *signed_q, int group, int width) {                           \
        float best = -INFINITY;                                                                              \
        for (int g = 0; g < group; g++) {                                                                    \
            const float *q = signed_q + (int64_t)g * width;                                                  \
            float acc = 0.0f;                                                                                \
            _Pragma("omp simd reduction(+ : acc)") for (int d = 0; d < width; d++) acc += q[d] * LOAD(row, d); \
            best = acc > best ? acc : best;                                                                  \
        }                                                                                                    \
        return best;                                                                                         \
    }
BOUND_FUSED(bound_f32_g1, float, LOAD_F32, 1)
BOUND_FUSED(bound_f32_g2, float, LOAD_F32, 2)
BOUND_FUSED(bound_f32_g3, float, LOAD_F32, 3)
BOUND_FUSED(bound_f32_g4, float, LOAD_F32, 4)
BOUND_ANY(bound_f32_any, float, LOAD_F32)
BOUND_FUSED(bound_bf16_g1, uint16_t, LOAD_BF16, 1)
BOUND_FUSED(bound_bf16_g2, uint16_t, LOAD_BF16, 2)
BOUND_FUSED(bound_bf16_g3, uint16_t, LOAD_BF16, 3)
BOUND_FUSED(bound_bf16_g4, uint16_t, LOAD_BF16, 4)
BOUND_ANY(bound_bf16_any, uint16_t, LOAD_BF16)

/* The bound of one page row (float32 or bfloat16 table), -inf for an empty page. */
static float page_bound(const void *row, int bf16, const float *signed_q, int group, int dim) {
    int width = 2 * dim;
    if (bf16) {
        const uint16_t *r = row;
        if (EMPTY_ROW(r, LOAD_BF16)) return -INFINITY;
        switch (group) {
        case 1: return bound_bf16_g1(r, signed_q, width);
        case 2: return bound_bf16_g2(r, signed_q, width);
        case 3: return bound_bf16_g3(r, signed_q, width);
        case 4: return bound_bf16_g4(r, signed_q, width);
        default: return bound_bf16_any(r, signed_q, group, width);
        }
    }
    const float *r = row;
    if (EMPTY_ROW(r, LOAD_F32)) return -INFINITY;
    switch (group) {
    case 1: return bound_f32_g1(r, signed_q, width);
    case 2: return bound_f32_g2(r, signed_q, width);
    case 3: return bound_f32_g3(r, signed_q, width);
    case 4: return bound_f32_g4(r, signed_q, width);
    default: return bound_f32_any(r, signed_q, group, width);
    }
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

/* Block b's score for kv head h: its best page bound (pages past the sequence's n_pages are not read). */
static float block_bound(const char *block_rows, int64_t row_bytes, int num_kv_heads, int h, int bf16,
                         const float *sq, int group, int dim, int pages) {
    float best = -INFINITY;
    for (int i = 0; i < pages; i++) {
        float s = page_bound(block_rows + ((int64_t)i * num_kv_heads + h) * row_bytes, bf16, sq, group, dim);
        if (s > best) best = s;
    }
    return best;
}

/* Returns 0; -1 when a scratch buffer could not be allocated; -2 when a sequence has more blocks than
   max_blocks or its table row holds (nothing is read or written for it then). */
int quest_select_table(const void *bounds, int bf16, const float *query, const int32_t *table, int64_t table_stride,
                       const int32_t *seq_lens, const int64_t *budgets, const int64_t *min_recent, int batch,
                       int num_kv_heads, int group, int dim, int block_size, int page_size, int sink, int recent,
                       int k, int max_blocks, int64_t *out, int32_t *ids) {
    int per_block = block_size / page_size, row = 2 * dim, failed = 0;
    int64_t row_bytes = (int64_t)row * (bf16 ? 2 : 4), block_bytes = per_block * num_kv_heads * row_bytes;
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
            const char *block_rows = (const char *)bounds + (int64_t)blocks[j] * block_bytes;
            if (j + PREFETCH_AHEAD < n_blocks) { /* the block PREFETCH_AHEAD on, every cache line of it */
                const char *ahead = (const char *)bounds + (int64_t)blocks[j + PREFETCH_AHEAD] * block_bytes;
                for (int64_t at = 0; at < block_bytes; at += 64) __builtin_prefetch(ahead + at);
            }
            int forced = j < sink || j >= n_blocks - rec;
            int pages = forced ? 0 : n_pages - j * per_block < per_block ? n_pages - j * per_block : per_block;
            for (int h = 0; h < num_kv_heads; h++)
                score[(int64_t)h * max_blocks + j] =
                    block_bound(block_rows, row_bytes, num_kv_heads, h, bf16, signed_q + (int64_t)h * group * row,
                                group, dim, pages);
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
   offset 0 start over (the engine reused them) before any key of the step is folded in. float32 tables take
   the keys as they are; bfloat16 tables round outward (a max up, a min down), so every stored bound still
   holds the keys it summarises. */
#define FOLD_BOUNDS(T, NEG_INF, POS_INF, RAISE, LOWER, AS_FLOAT)                                                  \
    for (int t = 0; t < n; t++) {                                                                                 \
        if (slots[t] < 0 || slots[t] % page_size) continue;                                                       \
        T *row = (T *)bounds + slots[t] / page_size * num_kv_heads * 2 * dim;                                     \
        for (int h = 0; h < num_kv_heads; h++, row += 2 * dim)                                                    \
            for (int d = 0; d < dim; d++) { row[d] = NEG_INF; row[dim + d] = POS_INF; }                           \
    }                                                                                                             \
    for (int t = 0; t < n; t++) {                                                                                 \
        if (slots[t] < 0) continue;                                                                               \
        T *row = (T *)bounds + slots[t] / page_size * num_kv_heads * 2 * dim;                                     \
        const float *key = keys + (int64_t)t * num_kv_heads * dim;                                                \
        for (int h = 0; h < num_kv_heads; h++, row += 2 * dim, key += dim)                                        \
            for (int d = 0; d < dim; d++) {                                                                       \
                if (key[d] > AS_FLOAT(row[d])) row[d] = RAISE(key[d]);                                            \
                if (key[d] < AS_FLOAT(row[dim + d])) row[dim + d] = LOWER(key[d]);                                \
            }                                                                                                     \
    }
#define SAME(x) (x)
#define BF16_UP(x) bf16_toward(x, 1)
#define BF16_DOWN(x) bf16_toward(x, 0)

void quest_update_bounds(void *bounds, int bf16, const float *keys, const int64_t *slots, int n, int num_kv_heads,
                         int dim, int page_size) {
    if (bf16) {
        FOLD_BOUNDS(uint16_t, 0xFF80u, 0x7F80u, BF16_UP, BF16_DOWN, bf16_float)
    } else {
        FOLD_BOUNDS(float, -INFINITY, INFINITY, SAME, SAME, SAME)
    }
}
