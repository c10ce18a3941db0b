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
 * Inputs: the caller (paged_attention.py) checks dtypes, shapes and strides. What depends on the contents
 * is checked here, in one serial pass before any cache row is read: every context length in
 * [1, W * block_size] and every block id a sequence reads in [0, num_blocks); anything else returns
 * SHOAL_BAD_INPUT and reads nothing. The work buffers are one allocation, checked (SHOAL_NO_MEMORY).
 *
 * Special values follow IEEE arithmetic, as torch's softmax: a key scored -inf gets weight exactly 0; a
 * sequence whose keys all score -inf (or any score NaN or +inf) gets NaN outputs. Built without
 * -ffast-math for this; expf is vectorized through glibc's libmvec (declared below, as glibc's own
 * math-vector.h does only under -ffast-math), whose vector expf returns 0 for -inf and NaN for NaN.
 *
 * Work is split over sequences with OpenMP; linked against the libgomp torch already loaded, it shares
 * torch's thread pool. The caller passes torch's thread count (a per-thread setting in
 * OpenMP, so the engine thread's own default could differ from what torch.set_num_threads asked for).
 *
 * Measured without -ffast-math against the kernel before (built with it), SmolLM2's heads (9 query, 3 kv,
 * dim 64), bf16, 1 thread, alternating calls, min / median of 120 (AMD EPYC, 2 cores, load ~5):
 * 32 sequences x 300 keys 661/735 -> 500/522 us; 1 x 1,000 keys 69/70 -> 51/52 us; 64 x 200 keys
 * 944/1762 -> 989/1815 us. The same source with -ffast-math: within 4% of without.
 *
 * Tried and dropped: one query head per task with its query and output accumulator in vector registers
 * (the rows of a kv head re-read from L2 by its query heads). Twice as fast when the context fits in
 * cache, but 1.7x slower inside the engine (SmolLM2, 32 sequences of ~300 tokens), where the KV reads
 * come from memory and streaming whole slots in order wins.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define SHOAL_OK 0
#define SHOAL_NO_MEMORY 1
#define SHOAL_BAD_INPUT 2

#if defined(__x86_64__)
/* libmvec's expf variants (_ZGV*N*v_expf), so that the softmax loop vectorizes; needs -fno-math-errno. */
#pragma omp declare simd notinbranch
float expf(float);
#endif


/* q . k over D floats: 16-wide partial sums, then a pairwise (tree) horizontal sum. Written out because an
 * `omp simd reduction` ends in a sequential sum over the lanes unless -fassociative-math is on: 1.35x slower
 * for the whole kernel (SmolLM2 heads, 1,000 keys). */
typedef float v16f __attribute__((vector_size(16 * sizeof(float))));
typedef float v8f __attribute__((vector_size(8 * sizeof(float))));
typedef float v4f __attribute__((vector_size(4 * sizeof(float))));

static inline float dot(const float *a, const float *b, int D) {
    v16f acc = {0};
    int d = 0;
    for (; d + 16 <= D; d += 16) {
        v16f x, y;
        memcpy(&x, a + d, sizeof x);
        memcpy(&y, b + d, sizeof y);
        acc += x * y;
    }
    v8f lo, hi;
    memcpy(&lo, &acc, sizeof lo);
    memcpy(&hi, (const char *)&acc + sizeof lo, sizeof hi);
    lo += hi;
    v4f l4, h4;
    memcpy(&l4, &lo, sizeof l4);
    memcpy(&h4, (const char *)&lo + sizeof l4, sizeof h4);
    l4 += h4;
    float s = (l4[0] + l4[2]) + (l4[1] + l4[3]);
    for (; d < D; d++) s += a[d] * b[d];
    return s;
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

static inline void store_row(void *base, int64_t row, int D, int bf16, const float *src) {
    if (bf16) {
        uint16_t *dst = (uint16_t *)base + row * D;
        for (int d = 0; d < D; d++) dst[d] = f32_to_bf16(src[d]);
    } else {
        memcpy((float *)base + row * D, src, (size_t)D * sizeof(float));
    }
}

/* Ask for the row of position pos + PREFETCH_AHEAD while working on pos: blocks sit anywhere in the cache,
 * so the hardware prefetcher loses the stream at every block boundary. */
#define PREFETCH_AHEAD 8
static inline int64_t slot_of(const int32_t *table, int pos, int block_size) {
    return (int64_t)table[pos / block_size] * block_size + pos % block_size;
}

static inline void prefetch_row(const void *cache, const int32_t *table, int pos, int end, int block_size,
                                int row_bytes) {
    if (pos >= end) return;
    const char *p = (const char *)cache + slot_of(table, pos, block_size) * (int64_t)row_bytes;
    for (int off = 0; off < row_bytes; off += 64) __builtin_prefetch(p + off);
}

/* Row pos of a cache (all kv heads of one slot) as floats; asks for the row PREFETCH_AHEAD further on. */
static inline void load_slot(const void *cache, const int32_t *table, int pos, int end, int block_size,
                             int row_elems, int bf16, float *row) {
    prefetch_row(cache, table, pos + PREFETCH_AHEAD, end, block_size, row_elems * (bf16 ? 2 : 4));
    load_row(cache, slot_of(table, pos, block_size), row_elems, bf16, row);
}

/* One sequence: its H query heads against keys j0 .. j0 + n - 1. A slot holds the keys of all kv heads
 * side by side (Hkv * D contiguous values), so the loops walk whole slots and the reads stream through
 * each block in order. Always inlined so that the dispatch below gets copies specialized for a constant
 * D and dtype (fully unrolled, branch-free rows). */
static inline __attribute__((always_inline)) void attend(
    const void *q, const void *k_cache, const void *v_cache, const int32_t *table, void *out, int64_t q_row0,
    int H, int Hkv, int D, int block_size, int j0, int n, float scale, int bf16, float *qf, float *acc,
    float *row, float *scores) {
    const int G = H / Hkv;
    for (int h = 0; h < H; h++) {
        load_row(q, q_row0 + h, D, bf16, qf + h * D);
#pragma omp simd
        for (int d = 0; d < D; d++) qf[h * D + d] *= scale;
    }
    for (int j = 0; j < n; j++) {
        load_slot(k_cache, table, j0 + j, j0 + n, block_size, Hkv * D, bf16, row);
        for (int h = 0; h < H; h++) {
            scores[h * n + j] = dot(qf + h * D, row + (h / G) * D, D);
        }
    }
    for (int h = 0; h < H; h++) {
        float *s = scores + h * n, mx = s[0], sum = 0.0f;
#pragma omp simd reduction(max : mx)
        for (int j = 1; j < n; j++) mx = s[j] > mx ? s[j] : mx;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < n; j++) {
            s[j] = expf(s[j] - mx);
            sum += s[j];
        }
        float inv = 1.0f / sum;
#pragma omp simd
        for (int j = 0; j < n; j++) s[j] *= inv;
    }
    memset(acc, 0, (size_t)H * D * sizeof(float));
    for (int j = 0; j < n; j++) {
        load_slot(v_cache, table, j0 + j, j0 + n, block_size, Hkv * D, bf16, row);
        for (int h = 0; h < H; h++) {
            float p = scores[h * n + j], *ah = acc + h * D;
            const float *vh = row + (h / G) * D;
#pragma omp simd
            for (int d = 0; d < D; d++) ah[d] += p * vh[d];
        }
    }
    for (int h = 0; h < H; h++) store_row(out, q_row0 + h, D, bf16, acc + h * D);
}

/* The serial pass over the contents (see the header): SHOAL_OK, and the longest context, or SHOAL_BAD_INPUT. */
static int check_tables(const int32_t *block_tables, const int32_t *context_lens, int B, int W, int block_size,
                        int num_blocks, int *max_len) {
    *max_len = 1;
    for (int b = 0; b < B; b++) {
        int len = context_lens[b];
        if (len < 1 || (int64_t)len > (int64_t)W * block_size) return SHOAL_BAD_INPUT;
        const int32_t *table = block_tables + (int64_t)b * W;
        int used = (len + block_size - 1) / block_size;
        int32_t bad = 0;
        for (int i = 0; i < used; i++) bad |= (uint32_t)table[i] >= (uint32_t)num_blocks;
        if (bad) return SHOAL_BAD_INPUT;
        *max_len = len > *max_len ? len : *max_len;
    }
    return SHOAL_OK;
}

int shoal_paged_decode_attention(const void *q, const void *k_cache, const void *v_cache,
                                 const int32_t *block_tables, const int32_t *context_lens, void *out, int B,
                                 int H, int Hkv, int D, int W, int block_size, int num_blocks, int window,
                                 float scale, int bf16, int num_threads) {
    int max_len;
    if (num_threads < 1) num_threads = 1;
    if (check_tables(block_tables, context_lens, B, W, block_size, num_blocks, &max_len) != SHOAL_OK)
        return SHOAL_BAD_INPUT;
    if ((int64_t)H * max_len > INT32_MAX) return SHOAL_BAD_INPUT; /* scores are indexed with int */
    /* Per thread: the scaled queries and output accumulators [H, D], one cache row [Hkv, D] and the scores
     * [H, max_len]; one allocation for all threads, in 64-byte (cache line) multiples. */
    const size_t floats = (size_t)H * D * 2 + (size_t)Hkv * D + (size_t)H * max_len;
    const size_t per_thread = (floats + 15) / 16 * 16;
    float *work = malloc(per_thread * (size_t)num_threads * sizeof(float));
    if (work == NULL) return SHOAL_NO_MEMORY;
#pragma omp parallel num_threads(num_threads)
    {
        float *qf = work + per_thread * (size_t)omp_get_thread_num();
        float *acc = qf + (size_t)H * D, *row = acc + (size_t)H * D, *scores = row + (size_t)Hkv * D;
#pragma omp for schedule(dynamic, 1)
        for (int b = 0; b < B; b++) {
            int len = context_lens[b];
            int j0 = (window > 0 && len > window) ? len - window : 0;
            const int32_t *table = block_tables + (int64_t)b * W;
#define ATTEND(DIM, BF16)                                                                             \
    attend(q, k_cache, v_cache, table, out, (int64_t)b * H, H, Hkv, DIM, block_size, j0, len - j0, scale, \
           BF16, qf, acc, row, scores)
            if (D == 64 && bf16) ATTEND(64, 1);
            else if (D == 64) ATTEND(64, 0);
            else if (D == 128 && bf16) ATTEND(128, 1);
            else if (D == 128) ATTEND(128, 0);
            else ATTEND(D, bf16);
#undef ATTEND
        }
    }
    free(work);
    return SHOAL_OK;
}
