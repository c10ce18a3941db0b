/* Matrix-vector products over pack-quantized weights, for decode: y[m, n] = sum_k x[m, k] * w_hat[n, k]
 * + bias[n] for 1-4 rows of x, with w_hat[n, k] = (q[n, k] - z[n, g]) * s[n, g], g = k / group.
 *
 * Why: decode reads every weight once per step, so it is memory bound; an int4 weight is a quarter of the
 * bytes of a bf16 one. Dequantizing the whole weight first (the PyTorch reference) writes a dense copy per
 * call and loses that; here each thread streams its own rows of the packed weight once for all rows of x.
 *
 * Layout (compressed-tensors' pack-quantized, see shoal/quant/format.py): wq is int32 [N, K * bits / 32];
 * for 4 bits word j of a row holds columns 8j..8j+7 as unsigned nibbles u = q + 8, column 8j lowest; for
 * 8 bits the row is the bytes u = q + 128 in column order (little-endian words). So with
 * zu = z + 2^(bits-1):  sum_k x_k w_hat_k = sum_g s_g * (sum_{k in g} u_k x_k - zu_g * xsum_g),
 * where xsum[m, g] = sum_{k in g} x[m, k] comes from the caller. Accumulation is fp32 over fp32 x, u is an
 * exact small integer: the result differs from the dequantized reference by summation order only.
 *
 * Inner loops:
 *   - bfloat16 x on AVX512-BF16 (vdpbf16ps), groups of a multiple of 64 columns, int4 or int8 (every layer of
 *     the 4-bit g64 and W8A16 models): row4_plain / row8_plain. The row's bytes are loaded plainly, 64 at a
 *     time, and split into nibbles in place: nibble i of each 16-bit word ORed with 0x4300 is the bf16
 *     128 + nibble (exact), and vdpbf16ps multiplies a word pair with x permuted once per call into the order
 *     the nibbles come out in (an int8 byte is its two nibbles, accumulated apart). No int -> float
 *     conversion and no cross-lane unpack; the extra 128s are subtracted with the zero point. Output rows go
 *     in tiles of 16 (tile_plain): scales kept in a register, the rows' sums reduced by one tree, one bf16
 *     store. Products are exact in fp32; vdpbf16ps flushes denormals (as in gemv.c).
 *   - int4 with bfloat16 x and groups of 32 (an odd multiple) on AVX512-BF16: group4_bf16, each 32-bit lane
 *     the bf16 pair (128 + u[2i], 128 + u[2i+1]) from byte i of the row (vpmovzxbd, masks and an OR), against
 *     the bf16 pair x[2i], x[2i+1] as it lies in memory: 32 columns per vdpbf16ps.
 *   - everywhere else (float32 x, int8 weights, CPUs without AVX512-BF16): codes converted to fp32, 16 at a
 *     time, and fp32 FMAs: AVX512F intrinsics or GCC vector extensions, except on CPUs with AVX2 and FMA but
 *     no AVX512F, which get row_avx2 (8-lane intrinsics). There GCC splits the 16-lane vector type into
 *     halves through the stack and turns the uint8 -> float conversion of codes8 into one scalar conversion
 *     per weight: measured on an AVX2-only EPYC (1 row, f32 x, 1 thread, weights from memory, 3072x576 g64),
 *     int4 5.8 ms and int8 2.5 ms a call against 0.8 ms for the dense f32 gemv; see qgemv.py for row_avx2's.
 *
 * Arguments (row-major, contiguous; qgemv.py checks them all, this code trusts them): x [M, K], bias [N]
 * or NULL and y [M, N], all f32 or all bf16 (x_bf16 = 1; bf16 x is widened to f32 here unless a
 * vdpbf16ps path runs, and y is rounded to bf16 once, nearest even); wq as above; scale [N, K / group]
 * f32 or bf16 (scale_bf16 = 1); zero [N, K / group] int8 or NULL (symmetric); 1 <= M <= 4, bits 4 or 8,
 * group a multiple of 32 dividing K. use_dot = 0 keeps the fp32 path on AVX512-BF16 CPUs (tests).
 * signed_codes = 1 (8 bits only, and only where row8_plain runs: bf16 x, groups of a multiple of 64, AVX512-BF16)
 * takes the bytes as signed q instead of u = q + 128, so that an int8 weight torch's `_weight_int8pack_mm`
 * reads for batches serves 1-4 rows here without a second copy (one vpxord a 64 bytes).
 * Speeds measured (this CPU and before/after) are in qgemv.py.
 * The per-group sums of x that the zero-point term needs are computed once per call, before the rows.
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define HAVE_AVX2_ROW 1
#else
#define HAVE_AVX2_ROW 0
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HAVE_AVX512_MASKED 1 /* masked 8/16-bit loads (block_scales) */
#else
#define HAVE_AVX512_MASKED 0
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define HAVE_AVX512_BF16 1
#else
#define HAVE_AVX512_BF16 0
#endif

#define MAX_ROWS 4
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint8_t v16b __attribute__((vector_size(16)));

static inline v16f load16(const float *p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float hsum(v16f v) {
#ifdef __AVX512F__
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
#endif
}

int shoal_qgemv_bf16_native(void) { return HAVE_AVX512_BF16; }
int shoal_qgemv_avx2_row(void) { return HAVE_AVX2_ROW; }

static inline float scale_at(const void *scale, int scale_bf16, int64_t i) {
    return scale_bf16 ? bf16_to_f32(((const uint16_t *)scale)[i]) : ((const float *)scale)[i];
}

/* 16 consecutive weights of a row (from column k) as floats of their unsigned codes u. */
static inline v16f codes4(const int32_t *words, int k) {
#ifdef __AVX512F__
    const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    __m512i v = _mm512_broadcast_i32x4(_mm_loadl_epi64((const __m128i *)(words + k / 8))); /* a b a b ... */
    v = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), v);
    __m512i u = _mm512_and_si512(_mm512_srlv_epi32(v, shifts), _mm512_set1_epi32(15));
    return (v16f)_mm512_cvtepi32_ps(u);
#else
    const v16u shifts = {0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28};
    uint32_t a = (uint32_t)words[k / 8], b = (uint32_t)words[k / 8 + 1];
    v16u u = ((v16u){a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b} >> shifts) & 15u;
    return __builtin_convertvector((v16i)u, v16f);
#endif
}

static inline v16f codes8(const uint8_t *bytes, int k) {
#ifdef __AVX512F__
    return (v16f)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(bytes + k))));
#else
    v16b b;
    memcpy(&b, bytes + k, sizeof b);
    return __builtin_convertvector(b, v16f);
#endif
}

#if HAVE_AVX512_MASKED
/* Row n's scales of groups g .. g + 15 (fewer past G) as f32 lanes, with its zero-point term for them,
 * sum_g s * (offset + z) * xsum[m, g], taken off t[m] for each row m of x (masked loads for the tail). */
static inline __attribute__((always_inline)) __m512 block_scales(const void *scale, int scale_bf16, const int8_t *zero,
                                                                 const float *xsum, int64_t n, int G, int g, float offset,
                                                                 int M, __m512 *t) {
    const __mmask16 k = G - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g)) - 1u);
    const int64_t i = n * G + g;
    const __m512 s = scale_bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                      _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, (const uint16_t *)scale + i)), 16))
                                : _mm512_maskz_loadu_ps(k, (const float *)scale + i);
    __m512 zu = _mm512_set1_ps(offset);
    if (zero) zu = _mm512_add_ps(zu, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, zero + i))));
    const __m512 sz = _mm512_mul_ps(s, zu);
    for (int m = 0; m < M; m++) t[m] = _mm512_fnmadd_ps(sz, _mm512_maskz_loadu_ps(k, xsum + (int64_t)m * G + g), t[m]);
    return s;
}

#endif

#if HAVE_AVX512_BF16
/* The bytes [at, at + bytes) of a weight of `end` bytes into L1, a cache line at a time (none past its end). */
static inline void prefetch_rows(const int32_t *wq, int64_t at, int64_t bytes, int64_t end) {
    for (int64_t b = 0; b < bytes && at + b < end; b += 64) _mm_prefetch((const char *)wq + at + b, _MM_HINT_T0);
}

/* tot[m] += s * sum over the group of (128 + u_k) * x_k, for M rows of bf16 x, 32 columns a vdpbf16ps. */
static inline __attribute__((always_inline)) void group4_bf16(const uint8_t *bytes, const uint16_t *x, int M,
                                                              int K, int k0, int group, float s, v16f *tot) {
    const __m512i lo = _mm512_set1_epi32(0x0F), hi = _mm512_set1_epi32(0xF0);
    const __m512i base = _mm512_set1_epi32(0x43004300);
    __m512 acc[MAX_ROWS];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    for (int k = k0; k < k0 + group; k += 32) {
        __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(bytes + k / 2)));
        __m512i pair = _mm512_ternarylogic_epi32(_mm512_and_si512(d, lo), _mm512_slli_epi32(_mm512_and_si512(d, hi), 12),
                                                 base, 0xFE); /* a | b | c */
        for (int m = 0; m < M; m++) {
            __m512i xv = _mm512_loadu_si512((const void *)(x + (int64_t)m * K + k));
            acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)pair, (__m512bh)xv);
        }
    }
    for (int m = 0; m < M; m++) tot[m] += (v16f)acc[m] * s;
}

enum { KIND_G64 = 0, KIND_G128 = 1, KIND_OTHER = 2 }; /* row4_plain's group sizes: 64, a multiple of 128, else */

/* int4 x bf16 over columns [k0, k1) of a row as it lies in memory, for x permuted per block (see
 * shoal_qgemv): 64 bytes loaded plainly are 128 columns, word j (16 bits) holding columns 4j..4j+3 in its
 * nibbles; nibble i of every word ORed with 0x4300 is the bf16 128 + u (exact), and vdpbf16ps pairs words
 * 2l, 2l + 1, so x's block is stored nibble by nibble: xp[32i + j] = x[4j + i]. No cross-lane unpack: 7 logic
 * ops and 4 vdpbf16ps a 128 columns. The block's low 64 columns (words 0..15) are the low 8 lanes of the
 * accumulator, its high 64 the high 8, so one vector [s_lo x 8, s_hi x 8] scales a block for any group a
 * multiple of 64: a permute of sv, the f32 scales of the (up to 16) groups from column k0 on, kept in a
 * register (read back from memory after a vector store, they cost a failed store-to-load forward a block).
 * A last block of 64 columns (K an odd multiple of 64) runs on 256 bits, xp[16i + j] = x[4j + i]. */
static inline __attribute__((always_inline)) void row4_plain(const uint8_t *wr, const uint16_t *xp, int M, int K,
                                                             int k0, int k1, int group, int kind, __m512 sv,
                                                             __m512 *tot) {
    const __m512i nib = _mm512_set1_epi16(0x0F), base = _mm512_set1_epi16(0x4300);
    const int g0 = k0 / group;
    /* lanes 0-7: the group of the block's first 64 columns, 8-15: of its last 64 (relative to g0) */
    __m512i idx = kind == KIND_G64 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1) : _mm512_setzero_si512();
    const __m512i step = _mm512_set1_epi32(kind == KIND_G64 ? 2 : 1);
    int k = k0;
    for (; k + 128 <= k1; k += 128) {
        const __m512i w = _mm512_loadu_si512((const void *)(wr + k / 2));
        const __m512i e0 = _mm512_ternarylogic_epi32(w, nib, base, 0xEA); /* (w & nib) | base */
        const __m512i e1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), nib, base, 0xEA);
        const __m512i e2 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 8), nib, base, 0xEA);
        const __m512i e3 = _mm512_or_si512(_mm512_srli_epi16(w, 12), base);
        if (kind == KIND_OTHER)
            idx = _mm512_mask_blend_epi32((__mmask16)0xFF00, _mm512_set1_epi32(k / group - g0),
                                          _mm512_set1_epi32((k + 64) / group - g0));
        const __m512 s = _mm512_permutexvar_ps(idx, sv);
        if (kind != KIND_OTHER && (kind == KIND_G64 || (k + 128 - k0) % group == 0)) idx = _mm512_add_epi32(idx, step);
        for (int m = 0; m < M; m++) {
            const uint16_t *xr = xp + (int64_t)m * K + k;
            __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)e0, (__m512bh)_mm512_loadu_si512((const void *)xr));
            __m512 b = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)e1, (__m512bh)_mm512_loadu_si512((const void *)(xr + 32)));
            a = _mm512_dpbf16_ps(a, (__m512bh)e2, (__m512bh)_mm512_loadu_si512((const void *)(xr + 64)));
            b = _mm512_dpbf16_ps(b, (__m512bh)e3, (__m512bh)_mm512_loadu_si512((const void *)(xr + 96)));
            tot[m] = _mm512_fmadd_ps(_mm512_add_ps(a, b), s, tot[m]);
        }
    }
    if (k < k1) {
        const __m256i n8 = _mm256_set1_epi16(0x0F), b8 = _mm256_set1_epi16(0x4300);
        const __m256i w = _mm256_loadu_si256((const __m256i *)(wr + k / 2));
        const __m256i e0 = _mm256_ternarylogic_epi32(w, n8, b8, 0xEA);
        const __m256i e1 = _mm256_ternarylogic_epi32(_mm256_srli_epi16(w, 4), n8, b8, 0xEA);
        const __m256i e2 = _mm256_ternarylogic_epi32(_mm256_srli_epi16(w, 8), n8, b8, 0xEA);
        const __m256i e3 = _mm256_or_si256(_mm256_srli_epi16(w, 12), b8);
        const __m512 s = _mm512_permutexvar_ps(_mm512_set1_epi32(k / group - g0), sv);
        for (int m = 0; m < M; m++) {
            const uint16_t *xr = xp + (int64_t)m * K + k;
            __m256 a = _mm256_dpbf16_ps(_mm256_setzero_ps(), (__m256bh)e0, (__m256bh)_mm256_loadu_si256((const __m256i *)xr));
            __m256 b = _mm256_dpbf16_ps(_mm256_setzero_ps(), (__m256bh)e1, (__m256bh)_mm256_loadu_si256((const __m256i *)(xr + 16)));
            a = _mm256_dpbf16_ps(a, (__m256bh)e2, (__m256bh)_mm256_loadu_si256((const __m256i *)(xr + 32)));
            b = _mm256_dpbf16_ps(b, (__m256bh)e3, (__m256bh)_mm256_loadu_si256((const __m256i *)(xr + 48)));
            tot[m] = _mm512_fmadd_ps(_mm512_zextps256_ps512(_mm256_add_ps(a, b)), s, tot[m]);
        }
    }
}

/* 64 int8 codes (u = q + 128 after the XOR with flip, see shoal_qgemv) as four vectors of 32 bf16 words, each
 * the exact 128 + nibble: e[0] and e[1] the low and high nibbles of the even columns' bytes, e[2] and e[3]
 * those of the odd columns' (the word j of a 64-byte load holds columns 2j and 2j + 1). */
static inline __attribute__((always_inline)) void nibbles8(const uint8_t *p, __m512i flip, __m512i *e) {
    const __m512i nib = _mm512_set1_epi16(0x0F), base = _mm512_set1_epi16(0x4300);
    const __m512i w = _mm512_xor_si512(_mm512_loadu_si512((const void *)p), flip);
    e[0] = _mm512_ternarylogic_epi32(w, nib, base, 0xEA); /* (w & nib) | base */
    e[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), nib, base, 0xEA);
    e[2] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 8), nib, base, 0xEA);
    e[3] = _mm512_or_si512(_mm512_srli_epi16(w, 12), base);
}

/* int8 x bf16 the same way, over columns [k0, k1) (whole groups): 64 bytes loaded plainly are 64 columns,
 * each byte u = 16 h + l taken as its two nibbles (nibbles8), with x stored per 64 columns as its 32 even
 * then its 32 odd columns (xp). Low and high nibbles accumulate apart: lo + 16 hi = sum (u + 17 * 128) x,
 * scaled once per group (sv as in row4_plain). 7 logic ops and 4 vdpbf16ps a 64 columns, no conversion to
 * float, no cross-lane unpack. */
static inline __attribute__((always_inline)) void row8_plain(const uint8_t *wr, const uint16_t *xp, int M, int K,
                                                             int k0, int k1, int group, __m512 sv, __m512 *tot,
                                                             __m512i flip) {
    __m512i idx = _mm512_setzero_si512();
    for (int g0 = k0; g0 < k1; g0 += group) {
        __m512 lo[MAX_ROWS], hi[MAX_ROWS];
        for (int m = 0; m < M; m++) lo[m] = hi[m] = _mm512_setzero_ps();
        for (int k = g0; k < g0 + group; k += 64) {
            __m512i e[4];
            nibbles8(wr + k, flip, e);
            for (int m = 0; m < M; m++) {
                const uint16_t *xr = xp + (int64_t)m * K + k;
                const __m512bh xa = (__m512bh)_mm512_loadu_si512((const void *)xr);
                const __m512bh xb = (__m512bh)_mm512_loadu_si512((const void *)(xr + 32));
                lo[m] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(lo[m], (__m512bh)e[0], xa), (__m512bh)e[2], xb);
                hi[m] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(hi[m], (__m512bh)e[1], xa), (__m512bh)e[3], xb);
            }
        }
        const __m512 s = _mm512_permutexvar_ps(idx, sv);
        idx = _mm512_add_epi32(idx, _mm512_set1_epi32(1));
        for (int m = 0; m < M; m++) tot[m] = _mm512_fmadd_ps(_mm512_fmadd_ps(hi[m], _mm512_set1_ps(16.0f), lo[m]), s, tot[m]);
    }
}

/* row8_plain for two output rows (wr[0], wr[1]) against one row of x: the x loads are shared and the four
 * accumulator chains independent. Each row's sums are row8_plain's, in its order, so a row gives bitwise the
 * same output paired or not. Why: the single-row loop is bound by its instructions' latencies, not by the
 * memory stream (1 thread reads int8 at the same 21 GB/s from cache as from memory). SmolLM2's 120 decoder
 * linears of a W8A16 step (bench/qgemv_harness.c, 1 row of x, 2-core Zen 4): from memory on 2 threads
 * (with PAIR_PREFETCH_ROWS) 2.93-2.98 -> 2.74-2.76 ms a step, medians of three interleaved runs; in cache on
 * 1 thread 21.2 -> 22.0 GB/s. The nibbles are written out rather than two nibbles8 calls: that way the
 * pair gained only 1-4% (3.12-3.16 against 3.19-3.23 ms, the same minutes). */
static inline __attribute__((always_inline)) void row8_pair(const uint8_t *const *wr, const uint16_t *xp, int k0,
                                                            int k1, int group, const __m512 *sv, __m512 *tot,
                                                            __m512i flip) {
    const __m512i nib = _mm512_set1_epi16(0x0F), base = _mm512_set1_epi16(0x4300);
    __m512i idx = _mm512_setzero_si512();
    for (int g0 = k0; g0 < k1; g0 += group) {
        __m512 lo[2], hi[2];
        lo[0] = hi[0] = lo[1] = hi[1] = _mm512_setzero_ps();
        for (int k = g0; k < g0 + group; k += 64) {
            const __m512bh xa = (__m512bh)_mm512_loadu_si512((const void *)(xp + k));
            const __m512bh xb = (__m512bh)_mm512_loadu_si512((const void *)(xp + k + 32));
            const __m512i w = _mm512_xor_si512(_mm512_loadu_si512((const void *)(wr[0] + k)), flip);
            const __m512i v = _mm512_xor_si512(_mm512_loadu_si512((const void *)(wr[1] + k)), flip);
            lo[0] = _mm512_dpbf16_ps(lo[0], (__m512bh)_mm512_ternarylogic_epi32(w, nib, base, 0xEA), xa);
            lo[1] = _mm512_dpbf16_ps(lo[1], (__m512bh)_mm512_ternarylogic_epi32(v, nib, base, 0xEA), xa);
            hi[0] = _mm512_dpbf16_ps(hi[0], (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), nib, base, 0xEA), xa);
            hi[1] = _mm512_dpbf16_ps(hi[1], (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), nib, base, 0xEA), xa);
            lo[0] = _mm512_dpbf16_ps(lo[0], (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 8), nib, base, 0xEA), xb);
            lo[1] = _mm512_dpbf16_ps(lo[1], (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 8), nib, base, 0xEA), xb);
            hi[0] = _mm512_dpbf16_ps(hi[0], (__m512bh)_mm512_or_si512(_mm512_srli_epi16(w, 12), base), xb);
            hi[1] = _mm512_dpbf16_ps(hi[1], (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 12), base), xb);
        }
        for (int r = 0; r < 2; r++)
            tot[r] = _mm512_fmadd_ps(_mm512_fmadd_ps(hi[r], _mm512_set1_ps(16.0f), lo[r]), _mm512_permutexvar_ps(idx, sv[r]), tot[r]);
        idx = _mm512_add_epi32(idx, _mm512_set1_epi32(1));
    }
}

/* Sums of 16 vectors' lanes, as one vector: lane l is the sum of v[TILE_POS[l]] (a transpose-and-add tree,
 * 45 instructions for 16 rows instead of a reduction of about 8 per row). */
static const int TILE_POS[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15}; /* its own inverse */
static inline __m512 reduce16(const __m512 *v) {
    __m512 w[8], x[4], y[2];
    for (int i = 0; i < 8; i++)
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
    for (int i = 0; i < 4; i++)
        x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[i], w[i + 4], 0x88), _mm512_shuffle_f32x4(w[i], w[i + 4], 0xDD));
    for (int i = 0; i < 2; i++)
        y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[i], x[i + 2], 0x44), _mm512_shuffle_ps(x[i], x[i + 2], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
}

/* f32_to_bf16 (bf16.h) on 16 lanes: nearest even, a NaN kept quiet with its sign and upper payload. */
static inline __m256i bf16_round16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i hi = _mm512_srli_epi32(u, 16);
    const __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(hi, _mm512_set1_epi32(1)))), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    return _mm512_cvtepi32_epi16(_mm512_mask_or_epi32(r, nan, hi, _mm512_set1_epi32(0x40)));
}

/* int4 rows are prefetched this far ahead of the one being read: from memory, 1 thread, 576x1536 g64 took
 * 46-53 us a call without it and 28-31 us with it (any of 2 or 4 rows, 1, 2 or 4 KB ahead), the 576-column
 * shapes unchanged. A single int8 row streams well without it (3-7% slower with it); paired rows
 * (row8_pair) read two streams at once, which the hardware prefetcher follows less well: they prefetch the
 * rows PAIR_PREFETCH_ROWS on into L1 (2 to 16 rows ahead measured; 4 best, 8 close). */
#define PREFETCH_BYTES 2048
#define PAIR_PREFETCH_ROWS 4

/* The 16 rows' sums (acc[m][TILE_POS[r]] for row r, zero past count) plus bias, reduced, rounded and stored. */
static inline __attribute__((always_inline)) void tile_store(__m512 (*acc)[16], const uint16_t *bias, uint16_t *y, int n0,
                                                             int count, int M, int N) {
    for (int r = count; r < 16; r++)
        for (int m = 0; m < M; m++) acc[m][TILE_POS[r]] = _mm512_setzero_ps();
    const __mmask16 keep = count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1u);
    const __m512 b = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, bias + n0)), 16))
                          : _mm512_setzero_ps();
    for (int m = 0; m < M; m++)
        _mm256_mask_storeu_epi16(y + (int64_t)m * N + n0, keep, bf16_round16(_mm512_add_ps(reduce16(acc[m]), b)));
}

/* Output rows n0 .. n0 + count - 1 (count <= 16) of int4 or int8 x bf16 through row4_plain or row8_plain, bf16
 * y. Per row: its scales as f32 and its zero-point term (block_scales, 16 groups a step); then the rows'
 * accumulators reduce together (tile_store). */
static inline __attribute__((always_inline)) void tile_plain(const uint16_t *xp, const float *xsum, const int32_t *wq,
                                                              int64_t words, const void *scale, int scale_bf16,
                                                              const int8_t *zero, const uint16_t *bias, uint16_t *y,
                                                              int n0, int count, int M, int N, int K, int group,
                                                              int bits, int kind, float offset, __m512i flip) {
    const int G = K / group;
    __m512 acc[MAX_ROWS][16];
    for (int r = 0; r < count; r++) {
        const int64_t n = n0 + r;
        const uint8_t *wr = (const uint8_t *)(wq + n * words);
        if (bits == 4) /* the row PREFETCH_BYTES ahead into L1 (why: see PREFETCH_BYTES) */
            prefetch_rows(wq, n * words * 4 + PREFETCH_BYTES, words * 4, (int64_t)N * words * 4);
        __m512 t[MAX_ROWS];
        for (int m = 0; m < M; m++) t[m] = _mm512_setzero_ps();
        for (int g = 0; g < G; g += 16) { /* 16 groups a step: their scales, zero-point term and columns */
            const __m512 s = block_scales(scale, scale_bf16, zero, xsum, n, G, g, offset, M, t);
            const int k0 = g * group, k1 = G - g >= 16 ? k0 + 16 * group : K;
            if (bits == 4)
                row4_plain(wr, xp, M, K, k0, k1, group, kind, s, t);
            else
                row8_plain(wr, xp, M, K, k0, k1, group, s, t, flip);
        }
        for (int m = 0; m < M; m++) acc[m][TILE_POS[r]] = t[m];
    }
    tile_store(acc, bias, y, n0, count, M, N);
}

/* tile_plain for int8 and one row of x: output rows two at a time through row8_pair (an odd last one through
 * row8_plain), each pair prefetching the two rows PAIR_PREFETCH_ROWS on. */
static inline __attribute__((always_inline)) void tile8_pairs(const uint16_t *xp, const float *xsum, const int32_t *wq,
                                                               int64_t words, const void *scale, int scale_bf16,
                                                               const int8_t *zero, const uint16_t *bias, uint16_t *y,
                                                               int n0, int count, int N, int K, int group, float offset,
                                                               __m512i flip) {
    const int G = K / group;
    const int64_t row_bytes = words * 4, end = (int64_t)N * row_bytes;
    __m512 acc[1][16];
    int r = 0;
    for (; r + 1 < count; r += 2) {
        const int64_t n = n0 + r;
        const uint8_t *wr[2] = {(const uint8_t *)wq + n * row_bytes, (const uint8_t *)wq + (n + 1) * row_bytes};
        prefetch_rows(wq, (n + PAIR_PREFETCH_ROWS) * row_bytes, 2 * row_bytes, end);
        __m512 t[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int g = 0; g < G; g += 16) {
            const __m512 s[2] = {block_scales(scale, scale_bf16, zero, xsum, n, G, g, offset, 1, &t[0]),
                                 block_scales(scale, scale_bf16, zero, xsum, n + 1, G, g, offset, 1, &t[1])};
            const int k0 = g * group, k1 = G - g >= 16 ? k0 + 16 * group : K;
            row8_pair(wr, xp, k0, k1, group, s, t, flip);
        }
        acc[0][TILE_POS[r]] = t[0];
        acc[0][TILE_POS[r + 1]] = t[1];
    }
    if (r < count) {
        const int64_t n = n0 + r;
        __m512 t = _mm512_setzero_ps();
        for (int g = 0; g < G; g += 16) {
            const __m512 s = block_scales(scale, scale_bf16, zero, xsum, n, G, g, offset, 1, &t);
            const int k0 = g * group, k1 = G - g >= 16 ? k0 + 16 * group : K;
            row8_plain((const uint8_t *)wq + n * row_bytes, xp, 1, K, k0, k1, group, s, &t, flip);
        }
        acc[0][TILE_POS[r]] = t;
    }
    tile_store(acc, bias, y, n0, count, 1, N);
}
#endif

/* The zero-point term of output row n for each row m of x: sum_g s[n, g] * zu[n, g] * xsum[m, g], with
 * zu = offset + z, as a vector whose lanes sum to it (the row subtracts it before its one reduction).
 * Vectorized over 16 groups a step (masked loads for the tail): done per group in scalar code it took
 * about a third of a g64 row's time (measured, 3072x576). */
static inline void zero_terms(const void *scale, int scale_bf16, const int8_t *zero, int64_t n, int G,
                              float offset, const float *xsum, int M, v16f *zterm) {
#if HAVE_AVX512_MASKED
    __m512 minus[MAX_ROWS]; /* block_scales subtracts the term: -(the sum), exactly (rounding is symmetric) */
    for (int m = 0; m < M; m++) minus[m] = _mm512_setzero_ps();
    for (int g = 0; g < G; g += 16) block_scales(scale, scale_bf16, zero, xsum, n, G, g, offset, M, minus);
    for (int m = 0; m < M; m++) zterm[m] = (v16f)_mm512_sub_ps(_mm512_setzero_ps(), minus[m]);
#else
    for (int m = 0; m < M; m++) zterm[m] = (v16f){0};
    for (int g = 0; g < G; g++) {
        float sz = scale_at(scale, scale_bf16, n * G + g) * (offset + (zero ? (float)zero[n * G + g] : 0.0f));
        for (int m = 0; m < M; m++) zterm[m][0] += sz * xsum[(int64_t)m * G + g];
    }
#endif
}

/* One output row: vector accumulators per group, scaled into one total per row of x (one reduction a row),
 * minus the zero-point term (zero_terms). */
static inline __attribute__((always_inline)) void row(const void *x, int x_bf16, const float *xsum,
                                                      const int32_t *wr, const void *scale, int scale_bf16,
                                                      const int8_t *zero, int64_t n, int M, int K, int group,
                                                      int bits, float *out) {
    const int G = K / group;
    /* the code offset 2^(bits-1), plus the 128 the bf16 path adds to every code */
    const float offset = (float)(1 << (bits - 1)) + (x_bf16 ? 128.0f : 0.0f);
    v16f tot[MAX_ROWS];
    v16f zterm[MAX_ROWS];
    zero_terms(scale, scale_bf16, zero, n, G, offset, xsum, M, zterm);
    for (int m = 0; m < M; m++) tot[m] = (v16f){0};
    for (int g = 0; g < G; g++) {
        const float s = scale_at(scale, scale_bf16, n * G + g);
#if HAVE_AVX512_BF16
        if (x_bf16) {
            group4_bf16((const uint8_t *)wr, (const uint16_t *)x, M, K, g * group, group, s, tot);
            continue;
        }
#endif
        const float *xf = (const float *)x;
        v16f acc[MAX_ROWS];
        for (int m = 0; m < M; m++) acc[m] = (v16f){0};
        for (int k = g * group; k < (g + 1) * group; k += 16) {
            v16f u = bits == 4 ? codes4(wr, k) : codes8((const uint8_t *)wr, k);
            for (int m = 0; m < M; m++) acc[m] += u * load16(xf + (int64_t)m * K + k);
        }
        for (int m = 0; m < M; m++) tot[m] += acc[m] * s;
    }
    for (int m = 0; m < M; m++) out[m] = hsum(tot[m] - zterm[m]);
}

#if HAVE_AVX2_ROW
/* 16 codes u of a row from column k as floats, columns k..k+7 in lo and k+8..k+15 in hi. */
static inline __attribute__((always_inline)) void codes_avx2(const int32_t *wr, int k, int bits, __m256 *lo,
                                                             __m256 *hi) {
    if (bits == 4) {
        const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), nibble = _mm256_set1_epi32(15);
        *lo = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(wr[k / 8]), shifts), nibble));
        *hi = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(wr[k / 8 + 1]), shifts), nibble));
    } else {
        const __m128i b = _mm_loadu_si128((const __m128i *)((const uint8_t *)wr + k));
        *lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
        *hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(b, b)));
    }
}

static inline float hsum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* row() for float32 x on AVX2 + FMA, for a constant M (so that the accumulators live in registers; 16
 * ymm registers): with M <= 2 each row of x keeps two accumulator chains (the 8-lane halves of 16 columns,
 * so FMA latency does not bound one row), with more rows one chain each. */
static inline __attribute__((always_inline)) void row_avx2(const float *x, const float *xsum, const int32_t *wr,
                                                           const void *scale, int scale_bf16, const int8_t *zero,
                                                           int64_t n, int M, int K, int group, int bits,
                                                           float *out) {
    const int G = K / group, split = M <= 2;
    v16f zterm[MAX_ROWS];
    zero_terms(scale, scale_bf16, zero, n, G, (float)(1 << (bits - 1)), xsum, M, zterm);
    __m256 tot[MAX_ROWS][2];
    for (int m = 0; m < M; m++) tot[m][0] = tot[m][1] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        const __m256 s = _mm256_set1_ps(scale_at(scale, scale_bf16, n * G + g));
        __m256 acc[MAX_ROWS][2];
        for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
        for (int k = g * group; k < (g + 1) * group; k += 16) {
            __m256 lo, hi;
            codes_avx2(wr, k, bits, &lo, &hi);
            for (int m = 0; m < M; m++) {
                const float *xr = x + (int64_t)m * K + k;
                acc[m][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xr), acc[m][0]);
                acc[m][split] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xr + 8), acc[m][split]);
            }
        }
        for (int m = 0; m < M; m++) {
            tot[m][0] = _mm256_fmadd_ps(acc[m][0], s, tot[m][0]);
            if (split) tot[m][1] = _mm256_fmadd_ps(acc[m][1], s, tot[m][1]);
        }
    }
    for (int m = 0; m < M; m++) out[m] = hsum8(_mm256_add_ps(tot[m][0], tot[m][1])) - zterm[m][0];
}
#endif


void shoal_qgemv(const void *x, int x_bf16, const int32_t *wq, const void *scale, int scale_bf16,
                 const int8_t *zero, const void *bias, void *y, int M, int N, int K, int group, int bits,
                 int use_dot, int num_threads, int signed_codes) {
    const int64_t words = (int64_t)K * bits / 32;
    const int G = K / group;
    const int dot = HAVE_AVX512_BF16 && use_dot && x_bf16 && bits == 4;
    float xsum[M * G];
#if HAVE_AVX512_BF16
    if (use_dot && x_bf16 && group % 64 == 0) { /* row4_plain / row8_plain, through tiles of 16 rows */
        const uint16_t *xh = (const uint16_t *)x;
        uint16_t xp[M * K];
        for (int m = 0; m < M; m++) {
            for (int g = 0; g < G; g++) { /* 16 partial sums a group, widened exactly */
                __m512 acc = _mm512_setzero_ps();
                for (int k = g * group; k < (g + 1) * group; k += 16)
                    acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(
                                                 _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(xh + (int64_t)m * K + k))), 16)));
                xsum[m * G + g] = _mm512_reduce_add_ps(acc);
            }
            const uint16_t *xr = xh + (int64_t)m * K;
            uint16_t *o = xp + (int64_t)m * K;
            if (bits == 4) /* row4_plain's order: per block of B = 128 (or a last 64) columns, o[B/4 * i + j] = x[4j + i] */
                for (int k = 0; k < K; k += 128) {
                    const int L = K - k >= 128 ? 32 : 16;
                    for (int i = 0; i < 4; i++)
                        for (int j = 0; j < L; j++) o[k + L * i + j] = xr[k + 4 * j + i];
                }
            else /* row8_plain's: per 64 columns the 32 even, then the 32 odd */
                for (int k = 0; k < K; k += 64)
                    for (int j = 0; j < 32; j++) {
                        o[k + j] = xr[k + 2 * j];
                        o[k + 32 + j] = xr[k + 2 * j + 1];
                    }
        }
        const int kind = group == 64 ? KIND_G64 : group % 128 == 0 ? KIND_G128 : KIND_OTHER;
        /* the code offset, plus the 128 of every bf16 code (int8: of both nibbles, 128 + 16 * 128) */
        const float offset = bits == 4 ? 8.0f + 128.0f : 128.0f + 17.0f * 128.0f;
        const int tiles = (N + 15) / 16;
        const __m512i flip = _mm512_set1_epi8(signed_codes ? (char)0x80 : 0); /* q -> u = q + 128 */
#pragma omp parallel for schedule(static) num_threads(num_threads)
        for (int t = 0; t < tiles; t++) {
            const int n0 = t * 16, count = N - n0 < 16 ? N - n0 : 16;
            /* M a constant in each copy, so that the rows' accumulators stay in registers (int8 with M = 2-4
             * through one copy of runtime M measured 1.5x slower than the old fp32 path) */
            switch (M) {
            case 1:
                if (bits == 8)
                    tile8_pairs(xp, xsum, wq, words, scale, scale_bf16, zero, bias, y, n0, count, N, K, group, offset, flip);
                else
                    tile_plain(xp, xsum, wq, words, scale, scale_bf16, zero, bias, y, n0, count, 1, N, K, group, bits, kind, offset, flip);
                break;
            case 2: tile_plain(xp, xsum, wq, words, scale, scale_bf16, zero, bias, y, n0, count, 2, N, K, group, bits, kind, offset, flip); break;
            case 3: tile_plain(xp, xsum, wq, words, scale, scale_bf16, zero, bias, y, n0, count, 3, N, K, group, bits, kind, offset, flip); break;
            default: tile_plain(xp, xsum, wq, words, scale, scale_bf16, zero, bias, y, n0, count, 4, N, K, group, bits, kind, offset, flip);
            }
        }
        return;
    }
#endif
    float xbuf[(x_bf16 && !dot) ? M * K : 1];
    const float *xf = x_bf16 ? xbuf : (const float *)x;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            float acc = 0.0f;
            for (int k = g * group; k < (g + 1) * group; k++) {
                int64_t i = (int64_t)m * K + k;
                float v = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
                if (x_bf16 && !dot) xbuf[i] = v;
                acc += v;
            }
            xsum[m * G + g] = acc;
        }
    const void *xk = dot ? x : (const void *)xf;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int n = 0; n < N; n++) {
        float out[MAX_ROWS];
        const int32_t *wr = wq + (int64_t)n * words;
#if HAVE_AVX2_ROW
        switch (M) {
        case 1: row_avx2(xk, xsum, wr, scale, scale_bf16, zero, n, 1, K, group, bits, out); break;
        case 2: row_avx2(xk, xsum, wr, scale, scale_bf16, zero, n, 2, K, group, bits, out); break;
        case 3: row_avx2(xk, xsum, wr, scale, scale_bf16, zero, n, 3, K, group, bits, out); break;
        default: row_avx2(xk, xsum, wr, scale, scale_bf16, zero, n, 4, K, group, bits, out);
        }
#else
        if (M == 1) row(xk, dot, xsum, wr, scale, scale_bf16, zero, n, 1, K, group, bits, out);
        else row(xk, dot, xsum, wr, scale, scale_bf16, zero, n, M, K, group, bits, out);
#endif
        for (int m = 0; m < M; m++) {
            int64_t i = (int64_t)m * N + n;
            if (x_bf16) {
                float b = bias ? bf16_to_f32(((const uint16_t *)bias)[n]) : 0.0f;
                ((uint16_t *)y)[i] = f32_to_bf16(out[m] + b);
            } else {
                ((float *)y)[i] = out[m] + (bias ? ((const float *)bias)[n] : 0.0f);
            }
        }
    }
}
