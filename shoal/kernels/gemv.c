/* Matrix-vector products for decode: y[m, n] = sum_k x[m, k] * w[n, k] + bias[n], for 1-4 rows of x, in
 * float32 (shoal_gemv_f32) and bfloat16 (shoal_gemv_bf16).
 *
 * Why: at one token per step every weight is read once per step, so decode speed is memory bandwidth.
 * torch's CPU linear (MKL or oneDNN) streams a 3072x576 fp32 weight at about 11 GB/s here whether it has
 * one thread or two, while two threads reading memory reach about 29 GB/s on the same 2-core AMD EPYC.
 * Here each thread streams its own contiguous slice of the weight rows, reading every weight once for all
 * rows of x.
 *
 * bfloat16: fp32 accumulation of bf16 products (exact in fp32), bias added in fp32, one rounding to bf16
 * (nearest even): torch's bf16 linear up to summation order. Two implementations:
 *   - AVX512-BF16 (compiled where the compiler defines __AVX512BF16__, i.e. -march=native on such a CPU):
 *     vdpbf16ps multiplies 32 bf16 pairs and adds them into 16 fp32 lanes. It treats denormal inputs as
 *     zero and flushes denormal results to zero (Intel SDM, VDPBF16PS), which torch does not: values below
 *     about 1e-38 differ.
 *   - portable: bf16 -> fp32 by a 16-bit shift, fp32 FMA (GCC vector extensions), everywhere else; also
 *     exported as shoal_gemv_bf16_portable so that tests run it on AVX512-BF16 machines too.
 *
 * Layouts (row-major, contiguous): x [M, K], w [N, K], bias [N] or NULL, y [M, N]; 1 <= M <= MAX_ROWS,
 * N, K >= 1. The caller (gemv.py) checks all of this: these functions trust their arguments.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "vec8.h"
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_AVX512_BF16 1
#else
#define HAVE_AVX512_BF16 0
#endif

#define SHOAL_OK 0
#define SHOAL_NO_MEMORY 1
#define VW 8
#define MAX_ROWS 4
static inline float hsum(v8f v) {
    float s = 0.0f;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
}

/* One weight row against the M rows of x; always inlined so that M = 1 gets its own unrolled copy. */
static inline __attribute__((always_inline)) void row_dot(const float *x, const float *wr, int M, int K,
                                                          float *out) {
    v8f acc0[MAX_ROWS], acc1[MAX_ROWS];
    float tail[MAX_ROWS];
    for (int m = 0; m < M; m++) acc0[m] = acc1[m] = (v8f){0}, tail[m] = 0.0f;
    int k = 0;
    for (; k + 2 * VW <= K; k += 2 * VW) {
        v8f w0 = load8(wr + k), w1 = load8(wr + k + VW);
        for (int m = 0; m < M; m++) {
            acc0[m] += w0 * load8(x + (int64_t)m * K + k);
            acc1[m] += w1 * load8(x + (int64_t)m * K + k + VW);
        }
    }
    for (; k < K; k++)
        for (int m = 0; m < M; m++) tail[m] += wr[k] * x[(int64_t)m * K + k];
    for (int m = 0; m < M; m++) out[m] = hsum(acc0[m] + acc1[m]) + tail[m];
}

void shoal_gemv_f32(const float *x, const float *w, const float *bias, float *y, int M, int N, int K,
                    int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int n = 0; n < N; n++) {
        float out[MAX_ROWS];
        if (M == 1) row_dot(x, w + (int64_t)n * K, 1, K, out);
        else row_dot(x, w + (int64_t)n * K, M, K, out);
        float b = bias ? bias[n] : 0.0f;
        for (int m = 0; m < M; m++) y[(int64_t)m * N + n] = out[m] + b;
    }
}

/* ---- bfloat16 ---- */


static inline void store_bf16(const float *sums, const uint16_t *bias, uint16_t *y, int M, int N, int n) {
    float b = bias ? bf16_to_f32(bias[n]) : 0.0f;
    for (int m = 0; m < M; m++) y[(int64_t)m * N + n] = f32_to_bf16(sums[m] + b);
}

/* Portable: one bf16 weight row against the M rows of x (already fp32), two accumulators per row of x. */
static inline __attribute__((always_inline)) void row_dot_bf16(const float *x, const uint16_t *wr, int M, int K,
                                                               float *out) {
    v8f acc0[MAX_ROWS], acc1[MAX_ROWS];
    float tail[MAX_ROWS];
    for (int m = 0; m < M; m++) acc0[m] = acc1[m] = (v8f){0}, tail[m] = 0.0f;
    int k = 0;
    for (; k + 2 * VW <= K; k += 2 * VW) {
        v8f w0 = load8_bf16(wr + k), w1 = load8_bf16(wr + k + VW);
        for (int m = 0; m < M; m++) {
            acc0[m] += w0 * load8(x + (int64_t)m * K + k);
            acc1[m] += w1 * load8(x + (int64_t)m * K + k + VW);
        }
    }
    for (; k < K; k++)
        for (int m = 0; m < M; m++) tail[m] += bf16_to_f32(wr[k]) * x[(int64_t)m * K + k];
    for (int m = 0; m < M; m++) out[m] = hsum(acc0[m] + acc1[m]) + tail[m];
}

static inline __attribute__((always_inline)) void gemv_bf16_portable_row(const float *x, const uint16_t *w,
                                                                         const uint16_t *bias, uint16_t *y,
                                                                         int M, int N, int K, int n) {
    float out[MAX_ROWS];
    row_dot_bf16(x, w + (int64_t)n * K, M, K, out);
    store_bf16(out, bias, y, M, N, n);
}

/* x is converted to fp32 once (M * K floats, a few KB) rather than once per weight row. */
int shoal_gemv_bf16_portable(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int M,
                             int N, int K, int num_threads) {
    float *xf = malloc((size_t)M * K * sizeof(float));
    if (xf == NULL) return SHOAL_NO_MEMORY;
    for (int64_t i = 0; i < (int64_t)M * K; i++) xf[i] = bf16_to_f32(x[i]);
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int n = 0; n < N; n++) {
        switch (M) { /* a copy per row count: the loops over m unroll */
        case 1: gemv_bf16_portable_row(xf, w, bias, y, 1, N, K, n); break;
        case 2: gemv_bf16_portable_row(xf, w, bias, y, 2, N, K, n); break;
        case 3: gemv_bf16_portable_row(xf, w, bias, y, 3, N, K, n); break;
        default: gemv_bf16_portable_row(xf, w, bias, y, 4, N, K, n); break;
        }
    }
    free(xf);
    return SHOAL_OK;
}

#if HAVE_AVX512_BF16
/* AVX512-BF16: R weight rows (1 or ROW_BLOCK) against the M rows of x. R independent accumulators per row
 * of x keep R vdpbf16ps chains in flight (one chain alone waits on the instruction's latency: M = 1 would
 * then read the weight at well under memory bandwidth). The last K % 32 columns use masked loads (zeros).
 * Each 64-byte load also asks for the line PREFETCH_ROWS rows further on: without it the hardware
 * prefetcher alone left one thread at 14 GB/s on SmolLM2's linears from memory (4 rows: 8 GB/s), with it
 * 20 GB/s (16); 2, 4, 8 and 16 rows ahead measured alike. */
#define ROW_BLOCK 4
#define PREFETCH_ROWS 4

/* A prefetch never faults, so one past the end of w (the last rows) is harmless; the address is formed
 * as an integer so that no out-of-bounds pointer is ever made. */
static inline void prefetch(const uint16_t *p, int64_t elems) {
    __builtin_prefetch((const void *)((uintptr_t)p + (uintptr_t)(elems * (int64_t)sizeof *p)), 0, 3);
}

static inline __attribute__((always_inline)) void rows_dot_avx512bf16(const uint16_t *x, const uint16_t *w, int M,
                                                                      int R, int K, float out[][ROW_BLOCK]) {
    __m512 acc[MAX_ROWS][ROW_BLOCK];
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) acc[m][r] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh wv[ROW_BLOCK];
        for (int r = 0; r < R; r++) wv[r] = (__m512bh)_mm512_loadu_si512(w + (int64_t)r * K + k);
        for (int r = 0; r < R; r++) prefetch(w, (int64_t)(r + PREFETCH_ROWS) * K + k);
        for (int m = 0; m < M; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (int64_t)m * K + k);
            for (int r = 0; r < R; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
        }
    }
    if (k < K) {
        __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
        __m512bh wv[ROW_BLOCK];
        for (int r = 0; r < R; r++) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + (int64_t)r * K + k);
        for (int m = 0; m < M; m++) {
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + (int64_t)m * K + k);
            for (int r = 0; r < R; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) out[m][r] = _mm512_reduce_add_ps(acc[m][r]);
}

static inline __attribute__((always_inline)) void gemv_bf16_avx512_rows(const uint16_t *x, const uint16_t *w,
                                                                        const uint16_t *bias, uint16_t *y, int M,
                                                                        int R, int N, int K, int n) {
    float out[MAX_ROWS][ROW_BLOCK], col[MAX_ROWS];
    rows_dot_avx512bf16(x, w + (int64_t)n * K, M, R, K, out);
    for (int r = 0; r < R; r++) {
        for (int m = 0; m < M; m++) col[m] = out[m][r];
        store_bf16(col, bias, y, M, N, n + r);
    }
}

static void gemv_bf16_avx512(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int M,
                             int N, int K, int num_threads) {
    const int blocks = (N + ROW_BLOCK - 1) / ROW_BLOCK;
    /* static schedule: each thread one contiguous run of row blocks, streamed in order */
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int i = 0; i < blocks; i++) {
        const int n = i * ROW_BLOCK;
        if (n + ROW_BLOCK <= N) {
            switch (M) {
            case 1: gemv_bf16_avx512_rows(x, w, bias, y, 1, ROW_BLOCK, N, K, n); break;
            case 2: gemv_bf16_avx512_rows(x, w, bias, y, 2, ROW_BLOCK, N, K, n); break;
            case 3: gemv_bf16_avx512_rows(x, w, bias, y, 3, ROW_BLOCK, N, K, n); break;
            default: gemv_bf16_avx512_rows(x, w, bias, y, 4, ROW_BLOCK, N, K, n); break;
            }
        } else {
            for (int r = n; r < N; r++) gemv_bf16_avx512_rows(x, w, bias, y, M, 1, N, K, r);
        }
    }
}
#endif

/* 1 where shoal_gemv_bf16 runs on vdpbf16ps, 0 where it runs the portable path. */
int shoal_gemv_bf16_native(void) { return HAVE_AVX512_BF16; }

int shoal_gemv_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int M, int N, int K,
                    int num_threads) {
#if HAVE_AVX512_BF16
    gemv_bf16_avx512(x, w, bias, y, M, N, K, num_threads);
    return SHOAL_OK;
#else
    return shoal_gemv_bf16_portable(x, w, bias, y, M, N, K, num_threads);
#endif
}
