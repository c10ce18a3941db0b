/* Attention of one prompt chunk over its context in the paged KV cache, read in place (CPU, float32 or
 * bfloat16): chunked prefill with a cached prefix, without gathering the context into a dense copy.
 *
 * The chunk's T query tokens sit at positions context_len .. context_len + T - 1; token i attends to the
 * keys at positions [lo_i, context_len + i] (causal), lo_i = 0, or with a sliding window of w keys
 * max(0, context_len + i - w + 1). The chunk's own keys are already in the cache, so every key is read from
 * its slot: slots[pos] for pos in [0, context_len + T).
 *
 * Algorithm: FlashAttention-2's tiling with online softmax (Dao 2023), one task per (kv head, tile of query
 * rows). The query rows of a kv head are its G = H / Hkv query heads times the T tokens, token-major, so a
 * tile's rows have neighbouring positions and skip the same causal tail. For each tile of KEYS keys, the
 * key rows are converted to float32 once (transposed for the score product) and shared by all rows of the
 * tile: scores S = Q K^T and the update O += P V run as small register-blocked products over float vectors
 * (GCC vector extensions: 512-bit with AVX-512, two 256-bit halves on AVX2). Accumulation is in float32;
 * the output is rounded once.
 *
 * Layouts (row-major): q [T, H, D] with q_stride elements from one token to the next (a view into the fused
 * qkv rows), out [T, H, D] and k_cache/v_cache [num_slots, Hkv, D] contiguous, slots [L] int64.
 *
 * Measured (SmolLM2-135M bf16, one thread, AMD EPYC with AVX-512; whole model forward, all 30 layers):
 *   chunk of 16 / 64 / 256 tokens after 2000 cached: 60 / 168 / 614 ms, against 74 / 192 / 703 ms with the
 *   context gathered for SDPA (attention alone 35 / 114 / 468 ms against 51 / 144 / 555 ms);
 *   fresh 512-token prompt: 388 ms against 503 ms with SDPA's causal kernel (attention 122 against 224 ms).
 *
 * Special values follow torch.softmax: a row with a NaN or +inf score, or whose scores are all -inf, is NaN.
 * Inputs: the caller checks dtypes, shapes and strides; the slot ids are checked here in one serial pass
 * before any cache row is read (SHOAL_BAD_INPUT), the work buffers are checked allocations (SHOAL_NO_MEMORY).
 * No -ffast-math is assumed (the exp's rounding shift relies on it).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SHOAL_OK 0
#define SHOAL_NO_MEMORY 1
#define SHOAL_BAD_INPUT 2

#define KEYS 16      /* keys per tile: one float vector of scores per query row */
#define ROW_TILE 32  /* query rows per task: enough to amortize converting each key tile */

typedef float vf __attribute__((vector_size(KEYS * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(KEYS * sizeof(int32_t))));

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN -> the quiet NaN torch uses */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t rounded = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0u : rounded;
}

static inline vf splat(float x) { return (vf){0} + x; }

static inline vf blend(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* Weights below e^-NEGLIGIBLE of the row's largest are dropped (made exactly 0): they change no float32
 * result (each is below 2^-57 of the largest), and keeping them would feed denormal products into the
 * accumulations, which x86 runs through microcode assists: measured 2x slower attention on real SmolLM2
 * activations, whose softmax rows are sharply peaked. */
#define NEGLIGIBLE 40.0f

/* e^x for x <= 0 (scores minus their running max): Cephes' expf as in fused_ops.c, within 2 ulp; 0 below
 * -NEGLIGIBLE (masked keys are zeroed separately). */
static inline vf exp_nonpositive(vf x) {
    const vi kept = x >= splat(-NEGLIGIBLE); /* false for NaN too: the caller flags NaN rows */
    x = blend(kept, x, splat(-NEGLIGIBLE));
    const vf shifted = x * 1.44269504088896341f + 12582912.0f; /* round(x log2 e) in the low mantissa bits */
    const vf fx = shifted - 12582912.0f;
    x -= fx * 0.693359375f;
    x -= fx * -2.12194440e-4f;
    vf y = splat(1.9875691500e-4f);
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * (x * x) + x + 1.0f;
    const vi n = (vi)shifted - 0x4b400000;
    return blend(kept, y * (vf)((n + 127) << 23), splat(0.0f));
}

/* Horizontal max and sum in log2(KEYS) = 4 shuffle steps (a lane-by-lane loop is a serial chain). */
#define SWAP(v, w)                                                                                             \
    __builtin_shuffle(v, (vi){0 ^ w, 1 ^ w, 2 ^ w, 3 ^ w, 4 ^ w, 5 ^ w, 6 ^ w, 7 ^ w, 8 ^ w, 9 ^ w, 10 ^ w, \
                              11 ^ w, 12 ^ w, 13 ^ w, 14 ^ w, 15 ^ w})

static inline vf vmax(vf a, vf b) { return blend(a > b, a, b); }

static inline float hmax(vf v) {
    v = vmax(v, SWAP(v, 8));
    v = vmax(v, SWAP(v, 4));
    v = vmax(v, SWAP(v, 2));
    v = vmax(v, SWAP(v, 1));
    return v[0];
}

static inline float hsum(vf v) {
    v += SWAP(v, 8);
    v += SWAP(v, 4);
    v += SWAP(v, 2);
    v += SWAP(v, 1);
    return v[0];
}

/* Per-task work buffers, float32: the tile's queries (pre-scaled) and output accumulators [ROW_TILE, D],
 * the key tile transposed [D, KEYS], the value tile [KEYS, D], scores [ROW_TILE] vectors. */
typedef struct {
    float *q, *o, *kt, *v;
    vf *p;
} buffers;

static inline void load_rows(const void *cache, const int64_t *slots, int pos0, int n, int Hkv, int kv_head,
                             int D, int bf16, float *dst, int transpose) {
    for (int j = 0; j < KEYS; j++) {
        if (j >= n) { /* past the last key: zeros, masked anyway */
            for (int d = 0; d < D; d++) dst[transpose ? d * KEYS + j : j * D + d] = 0.0f;
            continue;
        }
        const int64_t row = (slots[pos0 + j] * Hkv + kv_head) * (int64_t)D;
        if (bf16) {
            const uint16_t *src = (const uint16_t *)cache + row;
            if (transpose)
                for (int d = 0; d < D; d++) dst[d * KEYS + j] = bf16_to_f32(src[d]);
            else
                for (int d = 0; d < D; d++) dst[j * D + d] = bf16_to_f32(src[d]);
        } else {
            const float *src = (const float *)cache + row;
            if (transpose)
                for (int d = 0; d < D; d++) dst[d * KEYS + j] = src[d];
            else
                memcpy(dst + j * D, src, (size_t)D * sizeof(float));
        }
    }
}

/* Asks for the rows of the key tile at pos0 (this kv head's part of each slot): the blocks sit anywhere in
 * the cache, and a chunk's context of all layers is far larger than the caches, so without this the tile
 * loads wait on memory one row at a time (measured 2x slower inside the model than on a warm cache). */
static inline void prefetch_tile(const void *cache, const int64_t *slots, int pos0, int end, int Hkv, int kv_head,
                                 int D, int elem_bytes) {
    const int row_bytes = D * elem_bytes;
    for (int j = pos0; j < pos0 + KEYS && j < end; j++) {
        const char *row = (const char *)cache + (slots[j] * Hkv + kv_head) * (int64_t)row_bytes;
        for (int off = 0; off < row_bytes; off += 64) __builtin_prefetch(row + off);
    }
}

/* scores[r] = q[r] . keys (one vector of KEYS) for SCORE_ROWS rows at a time: one load of a key column
 * feeds SCORE_ROWS independent FMA chains (enough to cover the FMA latency). */
#define SCORE_ROWS 8
static inline void scores_block(const float *q, const float *kt, int D, int rows, vf *out) {
    int r = 0;
    for (; r + SCORE_ROWS <= rows; r += SCORE_ROWS) {
        vf a[SCORE_ROWS] = {{0}};
        const float *q0 = q + r * D;
        for (int d = 0; d < D; d++) {
            vf k;
            memcpy(&k, kt + d * KEYS, sizeof k);
            for (int b = 0; b < SCORE_ROWS; b++) a[b] += q0[b * D + d] * k;
        }
        for (int b = 0; b < SCORE_ROWS; b++) out[r + b] = a[b];
    }
    for (; r < rows; r++) {
        vf a = {0};
        for (int d = 0; d < D; d++) {
            vf k;
            memcpy(&k, kt + d * KEYS, sizeof k);
            a += q[r * D + d] * k;
        }
        out[r] = a;
    }
}

/* o[r] += p[r] . values: blocks of UPDATE_ROWS rows x UPDATE_COLS column vectors of D held in registers, so
 * that each value vector loaded serves UPDATE_ROWS rows and each weight UPDATE_COLS vectors. */
#define UPDATE_ROWS 4
#define UPDATE_COLS 4
static inline void update_strips(const vf *p, const float *v, int D, int r, int nrows, int c, int ncols, float *o) {
    vf a[UPDATE_ROWS][UPDATE_COLS];
    for (int b = 0; b < nrows; b++)
        for (int s = 0; s < ncols; s++) memcpy(&a[b][s], o + (r + b) * D + c + s * KEYS, sizeof(vf));
    for (int j = 0; j < KEYS; j++) {
        vf vj[UPDATE_COLS];
        for (int s = 0; s < ncols; s++) memcpy(&vj[s], v + j * D + c + s * KEYS, sizeof(vf));
        for (int b = 0; b < nrows; b++)
            for (int s = 0; s < ncols; s++) a[b][s] += p[r + b][j] * vj[s];
    }
    for (int b = 0; b < nrows; b++)
        for (int s = 0; s < ncols; s++) memcpy(o + (r + b) * D + c + s * KEYS, &a[b][s], sizeof(vf));
}

static inline void update_block(const vf *p, const float *v, int D, int rows, float *o) {
    const int cols = D / KEYS;
    for (int c = 0; c < cols; c += UPDATE_COLS) {
        const int ncols = cols - c < UPDATE_COLS ? cols - c : UPDATE_COLS;
        int r = 0;
        if (ncols == UPDATE_COLS)
            for (; r + UPDATE_ROWS <= rows; r += UPDATE_ROWS)
                update_strips(p, v, D, r, UPDATE_ROWS, c * KEYS, UPDATE_COLS, o);
        for (; r < rows; r += UPDATE_ROWS) {
            const int n = rows - r < UPDATE_ROWS ? rows - r : UPDATE_ROWS;
            update_strips(p, v, D, r, n, c * KEYS, ncols, o);
        }
    }
}

/* One task: query rows [r0, r0 + rows) of kv head kv_head (row r = token r / G, query head kv_head * G +
 * r % G) against their keys, written to out. */
static void attend_tile(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, const int64_t *slots,
                        void *out, int H, int Hkv, int D, int context_len, int window, float scale, int bf16,
                        int kv_head, int r0, int rows, const buffers *buf) {
    const int G = H / Hkv;
    float m[ROW_TILE], l[ROW_TILE];
    int pos[ROW_TILE], lo[ROW_TILE];
    vi bad[ROW_TILE];
    int first = 1 << 30, last = 0;
    for (int r = 0; r < rows; r++) {
        const int t = (r0 + r) / G, h = kv_head * G + (r0 + r) % G;
        const int64_t src = (int64_t)t * q_stride + (int64_t)h * D;
        for (int d = 0; d < D; d++)
            buf->q[r * D + d] = scale * (bf16 ? bf16_to_f32(((const uint16_t *)q)[src + d]) : ((const float *)q)[src + d]);
        memset(buf->o + r * D, 0, (size_t)D * sizeof(float));
        pos[r] = context_len + t;
        lo[r] = window > 0 && pos[r] - window + 1 > 0 ? pos[r] - window + 1 : 0;
        first = lo[r] < first ? lo[r] : first;
        last = pos[r] > last ? pos[r] : last;
        m[r] = -INFINITY, l[r] = 0.0f, bad[r] = (vi){0};
    }
    vi iota;
    for (int j = 0; j < KEYS; j++) iota[j] = j;
    for (int j0 = first - first % KEYS; j0 <= last; j0 += KEYS) {
        const int n = last + 1 - j0 < KEYS ? last + 1 - j0 : KEYS;
        prefetch_tile(k_cache, slots, j0 + KEYS, last + 1, Hkv, kv_head, D, bf16 ? 2 : 4);
        prefetch_tile(v_cache, slots, j0 + KEYS, last + 1, Hkv, kv_head, D, bf16 ? 2 : 4);
        load_rows(k_cache, slots, j0, n, Hkv, kv_head, D, bf16, buf->kt, 1);
        load_rows(v_cache, slots, j0, n, Hkv, kv_head, D, bf16, buf->v, 0);
        scores_block(buf->q, buf->kt, D, rows, buf->p);
        const vi kpos = iota + j0;
        for (int r = 0; r < rows; r++) {
            const vi valid = (kpos <= pos[r]) & (kpos >= lo[r]);
            const vf s = buf->p[r];
            /* NaN or +inf scores make torch's softmax NaN: flag the row (NaN compares false). */
            const vi finite_or_neg = s < INFINITY;
            bad[r] |= valid & ~finite_or_neg;
            const float mx = hmax(blend(valid, s, splat(-INFINITY)));
            const float m_new = mx > m[r] ? mx : m[r];
            if (m_new == -INFINITY) { /* nothing visible yet (or all -inf so far) */
                buf->p[r] = splat(0.0f);
                continue;
            }
            const vf e = blend(valid, exp_nonpositive(s - m_new), splat(0.0f));
            const float shift = m[r] - m_new; /* <= 0; -inf before the first visible key */
            const float correction = shift >= -NEGLIGIBLE ? expf(shift) : 0.0f;
            l[r] = l[r] * correction + hsum(e);
            m[r] = m_new;
            buf->p[r] = e;
            if (correction != 1.0f) {
                float *o = buf->o + r * D;
                for (int d = 0; d < D; d++) o[d] *= correction;
            }
        }
        update_block(buf->p, buf->v, D, rows, buf->o);
    }
    for (int r = 0; r < rows; r++) {
        const int t = (r0 + r) / G, h = kv_head * G + (r0 + r) % G;
        const int64_t dst = ((int64_t)t * H + h) * D;
        int nan_row = m[r] == -INFINITY;
        for (int j = 0; j < KEYS; j++) nan_row |= bad[r][j];
        const float inv = nan_row ? NAN : 1.0f / l[r];
        for (int d = 0; d < D; d++) {
            const float x = buf->o[r * D + d] * inv;
            if (bf16)
                ((uint16_t *)out)[dst + d] = f32_to_bf16(x);
            else
                ((float *)out)[dst + d] = x;
        }
    }
}

/* Several chunks (of different sequences) in one call: chunk c's T = chunks[4c + 1] queries are rows
 * chunks[4c] .. of q and out (q + row * q_stride, out + row * H * D), its context_len = chunks[4c + 2], its
 * slots [context_len + T] start at slots + chunks[4c + 3]. The tasks of all chunks share one parallel loop,
 * so a step's many short prompts keep both threads busy with one fork/join a layer instead of one a prompt.
 * The caller checks the chunk table's bounds against q, out and slots (prefill_attention.py); the slot ids
 * are checked here. D must be a multiple of KEYS (16): checked by the caller. */
int shoal_paged_prefill_attention_chunks(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                                         const int64_t *slots, const int64_t *chunks, int num_chunks, void *out, int H,
                                         int Hkv, int D, int64_t num_slots, int window, float scale, int bf16,
                                         int num_threads) {
    const int G = H / Hkv;
    int64_t *first_task = malloc((size_t)(num_chunks + 1) * sizeof *first_task);
    if (first_task == NULL) return SHOAL_NO_MEMORY;
    int64_t bad = 0, tasks = 0;
    for (int c = 0; c < num_chunks; c++) {
        const int64_t *chunk = chunks + 4 * c, L = chunk[2] + chunk[1];
        for (int64_t j = 0; j < L; j++) bad |= (uint64_t)slots[chunk[3] + j] >= (uint64_t)num_slots;
        first_task[c] = tasks;
        tasks += Hkv * ((chunk[1] * G + ROW_TILE - 1) / ROW_TILE);
    }
    first_task[num_chunks] = tasks;
    if (bad) {
        free(first_task);
        return SHOAL_BAD_INPUT;
    }
    const int threads = num_threads < tasks ? num_threads : (int)tasks;
    const size_t per_task = (size_t)(2 * ROW_TILE * D + 2 * KEYS * D) * sizeof(float) + ROW_TILE * sizeof(vf);
    char *work = aligned_alloc(64, (size_t)(threads > 0 ? threads : 1) * per_task);
    if (work == NULL) {
        free(first_task);
        return SHOAL_NO_MEMORY;
    }
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        float *base = (float *)(work + (size_t)omp_get_thread_num() * per_task);
        const buffers buf = {base, base + ROW_TILE * D, base + 2 * ROW_TILE * D, base + 2 * ROW_TILE * D + KEYS * D,
                             (vf *)(base + 2 * ROW_TILE * D + 2 * KEYS * D)};
        int c = 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            while (first_task[c + 1] <= task) c++; /* tasks come in increasing order to each thread */
            while (first_task[c] > task) c--;
            const int64_t *chunk = chunks + 4 * c, local = task - first_task[c];
            const int rows = (int)(chunk[1] * G), kv_head = (int)(local % Hkv), r0 = (int)(local / Hkv) * ROW_TILE;
            const int n = rows - r0 < ROW_TILE ? rows - r0 : ROW_TILE;
            const size_t elem = bf16 ? 2 : 4;
            attend_tile((const char *)q + chunk[0] * q_stride * (int64_t)elem, q_stride, k_cache, v_cache,
                        slots + chunk[3], (char *)out + chunk[0] * H * D * (int64_t)elem, H, Hkv, D, (int)chunk[2],
                        window, scale, bf16, kv_head, r0, n, &buf);
        }
    }
    free(work);
    free(first_task);
    return SHOAL_OK;
}

/* One chunk: q [T, H, D] rows q_stride apart, slots [context_len + T]. */
int shoal_paged_prefill_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, const int64_t *slots,
                                  void *out, int T, int H, int Hkv, int D, int64_t num_slots, int context_len,
                                  int window, float scale, int bf16, int num_threads) {
    const int64_t chunk[4] = {0, T, context_len, 0};
    return shoal_paged_prefill_attention_chunks(q, q_stride, k_cache, v_cache, slots, chunk, 1, out, H, Hkv, D, num_slots,
                                                window, scale, bf16, num_threads);
}
