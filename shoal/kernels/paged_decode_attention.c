/* Decode attention that reads the paged KV cache in place (CPU, float32 or bfloat16).
 *
 * One query token per sequence attends to the keys of its own blocks. The torch path gathers every
 * sequence's K and V into dense tensors first, copying the whole context once per layer and step; here
 * each key and value row is read exactly once, straight from its cache slot.
 *
 * Layouts (row-major, contiguous):
 *   q, out          [B, H, D]
 *   k_cache/v_cache [num_slots, Hkv, D], slot = block_id * block_size + offset
 *   block_tables    [B, W] int32 (padded rows; only the first ceil(len / block_size) entries are read)
 *   context_lens    [B] int32, keys per sequence including the new token
 * window > 0 keeps only the last `window` keys (sliding-window attention); 0 attends to all.
 * Query head h uses kv head h / (H / Hkv) (grouped-query attention). Accumulation is in float32.
 *
 * Work is split over (sequence, kv head) pairs with OpenMP; linked against the libgomp torch already
 * loaded, it shares torch's thread pool. The caller passes torch's thread count (a per-thread setting in
 * OpenMP, so the engine thread's own default could differ from what torch.set_num_threads asked for).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline void load_row(const void *base, int64_t row, int D, int bf16, float *dst) {
    if (bf16) {
        const uint16_t *src = (const uint16_t *)base + row * D;
#pragma omp simd
        for (int d = 0; d < D; d++) dst[d] = bf16_to_f32(src[d]);
    } else {
        memcpy(dst, (const float *)base + row * D, (size_t)D * sizeof(float));
    }
}

static inline void store_row(void *base, int64_t row, int D, int bf16, const float *src, float mul) {
    if (bf16) {
        uint16_t *dst = (uint16_t *)base + row * D;
        for (int d = 0; d < D; d++) dst[d] = f32_to_bf16(src[d] * mul);
    } else {
        float *dst = (float *)base + row * D;
#pragma omp simd
        for (int d = 0; d < D; d++) dst[d] = src[d] * mul;
    }
}

/* One (sequence, kv head): G query heads against n keys starting at position j0. Always inlined so that
 * the dispatch below gets copies specialized for constant D and dtype (fully unrolled, branch-free rows). */
static inline __attribute__((always_inline)) void attend(const void *q, const void *k_cache, const void *v_cache, const int32_t *table,
                   void *out, int64_t q_row0, int kv_head, int Hkv, int D, int G, int block_size, int j0,
                   int n, float scale, int bf16, float *qf, float *acc, float *row, float *scores) {
    for (int g = 0; g < G; g++) {
        load_row(q, q_row0 + g, D, bf16, qf + g * D);
#pragma omp simd
        for (int d = 0; d < D; d++) qf[g * D + d] *= scale;
    }
    for (int j = 0; j < n; j++) {
        int pos = j0 + j;
        int64_t slot = (int64_t)table[pos / block_size] * block_size + pos % block_size;
        load_row(k_cache, slot * Hkv + kv_head, D, bf16, row);
        for (int g = 0; g < G; g++) {
            const float *qg = qf + g * D;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < D; d++) dot += qg[d] * row[d];
            scores[g * n + j] = dot;
        }
    }
    float inv_sum[G];
    for (int g = 0; g < G; g++) {
        float *s = scores + g * n, mx = s[0], sum = 0.0f;
        for (int j = 1; j < n; j++) mx = s[j] > mx ? s[j] : mx;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < n; j++) {
            s[j] = expf(s[j] - mx);
            sum += s[j];
        }
        inv_sum[g] = 1.0f / sum;
    }
    memset(acc, 0, (size_t)G * D * sizeof(float));
    for (int j = 0; j < n; j++) {
        int pos = j0 + j;
        int64_t slot = (int64_t)table[pos / block_size] * block_size + pos % block_size;
        load_row(v_cache, slot * Hkv + kv_head, D, bf16, row);
        for (int g = 0; g < G; g++) {
            float p = scores[g * n + j], *ag = acc + g * D;
#pragma omp simd
            for (int d = 0; d < D; d++) ag[d] += p * row[d];
        }
    }
    for (int g = 0; g < G; g++) store_row(out, q_row0 + g, D, bf16, acc + g * D, inv_sum[g]);
}

void shoal_paged_decode_attention(const void *q, const void *k_cache, const void *v_cache,
                                  const int32_t *block_tables, const int32_t *context_lens, void *out,
                                  int B, int H, int Hkv, int D, int W, int block_size, int window,
                                  float scale, int bf16, int num_threads) {
    const int G = H / Hkv;
    int max_len = 0;
    for (int b = 0; b < B; b++) max_len = context_lens[b] > max_len ? context_lens[b] : max_len;
#pragma omp parallel num_threads(num_threads)
    {
        float *qf = malloc((size_t)G * D * sizeof(float));
        float *acc = malloc((size_t)G * D * sizeof(float));
        float *row = malloc((size_t)D * sizeof(float));
        float *scores = malloc((size_t)G * (max_len > 0 ? max_len : 1) * sizeof(float));
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < Hkv; h++) {
                int len = context_lens[b];
                if (len < 1) continue; /* the caller guarantees len >= 1 (the new token) */
                int j0 = (window > 0 && len > window) ? len - window : 0;
                const int32_t *table = block_tables + (int64_t)b * W;
                int64_t q_row0 = (int64_t)b * H + h * G;
#define ATTEND(DIM, BF16)                                                                              \
    attend(q, k_cache, v_cache, table, out, q_row0, h, Hkv, DIM, G, block_size, j0, len - j0, scale, BF16, \
           qf, acc, row, scores)
                if (D == 64 && bf16) ATTEND(64, 1);
                else if (D == 64) ATTEND(64, 0);
                else if (D == 128 && bf16) ATTEND(128, 1);
                else if (D == 128) ATTEND(128, 0);
                else ATTEND(D, bf16);
#undef ATTEND
            }
        }
        free(qf);
        free(acc);
        free(row);
        free(scores);
    }
}
