/* The element-wise work of a decoder layer, fused (CPU, float32 or bfloat16): RMSNorm with the residual
 * add, rotary embedding of q and k in place, and SiLU-and-mul.
 *
 * In eager PyTorch each of these is 4-8 small ops (casts, pow, mean, rsqrt, cat, neg, ...), each a
 * dispatch and a pass over memory; in a single-sequence decode step the ops, not the bytes, cost the time.
 * Here each is one pass over its rows. The operations follow vLLM's CPU kernels (csrc/cpu/layernorm.cpp,
 * pos_encoding.cpp, activation.cpp): fused_add_rms_norm, neox-style rotary_embedding, silu_and_mul.
 *
 * Numerics: everything is computed in float32 and rounded once to bfloat16 (round to nearest even, NaN
 * kept as NaN, as torch rounds). The residual sum is rounded before the norm reads it, because that
 * rounded value is what the next layer adds to (as in Hugging Face's bf16 forward).
 *
 * Layouts are row-major with unit stride inside a row. Work is split over rows with OpenMP only when there
 * are enough elements to pay for waking the threads: a single-token decode step runs on the caller's thread.
 * No -ffast-math is assumed: the loops vectorize through `omp simd` and the bit-level bf16 conversions.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vec8.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define PARALLEL_MIN_ELEMS 32768 /* below this, fork/join (a few us) costs more than the split saves */

ALWAYS_INLINE float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

ALWAYS_INLINE uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN -> the quiet NaN torch uses */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t rounded = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0u : rounded;
}

ALWAYS_INLINE float load(const void *base, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

ALWAYS_INLINE void store(void *base, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)base)[i] = f32_to_bf16(v);
    else
        ((float *)base)[i] = v;
}

/* Rounds a value through the storage dtype (identity for float32). */
ALWAYS_INLINE float through(float v, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

static int use_threads(int64_t rows, int64_t elems_per_row, int threads) {
    return threads > 1 && rows > 1 && rows * elems_per_row >= PARALLEL_MIN_ELEMS;
}

/* ---- RMSNorm (with residual add) ---------------------------------------------------------------------
 * add:  residual = residual + x (rounded to the dtype); out = residual / rms(residual) * weight
 * else: out = x / rms(x) * weight;  rms(v) = sqrt(mean(v^2) + eps)  (Zhang & Sennrich 2019)  */
ALWAYS_INLINE void rms_norm_row(const void *x, void *residual, const void *weight, void *out, int64_t row,
                                int dim, float eps, int bf16, int add) {
    const int64_t o = row * dim;
    const void *src = x;
    float ss = 0.0f;
    if (add) {
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < dim; i++) {
            float r = through(load(residual, o + i, bf16) + load(x, o + i, bf16), bf16);
            store(residual, o + i, r, bf16);
            ss += r * r;
        }
        src = residual;
    } else {
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < dim; i++) {
            float v = load(x, o + i, bf16);
            ss += v * v;
        }
    }
    const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
#pragma omp simd
    for (int i = 0; i < dim; i++) store(out, o + i, load(src, o + i, bf16) * inv * load(weight, i, bf16), bf16);
}

/* One function per dtype and variant: the dtype is a constant inside each, so its loops vectorize. (A dtype
 * flag passed through an OpenMP region stays a runtime value there and blocks vectorization.) */
typedef struct {
    const void *x;
    void *residual;
    const void *weight;
    void *out;
    int dim;
    float eps;
} norm_args;

typedef void (*norm_row_fn)(const norm_args *, int64_t);
static void norm_bf16(const norm_args *a, int64_t r) { rms_norm_row(a->x, a->residual, a->weight, a->out, r, a->dim, a->eps, 1, 0); }
static void add_norm_bf16(const norm_args *a, int64_t r) { rms_norm_row(a->x, a->residual, a->weight, a->out, r, a->dim, a->eps, 1, 1); }
static void norm_f32(const norm_args *a, int64_t r) { rms_norm_row(a->x, a->residual, a->weight, a->out, r, a->dim, a->eps, 0, 0); }
static void add_norm_f32(const norm_args *a, int64_t r) { rms_norm_row(a->x, a->residual, a->weight, a->out, r, a->dim, a->eps, 0, 1); }

/* residual may be NULL when add == 0. */
void shoal_rms_norm(const void *x, void *residual, const void *weight, void *out, int rows, int dim, float eps,
                    int bf16, int add, int threads) {
    const norm_args a = {x, residual, weight, out, dim, eps};
    const norm_row_fn row = bf16 ? (add ? add_norm_bf16 : norm_bf16) : (add ? add_norm_f32 : norm_f32);
    if (use_threads(rows, dim, threads)) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int r = 0; r < rows; r++) row(&a, r);
    } else {
        for (int r = 0; r < rows; r++) row(&a, r);
    }
}

/* ---- Rotary embedding, neox style (rotate-half; Su et al. 2021, GPT-NeoX / Hugging Face Llama) -------
 * The first `heads` heads of each row of x [tokens, row_stride] are rotated in place:
 *   (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), x1/x2 the two halves of a head,
 * with cos_sin [tokens, head_dim] float32: cos in its first half, sin in its second (vLLM's cache layout). */
ALWAYS_INLINE void rotary_token(void *x, const float *cos_sin, int64_t t, int heads, int head_dim,
                                int64_t row_stride, int bf16) {
    const int half = head_dim / 2;
    const float *c = cos_sin + t * head_dim, *s = c + half;
    for (int h = 0; h < heads; h++) {
        const int64_t o = t * row_stride + (int64_t)h * head_dim;
#pragma omp simd
        for (int i = 0; i < half; i++) {
            float x1 = load(x, o + i, bf16), x2 = load(x, o + half + i, bf16);
            store(x, o + i, x1 * c[i] - x2 * s[i], bf16);
            store(x, o + half + i, x2 * c[i] + x1 * s[i], bf16);
        }
    }
}

typedef void (*rotary_fn)(void *, const float *, int64_t, int, int, int64_t);
static void rotary_bf16(void *x, const float *cs, int64_t t, int heads, int head_dim, int64_t stride) {
    rotary_token(x, cs, t, heads, head_dim, stride, 1);
}
static void rotary_f32(void *x, const float *cs, int64_t t, int heads, int head_dim, int64_t stride) {
    rotary_token(x, cs, t, heads, head_dim, stride, 0);
}

void shoal_rotary(void *x, const float *cos_sin, int tokens, int heads, int head_dim, int64_t row_stride,
                  int bf16, int threads) {
    const rotary_fn token = bf16 ? rotary_bf16 : rotary_f32;
    if (use_threads(tokens, (int64_t)heads * head_dim, threads)) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int t = 0; t < tokens; t++) token(x, cos_sin, t, heads, head_dim, row_stride);
    } else {
        for (int t = 0; t < tokens; t++) token(x, cos_sin, t, heads, head_dim, row_stride);
    }
}

/* ---- SiLU-and-mul (SwiGLU; Shazeer 2020) -------------------------------------------------------------
 * out [rows, inter] = silu(gate) * up, gate and up the two halves of gate_up [rows, 2 * inter].
 *
 * Written with GCC's generic vectors, 8 lanes (AVX2 registers; SSE pairs or scalar code elsewhere),
 * because GCC does not vectorize it from scalar code on AVX2: the clamps' selects are control flow to it
 * under trapping math, its default (measured: scalar vdivss/vcomiss, about 4% of a 32-sequence float32
 * decode step). Every element, the row's tail included (through a zero-padded 8-lane buffer), takes the
 * same vector operations, so a value's result does not depend on its position.
 *
 * expf written out, since glibc's vector expf is declared only under -ffast-math: Cephes' expf, Cody-Waite
 * reduction by ln 2 and a degree-6 polynomial, within 2 ulp of expf over the clamped range. The rounding
 * shift relies on no -ffast-math (it could fold (a + s) - s). */
#define LANES 8
#define ROUNDING_SHIFT 12582912.0f /* 1.5 * 2^23: adding it rounds to an integer, kept in the low mantissa bits */

ALWAYS_INLINE v8f exp_approx(v8f x) {
    x = select8(x >= -87.3f, x, (v8f){0} - 87.3f); /* below, e^x would be denormal; NaN lands here too */
    x = select8(x <= 88.3f, x, (v8f){0} + 88.3f);  /* e^88.3 < FLT_MAX */
    const v8f shifted = x * 1.44269504088896341f + ROUNDING_SHIFT;
    const v8f fx = shifted - ROUNDING_SHIFT; /* n = round(x log2 e), in [-126, 127], exactly */
    x -= fx * 0.693359375f;
    x -= fx * -2.12194440e-4f;
    v8f y = x * 1.9875691500e-4f + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * (x * x) + x + 1.0f;
    const v8u bits = ((v8u)shifted - 0x4b400000u + 127u) << 23; /* 2^n: n sits in the low mantissa bits */
    return y * (v8f)bits;
}

ALWAYS_INLINE v8f load8_as(const void *base, int64_t i, int bf16) {
    return bf16 ? load8_bf16((const uint16_t *)base + i) : load8((const float *)base + i);
}

ALWAYS_INLINE void store8(void *base, int64_t i, v8f v, int bf16) {
    if (!bf16) {
        memcpy((float *)base + i, &v, sizeof v);
        return;
    }
    const v8u u = (v8u)v; /* round to nearest even, NaN -> the quiet NaN torch uses (as f32_to_bf16) */
    v8u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    rounded = (v8u)select8((v8i)((u & 0x7fffffffu) > 0x7f800000u), (v8f)((v8u){0} + 0x7fc0u), (v8f)rounded);
    const v8h h = __builtin_convertvector(rounded, v8h);
    memcpy((uint16_t *)base + i, &h, sizeof h);
}

/* silu(g) = g / (1 + e^-g): a NaN gate stays NaN through the division whatever exp_approx made of it. */
ALWAYS_INLINE v8f silu_mul8(v8f g, v8f u) { return g / (1.0f + exp_approx(-g)) * u; }

ALWAYS_INLINE void silu_mul_row(const void *gate_up, void *out, int64_t row, int inter, int bf16) {
    const int64_t gi = row * 2 * inter, oi = row * inter;
    int i = 0;
    for (; i + LANES <= inter; i += LANES)
        store8(out, oi + i, silu_mul8(load8_as(gate_up, gi + i, bf16), load8_as(gate_up, gi + inter + i, bf16)), bf16);
    if (i == inter) return;
    float g[LANES] = {0}, u[LANES] = {0}, o[LANES]; /* the tail, padded */
    for (int j = 0; i + j < inter; j++) {
        g[j] = load(gate_up, gi + i + j, bf16);
        u[j] = load(gate_up, gi + inter + i + j, bf16);
    }
    store8(o, 0, silu_mul8(load8(g), load8(u)), 0);
    for (int j = 0; i + j < inter; j++) store(out, oi + i + j, o[j], bf16);
}

typedef void (*silu_fn)(const void *, void *, int64_t, int);
static void silu_mul_bf16(const void *gu, void *out, int64_t r, int inter) { silu_mul_row(gu, out, r, inter, 1); }
static void silu_mul_f32(const void *gu, void *out, int64_t r, int inter) { silu_mul_row(gu, out, r, inter, 0); }

void shoal_silu_and_mul(const void *gate_up, void *out, int rows, int inter, int bf16, int threads) {
    const silu_fn row = bf16 ? silu_mul_bf16 : silu_mul_f32;
    if (use_threads(rows, inter, threads)) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int r = 0; r < rows; r++) row(gate_up, out, r, inter);
    } else {
        for (int r = 0; r < rows; r++) row(gate_up, out, r, inter);
    }
}
