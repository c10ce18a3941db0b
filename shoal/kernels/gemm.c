/* Small-batch float32 and bfloat16 matmuls for the CPU: y[m, n] = sum_k x[m, k] * w[n, k] + bias[n], for
 * any number of rows M, built to be fast for a batched decode step (about 5-256 rows). Float32, two forms:
 *   - shoal_gemm_f32_panels: outer products over a weight packed once into k-major panels of 16 rows (the
 *     fast one: 1.0-2.5x oneDNN's pre-packed linears at 5-128 rows, 1.0x only where the 113 MB lm_head
 *     is bound by memory at 8-16 rows; numbers in gemm.py);
 *   - shoal_gemm_f32: dot products over the weight in its nn.Linear layout [N, K], for where no packed copy
 *     is made (RAM): 1.0-1.6x oneDNN at 5-16 rows, 0.75-1.15x at 32-128; without a copy the alternative is
 *     MKL, which was below oneDNN throughout.
 * Bfloat16, one form (at the end of the file): shoal_gemm_bf16_panels, vdpbf16ps over the weight packed in
 * panels of 32 rows with k-pairs interleaved, built only where the compiler has AVX512-BF16; 1-4 rows (a
 * decode step) take a loop of their own that streams the panels (1.1-1.4x the tiles' speed there), in the
 * same summation order.
 *
 * Why: torch's CPU matmuls (MKL through F.linear, oneDNN with pre-packed weights) reach 20-60 GF/s at 8-64
 * rows on SmolLM2's shapes on a 2-core AVX2 EPYC whose FMA peak is about 150-190 GF/s.
 *
 * All are batch-invariant: every output is accumulated in one fixed order whatever M, the tile it falls
 * in or the thread that computes it, so a row's result does not depend on the other rows of the call
 * (tests/test_gemm.py checks it bitwise). The FMAs are spelled out (fma8, __builtin_fmaf) because GCC's
 * contraction of a * b + c differed between tile shapes.
 *
 * Layouts (row-major, contiguous): x [M, K], w [N, K] or its panels [ceil(N / 16), K, 16] (bfloat16:
 * [ceil(N / 32), ceil(K / 2), 32, 2]), bias [N] or NULL, y [M, N]; M, N, K >= 1. The caller (gemm.py)
 * checks all of this: these functions trust their arguments.
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __FMA__
#include <immintrin.h>
#endif

#include "bf16.h"
#include "vec8.h"

/* ---- Dot-product form over the plain weight (shoal_gemm_f32) ----
 *
 * A register tile of TM = 3 rows of x by TN = 3 rows of w: nine 8-float accumulators each sum 8 lanes of
 * products along k, and one horizontal sum per output ends the tile. Three weight vectors and one x vector
 * are loaded per step of 8 columns (13 of the 16 AVX2 registers): 6 loads for 9 FMAs. Left to itself GCC
 * folds the loads into the FMAs as memory operands (4x3 tile: 16 loads for 12 FMAs) or spills
 * accumulators, so an empty asm statement pins each loaded vector in a register. Measured on the AVX2 EPYC,
 * 1 thread, in-cache 1536x576 at 8-64 rows: 70-77 GF/s for 3x3 and 2x4 pinned, 57-61 for GCC's own 4x3.
 *
 * Each thread takes a contiguous range of TN-row weight blocks; a block (3 x K floats: 7 KB at K = 576,
 * 18 KB at 1536) stays in L1 while every row tile of x (from L2) passes over it, so the weight is read
 * from memory once per call. The first tile of a block prefetches the block PREFETCH_BLOCKS further on: a
 * weight streamed from memory (the 49152x576 lm_head, 113 MB) then overlaps its reads with the FMAs
 * (8 rows, 1 thread: 17-22 -> 25-33 GF/s). For many rows x is cut into chunks of about X_CHUNK_BYTES
 * (L2-sized) and the weight is streamed once per chunk. Order per output: lane j sums k = j, j + 8, ...;
 * the lanes are added in a fixed tree; the K % 8 tail is summed in order and added; then the bias.
 * Its limit: one x vector (from L2) feeds only 3 FMAs, so at 32+ rows it waits on L2 (the panels below).
 */
#define VW 8
#define TM 3 /* rows of x per register tile */
#define TN 3 /* rows of w per register tile */
#define PREFETCH_BLOCKS 2
#define X_CHUNK_BYTES (192 * 1024)
typedef float v4f __attribute__((vector_size(4 * sizeof(float))));

/* acc + a * b rounded once, spelled out: GCC contracts `acc += a * b` into an FMA for some tile shapes and
 * not for others (the 1x1 tile got vmulps + vaddps), which made a row's result depend on its tile. */
static inline v8f fma8(v8f a, v8f b, v8f acc) {
#ifdef __FMA__
    return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)acc);
#else
    return acc + a * b; /* no FMA unit: the same instructions for every tile shape */
#endif
}

/* Lanes (0+4, 1+5, 2+6, 3+7), then (0+2, 1+3), then the two: a fixed order. */
static inline float hsum(v8f v) {
    v4f lo = __builtin_shufflevector(v, v, 0, 1, 2, 3), hi = __builtin_shufflevector(v, v, 4, 5, 6, 7);
    v4f s = lo + hi;
    return (s[0] + s[2]) + (s[1] + s[3]);
}

/* A prefetch never faults, so one past the end of w is harmless; the address is formed as an integer so
 * that no out-of-bounds pointer is ever made (as in gemv.c). */
static inline void prefetch(const float *p, int64_t elems) {
    __builtin_prefetch((const void *)((uintptr_t)p + (uintptr_t)(elems * (int64_t)sizeof *p)), 0, 3);
}

/* The same into L2 only (prefetcht1), `bytes` past p: for the panel tiles, whose L1 holds the block they read. */
static inline void prefetch_l2(const void *p, int64_t bytes) {
    __builtin_prefetch((const void *)((uintptr_t)p + (uintptr_t)bytes), 0, 2);
}

/* A tile of MT rows of x (row stride K) by NT rows of w (row stride K) into y (row stride N); PF: also
 * prefetch the weight block PREFETCH_BLOCKS on. Always inlined with constant MT, NT and PF, so that every
 * tile shape gets its own fully unrolled copy. */
static inline __attribute__((always_inline)) void tile(const float *x, const float *w, const float *bias,
                                                       float *y, int MT, int NT, int N, int K, int PF) {
    v8f acc[TM][TN];
    for (int m = 0; m < MT; m++)
        for (int r = 0; r < NT; r++) acc[m][r] = (v8f){0};
    int k = 0;
    for (; k + VW <= K; k += VW) {
        v8f wv[TN];
        for (int r = 0; r < NT; r++) {
            wv[r] = load8(w + (int64_t)r * K + k);
            __asm__("" : "+x"(wv[r])); /* keep it in a register (see the top of the file) */
        }
        if (PF)
            for (int r = 0; r < NT; r++) prefetch(w, (int64_t)(r + PREFETCH_BLOCKS * TN) * K + k);
        for (int m = 0; m < MT; m++) {
            v8f xv = load8(x + (int64_t)m * K + k);
            __asm__("" : "+x"(xv));
            for (int r = 0; r < NT; r++) acc[m][r] = fma8(xv, wv[r], acc[m][r]);
        }
    }
    for (int m = 0; m < MT; m++)
        for (int r = 0; r < NT; r++) {
            float tail = 0.0f;
            /* an explicit fma too, for the same reason */
            for (int kk = k; kk < K; kk++)
                tail = __builtin_fmaf(x[(int64_t)m * K + kk], w[(int64_t)r * K + kk], tail);
            float b = bias ? bias[r] : 0.0f;
            y[(int64_t)m * N + r] = (hsum(acc[m][r]) + tail) + b;
        }
}

static inline __attribute__((always_inline)) void tile_rows(const float *x, const float *w, const float *bias,
                                                            float *y, int MT, int NT, int N, int K, int PF) {
    switch (MT) { /* the unrolled copy for this many rows */
    case 3: tile(x, w, bias, y, 3, NT, N, K, PF); break;
    case 2: tile(x, w, bias, y, 2, NT, N, K, PF); break;
    default: tile(x, w, bias, y, 1, NT, N, K, PF); break;
    }
}

/* Rows [m0, m1) of x against weight rows [n, n + NT), in tiles of TM rows; a remainder of one row after a
 * full tile becomes 2 + 2 rather than 3 + 1 (one row alone keeps too few FMA chains in flight). */
static inline __attribute__((always_inline)) void block(const float *x, const float *w, const float *bias,
                                                        float *y, int m0, int m1, int n, int NT, int N, int K) {
    const float *wb = w + (int64_t)n * K, *bb = bias ? bias + n : NULL;
    for (int m = m0; m < m1;) {
        int left = m1 - m, rows = left >= TM ? TM : left;
        if (left == TM + 1) rows = TM - 1;
        if (m == m0) tile_rows(x + (int64_t)m * K, wb, bb, y + (int64_t)m * N + n, rows, NT, N, K, 1);
        else tile_rows(x + (int64_t)m * K, wb, bb, y + (int64_t)m * N + n, rows, NT, N, K, 0);
        m += rows;
    }
}

/* This OpenMP thread's contiguous range [*begin, *end) of count items, as schedule(static) would give. */
static inline void thread_share(int count, int *begin, int *end) {
#ifdef _OPENMP
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    int t = 0, nt = 1;
#endif
    *begin = (int)((int64_t)count * t / nt);
    *end = (int)((int64_t)count * (t + 1) / nt);
}

/* Batched calls (5+ rows) split their panels as schedule(static) would, and a thread that ends its share
 * takes what is left of the others' from their far end (work stealing). Why: on a machine whose cores also
 * run other work (the HTTP process and its clients beside the engine core, on 2 cores), a thread
 * descheduled for a while would otherwise hold up the whole call at the barrier while the other waits
 * idle. Each thread still walks its own panels in order from the front, so the weight streams (and the
 * tiles' prefetch of the next k-block) are as with static shares; schedule(dynamic, 1) instead interleaves
 * the threads' panels and measured 7% slower at 64 rows on a quiet 2-core Zen 4. Each output panel is
 * computed by one thread in one fixed order: results are unchanged bit for bit, batch invariance included.
 * A share is one 64-bit word, front in the low half and end in the high half, taken by compare-and-swap: a
 * panel of a batched call is microseconds of work, one uncontended CAS about 20 ns. The 1-4-row decode loop
 * keeps plain static shares: its calls are tens of microseconds. */
#define MAX_SHARES 64
typedef struct {
    uint64_t range __attribute__((aligned(64))); /* front | (uint64_t)end << 32 */
} share_t;

/* The next panel from the front of a share (the owner), or -1 when it is empty. */
static inline int take_front(share_t *s) {
    uint64_t r = __atomic_load_n(&s->range, __ATOMIC_RELAXED);
    for (;;) {
        uint32_t front = (uint32_t)r, end = (uint32_t)(r >> 32);
        if (front >= end) return -1;
        if (__atomic_compare_exchange_n(&s->range, &r, r + 1, 1, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            return (int)front;
    }
}

/* The last panel of a share (a thief), or -1 when it is empty. */
static inline int take_back(share_t *s) {
    uint64_t r = __atomic_load_n(&s->range, __ATOMIC_RELAXED);
    for (;;) {
        uint32_t front = (uint32_t)r, end = (uint32_t)(r >> 32);
        if (front >= end) return -1;
        if (__atomic_compare_exchange_n(&s->range, &r, r - ((uint64_t)1 << 32), 1, __ATOMIC_ACQ_REL,
                                        __ATOMIC_RELAXED))
            return (int)end - 1;
    }
}

/* This thread's next panel: its own share first, then the others' from their ends; -1 when all are done. */
static inline int next_panel(share_t *shares, int t, int nt) {
    int p = take_front(&shares[t]);
    for (int i = 1; p < 0 && i < nt; i++) p = take_back(&shares[(t + i) % nt]);
    return p;
}

/* Called by every thread of the region: publish this thread's static share of count panels; returns the
 * thread's number. The caller puts a barrier between this and the first next_panel, and another after its
 * last next_panel before shares are opened again (a late thief must not take from the next round). */
static inline int open_share(share_t *shares, int count) {
#ifdef _OPENMP
    int t = omp_get_thread_num();
#else
    int t = 0;
#endif
    int b, e;
    thread_share(count, &b, &e);
    __atomic_store_n(&shares[t].range, (uint64_t)(uint32_t)b | ((uint64_t)(uint32_t)e << 32), __ATOMIC_RELEASE);
    return t;
}

static inline int region_threads(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

void shoal_gemm_f32(const float *x, const float *w, const float *bias, float *y, int M, int N, int K,
                    int num_threads) {
    int64_t chunk = X_CHUNK_BYTES / ((int64_t)K * sizeof(float));
    chunk = chunk < 4 * TM ? 4 * TM : chunk - chunk % TM;
    int blocks = (N + TN - 1) / TN;
    share_t shares[MAX_SHARES];
    num_threads = num_threads < MAX_SHARES ? num_threads : MAX_SHARES;
#pragma omp parallel num_threads(num_threads)
    {
        int nt = region_threads();
        for (int64_t m0 = 0; m0 < M; m0 += chunk) {
            int m1 = (int)(m0 + chunk < M ? m0 + chunk : M);
            int t = open_share(shares, blocks);
#pragma omp barrier
            for (int b; (b = next_panel(shares, t, nt)) >= 0;) {
                int n = b * TN;
                if (n + TN <= N) block(x, w, bias, y, (int)m0, m1, n, TN, N, K);
                else if (N - n == 2) block(x, w, bias, y, (int)m0, m1, n, 2, N, K);
                else block(x, w, bias, y, (int)m0, m1, n, 1, N, K);
            }
#pragma omp barrier
        }
    }
}

/* ---- Outer-product form over a weight packed in panels (shoal_gemm_f32_panels) ----
 *
 * The dot-product tiles above load one x vector for every TN = 3 FMAs: at 32+ rows, with x re-read from L2
 * for every weight block, they stall on L2 well below the FMA peak. Here the weight is packed once (at
 * load time) into panels of PW = 16 weight rows laid out k-major, wp[p][k][j] = w[16p + j, k] (rows past
 * N are zeros), so that one k step of a tile of PM = 6 rows of x is: two weight vectors, six broadcast
 * x values, twelve FMAs into twelve 8-float accumulators (15 registers), and no horizontal sums. A panel's
 * k-block of KC columns (16 KB) stays in L1 while every row tile of x passes over it; partial sums of a
 * k-block wait in a per-thread buffer. x is cut into chunks of at most MC_MAX rows (and about
 * X_CHUNK_BYTES) as above.
 *
 * Summation order: y[m, n] = (((block 0) + block 1) ...) + bias, each k-block summed in k order by one FMA
 * chain, whatever M, the tile or the thread: batch-invariant as well (not the same order as the dot-product
 * tiles above, so a layer keeps to one of the two functions).
 */
#define PW 16
#define PM 6
#define KC 256
#define MC_MAX 192 /* a multiple of PM */
/* While the first row tile reads a k-block, it asks for the block 16 KB on (the next k-block, or past the
 * panel's last the next panel's first: the panels are contiguous) into L2, as the bf16 tiles below do: that
 * first pass streams the block from memory at one 64-byte line per k step, faster than one core's share of
 * the bandwidth, and would otherwise stall on it while the other row tiles find it in L1. Whole decode step,
 * SmolLM2 float32, 2 threads, AVX2-only EPYC, steps alternating with and without it, median of 15 a side:
 * 32 sequences 1.00-1.09x (five runs), 64 sequences 1.01-1.05x; 32 or 64 KB ahead measured the same as 16. */
#define PANEL_PREFETCH_ELEMS (KC * PW)

static inline __attribute__((always_inline)) void panel_tile(const float *x, const float *wp, float *part, int MT,
                                                             int K, int kc, int first, int PF) {
    v8f acc[PM][2];
    for (int m = 0; m < MT; m++) {
        acc[m][0] = first ? (v8f){0} : load8(part + m * PW);
        acc[m][1] = first ? (v8f){0} : load8(part + m * PW + VW);
    }
    for (int k = 0; k < kc; k++) {
        v8f w0 = load8(wp + k * PW), w1 = load8(wp + k * PW + VW);
        __asm__("" : "+x"(w0), "+x"(w1));
        if (PF) prefetch_l2(wp, (PANEL_PREFETCH_ELEMS + k * PW) * (int64_t)sizeof *wp);
        for (int m = 0; m < MT; m++) {
            float s = x[(int64_t)m * K + k];
            /* Not (v8f){0} + s: 0 + s is an add GCC must keep (-0.0), one more uop a row (45 -> 85 GF/s). */
            v8f xb = {s, s, s, s, s, s, s, s};
            acc[m][0] = fma8(xb, w0, acc[m][0]);
            acc[m][1] = fma8(xb, w1, acc[m][1]);
        }
    }
    for (int m = 0; m < MT; m++) {
        memcpy(part + m * PW, &acc[m][0], sizeof acc[m][0]);
        memcpy(part + m * PW + VW, &acc[m][1], sizeof acc[m][1]);
    }
}

static inline __attribute__((always_inline)) void panel_tile_pf(const float *x, const float *wp, float *part,
                                                                int MT, int K, int kc, int first, int pf) {
    if (pf) panel_tile(x, wp, part, MT, K, kc, first, 1);
    else panel_tile(x, wp, part, MT, K, kc, first, 0);
}

/* pf: this is a k-block's first row tile, which prefetches the next block */
static inline void panel_tile_rows(const float *x, const float *wp, float *part, int MT, int K, int kc,
                                   int first, int pf) {
    switch (MT) { /* the unrolled copy for this many rows */
    case 6: panel_tile_pf(x, wp, part, 6, K, kc, first, pf); break;
    case 5: panel_tile_pf(x, wp, part, 5, K, kc, first, pf); break;
    case 4: panel_tile_pf(x, wp, part, 4, K, kc, first, pf); break;
    case 3: panel_tile_pf(x, wp, part, 3, K, kc, first, pf); break;
    case 2: panel_tile_pf(x, wp, part, 2, K, kc, first, pf); break;
    default: panel_tile_pf(x, wp, part, 1, K, kc, first, pf); break;
    }
}

void shoal_gemm_f32_panels(const float *x, const float *wp, const float *bias, float *y, int M, int N, int K,
                           int num_threads) {
    int64_t chunk = X_CHUNK_BYTES / ((int64_t)K * sizeof(float));
    chunk = chunk < PM ? PM : chunk > MC_MAX ? MC_MAX : chunk - chunk % PM;
    int panels = (N + PW - 1) / PW;
    share_t shares[MAX_SHARES];
    num_threads = num_threads < MAX_SHARES ? num_threads : MAX_SHARES;
#pragma omp parallel num_threads(num_threads)
    {
        float part[MC_MAX * PW] __attribute__((aligned(32)));
        int nt = region_threads();
        for (int64_t m0 = 0; m0 < M; m0 += chunk) {
            int rows = (int)(m0 + chunk < M ? chunk : M - m0);
            const float *xc = x + m0 * K;
            int t = open_share(shares, panels);
#pragma omp barrier
            for (int p; (p = next_panel(shares, t, nt)) >= 0;) {
                const float *panel = wp + (int64_t)p * K * PW;
                for (int k0 = 0; k0 < K; k0 += KC) {
                    int kc = K - k0 < KC ? K - k0 : KC;
                    for (int m = 0; m < rows; m += PM) {
                        int mt = rows - m < PM ? rows - m : PM;
                        panel_tile_rows(xc + (int64_t)m * K + k0, panel + (int64_t)k0 * PW, part + m * PW, mt, K,
                                        kc, k0 == 0, m == 0);
                    }
                }
                int n0 = p * PW, width = N - n0 < PW ? N - n0 : PW;
                for (int m = 0; m < rows; m++)
                    for (int j = 0; j < width; j++)
                        y[(m0 + m) * N + n0 + j] = part[m * PW + j] + (bias ? bias[n0 + j] : 0.0f);
            }
#pragma omp barrier
        }
    }
}

/* ---- bfloat16 panels on AVX512-BF16 (shoal_gemm_bf16_panels) ----
 *
 * y[m, n] = bf16(sum_k x[m, k] * w[n, k] + bias[n]): bf16 inputs, products and sums in fp32, the bias added
 * in fp32, one rounding to bf16 (nearest even) at the end, as torch's bf16 linear up to summation order.
 * vdpbf16ps multiplies 32 pairs of bf16 values and adds each lane's two products into one of 16 fp32
 * lanes; it treats denormal inputs as zero and flushes denormal results (Intel SDM, VDPBF16PS), which
 * torch does not, so values below about 1e-38 differ.
 *
 * The weight is packed once into panels of BW = 32 weight rows with k-pairs interleaved, wp[p][k/2][j][2]
 * = w[32p + j, k] (zeros for rows past N and for k = K when K is odd): one k-pair step of a panel is two
 * 64-byte loads holding the pairs of 32 outputs. A tile of BM = 8 rows of x broadcasts each row's pair
 * (one dword, {1to16}) against both and keeps 16 accumulators (16 of the 32 zmm registers). A panel's
 * k-block of BKC = 256 columns (16 KB) stays in L1 while every row tile of x passes over it (the next
 * block prefetched into L2 meanwhile); the sums wait in a per-thread buffer between k-blocks and a block's
 * tile picks up its chain where the last left it.
 *
 * Summation order: one vdpbf16ps chain per output, over k-pairs in order (the last pair of an odd K has a
 * zero second half), whatever M, the tile, the chunk of x or the thread: batch-invariant.
 *
 * Compiled only where the compiler has AVX512-BF16 (-march=native on such a CPU);
 * shoal_gemm_bf16_available() says whether it was.
 */
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define HAVE_AVX512_BF16 1
#else
#define HAVE_AVX512_BF16 0
#endif

int shoal_gemm_bf16_available(void) { return HAVE_AVX512_BF16; }

#if HAVE_AVX512_BF16
#include <immintrin.h>
#define BW 32  /* weight rows per panel */
#define BM 8   /* rows of x per register tile */
#define BKC 256 /* columns per k-block: even, so that a pair never straddles two blocks */
/* x in chunks of about 384 KB (half the L2), in equal parts (512 rows at K = 576: 2 x 256 rather than
 * 168 + 168 + 168 + 8), so that a weight streamed from memory (the lm_head) is read once per chunk, fewer
 * times: lm_head at 512-1024 rows, 2 threads, 385-390 -> 399-400 GF/s (1 thread 1-2%); others alike. */
#define BMC_MAX 384 /* a multiple of BM */
#define BF16_X_CHUNK_BYTES (384 * 1024)
/* While the first row tile reads a k-block, it asks for the next one (the weight is contiguous, so past the
 * panel's last block that is the next panel's first) into L2 (prefetcht1: the L1 holds the block being
 * read). Measured, SmolLM2's lm_head (49152x576 bf16, 56 MB from memory), 1 thread, 8 / 32 / 256 rows:
 * 119 / 155 / 191 GF/s with prefetcht0 8 KB ahead, 155 / 189 / 200 with this; 2 threads, 5 / 32 rows:
 * 86 / 261 -> 137 / 306 GF/s; 16, 32 and 64 KB ahead alike; in-cache weights (gate_up) unchanged. */
#define PREFETCH_ELEMS (BKC * BW)

/* The sums of `rows` rows of x for panel columns n0.. (part, rows x BW, row-major) out to y (rows from its
 * first, row stride N): the bias added in fp32, one rounding to bf16; columns past N are the panel's padding. */
static inline void bf16_store(const float *part, const uint16_t *bias, uint16_t *y, int rows, int N, int n0) {
    int width = N - n0 < BW ? N - n0 : BW;
    for (int m = 0; m < rows; m++) {
        uint16_t *yr = y + (int64_t)m * N + n0;
        for (int j = 0; j < width; j++)
            yr[j] = f32_to_bf16(part[m * BW + j] + (bias ? bf16_to_f32(bias[n0 + j]) : 0.0f));
    }
}

/* MT rows of x (row stride K, from column k0 of the block) by one panel's k-block of kc columns (wp at the
 * block's first pair) into part (MT x BW sums). */
static inline __attribute__((always_inline)) void bf16_tile(const uint16_t *x, const uint16_t *wp, float *part,
                                                            int MT, int K, int kc, int first, int64_t pf) {
    __m512 acc[BM][2];
    for (int m = 0; m < MT; m++) {
        acc[m][0] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(part + m * BW);
        acc[m][1] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(part + m * BW + 16);
    }
    int pairs = kc / 2;
    for (int i = 0; i < pairs; i++) {
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp + i * 2 * BW);
        __m512bh w1 = (__m512bh)_mm512_loadu_si512(wp + i * 2 * BW + BW);
        if (pf) {
            prefetch_l2(wp, (pf + i * 2 * BW) * (int64_t)sizeof *wp);
            prefetch_l2(wp, (pf + i * 2 * BW + BW) * (int64_t)sizeof *wp);
        }
        for (int m = 0; m < MT; m++) {
            uint32_t pair;
            memcpy(&pair, x + (int64_t)m * K + 2 * i, sizeof pair);
            __m512bh xb = (__m512bh)_mm512_set1_epi32((int)pair);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
        }
    }
    if (kc & 1) { /* the last column of an odd K: its pair's second half is zero in x and in the panel */
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp + pairs * 2 * BW);
        __m512bh w1 = (__m512bh)_mm512_loadu_si512(wp + pairs * 2 * BW + BW);
        for (int m = 0; m < MT; m++) {
            __m512bh xb = (__m512bh)_mm512_set1_epi32((int)x[(int64_t)m * K + 2 * pairs]);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
        }
    }
    for (int m = 0; m < MT; m++) {
        _mm512_storeu_ps(part + m * BW, acc[m][0]);
        _mm512_storeu_ps(part + m * BW + 16, acc[m][1]);
    }
}

static inline __attribute__((always_inline)) void bf16_tile_pf(const uint16_t *x, const uint16_t *wp, float *part,
                                                               int MT, int K, int kc, int first, int64_t pf) {
    if (pf) bf16_tile(x, wp, part, MT, K, kc, first, pf);
    else bf16_tile(x, wp, part, MT, K, kc, first, 0);
}

/* pf: prefetch the weight that many elements on while reading this block (0: no prefetch) */
static inline void bf16_tile_rows(const uint16_t *x, const uint16_t *wp, float *part, int MT, int K, int kc,
                                  int first, int64_t pf) {
    switch (MT) { /* the unrolled copy for this many rows */
    case 8: bf16_tile_pf(x, wp, part, 8, K, kc, first, pf); break;
    case 7: bf16_tile_pf(x, wp, part, 7, K, kc, first, pf); break;
    case 6: bf16_tile_pf(x, wp, part, 6, K, kc, first, pf); break;
    case 5: bf16_tile_pf(x, wp, part, 5, K, kc, first, pf); break;
    case 4: bf16_tile_pf(x, wp, part, 4, K, kc, first, pf); break;
    case 3: bf16_tile_pf(x, wp, part, 3, K, kc, first, pf); break;
    case 2: bf16_tile_pf(x, wp, part, 2, K, kc, first, pf); break;
    default: bf16_tile_pf(x, wp, part, 1, K, kc, first, pf); break;
    }
}

/* ---- Decode, 1-4 rows (bf16_decode) ----
 * A decode step reads every weight once for 1-4 rows of x: the kernel only has to stream the panels at
 * memory bandwidth. One thread's panels are contiguous, so its share of the weight is one sequential
 * stream; each panel is read once, all K at a time, with the sums of its 32 outputs for each row of x in
 * registers (no k-blocks, no partial-sum buffer), and there is no software prefetch: the hardware
 * prefetchers keep up with a plain stream, and the tiles' prefetcht1 of the next k-block (16 KB on) held
 * the 49152x576 lm_head (56 MB, from memory) below what this loop reaches. Measured on the 2-core Zen4
 * EPYC, bf16, through ctypes, best of 20-25 interleaved calls, load ~1.1-1.7, tiles -> this loop, GB/s:
 * lm_head 1 thread 17.9-19.3 -> 21.3-23.6 at 1-4 rows, 2 threads 35.5-38.4 -> 41.2-46.4; SmolLM2's 120
 * decoder linears (212 MB, 0.7-3.5 MB each) 1 thread 15.7-19.6 -> 16.1-18.5, 2 threads 26.7-29.9 ->
 * 28.3-30.5 (numbers in gemm.py). Prefetching 1, 2, 4, 8 or 16 KB ahead (prefetcht1, prefetcht0 at
 * 512 B, prefetchnta at 4 KB) was no better than none.
 *
 * Summation order: bf16_tile's exactly (one vdpbf16ps chain per output over the k-pairs in order, the
 * zero-padded pair of an odd K last; the bias added in fp32 after; one rounding), so a row's output is
 * bitwise the same through either loop, whatever M. */
#define DECODE_ROWS 4 /* at most this many rows of x take the decode loop */
/* Where the loop is slower than the tiles, the engine turns it off (0) after timing both at model load
 * (kernels/gemm.py, choose_bf16_decode_loop): on the 2-core Intel Xeon (AVX512-BF16, no AMX) the tiles, with
 * their prefetch of the next k-block, stream SmolLM2's 120 decoder linears from memory in 16.3 / 19.7 ms at
 * 1 / 4 rows on 1 thread against the loop's 20.1 / 30.3 (7.8 / 9.6 against 10.1 / 14.9 on 2 threads).
 * Either way a row's output is bitwise the same (above). */
static int decode_rows = DECODE_ROWS;

void shoal_gemm_bf16_set_decode_rows(int rows) { decode_rows = rows < 0 ? 0 : rows > DECODE_ROWS ? DECODE_ROWS : rows; }

int shoal_gemm_bf16_decode_rows(void) { return decode_rows; }

static inline __attribute__((always_inline)) void bf16_decode_panel(const uint16_t *x, const uint16_t *wp,
                                                                    const uint16_t *bias, uint16_t *y, int MT,
                                                                    int N, int K, int n0) {
    __m512 acc[DECODE_ROWS][2];
    for (int m = 0; m < MT; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    int pairs = K / 2;
    for (int i = 0; i < pairs; i++) {
        const uint16_t *wi = wp + (int64_t)i * 2 * BW;
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wi);
        __m512bh w1 = (__m512bh)_mm512_loadu_si512(wi + BW);
        for (int m = 0; m < MT; m++) {
            uint32_t pair;
            memcpy(&pair, x + (int64_t)m * K + 2 * i, sizeof pair);
            __m512bh xb = (__m512bh)_mm512_set1_epi32((int)pair);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
        }
    }
    if (K & 1) {
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp + (int64_t)pairs * 2 * BW);
        __m512bh w1 = (__m512bh)_mm512_loadu_si512(wp + (int64_t)pairs * 2 * BW + BW);
        for (int m = 0; m < MT; m++) {
            __m512bh xb = (__m512bh)_mm512_set1_epi32((int)x[(int64_t)m * K + 2 * pairs]);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
        }
    }
    float part[DECODE_ROWS * BW] __attribute__((aligned(64)));
    for (int m = 0; m < MT; m++) {
        _mm512_store_ps(part + m * BW, acc[m][0]);
        _mm512_store_ps(part + m * BW + 16, acc[m][1]);
    }
    bf16_store(part, bias, y, MT, N, n0);
}

static void bf16_decode(const uint16_t *x, const uint16_t *wp, const uint16_t *bias, uint16_t *y, int M, int N,
                        int K, int num_threads) {
    int panels = (N + BW - 1) / BW;
    int64_t panel_elems = (int64_t)((K + 1) / 2) * 2 * BW;
#pragma omp parallel num_threads(num_threads)
    {
        int p0, p1;
        thread_share(panels, &p0, &p1);
        for (int p = p0; p < p1; p++) {
            const uint16_t *panel = wp + p * panel_elems;
            switch (M) {
            case 1: bf16_decode_panel(x, panel, bias, y, 1, N, K, p * BW); break;
            case 2: bf16_decode_panel(x, panel, bias, y, 2, N, K, p * BW); break;
            case 3: bf16_decode_panel(x, panel, bias, y, 3, N, K, p * BW); break;
            default: bf16_decode_panel(x, panel, bias, y, 4, N, K, p * BW); break;
            }
        }
    }
}

void shoal_gemm_bf16_panels(const uint16_t *x, const uint16_t *wp, const uint16_t *bias, uint16_t *y, int M,
                            int N, int K, int num_threads) {
    if (M < 1) return;
    if (M <= decode_rows) {
        bf16_decode(x, wp, bias, y, M, N, K, num_threads);
        return;
    }
    int64_t chunk = BF16_X_CHUNK_BYTES / ((int64_t)K * sizeof(uint16_t));
    chunk = chunk < BM ? BM : chunk > BMC_MAX ? BMC_MAX : chunk - chunk % BM;
    int64_t count = (M + chunk - 1) / chunk, even = ((M + count - 1) / count + BM - 1) / BM * BM;
    chunk = even < chunk ? even : chunk; /* equal chunks: no short last one streaming the weight for a few rows */
    int panels = (N + BW - 1) / BW;
    int64_t panel_elems = (int64_t)((K + 1) / 2) * 2 * BW;
    share_t shares[MAX_SHARES];
    num_threads = num_threads < MAX_SHARES ? num_threads : MAX_SHARES;
#pragma omp parallel num_threads(num_threads)
    {
        float part[BMC_MAX * BW] __attribute__((aligned(64)));
        int nt = region_threads();
        for (int64_t m0 = 0; m0 < M; m0 += chunk) {
            int rows = (int)(m0 + chunk < M ? chunk : M - m0);
            const uint16_t *xc = x + m0 * K;
            int t = open_share(shares, panels);
#pragma omp barrier
            for (int p; (p = next_panel(shares, t, nt)) >= 0;) {
                const uint16_t *panel = wp + p * panel_elems;
                for (int k0 = 0; k0 < K; k0 += BKC) {
                    int kc = K - k0 < BKC ? K - k0 : BKC;
                    for (int m = 0; m < rows; m += BM) {
                        int mt = rows - m < BM ? rows - m : BM;
                        int64_t pf = m == 0 ? PREFETCH_ELEMS : 0;
                        bf16_tile_rows(xc + (int64_t)m * K + k0, panel + (int64_t)k0 * BW, part + m * BW, mt, K,
                                       kc, k0 == 0, pf);
                    }
                }
                bf16_store(part, bias, y + m0 * N, rows, N, p * BW);
            }
#pragma omp barrier
        }
    }
}
#endif
