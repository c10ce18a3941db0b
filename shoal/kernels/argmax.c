/* Row-wise argmax of float32 logits (CPU): the greedy sampler's choice, as torch.argmax(dim=-1) makes it.
 *
 * Why: torch's CPU argmax over a [32, 49152] float32 batch took 0.95-1.8 ms on the 2-core AVX2 EPYC, ten times
 * its amax (0.1 ms), because its index-tracking reduction does not vectorize: about 2% of a 32-sequence
 * float32 decode step. Here each row is two vector passes: the row's max (NaN noted on the way), then the
 * first index holding it, which reads about half the row on average: 0.17 ms for that batch (argmax.py).
 *
 * Semantics are torch.argmax's on CPU: the first index of the largest value; NaN counts as larger than
 * everything, so a row with a NaN answers its first NaN; a row of -inf answers 0.
 *
 * Layout: x [rows, n] with row stride `stride` elements, unit stride within a row; out [rows] int64. The
 * caller (argmax.py) checks all of it: this file trusts its arguments. Rows are split over OpenMP threads
 * when the batch is big enough to pay for waking them.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

#include "vec8.h"

#define LANES 8
#define PARALLEL_MIN_ELEMS 65536 /* below, fork/join (a few us) costs more than the split saves */

static inline int any(v8i mask) {
#ifdef __AVX__
    return _mm256_movemask_ps((__m256)mask) != 0;
#else
    int r = 0;
    for (int j = 0; j < LANES; j++) r |= mask[j];
    return r != 0;
#endif
}

/* The row's max over non-NaN values, and whether it holds a NaN. */
static inline float row_max(const float *x, int64_t n, int *has_nan) {
    v8f best = (v8f){0} - INFINITY;
    v8i nan = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        const v8f v = load8(x + i);
        nan |= v != v;
        best = select8(v > best, v, best); /* false for NaN: it never enters best */
    }
    float m = -INFINITY;
    for (int j = 0; j < LANES; j++) m = best[j] > m ? best[j] : m;
    int tail_nan = 0;
    for (; i < n; i++) {
        tail_nan |= x[i] != x[i];
        m = x[i] > m ? x[i] : m;
    }
    *has_nan = any(nan) || tail_nan;
    return m;
}

static int64_t row_argmax(const float *x, int64_t n) {
    int has_nan;
    const float m = row_max(x, n, &has_nan);
    int64_t i = 0;
    if (has_nan) {
        while (x[i] == x[i]) i++;
        return i;
    }
    for (; i + 4 * LANES <= n; i += 4 * LANES) /* four vectors a test: the scan is one branch per 32 values */
        if (any((load8(x + i) == m) | (load8(x + i + LANES) == m) | (load8(x + i + 2 * LANES) == m) |
                (load8(x + i + 3 * LANES) == m)))
            break;
    while (i < n && x[i] != m) i++;
    return i < n ? i : 0; /* i == n only for a row of -inf (m stays -inf, which x[0] equals): unreachable */
}

void shoal_argmax_f32(const float *x, int64_t *out, int rows, int64_t n, int64_t stride, int threads) {
    if (threads > 1 && rows > 1 && rows * n >= PARALLEL_MIN_ELEMS) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int r = 0; r < rows; r++) out[r] = row_argmax(x + (int64_t)r * stride, n);
    } else {
        for (int r = 0; r < rows; r++) out[r] = row_argmax(x + (int64_t)r * stride, n);
    }
}
